"""The HTTP API: publish commands and read the read models (aiohttp, already a Faust dependency).

  POST /orders                     {"sku", "qty", "order_id"?, ...}, or an array of up to 5,000
                                   of them, answered with {"commands": [...]} in the same order
  POST /orders/{order_id}/cancel   {"sku", ...}
  POST /skus/{sku}/restock         {"qty", ...}
      ... = optional "expected_version", "correlation_id", and "command_id": a retry that sends
      the same command_id is decided once
      202  the command is in the commands log (acks=all): {"command_id", "partition", "offset", ...}
      200  with ?wait_ms=N (one command, not an array): the same, and its decision under
           "decision", once visible within N ms (else 202, "decision": null)
      400  not JSON, a field missing, unknown or of the wrong type, or a rule of the contract
           broken (qty <= 0, an empty SKU); the reason is in {"error"}, and nothing was sent
      429  the workers are too far behind (backpressure); Retry-After says when to try again
      503  Kafka did not acknowledge the command
      401  STOCKFLOW_API_TOKEN is set and the request lacks `Authorization: Bearer <it>`
           (every route but GET /health)
  GET /skus/{sku}                  stock of a SKU (its recent restock decisions too), 404 until
                                   an event about it is projected
  GET /orders/{order_id}           status of each line, 404 until one is projected; with
                                   ?wait_ms=N waits up to N ms for it (read your own order);
                                   a line's later refused command (a cancel) under "refused";
                                   with ?command_id=C also C's decision under "decision" (null
                                   until visible), which ?wait_ms then waits for
  GET /top?n=10                    top sellers by units sold
  GET /health                      200 when Redis and Kafka answer, else 503 saying which

A command is accepted once Kafka holds it and decided by the processor shortly after: a 202 is
not a decision. The decision shows in the read models, which is what ``wait_ms`` waits for:
``command_id`` names the command (a cancel, an order id placed again) whose decision to wait for.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import redis
from aiohttp import web
from aiohttp.typedefs import Middleware

from producers.commands import cancel_order, place_order, restock
from producers.publisher import PartitionCountMismatch, Publisher, PublishError, Receipt
from projections.queries import POLL_S, ReadModels, order_not_found
from projections.views import command_decision, find_command, line_status
from schemas.records import CancelOrder, Command, PlaceOrder, Restock, validate_command
from stockflow.errors import InvalidCommand, StockflowError
from stockflow.lag import Overloaded
from stockflow.settings import Settings

# The longest ?wait_ms=N may hold a request for a decision.
MAX_WAIT_MS = 30_000
# How long a POST waits for Kafka's acknowledgement before answering 503.
ACK_TIMEOUT_S = 30.0
# The most orders one POST /orders may carry (about 100 bytes of JSON each).
MAX_ORDERS_PER_REQUEST = 5000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_TYPES = {int: "a whole number", str: "a string"}
# Longer numbers are refused as they are parsed; shorter ones too large for a field are refused
# by the contract, naming the field.
MAX_INT_DIGITS = 100
# The fields every command's body may add to its own.
OPTIONAL_FIELDS: dict[str, type] = {"expected_version": int, "correlation_id": str, "command_id": str}


class BadRequest(StockflowError):
    """A request body or parameter the API cannot use; the message says which and why."""


class Unacknowledged(PublishError):
    """Kafka did not acknowledge every command of a request: some may still be written, so the
    client gets their ids to send them again."""

    def __init__(self, message: str, command_ids: list[str]) -> None:
        super().__init__(message)
        self.command_ids = command_ids


class CommandGateway:
    """Publishes commands for the event loop without blocking it.

    ``Publisher.send_many`` may read the consumer lag from the broker (backpressure), so it runs in a
    thread of its own; a second thread serves the producer's delivery reports, which settle
    each request's future.
    """

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="deliveries", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self._publisher.poll(0.1)

    async def publish(self, commands: Sequence[Command]) -> list[Receipt]:
        """Send ``commands`` (as batch frames when there are many); their receipts, in order."""
        loop = asyncio.get_running_loop()
        outcomes: list[asyncio.Future[Receipt]] = [loop.create_future() for _ in commands]
        by_command = {id(command): outcome for command, outcome in zip(commands, outcomes, strict=True)}

        def settle(outcome: asyncio.Future[Receipt], receipt: Receipt | None, error: Exception) -> None:
            if outcome.done():
                return
            if receipt is not None:
                outcome.set_result(receipt)
            else:
                outcome.set_exception(error)

        def delivered(command: Command, receipt: Receipt | None, error: PublishError | None) -> None:
            failure = error or PublishError(f"{command.command_id}: not acknowledged")
            loop.call_soon_threadsafe(settle, by_command[id(command)], receipt, failure)

        # wait_s=0: an HTTP caller gets 429 at once rather than a request held open.
        await loop.run_in_executor(self._sender, lambda: self._publisher.send_many(commands, delivered, 0))
        # Failures are collected too, so that none is left unretrieved.
        collected = asyncio.gather(*outcomes, return_exceptions=True)
        try:
            results: list[Receipt | BaseException] = await asyncio.wait_for(collected, ACK_TIMEOUT_S)
        except TimeoutError:
            results = [TimeoutError(f"no answer within {ACK_TIMEOUT_S:.0f}s")]
        receipts = [result for result in results if isinstance(result, Receipt)]
        if len(receipts) == len(commands):
            return receipts
        failure = next(result for result in results if not isinstance(result, Receipt))
        raise Unacknowledged(
            f"Kafka did not acknowledge every command ({failure}); they may still be written, so to"
            ' retry send the request again with each command\'s "command_id" from "command_ids":'
            " a command id is decided once however often it is sent; is the broker up"
            " (STOCKFLOW_BOOTSTRAP_SERVERS)?",
            [command.command_id for command in commands],
        )

    def check_broker(self) -> None:
        self._publisher.check_broker()

    def close(self) -> None:
        self._sender.shutdown(wait=True)
        self._stopping.set()
        self._poller.join()
        self._publisher.close()


def _body(
    fields: Any, required: dict[str, type], optional: dict[str, type], where: str = "the body"
) -> dict[str, Any]:
    """The fields of a JSON object, checked against the names and types a command takes."""
    if not isinstance(fields, dict):
        raise BadRequest(f"{where} must be a JSON object, not {type(fields).__name__}")
    takes = [*required, *optional]
    unknown = set(fields) - set(takes)
    if unknown:
        raise BadRequest(f"{where}: unknown field(s) {sorted(unknown)}: it takes {takes}")
    for name in required:
        if name not in fields:
            raise BadRequest(f"{where}: field {name!r} is missing: it takes {takes}")
    for name, value in fields.items():
        wanted = required.get(name) or optional[name]
        if value is None and name in optional:
            continue
        # bool is an int to Python, not to a caller sending JSON.
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise BadRequest(f"{where}: field {name!r} must be {JSON_TYPES[wanted]}, not {json.dumps(value)}")
    return fields


async def _json(request: web.Request) -> Any:
    # The bytes, not request.json(): JSON is UTF-8 (RFC 8259), and aiohttp decodes by the
    # Content-Type's charset, raising a UnicodeDecodeError (a 500) on bytes that are not text.
    body = await request.read()
    try:
        return json.loads(body, parse_int=_json_int)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 text ({exc}): send a JSON object in UTF-8") from exc
    except RecursionError as exc:
        raise BadRequest("the body nests arrays or objects too deeply: send a JSON object of fields") from exc
    except ValueError as exc:  # json.JSONDecodeError, or _json_int's
        raise BadRequest(f"the body is not JSON ({exc}): send a JSON object") from exc


def _json_int(digits: str) -> int:
    # Python converts at most 4,300 digits (a ValueError that advises changing the interpreter).
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(digits)} digits, where no field takes more than 19")
    return int(digits)


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"?{name}={raw} is not a whole number") from None
    if not low <= value <= high:
        raise BadRequest(f"?{name}={value} is out of range: {low} to {high}")
    return value


def _orders(items: list[Any], many: bool) -> list[PlaceOrder]:
    """The orders of a POST /orders body, each checked against the contract."""
    if many and not 1 <= len(items) <= MAX_ORDERS_PER_REQUEST:
        raise BadRequest(f"send 1 to {MAX_ORDERS_PER_REQUEST:,} orders in one request, not {len(items):,}")
    orders = []
    for index, item in enumerate(items):
        where = f"order {index}" if many else "the body"
        order = place_order(
            **_body(item, {"sku": str, "qty": int}, {"order_id": str, **OPTIONAL_FIELDS}, where)
        )
        try:
            validate_command(order)
        except InvalidCommand as exc:
            raise BadRequest(f"{where}: {exc}") from None
        orders.append(order)
    return orders


def _receipt_rows(commands: Sequence[Command], receipts: Sequence[Receipt]) -> list[dict[str, Any]]:
    """What a 202 says of each command: where the log holds it."""
    return [
        {
            "command_id": receipt.command_id,
            "type": type(command).__name__,
            "partition": receipt.partition,
            "offset": receipt.offset,
            **({"order_id": command.order_id} if isinstance(command, (PlaceOrder, CancelOrder)) else {}),
        }
        for command, receipt in zip(commands, receipts, strict=True)
    ]


def _decision_wait_ms(request: web.Request, many: bool) -> int:
    """A POST's ?wait_ms: how long to wait for the decision before answering; checked before
    anything is sent."""
    wait_ms = _int_param(request, "wait_ms", 0, 0, MAX_WAIT_MS)
    if wait_ms and many:
        raise BadRequest(
            "?wait_ms waits for one order's decision: for an array, read each with"
            " GET /orders/{order_id}?command_id=<its command_id>&wait_ms=N"
        )
    return wait_ms


def _command_id_param(request: web.Request) -> str | None:
    command_id = request.query.get("command_id")
    if command_id is not None and not command_id.strip():
        raise BadRequest("?command_id is empty: give the command_id a POST answered with")
    return command_id


async def read(query: Callable[..., Any], *args: Any) -> Any:
    """``query(*args)`` in a thread: redis-py and the Kafka clients block."""
    return await asyncio.get_running_loop().run_in_executor(None, query, *args)


V = TypeVar("V")
# What a wait answers with: what it read, and the decision it waited for (None: not there).
Waited = tuple[V, dict[str, Any] | None]


def _on_order(fields: dict[str, str], command_id: str | None) -> tuple[bool, dict[str, Any] | None]:
    """Whether an order's hash ``fields`` hold what a wait wants: ``command_id``'s decision,
    or without one, any decision; and that decision."""
    if command_id is None:
        return bool(fields), None
    decision = command_decision(fields, command_id)
    return decision is not None, decision


def _in_restocks(
    restocks: list[dict[str, Any]], command_id: str | None
) -> tuple[bool, dict[str, Any] | None]:
    """Whether a SKU's recent restock decisions hold ``command_id``'s; and that decision."""
    decision = find_command(restocks, command_id or "")
    return decision is not None, decision


class DecisionWaits(Generic[V]):
    """The requests waiting for a decision (?wait_ms) on one kind of read model, served
    together: every POLL_S one read, in one thread and one round trip, of everything waited on.
    50 clients posting single orders with ?wait_ms on a debug stack cost the API 492-573 us of
    CPU per request this way, 982-1,019 with a loop per request (a thread hop and a read each
    POLL_S), 480-503 without waiting.

    ``read_many(keys)`` reads what each key (an order id, a SKU) holds; ``holds(value,
    command_id)`` says whether it holds the decision waited for, and gives it."""

    def __init__(
        self,
        read_many: Callable[[list[str]], list[V]],
        holds: Callable[[V, str | None], tuple[bool, dict[str, Any] | None]],
    ) -> None:
        self._read_many = read_many
        self._holds = holds
        self._waiting: dict[str, list[tuple[str | None, asyncio.Future[Waited[V]]]]] = {}
        self._polling: asyncio.Task[None] | None = None

    async def wait(
        self, key: str, command_id: str | None, wait_ms: int, look_first: bool = True
    ) -> Waited[V]:
        """What ``key`` holds once it holds ``command_id``'s decision, or as it is when
        ``wait_ms`` is over. ``look_first=False`` leaves out the read before the wait, for a
        command just published: its decision cannot be there yet."""
        if look_first or not wait_ms:
            seen, waited = await self._look(key, command_id)
            if seen or not wait_ms:
                return waited
        future: asyncio.Future[Waited[V]] = asyncio.get_running_loop().create_future()
        waiter = (command_id, future)
        self._waiting.setdefault(key, []).append(waiter)
        if self._polling is None or self._polling.done():
            self._polling = asyncio.create_task(self._poll())
        try:
            return await asyncio.wait_for(future, wait_ms / 1000)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiting[key]
            waiters.remove(waiter)
            if not waiters:
                del self._waiting[key]
        return (await self._look(key, command_id))[1]  # as it is now: a last look

    async def _look(self, key: str, command_id: str | None) -> tuple[bool, Waited[V]]:
        [value] = await read(self._read_many, [key])
        seen, decision = self._holds(value, command_id)
        return seen, (value, decision)

    async def _poll(self) -> None:
        while self._waiting:
            await asyncio.sleep(POLL_S)
            keys = list(self._waiting)
            try:
                values = await read(self._read_many, keys)
            except redis.RedisError as exc:  # each waiting request answers 503
                for waiters in self._waiting.values():
                    for _, future in waiters:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for key, value in zip(keys, values, strict=True):
                for command_id, future in self._waiting.get(key, []):
                    seen, decision = self._holds(value, command_id)
                    if seen and not future.done():
                        future.set_result((value, decision))


async def _unavailable(checks: dict[str, Callable[[], Any]]) -> dict[str, str]:
    """What each failing check said, by name."""
    problems = {}
    for name, check in checks.items():
        try:
            await read(check)
        except (redis.RedisError, PublishError) as exc:
            problems[name] = str(exc)
    return problems


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The API's errors as JSON, with the status that tells a client what to do next."""
    try:
        return await handler(request)
    except (BadRequest, InvalidCommand) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except Overloaded as exc:
        retry_after = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
        return web.json_response(
            {"error": str(exc), "retry_after_ms": exc.retry_after_ms},
            status=429,
            headers={"Retry-After": retry_after},
        )
    except Unacknowledged as exc:
        return web.json_response({"error": str(exc), "command_ids": exc.command_ids}, status=503)
    except PartitionCountMismatch as exc:  # the API's settings, not the request: nothing sent
        return web.json_response({"error": str(exc)}, status=503)
    except redis.RedisError as exc:
        return web.json_response({"error": f"Redis did not answer: {exc} (STOCKFLOW_REDIS_URL)"}, status=503)
    except web.HTTPException as exc:  # aiohttp's own: no such route or method, a body too large
        if exc.status < 400:
            raise
        error = f"{exc.reason}: {request.method} {request.path}"
        if exc.text and exc.text != f"{exc.status}: {exc.reason}":
            error += f" ({exc.text})"  # what aiohttp found, such as the body size limit
        if exc.status in (404, 405):
            routes = sorted(
                f"{route.method} {route.resource.canonical}"
                for route in request.app.router.routes()
                if route.resource is not None and route.method != "HEAD"  # aiohttp adds HEAD to each GET
            )
            error += f"; the API serves {routes}"
        return web.json_response({"error": error}, status=exc.status)


def _token_check(tokens: list[str]) -> Middleware:
    """A middleware that answers 401 to a request without ``Authorization: Bearer <token>``,
    one of ``tokens`` (several while clients move from one to the next).

    GET /health stays open: what probes it (compose, a load balancer) holds no token, and it
    tells only whether Redis and Kafka answer."""
    expected = [f"Bearer {token}".encode() for token in tokens]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/health":
            return await handler(request)
        given = request.headers.get("Authorization", "")
        # In constant time, against every token: how long the check takes must not tell how much
        # of a guess was right, nor which token it came close to.
        matches = [hmac.compare_digest(given.encode(), token) for token in expected]
        if any(matches):
            return await handler(request)
        problem = "no Authorization header" if not given else "the Authorization header holds the wrong token"
        return web.json_response(
            {"error": f"{problem}: send `Authorization: Bearer <token>`, the API's STOCKFLOW_API_TOKEN"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="stockflow"'},
        )

    return check


def create_api(settings: Settings) -> web.Application:
    models = ReadModels(redis.Redis.from_url(settings.redis_url))
    gateway = CommandGateway(Publisher(settings))
    order_waits = DecisionWaits(models.orders_fields, _on_order)
    restock_waits = DecisionWaits(models.skus_restocks, _in_restocks)

    async def accepted(request: web.Request, commands: Sequence[Command], many: bool = False) -> web.Response:
        """202 with the receipts; with ?wait_ms, 200 with the decision once it is visible."""
        wait_ms = _decision_wait_ms(request, many)
        rows = _receipt_rows(commands, await gateway.publish(commands))
        if not wait_ms:
            return web.json_response({"commands": rows} if many else rows[0], status=202)
        if isinstance(commands[0], Restock):
            _, decision = await restock_waits.wait(commands[0].sku, rows[0]["command_id"], wait_ms, False)
        else:
            _, decision = await order_waits.wait(rows[0]["order_id"], rows[0]["command_id"], wait_ms, False)
        return web.json_response({**rows[0], "decision": decision}, status=202 if decision is None else 200)

    async def post_order(request: web.Request) -> web.Response:
        """One order (a JSON object), or many (an array of them) sent as batch frames."""
        payload = await _json(request)
        many = isinstance(payload, list)
        return await accepted(request, _orders(payload if many else [payload], many), many)

    async def post_cancel(request: web.Request) -> web.Response:
        body = _body(await _json(request), {"sku": str}, OPTIONAL_FIELDS)
        return await accepted(request, [cancel_order(order_id=request.match_info["order_id"], **body)])

    async def post_restock(request: web.Request) -> web.Response:
        body = _body(await _json(request), {"qty": int}, OPTIONAL_FIELDS)
        return await accepted(request, [restock(request.match_info["sku"], **body)])

    async def get_stock(request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        row = await read(models.stock, sku)
        if row is None:
            return web.json_response({"error": f"no event about SKU {sku!r} is projected yet"}, status=404)
        return web.json_response(row)

    async def get_order(request: web.Request) -> web.Response:
        """The order's lines; with ?command_id, also that command's decision (null until it is
        visible). ?wait_ms waits for it, or without a command_id for the order's first decision."""
        order_id = request.match_info["order_id"]
        wait_ms = _int_param(request, "wait_ms", 0, 0, MAX_WAIT_MS)
        command_id = _command_id_param(request)
        fields, decision = await order_waits.wait(order_id, command_id, wait_ms)
        if not fields:
            return web.json_response(
                {"error": order_not_found(order_id, settings.order_retention_s)}, status=404
            )
        body: dict[str, Any] = {"order_id": order_id, "lines": line_status(fields)}
        if command_id is not None:
            body["decision"] = decision
        return web.json_response(body)

    async def get_top(request: web.Request) -> web.Response:
        n = _int_param(request, "n", 10, 1, 1000)
        return web.json_response(
            [{"sku": sku, "units_sold": units} for sku, units in await read(models.top, n)]
        )

    async def health(_request: web.Request) -> web.Response:
        """200 when both answer: Redis (the reads) and Kafka (the writes); else 503 with which."""
        problems = await _unavailable({"redis": models.watermarks, "kafka": gateway.check_broker})
        if problems:
            return web.json_response({"status": "unavailable", **problems}, status=503)
        return web.json_response({"status": "ok"})

    async def close_gateway(_app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, gateway.close)  # flushes the producer

    api = web.Application(
        middlewares=[_errors, *([_token_check(settings.api_tokens)] if settings.api_tokens else [])]
    )
    api.add_routes(
        [
            web.post("/orders", post_order),
            web.post("/orders/{order_id}/cancel", post_cancel),
            web.post("/skus/{sku}/restock", post_restock),
            web.get("/skus/{sku}", get_stock),
            web.get("/orders/{order_id}", get_order),
            web.get("/top", get_top),
            web.get("/health", health),
        ]
    )
    api.on_cleanup.append(close_gateway)
    return api
