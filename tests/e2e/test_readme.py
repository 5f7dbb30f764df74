"""The README's examples ("By hand", "HTTP API", "From Python"), run as written, against the
session's stack: the first things a newcomer copies must work and show what their comments
say."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from projections.rebuild import database_url
from stockflow.settings import Settings
from stockflow.stack import settings_env
from tests.e2e.test_api import api_server, call
from tests.e2e.test_cli import stockflow
from tests.pipeline import wait_for

pytestmark = pytest.mark.e2e

README = Path(__file__).parents[2] / "README.md"
# The walk-through's names, made the test's own: other tests share the stack.
NAMES = ("SKU-1", "o-1001", "r-7", "c-2002")


def fenced_block(heading: str, language: str = "bash") -> list[str]:
    """The lines of the first ```<language> block under the README's ``## <heading>``."""
    section = README.read_text().split(f"\n## {heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("\n```", 1)[0].splitlines()


def renamed(text: str, names: dict[str, str]) -> str:
    """``text`` with each of the README's names replaced by the test's own."""
    for name, own in names.items():
        text = re.sub(rf"\b{re.escape(name)}\b", own, text)
    return text


def walk_through() -> list[list[str]]:
    """The arguments of each `stockflow` line of the README's "By hand" block, in order."""
    lines = [shlex.split(line, comments=True) for line in fenced_block("By hand")]
    # The session's stack stands in for `make up` and `make down`.
    assert lines[0] == ["make", "up"] and lines[-1] == ["make", "down"], lines
    assert all(line[0] == ".venv/bin/stockflow" for line in lines[1:-1]), lines
    return [line[1:] for line in lines[1:-1]]


def shows(output: str, field: str, value: int) -> bool:
    """Whether a `stockflow query` table has ``value`` in ``field``'s row."""
    return re.search(rf"\b{field}\W+{value}\b", output) is not None


def showing(
    settings: Settings, args: list[str], field: str, value: int
) -> Callable[[], subprocess.CompletedProcess[str] | None]:
    """A probe: the run of `stockflow *args` if its output shows ``value`` in ``field``'s row."""

    def probe() -> subprocess.CompletedProcess[str] | None:
        result = stockflow(settings, *args)
        return result if result.returncode == 0 and shows(result.stdout, field, value) else None

    return probe


@pytest.mark.usefixtures("stack")
def test_the_walk_through_runs_as_written_and_shows_what_it_says(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    names = {name: unique(name) for name in NAMES}
    sku, order_id = names["SKU-1"], names["o-1001"]
    ran = []
    try:
        for line in walk_through():
            args = [renamed(arg, names) for arg in line]
            if args == ["status"]:
                args.append("--once")  # live until interrupted; the comment names --once
            if args[:2] == ["query", "stock"]:
                # Restocked 10, sold 3, 50 rejected, restocked 5 once though sent twice.
                result = wait_for(
                    f"`stockflow {shlex.join(args)}` to show version 4", showing(settings, args, "version", 4)
                )
                for field, value in ("available", 12), ("processed", 1), ("rejected", 1), ("replenished", 2):
                    assert shows(result.stdout, field, value), result.stdout
            elif "--wait" in args and args[0] == "publish":
                # The decision, printed: the processor may still be starting (the session's first
                # test), so it waits longer than the README's reader would need to.
                args[args.index("--wait") + 1] = "120"
                result = stockflow(settings, *args)
                assert result.returncode == 0, result.stderr
                expected = "rejected: insufficient stock: 50 requested" if "50" in args else "processed"
                assert expected in result.stdout, result.stdout
            elif args[:2] == ["query", "order"]:
                result = stockflow(settings, *args)
                assert result.returncode == 0, result.stderr
                assert json.loads(result.stdout)[sku]["status"] == "processed"
            else:
                result = stockflow(settings, *args)
                assert result.returncode == 0, f"stockflow {shlex.join(args)}:\n{result.stderr}"
            ran.append(args[0])
        # By now `verify --wait` has seen every command decided: the retry made no second restock.
        final = stockflow(settings, "query", "stock", sku).stdout
        assert shows(final, "available", 12) and shows(final, "version", 4), final
        assert order_id in final  # its recent orders
        assert {"publish", "query", "load", "verify", "rebuild", "status", "stack"} <= set(ran)
    finally:
        redis.Redis.from_url(database_url(settings.redis_url, 1)).flushdb()  # the rebuild's


def http_examples() -> list[tuple[str, str | None, str | None]]:
    """(path, body, the answer shown under it) of each `curl` line of the README's HTTP block;
    a line with a body (``-d``) is a POST, as curl sends it."""
    examples: list[tuple[str, str | None, str | None]] = []
    for line in fenced_block("HTTP API"):
        if line.startswith("# "):  # the answer to the line above
            path, body, _ = examples[-1]
            examples[-1] = (path, body, line[2:])
            continue
        args = shlex.split(line, comments=True)
        assert args[0] == "curl", line
        body = args[args.index("-d") + 1] if "-d" in args else None
        examples.append((args[-1].removeprefix("localhost:8080"), body, None))
    return examples


def string_fields(value: Any) -> Iterator[tuple[str, str]]:
    """Every (key, value) pair with a string value, at any depth of a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                yield key, item
            yield from string_fields(item)


@pytest.mark.usefixtures("stack")
def test_the_http_examples_answer_as_written(
    settings: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    names = {name: unique(name) for name in NAMES}
    examples = http_examples()
    assert any(body for _path, body, _answer in examples) and any(answer for *_, answer in examples)
    with api_server(settings, tmp_path / "api.log") as api:
        for example, body, answer in examples:
            path = renamed(example, names)
            raw = renamed(body, names).encode() if body is not None else None
            status, reply, _ = call(api, "POST" if raw is not None else "GET", path, raw=raw)
            assert 200 <= status < 300, (path, status, reply)
            if answer is not None:
                code, _, shown = renamed(answer, names).partition(" ")
                assert status == int(code), (path, status, reply)
                # The answer's string values, but for the "…" of a value that varies.
                for key, value in re.findall(r'"([\w-]+)": "([^"…]+)"', shown):
                    assert (key, value) in set(string_fields(reply)), (path, key, value, reply)


@pytest.mark.usefixtures("stack")
def test_the_python_example_runs_as_written_and_prints_what_its_comments_say(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    code = fenced_block("From Python", "python")
    # What each print shows, as the comment after it says.
    expected = [line.rsplit("# ", 1)[1] for line in code if line.lstrip().startswith("print(")]
    assert expected == ["processed", "cancelled", "0"]
    # The processor may still be starting (the session's first test): longer waits than a reader needs.
    script = renamed("\n".join(code), {name: unique(name) for name in NAMES}).replace(
        "wait_s=30", "wait_s=120"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected, result.stderr
