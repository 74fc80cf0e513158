"""The fleet worker counts each decision once per (host, event_id) on a real broker
(issue 11): the agent's sink delivers denies at least once -- a batch produced but not
acked in time is spooled and produced again once the broker answers -- so the same deny
can sit on aegis.decision.v1 twice, at different offsets.

* repeated deny batches (as the sink's replay writes them: after their originals, some
  within the worker's reorder window, some far older) with a worker kill -9 mid-stream:
  every count exact per host, per rule and in total, every repeat counted as a
  duplicate, exactly, after the restore from the changelog;
* the real KafkaSink with the broker stalled (SIGSTOP, so batches are produced but acked
  too late: spooled and replayed, both copies on the topic) and with the broker
  SIGKILLed and restarted: the worker's per-host counts equal the denies the sinks
  delivered, and its duplicates equal the repeats on the topic.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import trio

from aegis_stream.fleet.broker import LocalBroker, free_port
from aegis_stream.fleet.topics import DECISION_TOPIC, FLEET_TOPIC, STATE_TOPIC
from aegis_stream.pipeline.sinks import SinkBatch
from pipelines import fleet_gen as g

from .readback import read_topic

_quiet = logging.getLogger("tests.fleet.dedup.librdkafka")
_quiet.propagate = False
_quiet.addHandler(logging.NullHandler())
_enc = msgspec.json.Encoder()
#: the sinks' record expiry and close flush in these tests (see stream_through_sinks),
#: and the longest a broker restart may take
RECORD_TIMEOUT_MS = 600_000
CLOSE_TIMEOUT_S = 120.0
RESTART_TIMEOUT_S = 300.0


def labelled(m: dict[str, float], name: str) -> dict[tuple[str, str], int]:
    """``name{host=..,decision=..}`` samples as {(host, decision): value}."""
    out: dict[tuple[str, str], int] = {}
    for k, v in m.items():
        if k.startswith(name + "{"):
            labels = dict(p.split("=", 1) for p in k[k.index("{") + 1:-1].split(","))
            out[(labels["host"].strip('"'), labels["decision"].strip('"'))] = int(v)
    return out


# ------------------------------------------------------------------ repeated batches
def test_repeated_deny_batches_counted_once_across_a_worker_kill(kafka_broker, kafka_topic_factory,
                                                                 tmp_path):
    topics = (kafka_topic_factory(6), kafka_topic_factory(3), kafka_topic_factory(1))
    n = 60_000
    events = list(g.decisions(n))
    # the replay pattern: after every chunk, the denies of the chunk before last again
    # (~100 ms of ktime back: inside the reorder window, decided by the id); at the end
    # the first chunk's denies (~3 s back: below the window, decided by the ktime)
    chunk = 2000
    stream = []
    for i in range(0, n, chunk):
        stream += events[i:i + chunk]
        if i >= 2 * chunk:
            stream += [e for e in events[i - 2 * chunk:i - chunk] if e.decision == "deny"][::3]
    stream += [e for e in events[:chunk] if e.decision == "deny"]
    want = g.expected(events)
    repeats = Counter(e.host for e in stream) - Counter(e.host for e in events)
    assert sum(repeats.values()) > 10_000
    app_id = f"dedup-{uuid.uuid4().hex[:8]}"
    port = free_port()

    def worker() -> g.WorkerProcess:
        return g.WorkerProcess(kafka_broker.bootstrap, app_id, port, data_dir=str(tmp_path / "w"),
                               topics=topics, log=str(tmp_path / "worker.log")).start()

    w = worker()
    try:
        w.wait(lambda m: g.records(m) >= 0, 60, "metrics endpoint")
        producer = threading.Thread(target=g.produce_decisions,
                                    args=(kafka_broker.bootstrap, iter(stream)), kwargs={"topic": topics[0]})
        producer.start()
        w.wait(lambda m: g.records(m) >= len(stream) // 3, 60, "a third absorbed")
        w.kill9()
        producer.join(60)
        w = worker()
        total = len(stream)

        def settled(m: dict[str, float]) -> bool:
            return g.denies(m) + g.audits(m) + m.get('aegis_fleet_duplicates_total{decision="deny"}', 0) >= total

        w.wait(settled, 90, "every record absorbed")
        time.sleep(3)  # anything still to be (re)applied would show now
        m = w.metrics()
    finally:
        w.kill9()
    assert (g.denies(m), g.audits(m)) == (want.denies, want.audits)
    assert g.host_counts(m) == want.by_host
    for key, cnt in list(want.by_rule.items())[:10]:
        rule, gen = key.split("|")
        assert m[f'aegis_fleet_rule_denies{{generation="{gen}",rule="{rule}"}}'] == cnt
    assert m['aegis_fleet_duplicates_total{decision="deny"}'] == sum(repeats.values())
    assert m['aegis_fleet_duplicates_total{decision="audit"}'] == 0
    assert {h: v for (h, d), v in labelled(m, "aegis_fleet_host_duplicates").items()
            if d == "deny"} == dict(repeats)


# ------------------------------------------------------------------ the real sink
def decisions_batch(host: str, klass: str, start: int, count: int) -> SinkBatch:
    """``count`` decisions of ``host`` as the agent encodes them, event ids from a fixed
    boot id and a ktime 1 ms apart (deny and audit on their own clocks)."""
    lines = []
    for i in range(start, start + count):
        kt = 10**9 + i * 10**6
        ev = msgspec.structs.replace(
            g.decision(i, hosts=1, rules=3, t0=int(time.time()), rate=1000), host=host,
            decision=klass, ktime_ns=kt, event_id=f"b0000001-{kt}-{i % 7 + (0 if klass == 'deny' else 100)}")
        lines.append(_enc.encode(ev) + b"\n")
    return SinkBatch(klass, b"".join(lines), count)


async def stream_through_sinks(broker: LocalBroker, tmp_path: Path, disturb: Any) -> dict[str, Any]:
    """Two hosts write decisions through their own KafkaSink while ``disturb(broker)``
    (async) upsets the broker; returns what each wrote and its sink statistics."""
    from aegis_stream.fleet.sink import open_kafka_sink

    hosts = [f"dedup-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    # The audit count is exact only if no record's fate is unknown, and two waits could
    # leave one unknown on a loaded host (the cause of this test's rare failure):
    # * message.timeout.ms: a record librdkafka sent just before the kill and still holds
    #   when it expires fails "possibly persisted" (counted dropped, maybe on the topic).
    #   The sink's 60 s covers a restart on a quiet host (4.5 s), not always a loaded one
    #   (25-67 s measured here, 45.9 s in a run of this test);
    # * close_timeout_s: records not acked when the close's flush gives up (5 s) are
    #   counted sink/shutdown, though the broker may have written them.
    # Both are put out of reach: the test is about the accounting across the outage.
    sinks = {h: await open_kafka_sink(broker.bootstrap, host_key=h, spool_dir=tmp_path / h,
                                      ack_timeout_s=0.5, probe_min_s=0.1, probe_max_s=1.0,
                                      close_timeout_s=CLOSE_TIMEOUT_S,
                                      config={"message.timeout.ms": RECORD_TIMEOUT_MS})
             for h in hosts}
    written = {h: {"deny": 0, "audit": 0} for h in hosts}
    stop = trio.Event()

    async def stream(h: str) -> None:
        while not stop.is_set():
            await sinks[h].write(decisions_batch(h, "deny", written[h]["deny"], 10))
            written[h]["deny"] += 10
            await sinks[h].write(decisions_batch(h, "audit", written[h]["audit"], 20))
            written[h]["audit"] += 20
            await trio.sleep(0.02)

    try:
        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(stream, h)
            await trio.sleep(1.5)
            await disturb(broker, sinks)
            with trio.fail_after(120):  # back: the spools drain, in order
                while not all(s.up and s.spool.pending_batches == 0 for s in sinks.values()):
                    await trio.sleep(0.1)
            await trio.sleep(1.0)
            stop.set()
    finally:
        for s in sinks.values():
            await s.aclose()
    return {"written": written, "stats": {h: s.statistics() for h, s in sinks.items()}}


def _sink_run(broker: LocalBroker, tmp_path: Path, disturb: Any) -> tuple[dict[str, Any], dict[str, float],
                                                                           dict[str, dict[str, Counter]]]:
    w = g.WorkerProcess(broker.bootstrap, f"dedup-sink-{uuid.uuid4().hex[:8]}", free_port(),
                        data_dir=str(tmp_path / "w"), topics=(DECISION_TOPIC, STATE_TOPIC, FLEET_TOPIC),
                        log=str(tmp_path / "worker.log")).start()
    try:
        w.wait(lambda m: g.records(m) >= 0, 60, "metrics endpoint")
        run = trio.run(stream_through_sinks, broker, tmp_path, disturb)
        hosts = set(run["written"])
        on_topic: dict[str, dict[str, Counter]] = {h: {"deny": Counter(), "audit": Counter()} for h in hosts}
        for r in read_topic(broker.bootstrap, DECISION_TOPIC):
            h = r.key.decode(errors="replace")
            if h in hosts:
                on_topic[h][r.doc["decision"]][r.doc["event_id"]] += 1
        for h in hosts:  # the sink's order (the dedup relies on it): first copies in ktime order
            kts = [int(eid.split("-")[1]) for eid in on_topic[h]["deny"]]  # Counter keeps first-seen order
            assert kts == sorted(kts), f"{h}: the sink reordered its denies"

        def caught_up(m: dict[str, float]) -> bool:
            have = g.host_counts(m)
            dups = labelled(m, "aegis_fleet_host_duplicates")
            return all(have.get(h, [0, 0])[0] + dups.get((h, "deny"), 0) >= sum(on_topic[h]["deny"].values())
                       for h in hosts)

        try:
            w.wait(caught_up, 180, "the sinks' records absorbed")
        except (RuntimeError, TimeoutError) as exc:  # with the worker's own account
            tail = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{exc}; on the topic {on_topic and {h: {k: sum(c.values()) for k, c in v.items()} for h, v in on_topic.items()}}; worker log:\n{tail}") from None
        time.sleep(2)
        return run, w.metrics(), on_topic
    finally:
        w.stop()


def _check_exact(run: dict[str, Any], m: dict[str, float], on_topic: dict[str, dict[str, Counter]]) -> int:
    counts = g.host_counts(m)
    dups = labelled(m, "aegis_fleet_host_duplicates")
    repeats = 0
    for h, wrote in run["written"].items():
        deny = on_topic[h]["deny"]
        assert len(deny) == wrote["deny"], (h, run["stats"][h])  # 0 denies lost
        rep = sum(deny.values()) - len(deny)
        repeats += rep
        # the fleet counts each deny the agent delivered once, and every repeat as one
        assert counts[h][0] == wrote["deny"], (h, counts[h], wrote, rep)
        assert dups.get((h, "deny"), 0) == rep
        audit = on_topic[h]["audit"]
        assert counts[h][1] == len(audit)  # best effort: exactly what reached the topic
        assert wrote["audit"] - len(audit) == sum(run["stats"][h].dropped.values()), (h, run["stats"][h])
    return repeats


def test_sink_replay_after_a_stalled_broker_counted_once(kafka_broker, tmp_path):
    """A broker that stalls (SIGSTOP) past the sink's ack timeout: batches already
    produced are spooled and replayed, and librdkafka delivers the originals as well once
    the broker runs again, so denies are on the topic twice; the fleet counts them once."""
    async def stall(broker: LocalBroker, sinks: dict[str, Any]) -> None:
        pid = broker.pid()
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            with trio.fail_after(15):
                while any(s.up for s in sinks.values()):
                    await trio.sleep(0.05)
            await trio.sleep(1.5)
        finally:
            os.kill(pid, signal.SIGCONT)

    run, m, on_topic = _sink_run(kafka_broker, tmp_path, stall)
    repeats = _check_exact(run, m, on_topic)
    print(f"stalled broker: {repeats} deny repeats on the topic, each refused once")
    assert repeats > 0, "the stall produced no repeat: the dedup was not exercised"
    assert all(st.spooled > 0 for st in run["stats"].values())


def test_sink_broker_killed_and_restarted_counts_exact(kafka_broker, tmp_path):
    """The broker SIGKILLed mid-stream and restarted: the fleet's per-host deny counts
    equal the denies the sinks delivered, exactly (repeats, if the replay made any,
    counted as duplicates)."""
    async def kill_restart(broker: LocalBroker, sinks: dict[str, Any]) -> None:
        broker.kill()
        with trio.fail_after(15):
            while any(s.up for s in sinks.values()):
                await trio.sleep(0.05)
        await trio.sleep(1.5)
        t = time.monotonic()
        await trio.to_thread.run_sync(lambda: broker.restart(timeout=RESTART_TIMEOUT_S))
        print(f"broker restarted in {time.monotonic() - t:.1f} s")

    run, m, on_topic = _sink_run(kafka_broker, tmp_path, kill_restart)
    repeats = _check_exact(run, m, on_topic)
    print(f"broker SIGKILL: {repeats} deny repeats on the topic, each refused once")
    assert all(st.spooled > 0 for st in run["stats"].values())
