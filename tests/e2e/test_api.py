"""The HTTP API as a client uses it: `stockflow api` against the session's real stack."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from stockflow.settings import Settings
from stockflow.stack import LocalStack, ManagedProcess, settings_env
from tests.conftest import free_port
from tests.pipeline import read_topic, wait_for

pytestmark = pytest.mark.e2e


@contextmanager
def api_server(settings: Settings, log: Path, **env: str) -> Iterator[str]:
    """`stockflow api` in a process of its own; yields its base URL, and stops it by pid."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "stockflow", "api"],
            env=settings_env(settings) | {"STOCKFLOW_API_PORT": str(port), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"the API to answer (log: {log})", lambda: call(url, "GET", "/health")[0] != 0 or None, 30)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def call(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """(status, JSON body, headers); a refused connection is status 0."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=40) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers
    except urllib.error.URLError:  # not listening yet
        return 0, None, {}


def read_order(api: str, order_id: str, wait_ms: int) -> dict[str, Any] | None:
    """The order's lines, once a decision about it is visible; None after ``wait_ms``."""
    status, order, _ = call(api, "GET", f"/orders/{order_id}?wait_ms={wait_ms}")
    return order["lines"] if status == 200 else None


def read_decision(api: str, order_id: str, command_id: str) -> dict[str, Any]:
    """The order once the decision about ``command_id`` is visible on it."""
    status, order, _ = call(api, "GET", f"/orders/{order_id}?command_id={command_id}&wait_ms=30000")
    assert status == 200 and order["decision"] is not None, (status, order)
    assert order["decision"]["command_id"] == command_id
    return dict(order)


@pytest.fixture(scope="module")
def api(settings: Settings, stack: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with api_server(settings, tmp_path_factory.mktemp("api") / "api.log") as url:
        yield url


def test_an_order_placed_over_http_is_decided_and_read_back(api: str, unique: Callable[[str], str]) -> None:
    sku, order_id = unique("SKU"), unique("order")
    restock = {"qty": 5, "command_id": unique("restock")}
    status, receipt, _ = call(api, "POST", f"/skus/{sku}/restock", restock)
    assert status == 202, receipt
    assert receipt["type"] == "Restock" and receipt["offset"] >= 0
    # Sent again (a client retrying after a timeout): the same command id is decided once.
    assert call(api, "POST", f"/skus/{sku}/restock", restock)[1]["command_id"] == restock["command_id"]

    status, receipt, _ = call(api, "POST", "/orders", {"sku": sku, "qty": 3, "order_id": order_id})
    assert (status, receipt["order_id"], receipt["type"]) == (202, order_id, "PlaceOrder")
    # The decision comes after the 202. The processor may still be starting (this can be the
    # session's first test), so the first read is retried beyond the API's own wait.
    lines = wait_for("the first decision", lambda: read_order(api, order_id, wait_ms=5000), 120)
    assert lines[sku]["status"] == "processed"
    assert lines[sku]["qty"] == 3

    status, too_big, _ = call(api, "POST", "/orders", {"sku": sku, "qty": 4})
    assert status == 202
    # wait_ms holds the read until the decision is visible.
    refused = read_order(api, too_big["order_id"], wait_ms=30000)
    assert refused is not None
    assert refused[sku]["status"] == "rejected"
    assert "insufficient stock: 4 requested, 2 available" in refused[sku]["reason"]
    # ?wait_ms on the POST answers with the decision itself, 200 once it is visible.
    status, answered, _ = call(api, "POST", "/orders?wait_ms=30000", {"sku": sku, "qty": 5})
    assert (status, answered["type"], answered["decision"]["status"]) == (200, "PlaceOrder", "rejected")
    assert answered["decision"]["reason"] == "insufficient stock: 5 requested, 2 available"
    assert (answered["decision"]["command_id"], answered["decision"]["sku"]) == (answered["command_id"], sku)

    # ?command_id waits for that command's decision: here a cancel, on an order decided already.
    status, cancel, _ = call(api, "POST", f"/orders/{order_id}/cancel", {"sku": sku})
    assert status == 202
    order = read_decision(api, order_id, cancel["command_id"])
    assert (order["decision"]["status"], order["lines"][sku]["status"]) == ("cancelled", "cancelled")
    row = call(api, "GET", f"/skus/{sku}")[1]
    assert (row["available"], row["units_sold"], row["rejected"], row["replenished"]) == (5, 0, 2, 1)

    # Cancels of a cancelled order are refused; each client finds its own refusal, the newest
    # shows on the line, and the line stays cancelled.
    for _ in range(2):
        status, again, _ = call(api, "POST", f"/orders/{order_id}/cancel", {"sku": sku})
        assert status == 202
        order = read_decision(api, order_id, again["command_id"])
        assert order["decision"]["status"] == "rejected"
        assert order["decision"]["reason"] == f"order {order_id} is already cancelled"
        line = order["lines"][sku]
        assert (line["status"], line["refused"]["command_id"]) == ("cancelled", again["command_id"])
    # A command with no decision on this order: the order, and no decision, once the wait is over.
    status, order, _ = call(api, "GET", f"/orders/{order_id}?command_id={unique('c')}&wait_ms=100")
    assert (status, order["decision"], order["lines"][sku]["status"]) == (200, None, "cancelled")
    status, answer, _ = call(api, "GET", f"/orders/{order_id}?command_id=")
    assert (status, answer["error"]) == (
        400,
        "?command_id is empty: give the command_id a POST answered with",
    )
    assert call(api, "GET", f"/skus/{unique('never-seen')}")[0] == 404
    assert call(api, "GET", f"/orders/{unique('never-seen')}?wait_ms=200")[0] == 404


def test_a_restock_waited_for_is_answered_with_its_decision(api: str, unique: Callable[[str], str]) -> None:
    sku = unique("SKU")
    status, first, _ = call(api, "POST", f"/skus/{sku}/restock?wait_ms=30000", {"qty": 5})
    assert (status, first["decision"]["status"], first["decision"]["version"]) == (200, "replenished", 1)
    # A stale expected_version is refused, and the client that sent it reads why.
    stale_body = {"qty": 5, "expected_version": 0}
    status, stale, _ = call(api, "POST", f"/skus/{sku}/restock?wait_ms=30000", stale_body)
    assert (status, stale["decision"]["status"]) == (200, "rejected")
    assert stale["decision"]["reason"] == "version conflict: expected 0, SKU is at 1"
    row = call(api, "GET", f"/skus/{sku}")[1]
    assert (row["available"], row["replenished"], row["restock_rejected"]) == (5, 1, 1)
    assert [d["command_id"] for d in row["recent_restocks"]] == [stale["command_id"], first["command_id"]]


def test_requests_waiting_together_each_get_the_decision_about_their_own_command(
    api: str, unique: Callable[[str], str]
) -> None:
    # The API reads every order waited on in one round trip: each answer must still be its own.
    sku = unique("SKU")
    assert call(api, "POST", f"/skus/{sku}/restock", {"qty": 100})[0] == 202
    # Each order id placed twice at once: one placing processed, the other refused, one hash.
    order_ids = [unique(f"order-{n}") for n in range(8)]
    bodies: list[dict[str, Any]] = [
        {"sku": sku, "qty": 1, "order_id": order_id} for order_id in order_ids
    ] * 2
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: call(api, "POST", "/orders?wait_ms=30000", body), bodies))
    statuses: dict[str, list[str]] = {}
    for (status, answer, _), body in zip(answers, bodies, strict=True):
        assert status == 200, answer
        decision = answer["decision"]
        assert (decision["command_id"], answer["order_id"]) == (answer["command_id"], body["order_id"])
        statuses.setdefault(body["order_id"], []).append(decision["status"])
    assert all(sorted(both) == ["processed", "rejected"] for both in statuses.values()), statuses


def test_many_orders_in_one_request_are_each_decided(api: str, unique: Callable[[str], str]) -> None:
    sku = unique("SKU")
    assert call(api, "POST", f"/skus/{sku}/restock", {"qty": 4})[0] == 202
    orders: list[dict[str, Any]] = [
        {"sku": sku, "qty": qty, "order_id": unique(f"order-{i}")} for i, qty in enumerate([1, 2, 5, 1])
    ]
    status, answer, _ = call(api, "POST", "/orders", orders)
    assert status == 202, answer
    receipts = answer["commands"]
    assert [r["order_id"] for r in receipts] == [o["order_id"] for o in orders]  # in the order sent
    assert len({r["command_id"] for r in receipts}) == 4
    assert len({(r["partition"], r["offset"]) for r in receipts}) == 1  # one batch frame, one Kafka message
    statuses = []
    for order in orders:
        lines = read_order(api, order["order_id"], wait_ms=30000)
        assert lines is not None, order
        statuses.append(lines[sku]["status"])
    assert statuses == ["processed", "processed", "rejected", "processed"]  # 4 units: 1 + 2, not 5, then 1


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/orders", b"{not json", "the body is not JSON"),
        ("/orders", b'{"sku": "\xff", "qty": 1}', "the body is not UTF-8 text"),
        ("/orders", b"[" * 100_000, "the body nests arrays or objects too deeply"),
        ("/orders", b'{"sku": "SKU-1", "qty": 1' + b"0" * 5000 + b"}", "a number of 5001 digits"),
        ("/orders", {"sku": "SKU-1", "qty": 10**40}, "qty is 1" + "0" * 40),
        ("/orders", b'{"sku": "SKU-\\ud800", "qty": 1}', "sku holds U+D800 at character 4"),
        ("/orders", b"[1, 2]", "must be a JSON object"),
        ("/orders", {"qty": 2}, "field 'sku' is missing"),
        ("/orders", {"sku": "SKU-1", "qty": "2"}, "field 'qty' must be a whole number"),
        ("/orders", {"sku": "SKU-1", "qty": True}, "field 'qty' must be a whole number"),
        ("/orders", {"sku": "SKU-1", "qty": 0}, "qty is 0"),
        ("/orders", {"sku": " ", "qty": 1}, "sku is empty"),
        ("/orders", {"sku": "SKU-1", "qty": 1, "colour": "red"}, "unknown field(s) ['colour']"),
        ("/skus/SKU-1/restock", {"qty": -4}, "qty is -4"),
        ("/orders/o-1/cancel", {}, "field 'sku' is missing"),
        ("/orders", [], "send 1 to 5,000 orders in one request, not 0"),
        ("/orders", [{"sku": "SKU-1", "qty": 1}, {"sku": "SKU-1", "qty": 0}], "order 1: invalid PlaceOrder"),
        ("/orders", [{"sku": "SKU-1", "qty": 1}, "SKU-2"], "order 1 must be a JSON object, not str"),
        ("/orders?wait_ms=100", [{"sku": "SKU-1", "qty": 1}], "?wait_ms waits for one order's decision"),
        ("/orders?wait_ms=-1", {"sku": "SKU-1", "qty": 1}, "?wait_ms=-1 is out of range: 0 to 30000"),
    ],
)
def test_a_bad_request_gets_400_saying_what_is_wrong_and_sends_nothing(
    api: str, settings: Settings, path: str, body: Any, message: str
) -> None:
    before = len(read_topic(settings, settings.commands_topic))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer, _ = call(api, "POST", path, raw=raw)
    assert status == 400
    assert message in answer["error"]
    assert len(read_topic(settings, settings.commands_topic)) == before


def test_health_is_ok_while_kafka_and_redis_answer_and_names_the_one_that_does_not(
    api: str, settings: Settings, tmp_path: Path
) -> None:
    assert call(api, "GET", "/health")[:2] == (200, {"status": "ok"})
    nowhere = {"STOCKFLOW_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}  # nothing listens there
    with api_server(settings, tmp_path / "api.log", **nowhere) as url:
        status, answer, _ = call(url, "GET", "/health")
    assert status == 503
    assert answer["status"] == "unavailable" and "redis" not in answer
    assert "did not answer about" in answer["kafka"] and "STOCKFLOW_BOOTSTRAP_SERVERS" in answer["kafka"]


def test_an_unknown_route_is_answered_in_json_with_the_routes(api: str) -> None:
    status, answer, _ = call(api, "DELETE", "/orders")
    assert status == 405
    assert "POST /orders" in answer["error"]
    assert call(api, "GET", "/nothing-here")[0] == 404
    assert call(api, "GET", "/top?n=0")[0] == 400


def test_publishing_while_the_workers_lag_gets_429_with_retry_after_and_sends_nothing(
    api: str, settings: Settings, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    assert call(api, "POST", f"/skus/{unique('SKU')}/restock", {"qty": 1})[0] == 202
    before = len(read_topic(settings, settings.commands_topic))
    # A projection group that has read nothing is behind by the whole event log, and the
    # processor group by every command it has not committed: with a high-water mark of 1
    # the pipeline counts as overloaded.
    lagging = {
        "STOCKFLOW_PROJECTION_GROUP": unique("never-ran"),
        "STOCKFLOW_PROCESSOR_GROUP": unique("never-ran"),
        "STOCKFLOW_BACKPRESSURE_HIGH_WATER": "1",
        "STOCKFLOW_BACKPRESSURE_LOW_WATER": "0",
    }
    with api_server(settings, tmp_path / "api.log", **lagging) as url:
        status, answer, headers = call(url, "POST", "/orders", {"sku": unique("SKU"), "qty": 1})
    assert status == 429, answer
    assert int(headers["Retry-After"]) >= 1
    assert "overloaded" in answer["error"] and "STOCKFLOW_BACKPRESSURE_HIGH_WATER" in answer["error"]
    assert len(read_topic(settings, settings.commands_topic)) == before


def test_with_a_token_set_every_request_but_health_must_carry_it(
    settings: Settings, stack: object, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    order, token, old = {"sku": unique("SKU"), "qty": 1}, unique("token"), unique("old")
    # Two tokens, as while clients move from the old one to the new: either gets through.
    with api_server(settings, tmp_path / "api.log", STOCKFLOW_API_TOKEN=f"{token},{old}") as url:
        before = len(read_topic(settings, settings.commands_topic))
        status, answer, headers = call(url, "POST", "/orders", order)
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="stockflow"')
        assert answer["error"].startswith("no Authorization header: send `Authorization: Bearer <token>`")
        wrong = {"Authorization": "Bearer guess"}
        assert call(url, "POST", "/orders", order, headers=wrong)[0] == 401
        assert "wrong token" in call(url, "GET", f"/skus/{order['sku']}", headers=wrong)[1]["error"]
        assert len(read_topic(settings, settings.commands_topic)) == before  # nothing sent

        assert call(url, "GET", "/health")[0] == 200  # probes hold no token
        for accepted in (token, old):
            right = {"Authorization": f"Bearer {accepted}"}
            assert call(url, "POST", "/orders", order, headers=right)[0] == 202
        assert len(read_topic(settings, settings.commands_topic)) == before + 2
        both = {"Authorization": f"Bearer {token},{old}"}  # the setting's text is no token
        assert call(url, "GET", f"/skus/{order['sku']}", headers=both)[0] == 401


@pytest.mark.usefixtures("stack")
def test_stack_up_api_serves_it_in_the_background_until_stack_down(settings: Settings) -> None:
    local = LocalStack(settings.model_copy(update={"api_port": free_port()}), say=lambda _msg: None)
    url = f"http://127.0.0.1:{local.settings.api_port}"
    try:
        pid = local.start_api()
        assert pid is not None
        assert local.start_api() is None  # one is running already
        wait_for("the background API to answer", lambda: call(url, "GET", "/health")[0] == 200 or None, 30)
        assert "api" in [row.name for row in local.status() if row.running]
    finally:
        ManagedProcess("api", settings.run_dir).stop()  # what `stack down` does for it
    assert call(url, "GET", "/health")[0] == 0
