"""Faust's Kafka transport, with a fetch wait that cannot stall the processor for 1.5 s.

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

from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka

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
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
