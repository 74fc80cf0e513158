"""The control plane is not the easy way around the signature (issue 12, part 3).

Leaving enforce needs the trust entering it needed; the anti-rollback counter survives
the loss of its file; the state dir is private whatever the umask; a map written outside
aegis (bpftool, any CAP_BPF holder) is reported by the agent's tick check, never silent.
Fake kernel maps throughout (tests/kernel/test_control_plane.py: the same in real kernels).
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time

import pytest

from aegis_stream.agent.health import ReasonCode, State
from aegis_stream.agent.integrity import IntegrityChecker
from aegis_stream.errors import SignatureError, StateError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.pipeline import Pipeline, PipelineConfig
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.policy import signing
from aegis_stream.policy.antirollback import RESTORE_ACTION
from aegis_stream.processors.degraded import DegradedConfig
from aegis_stream.testing import FakeKernel, fixed_normaliser

from ._policy_env import PolicyEnv

TAMPERED, BREAK_GLASS = ReasonCode.POLICY_TAMPERED, ReasonCode.BREAK_GLASS


class Env(PolicyEnv):
    """A trusted key and a state dir over fake policy maps (as tests/unit/test_lifecycle.py)."""

    def kernel(self) -> tuple[int, int, bool]:
        a = slots.read_state(self.maps).active
        return a.generation, a.mode, a.valid

    def checker(self, **kw) -> IntegrityChecker:
        return IntegrityChecker(self.maps, self.state, **kw)

    def last(self) -> dict:
        last = self.lc.log.last()
        assert last is not None
        return last


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


ENFORCE, AUDIT = int(abi.Mode.ENFORCE), int(abi.Mode.AUDIT)


# ============================================================== leaving enforce
def test_unsigned_audit_over_enforce_is_refused_kernel_keeps_enforcing(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    with pytest.raises(SignatureError) as ei:
        env.lc.apply(env.toml(2, "a", mode="audit"), "unsigned.toml")
    msg = str(ei.value)
    assert "\n" not in msg and "generation 1 is enforcing" in msg
    assert "aegis policy sign" in msg and "aegis break-glass" in msg
    assert env.kernel() == (1, ENFORCE, True)
    rec = env.last()
    assert (rec["action"], rec["result"]) == ("apply", "refused")
    assert "generation 1 is enforcing" in rec["reason"]
    assert env.lc.store.generations() == [1]


def test_mode_audit_override_of_signed_enforce_is_refused_while_enforcing(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    with pytest.raises(SignatureError, match="--mode audit.*mode = \"audit\""):
        env.lc.apply(env.signed(2, "ab"), "v2", mode_override="audit")
    assert env.kernel() == (1, ENFORCE, True)
    # the dry run (admit) says the same without changing anything
    with pytest.raises(SignatureError, match="--mode audit"):
        env.lc.admit(env.signed(2, "ab"), "v2", mode_override="audit")


def test_signed_audit_mode_policy_is_the_signed_way_out(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    out = env.lc.apply(env.signed(2, "a", mode="audit"), "v2-audit")
    assert (out.mode, out.signer) == ("audit", "k1")
    assert env.kernel() == (2, AUDIT, True)
    # not enforcing any more: an unsigned audit policy and --mode audit are fine again
    env.lc.apply(env.toml(3, "ab", mode="audit"), "unsigned")
    env.lc.apply(env.signed(4, "abc"), "v4", mode_override="audit")
    assert env.kernel() == (4, AUDIT, True)


def test_mode_audit_override_is_allowed_when_nothing_enforces(env) -> None:
    out = env.lc.apply(env.signed(1, "a"), "v1", mode_override="audit")
    assert out.mode == "audit" and env.kernel() == (1, AUDIT, True)
    env.lc.apply(env.signed(2, "a"), "v2")  # entering enforce: signed
    assert env.kernel() == (2, ENFORCE, True)


def test_break_glass_is_the_recorded_exit_then_unsigned_audit_applies(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    env.lc.break_glass("INC-9 deploys blocked")
    assert env.kernel() == (1, AUDIT, True)
    assert env.last()["action"] == "break-glass"
    env.lc.apply(env.toml(2, "a", mode="audit"), "unsigned")  # enforce is off: admitted
    assert env.kernel() == (2, AUDIT, True)


def test_rollback_into_unsigned_audit_while_enforcing_is_refused(env) -> None:
    env.lc.apply(env.toml(1, "a", mode="audit"), "unsigned-v1")  # nothing enforced yet
    env.lc.apply(env.signed(2, "ab"), "v2")
    with pytest.raises(SignatureError, match="would run it in audit mode"):
        env.lc.rollback(to_version=1)
    assert env.kernel() == (2, ENFORCE, True)
    assert (env.last()["action"], env.last()["result"]) == ("rollback", "refused")


def test_rollback_into_a_signed_audit_generation_is_allowed(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    env.lc.apply(env.signed(2, "a", mode="audit"), "v2")
    env.lc.apply(env.signed(3, "ab"), "v3")
    rb = env.lc.rollback(to_version=2)
    assert rb.mode == "audit" and env.kernel()[1:] == (AUDIT, True)


def test_canary_rollback_still_restores_what_ran_before(env) -> None:
    env.lc.apply(env.toml(1, "a", mode="audit"), "unsigned-v1")
    out = env.lc.apply_with_canary(env.signed(2, "ab"), "v2", canary_seconds=1.0,
                                   max_deny_rate=0.0, read_denies=lambda g: {"n": g * 10},
                                   sleep=lambda s: None)
    assert out.passed is True  # the fake deny counter did not move
    hot = iter([{"n": 0}, {"n": 100}])
    out = env.lc.apply_with_canary(env.signed(3, "abc"), "v3", canary_seconds=1.0,
                                   max_deny_rate=1.0, read_denies=lambda g: next(hot),
                                   sleep=lambda s: None)
    assert not out.passed and out.rollback is not None
    assert env.kernel()[0] == out.apply.previous_generation


# ============================================================== anti-rollback state
def test_deleting_versions_json_does_not_let_v1_back(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    v1 = env.signed(1, "a")
    env.lc.apply(env.signed(2, "ab"), "v2")
    (env.state / "versions.json").unlink()
    with pytest.raises(SignatureError, match="older than v2"):
        env.new().apply(v1, "v1-replayed")
    assert env.kernel() == (2, ENFORCE, True)
    # rebuilt from the verified provenance chain, written back, and recorded
    restored = [r for r in env.lc.log.records() if r["action"] == RESTORE_ACTION]
    assert len(restored) == 1 and restored[0]["versions"] == {"web": 2}
    assert "is missing" in restored[0]["reason"]
    assert json.loads((env.state / "versions.json").read_bytes())["web"]["high_water"] == 2
    assert env.lc.log.verify().ok
    env.new().apply(env.signed(3, "abc"), "v3")  # the next version goes on as before


def test_corrupt_versions_json_is_rebuilt_never_zero(env) -> None:
    env.lc.apply(env.signed(5, "a"), "v5")
    (env.state / "versions.json").write_text("{garbage")
    assert env.new().counter.get("web").high_water == 5  # read-only callers see the rebuild
    with pytest.raises(SignatureError, match="older than v5"):
        env.new().apply(env.signed(4, "a"), "v4")
    assert (env.state / "versions.json.corrupt").read_text() == "{garbage"


def test_unsigned_audit_applies_do_not_count_in_the_rebuild(env) -> None:
    env.lc.apply(env.toml(7, "a", mode="audit"), "unsigned-v7")
    env.lc.apply(env.signed(2, "a"), "signed-v2")
    (env.state / "versions.json").unlink()
    assert env.new().counter.get("web").high_water == 2


def test_missing_counter_with_a_broken_chain_is_a_refusal(env) -> None:
    env.lc.apply(env.signed(2, "a"), "v2")
    lines = env.lc.log.path.read_bytes().splitlines(keepends=True)
    edited = lines[-1].replace(b'"version":2', b'"version":0')
    env.lc.log.path.write_bytes(b"".join(lines[:-1]) + edited)
    (env.state / "versions.json").unlink()
    with pytest.raises(StateError) as ei:
        env.new().apply(env.signed(1, "a"), "v1")
    msg = str(ei.value)
    assert "\n" not in msg and "chain" in msg and "restore" in msg and "backup" in msg
    assert env.kernel()[0] == 1


def test_missing_counter_and_missing_log_is_a_refusal_not_a_fresh_start(env) -> None:
    env.lc.apply(env.signed(2, "a"), "v2")
    for name in ("versions.json", "provenance.jsonl", "provenance.head"):
        (env.state / name).unlink()
    with pytest.raises(StateError, match="no provenance log"):
        env.new().apply(env.signed(1, "a"), "v1")


def test_fresh_state_dir_starts_from_zero(tmp_path) -> None:
    e = Env(tmp_path)  # key-add is logged: a provenance log exists, no apply in it
    e.lc.apply(e.signed(1, "a"), "v1")
    assert e.lc.counter.get("web").high_water == 1


# ============================================================== modes
def test_state_dir_modes_after_a_real_apply_whatever_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        e = Env(tmp_path)
        e.lc.apply(e.signed(1, "a"), "v1")
        e.lc.apply(e.signed(2, "ab"), "v2")
        e.lc.rollback()
        e.lc.break_glass("drill")
        e.lc.clear_break_glass("drill over")
        (e.state / "versions.json").unlink()  # and a rebuilt counter
        e.new().apply(e.signed(3, "abc"), "v3")
    finally:
        os.umask(old)
    seen = []
    for dirpath, _dirs, filenames in os.walk(e.state):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        seen.append(os.path.relpath(dirpath, e.state))
        for f in filenames:
            p = os.path.join(dirpath, f)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
            seen.append(os.path.relpath(p, e.state))
    for must in ("generations", "generations/1.json", "generations/1.signed",
                 "generations/1.toml", "keys", "keys/trust.json", "versions.json",
                 "provenance.jsonl", "provenance.head", "lifecycle.lock", "."):
        assert must in seen, must


def test_an_existing_readable_state_dir_is_tightened(tmp_path) -> None:
    e = Env(tmp_path)
    os.chmod(e.state, 0o755)
    os.chmod(e.state / "keys", 0o755)
    e.lc.apply(e.signed(1, "a"), "v1")
    assert stat.S_IMODE(os.stat(e.state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(e.state / "keys").st_mode) == 0o700


# ============================================================== tamper detection
def _active_rule_keys(maps: PolicyMaps) -> list[bytes]:
    slot = slots.read_state(maps).active_slot
    return [k for k in maps.rules.keys() if abi.INODE_KEY.unpack(k)[2] == slot]


def _codes(ic: IntegrityChecker) -> dict:
    return {c: w for c, w in ic.conditions().items() if w}


def test_clean_generation_has_no_findings(env) -> None:
    env.lc.apply(env.signed(1, "ab"), "v1")
    env.lc.apply(env.signed(2, "abc"), "v2")
    assert _codes(env.checker()) == {}


@pytest.mark.parametrize("how", ["tamper-rule", "delete-rule", "add-rule", "flip-mode",
                                 "flip-slot", "invalidate", "scope", "counts"])
def test_map_writes_outside_aegis_are_reported_and_restore_clears(env, how) -> None:
    env.lc.apply(env.signed(1, "ab"), "v1")
    env.lc.apply(env.signed(2, "abc"), "v2")
    ic = env.checker()
    assert _codes(ic) == {}
    m = env.maps
    st = slots.read_state(m)
    s = st.active_slot
    cfg_before = m.config.lookup(slots.slot_key(s))
    ctl_before = m.config.lookup(slots.CONTROL_KEY)
    saved: list[tuple] = []
    if how in ("tamper-rule", "delete-rule"):
        key = _active_rule_keys(m)[0]
        saved.append((m.rules, key, m.rules.lookup(key)))
        if how == "delete-rule":
            m.rules.delete(key)
        else:  # the rule keeps its key, loses its actions (bpftool map update ... value 0)
            rid = abi.RULE.unpack(m.rules.lookup(key))[0]
            m.rules.update(key, abi.RULE.pack(rid, 0, 0, 0))
    elif how == "add-rule":
        key = abi.INODE_KEY.pack(424242, 8 << 20 | 1, s)
        m.rules.update(key, abi.RULE.pack(0, abi.ACTION_BITS["open"], 0, 0))
        saved.append((m.rules, key, None))
    elif how == "flip-mode":
        slots.set_slot_mode(m, s, AUDIT)
    elif how == "flip-slot":
        slots.activate(m, 1 - s)  # the kept generation 1, valid and intact
    elif how == "invalidate":
        slots.deactivate_all(m)
    elif how == "scope":
        cg = abi.SCOPE_KEY.pack(777, s, 0)
        m.scopes.update(cg, abi.SCOPE.pack(0, 0))
        saved.append((m.scopes, cg, None))
    elif how == "counts":
        gen, mode, flags, rc, sc = abi.SLOT_CONFIG.unpack(cfg_before)
        m.config.update(slots.slot_key(s), abi.SLOT_CONFIG.pack(gen, mode, flags, rc + 1, sc))
    found = _codes(ic)
    assert set(found) == {TAMPERED}, found
    assert found[TAMPERED].startswith("policy tampered: ")
    if how == "delete-rule":
        assert "missing r-" in found[TAMPERED]
    if how == "tamper-rule":
        assert "changed r-" in found[TAMPERED]
    if how == "flip-mode":
        assert "is in audit mode, but it was activated in enforce mode" in found[TAMPERED]
    if how == "flip-slot":
        assert "last activation recorded is generation 2" in found[TAMPERED]
    # restore what bpftool changed: clean again on the next check
    for handle, key, val in saved:
        if val is None:
            handle.delete(key)
        else:
            handle.update(key, val)
    m.config.update(slots.slot_key(s), cfg_before)
    m.config.update(slots.CONTROL_KEY, ctl_before)
    assert _codes(ic) == {}


def test_status_without_an_agent_checks_the_maps_itself(env) -> None:
    """``aegis status`` with no agent running (nothing checks every tick): it runs the tamper
    check once on the pinned maps, so a bpftool write is not reported as "enforcing"."""
    from aegis_stream.agent.status import AgentFacts, facts_from_maps, judge_coded, tamper_findings

    env.lc.apply(env.signed(1, "ab"), "v1")
    links = dict.fromkeys(abi.HOOK_PROGRAMS.values(), True)
    assert tamper_findings(env.maps, env.state) == []
    env.maps.rules.delete(_active_rule_keys(env.maps)[0])  # bpftool map delete
    found = tamper_findings(env.maps, env.state)
    assert [f.code for f in found] == [TAMPERED] and "missing r-" in found[0].text
    facts = facts_from_maps("/sys/fs/bpf/aegis", links, env.maps, None)
    facts.tamper = found
    gone = AgentFacts("/nonexistent/status.json", None, False, None)
    report, codes = judge_coded(facts, gone)
    assert report.state == "degraded" and TAMPERED in codes, report
    assert any("policy tampered" in r for r in report.reasons)
    # an agent that runs reports its own tick check: the status command does not add its own
    alive = AgentFacts("/x/status.json", None, True, 0.0)
    assert TAMPERED not in judge_coded(facts, alive)[1]


def test_legitimate_operations_never_look_like_tampering(env) -> None:
    """A check after every step of every lifecycle operation: none reports tampering
    (a step between the kernel write and its record is deferred, not reported)."""
    ic = env.checker(grace_s=60)
    seen: list[tuple[str, dict]] = []

    def hook(step: str) -> None:
        seen.append((step, _codes(ic)))

    lc = env.new(hook=hook)
    lc.apply(env.signed(1, "a"), "v1")
    lc.apply(env.signed(2, "ab"), "v2")
    lc.rollback()  # flip
    lc.apply(env.signed(3, "abc"), "v3")
    lc.apply(env.signed(4, "abcd"), "v4")
    lc.rollback(to_version=1)  # reapply
    lc.apply(env.signed(5, "a", mode="audit"), "v5")
    assert seen and all(TAMPERED not in c for _, c in seen), [s for s in seen if s[1]]
    assert _codes(ic) == {}
    lc.break_glass("drill")
    assert set(_codes(ic)) == {BREAK_GLASS}
    lc.clear_break_glass("over")
    assert _codes(ic) == {}  # still audit by the recorded break-glass: not tampering
    out = lc.apply(env.signed(6, "ab"), "v6")
    assert _codes(ic) == {} and env.kernel() == (out.generation, ENFORCE, True)


def test_break_glass_deactivate_is_loud_not_tampering(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    env.lc.break_glass("INC-2", deactivate=True)
    found = _codes(env.checker())
    assert set(found) == {BREAK_GLASS}
    assert "INC-2" in found[BREAK_GLASS] and "nothing is decided" in found[BREAK_GLASS]


def test_mismatch_while_the_lock_is_held_waits_out_the_grace(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    now = [100.0]
    ic = env.checker(clock=lambda: now[0], grace_s=5.0)
    slots.set_slot_mode(env.maps, slots.read_state(env.maps).active_slot, AUDIT)
    fd = os.open(env.state / "lifecycle.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as an apply between its kernel write and its record
        rep = ic.check()
        assert rep.deferred and not rep.tampered
        now[0] += 5.0
        assert ic.check().tampered  # whoever holds the lock, not for ever
    finally:
        os.close(fd)


def test_fresh_maps_after_a_reboot_are_not_tampering(env, tmp_path) -> None:
    """Pins gone (reboot, unload), the agent loads fresh maps: nothing is active, which
    no_policy reports; the provenance log's last apply is no tamper finding."""
    env.lc.apply(env.signed(1, "a"), "v1")
    fresh = PolicyMaps.fake(64)
    slots.activate(fresh, 0)
    assert _codes(IntegrityChecker(fresh, env.state)) == {}


def test_generation_without_a_record_is_reported(env) -> None:
    env.lc.apply(env.signed(1, "a"), "v1")
    s = slots.read_state(env.maps).active_slot
    gen, mode, flags, rc, sc = abi.SLOT_CONFIG.unpack(env.maps.config.lookup(slots.slot_key(s)))
    env.maps.config.update(slots.slot_key(s), abi.SLOT_CONFIG.pack(99, mode, flags, rc, sc))
    found = _codes(env.checker())
    assert "generation 99" in found[TAMPERED] and "no readable record" in found[TAMPERED]


# ============================================================== through the ticker
def _pipeline(kernel: FakeKernel, env: Env, tmp_path, now: list[float]) -> Pipeline:
    sink = MemorySink()
    p = Pipeline(kernel.consumers(), fixed_normaliser(env.lc.store), [sink], kernel.view(),
                 config=PipelineConfig(spool_dir=None, tick_s=1.0,
                                       degraded=DegradedConfig(recover_s=3.0)),
                 clock=lambda: now[0])
    p.ticker.checks.append(env.checker(clock=lambda: now[0]).conditions)
    return p


@pytest.mark.parametrize("how", ["tamper-rule", "flip-mode", "delete-rule"])
def test_ticker_degraded_within_one_tick_and_back(tmp_path, how) -> None:
    kernel = FakeKernel()
    try:
        env = Env(tmp_path, maps=kernel.policy_maps)
        env.lc.apply(env.signed(1, "ab"), "v1")
        now = [10.0]
        p = _pipeline(kernel, env, tmp_path, now)
        tk = p.ticker
        tr, _ = tk.tick()
        assert tr is not None and tr.state is State.ENFORCING
        m = kernel.policy_maps
        s = slots.read_state(m).active_slot
        key = _active_rule_keys(m)[0]
        val = m.rules.lookup(key)
        cfg = m.config.lookup(slots.slot_key(s))
        if how == "tamper-rule":
            m.rules.update(key, abi.RULE.pack(abi.RULE.unpack(val)[0], 0, 0, 0))
        elif how == "delete-rule":
            m.rules.delete(key)
        else:
            slots.set_slot_mode(m, s, AUDIT)
        now[0] += 1.0
        tr, _ = tk.tick()  # the very next tick
        assert tr is not None and tr.state is State.DEGRADED
        ev = tk.state_event(tr)
        assert ev.reason_codes == [TAMPERED] and ev.reasons[0].startswith("policy tampered")
        assert p.statistics().reason_codes == (TAMPERED,)
        m.rules.update(key, val)
        m.config.update(slots.slot_key(s), cfg)
        for _ in range(5):  # better states wait out recover_s (3 s): hysteresis
            now[0] += 1.0
            tr2, _ = tk.tick()
            if tr2 is not None:
                break
        assert tr2 is not None and tr2.state is State.ENFORCING and tr2.codes == []
    finally:
        kernel.close()


def test_ticker_reports_break_glass_loudly(tmp_path) -> None:
    """Break-glass: degraded with its code in the state event, the status reasons and the
    aegis_state_reason metric."""
    from prometheus_client.parser import text_string_to_metric_families

    from aegis_stream.pipeline.metrics import AegisMetrics

    kernel = FakeKernel()
    try:
        env = Env(tmp_path, maps=kernel.policy_maps)
        env.lc.apply(env.signed(1, "ab"), "v1")
        now = [10.0]
        p = _pipeline(kernel, env, tmp_path, now)
        p.ticker.tick()
        env.lc.break_glass("INC-7 logins failing")
        now[0] += 1.0
        tr, _ = p.ticker.tick()
        assert tr is not None and tr.state is State.DEGRADED and tr.codes == [BREAK_GLASS]
        assert "INC-7 logins failing" in tr.reasons[0]
        text = AegisMetrics(p.statistics).exposition().decode()
        got = {s.labels.get("reason"): s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == "aegis_state_reason"}
        assert got["break_glass"] == 1 and got["policy_tampered"] == 0
    finally:
        kernel.close()


# ============================================================== cost
def _big(e: Env, n: int) -> None:
    """Two signed generations of ``n`` inode rules each (both slots full)."""
    rules = "".join(f'[[rules]]\nid = "r{i}"\ninode = "8:1:{1000 + i}"\n\n' for i in range(n))
    doc = f'apiVersion = "aegis/v1"\nname = "big"\nversion = 1\nmode = "enforce"\n\n{rules}'
    e.lc.apply(signing.sign_policy(doc.encode(), e.key, "k1"), "big")
    e.lc.apply(signing.sign_policy(doc.replace("version = 1", "version = 2").encode(),
                                   e.key, "k1"), "big2")


def test_check_cost_on_many_rules(tmp_path) -> None:
    """The per-tick cost with 2,000 rules in each slot on the fake kernel's maps (printed;
    10,000 rules, fake and real maps: python -m bench.integrity_bench)."""
    e = Env(tmp_path, maps=PolicyMaps.fake())
    _big(e, 2000)
    ic = e.checker()
    assert _codes(ic) == {}  # first check: loads the record, builds the expected table
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert _codes(ic) == {}
        times.append(time.perf_counter() - t0)
    per_tick = sorted(times)[len(times) // 2]
    print(f"\nintegrity check, 2,000 rules x 2 slots, fake maps: {per_tick * 1e3:.1f} ms/tick")
    assert per_tick < 0.5  # one tick is 1 s by default; generous for a loaded CI box
    e.maps.rules.delete(_active_rule_keys(e.maps)[123])
    assert TAMPERED in _codes(ic)


# ============================================================== real BPF maps (no LSM needed)
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2


def _create_map(kind: int, name: str, ks: int, vs: int, n: int):
    import ctypes

    from aegis_stream.kernel import libbpf
    from aegis_stream.kernel.maps import FdMap

    fn = libbpf.lib().bpf_map_create
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                   ctypes.c_uint32, ctypes.c_void_p]
    fd = fn(kind, name.encode()[:15], ks, vs, n, None)
    if fd < 0:
        pytest.skip(f"this host cannot create BPF maps (errno {-fd}): the kernel lab covers it")
    return FdMap(name, fd, owns_fd=True)


@pytest.fixture
def real_maps():
    rules = _create_map(BPF_MAP_TYPE_HASH, "t_rules", abi.INODE_KEY.size, abi.RULE.size,
                        2 * 16384)
    scopes = _create_map(BPF_MAP_TYPE_HASH, "t_scopes", abi.SCOPE_KEY.size, abi.SCOPE.size, 256)
    config = _create_map(BPF_MAP_TYPE_ARRAY, "t_config", 4, abi.SLOT_CONFIG.size,
                         abi.MAP_MAX_ENTRIES[abi.MAP_CONFIG])
    yield PolicyMaps(rules=rules, scopes=scopes, config=config)
    for m in (rules, scopes, config):
        m.close()


def test_real_bpf_maps_batch_read_and_tamper(tmp_path, real_maps, monkeypatch) -> None:
    """The check on real BPF hash maps (batched reads, several batches): a deleted rule is
    found and restoring it clears; the batched read equals get_next_key + lookup."""
    from aegis_stream.agent import integrity

    monkeypatch.setattr(integrity, "BATCH", 256)  # 4,000 entries: 16 batches
    e = Env(tmp_path, maps=real_maps)
    _big(e, 2000)
    m = real_maps.rules
    items = integrity.map_items(m)
    assert sorted(items) == sorted((k, m.lookup(k)) for k in m.keys()) and len(items) == 4000
    ic = e.checker()
    assert _codes(ic) == {}
    key = _active_rule_keys(real_maps)[1234]
    val = m.lookup(key)
    assert m.delete(key)
    found = _codes(ic)
    assert "missing r" in found[TAMPERED]
    m.update(key, val)
    assert _codes(ic) == {}
