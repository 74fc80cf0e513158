"""KafkaSink without a broker: routing, the deny spool and its replay order, audit shedding
with counted reasons, a full spool, recovery of a previous run's spool.

The fake producer is no bigger than the part of confluent_kafka.Producer the sink uses
(produce / poll / flush / list_topics); the real broker tests are in tests/fleet/.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from aegis_stream.fleet.sink import (
    BROKER_UNAVAILABLE,
    QUEUE_FULL,
    SHUTDOWN,
    KafkaSink,
    KafkaSinkError,
    LineSpool,
    check_topics,
    parse_bootstrap,
)
from aegis_stream.fleet.topics import DECISION_TOPIC, EXPLANATION_TOPIC, HEADER_SCHEMA, STATE_TOPIC
from aegis_stream.pipeline.sinks import SinkBatch

ck = pytest.importorskip("confluent_kafka")

from ._fake_producer import FakeProducer  # noqa: E402  (needs confluent_kafka)


def batch(klass: str, start: int, n: int) -> SinkBatch:
    lines = b"".join(json.dumps({"event_id": f"e{i}", "seq": i, "decision": klass}).encode() + b"\n"
                     for i in range(start, start + n))
    return SinkBatch(klass, lines, n)


def make(tmp_path: Path, prod: FakeProducer, **kw: Any) -> KafkaSink:
    """In-process mode with ``prod``, or (``prod.shared`` set) a producer process whose
    producer is a FakeProducer with the same settings and broker state."""
    kw.setdefault("ack_timeout_s", 0.2)
    kw.setdefault("probe_min_s", 0.01)
    kw.setdefault("probe_max_s", 0.05)
    if prod.shared is not None:
        return KafkaSink("127.0.0.1:9092", host_key="host-a", spool_dir=tmp_path / "spool",
                         **prod.spec(), **kw)
    return KafkaSink("127.0.0.1:9092", host_key="host-a", spool_dir=tmp_path / "spool",
                     producer=prod, **kw)


@pytest.fixture(params=["thread", "process"])
def fake(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """``fake(**kw) -> FakeProducer`` for the in-process sink, or for a producer process."""
    def new(**kw: Any) -> FakeProducer:
        if request.param == "process":
            kw["shared"] = tmp_path / "broker"
        return FakeProducer(**kw)

    return new


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_routes_keys_and_headers(tmp_path: Path, fake: Any) -> None:
    prod = fake()
    sink = make(tmp_path, prod)
    try:
        await sink.write(batch("deny", 0, 3))
        await sink.write(batch("explanation", 0, 1))
        await sink.write(batch("audit", 3, 2))
        await sink.write(batch("state", 0, 1))
        await sink.write(batch("slo", 0, 1))
        await wait_for(lambda: sink.statistics().acked == 8)
    finally:
        await sink.aclose()
    by_topic = {t: [(k, h[HEADER_SCHEMA]) for tt, k, _, h in prod.log if tt == t]
                for t in (DECISION_TOPIC, EXPLANATION_TOPIC, STATE_TOPIC)}
    assert by_topic[DECISION_TOPIC] == [(b"host-a", b"aegis.decision.v1")] * 5
    assert by_topic[EXPLANATION_TOPIC] == [(b"host-a", b"aegis.explanation.v1")]
    assert by_topic[STATE_TOPIC] == [(b"host-a", b"aegis.state.v1"), (b"host-a", b"aegis.slo.v1")]
    assert all(h["aegis-schema-version"] == b"1" for _, _, _, h in prod.log)
    st = sink.statistics()
    assert (st.sent, st.acked, st.spooled, sum(st.dropped.values())) == (8, 8, 0, 0)
    assert st.rtt_count == 5 and sum(st.rtt_buckets) == 5 and st.up


async def test_denies_spooled_while_down_and_replayed_in_order(tmp_path: Path, fake: Any) -> None:
    prod = fake()
    health: list[tuple[bool, str]] = []
    sink = make(tmp_path, prod, on_health=lambda up, why: health.append((up, why)))
    try:
        await sink.write(batch("deny", 0, 5))
        prod.up = False
        t0 = trio.current_time()
        await sink.write(batch("deny", 5, 5))  # no ack within 0.2 s: spooled
        await sink.write(batch("deny", 10, 5))  # behind it, without waiting
        await sink.write(batch("explanation", 0, 1))
        assert trio.current_time() - t0 < 1.0  # the file sink next to it is not held back
        st = sink.statistics()
        assert not st.up and st.reason.startswith(BROKER_UNAVAILABLE)
        assert st.spooled == 11 and st.spool is not None and st.spool.pending_events == 11
        await trio.sleep(0.5)  # the first attempt's records time out in the fake
        prod.up = True
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
        await sink.write(batch("deny", 15, 5))  # direct again once the spool is empty
    finally:
        await sink.aclose()
    seqs = [v["seq"] for v in prod.values()]
    firsts = list(dict.fromkeys(seqs))  # at-least-once: a late ack may repeat; order holds
    assert firsts == list(range(20))
    assert len(prod.values(EXPLANATION_TOPIC)) == 1
    st = sink.statistics()
    assert st.retried >= 11 and st.spool is not None and st.spool.replayed_events == 11
    assert sum(st.dropped.values()) == 0
    flips = [up for i, (up, _) in enumerate(health) if i == 0 or health[i - 1][0] != up]
    assert flips == [False, True] and health[-1] == (True, "")
    assert all(why.startswith(BROKER_UNAVAILABLE) for up, why in health if not up)


async def test_audit_shed_counted_while_down(tmp_path: Path, fake: Any) -> None:
    prod = fake(timeout_s=0.05)
    sink = make(tmp_path, prod)
    try:
        prod.up = False
        await sink.write(batch("audit", 0, 100))  # produced, its reports fail: counted
        await wait_for(lambda: not sink.up)
        await sink.write(batch("audit", 100, 50))  # shed at once
        await sink.write(batch("state", 0, 1))
        st = sink.statistics()
        assert st.dropped[BROKER_UNAVAILABLE] == 151
        assert st.acked == 0 and st.spooled == 0
        prod.up = True
        await wait_for(lambda: sink.up)
        await sink.write(batch("audit", 150, 10))
        await wait_for(lambda: sink.statistics().acked == 10)
    finally:
        await sink.aclose()
    st = sink.statistics()
    assert len(prod.values()) + sum(st.dropped.values()) == 161


async def test_queue_full_sheds_audit_and_spools_deny(tmp_path: Path) -> None:
    prod = FakeProducer(queue_max=30)
    prod.up = False
    sink = make(tmp_path, prod)
    try:
        await sink.write(batch("audit", 0, 50))
        assert sink.statistics().dropped[QUEUE_FULL] == 20
        await sink.write(batch("deny", 0, 10))  # the queue is full: straight to the spool
        st = sink.statistics()
        assert st.spooled == 10 and st.reason.startswith(QUEUE_FULL)
        prod.up = True
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
    finally:
        await sink.aclose()
    assert [v["seq"] for v in prod.values() if v["decision"] == "deny"] == list(range(10))


async def test_full_spool_raises_and_a_retry_gets_through(tmp_path: Path, fake: Any) -> None:
    prod = fake()
    prod.up = False
    sink = make(tmp_path, prod, spool_max_bytes=400)
    try:
        await sink.write(batch("deny", 0, 5))  # ~300 bytes: fits
        with pytest.raises(KafkaSinkError, match="spool full"):
            await sink.write(batch("deny", 5, 5))
        st = sink.statistics()
        assert st.failures == 1 and st.failed_events == 5 and st.spool.full == 1  # type: ignore[union-attr]
        prod.up = True  # the pipeline retries the deny batch until it is written
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
        await sink.write(batch("deny", 5, 5))
    finally:
        await sink.aclose()
    assert list(dict.fromkeys(v["seq"] for v in prod.values())) == list(range(10))


async def test_previous_runs_spool_replayed_first(tmp_path: Path, fake: Any) -> None:
    spool = LineSpool(tmp_path / "spool", 1 << 20)
    assert spool.append(batch("deny", 0, 3)) and spool.append(batch("explanation", 0, 1))
    spool.close()
    with open(tmp_path / "spool" / "kafka.spool", "ab") as fh:
        fh.write(b"\x00\x00\x00\x00\x07\x00")  # a torn frame (crash mid-append): cut off
    prod = fake()
    sink = make(tmp_path, prod)
    try:
        assert sink.statistics().spool.recovered_events == 4  # type: ignore[union-attr]
        await sink.write(batch("deny", 3, 2))  # queued behind the recovered frames
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
    finally:
        await sink.aclose()
    assert [v["seq"] for v in prod.values()] == [0, 1, 2, 3, 4]
    assert len(prod.values(EXPLANATION_TOPIC)) == 1
    assert (tmp_path / "spool" / "kafka.spool").stat().st_size == 0


async def test_close_counts_unacknowledged_best_effort(tmp_path: Path, fake: Any) -> None:
    prod = fake(timeout_s=60)
    sink = make(tmp_path, prod, close_timeout_s=0.1)
    await sink.write(batch("audit", 0, 7))
    prod.up = False
    await sink.aclose()
    st = sink.statistics()
    assert st.acked + st.dropped[SHUTDOWN] == 7


def test_spool_close_compacts_replayed_frames(tmp_path: Path) -> None:
    spool = LineSpool(tmp_path, 1 << 20)
    for i in range(3):
        spool.append(batch("deny", i * 2, 2))
    spool.pop()
    spool.close()
    again = LineSpool(tmp_path, 1 << 20)
    got = []
    while (b := again.peek()) is not None:
        got += [json.loads(x)["seq"] for x in b.lines.splitlines()]
        again.pop()
    assert got == [2, 3, 4, 5]
    again.close()


@pytest.mark.parametrize("bad", ["", "localhost", "127.0.0.1:", "127.0.0.1:99999", "a b:1",
                                 "host:9092,", "http://h:1", "::1:9092"])
def test_bad_bootstrap_is_one_line(bad: str) -> None:
    with pytest.raises(KafkaSinkError) as ei:
        parse_bootstrap(bad)
    assert "\n" not in str(ei.value)


def test_good_bootstrap() -> None:
    assert parse_bootstrap(" a:1, [::1]:9092 ,10.0.0.1:65535") == "a:1,[::1]:9092,10.0.0.1:65535"


def test_missing_topic_refuses_and_unreachable_starts_down() -> None:
    prod = FakeProducer(topics=(DECISION_TOPIC,))
    with pytest.raises(KafkaSinkError, match="topic aegis.explanation.v1 does not exist"):
        check_topics(prod, "b:1")
    prod.up = False
    assert (check_topics(prod, "b:1") or "").startswith(BROKER_UNAVAILABLE)
    assert check_topics(FakeProducer(), "b:1") is None


async def test_broker_away_is_a_degraded_condition(tmp_path: Path, fake: Any) -> None:
    from aegis_stream.processors.degraded import DegradedMonitor

    monitor = DegradedMonitor()
    prod = fake()
    sink = make(tmp_path, prod)
    try:
        sink.bind_monitor(monitor)
        prod.up = False
        await sink.write(batch("deny", 0, 1))
        await wait_for(lambda: bool(monitor.conditions))
        (code, why), = monitor.conditions.items()
        assert code == "sink_failing" and why.startswith(f"sink failing: kafka:127.0.0.1:9092: "
                                                         f"{BROKER_UNAVAILABLE}")
        prod.up = True
        await wait_for(lambda: not monitor.conditions)
    finally:
        await sink.aclose()


async def test_metrics_of_a_kafka_sink(tmp_path: Path, fake: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from aegis_stream.fleet.metrics import KafkaSinkCollector

    prod = fake(timeout_s=60)
    sink = make(tmp_path, prod, close_timeout_s=0.1)
    try:
        await sink.write(batch("deny", 0, 4))
        prod.up = False
        await sink.write(batch("deny", 4, 2))  # spooled
        await wait_for(lambda: not sink.up)
        await sink.write(batch("audit", 0, 3))  # shed
    finally:
        await sink.aclose()  # the spooled denies stay on disk for the next run
    reg = CollectorRegistry()
    reg.register(KafkaSinkCollector(SimpleNamespace(stats=lambda: SimpleNamespace(sinks=(sink.statistics(),)))))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(generate_latest(reg).decode()) for s in fam.samples}
    lab = (("sink", "kafka:127.0.0.1:9092"),)
    assert got[("aegis_sink_acked_total", lab)] == 4
    assert got[("aegis_sink_spooled_total", lab)] == 2
    assert got[("aegis_sink_dropped_total", (("reason", BROKER_UNAVAILABLE), *lab))] == 3
    assert got[("aegis_sink_dropped_total", (("reason", QUEUE_FULL), *lab))] == 0
    assert got[("aegis_sink_roundtrip_seconds_count", lab)] == 1
    assert got[("aegis_sink_roundtrip_seconds_bucket", (("le", "+Inf"), *lab))] == 1
    assert got[("aegis_sink_producer_lost_total", lab)] == 0


def test_delivery_errors_map_to_reason_codes() -> None:
    from aegis_stream.fleet.sink import DELIVERY_FAILED, TOO_LARGE, UNKNOWN_TOPIC, reason_of

    ke = ck.KafkaError
    assert reason_of(ke(ke._MSG_TIMED_OUT)) == BROKER_UNAVAILABLE
    assert reason_of(ke(ke._ALL_BROKERS_DOWN)) == BROKER_UNAVAILABLE
    assert reason_of(ke(ke.UNKNOWN_TOPIC_OR_PART)) == UNKNOWN_TOPIC
    assert reason_of(ke(ke.MSG_SIZE_TOO_LARGE)) == TOO_LARGE
    assert reason_of(ke(ke._QUEUE_FULL)) == QUEUE_FULL
    assert reason_of(ke(ke.TOPIC_AUTHORIZATION_FAILED)) == DELIVERY_FAILED
    assert reason_of(object()) == DELIVERY_FAILED


# ------------------------------------------------------------------ the producer process
def test_producer_process_frames(tmp_path: Path) -> None:
    """The producer process's protocol, its main loop on a thread here: READY, then one BATCH frame ->
    one DONE frame with the batch's counts; a full queue -> SHORT at once, DONE once the
    produced part is reported; PROBE and FLUSH -> REPLY; EOF ends it."""
    import socket

    from aegis_stream.fleet import sink as ks
    from aegis_stream.framing import recv_exact as _recv_exact

    prod = FakeProducer(queue_max=5)
    ours, theirs = socket.socketpair()
    child = ks._ProducerChild(theirs, lambda cfg: prod, {}, b"host-a")
    t = threading.Thread(target=child.run, daemon=True)
    t.start()

    def send(kind: int, arg: int, body: bytes, seq: int) -> None:
        ours.sendall(ks._HDR.pack(kind, arg, 0, len(body), seq) + body)

    def recv() -> tuple[int, int, int, bytes]:
        kind, arg, _, n, seq = ks._HDR.unpack(_recv_exact(ours, ks._HDR.size))
        return kind, arg, seq, _recv_exact(ours, n) if n else b""

    ours.settimeout(5.0)
    assert recv() == (ks.READY, 0, 0, b"")  # first: its producer exists
    send(ks.BATCH, ks._KLASS_CODE["deny"], batch("deny", 0, 3).lines, 7)
    kind, arg, seq, body = recv()
    assert (kind, arg, seq) == (ks.DONE, 1, 7)
    assert ks._DONE.unpack(body)[:3] == (3, 3, 0) and len(body) == ks._DONE.size
    assert [(t_, k, h[HEADER_SCHEMA]) for t_, k, _, h in prod.log] == [
        (DECISION_TOPIC, b"host-a", b"aegis.decision.v1")] * 3

    prod.up = False  # 5 of 8 fit in the queue; they time out after 0.3 s
    send(ks.BATCH, ks._KLASS_CODE["audit"], batch("audit", 0, 8).lines, 8)
    assert recv() == (ks.SHORT, 0, 8, ks._U32.pack(5))
    send(ks.PROBE, 1, ks._F64.pack(0.1), 9)
    got = {}
    while len(got) < 2:
        kind, arg, seq, body = recv()
        got[kind] = (arg, seq, body)
    assert got[ks.REPLY][:2] == (ks.TOPICS_UNAVAILABLE, 9)
    arg, seq, body = got[ks.DONE]
    assert (arg, seq, ks._DONE.unpack_from(body)[:3]) == (0, 8, (5, 0, 5))
    assert ks._REASON.unpack_from(body, ks._DONE.size) == (ks.REASONS.index(BROKER_UNAVAILABLE), 5)

    prod.up = True
    send(ks.PROBE, 1, ks._F64.pack(0.1), 10)
    assert recv() == (ks.REPLY, ks.TOPICS_OK, 10, b"\n")
    send(ks.FLUSH, 0, ks._F64.pack(0.1), 11)
    assert recv() == (ks.REPLY, 0, 11, b"0")
    ours.shutdown(socket.SHUT_WR)
    t.join(2.0)
    assert not t.is_alive()
    ours.close()
    theirs.close()


def test_producer_process_ends_on_a_fatal_error(tmp_path: Path) -> None:
    """A fatal librdkafka error (produce() refuses with _FATAL) ends the producer process:
    the batch it broke is not reported (the sink fails it with the process), a HEALTH
    frame says why, the request side is shut so run() returns (the process then exits
    with FATAL_EXIT)."""
    import socket

    from aegis_stream.fleet import producer as kp
    from aegis_stream.fleet import sink as ks
    from aegis_stream.framing import recv_exact as _recv_exact

    class Fatal(FakeProducer):
        produced = 0

        def produce(self, topic: str, value: bytes, key: bytes, *, headers: Any, on_delivery: Any) -> None:
            self.produced += 1
            if self.produced > 4:
                raise ck.KafkaException(ck.KafkaError(ck.KafkaError._FATAL, "Local: Fatal error"))
            super().produce(topic, value, key, headers=headers, on_delivery=on_delivery)

    prod = Fatal()
    ours, theirs = socket.socketpair()
    child = ks._ProducerChild(theirs, lambda cfg: prod, {}, b"host-a")
    t = threading.Thread(target=child.run, daemon=True)
    t.start()
    ours.settimeout(5.0)

    def recv() -> tuple[int, int, int, bytes]:
        kind, arg, _, n, seq = ks._HDR.unpack(_recv_exact(ours, ks._HDR.size))
        return kind, arg, seq, _recv_exact(ours, n) if n else b""

    assert recv()[0] == ks.READY
    for seq in (1, 2):  # 3 records fit, the second batch breaks on its 2nd record
        body = batch("deny", 3 * seq, 3).lines
        ours.sendall(ks._HDR.pack(ks.BATCH, ks._KLASS_CODE["deny"], 0, len(body), seq) + body)
    t.join(5.0)  # run() returns by itself (the request side was shut)
    assert not t.is_alive() and child.fatal is not None
    theirs.close()  # what the process's exit does
    frames = []
    with pytest.raises(EOFError):
        while True:
            frames.append(recv())
    kinds = [(k, s) for k, _, s, _ in frames]
    # a HEALTH frame, and no DONE for the broken batch (batch 1's reports may not have
    # come before the end: the sink fails both with the process, and spools the denies)
    assert (ks.HEALTH, 0) in kinds and (ks.DONE, 2) not in kinds, kinds
    health = next(b for k, _, _, b in frames if k == ks.HEALTH)
    assert health.decode().startswith(f"{kp.PRODUCER_LOST}: fatal librdkafka error")
    ours.close()


async def test_queue_full_in_the_producer_process(tmp_path: Path) -> None:
    prod = FakeProducer(queue_max=30, timeout_s=60, shared=tmp_path / "broker")
    prod.up = False
    health: list[tuple[bool, str]] = []
    sink = make(tmp_path, prod, on_health=lambda up, why: health.append((up, why)))
    try:
        await sink.write(batch("audit", 0, 50))
        await wait_for(lambda: sink.statistics().dropped[QUEUE_FULL] == 20)
        await sink.write(batch("deny", 0, 10))  # the queue is full: SHORT, then the spool
        st = sink.statistics()
        # (the poll thread's probe may already have replaced the reason: the broker is down)
        await wait_for(lambda: bool(health))  # on_health runs on the trio loop, soon
        assert st.spooled == 10 and health[0][1].startswith(QUEUE_FULL)
        prod.up = True
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
    finally:
        await sink.aclose()
    assert [v["seq"] for v in prod.values() if v["decision"] == "deny"] == list(range(10))
    assert sink.statistics().dropped[QUEUE_FULL] == 20


async def test_producer_process_killed(tmp_path: Path) -> None:
    """SIGKILL the producer process while a deny batch awaits its ack and audit records wait
    in its queue: the deny batch is spooled at once (not after ack_timeout_s), the audit
    records are counted sink/producer_lost, a new process starts and the spool is re-sent
    through it; 0 denies lost, in order."""
    import os
    import signal

    from aegis_stream.fleet.sink import PRODUCER_LOST

    prod = FakeProducer(timeout_s=60, shared=tmp_path / "broker")
    sink = make(tmp_path, prod, ack_timeout_s=10.0)
    try:
        await sink.write(batch("deny", 0, 5))
        pid = sink.producer_pid
        assert pid > 0 and pid != os.getpid()
        prod.up = False  # what follows waits in the producer process's queue
        await sink.write(batch("audit", 0, 10))
        async with trio.open_nursery() as n:
            n.start_soon(sink.write, batch("deny", 5, 5))
            await trio.sleep(0.3)
            t0 = trio.current_time()
            os.kill(pid, signal.SIGKILL)
        assert trio.current_time() - t0 < 2.0  # noticed at once, not after 10 s
        st = sink.statistics()
        assert st.producer_lost == 1 and st.spooled == 5 and st.dropped[PRODUCER_LOST] == 10
        assert not st.up and st.reason.startswith(f"{PRODUCER_LOST}: producer process {pid} killed by SIGKILL")
        await wait_for(lambda: sink.producer_pid not in (0, pid))
        await sink.write(batch("deny", 10, 5))  # behind the spooled batch
        prod.up = True
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
        await sink.write(batch("deny", 15, 5))
    finally:
        await sink.aclose()
    assert list(dict.fromkeys(v["seq"] for v in prod.values())) == list(range(20))
    assert not [v for v in prod.values() if v["decision"] == "audit"]
    st = sink.statistics()
    assert st.producer_lost == 1 and st.acked >= 20 and st.spool.replayed_events == 10  # type: ignore[union-attr]
    from aegis_stream.fleet.metrics import KafkaSinkCollector

    fams = {f.name: f for f in KafkaSinkCollector(SimpleNamespace(stats=lambda: SimpleNamespace(sinks=(st,))))
            .collect()}
    assert [s.value for s in fams["aegis_sink_producer_lost"].samples if s.name.endswith("_total")] == [1]


async def test_hung_producer_process_is_replaced(tmp_path: Path) -> None:
    """A producer process that stops answering (SIGSTOP) is killed when a probe goes
    unanswered, and replaced; the spooled denies go through the new one."""
    import os
    import signal

    prod = FakeProducer(shared=tmp_path / "broker")
    sink = make(tmp_path, prod)
    try:
        await sink.write(batch("deny", 0, 2))
        pid = sink.producer_pid
        prod.up = False
        await sink.write(batch("deny", 2, 2))  # no ack: spooled, the poll thread probes
        assert sink.statistics().spooled == 2
        os.kill(pid, signal.SIGSTOP)
        await wait_for(lambda: sink.producer_pid not in (0, pid), timeout=10)
        st = sink.statistics()
        assert st.producer_lost == 1 and not st.up
        prod.up = True
        await wait_for(lambda: sink.statistics().spool.pending_events == 0)  # type: ignore[union-attr]
    finally:
        await sink.aclose()
    assert list(dict.fromkeys(v["seq"] for v in prod.values())) == [0, 1, 2, 3]


async def test_producer_process_outlives_sigint_and_sigterm(tmp_path: Path) -> None:
    """^C / a service stop reach the whole process group: the producer process waits for
    the agent's drain and close (EOF) instead of dying with records in flight."""
    import os
    import signal

    prod = FakeProducer(shared=tmp_path / "broker")
    sink = make(tmp_path, prod)
    try:
        await sink.write(batch("deny", 0, 1))
        pid = sink.producer_pid
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        await sink.write(batch("deny", 1, 1))
        await trio.sleep(0.2)
        st = sink.statistics()
        assert st.producer_pid == pid and st.producer_lost == 0 and st.acked == 2
    finally:
        await sink.aclose()
    assert sink.statistics().producer_pid == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # closed and reaped
