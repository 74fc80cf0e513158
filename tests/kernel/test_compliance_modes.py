"""Edge-case compliance: modes and lifecycle (MODE-010 onwards, LIFE-010 onwards).

Audit vs enforce on every hook, ring separation, mode switch and policy swap under load
(exact accounting via the per-rule counters), full ring buffers (the decision never
changes, the lost event is counted), no valid generation, refused policies, descriptors and
mappings that predate the policy.
"""

from __future__ import annotations

import json
import os

import pytest

from aegis_stream.errors import PolicyError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.counters import read_counters
from aegis_stream.kernel.events import decode_raw

from .conftest import EPERM, PROBE, Lab, assert_deny_event

EVENT_RECORD = abi.EVENT.size + 8  # 8-byte ring header, 8-byte aligned


def rule(f, actions=("open",), rid="deny") -> dict:
    return {"id": rid, "path": str(f), "actions": list(actions)}


def hook_ctr(lab: Lab, hook: str = "file_open") -> dict[str, int]:
    return dict(read_counters(lab.maps)["hooks"][hook])


def rule_ctr(lab: Lab, generations: set[int], rule_id: int = 0, hook="file_open") -> tuple[int, int]:
    rows = [r for r in read_counters(lab.maps)["rules"]
            if r["generation"] in generations and r["rule_id"] == rule_id and r["hook"] == hook]
    return sum(r["denied"] for r in rows), sum(r["audited"] for r in rows)


def retired_ctr(lab: Lab, hook="file_open") -> tuple[int, int]:
    """(denied, audited) folded in from generations whose per-rule keys were pruned."""
    r = read_counters(lab.maps)["retired"][hook]
    return r["denied"], r["audited"]


# --- audit vs enforce ----------------------------------------------------------------------

def test_mode_010_audit_exec_allowed_and_emitted(lab: Lab):
    """MODE-010: audit mode: the exec runs, an audit event names bprm_check."""
    b = lab.binary("bin/audited-true")
    lab.apply([rule(b, ("exec",))], mode="audit")
    out = lab.probe("exec", b)
    assert out.returncode == 0 and out.stdout == ""  # became /bin/true
    assert_deny_event(lab, b, hook=abi.Hook.BPRM_CHECK, action=abi.ACTION_EXEC,
                      decision=abi.Decision.AUDIT)


def test_mode_011_audit_mmap_exec_allowed_and_emitted(lab: Lab):
    """MODE-011: audit mode: a PROT_EXEC mapping succeeds, an audit event names mmap_file."""
    b = lab.binary("bin/audited-lib")
    lab.apply([rule(b, ("exec",))], mode="audit")
    assert lab.probe("mmap_exec", b).result == {"ok": True}
    assert_deny_event(lab, b, hook=abi.Hook.MMAP_FILE, action=abi.ACTION_EXEC,
                      decision=abi.Decision.AUDIT)


def _ring(lab: Lab, name: str, ino: int) -> list:
    return [e for e in (decode_raw(r) for r in lab.rings[name].drain(1 << 16)) if e.ino == ino]


def test_mode_012_deny_and_audit_rings_are_separate(lab: Lab):
    """MODE-012: enforce decisions go to the deny ring only, audit decisions to the audit
    ring only (a flood of audits cannot crowd out denies)."""
    f = lab.file("secret")
    ino = os.stat(f).st_ino
    lab.apply([rule(f)])
    assert lab.probe("read", f).errno == EPERM
    assert len(_ring(lab, "deny", ino)) == 1 and _ring(lab, "audit", ino) == []
    lab.apply([rule(f)], mode="audit")
    assert lab.probe("read", f).result == {"ok": True}
    assert _ring(lab, "deny", ino) == [] and len(_ring(lab, "audit", ino)) == 1


def test_mode_013_audit_respects_scope(lab: Lab):
    """MODE-013: audit mode is scoped like enforce: a descendant is audited, a process
    outside the scope produces nothing."""
    f = lab.file("secret")
    lab.apply([rule(f)], mode="audit")
    assert lab.probe("read", f, cgroup=lab.cg_other).result == {"ok": True}
    assert lab.probe("read", f, cgroup=lab.cg_child).result == {"ok": True}
    evs = lab.events_for(f)
    assert len(evs) == 1 and evs[0].decision == abi.Decision.AUDIT
    assert evs[0].cgroup_id == os.stat(lab.cg_child).st_ino


# --- under load -----------------------------------------------------------------------------

LOAD_N = 100_000  # long enough for several Lifecycle.apply switches under TCG (20,000 finished
# before the second signed apply on 7.2 once the suite went through the product path)


def _under_load(lab: Lab, f, policies: list[tuple[list[dict], str]]):
    """Run LOAD_N opens of f in scope while cycling through ``policies`` (rules, mode);
    return (loop result, events on f, generations applied during the load, counters)."""
    ino = os.stat(f).st_ino
    before = hook_ctr(lab)
    retired_before = retired_ctr(lab)
    p = lab.spawn([PROBE, "open_loop", str(f), str(LOAD_N)])
    events, gens, i = [], [], 0
    while p.poll() is None:
        rules, mode = policies[i % len(policies)]
        gens.append(lab.apply(rules, mode=mode, drain=False).generation)
        events += lab.drain()
        i += 1
    out, _ = p.communicate(timeout=120)
    events += lab.drain()
    after = hook_ctr(lab)
    delta = {k: after[k] - before[k] for k in after}
    # staging prunes the per-rule keys of retired generations into the retired totals
    retired = retired_ctr(lab)
    delta["retired_denied"] = retired[0] - retired_before[0]
    delta["retired_audited"] = retired[1] - retired_before[1]
    return json.loads(out.strip().splitlines()[-1]), [e for e in events if e.ino == ino], gens, delta


def test_mode_014_mode_switch_under_load(lab: Lab):
    """MODE-014: audit <-> enforce switched repeatedly while a process opens the file LOAD_N
    times: every open got exactly one decision, each decision matches the mode of the
    generation that took it, and the per-rule counters account for every open."""
    f = lab.file("secret")
    first = lab.apply([rule(f)], mode="audit")
    r, evs, gens, delta = _under_load(lab, f, [([rule(f)], "enforce"), ([rule(f)], "audit")])
    assert len(gens) >= 2, f"the load finished before two switches: {gens}"
    mode_of = {a.generation: a.mode for a in lab.applied}
    for e in evs:
        want = abi.Decision.DENY if mode_of[e.generation] == "enforce" else abi.Decision.AUDIT
        assert e.decision == want and e.mode == (want == abi.Decision.DENY), e
    assert r["other"] == 0 and r["opened"] + r["eperm"] == LOAD_N
    assert r["eperm"] > 0 and r["opened"] > 0, r
    denied, audited = rule_ctr(lab, {first.generation, *gens})
    denied, audited = denied + delta["retired_denied"], audited + delta["retired_audited"]
    assert (denied, audited) == (r["eperm"], r["opened"])
    assert len(evs) + delta["ringbuf_fail"] == LOAD_N


def test_mode_015_policy_swap_under_load(lab: Lab):
    """MODE-015: the rule set alternates between {A} and {B} while a process opens A LOAD_N
    times: A is denied exactly by the generations that contain it, never by the others."""
    a, b = lab.file("gen-a"), lab.file("gen-b")
    first = lab.apply([rule(a)])
    r, evs, gens, delta = _under_load(lab, a, [([rule(b, rid="b")], "enforce"),
                                               ([rule(a)], "enforce")])
    assert len(gens) >= 2, gens
    during = {first.generation, *gens}
    with_a = {g.generation for g in lab.applied
              if g.generation in during and any(x.id == "deny" for x in g.policy.rules)}
    assert {e.generation for e in evs} <= with_a
    assert r["other"] == 0 and r["opened"] + r["eperm"] == LOAD_N
    assert r["eperm"] > 0 and r["opened"] > 0, r
    denied, _ = rule_ctr(lab, with_a)
    # pruned generations: only A's rule ever matched the opened file, B's rule never did
    assert denied + delta["retired_denied"] == r["eperm"]


def test_mode_016_deny_ring_full_still_denies_and_counts(lab: Lab):
    """MODE-016: the 1 MiB deny ring is filled without draining (~10k events); every further
    open is still EPERM, each lost event is counted in ringbuf_fail, and drained + lost
    equals the exact per-rule deny count."""
    f = lab.file("secret")
    ino = os.stat(f).st_ino
    res = lab.apply([rule(f)])
    cap = lab.maps[abi.MAP_DENY_EVENTS].max_entries // EVENT_RECORD
    n = cap + 1500
    before = hook_ctr(lab)
    r = lab.probe("open_loop", f, str(n)).result
    assert r["eperm"] == n, r
    after = hook_ctr(lab)
    lost = after["ringbuf_fail"] - before["ringbuf_fail"]
    assert after["denied"] - before["denied"] == n
    assert lost >= n - cap and lost > 0
    drained = _ring(lab, "deny", ino)
    assert len(drained) + lost == n
    assert rule_ctr(lab, {res.generation}) == (n, 0)
    assert lab.probe("open", f).errno == EPERM  # ring drained: next deny emits again
    assert_deny_event(lab, f)


def test_mode_017_audit_ring_full_still_allows_and_counts(lab: Lab):
    """MODE-017: the 4 MiB audit ring overflows: audited opens still succeed, lost audit
    events are counted, the per-rule audit count is exact."""
    f = lab.file("secret")
    ino = os.stat(f).st_ino
    res = lab.apply([rule(f)], mode="audit")
    cap = lab.maps[abi.MAP_AUDIT_EVENTS].max_entries // EVENT_RECORD
    n = cap + 1500
    before = hook_ctr(lab)
    r = lab.probe("open_loop", f, str(n)).result
    assert r["opened"] == n, r
    lost = hook_ctr(lab)["ringbuf_fail"] - before["ringbuf_fail"]
    assert lost >= n - cap
    assert len(_ring(lab, "audit", ino)) + lost == n
    assert rule_ctr(lab, {res.generation}) == (0, n)


# --- lifecycle ------------------------------------------------------------------------------

def test_life_010_no_valid_generation_fails_open_and_counts(lab: Lab):
    """LIFE-010: with no valid generation in either slot every hook allows (documented
    fail-open) and counts no_policy."""
    f = lab.file("secret")
    lab.apply([rule(f)])
    assert lab.probe("read", f).errno == EPERM
    assert_deny_event(lab, f)
    pm = lab.obj.policy_maps()
    slots.clear_slot(pm, 0)
    slots.clear_slot(pm, 1)
    before = hook_ctr(lab)
    assert lab.probe("read", f).result == {"ok": True}
    assert hook_ctr(lab)["no_policy"] > before["no_policy"]
    assert lab.events_for(f) == []


def test_life_011_refused_policy_keeps_previous_generation(lab: Lab):
    """LIFE-011: a policy naming one inode twice (file + hardlink) is refused before the
    kernel is touched; the previous generation keeps enforcing."""
    f = lab.file("secret")
    hl = lab.files / "secret-hl"
    hl.unlink(missing_ok=True)
    os.link(f, hl)
    prev = lab.apply([rule(f)])
    with pytest.raises(PolicyError, match="same inode"):
        lab.apply([rule(f), rule(hl, rid="dup")])
    assert lab.probe("open", f).errno == EPERM
    e = assert_deny_event(lab, f)
    assert e.generation == prev.generation


def test_life_012_missing_path_refused_keeps_previous_generation(lab: Lab):
    """LIFE-012: a rule on a path that does not exist is refused; nothing changes."""
    f = lab.file("secret")
    prev = lab.apply([rule(f)])
    with pytest.raises(PolicyError, match="No such file"):
        lab.apply([rule(f), rule(lab.files / "missing", rid="m")])
    assert lab.probe("open", f).errno == EPERM
    assert assert_deny_event(lab, f).generation == prev.generation


def _held(lab: Lab, argv: list[str], f) -> str:
    p = lab.spawn(argv)
    assert "opened" in p.stdout.readline()
    lab.apply([rule(f)])
    out, _ = p.communicate("go\n", timeout=30)
    return out


def test_life_013_pre_opened_fd_survives_exec(lab: Lab):
    """LIFE-013 (accepted, BYP-PREOPENED-FD): an fd opened before the policy and inherited
    across execve stays readable in the new image; a fresh open is denied."""
    f = lab.file("secret")
    out = _held(lab, [PROBE, "hold_exec", str(f), PROBE], f)
    assert json.loads(out.strip().splitlines()[-1]).get("ok") is True, out
    assert lab.events_for(f) == []
    assert lab.probe("read", f).errno == EPERM


def test_life_014_mapping_made_before_policy_survives(lab: Lab):
    """LIFE-014 (accepted, BYP-PREOPENED-FD): a shared mapping made before the policy (fd
    already closed) stays readable: page faults are not decisions."""
    f = lab.file("secret")
    out = _held(lab, [PROBE, "hold_mmap", str(f)], f)
    assert '"first_byte": 115' in out, out  # 's'
    assert lab.events_for(f) == []


def test_life_015_reapply_moves_decisions_to_the_new_generation(lab: Lab):
    """LIFE-015: re-applying the same rules makes a new generation in the other slot; its
    decisions carry it, and per-rule counters are kept per generation."""
    f = lab.file("secret")
    g1 = lab.apply([rule(f)])
    assert lab.probe("read", f).errno == EPERM
    g2 = lab.apply([rule(f)])
    assert g2.generation == g1.generation + 1 and g2.slot != g1.slot
    assert lab.probe("read", f).errno == EPERM
    assert lab.probe("read", f).errno == EPERM
    e = assert_deny_event(lab, f)
    assert e.generation == g2.generation and e.slot == g2.slot
    assert rule_ctr(lab, {g1.generation}) == (1, 0)
    assert rule_ctr(lab, {g2.generation}) == (2, 0)
