"""agent/scope_answers.py: the 5.10 build's cached scope answers (aegis_cg_scopes) checked
against the cgroup tree by the tick's tamper check.  A directory tree stands in for the
cgroup2 mount (a cgroup's id is its directory's inode there too)."""

from __future__ import annotations

import os
from pathlib import Path

from aegis_stream.agent.integrity import IntegrityChecker
from aegis_stream.agent.scope_answers import (
    AnswerAudit,
    CgroupTree,
    WrongAnswer,
    cached_answers,
    expected_answer,
    wrong_answers,
)
from aegis_stream.kernel import abi
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy.compiler import CompiledPolicy, CompiledRule, CompiledScope
from aegis_stream.testing import DEV_SDA1


def ino(p: Path) -> int:
    return os.stat(p).st_ino


def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "cg"
    dirs = {"root": root, "a": root / "a", "a/b": root / "a" / "b", "a/b/c": root / "a" / "b" / "c",
            "x": root / "x"}
    for p in dirs.values():
        p.mkdir(parents=True, exist_ok=True)
    (root / "a" / "cgroup.procs").write_text("")  # files are not cgroups
    return dirs


def test_walk_gives_each_cgroup_its_ancestors_from_level_1(tmp_path):
    d = tree(tmp_path)
    t = CgroupTree(d["root"]).walk()
    assert t[ino(d["root"])] == ()
    assert t[ino(d["a"])] == (ino(d["a"]),)
    assert t[ino(d["a/b/c"])] == (ino(d["a"]), ino(d["a/b"]), ino(d["a/b/c"]))
    assert t[ino(d["x"])] == (ino(d["x"]),)
    assert ino(d["a"] / "cgroup.procs") not in t
    # deeper than the 16 levels the programs walk: the first 16 only
    deep = d["root"]
    for i in range(abi.MAX_CGROUP_DEPTH + 2):
        deep = deep / f"l{i}"
    deep.mkdir(parents=True)
    chain = CgroupTree(d["root"]).walk()[ino(deep)]
    assert len(chain) == abi.MAX_CGROUP_DEPTH and chain[0] == ino(d["root"] / "l0")


def test_expected_answer_is_the_outermost_selected_ancestor():
    assert expected_answer((10, 20, 30), {20, 30}) == 20
    assert expected_answer((10, 20, 30), {40}) == -1
    assert expected_answer((), {10}) == -1  # the root cgroup is never walked


def test_wrong_answers_names_a_forged_out_of_scope_answer_and_skips_removed_cgroups(tmp_path):
    d = tree(tmp_path)
    t = CgroupTree(d["root"], walk_every_s=0)  # every new id walked at once
    scopes = {ino(d["a"])}
    right = {ino(d["a"]): ino(d["a"]), ino(d["a/b/c"]): ino(d["a"]), ino(d["x"]): -1,
             ino(d["root"]): -1}
    assert wrong_answers(right, scopes, t) == ([], right)
    forged = {**right, ino(d["a/b"]): -1, 999_999_999: -1}  # 999...: a removed cgroup
    assert wrong_answers(forged, scopes, t) == ([WrongAnswer(ino(d["a/b"]), -1, ino(d["a"]))],
                                               {**right, 999_999_999: -1})  # settled
    # over-deny is reported too (x cached as in scope of a)
    assert wrong_answers({ino(d["x"]): ino(d["a"])}, scopes, t)[0] == [
        WrongAnswer(ino(d["x"]), ino(d["a"]), -1)]


def test_new_cgroups_are_learnt_by_a_walk_at_most_every_walk_every_s(tmp_path):
    d = tree(tmp_path)
    now = [0.0]
    t = CgroupTree(d["root"], walk_every_s=2.0, clock=lambda: now[0])
    assert t.ancestry([ino(d["a"])]) == {ino(d["a"]): (ino(d["a"]),)} and t.walks == 1
    assert t.ancestry([ino(d["a"])]) and t.walks == 1  # known: no walk
    new = d["root"] / "new"
    new.mkdir()
    now[0] = 1.0
    assert ino(new) not in t.ancestry([ino(d["a"]), ino(new)]) and t.walks == 1  # waits
    now[0] = 2.5
    assert t.ancestry([ino(new)]) == {ino(new): (ino(new),)} and t.walks == 2
    # only the ids still named are kept
    t.retain([ino(new)])
    assert t.ancestry([ino(new), ino(d["a"])]).keys() == {ino(new)}  # a: forgotten, no walk yet


def test_cached_answers_reads_one_generation_from_the_map_columns():
    maps = PolicyMaps.fake(8)
    assert maps.cg_scopes is not None
    for gen, cg, ans in ((5, 100, 100), (5, 200, -1), (6, 100, -1)):
        maps.cg_scopes.update(abi.CG_SCOPE_KEY.pack(gen, cg), ans.to_bytes(8, "little", signed=True))
    kb = b"".join(k for k, _ in maps.cg_scopes.items())
    vb = b"".join(v for _, v in maps.cg_scopes.items())
    assert cached_answers(kb, vb, 5) == {100: 100, 200: -1}
    assert cached_answers(kb, vb, 6) == {100: -1}
    assert cached_answers(b"", b"", 5) == {}


def test_the_tick_check_reports_a_forged_answer_of_the_active_generation(tmp_path):
    d = tree(tmp_path)
    maps = PolicyMaps.fake(8)
    assert maps.cg_scopes is not None
    chk = IntegrityChecker(maps, tmp_path / "state", cgroup_root=d["root"])
    chk.cgroups.walk_every_s = 0
    rules = [CompiledRule(0, "r0", "/secret", DEV_SDA1, 4711, abi.ACTION_OPEN)]
    cp = CompiledPolicy("p", 1, "enforce", "sha256:" + "00" * 32, rules,
                        [CompiledScope(0, str(d["a"]), ino(d["a"]))])

    def put(gen: int, cg: int, ans: int) -> None:
        maps.cg_scopes.update(abi.CG_SCOPE_KEY.pack(gen, cg), ans.to_bytes(8, "little", signed=True))

    assert chk._scope_answer_problems(cp, 7) == []  # empty map
    put(7, ino(d["a/b"]), ino(d["a"]))
    put(7, ino(d["x"]), -1)
    put(6, ino(d["a/b/c"]), -1)  # another generation's (wrong for 7's policy, not 7's answer)
    assert chk._scope_answer_problems(cp, 7) == []
    put(7, ino(d["a/b/c"]), -1)  # forged: c is under the selected a
    (msg,) = chk._scope_answer_problems(cp, 7)
    assert "\n" not in msg and msg.startswith("scope cache, generation 7: 1 cached answer(s)")
    assert f"cgroup {ino(d['a/b/c'])} cached out of scope, the policy gives in scope of cgroup " \
           f"{ino(d['a'])}" in msg
    host = CompiledPolicy("p", 1, "enforce", "sha256:" + "00" * 32, rules, [])
    assert chk._scope_answer_problems(host, 7) == []  # a host-wide slot never caches


def test_an_answer_is_checked_once_and_again_when_it_changes(tmp_path):
    """The audit confirms each (cgroup, answer) once per generation; a forged replacement
    of a confirmed answer (delete + insert) is checked again and reported."""
    d = tree(tmp_path)
    t = CgroupTree(d["root"], walk_every_s=0)
    audit = AnswerAudit(t)
    scopes = {ino(d["a"])}
    answers = {ino(d["a/b"]): ino(d["a"]), ino(d["x"]): -1}
    assert audit.check(answers, 3, scopes) == [] and t.walks == 1
    assert audit.confirmed == answers
    calls = []
    real = t.ancestry
    t.ancestry = lambda ids: calls.append(sorted(ids)) or real(ids)  # type: ignore[method-assign]
    assert audit.check(answers, 3, scopes) == [] and calls == []  # nothing new: nothing asked
    forged = {**answers, ino(d["a/b"]): -1}
    assert audit.check(forged, 3, scopes) == [WrongAnswer(ino(d["a/b"]), -1, ino(d["a"]))]
    assert calls[-1] == [ino(d["a/b"])]
    assert audit.check(forged, 3, scopes)  # still reported while it stays
    assert audit.check(answers, 3, scopes) == []  # restored
    # a new generation: every answer checked again (its policy may select other cgroups)
    assert audit.check(answers, 4, {ino(d["x"])}) == [
        WrongAnswer(ino(d["a/b"]), ino(d["a"]), -1), WrongAnswer(ino(d["x"]), -1, ino(d["x"]))]


def test_an_unchanged_map_is_a_bytes_comparison_and_a_change_is_checked(tmp_path):
    d = tree(tmp_path)
    t = CgroupTree(d["root"], walk_every_s=0)
    audit = AnswerAudit(t)
    scopes = {ino(d["a"])}

    def cols(answers: dict[int, int], gen: int = 3) -> tuple[bytes, bytes]:
        return (b"".join(abi.CG_SCOPE_KEY.pack(gen, cg) for cg in answers),
                b"".join(a.to_bytes(8, "little", signed=True) for a in answers.values()))

    good = {ino(d["a/b"]): ino(d["a"]), ino(d["x"]): -1}
    assert audit.check_columns(*cols(good), 3, scopes) == []
    calls = []
    real = audit.check
    audit.check = lambda *a: calls.append(a) or real(*a)  # type: ignore[method-assign]
    assert audit.check_columns(*cols(good), 3, scopes) == [] and calls == []  # unchanged
    forged = {**good, ino(d["a/b/c"]): -1}
    bad = [WrongAnswer(ino(d["a/b/c"]), -1, ino(d["a"]))]
    assert audit.check_columns(*cols(forged), 3, scopes) == bad and len(calls) == 1
    assert audit.check_columns(*cols(forged), 3, scopes) == bad and len(calls) == 1  # still named
    assert audit.check_columns(*cols(good), 3, scopes) == [] and len(calls) == 2
    # the same bytes under another policy's scopes are checked again
    assert audit.check_columns(*cols(good), 3, {ino(d["x"])}) and len(calls) == 3
    # an id the rate-limited walk has not seen: not settled, so not remembered as checked
    t.walk_every_s = 3600
    new = d["root"] / "new"
    new.mkdir()
    late = {**good, ino(new): ino(d["a"])}  # forged: new is not under a
    assert audit.check_columns(*cols(late), 3, scopes) == [] and len(calls) == 4
    assert audit.check_columns(*cols(late), 3, scopes) == [] and len(calls) == 5  # asked again
    t.walk_every_s = 0
    assert audit.check_columns(*cols(late), 3, scopes) == [WrongAnswer(ino(new), ino(d["a"]), -1)]


def test_a_new_generation_does_not_walk_the_tree_again_for_known_cgroups(tmp_path):
    """After an apply the new generation's answers name the same cgroups as the kept one's:
    their ancestry is remembered, so no walk (a walk is for cgroups never seen)."""
    d = tree(tmp_path)
    t = CgroupTree(d["root"], walk_every_s=0)
    audit = AnswerAudit(t)

    def cols(rows: list[tuple[int, int, int]]) -> tuple[bytes, bytes]:
        return (b"".join(abi.CG_SCOPE_KEY.pack(g, cg) for g, cg, _ in rows),
                b"".join(a.to_bytes(8, "little", signed=True) for _, _, a in rows))

    a, b, x = ino(d["a"]), ino(d["a/b"]), ino(d["x"])
    assert audit.check_columns(*cols([(1, b, a), (1, x, -1)]), 1, {a}) == [] and t.walks == 1
    # generation 2 active, nothing decided yet under it: the tree keeps 1's cgroups
    assert audit.check_columns(*cols([(1, b, a), (1, x, -1)]), 2, {x}) == [] and t.walks == 1
    assert audit.check_columns(*cols([(1, b, a), (1, x, -1), (2, b, -1), (2, x, x)]), 2, {x}) == []
    assert t.walks == 1
