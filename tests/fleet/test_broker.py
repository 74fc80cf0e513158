"""The local broker for real: round trip, kill -9 + restart keeps committed data, clean
stop, start-up failures as one line, the aegis topics and their guard rails."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from aegis_stream.fleet import topics
from aegis_stream.fleet.broker import BrokerError, LocalBroker, api_versions


def _producer(bootstrap: str, **extra: object) -> Producer:
    return Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True,
        "linger.ms": 5, **extra,
    })


def _produce(p: Producer, topic: str, records: list[tuple[bytes, bytes]]) -> list[KafkaError]:
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for key, value in records:
        p.produce(topic, value=value, key=key, on_delivery=on_delivery,
                  headers=topics.schema_headers("aegis.test.v1", 1))
        p.poll(0)
    left = p.flush(30)
    assert left == 0, f"{left} records not delivered within 30 s"
    return errors


def _consume(bootstrap: str, topic: str, group: str, want: int, *, commit_after: int | None = None,
             timeout: float = 30.0) -> list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]]:
    """Read ``want`` records; with ``commit_after`` commit synchronously after that many
    and stop there."""
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    got: list[tuple[bytes, bytes, int, list[tuple[str, bytes]]]] = []
    last: dict[int, int] = {}
    stop_at = commit_after if commit_after is not None else want
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(got) < stop_at and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            got.append((m.key(), m.value(), m.partition(), list(m.headers() or [])))
            last[m.partition()] = m.offset()
            if commit_after is not None and len(got) == commit_after:
                # exactly what was read, every partition: the next offset of each
                c.commit(offsets=[TopicPartition(topic, p, o + 1) for p, o in last.items()],
                         asynchronous=False)
    finally:
        c.close()
    return got


def _records(n: int, hosts: int = 5) -> list[tuple[bytes, bytes]]:
    return [(f"host-{i % hosts}".encode(), f"event-{i}".encode()) for i in range(n)]


def test_round_trip_keeps_values_headers_and_per_key_order(kafka_broker, kafka_topic) -> None:
    recs = _records(2000)
    assert _produce(_producer(kafka_broker.bootstrap), kafka_topic, recs) == []
    got = _consume(kafka_broker.bootstrap, kafka_topic, f"g-{uuid.uuid4().hex}", len(recs))
    assert sorted((k, v) for k, v, _, _ in got) == sorted(recs)
    # key = host: one host's records on one partition, in production order
    for host in {k for k, _ in recs}:
        mine = [(v, p) for k, v, p, _ in got if k == host]
        assert len({p for _, p in mine}) == 1
        assert [v for v, _ in mine] == [v for k, v in recs if k == host]
    assert all(dict(h) == {topics.HEADER_SCHEMA: b"aegis.test.v1",
                           topics.HEADER_SCHEMA_VERSION: b"1"} for _, _, _, h in got)


def test_aegis_topics_exist_and_create_is_idempotent(kafka_broker) -> None:
    have = topics.list_topics(kafka_broker.bootstrap)
    for spec in topics.TOPICS:
        assert have.get(spec.name) == spec.partitions, spec.name
    assert topics.create_topics(kafka_broker.bootstrap) == []


def test_no_auto_topic_creation(kafka_broker) -> None:
    name = f"test.typo.{uuid.uuid4().hex[:8]}"
    p = _producer(kafka_broker.bootstrap, **{"message.timeout.ms": 3000})
    errors = _produce(p, name, [(b"h", b"v")])
    assert len(errors) == 1 and errors[0].code() in (
        KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._MSG_TIMED_OUT,
    ), errors
    assert name not in topics.list_topics(kafka_broker.bootstrap)


def test_create_topics_bad_config_is_one_line_error(kafka_broker) -> None:
    spec = topics.TopicSpec(f"test.bad.{uuid.uuid4().hex[:8]}", 1, "k", {"retention.ms": "soon"})
    with pytest.raises(topics.TopicError, match=r"cannot create topic test\.bad\.") as ei:
        topics.create_topics(kafka_broker.bootstrap, [spec])
    assert "\n" not in str(ei.value)


def test_create_topics_unreachable_is_one_line_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(topics.TopicError, match=f"127.0.0.1:{port}") as ei:
        topics.create_topics(f"127.0.0.1:{port}", topics.TOPICS[:1], timeout=2.0)
    assert "\n" not in str(ei.value)


def test_kill_9_and_restart_keep_acked_records_and_committed_offsets(
    kafka_broker, kafka_topic
) -> None:
    b = kafka_broker
    recs = _records(3000)
    producer = _producer(b.bootstrap)
    assert _produce(producer, kafka_topic, recs) == []  # flushed: every record acked (acks=all)
    group = f"g-{uuid.uuid4().hex}"
    first = _consume(b.bootstrap, kafka_topic, group, len(recs), commit_after=1000)
    assert len(first) == 1000

    pid, port = b.pid(), b.port
    b.kill()
    assert b.pid() is None and pid is not None
    with pytest.raises(OSError):
        api_versions("127.0.0.1", port, timeout=1.0)
    b.restart()
    assert b.port == port and b.pid() not in (None, pid)

    # the committed group resumes after its offsets: together exactly the records
    rest = _consume(b.bootstrap, kafka_topic, group, len(recs) - 1000)
    assert sorted((k, v) for k, v, _, _ in first + rest) == sorted(recs)
    # a new group sees everything that was acked before the kill
    everything = _consume(b.bootstrap, kafka_topic, f"g-{uuid.uuid4().hex}", len(recs))
    assert sorted((k, v) for k, v, _, _ in everything) == sorted(recs)
    # a producer from before the crash reconnects to the same bootstrap by itself
    assert _produce(producer, kafka_topic, [(b"host-0", b"after-restart")]) == []


def test_stop_is_clean_and_restart_serves_the_same_data(kafka_broker, kafka_topic) -> None:
    b = kafka_broker
    assert _produce(_producer(b.bootstrap), kafka_topic, _records(100)) == []
    t0 = time.monotonic()
    assert b.stop() is True  # SIGTERM answered within the grace period: no SIGKILL
    assert time.monotonic() - t0 < 30
    assert not b.pid_path.exists()
    st = b.status()
    assert not st.running and not st.answering and st.port == b.port
    log = b.log_path.read_text()
    assert "shut down completely" in log or "shutdown completed" in log.lower()
    assert "ERROR" not in "\n".join(ln for ln in log.splitlines() if "Shutdown" in ln)
    b.restart()
    st = b.status()
    assert st.running and st.answering and st.pid == b.pid()
    got = _consume(b.bootstrap, kafka_topic, f"g-{uuid.uuid4().hex}", 100)
    assert len(got) == 100


def test_start_failure_is_one_line_with_the_log_tail(kafka_broker, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        b = LocalBroker(tmp_path / "kafka", port=port)
        with pytest.raises(BrokerError) as ei:
            b.start(timeout=60)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(b.log_path) in msg
    assert "exited during start-up" in msg or "not ready" in msg
    assert b.pid() is None  # nothing left running


def test_second_start_on_a_running_dir_is_refused(kafka_broker) -> None:
    other = LocalBroker(kafka_broker.data_dir)
    with pytest.raises(BrokerError, match="already running"):
        other.start()
    assert other.status().running
