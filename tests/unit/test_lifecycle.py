"""Lifecycle on fake kernel maps: apply, rollback, break-glass, canary, crash recovery."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from aegis_stream.cli import policy as cli_policy
from aegis_stream.errors import KernelError, PolicyError, SignatureError, StateError
from aegis_stream.kernel import abi, slots
from aegis_stream.policy import antirollback, signing
from aegis_stream.policy.lifecycle import (
    STEPS,
    Lifecycle,
    SimulatedCrash,
    evaluate_canary,
    reconcile,
)
from aegis_stream.policy.store import PolicyStore

from ._policy_env import PolicyEnv


class Env(PolicyEnv):
    """The lifecycle tests' world, with the kernel's slot state at hand."""

    def state_now(self):
        return slots.read_state(self.maps)

    def active_gen(self) -> int:
        st = self.state_now()
        return st.active.generation if st.active.valid else 0

    def actions(self):
        return [(r["action"], r["result"]) for r in self.lc.log.records()]


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


# ------------------------------------------------------------------------- apply/rollback
def test_apply_apply_rollback_flips_slots_and_everything_is_recorded(env) -> None:
    r1 = env.lc.apply(env.signed(1, "a"), "v1")
    assert (r1.generation, r1.slot, r1.mode, r1.signer) == (1, 1, "enforce", "k1")
    r2 = env.lc.apply(env.signed(2, "ab"), "v2")
    assert (r2.generation, r2.previous_generation, r2.slot) == (2, 1, 0)
    st = env.state_now()
    assert st.active_slot == 0 and st.slots[1].generation == 1 and st.slots[1].valid
    rb = env.lc.rollback()
    assert (rb.method, rb.generation, rb.previous_generation, rb.version) == ("flip", 1, 2, 1)
    st = env.state_now()
    assert st.active_slot == 1 and st.active.generation == 1 and st.active.mode == 1
    assert env.actions() == [("key-add", "ok"), ("apply", "ok"), ("apply", "ok"),
                             ("rollback", "ok")]
    last = env.lc.log.last()
    assert last["method"] == "flip" and last["signer"] == "k1" and last["version"] == 1
    assert last["previous_generation"] == 2 and last["generation"] == 1
    assert env.lc.log.verify().ok
    # the store kept the envelope for re-verification
    vp = signing.verify_envelope(env.lc.store.envelope(1), env.lc.trust)
    assert vp.digest == env.lc.store.load(1).policy.digest
    assert env.lc.store.load(2).signer == "k1"


def test_rollback_reapplies_when_the_slot_was_overwritten(env) -> None:
    for v, f in ((1, "a"), (2, "ab"), (3, "abc")):
        env.lc.apply(env.signed(v, f), f"v{v}")
    rb = env.lc.rollback(to_version=1)
    assert (rb.method, rb.generation, rb.version) == ("reapply", 4, 1)
    assert env.active_gen() == 4
    assert env.lc.store.load(4).policy.version == 1
    # rollback does not lower the counter: replaying v2 is still refused ...
    with pytest.raises(SignatureError, match="older than v3"):
        env.lc.apply(env.signed(2, "ab"))
    # ... an explicit rollback to it works, and so does re-applying v3 (same policy)
    assert env.lc.rollback(to_version=2).version == 2
    assert env.lc.apply(env.signed(3, "abc")).policy.version == 3
    assert env.lc.log.verify().ok


def test_rollback_without_older_version_is_refused_and_recorded(env) -> None:
    env.lc.apply(env.signed(1))
    with pytest.raises(PolicyError, match="no stored version of web older than v1"):
        env.lc.rollback()
    assert env.actions()[-1] == ("rollback", "refused")


def test_rollback_reverifies_trust(env) -> None:
    env.lc.apply(env.signed(1, "a"))
    env.lc.apply(env.signed(2, "ab"))
    env.lc.trust.revoke("k1", "compromised")
    with pytest.raises(SignatureError, match="revoked"):
        env.lc.rollback()
    assert env.active_gen() == 2
    assert env.lc.log.last()["action"] == "rollback"
    assert env.lc.log.last()["result"] == "refused"


def test_rollback_refuses_an_expired_signature(env) -> None:
    import time

    env.lc.apply(env.signed(1, "a", expires_in_days=1))
    env.lc.apply(env.signed(2, "ab"))
    later = env.new(clock=lambda: time.time() + 2 * 86400)
    with pytest.raises(SignatureError, match="expired"):
        later.rollback()


def test_replayed_old_version_is_refused_and_recorded(env) -> None:
    old = env.signed(1, "a")
    env.lc.apply(old)
    env.lc.apply(env.signed(2, "ab"))
    with pytest.raises(SignatureError, match="anti-rollback"):
        env.lc.apply(old, "replay")
    rec = env.lc.log.last()
    assert (rec["action"], rec["result"], rec["version"], rec["origin"]) == (
        "apply", "refused", 1, "replay")
    assert env.active_gen() == 2


def test_enforce_requires_signature_audit_accepts_unsigned(env) -> None:
    with pytest.raises(SignatureError, match="enforce mode requires a signed policy"):
        env.lc.apply(env.toml(1, mode="enforce"))
    assert env.actions()[-1] == ("apply", "refused")
    with pytest.raises(SignatureError):
        env.lc.apply(env.toml(1, mode="audit"), mode_override="enforce")
    res = env.lc.apply(env.toml(1, mode="audit"))
    assert res.mode == "audit" and res.signer == ""
    assert env.lc.store.load(res.generation).signer == ""
    assert env.lc.log.last()["signer"] == "unsigned"
    assert env.state_now().active.mode == abi.Mode.AUDIT
    # a signed enforce policy may be run in audit mode
    assert env.lc.apply(env.signed(2), mode_override="audit").mode == "audit"


def test_bad_signature_is_refused_even_in_audit_mode(env) -> None:
    env_bytes = env.signed(1, mode="audit").replace(b'\\"r-a\\"', b'\\"r-x\\"')
    with pytest.raises(SignatureError):
        env.lc.apply(env_bytes)


def test_failure_mid_stage_leaves_old_generation_active(env) -> None:
    env.lc.apply(env.signed(1, "a"))
    st0 = env.state_now()
    active_cfg = env.maps.config.lookup(slots.slot_key(st0.active_slot))
    active_digest = slots.slot_digest(env.maps, st0.active_slot)
    env.maps.rules.fail_update_after = 1  # the second rule write fails
    with pytest.raises(KernelError, match="staging generation 2 failed"):
        env.lc.apply(env.signed(2, "abc"))
    st = env.state_now()
    assert st.active.generation == 1 and st.active.valid
    assert not st.slots[st.inactive_slot].valid
    assert st.active_slot == st0.active_slot
    assert env.maps.config.lookup(slots.slot_key(st.active_slot)) == active_cfg
    assert slots.slot_digest(env.maps, st.active_slot) == active_digest
    assert 2 not in env.lc.store.generations()
    rec = env.lc.log.last()
    assert (rec["action"], rec["result"], rec["generation"]) == ("apply", "refused", 2)
    assert "injected" in rec["reason"]
    assert not env.lc.pending_path.exists()
    env.maps.rules.fail_update_after = None
    assert env.lc.apply(env.signed(2, "abc")).generation == 2  # the retry is allowed


def test_failure_to_persist_counter_refuses_apply(env, monkeypatch) -> None:
    env.lc.apply(env.signed(1, "a"))
    real = antirollback._store.atomic_write

    def failing(path, data):
        if path.name == antirollback.FILE_NAME:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(antirollback._store, "atomic_write", failing)
    with pytest.raises(StateError, match="cannot persist anti-rollback counter"):
        env.lc.apply(env.signed(2, "ab"))
    assert env.active_gen() == 1 and env.actions()[-1] == ("apply", "refused")


def test_compile_error_is_refused_before_anything(env) -> None:
    src = env.toml(1, mode="audit").replace(str(env.tmp / "a").encode(), b"/nonexistent/x")
    with pytest.raises(PolicyError, match="nonexistent"):
        env.lc.apply(src)
    assert env.lc.store.generations() == [] and env.active_gen() == 0


# ------------------------------------------------------------------------- break-glass
def test_break_glass_switches_to_audit_and_blocks_enforce_until_cleared(env) -> None:
    env.lc.apply(env.signed(1, "a"))
    env.lc.apply(env.signed(2, "ab"))
    out = env.lc.break_glass("pager: prod outage")
    assert out.method == "audit" and out.generation == 2 and out.problems == []
    st = env.state_now()
    assert st.active.valid and all(s.mode == abi.Mode.AUDIT for s in st.slots)
    rec = env.lc.log.last()
    assert (rec["action"], rec["reason"], rec["generation"]) == ("break-glass",
                                                                  "pager: prod outage", 2)
    with pytest.raises(PolicyError, match="break-glass is in effect"):
        env.lc.apply(env.signed(3, "abc"))
    # rollback under break-glass stays in audit
    assert env.lc.rollback().mode == "audit"
    assert env.state_now().active.mode == abi.Mode.AUDIT
    env.lc.clear_break_glass("incident closed")
    assert env.lc.apply(env.signed(3, "abc")).mode == "enforce"
    assert ("break-glass-clear", "ok") in env.actions()
    assert env.lc.log.verify().ok


def test_break_glass_deactivate(env) -> None:
    env.lc.apply(env.signed(1))
    out = env.lc.break_glass("drill", deactivate=True)
    assert out.method == "deactivate" and not env.state_now().active.valid


def test_break_glass_still_works_when_provenance_cannot_be_written(env, monkeypatch) -> None:
    env.lc.apply(env.signed(1))

    def broken(*a, **k):
        raise StateError("disk full")

    monkeypatch.setattr(env.lc.log, "append", broken)
    out = env.lc.break_glass("disk is full")
    assert env.state_now().active.mode == abi.Mode.AUDIT
    assert out.problems == ["disk full"]


def test_break_glass_needs_reason(env) -> None:
    with pytest.raises(PolicyError, match="reason"):
        env.lc.break_glass("  ")


# ------------------------------------------------------------------------- canary
def test_evaluate_canary() -> None:
    assert evaluate_canary({}, {}, 10, max_deny_rate=0)
    assert evaluate_canary({("r", 0): 5}, {("r", 0): 15}, 10, max_deny_rate=1.0)
    assert not evaluate_canary({("r", 0): 5}, {("r", 0): 16}, 10, max_deny_rate=1.0)
    assert not evaluate_canary({}, {("r", 0): 3, ("s", 1): 9}, 10, max_deny_rate=1.0)
    assert not evaluate_canary({("r", 0): 100}, {("r", 0): 20}, 10, max_deny_rate=1.0)  # reset
    with pytest.raises(PolicyError):
        evaluate_canary({}, {}, 0, max_deny_rate=1)


def test_canary_failure_rolls_back_and_records_why(env) -> None:
    env.lc.apply(env.signed(1, "a"))
    counts = {2: iter([{(0, "file_open"): 0}, {(0, "file_open"): 500}])}
    slept = []
    out = env.lc.apply_with_canary(
        env.signed(2, "ab"), canary_seconds=30, max_deny_rate=1.0,
        read_denies=lambda gen: next(counts[gen]), sleep=slept.append,
    )
    assert slept == [30] and not out.passed and out.deny_rate == pytest.approx(500 / 30)
    assert out.rollback is not None and out.rollback.generation == 1
    assert out.rollback.method == "flip" and env.active_gen() == 1
    assert env.actions()[-3:] == [("apply", "ok"), ("canary", "refused"), ("rollback", "ok")]
    assert "canary" in env.lc.log.last()["why"]


def test_canary_pass_keeps_new_generation(env) -> None:
    env.lc.apply(env.signed(1, "a"))
    out = env.lc.apply_with_canary(env.signed(2, "ab"), canary_seconds=10, max_deny_rate=1.0,
                                   read_denies=lambda g: {(0, "x"): 3}, sleep=lambda s: None)
    assert out.passed and env.active_gen() == 2 and env.actions()[-1] == ("canary", "ok")


def test_canary_failure_with_nothing_before_deactivates(env) -> None:
    seq = iter([{}, {(0, "x"): 99}])
    out = env.lc.apply_with_canary(env.signed(1), canary_seconds=1, max_deny_rate=0,
                                   read_denies=lambda g: next(seq), sleep=lambda s: None)
    assert out.rollback.method == "deactivate" and env.active_gen() == 0


# ------------------------------------------------------------------------- crash recovery
def test_pending_journal_is_a_versioned_struct(env) -> None:
    """The journal written before an apply changes anything round-trips as the Struct."""
    import msgspec

    from aegis_stream.policy.lifecycle import JOURNAL_FORMAT, JournalOp, PendingJournal

    env.lc.apply(env.signed(1, "a"))

    def crash(s):
        if s == "pending":
            raise SimulatedCrash(s)

    with pytest.raises(SimulatedCrash):
        env.new(hook=crash).apply(env.signed(2, "ab"), "v2")
    raw = env.new().pending_path.read_bytes()
    j = msgspec.json.decode(raw, type=PendingJournal)
    assert (j.op, j.old_generation, j.new_generation, j.version, j.format) == (
        JournalOp.APPLY, 1, 2, 2, JOURNAL_FORMAT)
    assert msgspec.json.decode(msgspec.json.encode(j), type=PendingJournal) == j
    assert env.new().reconcile().effective == "old"


@pytest.mark.parametrize("content", [b"", b"{torn", b"[]", b'{"op": "apply"}',
                                     b'{"op": "format-disk", "old_generation": 1, "new_generation": 2}',
                                     b'{"op": "apply", "old_generation": "1", "new_generation": 2}'])
def test_corrupt_pending_journal_is_discarded_and_reported(env, content) -> None:
    """A journal that does not decode (torn, wrong type, unknown op): reconcile reports
    it as inconsistent, records the refusal, removes it, and leaves the kernel alone."""
    env.lc.apply(env.signed(1, "a"))
    lc = env.new()
    lc.pending_path.write_bytes(content)
    out = lc.reconcile()
    assert (out.status, out.effective, out.generation, out.detail) == (
        "inconsistent", "unknown", 1, "unreadable journal")
    assert not lc.pending_path.exists() and env.active_gen() == 1
    assert lc.log.last()["reason"] == "unreadable lifecycle journal; discarded"


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_reconciles_to_exactly_old_or_new(env, step) -> None:
    env.lc.apply(env.signed(1, "a"))

    def crash(s):
        if s == step:
            raise SimulatedCrash(s)

    with pytest.raises(SimulatedCrash):
        env.new(hook=crash).apply(env.signed(2, "ab"), "v2")
    expect_new = STEPS.index(step) >= STEPS.index("activated")
    assert env.active_gen() == (2 if expect_new else 1)
    out = reconcile(env.maps, PolicyStore(env.state))
    assert out.generation == (2 if expect_new else 1)
    lc = env.new()
    assert not lc.pending_path.exists()
    if step == "verified":
        assert (out.status, out.effective) == ("clean", "none")  # before the journal
        assert lc.log.last()["action"] == "apply"
    elif step == "logged":
        assert (out.status, out.effective) == ("clean", "new")  # the apply record made it
    else:
        assert out.effective == ("new" if expect_new else "old")
        rec = lc.log.last()
        assert rec["action"] == "reconcile" and rec["effective"] == out.effective
        assert rec["generation"] == out.generation
    if not expect_new:
        assert 2 not in lc.store.generations()
        st = env.state_now()
        assert not st.slots[st.inactive_slot].valid
    assert lc.log.verify().ok
    # whatever happened, applying v2 again now works (same policy: idempotent)
    assert lc.apply(env.signed(2, "ab")).policy.version == 2
    assert reconcile(env.maps, PolicyStore(env.state)).status == "clean"


@pytest.mark.parametrize("step", ["pending", "recorded", "staged", "activated"])
def test_crash_during_rollback(env, step) -> None:
    for v, f in ((1, "a"), (2, "ab"), (3, "abc")):
        env.lc.apply(env.signed(v, f))

    def crash(s):
        if s == step:
            raise SimulatedCrash(s)

    with pytest.raises(SimulatedCrash):
        env.new(hook=crash).rollback(to_version=1)  # slot overwritten: reapply path
    out = env.new().reconcile()
    assert out.effective == ("new" if step == "activated" else "old")
    assert env.active_gen() == (4 if step == "activated" else 3)
    assert 1 in env.lc.store.generations()


def test_crash_during_flip_rollback_keeps_target_record(env) -> None:
    env.lc.apply(env.signed(1, "a"))
    env.lc.apply(env.signed(2, "ab"))

    def crash(s):
        if s == "pending":
            raise SimulatedCrash(s)

    with pytest.raises(SimulatedCrash):
        env.new(hook=crash).rollback()
    assert env.new().reconcile().effective == "old"
    assert 1 in env.lc.store.generations()  # the flip target is an old, real generation
    assert env.lc.rollback().method == "flip"


FAKE_KERNEL = '''
import json, os, signal
from aegis_stream.kernel.maps import FakeMap, PolicyMaps

KILL_AFTER = int(os.environ.get("KILL_AFTER_RULE_UPDATES", "-1"))


class FileMap(FakeMap):
    """A fake map whose every write is durable (a kernel map outlives the process)."""

    def __init__(self, base, path, maps):
        self.__dict__.update(base.__dict__)
        self._path, self._maps = path, maps

    def _save(self):
        doc = {m.name: {k.hex(): v.hex() for k, v in m.data.items()} for m in self._maps}
        with open(self._path + ".tmp", "w") as fh:
            json.dump(doc, fh)
        os.replace(self._path + ".tmp", self._path)

    def update(self, key, value, flags=0):
        global KILL_AFTER
        super().update(key, value, flags)
        self._save()
        if self.name == "aegis_rules" and KILL_AFTER >= 0:
            if KILL_AFTER == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            KILL_AFTER -= 1

    def delete(self, key):
        r = super().delete(key)
        self._save()
        return r


def load_maps(path):
    base = PolicyMaps.fake(64)
    maps = []
    pm = PolicyMaps(*(FileMap(m, path, maps) for m in (base.rules, base.scopes, base.config)))
    maps.extend([pm.rules, pm.scopes, pm.config])
    if os.path.exists(path):
        with open(path) as fh:
            doc = json.load(fh)
        for m in maps:
            m.data = {bytes.fromhex(k): bytes.fromhex(v) for k, v in doc[m.name].items()}
    return pm
'''

CHILD = '''
import os, signal, sys
from fakekernel import load_maps
from aegis_stream.policy.lifecycle import Lifecycle

maps_path, state, step, policy = sys.argv[1:5]


def hook(s):
    if s == step:
        os.kill(os.getpid(), signal.SIGKILL)


Lifecycle(load_maps(maps_path), state, hook=hook).apply(open(policy, "rb").read(), "v2")
'''


def test_kill_9_at_each_step_in_a_real_process(env, tmp_path) -> None:
    (tmp_path / "fakekernel.py").write_text(FAKE_KERNEL)
    (tmp_path / "child.py").write_text(textwrap.dedent(CHILD))
    spec = importlib.util.spec_from_file_location("fakekernel", tmp_path / "fakekernel.py")
    fk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fk)
    v2 = tmp_path / "v2.signed"
    v2.write_bytes(env.signed(2, "ab"))
    cases = [(s, None) for s in STEPS if s != "logged"] + [("mid-stage", 1), ("done", None)]
    for step, kill_after in cases:
        mp = str(tmp_path / f"maps-{step}.json")
        state = tmp_path / f"state-{step}"
        lc0 = Lifecycle(fk.load_maps(mp), state)
        lc0.trust.add((tmp_path / "keys" / "k1.pub").read_bytes())
        lc0.apply(env.signed(1, "a"))
        envv = {**os.environ, "PYTHONPATH": str(tmp_path)}
        if kill_after is not None:
            envv["KILL_AFTER_RULE_UPDATES"] = str(kill_after)
        p = subprocess.run([sys.executable, str(tmp_path / "child.py"), mp, str(state), step,
                            str(v2)], env=envv, capture_output=True, timeout=60)
        if step == "done":
            assert p.returncode == 0, p.stderr
        else:
            assert p.returncode == -9, (step, p.returncode, p.stderr)
        maps = fk.load_maps(mp)
        out = reconcile(maps, PolicyStore(state))
        new = step in ("activated", "done")
        if step in ("verified", "done"):  # no journal yet / any more: nothing interrupted
            assert out.status == "clean", (step, out)
        else:
            assert out.effective == ("new" if new else "old"), (step, out)
        st = slots.read_state(maps)
        assert st.active.valid and st.active.generation == (2 if new else 1)
        assert slots.slot_digest(maps, st.active_slot) == slots.expected_digest(
            PolicyStore(state).load(st.active.generation).policy, st.active_slot)
        lc = Lifecycle(maps, state)
        assert lc.log.verify().ok
        if step not in ("verified", "done"):
            assert lc.log.last()["action"] == "reconcile"
        assert lc.apply(env.signed(2, "ab")).policy.version == 2


# ------------------------------------------------------------------------- CLI handlers
def _parser():
    p = argparse.ArgumentParser(prog="aegis")
    sub = p.add_subparsers(dest="command", required=True)
    pol = sub.add_parser("policy").add_subparsers(dest="policy_command", required=True)
    pa = pol.add_parser("apply")
    pa.add_argument("file")
    pa.add_argument("--mode", choices=["audit", "enforce"])
    cli_policy.add_policy_apply_arguments(pa)
    pa.set_defaults(func=cli_policy.cmd_policy_apply)
    cli_policy.add_policy_lifecycle_commands(pol, sub)
    return p


def _run(argv):
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_end_to_end(env, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "cli-state"))

    @contextlib.contextmanager
    def fake_kernel():
        yield env.maps, lambda gen: {}

    monkeypatch.setattr(cli_policy, "_kernel", fake_kernel)
    kd = tmp_path / "cli-keys"
    assert _run(["keys", "generate", "--id", "ops", "--out", str(kd)]) == 0
    assert _run(["keys", "add", str(kd / "ops.pub")]) == 0
    assert _run(["keys", "list"]) == 0
    assert "ops" in capsys.readouterr().out
    for v, f in ((1, "a"), (2, "ab")):
        src = tmp_path / f"p{v}.toml"
        src.write_bytes(env.toml(v, f))
        assert _run(["policy", "sign", str(src), "--key", str(kd / "ops.key"),
                     "--expires-in", "7"]) == 0
        assert _run(["policy", "verify", f"{src}.signed"]) == 0
        assert _run(["policy", "apply", f"{src}.signed"]) == 0
    out = capsys.readouterr().out
    assert "signed by ops" in out and "generation 2 (was 1)" in out
    assert _run(["policy", "rollback", "--reason", "bad deploy"]) == 0
    assert "instant slot flip" in capsys.readouterr().out
    assert _run(["policy", "lint", str(tmp_path / "p1.toml")]) == 0
    with pytest.raises(PolicyError, match="root"):
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        _run(["break-glass", "--reason", "x"])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _run(["break-glass", "--reason", "outage"]) == 0
    assert _run(["keys", "revoke", "ops", "--reason", "drill"]) == 0
    assert "were signed by ops" in capsys.readouterr().out
    assert _run(["policy", "log", "--verify"]) == 0
    out = capsys.readouterr().out
    for word in ("key-add", "apply ok web v1", "rollback ok", "break-glass", "key-revoke",
                 "hash chain intact"):
        assert word in out, word
    assert _run(["policy", "log", "--json", "--tail", "1"]) == 0
    assert '"key-revoke"' in capsys.readouterr().out
    logf = tmp_path / "cli-state" / "provenance.jsonl"
    lines = logf.read_bytes().splitlines(keepends=True)
    del lines[2]
    logf.write_bytes(b"".join(lines))
    with pytest.raises(StateError, match=r"provenance.jsonl:3: "):
        _run(["policy", "log", "--verify"])


def test_store_heads_index_tracks_records_and_discards(tmp_path):
    """Rollback chooses its target from generations/index.json: entries appear for new
    records, vanish with discarded ones, and a reused number is not served stale."""
    from aegis_stream.policy.compiler import CompiledPolicy
    from aegis_stream.policy.store import GenerationRecord, PolicyStore

    store = PolicyStore(tmp_path)

    def rec(g: int, name: str, version: int) -> GenerationRecord:
        return GenerationRecord(g, 0.0, CompiledPolicy(name, version, "audit", f"d{g}", [], []))

    store.record(rec(1, "web", 1))
    store.record(rec(2, "web", 2))
    assert {g: (h.name, h.version) for g, h in store.heads().items()} == {1: ("web", 1), 2: ("web", 2)}
    assert (tmp_path / "generations" / "index.json").exists()
    store.discard(2)
    store.record(rec(2, "db", 7))  # the number is reused after a refused apply
    store.record(rec(3, "web", 3))
    assert {g: (h.name, h.version) for g, h in store.heads().items()} == {
        1: ("web", 1), 2: ("db", 7), 3: ("web", 3)}
    (tmp_path / "generations" / "index.json").write_text("{not json")
    assert sorted(store.heads()) == [1, 2, 3]  # a corrupt index is rebuilt
