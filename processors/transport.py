"""Faust's Kafka transport, with a fetch wait that cannot stall the processor for 1.5 s, and
commits of what the processor has handled rather than of what Faust's stream acknowledged.

Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500``, hard-coded. aiokafka
leaves a partition whose fetched records are still unread out of the next fetch request, and a
Faust worker also holds ``<app>-__assignor-__leader``, a partition no one writes to. So once
the agent is behind for a moment, every command partition has unread records, the next fetch
asks for the idle partition alone, and the broker holds it for the full 1.5 s; the command
partitions cannot be fetched again until it returns. It repeats for as long as the agent is
behind: paused for 0.5 s at 10,000 commands/s, the processor made three such 1.5 s fetches in a
row, and p90 latency went to 1.5 s; with 50 ms, p90 stayed at 130-150 ms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

# The longest the broker may hold a fetch that has nothing to return. Idle, a worker then
# sends about 20 empty fetches a second, which costs the broker next to nothing.
FETCH_MAX_WAIT_MS = 50


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by the consumer's start(), which builds the fetcher; there is no public setter.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class Consumer(faust_aiokafka.Consumer):
    # The offset to commit for a partition, or None for Faust's own (set by processors.app).
    committable: Callable[[TP], int | None] | None = None

    async def commit_as_member(self, offsets: Mapping[TP, int]) -> bool:
        """Commit ``offsets`` under this worker's membership of the group: True if the broker took
        them and the worker still holds every one of the partitions.

        The broker refuses a commit from a member it has dropped (its session timed out while
        the process was paused or cut off) or while the group rebalances, so True means that a
        moment ago no other worker had been given these partitions.
        """
        if not offsets or not set(offsets) <= self.assignment():
            return False
        # Faust commits only the partitions its consumer holds, and says False when the broker
        # answers that the group has rebalanced; it crashes the worker on any other error.
        committed = await self._commit(offsets)
        return committed and set(offsets) <= self.assignment()

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp`` next; Faust commits it if it is past the last one.

        Faust's own is one past the first unbroken run of offsets its stream acknowledged. Under
        processor restarts it went wrong in two ways, and the committed lag that operators and
        publishers' backpressure read went wrong with it:
        - after a rebalance its fetcher dropped messages below the offset it had read before (it
          had delivered them once, then the rebalance cleared its queues), so the stream never
          acknowledged them. The processor decides them from its own read of the log
          (``CommandHandler._repair_gap``), but the commit stayed before them for as long as the
          worker lived: in a soak, one partition stayed 806 messages behind, every command decided;
        - after a restart every offset of a partition was acknowledged twice, and a run breaks
          at each repeat: the commit moved one offset per commit (0.5 s), 1,220 behind after 30 s.
        The processor knows what it has handled: ``committable`` reads it from its table.
        """
        if self.committable is None:
            return super()._new_offset(tp)
        offset = self.committable(tp)
        if offset is not None:
            # Faust's record of acknowledged offsets is no longer needed: it would only grow.
            self._acked[tp].clear()
            self._acked_index[tp].clear()
            self._gap.pop(tp, None)
        return offset


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
