"""aegis_stream/processors/: the engine-independent processors, fed recorded streams."""

from __future__ import annotations

import msgspec
import pytest

from aegis_stream.kernel import abi
from aegis_stream.pipeline.normalise import GenerationInfo
from aegis_stream.pipeline.schema import DecisionEvent
from aegis_stream.policy.store import PolicyStore
from aegis_stream.processors.degraded import DegradedConfig, DegradedMonitor, HealthSample
from aegis_stream.processors.explain import Explainer, explain
from aegis_stream.processors.sampling import Sampler
from aegis_stream.processors.slo import AlertRule, DropRateSlo, SloConfig
from aegis_stream.testing import CG_APP, CG_WORKLOADS, fixed_normaliser, sample_record

HOOKS = ["file_open", "bprm_check_security", "mmap_file"]


def sample(now: float, **kw) -> HealthSample:
    base = dict(now=now, hooks_expected=HOOKS, hooks_attached=HOOKS, mode="enforce", generation=7,
                ring_fill={"deny": 0.0, "audit": 0.0}, consumer_lag_bytes={"deny": 0, "audit": 0},
                consumed_records={"deny": 0, "audit": 0}, drop_ratio={"deny": 0.0, "audit": 0.0})
    base.update(kw)
    return HealthSample(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ degraded
def test_degraded_states_and_reasons():
    m = DegradedMonitor(DegradedConfig(recover_s=0))
    assert m.evaluate(sample(0)) == ("enforcing", [])
    assert m.evaluate(sample(0, mode="audit")) == ("auditing", [])
    st, why = m.evaluate(sample(0, hooks_attached=["file_open"]))
    assert st == "degraded" and why == ["hooks 1/3 attached (missing bprm_check_security, mmap_file)"]
    assert m.evaluate(sample(0, hooks_attached=[]))[0] == "blind"
    assert m.evaluate(sample(0, mode="none")) == (
        "degraded", ["no valid policy generation active (every hook allows)"])
    st, why = m.evaluate(sample(0, ring_fill={"audit": 0.93}))
    assert st == "degraded" and why == ["audit ring 93% full (>= 80%)"]
    st, why = m.evaluate(sample(0, drop_ratio={"audit": 0.05}))
    assert why == ["audit drop ratio 5.00% > 1.00%"]
    st, why = m.evaluate(sample(0, deny_lost=3, sink_failing=["file:/x"]))
    assert st == "blind" and why == ["3 deny events lost in the short window", "sink failing: file:/x"]
    assert m.evaluate(sample(0, spooled_denies=9))[1] == ["9 denies waiting in the disk spool"]


def test_consumer_stall_makes_the_agent_blind():
    m = DegradedMonitor(DegradedConfig(stall_s=10, recover_s=0))
    lag = {"deny": 0, "audit": 4096}
    assert m.observe(sample(0, consumer_lag_bytes=lag, consumed_records={"audit": 5})).state == "enforcing"
    assert m.observe(sample(5, consumer_lag_bytes=lag, consumed_records={"audit": 5})) is None
    tr = m.observe(sample(10, consumer_lag_bytes=lag, consumed_records={"audit": 5}))
    assert tr is not None and tr.state == "blind" and "audit ring consumer stalled for 10s" in tr.reasons[0]
    # progress again: recovers (recover_s=0)
    tr = m.observe(sample(11, consumer_lag_bytes=lag, consumed_records={"audit": 50}))
    assert tr is not None and tr.state == "enforcing" and tr.previous == "blind"


def test_hysteresis_worse_at_once_better_after_recover_s():
    m = DegradedMonitor(DegradedConfig(recover_s=30))
    stream = [
        (0, {}, "enforcing"),
        (10, {"ring_fill": {"audit": 0.9}}, "degraded"),
        (20, {}, None),  # better, but not for 30 s yet
        (30, {"ring_fill": {"audit": 0.85}}, None),  # worse again: clock restarts
        (40, {}, None),
        (69, {}, None),
        (70, {}, "enforcing"),
        (71, {"mode": "audit"}, "auditing"),  # a mode change is taken at once
    ]
    got = []
    for now, kw, want in stream:
        tr = m.observe(sample(now, **kw))
        got.append(tr.state if tr else None)
        assert got[-1] == want, (now, got)
    assert m.changes == 4


def test_degraded_reasons_carry_their_codes_not_parsed_from_text():
    """The monitor emits each reason with its code: a condition whose text matches no
    code's pattern still has its code, in the transition, the snapshot and after restore;
    a snapshot from before codes were kept reads its texts."""
    from aegis_stream.agent.health import Reason, ReasonCode, State

    m = DegradedMonitor(DegradedConfig(recover_s=0))
    m.set_condition("reconcile_inconsistent", "kernel runs generation 9 (free text)")
    tr = m.observe(sample(0, ring_fill={"deny": 0.95, "audit": 0.9}))
    assert tr is not None and tr.state is State.DEGRADED
    assert tr.codes == [ReasonCode.RING_HIGH, ReasonCode.RECONCILE_INCONSISTENT]
    assert m.judged[-1] == Reason(ReasonCode.RECONCILE_INCONSISTENT,
                                  "kernel runs generation 9 (free text)")
    snap = msgspec.json.decode(msgspec.json.encode(m.snapshot()))
    assert snap["reason_codes"] == ["ring_high", "ring_high", "reconcile_inconsistent"]
    assert DegradedMonitor.restore(snap).judged == m.judged
    old = {k: v for k, v in snap.items() if k != "reason_codes"}
    old["reasons"] = old["reasons"][:2]
    assert DegradedMonitor.restore(old).codes == [ReasonCode.RING_HIGH]


def test_degraded_state_round_trips():
    m = DegradedMonitor(DegradedConfig(recover_s=30))
    m.observe(sample(0))
    m.observe(sample(1, ring_fill={"audit": 0.9}))
    m.observe(sample(2))
    snap = m.snapshot()
    r = DegradedMonitor.restore(msgspec.json.decode(msgspec.json.encode(snap)))
    assert r.snapshot() == snap
    for mon in (m, r):
        assert mon.observe(sample(31)) is None
        assert mon.observe(sample(32)).state == "enforcing"


# ------------------------------------------------------------------ SLO
def feed(slo: DropRateSlo, timeline: list[tuple[float, int, int]], klass: str = "audit") -> list:
    """timeline: (now, emitted per step, dropped per step), cumulative totals fed."""
    e = d = 0
    out = []
    for now, de, dd in timeline:
        e += de
        d += dd
        slo.observe(now, klass, e, d)
        out += [(now, c.klass, c.rule.name, c.firing) for c in slo.evaluate(now)]
    return out


def test_burn_rate_alert_needs_both_windows():
    slo = DropRateSlo(SloConfig(objective=0.001, bucket_s=10))
    # an hour of clean traffic, then 2% drops (burn 20)
    timeline = [(t, 1000, 0) for t in range(0, 3600, 10)]
    timeline += [(t, 1000, 20) for t in range(3600, 7200, 10)]
    changes = feed(slo, timeline)
    assert len(changes) == 1 and changes[0][1:] == ("audit", "page", True)
    # fires once the 1 h burn passes 14.4: 1 h window mostly clean at first
    fired_at = changes[0][0]
    assert 3600 + 0.7 * 3600 <= fired_at <= 3600 + 0.75 * 3600 + 10
    assert slo.burn("audit", 300, 7190) == pytest.approx(20)


def test_burn_rate_alert_resolves_fast_when_the_short_window_clears():
    slo = DropRateSlo(SloConfig(objective=0.001, bucket_s=10))
    timeline = [(t, 1000, 50) for t in range(0, 3600, 10)]  # burn 50
    timeline += [(t, 1000, 0) for t in range(3600, 4200, 10)]
    changes = feed(slo, timeline)
    assert [c[3] for c in changes] == [True, False]
    resolved_at = changes[1][0]
    # long window still burning hot, the short one clears within ~5 min
    assert 3600 < resolved_at <= 3600 + 300
    assert slo.burn("audit", 3600, resolved_at) > 14.4


def test_slo_counter_reset_and_round_trip():
    slo = DropRateSlo(SloConfig(objective=0.01, bucket_s=5, alerts=[AlertRule(long_s=60, short_s=10, burn=2)]))
    slo.observe(0, "deny", 100, 0)
    slo.observe(5, "deny", 150, 5)
    slo.observe(10, "deny", 20, 1)  # totals went down: a restart, counted from zero
    w = slo.window("deny", 60, 10)
    assert (w.emitted, w.dropped) == (170, 6)
    r = DropRateSlo.restore(msgspec.json.decode(msgspec.json.encode(slo.snapshot())))
    assert r.window("deny", 60, 10) == w and r.snapshot() == slo.snapshot()
    assert [c.firing for c in r.evaluate(10)] == [True]


def test_old_buckets_are_forgotten():
    slo = DropRateSlo(SloConfig(bucket_s=10, alerts=[AlertRule(long_s=100, short_s=10)]))
    e = 0
    for t in range(0, 10_000, 10):
        e += 1
        slo.observe(t, "audit", e, 0)
    assert len(slo.buckets["audit"]) <= 12


# ------------------------------------------------------------------ sampling
def test_sampler_keeps_one_in_n_across_batches():
    s = Sampler(4)
    kept = [s.select(3), s.select(5), s.select(4)]
    assert kept == [[0], [1], [0]]  # stream positions 0, 4, 8
    assert (s.kept, s.sampled_out) == (3, 9)
    r = Sampler.restore(s.snapshot())
    assert r.select(4) == s.select(4) == [0]
    with pytest.raises(ValueError):
        Sampler(0)


# ------------------------------------------------------------------ explanation
@pytest.fixture
def norm(tmp_path):
    store = PolicyStore(tmp_path / "s")
    store.record(sample_record(7))
    return fixed_normaliser(store)


def _event(norm, **kw) -> DecisionEvent:
    from aegis_stream.kernel.events import RawDecision
    from aegis_stream.testing import DEV_SDA1

    base = dict(abi_version=abi.ABI_VERSION, hook=0, decision=1, rule_id=0, generation=7, ktime_ns=1, cgroup_id=CG_APP,
                scope_cgroup_id=CG_WORKLOADS, ino=1234, dev=DEV_SDA1, action=1, pid=4242, tgid=4242,
                uid=0, gid=0, mode=1, slot=1, comm="cat")
    base.update(kw)
    return norm.normalise(RawDecision(**base))  # type: ignore[arg-type]


def test_explain_deny_via_ancestor(norm):
    ev = _event(norm)
    x = explain(ev, norm.generations.get(7))
    assert x.decision_path == [
        "slot 1 active (generation 7)",
        "inode 8:1:1234 matched rule deny-shadow [open,exec]",
        "action open",
        "scope /sys/fs/cgroup/workloads matched via ancestor of /sys/fs/cgroup/workloads/app",
        "mode enforce -> EPERM",
    ]
    assert x.consistent and x.outcome == "EPERM"
    assert (x.rule.id, x.rule.source, x.rule.inode) == ("deny-shadow", "/etc/shadow", "8:1:1234")
    assert (x.policy.name, x.policy.version, x.policy.signer) == ("prod-baseline", 3, "ops-2026")
    assert x.scope.match == "ancestor" and x.scope.configured == "/sys/fs/cgroup/workloads"


def test_explain_own_cgroup_audit_and_break_glass_note(norm):
    ev = _event(norm, cgroup_id=CG_WORKLOADS, mode=0, decision=2, hook=1, action=2, rule_id=1, ino=5678)
    x = explain(ev, norm.generations.get(7))
    assert x.decision_path[3] == "scope /sys/fs/cgroup/workloads matched (the task's own cgroup)"
    assert x.decision_path[4] == "mode audit -> allowed, audited"
    assert "applied in enforce mode" in x.decision_path[5] and x.consistent


def test_explain_flags_a_record_that_disagrees(norm):
    ev = _event(norm, ino=999, action=2, scope_cgroup_id=42)  # rule 0 is 8:1:1234
    x = explain(ev, norm.generations.get(7))
    assert not x.consistent
    assert x.inconsistencies == [
        "rule deny-shadow names inode 8:1:1234, the event 8:1:999",
        "cgroup id 42 is not a scope of generation 7",
    ]
    missing = explain(_event(norm, generation=99), None)
    assert not missing.consistent and missing.inconsistencies == ["no record of generation 99 in the store"]


def test_explainer_processor_explains_denies_only(norm):
    info = norm.generations.get(7)
    assert isinstance(info, GenerationInfo)
    ex = Explainer(lambda g: info if g == 7 else None)
    assert ex.process(_event(norm, decision=2, mode=0)) is None
    assert ex.process(_event(norm)) is not None
    assert ex.snapshot() == {"audits": False, "explained": 1, "inconsistent": 0}
