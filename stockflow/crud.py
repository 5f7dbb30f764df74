"""The CRUD baseline stockflow must beat: the same order workload as PostgreSQL transactions.

One order is one transaction: SELECT the SKU's row FOR UPDATE, UPDATE its stock if it covers the
order, INSERT the order, COMMIT. It runs twice: with pgbench (C, the database's best case) and
as a Python service doing the same with psycopg, as an inventory service would. PostgreSQL is
Debian's, started on a private socket under the bench folder and stopped by its pid.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from stockflow.errors import StackError

SCHEMA = """
CREATE TABLE stock (sku int PRIMARY KEY, available bigint NOT NULL, version bigint NOT NULL);
CREATE TABLE orders (
  order_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  sku int NOT NULL,
  qty int NOT NULL,
  status text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
"""

# pgbench script; :hot_skus = 0 means uniform.
PGBENCH_ORDER = """\
\\set r random(1, 100)
\\if :hot_skus > 0 AND :r <= :hot_pct
\\set sku random(1, :hot_skus)
\\else
\\set sku random(1, :skus)
\\endif
\\set qty random(1, 3)
BEGIN;
SELECT available FROM stock WHERE sku = :sku FOR UPDATE;
UPDATE stock SET available = available - :qty, version = version + 1
  WHERE sku = :sku AND available >= :qty;
INSERT INTO orders (sku, qty, status) VALUES (:sku, :qty, 'processed');
COMMIT;
"""

# Stated in the report: what a committed order survives on this side.
DURABILITY = "fsync=on, synchronous_commit=on (PostgreSQL defaults): a COMMIT is on disk"


@dataclass(frozen=True)
class Workload:
    skus: int
    hot_skus: int  # 0 = uniform
    hot_share: float

    def pick_sku(self, rng: random.Random) -> int:
        if self.hot_skus and rng.random() < self.hot_share:
            return rng.randint(1, self.hot_skus)
        return rng.randint(1, self.skus)


class Postgres:
    """A throwaway PostgreSQL cluster: initdb, start, and stop by the postmaster's pid."""

    def __init__(self, port: int) -> None:
        # A folder of its own under the system temp dir: the `postgres` user may not be able
        # to reach a folder under the caller's (a pytest tmp_path is private to root, say).
        self.root = Path(tempfile.mkdtemp(prefix="stockflow-postgres-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.port = port
        self.bin = _postgres_bin()
        # PostgreSQL refuses to run as root; as root, run its tools as the `postgres` user.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
        self.pid: int | None = None

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise StackError(f"{tool} failed (exit {result.returncode}): {result.stderr.strip()[-800:]}")
        return result

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True)
        if self.as_user:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--no-sync", "-A", "trust")
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses='' -c max_connections=40"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "pg.log"), "-w", "start"
        )
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop the server (by its pid) and delete its data."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(self.pid, signal.SIGINT)  # PostgreSQL's "fast shutdown"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
                time.sleep(0.1)
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def conninfo(self) -> str:
        return f"host={self.socket_dir} port={self.port} user={self.user} dbname=postgres"

    def load(self, skus: int, stock_per_sku: int) -> None:
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS stock, orders")
            conn.execute(SCHEMA)
            conn.execute(
                "INSERT INTO stock SELECT g, %s, 0 FROM generate_series(1, %s) g", (stock_per_sku, skus)
            )
            conn.execute("VACUUM ANALYZE stock")

    def pgbench(self, workload: Workload, clients: int, duration_s: int) -> float:
        """Orders per second from pgbench's own report (connection time excluded)."""
        script = self.root / "order.sql"
        script.write_text(PGBENCH_ORDER)
        if self.as_user:
            shutil.chown(script, "postgres")
        result = self._run(
            "pgbench",
            "-n",
            f"--client={clients}",
            f"--jobs={min(clients, os.cpu_count() or 1)}",
            f"--time={duration_s}",
            f"--file={script}",
            f"--define=skus={workload.skus}",
            f"--define=hot_skus={workload.hot_skus}",
            f"--define=hot_pct={round(workload.hot_share * 100)}",
            f"--host={self.socket_dir}",
            f"--port={self.port}",
            f"--username={self.user}",
            "postgres",
        )
        match = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
        if match is None:
            raise StackError(f"pgbench printed no tps:\n{result.stdout[-800:]}")
        return float(match.group(1))

    def python_service(self, workload: Workload, clients: int, duration_s: float) -> float:
        """Orders per second from ``clients`` Python processes running the transaction."""
        context = multiprocessing.get_context("spawn")
        with context.Pool(clients) as pool:
            args = [(self.conninfo(), workload, duration_s, seed) for seed in range(clients)]
            counts = pool.starmap(_python_orders, args)
        return sum(counts) / duration_s


def _python_orders(conninfo: str, workload: Workload, duration_s: float, seed: int) -> int:
    """The transaction an inventory service runs for each order, in a loop; returns the count."""
    import psycopg

    rng = random.Random(seed)
    done = 0
    with psycopg.connect(conninfo) as conn:
        stop_at = time.monotonic() + duration_s
        while time.monotonic() < stop_at:
            sku, qty = workload.pick_sku(rng), rng.randint(1, 3)
            with conn.transaction():
                row = conn.execute("SELECT available FROM stock WHERE sku = %s FOR UPDATE", (sku,)).fetchone()
                status = "rejected"
                if row is not None and row[0] >= qty:
                    conn.execute(
                        "UPDATE stock SET available = available - %s, version = version + 1 WHERE sku = %s",
                        (qty, sku),
                    )
                    status = "processed"
                conn.execute("INSERT INTO orders (sku, qty, status) VALUES (%s, %s, %s)", (sku, qty, status))
            done += 1
    return done


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not versions:
        raise StackError(
            "PostgreSQL is not installed; the CRUD baseline needs Debian's server and pgbench:"
            " apt-get install postgresql postgresql-contrib (or run `make bench`, which does)"
        )
    return versions[-1].parent
