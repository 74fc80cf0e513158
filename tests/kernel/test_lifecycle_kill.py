"""kill -9 at each step of a real apply, in a real kernel, then restart and reconcile.

The apply runs in a forked child process on the lab's loaded maps through
``Lifecycle(hook=...)``: the step hook the fake-maps tests use (tests/unit/test_lifecycle.py)
makes the child send itself SIGKILL right after the step; "mid-stage" kills it after the
first rule written into the inactive slot.  Then a fresh Lifecycle (the next
start) reconciles, and the test checks that exactly the old or the new generation is
effective -- by the kernel's slot state and by an actual open in the selected cgroup
(EPERM or not) -- and that the provenance log records which.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from aegis_stream.kernel import slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import signing
from aegis_stream.policy.lifecycle import STEPS, Lifecycle

from .conftest import EPERM, Lab


def _in_child(body: Callable[[], object]) -> int:
    """Run ``body`` in a forked child (modules already imported: a fresh Python start
    costs tens of seconds under a loaded QEMU TCG); its wait status: exit 0 when body
    returned, 3 when it raised, or the signal that killed it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            body()
        except BaseException:  # noqa: BLE001 - reported by the exit status
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _apply_in_child(lab: Lab, state: Path, v2: bytes, step: str) -> int:
    """In a forked child, apply v2 through Lifecycle with a hook that SIGKILLs it after
    ``step``.  Returns the child's wait status."""

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    class KillingRules:
        """The rules map; "mid-stage" dies right after the first rule written."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def update(self, key, value, flags=0):
            self.inner.update(key, value, flags)
            if step == "mid-stage":
                die()

    def body() -> None:
        pm = lab.obj.policy_maps()
        maps = PolicyMaps(KillingRules(pm.rules), pm.scopes, pm.config)
        Lifecycle(maps, state, hook=lambda s: die() if s == step else None).apply(v2, "v2")

    return _in_child(body)


# (case, the generation effective after reconcile, reconcile status)
CASES = [(s, "new" if STEPS.index(s) >= STEPS.index("activated") else "old") for s in STEPS]
CASES.insert(STEPS.index("staged"), ("mid-stage", "old"))
CASES.append(("done", "new"))


def _toml(name: str, version: int, cgroup: Path, files: list[Path]) -> bytes:
    doc = (f'apiVersion = "aegis/v1"\nname = "{name}"\nversion = {version}\n'
           f'mode = "enforce"\n\n[[scope]]\ncgroup = "{cgroup}"\n\n')
    for f in files:
        doc += f'[[rules]]\nid = "deny-{f.name}"\npath = "{f}"\nactions = ["open"]\n\n'
    return doc.encode()


@pytest.mark.parametrize("case,expect", CASES, ids=[c for c, _ in CASES])
def test_kill_9_at_apply_step_then_reconcile(lab: Lab, tmp_path: Path, case: str, expect: str):
    x, y, w = lab.file("kill-x"), lab.file("kill-y"), lab.file("kill-w")
    kp = signing.generate_keypair("kill", tmp_path / "keys")
    key, _ = signing.load_private_key(kp.private_path)
    v1 = signing.sign_policy(_toml("killtest", 1, lab.cg_selected, [x]), key, "kill")
    v2 = signing.sign_policy(_toml("killtest", 2, lab.cg_selected, [y, w]), key, "kill")
    state = tmp_path / "state"
    pm = lab.obj.policy_maps()
    lc = Lifecycle(pm, state)
    lc.trust.add(kp.public_path.read_bytes())
    old = lc.apply(v1, "v1").generation
    assert lab.probe("read", x).errno == EPERM
    assert lab.probe("read", y).result == {"ok": True}

    status = _apply_in_child(lab, state, v2, case)
    if case == "done":
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (case, status)

    # the next start: a fresh Lifecycle on the same kernel maps and state dir
    nxt = Lifecycle(lab.obj.policy_maps(), state)
    out = nxt.reconcile()
    st = slots.read_state(pm)
    assert st.active.valid
    new_gen = old + 1 if expect == "new" else 0
    if expect == "new":
        assert st.active.generation == out.generation and out.generation > old
        new_gen = out.generation
    else:
        assert st.active.generation == old == out.generation
        assert not nxt.pending_path.exists()
        assert sorted(nxt.store.generations()) == [old]  # the unactivated record is gone
        if st.slots[st.inactive_slot].generation > old:
            assert not st.slots[st.inactive_slot].valid
    # the decisive check: what an open in the selected cgroup returns right now
    if expect == "new":
        assert lab.probe("read", x).result == {"ok": True}, case
        assert lab.probe("read", y).errno == EPERM, case
        assert lab.probe("read", w).errno == EPERM, case
    else:
        assert lab.probe("read", x).errno == EPERM, case
        assert lab.probe("read", y).result == {"ok": True}, case
        assert lab.probe("read", w).result == {"ok": True}, case
    # the kernel holds exactly what the store says the effective generation is
    assert slots.slot_digest(pm, st.active_slot) == slots.expected_digest(
        nxt.store.load(st.active.generation).policy, st.active_slot)

    last = nxt.log.last()
    assert last is not None
    if case in ("verified", "logged", "done"):
        # nothing was interrupted in a way that needs recovery: no journal at all
        # (verified), or the apply's own provenance record was already written
        assert (out.status, out.effective) == {"verified": ("clean", "none"),
                                               "logged": ("clean", "new"),
                                               "done": ("clean", "none")}[case], out
        assert last["action"] == "apply" and last["result"] == "ok"
        assert last["generation"] == (old if case == "verified" else new_gen)
    else:
        assert (out.status, out.effective) == ("recovered", expect), out
        assert last["action"] == "reconcile" and last["result"] == "ok"
        assert last["effective"] == expect and last["generation"] == out.generation
        assert last["previous_generation"] == old and last["interrupted"] == "apply"
    assert nxt.log.verify().ok

    # and an apply of v2 now simply works (same policy: idempotent), enforced at once
    res = nxt.apply(v2, "v2 again")
    assert res.policy.version == 2
    assert lab.probe("read", y).errno == EPERM and lab.probe("read", x).result == {"ok": True}
    assert nxt.reconcile().status == "clean"


def _rollback_in_child(lab: Lab, state: Path, step: str, **kw) -> int:
    """As _apply_in_child, for ``Lifecycle.rollback(**kw)``: SIGKILL right after ``step``."""

    def die(s: str) -> None:
        if s == step:
            os.kill(os.getpid(), signal.SIGKILL)

    return _in_child(lambda: Lifecycle(lab.obj.policy_maps(), state, hook=die).rollback(**kw))


# (path, step, effective after reconcile): "reapply" rolls back to v1 after v3 overwrote
# v1's slot (a new generation is recorded and staged); "flip" rolls back v2 -> v1 whose
# slot still holds v1 (one write activates it)
ROLLBACK_CASES = ([("reapply", s, "new" if s in ("activated", "logged") else "old")
                   for s in ("pending", "recorded", "staged", "activated", "logged")]
                  + [("flip", s, "new" if s in ("activated", "logged") else "old")
                     for s in ("pending", "activated")])


@pytest.mark.parametrize("path,step,expect", ROLLBACK_CASES,
                         ids=[f"{p}-{s}" for p, s, _ in ROLLBACK_CASES])
def test_kill_9_at_rollback_step_then_reconcile(lab: Lab, tmp_path: Path, path: str, step: str,
                                                expect: str):
    """kill -9 during a rollback, in a real kernel: after the next start's reconcile
    exactly the generation before the rollback (old) or the rollback's target (new) is
    enforced, by the slot state and by real opens, and the log says which."""
    x, y, w = lab.file("rbk-x"), lab.file("rbk-y"), lab.file("rbk-w")
    kp = signing.generate_keypair("kill", tmp_path / "keys")
    key, _ = signing.load_private_key(kp.private_path)
    state = tmp_path / "state"
    pm = lab.obj.policy_maps()
    lc = Lifecycle(pm, state)
    lc.trust.add(kp.public_path.read_bytes())
    files = {1: [x], 2: [y], 3: [w]}
    last = 3 if path == "reapply" else 2
    for v in range(1, last + 1):
        lc.apply(signing.sign_policy(_toml("rbtest", v, lab.cg_selected, files[v]), key, "kill"),
                 f"v{v}")
    before = slots.read_state(pm).active.generation

    status = _rollback_in_child(lab, state, step, to_version=1)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (path, step, status)

    nxt = Lifecycle(lab.obj.policy_maps(), state)
    out = nxt.reconcile()
    st = slots.read_state(pm)
    assert st.active.valid and st.active.generation == out.generation
    if expect == "old":
        assert out.generation == before, (path, step, out)
    else:
        assert out.generation != before and nxt.store.load(out.generation).policy.version == 1
    # the decisive check: real opens in the selected cgroup
    denied = {1: x, 2: y, 3: w}[1 if expect == "new" else last]
    for f in (x, y, w):
        if f == denied:
            assert lab.probe("read", f).errno == EPERM, (path, step, f.name)
        else:
            assert lab.probe("read", f).result == {"ok": True}, (path, step, f.name)
    assert slots.slot_digest(pm, st.active_slot) == slots.expected_digest(
        nxt.store.load(st.active.generation).policy, st.active_slot)
    rec = nxt.log.last()
    assert rec is not None and nxt.log.verify().ok
    if step == "logged":
        assert rec["action"] == "rollback" and rec["result"] == "ok"
    else:
        assert (out.status, out.effective) == ("recovered", expect), out
        assert rec["action"] == "reconcile" and rec["effective"] == expect
        assert rec["interrupted"] == "rollback"
    assert nxt.reconcile().status == "clean"  # the journal is gone: nothing left to recover
