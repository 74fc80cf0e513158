"""Read a topic back, in full, for assertions (used by the tail, ship and e2e tests).

Assigns every partition (no consumer group), reads from the beginning up to the high
watermark each partition had when the read started, and returns the records with their
partition, offset, key and headers.  Tests share the session broker and its topics, so
they select their own records (a host name or event ids unique to the test).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    headers: dict[str, bytes]

    @property
    def doc(self) -> dict:
        return msgspec.json.decode(self.value)


def read_topic(bootstrap: str, topic: str, *, timeout: float = 60.0) -> list[Rec]:
    """Every record of ``topic`` up to its current end, partition by partition in order."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "aegis-test-readback",
                  "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        ends = {}
        for p in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out: list[Rec] = []
        done = {p: False for p in ends}
        deadline = time.monotonic() + timeout
        while not all(done.values()):
            if time.monotonic() > deadline:
                raise AssertionError(f"read_topic {topic}: not at the end after {timeout}s")
            msg = c.poll(0.5)
            if msg is None or msg.error() is not None:
                # the last offsets may be transaction markers, never delivered: the
                # consumer's position still passes them
                for tp in c.position([TopicPartition(topic, q) for q, d in done.items() if not d]):
                    if tp.offset >= ends[tp.partition]:
                        done[tp.partition] = True
                continue
            p = msg.partition()
            out.append(Rec(topic, p, msg.offset(), msg.key() or b"", msg.value() or b"",
                           dict(msg.headers() or [])))
            if msg.offset() + 1 >= ends[p]:
                done[p] = True
        return out
    finally:
        c.close()
