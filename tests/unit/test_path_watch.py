"""Path continuity on the agent side: restage through the lifecycle (policy/continuity.py) and
the inotify watcher (agent/pathwatch.py), over the fake kernel's maps, a real tmpdir and real
inotify on the host.  The kernel scenarios: tests/kernel/test_path_watch.py (PATHW-*)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from aegis_stream.agent.health import ReasonCode
from aegis_stream.agent.integrity import IntegrityChecker
from aegis_stream.agent.pathwatch import IN_Q_OVERFLOW, Inotify, PathWatcher
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.devnum import resolve_inode
from aegis_stream.policy import continuity
from aegis_stream.policy.lifecycle import SimulatedCrash
from aegis_stream.testing import FakeKernel, FakeTask

from ._policy_env import PolicyEnv

MOVED = ReasonCode.PATH_RULE_MOVED


def _replace(p: Path, content: str = "new") -> None:
    """delete + create: the path names a new inode, no rename the kernel could see (the new
    inode exists before the old one goes, so ext4 cannot hand back the same number)."""
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(content)
    p.unlink()
    os.link(tmp, p)
    tmp.unlink()


def _keys(env: PolicyEnv) -> dict[tuple[int, int], tuple[int, int, int]]:
    """The active slot's rule entries: (dev, ino) -> (rule_id, actions, flags)."""
    st = slots.read_state(env.maps)
    out = {}
    for k in env.maps.rules.keys():
        ino, dev, slot = abi.INODE_KEY.unpack(k)
        if slot == st.active_slot:
            v = env.maps.rules.lookup(k)
            assert v is not None
            rid, acts, flags, _ = abi.RULE.unpack(v)
            out[(dev, ino)] = (rid, acts, flags)
    return out


def _ident(p: Path) -> tuple[int, int]:
    i = resolve_inode(str(p))
    return i.dev, i.ino


# ------------------------------------------------------------------ the lifecycle's restage
def test_restage_follows_delete_and_create_same_digest_counter_untouched(tmp_path):
    env = PolicyEnv(tmp_path)
    res = env.lc.apply(env.signed(3, "ab"), "t")
    versions = (env.state / "versions.json").read_bytes()
    old_a = _ident(tmp_path / "a")
    _replace(tmp_path / "a")
    out = env.lc.restage_paths()
    assert out.applied is not None and out.applied.generation == res.generation + 1
    cp = out.applied.policy
    assert (cp.digest, cp.version, cp.name) == (res.policy.digest, 3, res.policy.name)
    assert _ident(tmp_path / "a") in _keys(env) and old_a not in _keys(env)  # old one is gone
    assert [m.rule for m in out.found.moves] == ["r-a"] and out.found.dropped
    assert (env.state / "versions.json").read_bytes() == versions  # no anti-rollback move
    rec = env.lc.log.last()
    assert rec is not None and (rec["action"], rec["result"]) == ("restage", "ok")
    assert rec["digest"] == res.policy.digest and rec["version"] == 3
    assert rec["restaged_from"] == res.generation and rec["signer"] == "k1"
    assert (rec["origin"], rec["trigger"]) == ("t", "path-watch")
    (mv,) = rec["moves"]
    assert (mv["rule"], mv["path"]) == ("r-a", str(tmp_path / "a"))
    assert mv["old"].startswith(f"{old_a[0] >> 20}:{old_a[0] & 0xFFFFF}:{old_a[1]}")
    assert env.lc.log.verify().ok
    # the restaged generation is a stored, signed generation like any other
    assert env.lc.store.load(out.applied.generation).signer == "k1"
    assert env.lc.store.envelope(out.applied.generation) == env.lc.store.envelope(res.generation)
    # nothing moved: nothing written
    before = len(list(env.lc.log.records()))
    again = env.lc.restage_paths()
    assert again.applied is None and len(list(env.lc.log.records())) == before


def test_restage_carries_the_renamed_away_inode_until_it_is_gone(tmp_path):
    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "a"), "t")
    old = _ident(tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "a.old")  # the old file lives on under another name
    (tmp_path / "a").write_text("new")
    out = env.lc.restage_paths()
    assert out.applied is not None
    keys = _keys(env)
    assert keys[old][0] == 0 and keys[_ident(tmp_path / "a")][0] == 0  # both under rule 0
    assert keys[old][2] & abi.RULE_PATH == 0  # not at the path: a rename onto it inherits nothing
    assert [(c.dev, c.ino) for c in out.applied.policy.carried] == [old]
    # an open fd keeps the unlinked inode alive: still carried
    fd = os.open(tmp_path / "a.old", os.O_RDONLY)
    try:
        (tmp_path / "a.old").unlink()
        assert env.lc.restage_paths().applied is None
        assert old in _keys(env)
    finally:
        os.close(fd)
    gone = env.lc.restage_paths([])  # carried inodes only: this one is gone now
    assert gone.applied is not None and [(c.dev, c.ino) for c in gone.found.dropped] == [old]
    assert old not in _keys(env) and not gone.applied.policy.carried
    assert env.lc.log.last()["dropped"] and env.lc.log.verify().ok


def test_restage_onto_another_rules_inode_keeps_the_old_one_and_reports(tmp_path):
    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "ab"), "t")
    before = _keys(env)
    (tmp_path / "a").unlink()
    os.link(tmp_path / "b", tmp_path / "a")  # a now names rule r-b's inode
    out = env.lc.restage_paths()
    assert out.applied is None and _keys(env) == before
    (p,) = out.found.problems
    assert p.rule == "r-a" and "the inode of rule 'r-b'" in p.why
    (tmp_path / "a").unlink()
    (tmp_path / "a").mkdir()  # a directory: refused like at apply
    out = env.lc.restage_paths()
    assert out.applied is None and "is a directory" in out.found.problems[0].why


def test_restage_only_the_named_paths_and_only_if_still_active(tmp_path):
    env = PolicyEnv(tmp_path)
    res = env.lc.apply(env.signed(1, "ab"), "t")
    os.rename(tmp_path / "a", tmp_path / "a.old")  # (no freed number for b's new file to take)
    (tmp_path / "a").write_text("new")
    _replace(tmp_path / "b")
    assert env.lc.restage_paths(generation=res.generation + 7).applied is None  # a step behind
    out = env.lc.restage_paths([str(tmp_path / "b")])
    assert [m.rule for m in out.found.moves] == ["r-b"]
    assert _ident(tmp_path / "a") not in _keys(env)  # not asked for: not re-resolved


def test_restage_crash_before_activation_reconciles_to_the_old_generation(tmp_path):
    env = PolicyEnv(tmp_path)
    res = env.lc.apply(env.signed(1, "a"), "t")
    _replace(tmp_path / "a")

    def crash(step: str) -> None:
        if step == "staged":
            raise SimulatedCrash(step)

    with pytest.raises(SimulatedCrash):
        env.new(hook=crash).restage_paths()
    rec = env.new().reconcile()
    assert (rec.status, rec.effective, rec.generation) == ("recovered", "old", res.generation)
    assert env.lc.restage_paths().applied is not None  # and the next restage goes through
    assert env.lc.log.verify().ok


def test_restage_under_break_glass_stays_in_audit(tmp_path):
    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "a"), "t")
    env.lc.break_glass("INC-7")
    _replace(tmp_path / "a")
    out = env.lc.restage_paths()
    assert out.applied is not None and out.applied.mode == "audit"
    assert slots.read_state(env.maps).active.mode == int(abi.Mode.AUDIT)


def test_restage_lock_busy_is_a_refusal_not_a_wait(tmp_path):
    import fcntl

    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "a"), "t")
    _replace(tmp_path / "a")
    fd = os.open(env.state / "lifecycle.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(Exception, match="lifecycle lock stayed busy"):
            env.lc.restage_paths(lock_wait_s=0.1)
    finally:
        os.close(fd)
    assert env.lc.restage_paths(lock_wait_s=0.1).applied is not None


def test_fake_kernel_denies_the_new_file_only_after_the_restage(tmp_path):
    k = FakeKernel()
    env = PolicyEnv(tmp_path, maps=k.policy_maps)
    env.lc.apply(env.signed(1, "a"), "t")
    task = FakeTask()
    _replace(tmp_path / "a")
    dev, ino = _ident(tmp_path / "a")
    assert k.decide(abi.Hook.FILE_OPEN, dev, ino, abi.ACTION_OPEN, task) == 0  # the window
    env.lc.restage_paths()
    assert k.decide(abi.Hook.FILE_OPEN, dev, ino, abi.ACTION_OPEN, task) != 0


# ------------------------------------------------------------------ the watcher
async def _until(pred, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):  # a hang guard, not a timing claim
        while not pred():
            await trio.sleep(0.02)


async def test_watcher_degraded_until_restaged_then_reported_once(tmp_path):
    env = PolicyEnv(tmp_path)
    res = env.lc.apply(env.signed(1, "ab"), "t")
    w = PathWatcher(env.lc, debounce_s=0.1)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        assert w.conditions()[MOVED] is None and w.stats.restages == 0  # nothing moved
        # hold the lifecycle lock: the restage cannot happen, the path is exposed
        import fcntl

        fd = os.open(env.state / "lifecycle.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            _replace(tmp_path / "a")
            await _until(lambda: w.pending or w.stats.restage_failures)
            why = w.conditions()[MOVED]
            assert why is not None and why.startswith("path rule moved: rule r-a (")
            assert str(tmp_path / "a") in why and "not protected until restaged" in why
            await _until(lambda: w.stats.restage_failures > 0)
            assert "lifecycle lock stayed busy" in (w.conditions()[MOVED] or "")
        finally:
            os.close(fd)
        await _until(lambda: w.stats.restages == 1)
        assert slots.read_state(env.maps).active.generation == res.generation + 1
        assert _ident(tmp_path / "a") in _keys(env)
        done = w.conditions()[MOVED]  # the restage is reported once ...
        assert done is not None and f"restaged as generation {res.generation + 1}" in done
        assert w.conditions()[MOVED] is None  # ... and then clear
        n.cancel_scope.cancel()


async def test_watcher_debounces_a_storm_into_one_restage(tmp_path):
    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "abcdef"), "t")
    w = PathWatcher(env.lc, debounce_s=0.3, max_delay_s=5.0)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        for _ in range(20):  # a dpkg-style unpack: new file + rename over it, again and again
            for f in "abcdef":
                (tmp_path / f"{f}.dpkg-new").write_text("x")
                os.rename(tmp_path / f"{f}.dpkg-new", tmp_path / f)
            for i in range(20):  # unrelated churn in the same directory: not relevant
                (tmp_path / f"noise{i}").write_text("n")
                (tmp_path / f"noise{i}").unlink()
        await _until(lambda: w.stats.restages >= 1 and not w.pending)
        await trio.sleep(0.5)
        assert w.stats.restages == 1, w.stats
        assert w.stats.events > w.stats.relevant
        assert all(_ident(tmp_path / f) in _keys(env) for f in "abcdef")
        n.cancel_scope.cancel()


async def test_watcher_follows_parent_directory_replacement(tmp_path):
    env = PolicyEnv(tmp_path)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "secret").write_text("s")
    rule = (f'apiVersion = "aegis/v1"\nname = "web"\nversion = 1\nmode = "enforce"\n'
            f'[[rules]]\nid = "r-s"\npath = "{conf / "secret"}"\n').encode()
    from aegis_stream.policy import signing

    env.lc.apply(signing.sign_policy(rule, env.key, "k1"), "t")
    old = _ident(conf / "secret")
    w = PathWatcher(env.lc, debounce_s=0.1)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        new = tmp_path / "conf.new"
        new.mkdir()
        (new / "secret").write_text("new")
        os.rename(conf, tmp_path / "conf.old")  # the watched parent moves away ...
        await _until(lambda: w.stats.restages + w.stats.relevant > 0)
        os.rename(new, conf)  # ... and a new directory takes its name
        await _until(lambda: _ident(conf / "secret") in _keys(env))
        assert old in _keys(env)  # conf.old/secret still exists: still protected
        assert w.dirs.get(str(conf)) is not None  # the new directory is watched
        shutil.rmtree(tmp_path / "conf.old")
        gone = await trio.to_thread.run_sync(env.lc.restage_paths, [])
        assert [(c.dev, c.ino) for c in gone.found.dropped] == [old]
        _replace(conf / "secret")  # and the new parent's changes are seen
        await _until(lambda: _ident(conf / "secret") in _keys(env))
        n.cancel_scope.cancel()


async def test_watcher_start_restages_what_moved_while_down(tmp_path):
    env = PolicyEnv(tmp_path)
    res = env.lc.apply(env.signed(1, "ab"), "t")
    _replace(tmp_path / "b")  # while no agent ran
    w = PathWatcher(env.lc)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await _until(lambda: w.stats.restages == 1)
        assert _ident(tmp_path / "b") in _keys(env)
        assert env.lc.log.last()["trigger"] == "agent-start"
        why = w.conditions()[MOVED]
        assert why is not None and "rule r-b" in why and f"generation {res.generation + 1}" in why
        n.cancel_scope.cancel()


async def test_watcher_follows_a_new_apply_and_overflow_is_a_full_reresolve(tmp_path):
    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "a"), "t")
    w = PathWatcher(env.lc, debounce_s=0.05, poll_s=0.05)
    async with trio.open_nursery() as n:
        await n.start(w.run)
        await trio.to_thread.run_sync(env.lc.apply, env.signed(2, "c"), "t2")
        await _until(lambda: str(tmp_path / "c") in w.rule_of)
        _replace(tmp_path / "a")  # no longer a rule: ignored
        _replace(tmp_path / "c")
        await _until(lambda: w.stats.restages == 1)
        assert _ident(tmp_path / "c") in _keys(env)
        w.handle([(-1, IN_Q_OVERFLOW, "")])
        assert w.pending_all and w.stats.overflows == 1
        await _until(lambda: not w.pending_all)
        assert w.stats.restages == 1  # nothing else moved: re-resolved, nothing written
        n.cancel_scope.cancel()


def test_inotify_binding_reads_named_events(tmp_path):
    ino = Inotify()
    try:
        wd = ino.add_watch(str(tmp_path), 0x100 | 0x200)
        (tmp_path / "x").write_text("1")
        (tmp_path / "x").unlink()
        got = ino.read()
        assert [(w, name) for w, _, name in got] == [(wd, "x"), (wd, "x")]
        assert ino.read() == []
    finally:
        ino.close()


# ------------------------------------------------------------------ integrity
def test_integrity_tolerates_kernel_inherited_path_rule_entries_only(tmp_path):
    env = PolicyEnv(tmp_path)
    body = (f'apiVersion = "aegis/v1"\nname = "web"\nversion = 1\nmode = "enforce"\n'
            f'[[rules]]\nid = "p"\npath = "{tmp_path / "a"}"\nactions = ["open"]\n'
            f'[[rules]]\nid = "i"\ninode = "1:2:3"\naccept_target = ["unstable-inode"]\n'
            'actions = ["open"]\n').encode()
    from aegis_stream.policy import signing

    res = env.lc.apply(signing.sign_policy(body, env.key, "k1"), "t")
    chk = IntegrityChecker(env.maps, env.state)
    fired: list[int] = []
    chk.on_inherited = lambda: fired.append(1)
    assert not chk.check().findings

    def put(ino: int, rule_id: int, actions: int, flags: int) -> bytes:
        k = abi.INODE_KEY.pack(ino, 42, res.slot)
        env.maps.rules.update(k, abi.RULE.pack(rule_id, actions, flags, 7))
        return k

    k = put(991, 0, abi.ACTION_OPEN, abi.RULE_PATH | abi.RULE_INHERITED)  # what the rename hook adds
    rep = chk.check()
    assert not rep.findings and rep.inherited == 1 and fired == [1]
    assert not chk.check().findings and fired == [1]  # the same entry: asked once
    for bad in ((1, abi.ACTION_OPEN), (0, abi.ACTION_OPEN | abi.ACTION_EXEC), (5, abi.ACTION_OPEN)):
        kb = put(992, *bad, abi.RULE_INHERITED)  # an inode rule's, other actions, no such rule
        rep = chk.check()
        assert rep.tampered and "1 not in the policy (0:42:992)" in rep.findings[0].text, (bad, rep)
        env.maps.rules.delete(kb)
    env.maps.rules.delete(k)
    assert not chk.check().findings


def test_handles_rebuilt_for_known_filesystems():
    c = continuity.CarriedInode(0, "r", "/x", 1, 5, 1, "ext4", 9)
    assert continuity.handle_of(c) == (1, b"\x05\0\0\0\x09\0\0\0")
    t = continuity.CarriedInode(0, "r", "/x", 1, (1 << 32) + 5, 1, "tmpfs", 9)
    assert continuity.handle_of(t) == (1, b"\x09\0\0\0\x05\0\0\0\x01\0\0\0")
    assert continuity.handle_of(continuity.CarriedInode(0, "r", "/x", 1, 5, 1, "btrfs", 9)) is None
    assert continuity.inode_alive(continuity.CarriedInode(0, "r", "/x", 1, 5, 1, "nfs", 9)) is None


def test_restage_two_paths_that_swapped_inodes_both_follow(tmp_path):
    """ext4 hands a freed inode number to the next new file: after replacements two rules'
    paths may name each other's old numbers.  Judged on the final assignment: no conflict."""
    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "ab"), "t")
    a, b = _ident(tmp_path / "a"), _ident(tmp_path / "b")
    os.rename(tmp_path / "a", tmp_path / "t")
    os.rename(tmp_path / "b", tmp_path / "a")
    os.rename(tmp_path / "t", tmp_path / "b")
    out = env.lc.restage_paths([str(tmp_path / "a")])  # b is pulled in by the conflict
    assert sorted(m.rule for m in out.found.moves) == ["r-a", "r-b"] and not out.found.problems
    keys = _keys(env)
    assert keys[b][0] == 0 and keys[a][0] == 1 and not out.applied.policy.carried


# ------------------------------------------------------------------ events and explain
def test_events_and_explain_say_inherited_and_carried(tmp_path):
    from aegis_stream.agent.explain import render
    from aegis_stream.kernel.events import RawDecision
    from aegis_stream.policy.store import PolicyStore
    from aegis_stream.processors.explain import explain
    from aegis_stream.testing import fixed_normaliser

    env = PolicyEnv(tmp_path)
    env.lc.apply(env.signed(1, "a"), "t")
    old = _ident(tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "a.old")
    (tmp_path / "a").write_text("new")
    out = env.lc.restage_paths()
    assert out.applied is not None
    gen, slot = out.applied.generation, out.applied.slot
    norm = fixed_normaliser(PolicyStore(env.state))

    def event(dev: int, ino: int, flags: int = 0):
        return norm.normalise(RawDecision(
            abi_version=abi.ABI_VERSION, hook=0, decision=1, rule_id=0, generation=gen, ktime_ns=1,
            cgroup_id=1, scope_cgroup_id=0, ino=ino, dev=dev, action=abi.ACTION_OPEN, pid=4242,
            tgid=4242, uid=0, gid=0, mode=1, slot=slot, comm="cat", rule_flags=flags))

    info = norm.generations.get(gen)
    x = explain(event(*old), info)  # the renamed-away file, still protected
    assert x.consistent and x.rule.via == "carried", x
    assert any("carried: an earlier inode of its path" in s for s in x.decision_path)
    ev = event(old[0], 424242, abi.RULE_PATH | abi.RULE_INHERITED)  # renamed over the path
    assert ev.inherited and not event(*_ident(tmp_path / "a")).inherited
    x = explain(ev, info)
    assert x.consistent and x.rule.via == "inherited"
    assert "(inherited)" in render(x) and any("renamed over the rule's path" in s for s in x.decision_path)
    x = explain(event(old[0], 424243), info)  # neither: an inconsistency, as before
    assert not x.consistent and x.rule.via == ""


# ------------------------------------------------------------------ in `aegis run`
async def test_agent_runs_the_watcher_restages_and_reports_it(monkeypatch, tmp_path):
    """run_agent on the fake kernel with a real policy file over real files: the watcher is
    the agent's task, its moves reach the kernel's maps, the status file and the stderr log."""
    import json

    from aegis_stream.agent import run as agent

    from ._agent_fake import use_fake_kernel

    k = FakeKernel(deny_ring_size=1 << 14, audit_ring_size=1 << 14)
    state = tmp_path / "state"
    use_fake_kernel(monkeypatch, k, str(state), generation=None, path_watch=True)
    target = tmp_path / "secret"
    target.write_text("s")
    pol = tmp_path / "p.toml"
    pol.write_text(f'apiVersion = "aegis/v1"\nname = "w"\nversion = 1\nmode = "audit"\n'
                   f'[[rules]]\nid = "r-s"\npath = "{target}"\n')
    cfg = agent.AgentConfig(policy=str(pol), events=str(tmp_path / "ev.jsonl"), tick_s=0.2,
                            spool_dir=str(tmp_path / "spool"), status_file=str(state / "status.json"))

    def active_keys() -> set[tuple[int, int]]:
        st = slots.read_state(k.policy_maps)
        return {(dev, ino) for ino, dev, slot in map(abi.INODE_KEY.unpack, k.policy_maps.rules.keys())
                if slot == st.active_slot}

    def status_codes() -> list[str]:
        try:
            return json.loads((state / "status.json").read_text()).get("reason_codes", [])
        except (OSError, ValueError):
            return []

    try:
        async with trio.open_nursery() as n:
            n.start_soon(agent.run_agent, cfg)
            await _until(lambda: (state / "status.json").exists() and active_keys())
            assert _ident(target) in active_keys()
            _replace(target)
            await _until(lambda: _ident(target) in active_keys())
            await _until(lambda: "path_rule_moved" in status_codes())
            n.cancel_scope.cancel()
    finally:
        k.close()
    recs = [json.loads(line) for line in (state / "provenance.jsonl").read_text().splitlines()]
    assert [r["action"] for r in recs if r["result"] == "ok"][-2:] == ["apply", "restage"]
