"""The local stack without Docker: a real Apache Kafka broker (KRaft) and a real redis-server.

Kafka's jars come from Maven Central once and are cached under ``settings.cache_dir``; data,
logs and pid files live under ``settings.run_dir``. Every process the stack starts is
recorded in a pid file and stopped by that pid only, after checking that the pid still runs
the command the stack started (a recycled pid is never signalled).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # untyped exports
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from stockflow.errors import StackError
from stockflow.settings import Settings
from stockflow.topics import admin_client, ensure_topics

POM = Path(__file__).parent / "kafka" / "pom.xml"
Say = Callable[[str], None]

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
"""

_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
listeners={protocol}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners={protocol}://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,{protocol}:{protocol}
inter.broker.listener.name={protocol}
log.dirs={data}
num.partitions={partitions}
# One broker: internal topics cannot have more than one replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Workers join at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
# stockflow creates its topics with the right partition count; a typo must not make one.
auto.create.topics.enable=false
# The log cleaner compacts the processor's changelog, one partition at a time, and zeroes its
# whole dedupe buffer before each: 128 MiB by default, 40% of the cleaner's CPU here, of
# which a changelog partition's dirty section used 0.1%. 16 MiB still maps about 600,000
# records a pass; a longer dirty section is cleaned in more than one pass.
log.cleaner.dedupe.buffer.size=16777216
"""

# With a SASL protocol: clients log in as the one user the settings name, with PLAIN or SCRAM,
# and the broker logs in as that user to itself with PLAIN. SCRAM checks a login against
# credentials kept in the cluster's metadata, which the stack stores through a PLAIN login once
# the broker is up (_store_scram_credentials).
_SASL_PROPERTIES = """\
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=PLAIN
listener.name.{listener}.plain.sasl.jaas.config=\
org.apache.kafka.common.security.plain.PlainLoginModule required \
username="{user}" password="{password}" user_{user}="{password}";
listener.name.{listener}.scram-sha-256.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.{listener}.scram-sha-512.sasl.jaas.config=\
org.apache.kafka.common.security.scram.ScramLoginModule required;
"""
# With SSL or SASL_SSL: the broker's key and certificate, signed by the stack's own CA, and that
# CA to trust when it connects to itself.
_TLS_PROPERTIES = """\
ssl.keystore.type=PKCS12
ssl.keystore.location={keystore}
ssl.keystore.password={password}
ssl.key.password={password}
ssl.truststore.type=PKCS12
ssl.truststore.location={truststore}
ssl.truststore.password={password}
"""
# The keystores hold a throwaway CA made for this stack alone, on this machine: their password
# guards nothing the files' own permissions do not.
_TLS_STORE_PASSWORD = "stockflow-local"
_SASL_USER = re.compile(r"[A-Za-z0-9_.-]+")
_PLAIN_SECRET = re.compile(r'[^"\\\s]+')  # nothing a config file would need escaped


@dataclass(frozen=True)
class ProcessStatus:
    name: str
    pid: int | None
    running: bool
    detail: str


class ManagedProcess:
    """A background process owned by the stack: started detached, tracked by pid file."""

    def __init__(self, name: str, run_dir: Path) -> None:
        self.name = name
        self.pid_file = run_dir / "pids" / f"{name}.pid"
        self.log_file = run_dir / "logs" / f"{name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _is_ours(pid, self.pid_file) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None) -> int:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # not killed by a Ctrl-C meant for the CLI
            )
        # The executable is recorded too: _is_ours checks it before any signal is sent.
        executable = os.path.realpath(shutil.which(argv[0]) or argv[0])
        self.pid_file.write_text(f"{process.pid}\n{executable}\n")
        return process.pid

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM, wait, then SIGKILL. Returns True if a process was stopped."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our own child, so that it does not linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _is_ours(pid: int, pid_file: Path) -> bool:
    if not _alive(pid):
        return False
    try:
        executable = pid_file.read_text().splitlines()[1]
        running = os.readlink(f"/proc/{pid}/exe")
    except (OSError, IndexError):
        return False
    return running == executable


def kafka_cluster_id() -> str:
    """A random cluster id: 16 bytes, URL-safe base64, as Kafka's own tool makes them.

    Never one starting with "-": the storage tool would read it as an option and fail (a
    fresh-clone CI run did; one start in 64 would).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process exactly these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[f"STOCKFLOW_{name.upper()}"] = str(value)
    return env


class LocalStack:
    def __init__(self, settings: Settings, say: Say = print) -> None:
        self.settings = settings
        self.say = say
        run_dir = settings.run_dir
        self.kafka = ManagedProcess("kafka", run_dir)
        self.redis = ManagedProcess("redis", run_dir)
        self.kafka_home = settings.cache_dir / f"kafka-{settings.kafka_version}"

    # -- install -------------------------------------------------------------------------
    def install_kafka(self) -> Path:
        """Fetch the broker's jars with Maven once; later calls reuse the cache."""
        libs = self.kafka_home / "libs"
        done = self.kafka_home / ".complete"
        if done.exists():
            return libs
        for tool, package in (("java", "openjdk-17-jre-headless"), ("mvn", "maven")):
            if shutil.which(tool) is None:
                raise StackError(
                    f"`{tool}` is not on PATH; the local Kafka broker needs it."
                    f" Install it (apt-get install {package}), or point"
                    " STOCKFLOW_BOOTSTRAP_SERVERS at a Kafka you already run"
                )
        self.say(f"Fetching Apache Kafka {self.settings.kafka_version} jars with Maven (first run only)...")
        self.kafka_home.mkdir(parents=True, exist_ok=True)
        log_path = self.kafka_home / "maven.log"
        with open(log_path, "wb") as log:
            result = subprocess.run(
                [
                    "mvn",
                    "-B",
                    "--no-transfer-progress",
                    "-f",
                    str(POM),
                    "dependency:copy-dependencies",
                    f"-Dkafka.version={self.settings.kafka_version}",
                    f"-DoutputDirectory={libs.resolve()}",
                    "-DincludeScope=runtime",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise StackError(
                f"Maven could not fetch Kafka {self.settings.kafka_version} (exit"
                f" {result.returncode}); is Maven Central reachable? Full log: {log_path}\n{tail}"
            )
        done.write_text(self.settings.kafka_version + "\n")
        return libs

    # -- start ---------------------------------------------------------------------------
    def up(self) -> None:
        self.start_redis()
        self.start_kafka()
        created = ensure_topics(self.settings)
        if created:
            self.say(f"Created topics: {', '.join(created)} ({self.settings.partitions} partitions)")

    def start_redis(self) -> None:
        if self.redis.running():
            self.say(f"Redis already running on port {self.settings.redis_port}")
            return
        server = shutil.which("redis-server")
        if server is None:
            raise StackError(
                "redis-server is not on PATH: run `make setup` (it installs Debian's"
                " redis-server), or point STOCKFLOW_REDIS_URL at a Redis you already run"
            )
        self._refuse_busy_port(self.settings.redis_port, "STOCKFLOW_REDIS_PORT")
        data = self.settings.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        # A password in STOCKFLOW_REDIS_URL is one the local Redis asks for. In a config file
        # only this user reads, not on the command line, where any process list shows it.
        config = data / "redis.conf"
        config.touch(mode=0o600)
        password = unquote(urlsplit(self.settings.redis_url).password or "")
        if password and not _PLAIN_SECRET.fullmatch(password):
            raise StackError(
                "the local Redis takes a password (in STOCKFLOW_REDIS_URL) without quotes,"
                " backslashes or spaces (they would have to be escaped in its configuration)"
            )
        config.write_text(f'requirepass "{password}"\n' if password else "")
        # Nothing on disk: the event log is the truth and the read models are rebuilt from it.
        self.redis.start(
            [
                server,
                str(config.resolve()),
                "--port",
                str(self.settings.redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data.resolve()),
            ]
        )
        client = redis.Redis(
            port=self.settings.redis_port, password=password or None, socket_connect_timeout=0.5
        )
        self._wait("Redis", self.redis, lambda: bool(client.ping()), timeout_s=20)
        self.say(f"Redis up on 127.0.0.1:{self.settings.redis_port} (log: {self.redis.log_file})")

    def start_kafka(self) -> None:
        if self.kafka.running():
            self.say(f"Kafka already running on port {self.settings.kafka_port}")
            return
        libs = self.install_kafka()
        for port, setting in (
            (self.settings.kafka_port, "STOCKFLOW_KAFKA_PORT"),
            (self.settings.kafka_controller_port, "STOCKFLOW_KAFKA_CONTROLLER_PORT"),
        ):
            self._refuse_busy_port(port, setting)
        home = (self.settings.run_dir / "kafka").resolve()
        data = home / "data"
        config = home / "server.properties"
        log4j = home / "log4j2.properties"
        home.mkdir(parents=True, exist_ok=True)
        config.write_text(self._server_properties(data))
        log4j.write_text(_LOG4J2.format(log=(self.settings.run_dir / "logs" / "kafka-server.log").resolve()))
        java = [
            "java",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{libs.resolve()}/*",
        ]
        if not (data / "meta.properties").exists():
            cluster_id = kafka_cluster_id()
            result = subprocess.run(
                [
                    *java,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(config),
                    "--standalone",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise StackError(
                    f"formatting Kafka storage in {data} failed:\n{result.stdout}{result.stderr}"
                )
        self.kafka.start(
            [
                "java",
                f"-Xmx{self.settings.kafka_heap}",
                "-Xms256m",
                "-XX:+UseG1GC",
                # The quick (C1) compiler only. With C2 as well, the compiler thread never went
                # quiet under the pipeline's load: 0.5-0.8 s of CPU per 100,000 commands in each
                # of six runs in a row, half the broker's CPU, on cores the workers share. C1's
                # code costs the request threads ~1 us per command more; the broker's total
                # fell from 10-15 us per command to 7-8.
                "-XX:TieredStopAtLevel=1",
                f"-Dlog4j2.configurationFile={log4j}",
                "-cp",
                f"{libs.resolve()}/*",
                "kafka.Kafka",
                str(config),
            ]
        )

        # Whatever the clients' mechanism, the broker takes the settings' user with PLAIN: the
        # login that can store a SCRAM one.
        plain = self.settings.model_copy(update={"kafka_sasl_mechanism": "PLAIN"})

        def broker_answers(settings: Settings) -> bool:
            # Knock on the port first: a Kafka client pointed at a closed port logs every retry.
            if not port_open(settings.kafka_port):
                return False
            try:
                return bool(admin_client(settings).list_topics(timeout=5).brokers)
            except KafkaException:
                return False

        self._wait("Kafka", self.kafka, lambda: broker_answers(plain), timeout_s=90)
        if self.settings.kafka_sasl and self.settings.kafka_sasl_mechanism != "PLAIN":
            _store_scram_credentials(plain, self.settings.kafka_sasl_mechanism)
            self._wait(
                f"Kafka to take {self.settings.kafka_sasl_mechanism} logins",
                self.kafka,
                lambda: broker_answers(self.settings),
                timeout_s=30,
            )
        self._wait("Kafka to hand out producer ids", self.kafka, _producer_id_probe(self.settings), 30)
        self.say(
            f"Kafka {self.settings.kafka_version} up on {self.settings.bootstrap_servers}"
            f" (logs: {self.kafka.log_file.parent})"
        )

    @property
    def tls_ca_file(self) -> Path:
        """The certificate (PEM) of the CA that signs the local broker's, with SSL or SASL_SSL:
        what STOCKFLOW_KAFKA_SSL_CA_FILE must name for clients to trust it."""
        return (self.settings.run_dir / "kafka" / "tls" / "ca.pem").resolve()

    def _server_properties(self, data: Path) -> str:
        """The broker's configuration for the settings' protocol: with TLS, its certificate
        (made on first use); with SASL, the settings' user."""
        settings = self.settings
        protocol = settings.kafka_security_protocol
        properties = _SERVER_PROPERTIES.format(
            protocol=protocol,
            port=settings.kafka_port,
            controller_port=settings.kafka_controller_port,
            data=data,
            partitions=settings.partitions,
        )
        if settings.kafka_sasl:
            user, password = settings.kafka_sasl_username, settings.kafka_sasl_password
            if not (_SASL_USER.fullmatch(user) and _PLAIN_SECRET.fullmatch(password)):
                raise StackError(
                    "the local stack's broker takes a STOCKFLOW_KAFKA_SASL_USERNAME of letters, digits"
                    " and . _ - and a STOCKFLOW_KAFKA_SASL_PASSWORD without quotes, backslashes or"
                    " spaces (they would have to be escaped in its configuration)"
                )
            properties += _SASL_PROPERTIES.format(listener=protocol.lower(), user=user, password=password)
        if settings.kafka_tls:
            if Path(settings.kafka_ssl_ca_file).resolve() != self.tls_ca_file:
                raise StackError(
                    f"with {protocol} the local stack's broker has a certificate of its own CA, which"
                    f" clients trust through STOCKFLOW_KAFKA_SSL_CA_FILE={self.tls_ca_file}: set it"
                )
            keystore, truststore = self._make_tls_stores()
            properties += _TLS_PROPERTIES.format(
                keystore=keystore, truststore=truststore, password=_TLS_STORE_PASSWORD
            )
        return properties

    def _make_tls_stores(self) -> tuple[Path, Path]:
        """The broker's keystore (its key, and its certificate for 127.0.0.1 signed by a CA made
        for this stack) and a truststore of that CA, made with the JDK's keytool on first use;
        the CA's certificate goes to ``tls_ca_file`` for clients."""
        folder = self.tls_ca_file.parent
        keystore, truststore = folder / "broker.p12", folder / "truststore.p12"
        if keystore.exists() and truststore.exists() and self.tls_ca_file.exists():
            return keystore, truststore
        folder.mkdir(parents=True, exist_ok=True)
        ca_store, request, signed = folder / "ca.p12", folder / "broker.csr", folder / "broker.pem"
        for path in (ca_store, keystore, truststore, request, signed, self.tls_ca_file):  # a run cut short
            path.unlink(missing_ok=True)
        store = ["-storetype", "PKCS12", "-storepass", _TLS_STORE_PASSWORD]
        new_key = ["-genkeypair", "-keyalg", "RSA", "-keysize", "2048", "-validity", "3650"]
        steps = [
            [
                *new_key,
                "-alias",
                "ca",
                "-dname",
                "CN=stockflow local CA",
                "-ext",
                "bc:c",
                "-keystore",
                ca_store,
            ],
            ["-exportcert", "-rfc", "-alias", "ca", "-keystore", ca_store, "-file", self.tls_ca_file],
            [*new_key, "-alias", "broker", "-dname", "CN=127.0.0.1", "-keystore", keystore],
            ["-certreq", "-alias", "broker", "-keystore", keystore, "-file", request],
            [
                "-gencert",
                "-rfc",
                "-alias",
                "ca",
                "-keystore",
                ca_store,
                "-infile",
                request,
                "-outfile",
                signed,
                "-ext",
                "SAN=ip:127.0.0.1,dns:localhost",
                "-validity",
                "3650",
            ],
            ["-importcert", "-noprompt", "-alias", "ca", "-file", self.tls_ca_file, "-keystore", keystore],
            ["-importcert", "-alias", "broker", "-file", signed, "-keystore", keystore],
            ["-importcert", "-noprompt", "-alias", "ca", "-file", self.tls_ca_file, "-keystore", truststore],
        ]
        for step in steps:
            result = subprocess.run(
                ["keytool", *map(str, step), *store], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise StackError(
                    f"making the local broker's certificate failed (keytool {step[0]}, from the JDK):"
                    f"\n{result.stdout}{result.stderr}"
                )
        # The CA's key has signed the one certificate it is for: gone, it can sign no other.
        for path in (ca_store, request, signed):
            path.unlink()
        return keystore, truststore

    def _refuse_busy_port(self, port: int, setting: str) -> None:
        if port_open(port):
            raise StackError(
                f"port {port} is already in use by a process this stack did not start:"
                f" stop it, or choose another port with {setting}"
            )

    def _wait(self, what: str, process: ManagedProcess, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not process.running():
                raise StackError(
                    f"{what} exited during start-up; last lines of {process.log_file}:\n{process.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception:  # not up yet: connection refused, timeouts, ...
                pass
            time.sleep(0.3)
        raise StackError(
            f"{what} did not answer within {timeout_s:.0f}s; see {process.log_file}:\n{process.log_tail()}"
        )

    # -- workers -------------------------------------------------------------------------
    def worker(self, kind: str, index: int) -> ManagedProcess:
        return ManagedProcess(f"{kind}-{index}", self.settings.run_dir)

    def start_workers(self, kind: str, count: int) -> list[int]:
        """Start workers ``kind``-1 to ``kind``-``count`` that do not run yet; their pids."""
        pids = []
        for index in range(1, count + 1):
            process = self.worker(kind, index)
            if process.running():
                continue
            argv = [sys.executable, "-m", "stockflow", "worker", kind]
            pids.append(process.start(argv, env=settings_env(self.settings)))
        if pids:
            self.say(f"Started {len(pids)} {kind} worker(s): pids {', '.join(map(str, pids))}")
        extra = [process.name for index, process in self.running_workers(kind).items() if index > count]
        if count and extra:
            self.say(
                f"{', '.join(extra)} also running, more than the {count} asked for:"
                f" `stockflow stack scale --{kind}s {count}` stops the others"
            )
        return pids

    def running_workers(self, kind: str) -> dict[int, ManagedProcess]:
        """The running workers of ``kind``, by their number."""
        running = {}
        for process in self.worker_processes():
            name, _, index = process.name.rpartition("-")
            if name == kind and index.isdigit() and process.running():
                running[int(index)] = process
        return running

    def scale_workers(self, kind: str, count: int) -> None:
        """Run exactly workers ``kind``-1 to ``kind``-``count``: stop the others, highest first,
        then start the missing ones.

        A worker stopped by SIGTERM finishes its batch, commits, and leaves its group, so the
        group gives its partitions to the others at once rather than after its session timeout
        (on a debug stack under 2,000 orders/s: a processor stopped in 1.1 s and the other held
        every partition then; a SIGKILLed one's partitions wait out the session).
        """
        for index, process in sorted(self.running_workers(kind).items(), reverse=True):
            if index > count and process.stop():
                self.say(f"Stopped {process.name}")
        self.start_workers(kind, count)
        if count > self.settings.partitions:
            self.say(
                f"{count} {kind} workers for {self.settings.partitions} partitions:"
                f" {count - self.settings.partitions} of them hold none (STOCKFLOW_PARTITIONS caps a kind)"
            )

    def start_api(self) -> int | None:
        """``stockflow api`` in the background, unless it runs already; its pid."""
        process = ManagedProcess("api", self.settings.run_dir)
        if process.running():
            return None
        pid = process.start([sys.executable, "-m", "stockflow", "api"], env=settings_env(self.settings))
        self.say(
            f"Started the HTTP API on http://{self.settings.api_host}:{self.settings.api_port}: pid {pid}"
            f" (log: {process.log_file})"
        )
        return pid

    def worker_processes(self) -> list[ManagedProcess]:
        pid_dir = self.settings.run_dir / "pids"
        names = sorted(p.stem for p in pid_dir.glob("*.pid")) if pid_dir.exists() else []
        return [ManagedProcess(n, self.settings.run_dir) for n in names if n not in ("kafka", "redis")]

    # -- stop and look -------------------------------------------------------------------
    def down(self) -> None:
        for process in [*self.worker_processes(), self.kafka, self.redis]:
            if process.stop():
                self.say(f"Stopped {process.name}")

    def status(self) -> list[ProcessStatus]:
        rows = []
        for process, detail in (
            (self.kafka, f"127.0.0.1:{self.settings.kafka_port}"),
            (self.redis, f"127.0.0.1:{self.settings.redis_port}"),
        ):
            pid = process.pid()
            rows.append(ProcessStatus(process.name, pid, pid is not None, detail))
        for process in self.worker_processes():
            pid = process.pid()
            rows.append(ProcessStatus(process.name, pid, pid is not None, str(process.log_file)))
        return rows


# librdkafka's lines from the producer-id probe: retries that are expected while the broker
# loads its ids, kept from the terminal.
_PROBE_LOG = logging.getLogger("stockflow.stack.producer_id")
_PROBE_LOG.addHandler(logging.NullHandler())
_PROBE_LOG.propagate = False


def _producer_id_probe(settings: Settings) -> Callable[[], bool]:
    """A check that is true once an idempotent producer got its producer id from the broker.

    A fresh broker takes its first block of producer ids from its controller when the first
    producer asks, and answers that one "coordinator load in progress"; librdkafka then prints
    "Failed to acquire idempotence PID ... retrying" to stderr, over a user's first `publish`
    or the demo's first order, and holds its messages meanwhile. This producer takes that wait
    during `stack up` instead: its log lines go to a logger that drops them, and librdkafka's
    statistics say when it holds an id. It sends nothing, and is closed once it holds one.
    """
    held: dict[str, bool] = {}

    def on_statistics(raw: str) -> None:
        held["id"] = json.loads(raw).get("eos", {}).get("idemp_state") == "Assigned"

    producer = Producer(
        settings.kafka_config()
        | {
            "enable.idempotence": True,
            "statistics.interval.ms": 100,
            "stats_cb": on_statistics,
            "logger": _PROBE_LOG,
        }
    )

    def holds_id() -> bool:
        producer.poll(0.1)
        if held.get("id"):
            producer.close()
            return True
        return False

    return holds_id


def _store_scram_credentials(plain: Settings, mechanism: str) -> None:
    """Store the settings' user and password as a ``mechanism`` (SCRAM-SHA-256 or -512) login in
    the local broker's metadata, logged in with PLAIN: on every start, so a changed password
    takes, and a stack first started with another protocol takes SCRAM logins too."""
    scram = ScramMechanism.SCRAM_SHA_256 if mechanism == "SCRAM-SHA-256" else ScramMechanism.SCRAM_SHA_512
    upsert = UserScramCredentialUpsertion(
        plain.kafka_sasl_username, ScramCredentialInfo(scram, 4096), plain.kafka_sasl_password.encode()
    )
    admin = admin_client(plain)  # held until the answer: a client freed meanwhile drops its requests
    for future in admin.alter_user_scram_credentials([upsert]).values():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            raise StackError(
                f"could not store the {mechanism} login of the local broker's user: {exc}"
            ) from exc
