"""The processor's Kafka consumer (processors.transport): a short fetch wait, and commits of
what the processor handled."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from faust.types import TP

from processors.app import create_app
from processors.transport import FETCH_MAX_WAIT_MS, Consumer
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


def test_the_offset_committed_is_what_the_processor_handled_not_faust_s_acknowledged_run(
    tmp_path: Path,
) -> None:
    settings = Settings()
    consumer = cast(Consumer, create_app(settings, tmp_path).consumer)
    tp = TP(settings.commands_topic, 3)
    # As seen after processor restarts: offsets acknowledged twice, and 100-109 never (the
    # stream skipped them and the processor read them itself). Faust's run stops at the repeat.
    consumer._acked[tp].extend([110, 110, 111, 111, 112])
    consumer._acked_index[tp].update({110, 111, 112})
    assert consumer._new_offset(tp) == 111
    consumer.committable = {tp: 113}.get
    assert consumer._new_offset(tp) == 113
    assert (consumer._acked[tp], consumer._acked_index[tp]) == ([], set())  # not kept growing
    consumer.committable = lambda _tp: None  # nothing handled yet: no commit
    assert consumer._new_offset(tp) is None
