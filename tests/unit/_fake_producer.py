"""A fake of the part of confluent_kafka.Producer the Kafka sink uses (produce / poll /
flush / list_topics), for tests/unit/test_fleet_sink.py.  A module of its own: in process mode
the sink's producer process imports it (``producer_factory="tests.unit._fake_producer:child"``),
and it stays small so that process starts fast."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import confluent_kafka as ck

from aegis_stream.fleet.topics import DECISION_TOPIC, EXPLANATION_TOPIC, STATE_TOPIC


class _Msg:
    def latency(self) -> float:
        return 0.002


class FakeProducer:
    """A broker that is ``up`` (every queued record is acked at the next poll) or down
    (records wait; after ``timeout_s`` their delivery report fails like librdkafka's)."""

    def __init__(self, *, queue_max: int = 1_000_000, timeout_s: float = 0.3,
                 topics: tuple[str, ...] = (DECISION_TOPIC, EXPLANATION_TOPIC, STATE_TOPIC),
                 shared: Path | None = None) -> None:
        # shared: the broker's state (up/down, what it got) lives in files there, so the
        # test's copy and the producer process's forked copy see the same broker
        self.shared = shared
        if shared is not None:
            shared.mkdir(parents=True, exist_ok=True)
        self._up = True
        self.queue_max = queue_max
        self.timeout_s = timeout_s
        self.topics = topics
        self.queue: deque[tuple[float, str, bytes, bytes, Any, Any]] = deque()
        self._log: list[tuple[str, bytes, bytes, dict[str, bytes]]] = []
        self.lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self._up if self.shared is None else not (self.shared / "down").exists()

    @up.setter
    def up(self, value: bool) -> None:
        if self.shared is None:
            self._up = value
        elif value:
            (self.shared / "down").unlink(missing_ok=True)
        else:
            (self.shared / "down").touch()

    @property
    def log(self) -> list[tuple[str, bytes, bytes, dict[str, bytes]]]:
        if self.shared is None:
            return self._log
        path = self.shared / "log"
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [(t, k.encode(), v.encode(), {h: hv.encode() for h, hv in hs.items()}) for t, k, v, hs in recs]

    def _record(self, topic: str, key: bytes, value: bytes, headers: dict[str, bytes]) -> None:
        if self.shared is None:
            self._log.append((topic, key, value, headers))
            return
        rec = [topic, key.decode(), value.decode(), {h: v.decode() for h, v in headers.items()}]
        with open(self.shared / "log", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def produce(self, topic: str, value: bytes, key: bytes, *, headers: Any, on_delivery: Any) -> None:
        with self.lock:
            if len(self.queue) >= self.queue_max:
                raise BufferError("Local: Queue full")
            self.queue.append((time.monotonic(), topic, value, key, headers, on_delivery))

    def poll(self, timeout: float) -> int:
        done = []
        with self.lock:
            now = time.monotonic()
            while self.queue and (self.up or now - self.queue[0][0] > self.timeout_s):
                done.append((self.up, self.queue.popleft()))
        for ok, (_, topic, value, key, headers, cb) in done:
            if ok:
                self._record(topic, key, value, dict(headers))
                cb(None, _Msg())
            else:
                cb(ck.KafkaError(ck.KafkaError._MSG_TIMED_OUT), None)
        if not done:
            time.sleep(min(timeout, 0.005))
        return len(done)

    def flush(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.queue and time.monotonic() < end:
            self.poll(0.01)
        return len(self.queue)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if not self.up:
            raise ck.KafkaException(ck.KafkaError(ck.KafkaError._TRANSPORT))
        return SimpleNamespace(topics={t: SimpleNamespace(error=None) for t in self.topics})

    def values(self, topic: str = DECISION_TOPIC) -> list[dict[str, Any]]:
        return [json.loads(v) for t, _, v, _ in self.log if t == topic]

    def spec(self) -> dict[str, Any]:
        """KafkaSink arguments that make this fake in a producer process (needs ``shared``)."""
        assert self.shared is not None
        return {"producer_factory": "tests.unit._fake_producer:child",
                "producer_factory_kwargs": {"queue_max": self.queue_max, "timeout_s": self.timeout_s,
                                            "topics": list(self.topics), "shared": str(self.shared)}}


def child(cfg: dict[str, Any], *, shared: str, topics: list[str], **kw: Any) -> FakeProducer:
    """The producer process's fake: the same broker state as the test's (files in ``shared``)."""
    return FakeProducer(shared=Path(shared), topics=tuple(topics), **kw)
