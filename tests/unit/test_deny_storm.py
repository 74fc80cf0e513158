"""Deny storms (bpf/storm.bpf.h, aegis_stream/kernel/storms.py, aegis_stream/pipeline/storms.py)
against the fake kernel, whose decide() aggregates as the BPF program does: the first
decision of a key is an event, repeats within the window are counted, summaries report
each count once (across ticks and agent restarts), and the ledger adds up exactly."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
import trio

from aegis_stream.agent import config as agent_file
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.storms import StormDelta, StormKey, StormTable
from aegis_stream.pipeline import Pipeline, PipelineConfig
from aegis_stream.pipeline.metrics import AegisMetrics
from aegis_stream.pipeline.schema import DecisionEvent, StormEvent, event_decoder
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.pipeline.storms import StormReporter, reporter_for
from aegis_stream.testing import (
    CG_APP,
    CG_ROOT,
    CG_WORKLOADS,
    DEV_SDA1,
    FakeKernel,
    FakeTask,
    fixed_normaliser,
    install,
    sample_record,
)

S = 1_000_000_000
APP = FakeTask(pid=4242, tgid=4242, comm="cat", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))
APP2 = FakeTask(pid=4343, tgid=4343, comm="cat", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))


class Clock:
    """The fake kernel's ktime (ns), moved by the test."""

    def __init__(self) -> None:
        self.ns = 100 * S

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fk(clock, store):
    k = FakeKernel(ktime_ns=clock)
    install(k, store, sample_record(7, mode="enforce"))
    yield k
    k.close()


def deny(k: FakeKernel, task: FakeTask = APP, ino: int = 1234) -> int:
    return k.decide(abi.Hook.FILE_OPEN, DEV_SDA1, ino, abi.ACTION_OPEN, task)


def deny_events(k: FakeKernel) -> int:
    return len(k.rings["deny"].consumer().drain(1 << 20))


def hook_counter(k: FakeKernel, ctr: abi.Counter) -> int:
    return sum(k.counters.values[abi.Hook.FILE_OPEN * abi.COUNTERS_PER_HOOK + ctr])


def test_window_zero_is_off_every_deny_is_an_event(fk):
    for _ in range(5):
        assert deny(fk) == -1
    assert deny_events(fk) == 5
    assert fk.storms.keys() == []
    assert hook_counter(fk, abi.Counter.SUPPRESSED) == 0


def test_repeats_within_the_window_are_counted_not_events(fk, clock):
    slots.set_storm_window(fk.policy_maps, 10 * S)
    for _ in range(100):
        assert deny(fk) == -1  # the decision is made every time
        clock.ns += 1000
    assert deny(fk, APP2) == -1  # another process: its own key, its own event
    assert deny(fk, ino=9012) == -1  # another rule: its own event
    assert deny_events(fk) == 3
    assert hook_counter(fk, abi.Counter.DENIED) == 102
    assert hook_counter(fk, abi.Counter.SUPPRESSED) == 99
    counts = fk.storm_table().counts()
    assert counts.suppressed == {"deny": 99, "audit": 0} and counts.untracked == {"deny": 0, "audit": 0}
    # the window expires: the next one is an event again and opens a new window
    clock.ns += 10 * S
    deny(fk)
    deny(fk)
    assert deny_events(fk) == 1
    assert hook_counter(fk, abi.Counter.SUPPRESSED) == 100


def test_map_full_means_an_event_and_a_count(fk):
    slots.set_storm_window(fk.policy_maps, 10 * S)
    fk.storms.max_entries = 1
    deny(fk)
    deny(fk, APP2)  # no room for its key: an event, counted untracked
    deny(fk, APP2)
    assert deny_events(fk) == 3
    assert fk.storm_table().counts().untracked == {"deny": 2, "audit": 0}


def test_activate_keeps_the_window_and_bad_windows_are_refused(fk, store):
    slots.set_storm_window(fk.policy_maps, 3 * S)
    install(fk, store, sample_record(8, mode="enforce"))  # stage + activate
    assert slots.storm_window_ns(fk.policy_maps) == 3 * S
    assert slots.read_state(fk.policy_maps).active.generation == 8
    with pytest.raises(ValueError, match="out of range"):
        slots.set_storm_window(fk.policy_maps, -1)
    assert slots.storm_window_ns(fk.policy_maps) == 3 * S


def test_each_count_is_reported_once_across_ticks_and_restarts(fk, clock):
    slots.set_storm_window(fk.policy_maps, 10 * S)
    for _ in range(10):
        deny(fk)
    t = fk.storm_table()
    (d,) = t.scan()
    assert (d.key.tgid, d.key.generation, d.key.rule_id, d.key.klass, d.suppressed, d.total) == (
        4242, 7, 0, "deny", 9, 9)
    t.commit([d])
    assert t.scan() == []  # nothing new: nothing to report
    for _ in range(5):
        deny(fk)
    (d,) = t.scan()
    assert (d.suppressed, d.total) == (5, 14)
    t.commit([d])
    # a restarted agent reads what was reported from the pinned map: no double report
    t2 = fk.storm_table()
    assert t2.scan() == []
    deny(fk)
    assert [x.suppressed for x in t2.scan()] == [1]


def test_prune_deletes_only_fully_reported_keys_that_cannot_grow(fk, clock, store):
    slots.set_storm_window(fk.policy_maps, 1 * S)
    alive = {4242}
    t = fk.storm_table(alive=lambda tgid: tgid in alive)
    for task in (APP, APP2):
        deny(fk, task)
        deny(fk, task)
    clock.ns += 5 * S  # both keys idle for more than two windows
    deltas = t.scan()
    assert len(deltas) == 2
    # not yet reported: kept
    assert t.prune({7}, 1 * S).deleted == 0
    t.commit(deltas)
    res = t.prune({7}, 1 * S)
    assert res.deleted == 1  # APP2's process is gone; APP's is alive
    assert [abi.STORM_KEY.unpack(k)[4] for k in fk.storms.keys()] == [4242]
    assert [abi.STORM_KEY.unpack(k)[4] for k in fk.storm_reported.keys()] == [4242]
    # generation 7 retired (neither slot holds it): its keys go once reported
    install(fk, store, sample_record(8, mode="enforce"))
    install(fk, store, sample_record(9, mode="enforce"))
    t.scan()
    assert t.prune({8, 9}, 1 * S).retired == 1
    assert fk.storms.keys() == [] and fk.storm_reported.keys() == []


def test_a_key_that_moved_since_the_scan_is_not_deleted(fk, clock):
    slots.set_storm_window(fk.policy_maps, 1 * S)
    t = fk.storm_table(alive=lambda tgid: False)
    deny(fk)
    clock.ns += 5 * S
    t.commit(t.scan())
    deny(fk)  # reopens the window (an event) after the scan: the key is live again
    assert t.prune({7}, 1 * S).skipped == 1
    assert len(fk.storms.keys()) == 1


def test_a_new_element_under_a_deleted_key_counts_from_zero(fk, clock):
    slots.set_storm_window(fk.policy_maps, 1 * S)
    t = fk.storm_table(alive=lambda tgid: False)
    for _ in range(4):
        deny(fk)
    clock.ns += 5 * S
    t.commit(t.scan())
    assert t.prune({7}, 1 * S).deleted == 1
    for _ in range(3):
        deny(fk)  # the key again: a new element (new first_ns)
    assert [d.suppressed for d in t.scan()] == [2]


def test_config_refuses_a_negative_window():
    with pytest.raises(agent_file.ConfigError, match="storm_window_s"):
        agent_file.merge(agent_file.AgentFile(), {"storm_window_s": -1})
    assert agent_file.decode("storm_window_s = 2.5").storm_window_s == 2.5
    assert agent_file.AgentFile().storm_window_s == agent_file.DEFAULT_STORM_WINDOW_S


async def test_pipeline_summaries_and_events_add_up_to_the_kernel_decisions(fk, clock, store, tmp_path,
                                                                         autojump_clock):
    slots.set_storm_window(fk.policy_maps, 2 * S)
    sink = MemorySink()
    norm = fixed_normaliser(store)
    storms = reporter_for(fk.maps(), fk.policy_maps, norm, fk.ncpu, clock_ns=clock)
    p = Pipeline(fk.consumers(), norm, [sink], fk.view(), storms=storms,
                 config=PipelineConfig(spool_dir=str(tmp_path / "spool"), tick_s=0.5))
    tasks = [FakeTask(pid=5000 + i, tgid=5000 + i, comm="cat", cgroups=APP.cgroups) for i in range(20)]
    async with trio.open_nursery() as n:
        await n.start(p.run)
        for _round in range(30):
            for t in tasks:
                for _ in range(10):
                    assert deny(fk, t) == -1
                    clock.ns += 100_000
            await trio.sleep(0.3)
        assert deny(fk, APP, ino=9012) == -1  # another deny during the flood: its own event
        await trio.sleep(1.5)  # a tick reports the last counts
        assert await p.drain_and_stop()
    evs = [event_decoder.decode(x) for x in sink.lines]
    decisions = [e for e in evs if isinstance(e, DecisionEvent)]
    summaries = [e for e in evs if isinstance(e, StormEvent)]
    assert fk.truth.decisions["deny"] == 20 * 10 * 30 + 1
    assert len(decisions) + sum(s.suppressed for s in summaries) == fk.truth.decisions["deny"]
    assert {(d.pid, d.rule_id) for d in decisions} == {(t.tgid, "deny-shadow") for t in tasks} | {
        (4242, "deny-100%\"odd\"")}
    assert len({s.event_id for s in summaries}) == len(summaries)
    s0 = summaries[0]
    assert (s0.rule_id, s0.hook, s0.decision, s0.generation, s0.cgroup_path, s0.window_s) == (
        "deny-shadow", "file_open", "deny", 7, "/sys/fs/cgroup/workloads/app", 2.0)
    st = p.statistics()
    assert st.classes["deny"].kernel_dropped == 0 and st.classes["deny"].dropped_total == 0
    assert st.classes["deny"].kernel_emitted == len(decisions)
    assert st.storms is not None and st.storms.reported == sum(s.suppressed for s in summaries)
    assert st.storms.suppressed["deny"] == fk.truth.suppressed["deny"] == st.storms.reported
    text = AegisMetrics(lambda: st, standard=False).exposition().decode()
    assert f'aegis_deny_storm_suppressed_total{{class="deny"}} {float(st.storms.reported)}' in text
    assert "aegis_deny_storm_keys_capacity 16384.0" in text
    assert msgspec.json.decode(sink.lines[-1])  # every line is JSON


def test_storm_table_over_fake_maps_sees_no_stale_reported_keys(fk):
    # a crash between the two deletes leaves a reported key without its element: dropped at load
    fk.storm_reported.update(abi.STORM_KEY.pack(7, 1, 0, 0, 99, 1), abi.STORM_REPORTED.pack(1, 5))
    t = StormTable(fk.storms, fk.storm_reported, fk.storm_stats, ncpu=fk.ncpu)
    assert t.scan() == []
    assert fk.storm_reported.keys() == []


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "storm_vectors.json"


def test_storm_event_golden_vector(store):
    """The aegis.storm.v1 record of a fixed delta, byte for byte (a deliberate change:
    ``AEGIS_REGEN_GOLDEN=1 pytest tests/unit/test_deny_storm.py`` and review the diff)."""
    install_only = FakeKernel()
    try:
        install(install_only, store, sample_record(7, mode="enforce"))
    finally:
        install_only.close()
    norm = fixed_normaliser(store)
    rep = StormReporter(StormTable(None, None, None, ncpu=1), norm, window_ns=lambda: 10 * S,
                        keep_generations=lambda: {7}, clock=lambda: 1_780_000_100.5)
    rep.window = 10 * S
    d = StormDelta(StormKey(7, CG_APP, 0, 0, 4242, int(abi.Decision.DENY)), suppressed=9170, total=18482,
                   first_ns=5 * S, window_ns=15 * S)
    got = msgspec.json.encode(rep.event(d, rep._now())) + b"\n"
    if os.environ.get("AEGIS_REGEN_GOLDEN"):
        GOLDEN.write_bytes(got)
    assert got == GOLDEN.read_bytes()
    assert event_decoder.decode(got) == rep.event(d, rep._now())
