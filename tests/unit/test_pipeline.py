"""The trio pipeline end to end against the fake kernel (MockClock, autojump)."""

from __future__ import annotations

import msgspec
import pytest
import trio

from aegis_stream.kernel import abi
from aegis_stream.kernel.counters import MapCounterSource
from aegis_stream.kernel.events import RECORD_STRIDE, RawDecision, encode_raw
from aegis_stream.kernel.ringbuf import RawBatch
from aegis_stream.pipeline import DiskSpool, Pipeline
from aegis_stream.pipeline.schema import DecisionEvent, ExplanationEvent, StateEvent, event_decoder
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.processors.degraded import DegradedConfig
from aegis_stream.testing import (
    CG_APP,
    CG_OTHER,
    CG_ROOT,
    CG_WORKLOADS,
    DEV_SDA1,
    FakeTask,
    fixed_normaliser,
    install,
    make_events,
    sample_record,
)

APP = FakeTask(pid=4242, tgid=4242, comm="cat", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))
OTHER = FakeTask(pid=5000, tgid=5000, comm="cat", cgroups=(CG_ROOT, CG_OTHER))


@pytest.fixture
def ring_sizes():
    return 1 << 16, 1 << 14  # audit: 157 records fit, so a flood overflows at a known count


def decode_lines(sink: MemorySink) -> list:
    return [event_decoder.decode(line) for line in sink.lines]


async def test_decisions_flow_end_to_end_with_explanations(make_pipeline, kernel, store, tmp_path, autojump_clock):
    install(kernel, store, sample_record(7, mode="enforce"))
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, APP) == -1
        assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, OTHER) == 0  # out of scope
        assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 5678, abi.ACTION_OPEN, APP) == 0  # exec-only rule
        assert kernel.decide(abi.Hook.BPRM_CHECK, DEV_SDA1, 5678, abi.ACTION_EXEC, APP) == -1
        assert await p.drain_and_stop()
    evs = decode_lines(sink)
    decisions = [e for e in evs if isinstance(e, DecisionEvent)]
    explanations = [e for e in evs if isinstance(e, ExplanationEvent)]
    assert [(d.rule_id, d.hook, d.decision) for d in decisions] == [
        ("deny-shadow", "file_open", "deny"), ("deny-nc", "bprm_check_security", "deny")]
    assert decisions[0].cgroup_path == "/sys/fs/cgroup/workloads/app"
    assert decisions[0].policy_source == "/etc/aegis/policy.toml"
    assert [x.event_id for x in explanations] == [d.event_id for d in decisions]
    assert explanations[0].decision_path[-1] == "mode enforce -> EPERM" and explanations[0].consistent
    st = p.statistics()
    deny = st.classes["deny"]
    assert (deny.read, deny.delivered, deny.in_flight, deny.kernel_emitted) == (2, 2, 0, 2)
    assert st.mode == "enforce" and st.generation == 7 and st.state == "enforcing"
    assert st.derived_events["explanation"] == 2
    # exact per-rule counters in the (fake) kernel agree
    from aegis_stream.kernel.counters import read_rule_counters

    rules = read_rule_counters(kernel.maps(), kernel.ncpu)
    assert [(r["rule_id"], r["hook"], r["denied"]) for r in rules] == [
        (0, "file_open", 1), (1, "bprm_check_security", 1)]


async def test_slow_consumer_full_audit_ring_no_deny_lost_every_drop_counted(make_pipeline,
        kernel, store, tmp_path, autojump_clock):
    """The telemetry ring overflows (bursts larger than the ring, a slow sink): every deny
    arrives, in order; every lost audit event is counted, by stage and reason; the
    per-class sums add up, and the kernel's RINGBUF_FAIL equals the drops attributed."""
    sink = MemorySink(delay=0.02)  # a slow downstream
    p = make_pipeline(kernel, store, [sink], tmp_path, batch_max=64,
                      raw_channel_batches={"deny": 2, "audit": 2},
                      out_channel_batches={"deny": 1, "audit": 1})
    bursts = 60
    async with trio.open_nursery() as n:
        await n.start(p.run)
        for i in range(bursts):
            # 300 audit events into a 16 KiB ring (157 fit): the rest fail in the kernel
            kernel.emit_bulk("audit", make_events(300, start_ktime=i * 10**6), 300)
            kernel.emit_bulk("deny", make_events(20, decision=abi.Decision.DENY, start_ktime=i * 10**6), 20)
            await trio.sleep(0.005)
        assert await p.drain_and_stop(timeout=600)
    st = p.statistics()
    truth = kernel.truth
    deny, audit = st.classes["deny"], st.classes["audit"]
    # denies: none lost anywhere, in order, some went through the disk spool
    assert truth.ring_failed["deny"] == 0
    assert deny.delivered == truth.decisions["deny"] == bursts * 20
    assert deny.dropped == {} and deny.kernel_dropped == 0 and deny.in_flight == 0
    assert deny.spooled > 0 and st.spool.pending_events == 0
    lines = [msgspec.json.decode(x) for x in sink.lines]
    deny_kt = [d["ktime_ns"] for d in lines if d.get("schema") == "aegis.decision.v1" and d["decision"] == "deny"]
    assert deny_kt == sorted(deny_kt) and len(deny_kt) == bursts * 20
    # audit: emitted = delivered + kernel drops + userspace drops, per reason
    assert audit.kernel_dropped == truth.ring_failed["audit"] > 0
    assert audit.dropped_userspace > 0 and set(audit.dropped) == {("reader", "channel_full")}
    assert truth.decisions["audit"] == audit.kernel_emitted
    assert audit.kernel_emitted == audit.delivered + audit.kernel_dropped + audit.dropped_userspace
    assert audit.in_flight == 0 and audit.read == truth.written["audit"]
    assert sink.by_class["audit"] == audit.delivered and sink.by_class["deny"] == deny.delivered
    # the kernel's own counter agrees with the split by class
    snap = MapCounterSource(kernel.maps(), kernel.ncpu).read()
    assert snap.ringbuf_failures == deny.kernel_dropped + audit.kernel_dropped
    assert st.state in ("degraded", "blind")


async def test_spool_survives_a_forced_stop_and_is_replayed(make_pipeline, kernel, store, tmp_path, autojump_clock):
    sink = MemorySink()
    sink.fail_next = 10**9  # the sink is down: denies pile up
    p = make_pipeline(kernel, store, [sink], tmp_path, batch_max=32, shutdown_timeout_s=1.0,
                      raw_channel_batches={"deny": 1, "audit": 1},
                      out_channel_batches={"deny": 1, "audit": 1})
    async with trio.open_nursery() as n:
        await n.start(p.run)
        for i in range(10):
            kernel.emit_bulk("deny", make_events(40, decision=abi.Decision.DENY, start_ktime=i * 10**6), 40)
            await trio.sleep(0.01)
        await trio.sleep(1)
        assert not await p.drain(timeout=2)  # cannot: the sink keeps failing
        p.stop()
    st = p.statistics()
    assert st.classes["deny"].delivered == 0 and st.classes["deny"].dropped == {}
    assert st.spool.pending_events == 400  # everything read is parked on disk
    # the next run replays the spool first, in order
    sink2 = MemorySink()
    p2 = make_pipeline(kernel, store, [sink2], tmp_path)
    async with trio.open_nursery() as n:
        await n.start(p2.run)
        kernel.emit_bulk("deny", make_events(5, decision=abi.Decision.DENY, start_ktime=10**9), 5)
        assert await p2.drain_and_stop()
    kts = [msgspec.json.decode(x)["ktime_ns"] for x in sink2.lines if b'"aegis.decision.v1"' in x]
    assert len(kts) == 405 and kts == sorted(kts) and len(set(kts)) == 405  # no loss, no duplicate
    st2 = p2.statistics()
    assert st2.classes["deny"].delivered == 405 and st2.spool.recovered_events == 400


async def test_sink_failures_audit_dropped_deny_retried(make_pipeline, kernel, store, tmp_path, autojump_clock):
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path, sink_retry_initial_s=0.1)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        sink.fail_next = 1
        kernel.emit_bulk("audit", make_events(10), 10)
        await trio.sleep(0.5)
        sink.fail_next = 3
        kernel.emit_bulk("deny", make_events(4, decision=abi.Decision.DENY), 4)
        assert await p.drain_and_stop(timeout=10)
    st = p.statistics()
    assert st.classes["audit"].dropped == {("sink", "error"): 10}
    assert st.classes["audit"].delivered == 0
    assert st.classes["deny"].delivered == 4 and st.classes["deny"].dropped == {}
    (ss,) = st.sinks
    assert ss.failures == 4 and ss.failed_events >= 10 + 4  # (a state record may be among them)


async def test_audit_sampling_is_counted(make_pipeline, kernel, store, tmp_path, autojump_clock):
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path, audit_sample_n=4)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        for _ in range(5):
            kernel.emit_bulk("audit", make_events(100), 100)
            await trio.sleep(0.01)
        assert await p.drain_and_stop()
    audit = p.statistics().classes["audit"]
    assert audit.delivered == 125 and audit.dropped == {("reader", "sampled"): 375}
    assert audit.read == audit.delivered + audit.dropped_userspace


async def test_undecodable_records_are_counted(make_pipeline, kernel, store, tmp_path, autojump_clock):
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    bad = RawDecision(1, 0, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, "x")  # ABI 1: foreign
    async with trio.open_nursery() as n:
        await n.start(p.run)
        kernel.rings["audit"].output(encode_raw(make_decision(3)))
        kernel.rings["audit"].output(encode_raw(bad))
        kernel.rings["audit"].output(encode_raw(make_decision(4)))
        assert await p.drain_and_stop()
    audit = p.statistics().classes["audit"]
    assert audit.read == 3 and audit.delivered == 2
    assert audit.dropped == {("decode", "abi_mismatch"): 1}


async def test_records_that_are_not_events_are_counted_drops(make_pipeline, kernel, store, tmp_path, autojump_clock):
    """A discarded record and a record of another layout in the deny ring: the reader
    skips both, and each is a counted deny drop (read = delivered + dropped), not a
    silent gap between the ring and the sink."""
    install(kernel, store, sample_record(7, mode="enforce"))
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    ring = kernel.rings["deny"]
    async with trio.open_nursery() as n:
        await n.start(p.run)
        assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, APP) == -1
        pos = ring.reserve(96)
        assert pos is not None
        ring.commit(pos, discard=True)
        assert ring.output(b"x" * 40)
        assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, APP) == -1
        assert await p.drain_and_stop()
    deny = p.statistics().classes["deny"]
    assert (deny.read, deny.delivered, deny.in_flight) == (4, 2, 0)
    assert deny.dropped == {("reader", "discarded"): 1, ("reader", "foreign_record"): 1}


def make_decision(kt: int) -> RawDecision:
    return RawDecision(abi.ABI_VERSION, 0, 2, 0, 7, kt, CG_APP, CG_WORKLOADS, 1234, DEV_SDA1, 1, 4242, 4242, 0, 0, 0, 1,
                       "cat")


async def test_state_changes_are_events_and_callbacks(make_pipeline, kernel, store, tmp_path, autojump_clock):
    install(kernel, store, sample_record(7, mode="audit"))
    sink = MemorySink()
    seen: list[StateEvent] = []
    p = make_pipeline(kernel, store, [sink], tmp_path, tick_s=1.0, degraded=DegradedConfig(recover_s=10),
                      on_state=seen.append)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(2)
        kernel.attached.discard("mmap_file")
        await trio.sleep(2)
        kernel.attached.add("mmap_file")
        await trio.sleep(5)
        assert p.statistics().state == "degraded"  # hysteresis: not yet
        await trio.sleep(10)
        p.stop()
    states = [(e.previous, e.state) for e in seen]
    assert states == [("", "auditing"), ("auditing", "degraded"), ("degraded", "auditing")]
    n = len(abi.Hook)
    assert seen[1].reasons == [f"hooks {n - 1}/{n} attached (missing mmap_file)"]
    assert seen[1].hooks_attached == [h for h in kernel.EXPECTED_HOOKS if h != "mmap_file"]
    written = [e for e in decode_lines(sink) if isinstance(e, StateEvent)]
    assert written == seen


async def test_state_callback_failures_are_logged_counted_and_the_ticker_goes_on(
        make_pipeline, kernel, store, tmp_path, autojump_clock, capsys):
    """on_state writes the agent's status file: an OSError there (a full disk) and any
    other exception (a bug in the callback) are each logged and counted, and neither
    stops the ticker: the next state change is still seen, every state event is written."""
    install(kernel, store, sample_record(7, mode="audit"))
    sink = MemorySink()
    raised: list[BaseException] = [OSError(28, "No space left on device"), RuntimeError("bug")]

    def on_state(ev: StateEvent) -> None:
        raise raised.pop(0)

    p = make_pipeline(kernel, store, [sink], tmp_path, tick_s=1.0, on_state=on_state)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(2)  # "" -> auditing: the OSError
        kernel.attached.discard("mmap_file")
        await trio.sleep(2)  # auditing -> degraded: the RuntimeError
        p.stop()
    assert raised == []
    assert p.statistics().state_callback_failures == 2
    written = [(e.previous, e.state) for e in decode_lines(sink) if isinstance(e, StateEvent)]
    assert written == [("", "auditing"), ("auditing", "degraded")]
    err = capsys.readouterr().err
    assert "aegis: state callback failed: [Errno 28] No space left on device" in err
    assert "aegis: state callback raised (a bug): RuntimeError('bug')" in err


async def test_slo_burn_alert_fires_and_resolves(make_pipeline, kernel, store, tmp_path, autojump_clock):
    from aegis_stream.processors.slo import AlertRule, SloConfig

    sink = MemorySink(keep=True)
    p = make_pipeline(kernel, store, [sink], tmp_path, tick_s=5.0,
                      slo=SloConfig(objective=0.001, bucket_s=5,
                                    alerts=[AlertRule(name="page", long_s=600, short_s=60, burn=14.4)]))
    async with trio.open_nursery() as n:
        await n.start(p.run)
        for i in range(150):  # 12.5 min of 2x overflowing bursts (~50% kernel drops)
            kernel.emit_bulk("audit", make_events(300, start_ktime=i), 300)
            await trio.sleep(5)
        st = p.statistics()
        assert st.alerts_firing[("audit", "page")] and not st.alerts_firing[("deny", "page")]
        assert st.burn_rates[("audit", "10m")] > 14.4
        for _ in range(30):  # clean traffic: the short window clears
            kernel.emit_bulk("audit", make_events(50), 50)
            await trio.sleep(5)
        p.stop()
    slo = [msgspec.json.decode(x) for x in sink.lines if b'"aegis.slo.v1"' in x]
    assert [(e["event_class"], e["alert"], e["status"]) for e in slo] == [
        ("audit", "page", "firing"), ("audit", "page", "resolved")]
    assert slo[0]["burn_long"] >= 14.4 and slo[0]["burn_short"] >= 14.4


def test_disk_spool_bound_and_torn_tail(tmp_path):
    sp = DiskSpool(tmp_path, max_bytes=3 * (8 + 2 * RECORD_STRIDE))
    b = RawBatch(bytes(range(256)) * 0 + b"\x01" * (2 * RECORD_STRIDE), 2)
    assert sp.append(b) and sp.append(b) and sp.append(b)
    assert not sp.append(b) and sp.full == 1
    assert sp.append(b, force=True)
    sp.close()
    with open(tmp_path / "deny.spool", "ab") as fh:
        fh.write(b"\x05\x00\x00\x00torn")
    sp2 = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert sp2.recovered == 8 and sp2.pending_batches == 4
    for _ in range(4):
        assert sp2.peek() == b
        sp2.pop()
    assert (tmp_path / "deny.spool").stat().st_size == 0
    sp2.close()


async def test_serve_pipeline_exit_after_drains_what_the_kernel_produced(kernel, store, tmp_path,
                                                                        autojump_clock):
    from aegis_stream.agent.run import AgentConfig, serve_pipeline

    cfg = AgentConfig(events="-", spool_dir=str(tmp_path / "spool"), audit_sample_n=2, tick_s=0.5)
    pc = cfg.pipeline_config()
    assert pc.audit_sample_n == 2 and pc.spool_dir == str(tmp_path / "spool")
    assert pc.slo.objective == 0.001 and pc.slo.alerts[0].burn == 14.4
    sink = MemorySink()
    p = Pipeline(kernel.consumers(), fixed_normaliser(store), [sink], kernel.view(), config=pc)
    kernel.emit_bulk("deny", make_events(7, decision=abi.Decision.DENY), 7)
    await serve_pipeline(p, exit_after=1.0, signals=False)
    assert p.statistics().classes["deny"].delivered == 7
    assert sink.by_class["deny"] == 7


def test_heap_is_trimmed_once_after_a_burst_has_drained(make_pipeline, kernel, store, tmp_path, monkeypatch):
    """A burst (more than one batch in flight) leaves glibc holding the freed batches;
    the ticker trims once when it has drained to a trickle (a quarter batch or less), not
    while a backlog is still in flight or when no burst happened (a trim walks the heap:
    not every tick)."""
    import aegis_stream.pipeline.ticker as pl

    calls: list[int] = []
    monkeypatch.setattr(pl, "release_freed_memory", lambda: calls.append(1) or True)
    p = make_pipeline(kernel, store, [MemorySink()], tmp_path, batch_max=16, spool_dir=None)
    audit = p.acct["audit"]
    p.ticker.trim_after_burst()
    assert calls == []  # idle, no burst
    audit.read += 10
    p.ticker.trim_after_burst()
    assert calls == []  # in flight, but within one batch: no burst
    audit.delivered += 10
    p.ticker.trim_after_burst()
    assert calls == []
    audit.read += 40  # a burst: 40 > batch_max in flight
    p.ticker.trim_after_burst()
    audit.delivered += 30
    p.ticker.trim_after_burst()
    assert calls == []  # still 10 in flight
    audit.delivered += 10
    p.ticker.trim_after_burst()
    p.ticker.trim_after_burst()
    assert (calls, p.memory_trims) == ([1], 1)
    # a burst that drains into a steady trickle (never zero in flight): trimmed once the
    # backlog is a quarter batch or less, not when the trickle happens to pause
    audit.read += 50
    p.ticker.trim_after_burst()
    audit.delivered += 47  # 3 in flight, new ones keep arriving
    p.ticker.trim_after_burst()
    audit.read += 2
    audit.delivered += 2
    p.ticker.trim_after_burst()
    assert (calls, p.memory_trims) == ([1, 1], 2)


def test_heap_is_trimmed_after_a_burst_the_agent_kept_up_with(make_pipeline, kernel, store, tmp_path,
                                                               monkeypatch):
    """A flood the agent keeps up with never has a batch in flight when the tick looks,
    but it read many batches (each allocated and freed): a burst all the same, trimmed
    once the reads per tick are back to a trickle, and not while they stay high."""
    import aegis_stream.pipeline.ticker as pl

    calls: list[int] = []
    monkeypatch.setattr(pl, "release_freed_memory", lambda: calls.append(1) or True)
    p = make_pipeline(kernel, store, [MemorySink()], tmp_path, batch_max=16, spool_dir=None)
    audit = p.acct["audit"]
    p.ticker.trim_after_burst()
    for _ in range(5):  # 100 events a tick, all delivered before the tick looks
        audit.read += 100
        audit.delivered += 100
        p.ticker.trim_after_burst()
    assert calls == []  # still flooding
    audit.read += 10  # 10 read in this tick: more than a quarter batch (4): not yet a trickle
    audit.delivered += 10
    p.ticker.trim_after_burst()
    assert calls == []
    audit.read += 3
    audit.delivered += 2
    p.ticker.trim_after_burst()
    p.ticker.trim_after_burst()
    assert (calls, p.memory_trims) == ([1], 1)


def test_release_freed_memory_returns_heap_to_the_kernel():
    """The real glibc call: after freeing many mid-sized blocks (as a flood's batches),
    a trim succeeds (returns True: memory given back)."""
    from aegis_stream.pipeline.memtrim import malloc_trim, release_freed_memory

    if malloc_trim() is None:
        pytest.skip("not glibc")
    blocks = [bytes(1000) * 5 for _ in range(4_000)]  # 20 MB of 5 kB blocks on the main heap
    keep = blocks[-1]
    del blocks
    assert release_freed_memory() is True
    assert keep


async def test_policy_swaps_retire_old_generations_from_the_normaliser_caches(make_pipeline,
        kernel, store, tmp_path, autojump_clock):
    """Swap after swap, the caches hold the active generation and the one it replaced, not
    one context and one rule table per generation ever applied (the soak's slow RSS climb);
    every deny is still normalised with its own generation's rule."""
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    gens = range(7, 27)
    held = []
    async with trio.open_nursery() as n:
        install(kernel, store, sample_record(gens[0], mode="enforce"))
        await n.start(p.run)
        for g in gens:
            if g != gens[0]:
                install(kernel, store, sample_record(g, mode="enforce"))
            assert kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, APP) == -1
            assert kernel.decide(abi.Hook.BPRM_CHECK, DEV_SDA1, 5678, abi.ACTION_EXEC, APP) == -1
            await trio.sleep(1.2)  # two ticks: the swap is seen, the denies are drained
            sizes = {c.name: c.size for c in p.norm.cache_statistics()}
            held.append((sizes["context"] + sizes["context_ref"], sizes["generation"]))
        assert await p.drain_and_stop()
    decisions = [e for e in decode_lines(sink) if isinstance(e, DecisionEvent)]
    assert [(d.generation, d.rule_id) for d in decisions] == [
        (g, r) for g in gens for r in ("deny-shadow", "deny-nc")]
    # two contexts per generation (one per hook), at most two generations cached
    assert max(c for c, _ in held) <= 4 and max(g for _, g in held) <= 2, held


async def test_state_heartbeat_carries_the_slo_totals(make_pipeline, kernel, store, tmp_path, autojump_clock):
    """Without a state change the agent still writes its state every state_heartbeat_s
    (marked heartbeat), with the cumulative per-class totals a fleet consumer's SLO needs:
    emitted = the kernel's decisions, dropped = kernel ring failures + userspace drops."""
    install(kernel, store, sample_record(7, mode="enforce"))
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path, tick_s=1.0, state_heartbeat_s=10.0)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        # 300 audit events into the small test ring: some fail in the kernel (counted drops)
        kernel.emit_bulk("audit", make_events(300), 300)
        kernel.emit_bulk("deny", make_events(5, decision=abi.Decision.DENY), 5)
        await trio.sleep(35)
        p.stop()
    states = [event_decoder.decode(x) for x in sink.lines]
    states = [e for e in states if isinstance(e, StateEvent)]
    # changes as they happen (enforcing, then degraded by the audit drops), then a beat
    # every 10 s repeating the state in force
    changes = [e.state for e in states if not e.heartbeat]
    beats = [e for e in states if e.heartbeat]
    assert changes == ["enforcing", "degraded"]
    assert len(beats) == 3 and all(b.state == b.previous == "degraded" for b in beats)
    assert beats[0].reason_codes == ["audit_drops"]
    st = p.statistics().classes
    last = beats[-1]
    assert last.emitted_total == {"deny": 5, "audit": 300}
    assert last.emitted_total["audit"] == st["audit"].kernel_emitted
    assert last.dropped_total["audit"] == st["audit"].kernel_dropped + st["audit"].dropped_userspace > 0
    assert last.dropped_total["deny"] == 0


async def test_state_heartbeat_off(make_pipeline, kernel, store, tmp_path, autojump_clock):
    install(kernel, store, sample_record(7, mode="enforce"))
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path, tick_s=1.0, state_heartbeat_s=0)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(35)
        p.stop()
    states = [e for e in map(event_decoder.decode, sink.lines) if isinstance(e, StateEvent)]
    assert len(states) == 1 and not states[0].heartbeat
