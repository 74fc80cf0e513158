"""Shutdown accounting: stop the pipeline in the middle of a flood and check, per class,
against the fake kernel's truth, that every decision is accounted exactly:

    decisions = delivered + dropped (userspace, by stage/reason) + kernel_dropped
                + backlog (left in the ring) + denies kept in the spool

with nothing "in flight" left over (pytest-trio, MockClock with autojump)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from aegis_stream.kernel import abi
from aegis_stream.kernel.counters import CounterSnapshot
from aegis_stream.pipeline import Pipeline, PipelineConfig, PipelineStatistics
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.testing import FakeKernel, fixed_normaliser, make_events


@dataclass
class TruthAtTick:
    """A KernelView that remembers the fake kernel's truth each time the pipeline reads
    the counters (the ticker reads counters, then ring positions, synchronously: the
    last copy is the truth that the final statistics describe)."""

    kernel: FakeKernel
    decisions: dict[str, int] = field(default_factory=dict)
    ring_failed: dict[str, int] = field(default_factory=dict)
    #: records written into each ring so far (the ring's content = written - read)
    written: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inner = self.kernel.view()

    def counters(self) -> CounterSnapshot:
        self.decisions = dict(self.kernel.truth.decisions)
        self.ring_failed = dict(self.kernel.truth.ring_failed)
        self.written = dict(self.kernel.truth.written)
        return self.inner.counters()

    def attach_state(self) -> Any:
        return self.inner.attach_state()

    def policy_state(self) -> tuple[str, int]:
        return self.inner.policy_state()


def make(kernel, store, tmp_path, sinks, *, spool: bool = True, **cfg) -> tuple[Pipeline, TruthAtTick]:
    view = TruthAtTick(kernel)
    cfg.setdefault("tick_s", 0.5)
    cfg.setdefault("batch_max", 64)
    cfg.setdefault("raw_channel_batches", {"deny": 2, "audit": 4})
    cfg.setdefault("out_channel_batches", {"deny": 2, "audit": 4})
    cfg.setdefault("shutdown_timeout_s", 0.3)
    p = Pipeline(kernel.consumers(), fixed_normaliser(store), sinks, view,
                 config=PipelineConfig(spool_dir=str(tmp_path / "spool") if spool else None, **cfg))
    return p, view


async def flood(kernel: FakeKernel, until: trio.Event, *, deny: int = 8, audit: int = 200) -> None:
    """Bursts every 2 ms until ``until`` is set (and one more after it: the kernel does
    not stop when the agent does)."""
    i = 0
    while True:
        kernel.emit_bulk("audit", make_events(audit, start_ktime=i * 10**6), audit)
        if deny:
            kernel.emit_bulk("deny", make_events(deny, decision=abi.Decision.DENY,
                                                 start_ktime=i * 10**6), deny)
        i += 1
        if until.is_set():
            return
        await trio.sleep(0.002)


def check_exact(st: PipelineStatistics, view: TruthAtTick, sink: MemorySink, p: Pipeline) -> None:
    for k in ("deny", "audit"):
        c = st.classes[k]
        kept = st.spool.pending_events if k == "deny" else 0
        assert c.kernel_emitted == view.decisions[k], k
        assert c.kernel_dropped == view.ring_failed[k], k
        # nothing read is unaccounted: delivered, dropped (counted) or kept in the spool
        assert c.in_flight == kept, (k, c)
        assert c.read == c.delivered + c.dropped_userspace + kept, (k, c)
        assert (c.kernel_emitted
                == c.delivered + c.dropped_userspace + c.kernel_dropped + c.backlog + kept), (k, c)
        assert sink.by_class.get(k, 0) == c.delivered, k
    # the ring backlog is what is really left in the ring (not read, not lost): the ring
    # now holds it plus what the kernel wrote after the last tick (flood() emits once more
    # after the stop; it lands when the agent kept up, fails when the ring was full)
    for k, ring in p.rings.items():
        after = view.kernel.truth.written[k] - view.written[k]
        assert st.classes[k].backlog * 104 + after * 104 == ring.available_bytes(), k


@pytest.mark.parametrize("stop_after", [0.013, 0.05, 0.2, 0.71])
async def test_drain_timeout_mid_flood_is_counted_exactly(kernel, store, tmp_path, autojump_clock,
                                                          stop_after):
    sink = MemorySink(delay=0.01, keep=False)  # slower than the flood: work piles up
    p, view = make(kernel, store, tmp_path, [sink])
    done = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(p.run)
        n.start_soon(flood, kernel, done)
        await trio.sleep(stop_after)
        ok = await p.drain_and_stop(timeout=0.05)  # the flood goes on: cannot drain
        done.set()
    assert not ok
    st = p.statistics()
    check_exact(st, view, sink, p)
    audit, deny = st.classes["audit"], st.classes["deny"]
    assert audit.dropped.get(("shutdown", "drain_timeout"), 0) > 0
    assert ("shutdown", "stopped") not in audit.dropped
    assert deny.dropped == {}  # denies in hand went to the spool, not lost
    assert st.spool.pending_events > 0


async def test_drain_completes_when_the_flood_stops(kernel, store, tmp_path, autojump_clock):
    sink = MemorySink(delay=0.001, keep=False)
    p, view = make(kernel, store, tmp_path, [sink], shutdown_timeout_s=5.0)
    done = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(p.run)
        n.start_soon(flood, kernel, done)
        await trio.sleep(0.3)
        done.set()
        assert await p.drain_and_stop(timeout=30)
    st = p.statistics()
    check_exact(st, view, sink, p)
    for k in ("deny", "audit"):
        c = st.classes[k]
        assert not any(s == "shutdown" for s, _ in c.dropped), c.dropped
        assert c.backlog == 0
    assert st.spool.pending_events == 0


async def test_without_spool_denies_in_hand_are_counted(kernel, store, tmp_path, autojump_clock):
    sink = MemorySink(delay=0.01, keep=False)
    p, view = make(kernel, store, tmp_path, [sink], spool=False)
    done = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(p.run)
        n.start_soon(functools.partial(flood, kernel, done, deny=60, audit=100))
        await trio.sleep(0.1)
        assert not await p.drain_and_stop(timeout=0.05)
        done.set()
    st = p.statistics()
    check_exact(st, view, sink, p)
    assert st.classes["deny"].dropped.get(("shutdown", "drain_timeout"), 0) > 0


async def test_cancelled_run_counts_what_it_held(kernel, store, tmp_path, autojump_clock):
    """run() cancelled from outside (no drain): the in-hand audit events are counted
    ``shutdown/stopped``; denies still go to the spool."""
    sink = MemorySink(delay=0.01, keep=False)
    p, view = make(kernel, store, tmp_path, [sink])
    done = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(p.run)
        n.start_soon(flood, kernel, done)
        await trio.sleep(0.1)
        done.set()
        await trio.sleep(0.0021)
        n.cancel_scope.cancel()
    st = p.statistics()
    check_exact(st, view, sink, p)
    assert st.classes["audit"].dropped.get(("shutdown", "stopped"), 0) > 0
    assert st.classes["deny"].dropped == {}


async def test_agent_serve_pipeline_stop_mid_flood_is_exact(kernel, store, tmp_path, autojump_clock):
    """The agent's own stop path (serve_pipeline: drain_and_stop, then cancel)."""
    from aegis_stream.agent.run import serve_pipeline

    sink = MemorySink(delay=0.01, keep=False)
    p, view = make(kernel, store, tmp_path, [sink])
    done = trio.Event()
    async with trio.open_nursery() as n:
        n.start_soon(flood, kernel, done)
        await serve_pipeline(p, exit_after=0.3, signals=False, drain_timeout=0.05)
        done.set()
    st = p.statistics()
    check_exact(st, view, sink, p)
    assert st.classes["audit"].dropped.get(("shutdown", "drain_timeout"), 0) > 0


async def test_spool_replay_after_a_drain_timeout_keeps_the_deny_totals(kernel, store, tmp_path,
                                                                        autojump_clock):
    """Denies kept in the spool (and left in the ring) at a stop are delivered by the
    next run: across the two runs every deny the kernel wrote is delivered once."""
    sink = MemorySink(delay=0.01)
    p, _ = make(kernel, store, tmp_path, [sink])
    done = trio.Event()
    async with trio.open_nursery() as n:
        await n.start(p.run)
        n.start_soon(functools.partial(flood, kernel, done, deny=40, audit=0))
        await trio.sleep(0.1)
        assert not await p.drain_and_stop(timeout=0.02)
        done.set()
    kept = p.statistics().spool.pending_events
    assert kept > 0
    sink2 = MemorySink()
    p2, _ = make(kernel, store, tmp_path, [sink2])
    async with trio.open_nursery() as n:
        await n.start(p2.run)
        assert await p2.drain_and_stop(timeout=60)
    written = kernel.truth.written["deny"]
    assert written > kept  # some were still in the ring: the next run read them too
    d1, d2 = p.statistics().classes["deny"], p2.statistics().classes["deny"]
    assert d1.delivered + d2.delivered == written
    assert d2.dropped == {} and d2.in_flight == 0
    assert sink.by_class["deny"] + sink2.by_class["deny"] == written


def test_spool_close_cuts_off_replayed_frames(tmp_path):
    """A spool closed with frames already replayed at its head (the file is only
    truncated when it empties) must not hand them to the next run again."""
    from aegis_stream.kernel.ringbuf import RawBatch
    from aegis_stream.pipeline import DiskSpool

    sp = DiskSpool(tmp_path, max_bytes=1 << 20)
    batches = [RawBatch(bytes([i]) * (2 * 104), 2) for i in range(3)]
    for b in batches:
        assert sp.append(b)
    assert sp.peek() == batches[0]
    sp.pop()
    sp.close()
    sp2 = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert sp2.recovered == 4 and sp2.pending_batches == 2
    assert sp2.peek() == batches[1]
    sp2.close()


class DecisionBetweenReads(TruthAtTick):
    """The first counter read returns its snapshot and then a deny lands in the ring:
    the race between the start-up reads of counters and ring positions."""

    first = True

    def counters(self) -> CounterSnapshot:
        snap = super().counters()
        if self.first:
            self.first = False
            self.kernel.emit_bulk("deny", make_events(1, decision=abi.Decision.DENY), 1)
        return snap


async def test_start_under_load_reports_no_phantom_deny_loss(kernel, store, tmp_path, autojump_clock):
    # a previous incarnation left denies in the pinned ring, and one more lands while the
    # new agent takes its baseline: nothing was lost, so nothing may be reported lost
    kernel.emit_bulk("deny", make_events(3, decision=abi.Decision.DENY), 3)
    sink = MemorySink(keep=False)
    view = DecisionBetweenReads(kernel)
    p = Pipeline(kernel.consumers(), fixed_normaliser(store), [sink], view,
                 config=PipelineConfig(spool_dir=str(tmp_path / "spool"), tick_s=0.5))
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(2.0)
        assert await p.drain_and_stop(timeout=5)
    st = p.statistics()
    deny = st.classes["deny"]
    assert deny.kernel_dropped == 0 and deny.dropped_userspace == 0
    assert deny.delivered == 4 == sink.by_class["deny"]
    assert st.state != "blind", st.reasons


async def test_sigterm_during_a_slow_start_waits_and_stops_cleanly(kernel, store, tmp_path):
    """A SIGTERM that arrives while a background task is still starting (a Kafka sink's
    probe takes minutes under TCG) is held by the receiver serve_pipeline opened first, and
    stops the agent once it runs; a second SIGTERM during the drain is absorbed.  Before,
    the receiver opened last and the default action killed the agent (6.12 CI: -15)."""
    import os
    import signal

    from aegis_stream.agent.run import serve_pipeline

    sink = MemorySink(keep=False)
    p, _ = make(kernel, store, tmp_path, [sink])
    stopping: list[int] = []

    async def slow_start(task_status=trio.TASK_STATUS_IGNORED) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # while this task has not said it runs
        await trio.sleep(0.2)
        task_status.started()
        await trio.sleep_forever()

    def on_stopping() -> None:
        stopping.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # systemd's or an impatient operator's repeat

    with trio.fail_after(10):
        await serve_pipeline(p, signals=True, drain_timeout=0.05, background=[slow_start],
                             stopping=on_stopping)
    assert stopping == [1]
