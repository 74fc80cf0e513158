"""Path continuity, kernel side (issue 12 part 1): the rule entries the agent writes, the fake
kernel's model of the lsm/inode_rename program, and how its absence or its counters are
reported.  The program itself is proven in the lab (tests/kernel/test_path_continuity.py)."""

from __future__ import annotations

from aegis_stream.agent import status
from aegis_stream.agent.health import ReasonCode, continuity_reason, hooks_reason
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.counters import read_continuity_counters
from aegis_stream.kernel.events import decode_raw
from aegis_stream.kernel.loader import OPTIONAL_PROGRAMS, AttachReport, ProgramStatus
from aegis_stream.pipeline.metrics import AegisCollector
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope
from aegis_stream.processors.degraded import DegradedConfig, DegradedMonitor, HealthSample
from aegis_stream.testing import DEV_SDA1, FakeKernel
from aegis_stream.testing._kernel import FakeTask

HOOKS = [abi.HOOK_NAMES[h] for h in abi.Hook]
CONT = abi.AUX_PROGRAMS[abi.PROGRAM_CONTINUITY]
CG = (1, 50)


def _policy(*rules: CompiledRule) -> CompiledPolicy:
    return CompiledPolicy("p", 1, "enforce", "sha256:x", list(rules), [CompiledScope(0, "/sys/fs/cgroup/x", 50)])


def _kernel(*rules: CompiledRule) -> FakeKernel:
    k = FakeKernel()
    slots.swap(k.policy_maps, _policy(*rules), 3, int(abi.Mode.ENFORCE))
    return k


def _entry(k: FakeKernel, ino: int, slot: int) -> tuple[int, int, int, int] | None:
    raw = k.policy_maps.rules.lookup(abi.INODE_KEY.pack(ino, DEV_SDA1, slot))
    return None if raw is None else abi.RULE.unpack(raw)


def _open(k: FakeKernel, ino: int) -> int:
    return k.decide(abi.Hook.FILE_OPEN, DEV_SDA1, ino, abi.ACTION_OPEN, FakeTask(cgroups=CG))


PATH_RULE = CompiledRule(0, "shadow", "/etc/shadow", DEV_SDA1, 100, abi.ACTION_OPEN, "ext4", 7)
INODE_RULE = CompiledRule(1, "ino", "inode:8:1:200", DEV_SDA1, 200, abi.ACTION_OPEN, "ext4")


def test_path_rules_carry_rule_path_and_inode_rules_do_not():
    """A rule compiled from a path is written with RULE_PATH and its i_generation; a rule given
    by inode with neither."""
    k = _kernel(PATH_RULE, INODE_RULE)
    slot = slots.read_state(k.policy_maps).active_slot
    assert _entry(k, 100, slot) == (0, abi.ACTION_OPEN, abi.RULE_PATH, 7)
    assert _entry(k, 200, slot) == (1, abi.ACTION_OPEN, 0, 0)


def test_rename_over_a_path_rule_passes_it_on_and_the_event_says_inherited():
    k = _kernel(PATH_RULE)
    slot = slots.read_state(k.policy_maps).active_slot
    assert _open(k, 300) == 0
    k.rename(DEV_SDA1, 300, 11, 100)  # passwd: shadow+ (ino 300) renamed over shadow (ino 100)
    assert _entry(k, 300, slot) == (0, abi.ACTION_OPEN, abi.RULE_PATH | abi.RULE_INHERITED, 11)
    assert _entry(k, 100, slot) is not None  # the replaced inode keeps its rule
    k.policy_maps.rules.delete(abi.INODE_KEY.pack(100, DEV_SDA1, 1 - slot))  # (none: one slot)
    assert _open(k, 300) == -1
    (rec,) = k.consumers()["deny"].drain(16)
    ev = decode_raw(rec)
    assert ev.inherited and ev.rule_flags == abi.RULE_PATH | abi.RULE_INHERITED and ev.ino == 300
    assert read_continuity_counters(k.maps())["inherited"] == 1


def test_inode_rules_new_names_and_live_entries_are_not_overwritten():
    k = _kernel(PATH_RULE, INODE_RULE)
    slot = slots.read_state(k.policy_maps).active_slot
    k.rename(DEV_SDA1, 300, 1, 200)  # over an inode rule: nothing
    k.rename(DEV_SDA1, 301, 1, None)  # to a new name: nothing
    assert _entry(k, 300, slot) is None and _entry(k, 301, slot) is None
    k.rename(DEV_SDA1, 200, 0, 100)  # a file with its own (live) rule: it keeps it
    assert _entry(k, 200, slot) == (1, abi.ACTION_OPEN, 0, 0)
    got = read_continuity_counters(k.maps())
    assert (got["inherited"], got["kept"]) == (0, 1)


def test_a_stale_entry_of_the_source_is_replaced_and_a_stale_target_passes_nothing():
    """ext4 hands a deleted file's number to the next new file: an entry that checks its
    i_generation and no longer matches is not the new file's, so the inheritance replaces it;
    a target whose own entry is stale is not the path's file and passes nothing on."""
    stale = CompiledRule(1, "old", "/etc/old", DEV_SDA1, 300, abi.ACTION_EXEC, "ext4", 5)
    k = _kernel(PATH_RULE, stale)
    slot = slots.read_state(k.policy_maps).active_slot
    for ino in (100, 300):  # as the GAP-INO-REUSE compiler would write them
        key = abi.INODE_KEY.pack(ino, DEV_SDA1, slot)
        rid, act, fl, gen = abi.RULE.unpack(k.policy_maps.rules.lookup(key))
        k.policy_maps.rules.update(key, abi.RULE.pack(rid, act, fl | abi.RULE_CHECK_GEN, gen))
    k.rename(DEV_SDA1, 300, 9, 100, dst_gen=7)
    assert _entry(k, 300, slot) == (0, abi.ACTION_OPEN,
                                    abi.RULE_PATH | abi.RULE_CHECK_GEN | abi.RULE_INHERITED, 9)
    k.rename(DEV_SDA1, 400, 1, 100, dst_gen=8)  # 100 is now another file than the rule's
    assert _entry(k, 400, slot) is None
    got = read_continuity_counters(k.maps())
    assert (got["inherited"], got["stale_target"]) == (1, 1)


def test_rename_exchange_is_two_calls_and_both_sides_end_protected():
    k = _kernel(PATH_RULE)
    slot = slots.read_state(k.policy_maps).active_slot
    k.rename(DEV_SDA1, 100, 7, 300)  # the swapped call first: 100 onto 300 (no rule): nothing
    k.rename(DEV_SDA1, 300, 2, 100)  # then 300 onto the path's inode: inherits
    assert _entry(k, 300, slot)[2] & abi.RULE_INHERITED
    assert _entry(k, 100, slot)[2] == abi.RULE_PATH


def test_a_full_rule_map_is_counted_as_an_inherit_failure():
    k = _kernel(PATH_RULE)
    k.policy_maps.rules.max_entries = len(k.policy_maps.rules.keys())
    k.rename(DEV_SDA1, 300, 1, 100)
    got = read_continuity_counters(k.maps())
    assert (got["inherit_failed"], got["last_errno"]) == (1, 7)  # E2BIG


def test_staging_digest_ignores_inherited_entries():
    """Inherited entries are the kernel's, not the generation's: a read-back digest of the slot
    still matches what the agent wrote (a stage racing a rename is not a mismatch)."""
    k = _kernel(PATH_RULE)
    st = slots.read_state(k.policy_maps)
    cp = _policy(PATH_RULE)
    before = slots.slot_digest(k.policy_maps, st.active_slot)
    k.rename(DEV_SDA1, 300, 1, 100)
    assert slots.slot_digest(k.policy_maps, st.active_slot) == before
    assert before == slots.expected_digest(cp, st.active_slot)


# --- reporting ---------------------------------------------------------------------------

def test_continuity_program_missing_is_degraded_not_a_missing_hook():
    """Every decision hook attached, lsm/inode_rename not: enforcing-capable, and the state is
    degraded with path_continuity_unavailable (never hooks_missing)."""
    assert hooks_reason([*HOOKS, CONT], HOOKS) is None
    r = continuity_reason([*HOOKS, CONT], HOOKS)
    assert r is not None and r.code is ReasonCode.PATH_CONTINUITY_UNAVAILABLE
    assert continuity_reason([*HOOKS, CONT], [*HOOKS, CONT]) is None
    assert continuity_reason(HOOKS, HOOKS) is None  # not expected (an older agent): no finding
    m = DegradedMonitor(DegradedConfig(recover_s=0))
    state, why = m.judge(HealthSample(now=0.0, hooks_expected=[*HOOKS, CONT], hooks_attached=HOOKS,
                                      mode="enforce", generation=3, ring_fill={}, consumer_lag_bytes={},
                                      consumed_records={}, drop_ratio={}))
    assert state == "degraded" and [w.code for w in why] == [ReasonCode.PATH_CONTINUITY_UNAVAILABLE]


def test_attach_report_optional_program():
    progs = {p: ProgramStatus(p, abi.HOOK_NAMES[h], phase="attached") for h, p in abi.HOOK_PROGRAMS.items()}
    (opt,) = OPTIONAL_PROGRAMS
    progs[opt] = ProgramStatus(opt, CONT, phase="failed", error="attach refused (injected)")
    rep = AttachReport(progs)
    assert rep.enforcing_capable and [p.name for p in rep.degraded_optional] == [opt]
    assert rep.summary().startswith(f"all {len(HOOKS)} decision hooks attached; degraded, not attached: "
                                    f"{CONT}")
    progs[abi.HOOK_PROGRAMS[abi.Hook.FILE_OPEN]].phase = "failed"
    assert not rep.enforcing_capable
    assert rep.summary().startswith(f"partial attach: {len(HOOKS) - 1}/{len(HOOKS)} hooks")


def test_status_names_the_missing_continuity_program():
    links = {p: True for p in abi.HOOK_PROGRAMS.values()} | {abi.PROGRAM_CONTINUITY: False}
    facts = status.KernelFacts(True, "/sys/fs/bpf/aegis", links, 7, "enforce", 1, {})
    agent = status.AgentFacts("/nonexistent/status.json", status.StatusFile(), False, 0.0)
    rep = status.judge(facts, agent)
    assert ReasonCode.PATH_CONTINUITY_UNAVAILABLE in rep.reason_codes
    assert [h.hook for h in rep.hooks][-1] == CONT and not rep.hooks[-1].pinned


def test_metrics_export_the_continuity_counters():
    k = _kernel(PATH_RULE)
    k.rename(DEV_SDA1, 300, 1, 100)
    snap = k.view().counters()
    assert snap.continuity["inherited"] == 1

    class _St:
        kernel = snap

    fams = {f.name: f for f in AegisCollector(lambda: None).describe()}
    assert {"aegis_path_rule_inherited", "aegis_path_rule_inherit_failed"} <= set(fams)
    from aegis_stream.pipeline.metrics import KernelCountersCollector, Sources

    got = {f.name: f.samples[0].value for f in KernelCountersCollector(Sources(lambda: _St())).families(_St())
           if f.name.startswith("aegis_path_rule")}
    assert got == {"aegis_path_rule_inherited": 1, "aegis_path_rule_inherit_failed": 0}
