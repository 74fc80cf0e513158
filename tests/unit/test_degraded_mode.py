"""The degraded-mode contract (docs/DEGRADED_MODE.md), without a kernel: one test per row
that the fake kernel, the fake maps and trio's MockClock can reach, every reason code
documented and reachable, and `aegis status` judged from fake kernels and status files."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import trio

from aegis_stream.agent import reasons, status
from aegis_stream.agent import run as agent
from aegis_stream.errors import KernelError, SignatureError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.pipeline import Pipeline
from aegis_stream.pipeline.metrics import AegisMetrics
from aegis_stream.pipeline.schema import StateEvent, StatusReport, event_decoder
from aegis_stream.pipeline.sinks import JsonLinesFileSink, MemorySink
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import Lifecycle, ReconcileOutcome
from aegis_stream.processors.degraded import DegradedConfig, DegradedMonitor, HealthSample
from aegis_stream.testing import FakeKernel, install, make_events, sample_record

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "DEGRADED_MODE.md"
HOOKS = [abi.HOOK_NAMES[h] for h in abi.Hook]
PROGS = list(abi.HOOK_PROGRAMS.values())


# ============================================================================ helpers
def sample(now: float = 0.0, **kw) -> HealthSample:
    base = dict(now=now, hooks_expected=HOOKS, hooks_attached=HOOKS, mode="enforce", generation=7,
                ring_fill={"deny": 0.0, "audit": 0.0}, consumer_lag_bytes={"deny": 0, "audit": 0},
                consumed_records={"deny": 0, "audit": 0}, drop_ratio={"deny": 0.0, "audit": 0.0})
    base.update(kw)
    return HealthSample(**base)  # type: ignore[arg-type]


@pytest.fixture
def ring_sizes():
    return 1 << 14, 1 << 14


@pytest.fixture
def make_pipeline(make_pipeline):
    """conftest's, recovering after 5 s instead of the default."""
    return functools.partial(make_pipeline, degraded=DegradedConfig(recover_s=5))


def state_events(sink: MemorySink) -> list[StateEvent]:
    return [e for e in (event_decoder.decode(x) for x in sink.lines) if isinstance(e, StateEvent)]


def metric(p: Pipeline, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = AegisMetrics(p.statistics).exposition().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not exposed")


class Signed:
    """A trusted key and a state dir over fake policy maps (as tests/unit/test_lifecycle.py)."""

    def __init__(self, tmp_path: Path, max_rules: int = 64) -> None:
        self.tmp = tmp_path
        self.maps = PolicyMaps.fake(max_rules)
        for n in "abcdef":
            (tmp_path / n).write_text(n)
        k = signing.generate_keypair("k1", tmp_path / "keys")
        self.key, _ = signing.load_private_key(k.private_path)
        self.state = tmp_path / "state"
        Lifecycle(self.maps, self.state).trust.add(k.public_path.read_bytes())

    def lc(self, **kw) -> Lifecycle:
        return Lifecycle(self.maps, self.state, **kw)

    def toml(self, version: int, files: str = "a", mode: str = "enforce") -> bytes:
        rules = "".join(f'[[rules]]\nid = "r-{f}"\npath = "{self.tmp / f}"\n\n' for f in files)
        return (f'apiVersion = "aegis/v1"\nname = "web"\nversion = {version}\n'
                f'mode = "{mode}"\n\n{rules}').encode()

    def signed(self, version: int, files: str = "a", **kw) -> bytes:
        return signing.sign_policy(self.toml(version, files), self.key, "k1", **kw)

    def active(self) -> tuple[int, int]:
        st = slots.read_state(self.maps)
        return (st.active.generation if st.active.valid else 0), st.active.mode


def kernel_facts(gen: int = 7, mode: str = "enforce", links: list[str] | None = None,
                 loaded: bool = True) -> status.KernelFacts:
    pinned = PROGS if links is None else links
    return status.KernelFacts(loaded, "/sys/fs/bpf/aegis", {p: p in pinned for p in PROGS},
                              gen if mode != "none" else 0, mode, 1, {})


def agent_facts(alive: bool, **doc) -> status.AgentFacts:
    d = {"pid": 4242, "state": "enforcing", "reasons": [], "running": alive, **doc}
    return status.AgentFacts("/var/lib/aegis/status.json", msgspec.convert(d, status.StatusFile),
                             alive, doc.get("age", 1.0))


# ===================================================================== per-hook / attach
@pytest.mark.parametrize("missing", HOOKS)
async def test_hook_fails_to_attach_degraded_with_the_hook(make_pipeline, kernel, store, tmp_path, missing,
                                                         autojump_clock):
    """A hook not attached: state degraded, reason hooks_missing naming the hook, in the
    aegis.state.v1 event (reason_codes), the metric, and the status file."""
    install(kernel, store, sample_record(7, mode="enforce"))
    kernel.attached.discard(missing)
    sink = MemorySink()
    seen: list[StateEvent] = []
    p = make_pipeline(kernel, store, [sink], tmp_path, on_state=seen.append)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(2)
        assert metric(p, "aegis_state_reason", reason="hooks_missing") == 1
        assert metric(p, "aegis_state", state="degraded") == 1
        assert metric(p, "aegis_hook_attached", hook=missing) == 0
        assert metric(p, "aegis_state_reason", reason="no_policy") == 0
        p.stop()
    (ev,) = state_events(sink)
    assert ev.state == "degraded" and ev.reason_codes == ["hooks_missing"]
    assert missing in ev.reasons[0] and seen == [ev]
    # the status file the agent writes from the same event
    path = tmp_path / "status.json"
    agent.write_status(str(path), {h: h != missing for h in HOOKS}, ev.state,
                       {"reasons": ev.reasons, "reason_codes": ev.reason_codes})
    doc = json.loads(path.read_text())
    assert doc["reason_codes"] == ["hooks_missing"] and doc["pid"] == os.getpid()
    assert doc["start_time"] == agent.proc_start_time(os.getpid()) > 0


async def test_no_hook_attached_is_blind(make_pipeline, kernel, store, tmp_path, autojump_clock):
    install(kernel, store, sample_record(7, mode="enforce"))
    kernel.attached.clear()
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(1)
        assert metric(p, "aegis_state_reason", reason="hooks_none") == 1
        p.stop()
    (ev,) = state_events(sink)
    assert ev.state == "blind" and ev.reason_codes == ["hooks_none"]


def test_every_hook_fails_open_without_a_valid_generation(kernel):
    """No valid slot: every hook allows (fail-open) and counts no_policy; with a valid
    enforce slot the same decision is EPERM (-1 in the fake kernel)."""
    from aegis_stream.testing import CG_APP, CG_ROOT, CG_WORKLOADS, DEV_SDA1, FakeTask

    app = FakeTask(pid=1, tgid=1, comm="x", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))
    for hook in abi.Hook:
        act = abi.ACTION_OPEN if hook == abi.Hook.FILE_OPEN else abi.ACTION_EXEC
        assert kernel.decide(hook, DEV_SDA1, 1234, act, app) == 0
    from aegis_stream.kernel.counters import read_hook_counters

    ctr = read_hook_counters(kernel.maps(), kernel.ncpu)
    assert all(ctr[h]["no_policy"] == 1 for h in HOOKS)
    m = DegradedMonitor()
    assert m.evaluate(sample(mode="none"))[0] == "degraded"


# ===================================================================== rings
async def test_deny_ring_full_decision_enforced_state_blind(make_pipeline, kernel, store, tmp_path, autojump_clock):
    """The deny ring full: the kernel still returns EPERM and counts ringbuf_fail; the lost
    events make the agent blind (deny_events_lost)."""
    from aegis_stream.testing import CG_APP, CG_ROOT, CG_WORKLOADS, DEV_SDA1, FakeTask

    install(kernel, store, sample_record(7, mode="enforce"))
    app = FakeTask(pid=1, tgid=1, comm="x", cgroups=(CG_ROOT, CG_WORKLOADS, CG_APP))
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(1)
        # the reader is not scheduled between these: the 16 KiB ring overflows
        results = [kernel.decide(abi.Hook.FILE_OPEN, DEV_SDA1, 1234, abi.ACTION_OPEN, app)
                   for _ in range(400)]
        assert results == [-1] * 400  # every decision enforced
        assert kernel.truth.ring_failed["deny"] > 0
        await trio.sleep(2)
        assert p.statistics().state == "blind"
        assert metric(p, "aegis_state_reason", reason="deny_events_lost") == 1
        assert metric(p, "aegis_kernel_ringbuf_reserve_failures_total",
                      hook="file_open") == kernel.truth.ring_failed["deny"]
        p.stop()
    evs = state_events(sink)
    assert evs[-1].state == "blind" and "deny_events_lost" in evs[-1].reason_codes


async def test_audit_ring_full_degraded_audit_drops(make_pipeline, kernel, store, tmp_path, autojump_clock):
    install(kernel, store, sample_record(7, mode="audit"))
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        await trio.sleep(1)
        kernel.emit_bulk("audit", make_events(1000), 1000)  # 16 KiB ring: most fail
        await trio.sleep(2)
        st = p.statistics()
        assert st.state == "degraded" and "audit_drops" in reasons.codes_of(st.reasons)
        assert metric(p, "aegis_state_reason", reason="audit_drops") == 1
        p.stop()


# ===================================================================== event log disk full
async def test_event_log_disk_full_sink_failing_denies_kept(make_pipeline, kernel, store, tmp_path, autojump_clock):
    """The event log's disk is full (/dev/full: every write is ENOSPC): sink failure counted,
    state degraded (sink_failing), denies retried, never dropped; audit batches dropped
    and counted (sink/error)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full missing")
    install(kernel, store, sample_record(7, mode="enforce"))
    full = JsonLinesFileSink("/dev/full", max_bytes=1 << 40)
    p = make_pipeline(kernel, store, [full], tmp_path, sink_retry_initial_s=0.1,
                      sink_retry_max_s=0.5)
    async with trio.open_nursery() as n:
        await n.start(p.run)
        kernel.emit_bulk("deny", make_events(5, decision=abi.Decision.DENY), 5)
        kernel.emit_bulk("audit", make_events(5), 5)
        await trio.sleep(3)
        st = p.statistics()
        assert st.state == "degraded" and "sink_failing" in reasons.codes_of(st.reasons)
        assert metric(p, "aegis_state_reason", reason="sink_failing") == 1
        assert metric(p, "aegis_sink_failures_total") > 0
        assert st.classes["deny"].dropped == {}  # denies wait, retried
        assert st.classes["deny"].in_flight == 5
        assert st.classes["audit"].dropped == {("sink", "error"): 5}
        n.cancel_scope.cancel()


# ===================================================================== clock jumps
async def test_wall_clock_jumps_do_not_move_windows_or_hysteresis(make_pipeline, kernel, store, tmp_path,
                                                                 autojump_clock):
    """Windows, hysteresis and stall detection run on trio's clock (monotonic); the wall
    clock only stamps records.  A jump of +/- one day changes no state decision."""
    install(kernel, store, sample_record(7, mode="enforce"))
    timelines = []
    for jumps in ([0.0] * 40, [0.0] * 10 + [86400.0] * 10 + [-86400.0] * 20):
        seq = iter(jumps + [0.0] * 1000)
        wall = lambda seq=seq: time.time() + next(seq)  # noqa: E731
        k = FakeKernel(deny_ring_size=1 << 14, audit_ring_size=1 << 14)
        install(k, store, sample_record(7, mode="enforce"))
        seen: list[tuple[float, str]] = []
        p = make_pipeline(k, store, [MemorySink()], tmp_path / str(len(timelines)),
                          on_state=lambda ev, seen=seen: seen.append((trio.current_time(), ev.state)),
                          wall_clock=wall)
        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            await n.start(p.run)
            await trio.sleep(2.2)  # off the 0.5 s tick grid: no tie between two tasks
            k.attached.discard("mmap_file")
            await trio.sleep(2.2)
            k.attached.add("mmap_file")
            await trio.sleep(10)
            p.stop()
        k.close()
        timelines.append([(round(t - t0, 3), s) for t, s in seen])
    assert timelines[0] == timelines[1]
    assert [s for _, s in timelines[0]] == ["enforcing", "degraded", "enforcing"]


def test_wall_clock_jump_and_signed_policy_expiry(tmp_path):
    """Signature expiry is judged on the wall clock at apply time only: a jump past
    expires_at (or before issued_at) refuses the apply (policy_expired) and changes
    nothing; the generation already in the kernel keeps enforcing (the kernel has no
    notion of expiry)."""
    env = Signed(tmp_path)
    t0 = 1_800_000_000.0
    env.lc(clock=lambda: t0).apply(env.signed(1, "a", now=t0, expires_in_days=1), "v1")
    assert env.active() == (1, abi.Mode.ENFORCE)
    late = env.lc(clock=lambda: t0 + 2 * 86400)
    with pytest.raises(SignatureError) as ei:
        late.apply(env.signed(2, "ab", now=t0, expires_in_days=1), "v2")
    assert reasons.refusal_code(ei.value) == "policy_expired"
    assert env.active() == (1, abi.Mode.ENFORCE)
    early = env.lc(clock=lambda: t0 - 2 * 86400)
    with pytest.raises(SignatureError) as ei:
        early.apply(env.signed(2, "ab", now=t0, expires_in_days=1), "v2")
    assert reasons.refusal_code(ei.value) == "policy_expired"
    assert env.active() == (1, abi.Mode.ENFORCE)
    assert [r["result"] for r in list(late.log.records())][-2:] == ["refused", "refused"]


def test_status_staleness_uses_the_monotonic_clock(tmp_path):
    path = tmp_path / "status.json"
    agent.write_status(str(path), {h: True for h in HOOKS}, "enforcing", {"time": 0.0})
    facts = status.read_agent(str(path))  # wall time 1970 in the file: not stale
    assert facts.alive and facts.age_s is not None and facts.age_s < 5
    r = status.judge(kernel_facts(), facts)
    assert r.state == "enforcing" and r.exit_code == 0
    old = status.read_agent(str(path), now_monotonic=time.monotonic() + 60)
    r = status.judge(kernel_facts(), old)
    assert r.state == "degraded" and "agent_unresponsive" in r.reason_codes and r.exit_code == 1


# ===================================================================== rule map full
def test_rule_map_full_apply_refused_atomically(tmp_path):
    """The kernel rule map has room for 2 rules per slot; a 3-rule generation is refused:
    the active generation, both slots, the store and the counter are as before."""
    env = Signed(tmp_path, max_rules=2)
    lc = env.lc()
    lc.apply(env.signed(1, "ab"), "v1")
    before = (env.active(), sorted(env.maps.rules.keys()), lc.store.generations())
    with pytest.raises(KernelError) as ei:
        lc.apply(env.signed(2, "abcde"), "v2")
    assert reasons.refusal_code(ei.value) == "rule_map_full"
    assert (env.active(), sorted(env.maps.rules.keys()), lc.store.generations()) == before
    assert list(lc.log.records())[-1]["result"] == "refused"
    # neither the generation number nor the version is burnt: the anti-rollback counter is
    # restored, so the fixed policy can be applied as v2 again
    assert lc.counter.get("web").high_water == 1
    assert lc.apply(env.signed(2, "b"), "v2 fixed").generation == 2


# ===================================================================== agent start refusals
class _NoKernel:
    def __init__(self, *a, **kw) -> None:
        raise AssertionError("the agent touched the kernel although it refused to start")


def _run(cfg: agent.AgentConfig) -> int:
    return trio.run(agent.run_agent, cfg)


def test_policy_unreadable_refuses_start_nothing_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(agent, "BpfObject", _NoKernel)
    unreadable = tmp_path / "policy.toml"
    unreadable.mkdir()  # root reads any file: a directory is unreadable as a policy
    assert _run(agent.AgentConfig(policy=str(unreadable), events=os.devnull)) == 2
    doc = json.loads((tmp_path / "state" / "status.json").read_text())
    assert doc["running"] is False and doc["last_error_code"] == "policy_unreadable"
    assert str(unreadable) in doc["last_error"]
    r = status.judge(kernel_facts(loaded=False), status.read_agent(str(tmp_path / "state/status.json")))
    assert r.exit_code == 2 and "policy_unreadable" in r.reason_codes
    assert "last start refused: policy unreadable" in status.render(r)


def test_metrics_port_taken_refuses_start_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(agent, "BpfObject", _NoKernel)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _run(agent.AgentConfig(metrics_addr=f"127.0.0.1:{port}", events=os.devnull)) == 2
        doc = json.loads((tmp_path / "state" / "status.json").read_text())
        assert doc["last_error_code"] == "metrics_unavailable"
        assert "Address already in use" in doc["last_error"]
        # the CLI: one line on stderr, exit 2
        env = dict(os.environ, AEGIS_STATE_DIR=str(tmp_path / "s2"), AEGIS_PIN_ROOT=str(tmp_path / "pins"))
        out = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "run", "--metrics-addr",
                              f"127.0.0.1:{port}", "--events", os.devnull],
                             env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"metrics unavailable: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert not (tmp_path / "pins").exists()  # nothing loaded, nothing pinned
    assert _run(agent.AgentConfig(metrics_addr="nonsense", events=os.devnull)) == 2


def test_bpf_object_missing_refuses_start_load_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AEGIS_BPF_OBJECT", str(tmp_path / "nope.bpf.o"))
    assert _run(agent.AgentConfig(events=os.devnull)) == 2
    doc = json.loads((tmp_path / "state" / "status.json").read_text())
    assert doc["last_error_code"] == "load_failed" and "not found" in doc["last_error"]


def test_policy_rejected_code(tmp_path):
    env = Signed(tmp_path)
    with pytest.raises(Exception) as ei:
        env.lc().apply(b"not = [toml", "bad.toml")
    assert reasons.refusal_code(ei.value) == "policy_rejected"
    assert env.active()[0] == 0


# ===================================================================== restart / reconcile
def test_restart_reconcile_interrupted_apply_then_inconsistent_is_degraded(tmp_path):
    from aegis_stream.policy.lifecycle import SimulatedCrash

    env = Signed(tmp_path)
    env.lc().apply(env.signed(1, "a"), "v1")

    def crash(step: str) -> None:
        if step == "staged":
            raise SimulatedCrash(step)

    with pytest.raises(SimulatedCrash):
        env.lc(hook=crash).apply(env.signed(2, "ab"), "v2")
    rec = env.lc().reconcile()  # what the restarted agent does first
    assert (rec.status, rec.effective, rec.generation) == ("recovered", "old", 1)
    assert agent.reconcile_conditions(rec) == {}
    assert env.active() == (1, abi.Mode.ENFORCE)
    # a journal the kernel does not explain: degraded until the next apply
    (env.state / "lifecycle.pending.json").write_text(
        json.dumps({"op": "apply", "old_generation": 5, "new_generation": 6}))
    rec = env.lc().reconcile()
    assert rec.status == "inconsistent"
    cond = agent.reconcile_conditions(rec)
    m = DegradedMonitor(DegradedConfig(recover_s=0))
    for code, why in cond.items():
        m.set_condition(code, why)
    tr = m.observe(sample())
    assert tr is not None and tr.state == "degraded" and tr.codes == ["reconcile_inconsistent"]
    m.clear_condition("reconcile_inconsistent")
    assert m.evaluate(sample())[0] == "enforcing"


def test_snapshot_restore_keeps_codes_and_conditions():
    m = DegradedMonitor(DegradedConfig(recover_s=0))
    m.set_condition("reconcile_inconsistent", reasons.text("reconcile_inconsistent", "x"))
    m.observe(sample(hooks_attached=HOOKS[:2]))
    r = DegradedMonitor.restore(msgspec.json.decode(msgspec.json.encode(m.snapshot())))
    assert r.codes == m.codes == ["hooks_missing", "reconcile_inconsistent"]
    assert r.conditions == m.conditions
    with pytest.raises(ValueError):
        m.set_condition("agent_not_running", "agent not running")


# ===================================================================== aegis status
def test_status_agent_killed_pins_still_enforcing():
    r = status.judge(kernel_facts(7, "enforce"), agent_facts(False))
    assert r.summary == "agent not running; pinned programs still enforcing generation 7"
    assert r.state == "degraded" and r.exit_code == 1 and r.reason_codes == ["agent_not_running"]
    assert r.kernel.enforcement == "enforcing" and r.kernel.generation == 7
    assert not r.agent.running
    r = status.judge(kernel_facts(3, "audit"), agent_facts(False))
    assert r.summary == "agent not running; pinned programs still auditing generation 3"
    r = status.judge(kernel_facts(0, "none"), agent_facts(False))
    assert r.reason_codes == ["agent_not_running", "no_policy"]


def test_status_running_agent_states_and_exit_codes():
    r = status.judge(kernel_facts(), agent_facts(True))
    assert (r.state, r.exit_code, r.reasons) == ("enforcing", 0, [])
    r = status.judge(kernel_facts(mode="audit"), agent_facts(True, state="auditing"))
    assert (r.state, r.exit_code) == ("auditing", 0)
    r = status.judge(kernel_facts(links=PROGS[:2]), agent_facts(True))
    assert r.state == "degraded" and r.reason_codes == ["hooks_missing"] and r.exit_code == 1
    assert [h.pinned for h in r.hooks] == [True, True] + [False] * (len(PROGS) - 2)
    r = status.judge(kernel_facts(links=[]), agent_facts(True))
    assert r.state == "blind" and r.reason_codes == ["hooks_none"] and r.exit_code == 2
    r = status.judge(kernel_facts(), agent_facts(True, state="blind",
                                                 reasons=["3 deny events lost in the short window"]))
    assert r.state == "blind" and r.reason_codes == ["deny_events_lost"] and r.exit_code == 2
    r = status.judge(kernel_facts(loaded=False), status.AgentFacts("/x", None, False, None))
    assert (r.state, r.exit_code, r.reason_codes) == ("blind", 2, ["not_loaded"])


def test_status_reused_pid_is_not_the_agent(tmp_path):
    path = tmp_path / "status.json"
    agent.write_status(str(path), {h: True for h in HOOKS}, "enforcing", {})
    assert status.read_agent(str(path)).alive
    doc = json.loads(path.read_text())
    doc["start_time"] += 1  # same pid, another process
    path.write_text(json.dumps(doc))
    facts = status.read_agent(str(path))
    assert not facts.alive
    assert status.judge(kernel_facts(), facts).reason_codes == ["agent_not_running"]


def test_status_from_fake_kernel_maps(kernel, store):
    install(kernel, store, sample_record(9, mode="audit"))
    facts = status.facts_from_maps("/pins", {p: True for p in PROGS}, kernel.policy_maps,
                                   kernel.maps(), kernel.ncpu)
    assert (facts.generation, facts.mode) == (9, "audit")
    assert set(facts.counters) == set(HOOKS)
    r = status.judge(facts, agent_facts(False))
    assert r.summary == "agent not running; pinned programs still auditing generation 9"


def test_status_unreadable_pins_exit_3(monkeypatch, tmp_path):
    def boom(root=None, **_kw):
        raise KernelError("bpf_obj_get(/sys/fs/bpf/aegis/maps/x)", err=errno.EPERM)

    monkeypatch.setattr(status, "read_kernel", boom)
    r = status.collect(status_file=str(tmp_path / "none.json"))
    assert r.exit_code == 3 and "cannot read the pinned state" in r.summary


def test_status_cli_json_schema_and_exit_code(tmp_path):
    env = dict(os.environ, AEGIS_STATE_DIR=str(tmp_path), AEGIS_PIN_ROOT=str(tmp_path / "pins"))
    out = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    rep = msgspec.json.decode(out.stdout.encode(), type=StatusReport)
    assert rep.state == "blind" and rep.reason_codes == ["not_loaded"]
    assert json.loads(out.stdout)["schema"] == "aegis.status.v1"
    txt = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "status"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert txt.returncode == 2 and txt.stdout.startswith("state: blind")


# ===================================================================== the contract itself
def _trigger_state(code: str) -> list[str]:
    m = DegradedMonitor(DegradedConfig(recover_s=0, lag_high_bytes=1024, stall_s=10))
    samples = {
        "hooks_none": [sample(hooks_attached=[])],
        "hooks_missing": [sample(hooks_attached=HOOKS[:1])],
        "deny_events_lost": [sample(deny_lost=2)],
        "consumer_stalled": [sample(0, consumer_lag_bytes={"audit": 512}, consumed_records={"audit": 1}),
                             sample(11, consumer_lag_bytes={"audit": 512}, consumed_records={"audit": 1})],
        "no_policy": [sample(mode="none")],
        "ring_high": [sample(ring_fill={"audit": 0.9})],
        "consumer_lag": [sample(consumer_lag_bytes={"audit": 2048}, consumed_records={"audit": 0})],
        "audit_drops": [sample(drop_ratio={"audit": 0.5})],
        "sink_failing": [sample(sink_failing=["file:/var/log/aegis.jsonl"])],
        "denies_spooled": [sample(spooled_denies=3)],
        "path_continuity_unavailable": [sample(hooks_expected=[*HOOKS, "inode_rename"])],
    }
    if code == "reconcile_inconsistent":
        m.set_condition(code, agent.reconcile_conditions(
            ReconcileOutcome("inconsistent", "unknown", 4, "kernel runs 4"))[code])
        samples[code] = [sample()]
    if code == "path_rule_moved":  # the path watcher's tick check, a real inotify event
        samples[code] = [sample()]
        for c, why in _path_watch_conditions().items():
            if why:
                m.set_condition(c, why)
    if code in ("policy_tampered", "break_glass"):  # the agent's per-tick integrity check
        samples[code] = [sample()]
        for c, why in _integrity_conditions(code).items():
            if why:
                m.set_condition(c, why)
    for s in samples[code]:
        m.observe(s)
    return m.codes


def _integrity_conditions(code: str) -> dict:
    """A signed enforce generation on fake maps, then a map write outside aegis (a deleted
    rule) or break-glass, as the agent's tick check sees it."""
    import tempfile

    from aegis_stream.agent.integrity import IntegrityChecker

    with tempfile.TemporaryDirectory() as d:
        env = Signed(Path(d))
        lc = env.lc()
        lc.apply(env.signed(1, "a"), "x")
        if code == "policy_tampered":
            st = slots.read_state(env.maps)
            key = next(k for k in env.maps.rules.keys()
                       if abi.INODE_KEY.unpack(k)[2] == st.active_slot)
            env.maps.rules.delete(key)
        else:
            lc.break_glass("INC-1")
        return dict(IntegrityChecker(env.maps, env.state).conditions())


def _path_watch_conditions() -> dict:
    """A signed generation with a path rule, then the file deleted and created again, as the
    agent's path watcher sees it before its restage."""
    import tempfile

    from aegis_stream.agent.pathwatch import Inotify, PathWatcher

    with tempfile.TemporaryDirectory() as d:
        env = Signed(Path(d))
        lc = env.lc()
        lc.apply(env.signed(1, "a"), "x")
        w = PathWatcher(lc)
        w.inotify = Inotify()
        try:
            w._load()
            (Path(d) / "a").unlink()
            (Path(d) / "a").write_text("new")
            w.handle(w.inotify.read())
            return dict(w.conditions())
        finally:
            w.inotify.close()


def _trigger_status(code: str) -> list[str]:
    if code == "not_loaded":
        return status.judge(kernel_facts(loaded=False), agent_facts(False)).reason_codes
    if code == "agent_not_running":
        return status.judge(kernel_facts(), agent_facts(False)).reason_codes
    return status.judge(kernel_facts(), agent_facts(True, age=120.0)).reason_codes


def _trigger_refusal(code: str, tmp_path: Path) -> list[str]:
    env = Signed(tmp_path, max_rules=1)
    try:
        if code == "policy_unreadable":
            Path(tmp_path).read_bytes()
        elif code == "policy_rejected":
            env.lc().apply(b"[[[", "x")
        elif code == "policy_expired":
            env.lc(clock=lambda: 4e9).apply(env.signed(1, "a", now=1.8e9), "x")
        elif code == "rule_map_full":
            env.lc().apply(env.signed(1, "abc"), "x")
        elif code == "metrics_unavailable":
            return [reasons.code_of(reasons.text(code, "cannot listen on :1: denied"))]
        elif code == "load_failed":
            return [reasons.code_of(reasons.text(code, "BPF object x not found"))]
    except Exception as exc:
        return [reasons.refusal_code(exc)]
    return []


@pytest.mark.parametrize("code", reasons.REASON_CODES)
def test_every_reason_code_is_reachable(code, tmp_path):
    """Each code is produced by the code path that owns it (the monitor, aegis status, a
    refused apply/start), and its texts map back to it."""
    kind = reasons.BY_CODE[code].kind
    got = (_trigger_state(code) if kind == "state" else _trigger_status(code) if kind == "status"
           else _trigger_refusal(code, tmp_path))
    assert code in got, (code, got)


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("|"):
            for code in re.findall(r"`([a-z_]+)`", line):
                if code in reasons.BY_CODE:
                    rows.setdefault(code, line)
    return rows


def test_every_reason_code_and_state_is_documented():
    text = DOC.read_text()
    rows = _doc_rows()
    assert sorted(set(reasons.REASON_CODES) - set(rows)) == []
    for s in reasons.STATES:
        assert f"`{s}`" in text, s
    for code in reasons.REASON_CODES:
        assert reasons.BY_CODE[code].state in ("degraded", "blind", "unchanged")


def test_every_test_named_in_the_contract_exists():
    """docs/DEGRADED_MODE.md names the test that proves each row (file::name): it exists."""
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC.read_text())
    assert len(refs) >= 15
    for path, name in refs:
        src = (ROOT / path).read_text()
        assert re.search(rf"^(async )?def {name}\b", src, re.M), f"{path}::{name} missing"


def test_state_event_reason_codes_from_texts_and_compat():
    old = (b'{"schema":"aegis.state.v1","event_id":"e","time":"t","host":"h","state":"degraded",'
           b'"previous":"enforcing","reasons":["sink failing: file:/x","2 denies waiting in the disk'
           b' spool"],"hooks_attached":[],"hooks_expected":[],"mode":"enforce","generation":1,'
           b'"ring_fill":{},"consumer_lag_bytes":{},"drop_ratio":{}}')
    ev = event_decoder.decode(old)
    assert isinstance(ev, StateEvent) and ev.reason_codes == ["sink_failing", "denies_spooled"]
    assert reasons.code_of("something new") == reasons.UNKNOWN


# ===================================================================== typed status file
def test_status_file_round_trips_as_a_struct(tmp_path):
    """The agent writes a StatusFile; reading it back gives the same Struct, with the code
    of each reason as the monitor emitted it (no text parsed back)."""
    from aegis_stream.agent.health import Reason, ReasonCode, State

    path = tmp_path / "status.json"
    coded = [Reason(ReasonCode.RING_HIGH, "deny ring 91% full (>= 80%)"),
             Reason(ReasonCode.RING_HIGH, "audit ring 85% full (>= 80%)"),
             Reason(ReasonCode.SINK_FAILING, "sink failing: file:/x")]
    agent.write_status(str(path), {h: True for h in HOOKS}, State.DEGRADED,
                       {"generation": 3, "mode": "enforce"}, coded)
    doc = status.read_agent(str(path)).doc
    assert doc is not None and doc.version == status.STATUS_FILE_VERSION
    assert doc.published is State.DEGRADED and doc.reason_codes == ["ring_high", "sink_failing"]
    assert doc.coded_reasons() == coded
    again = msgspec.json.decode(msgspec.json.encode(doc), type=status.StatusFile)
    assert again == doc
    r, per = status.judge_coded(kernel_facts(), status.read_agent(str(path)))
    assert r.state == "degraded" and per == ["ring_high", "ring_high", "sink_failing"]
    assert "  reason [sink_failing]: sink failing: file:/x" in status.render(r, per).splitlines()


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"pid": "x"}',
                                     b'{"hooks": {"file_open": 3}}'])
def test_corrupt_status_file_reads_as_no_agent(tmp_path, content):
    """A corrupt or mistyped status file is no agent report (documented degraded answer):
    aegis status judges from the kernel alone, 'agent not running'."""
    path = tmp_path / "status.json"
    path.write_bytes(content)
    facts = status.read_agent(str(path))
    assert (facts.doc, facts.alive) == (None, False)
    r = status.judge(kernel_facts(), facts)
    assert r.state == "degraded" and r.reason_codes == ["agent_not_running"] and r.exit_code == 1


def test_status_file_of_an_older_agent_still_reads(tmp_path):
    """A file without version, codes_by_reason or the newer fields: the texts' codes come
    from the code table (the legacy reader), and the rest from the defaults."""
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"pid": os.getpid(), "start_time": agent.proc_start_time(os.getpid()),
                                "running": True, "state": "degraded", "monotonic": time.monotonic(),
                                "reasons": ["sink failing: file:/x"], "hooks": {}}))
    r = status.judge(kernel_facts(), status.read_agent(str(path)))
    assert r.state == "degraded" and r.reason_codes == ["sink_failing"]


async def test_heartbeat_io_errors_are_logged_and_counted_bugs_surface(
        kernel, store, tmp_path, make_pipeline, autojump_clock, capsys):
    """A status file that cannot be written (disk full) does not stop the agent: logged
    once, then every 60th failure, with the count.  Anything else is a bug and ends the
    agent's nursery instead of being swallowed."""
    install(kernel, store, sample_record(7, mode="enforce"))
    calls: list[int] = []

    def full_disk() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "a").mkdir()
    p = make_pipeline(kernel, store, [MemorySink()], tmp_path / "a")
    await agent.serve_pipeline(p, exit_after=12, signals=False, heartbeat=full_disk, heartbeat_s=5)
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert err.count("status file not refreshed") == 1 and "(1 times)" in err

    def bug() -> None:
        raise KeyError("hooks")

    (tmp_path / "b").mkdir()
    p = make_pipeline(kernel, store, [MemorySink()], tmp_path / "b")
    seen: list[BaseException] = []
    try:
        await agent.serve_pipeline(p, exit_after=12, signals=False, heartbeat=bug, heartbeat_s=5)
    except* KeyError as eg:
        seen.extend(eg.exceptions)
    assert [type(e) for e in seen] == [KeyError]



def test_status_without_an_agent_reports_break_glass_from_the_state_dir(tmp_path) -> None:
    """`aegis status` with the agent gone: the break-glass marker is judged from the state
    dir (a running agent reports it from its tick check instead)."""
    from aegis_stream.agent import reasons

    assert reasons.break_glass_marker(tmp_path) is None
    (tmp_path / reasons.BREAK_GLASS_NAME).write_text(
        '{"reason": "INC-7", "since": 1764576000, "method": "audit"}')
    marker = reasons.break_glass_marker(tmp_path)
    r = status.judge_coded(kernel_facts(), agent_facts(False), break_glass=marker)[0]
    assert r.state == "degraded" and r.exit_code == 1
    assert r.reason_codes == ["agent_not_running", "break_glass"]
    assert any("break-glass in effect since 2025-12-01T08:00:00Z (INC-7)" in t for t in r.reasons)
    (tmp_path / reasons.BREAK_GLASS_NAME).write_bytes(b"\xff not json")
    assert reasons.break_glass_marker(tmp_path) == {"reason": "(unreadable break-glass marker)"}
    alive = status.judge_coded(kernel_facts(), agent_facts(True), break_glass=marker)[0]
    assert "break_glass" not in alive.reason_codes  # the agent's own report decides
