"""The processor's Kafka consumer is built with a short fetch wait (see processors.transport)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from processors.app import create_app
from processors.transport import FETCH_MAX_WAIT_MS
from stockflow.settings import Settings


def test_the_processor_s_consumer_waits_at_most_50_ms_for_a_fetch(tmp_path: Path) -> None:
    async def build() -> int:
        app = create_app(Settings(), tmp_path)
        thread = app.consumer._thread  # type: ignore[attr-defined]  # the aiokafka consumer's owner
        consumer = thread._create_consumer(loop=asyncio.get_running_loop())
        wait: int = consumer._fetch_max_wait_ms  # what its fetcher is built with, on start()
        return wait

    # Faust's own value is 1500; nothing connects to a broker before start().
    assert asyncio.run(build()) == FETCH_MAX_WAIT_MS == 50
