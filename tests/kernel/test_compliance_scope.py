"""Edge-case compliance: who is in scope (SCOPE-010 onwards; SCOPE-001..003 in
test_reference_slice.py).  Descendants, siblings, parents, the root cgroup, migration of a
running process in and out, threads, forked children, several and nested scopes, the
kernel's ancestor-walk depth, recreated cgroups, uid / user / cgroup / pid namespaces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aegis_stream.agent.integrity import IntegrityChecker
from aegis_stream.errors import PolicyError
from aegis_stream.kernel import abi, builds, libbpf, slots

from .conftest import CG_ROOT, EPERM, PROBE, Lab, assert_deny_event, bpftool_handle, cgroup_id


def deny(lab: Lab, f: Path, scopes=None):
    return lab.apply([{"id": "deny", "path": str(f), "actions": ["open"]}], scopes=scopes)


def mkcg(cgroups: list[Path], path: Path) -> Path:
    path.mkdir(exist_ok=True)
    cgroups.append(path)
    return path


def test_scope_010_grandchild_denied_via_ancestor(lab: Lab, cgroups):
    """SCOPE-010: a process two levels below the selected cgroup is denied; the event names
    its own cgroup and the selected ancestor."""
    gc = mkcg(cgroups, lab.cg_child / "grandchild")
    f = lab.file("secret")
    deny(lab, f)
    assert lab.probe("open", f, cgroup=gc).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=gc)
    assert e.scope_cgroup_id == cgroup_id(lab.cg_selected)


def test_scope_011_new_sibling_cgroup_allowed(lab: Lab, cgroups):
    """SCOPE-011: a sibling of the selected cgroup is out of scope."""
    sib = mkcg(cgroups, lab.cg_selected.parent / "sibling")
    f = lab.file("secret")
    deny(lab, f)
    assert lab.probe("read", f, cgroup=sib).result == {"ok": True}
    assert lab.events_for(f) == []


def test_scope_012_parent_of_selected_allowed(lab: Lab):
    """SCOPE-012: the selected cgroup's parent is out of scope (selection goes down only)."""
    f = lab.file("secret")
    deny(lab, f)
    assert lab.probe("read", f, cgroup=lab.cg_selected.parent).result == {"ok": True}
    assert lab.events_for(f) == []


def test_scope_013_root_cgroup_allowed(lab: Lab):
    """SCOPE-013: a process in the root cgroup is out of a scoped policy."""
    f = lab.file("secret")
    deny(lab, f)
    assert lab.probe("read", f, cgroup=CG_ROOT).result == {"ok": True}
    assert lab.events_for(f) == []


def test_scope_014_host_wide_covers_root_cgroup(lab: Lab):
    """SCOPE-014: a host-wide policy (no [[scope]]) denies in the root cgroup; scope id 0."""
    f = lab.file("secret")
    deny(lab, f, scopes=[])
    assert lab.probe("read", f, cgroup=CG_ROOT).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=CG_ROOT)
    assert e.scope_cgroup_id == 0


def _two_opens(lab: Lab, f: Path, start: Path, move_to: Path) -> dict:
    p = lab.spawn([PROBE, "open_wait_open", str(f)], cgroup=start)
    info = json.loads(p.stdout.readline())
    (move_to / "cgroup.procs").write_text(f"{info['pid']}\n")
    out, _ = p.communicate("go\n", timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def test_scope_015_process_migrated_into_selected_while_running(lab: Lab):
    """SCOPE-015: a running process moved into the selected cgroup: its next open is
    denied (the cgroup is read at each decision, not at exec)."""
    f = lab.file("secret")
    deny(lab, f)
    r = _two_opens(lab, f, lab.cg_other, lab.cg_selected)
    assert r == {"first": 0, "second": EPERM}
    assert_deny_event(lab, f)


def test_scope_016_process_migrated_out_while_running(lab: Lab):
    """SCOPE-016: a running process moved out of the selected cgroup: denied before,
    allowed after."""
    f = lab.file("secret")
    deny(lab, f)
    r = _two_opens(lab, f, lab.cg_selected, lab.cg_other)
    assert r == {"first": EPERM, "second": 0}
    evs = lab.events_for(f)
    assert len(evs) == 1 and evs[0].cgroup_id == cgroup_id(lab.cg_selected)


def test_scope_017_process_moves_itself_out(lab: Lab):
    """SCOPE-017 (accepted, BYP-CGROUP-ESCAPE): a process allowed to write cgroup.procs of
    another cgroup (root here; in a container only with a delegated, writable cgroupfs)
    leaves the scope.  Containers must not get a writable cgroupfs above their own cgroup."""
    f = lab.file("secret")
    deny(lab, f)
    out = lab.probe("migrate", f, str(lab.cg_other / "cgroup.procs"))
    assert out.result == {"first": EPERM, "second": 0}


def test_scope_018_all_threads_of_a_process(lab: Lab):
    """SCOPE-018: eight threads each open the file: eight denies, eight events, each with
    its own thread id and the process's tgid."""
    f = lab.file("secret")
    deny(lab, f)
    r = lab.probe("threads", f, "8").result
    assert r["eperm"] == 8 and r["opened"] == 0, r
    evs = lab.events_for(f)
    assert len(evs) == 8
    assert sorted(e.pid for e in evs) == sorted(r["tids"])
    assert {e.tgid for e in evs} == {r["pid"]}


def test_scope_019_forked_child_without_exec(lab: Lab):
    """SCOPE-019: a child forked (no exec) by an in-scope process inherits the cgroup."""
    f = lab.file("secret")
    deny(lab, f)
    r = lab.probe("fork_open", f).result
    assert r["errno"] == EPERM
    e = assert_deny_event(lab, f)
    assert e.tgid == r["child"]


def test_scope_020_second_of_two_selected_cgroups(lab: Lab):
    """SCOPE-020: with two selected cgroups, a process in the second is denied and the event
    names the second as its scope."""
    f = lab.file("secret")
    deny(lab, f, scopes=[lab.cg_selected, lab.cg_other])
    assert lab.probe("open", f, cgroup=lab.cg_other).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=lab.cg_other)
    assert e.scope_cgroup_id == cgroup_id(lab.cg_other)


def test_scope_021_nested_selection_reports_outermost(lab: Lab):
    """SCOPE-021: both the selected cgroup and its child are selected; a process in the
    child matches, and the reported scope is the outermost selected ancestor (the kernel
    walks from level 1 down)."""
    f = lab.file("secret")
    deny(lab, f, scopes=[lab.cg_selected, lab.cg_child])
    assert lab.probe("open", f, cgroup=lab.cg_child).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=lab.cg_child)
    assert e.scope_cgroup_id == cgroup_id(lab.cg_selected)


def _chain(cgroups: list[Path], top: Path, to_level: int) -> Path:
    """Nest cgroups below ``top`` until ``to_level`` (root = level 0)."""
    level = len(top.relative_to(CG_ROOT).parts)
    d = top
    while level < to_level:
        level += 1
        d = mkcg(cgroups, d / f"d{level}")
    return d


def test_scope_022_selected_cgroup_at_the_deepest_walked_level(lab: Lab, cgroups):
    """SCOPE-022: a selected cgroup at level 16 (the kernel walks levels 1..16) matches."""
    deep = _chain(cgroups, lab.cg_selected, abi.MAX_CGROUP_DEPTH)
    f = lab.file("secret")
    deny(lab, f, scopes=[deep])
    assert lab.probe("open", f, cgroup=deep).errno == EPERM
    e = assert_deny_event(lab, f, cgroup=deep)
    assert e.scope_cgroup_id == cgroup_id(deep)


def test_scope_023_scope_deeper_than_the_walk_is_refused(lab: Lab, cgroups):
    """SCOPE-023 (fixed in the compiler): a scope at level 17 could never match in the
    kernel; apply refuses it and the previous generation keeps enforcing."""
    deep = _chain(cgroups, lab.cg_selected, abi.MAX_CGROUP_DEPTH + 1)
    f = lab.file("secret")
    deny(lab, f)
    with pytest.raises(PolicyError, match="17 levels deep"):
        deny(lab, f, scopes=[deep])
    assert lab.probe("open", f).errno == EPERM
    assert_deny_event(lab, f)


def test_scope_024_root_cgroup_as_scope_is_refused(lab: Lab):
    """SCOPE-024 (fixed in the compiler): selecting the root cgroup would match nothing (the
    walk starts at level 1); apply refuses it and points to host-wide policies."""
    f = lab.file("secret")
    deny(lab, f)
    with pytest.raises(PolicyError, match="root cgroup"):
        deny(lab, f, scopes=[CG_ROOT])
    assert lab.probe("open", f).errno == EPERM


def test_scope_025_recreated_cgroup_is_a_new_id(lab: Lab, cgroups):
    """SCOPE-025: scopes are cgroup ids resolved at apply; a cgroup removed and made again
    under the same name is a new id, out of scope until re-applied."""
    cg = mkcg(cgroups, lab.cg_selected.parent / "recreated")
    f = lab.file("secret")
    deny(lab, f, scopes=[cg])
    old = cgroup_id(cg)
    assert lab.probe("open", f, cgroup=cg).errno == EPERM
    lab.drain()
    cg.rmdir()
    cg.mkdir()
    assert cgroup_id(cg) != old
    assert lab.probe("read", f, cgroup=cg).result == {"ok": True}
    assert lab.events_for(f) == []


def test_scope_026_other_uid_in_scope(lab: Lab):
    """SCOPE-026: the uid does not matter; the event carries the caller's uid and gid."""
    f = lab.file("secret")
    deny(lab, f)
    out = lab.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                   PROBE, "open", str(f)])
    assert out.errno == EPERM, out
    e = assert_deny_event(lab, f)
    assert (e.uid, e.gid) == (65534, 65534)


def test_scope_027_user_namespace_root(lab: Lab):
    """SCOPE-027: 'root' in a new user namespace is still in the cgroup: denied."""
    f = lab.file("secret")
    deny(lab, f)
    out = lab.run(["unshare", "-U", "-r", PROBE, "open", str(f)])
    assert out.errno == EPERM, out
    assert_deny_event(lab, f)


def test_scope_028_cgroup_namespace(lab: Lab):
    """SCOPE-028: a new cgroup namespace changes the view of /proc/self/cgroup, not the
    cgroup: denied, the event carries the global cgroup id."""
    f = lab.file("secret")
    deny(lab, f)
    out = lab.run(["unshare", "-C", PROBE, "open", str(f)])
    assert out.errno == EPERM, out
    assert_deny_event(lab, f)


def test_scope_029_pid_namespace(lab: Lab):
    """SCOPE-029: as pid 1 of a new pid namespace: denied; the event has the global pid."""
    f = lab.file("secret")
    deny(lab, f)
    out = lab.run(["unshare", "-p", "-f", PROBE, "open", str(f)])
    assert out.errno == EPERM, out
    e = assert_deny_event(lab, f)
    assert e.tgid != 1 and e.tgid != os.getpid()


def test_scope_030_cached_scope_answers_follow_every_policy_change(lab: Lab, cgroups):
    """SCOPE-030: the scope answer is cached (per task on 5.11+; per cgroup in
    ``aegis_cg_scopes`` on 5.10, the no-task-storage build) under the policy generation.
    The same two cgroups, decided twice each under every policy: each answer is the
    current generation's, across applies that move the scope and a rollback.  On 5.10 the
    cache is used (the answers are in it, exactly) and holds only the answers of the
    generations the two slots hold: staging deleted the retired ones."""
    other = mkcg(cgroups, lab.cg_selected.parent / "scope-030")
    f = lab.file("secret")

    def denied() -> list[bool]:
        return [lab.probe("read", f, cgroup=cg).errno == EPERM
                for cg in (lab.cg_selected, lab.cg_selected, other, other)]

    deny(lab, f)
    assert denied() == [True, True, False, False]
    deny(lab, f, scopes=[other])
    assert denied() == [False, False, True, True]
    deny(lab, f, scopes=[lab.cg_selected, other])
    assert denied() == [True, True, True, True]
    lab.lifecycle.rollback(reason="SCOPE-030")  # back to the version that selects `other`
    assert denied() == [False, False, True, True]
    assert builds.probe_task_storage() is not None
    if builds.probe_task_storage():
        return  # the per-task cache (task storage): nothing to read from userspace
    state = slots.read_state(lab.lifecycle.maps)
    held = {s.generation for s in state.slots}
    answers = {abi.CG_SCOPE_KEY.unpack(k): int.from_bytes(v, "little", signed=True)
               for k, v in lab.maps[abi.MAP_CG_SCOPES].items()}
    assert {g for g, _ in answers} <= held, (answers, held)
    gen = state.active.generation
    assert answers[(gen, cgroup_id(lab.cg_selected))] == -1
    assert answers[(gen, cgroup_id(other))] == cgroup_id(other)


def test_scope_031_forged_cached_answer_is_reported_by_the_tick_check(lab: Lab, cgroups):
    """SCOPE-031 (5.10 build): a ``CAP_BPF`` holder writes (active generation, a cgroup
    under the selected one) -> out of scope into ``aegis_cg_scopes`` before that cgroup's
    first decision.  The file opens there (the bypass is real: BYP-MAP-TAMPER, not
    preventable), the rule and scope maps are untouched, and the agent's tick check
    reports ``policy_tampered`` naming the cgroup; deleting the forged answer restores the
    deny and clears the finding."""
    if builds.probe_task_storage():
        pytest.skip("kernel-feature: the per-cgroup scope cache is the 5.10 build's "
                    "(5.11+ caches the answer per task, in task storage)")
    child = mkcg(cgroups, lab.cg_selected / "scope-031")
    f = lab.file("secret")
    res = deny(lab, f)
    check = IntegrityChecker(lab.lifecycle.maps, lab.lifecycle.root)
    check.cgroups.walk_every_s = 0  # learn every new cgroup at once
    assert lab.probe("open", f).errno == EPERM  # the selected cgroup's own answer: cached
    assert not check.check().findings
    key = abi.CG_SCOPE_KEY.pack(res.generation, cgroup_id(child))
    with bpftool_handle(lab, abi.MAP_CG_SCOPES) as cache:
        cache.update(key, (-1).to_bytes(8, "little", signed=True), libbpf.BPF_NOEXIST)
        try:
            assert lab.probe("read", f, cgroup=child).result == {"ok": True}  # the bypass
            rep = check.check()
            assert rep.tampered, rep  # ... and not silent
            text = " ".join(r.text for r in rep.findings)
            assert f"cgroup {cgroup_id(child)} cached out of scope, the policy gives in scope " \
                   f"of cgroup {cgroup_id(lab.cg_selected)}" in text, text
        finally:
            assert cache.delete(key)
    assert lab.probe("open", f, cgroup=child).errno == EPERM
    assert not check.check().findings
