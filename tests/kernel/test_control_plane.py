"""CP-001..004: the control plane is not the easy way around the signature, in a real kernel.

In-process (``Lifecycle`` and map handles, no ``aegis`` subprocess: each start costs ~10 s
in a TCG guest), against the session's loaded object:

* CP-001: an unsigned audit-mode apply (and ``--mode audit`` on a signed enforce policy)
  over a signed enforce generation is refused, and the kernel still denies;
* CP-002: deleting ``versions.json`` does not let an old signed version back in;
* CP-003: the state dir after real applies: directories 0700, files 0600 (umask 022);
* CP-004: a ``bpftool``-style write (an independent fd of the map from its bpffs pin)
  that deletes a rule or flips the mode really opens the file, and the agent's tick check
  (``IntegrityChecker``, called in-process) reports ``policy_tampered``; restoring clears it.

The unit versions (fake maps): tests/unit/test_control_plane.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aegis_stream.agent.health import ReasonCode
from aegis_stream.agent.integrity import IntegrityChecker
from aegis_stream.errors import SignatureError
from aegis_stream.kernel import abi, slots
from aegis_stream.policy import signing

from .conftest import EPERM, KEY_ID, Lab, bpftool_handle

TAMPERED = ReasonCode.POLICY_TAMPERED


def _doc(lab: Lab, version: int, path: Path, mode: str) -> bytes:
    return (f'apiVersion = "aegis/v1"\nname = "kt"\nversion = {version}\nmode = "{mode}"\n'
            f'[[scope]]\ncgroup = "{lab.cg_selected}"\n'
            f'[[rules]]\nid = "cp"\npath = "{path}"\nactions = ["open", "exec"]\n').encode()


def _denied(lab: Lab, path: Path) -> bool:
    out = lab.probe("open", path)
    if out.errno == EPERM:
        return True
    assert out.result == {"ok": True}, out
    return False


def test_cp_001_unsigned_audit_over_enforce_refused_kernel_still_denies(lab: Lab):
    """CP-001: leaving enforce needs a signature: unsigned audit and --mode audit refused."""
    f = lab.file("cp/enforced")
    res = lab.apply([{"id": "cp", "path": str(f)}])
    assert _denied(lab, f)
    nxt = len(lab.applied) + 1
    with pytest.raises(SignatureError, match=f"generation {res.generation} is enforcing"):
        lab.lifecycle.apply(_doc(lab, nxt, f, "audit"), "cp-unsigned-audit")
    signed_enforce = signing.sign_policy(_doc(lab, nxt, f, "enforce"), lab.key, KEY_ID)
    with pytest.raises(SignatureError, match="--mode audit"):
        lab.lifecycle.apply(signed_enforce, "cp-mode-audit", mode_override="audit")
    st = slots.read_state(lab.lifecycle.maps)
    assert (st.active.generation, st.active.mode) == (res.generation, int(abi.Mode.ENFORCE))
    assert _denied(lab, f)
    last = lab.lifecycle.log.last()
    assert last is not None and (last["action"], last["result"]) == ("apply", "refused")
    # the signed way out: a signed audit-mode policy
    lab.apply([{"id": "cp", "path": str(f)}], mode="audit")
    assert not _denied(lab, f)


def test_cp_002_deleting_the_versions_file_does_not_allow_v1_back(lab: Lab):
    """CP-002: the anti-rollback counter is rebuilt from the provenance chain."""
    f, g = lab.file("cp/v-now"), lab.file("cp/v-old")
    lab.apply([{"id": "cp", "path": str(f)}])
    old = signing.sign_policy(_doc(lab, 1, g, "enforce"), lab.key, KEY_ID)  # v1, validly signed
    high = len(lab.applied)
    (lab.lifecycle.root / "versions.json").unlink()
    with pytest.raises(SignatureError, match=f"older than v{high}"):
        lab.lifecycle.apply(old, "cp-replayed-v1")
    assert _denied(lab, f) and not _denied(lab, g)
    assert (lab.lifecycle.root / "versions.json").exists()  # rebuilt and written back
    restores = [r for r in lab.lifecycle.log.records() if r["action"] == "antirollback-restore"]
    assert restores and restores[-1]["versions"]["kt"] == high
    assert lab.lifecycle.log.verify().ok


def test_cp_003_state_dir_modes_after_an_apply(lab: Lab):
    """CP-003: 0700 directories and 0600 files of the lifecycle's state, umask 022."""
    old = os.umask(0o022)
    try:
        f = lab.file("cp/modes")
        lab.apply([{"id": "cp", "path": str(f)}])
    finally:
        os.umask(old)
    root = lab.lifecycle.root
    # the lifecycle's own: the dir, generations/, keys/ and the files at the top (other
    # kernel tests may run agents whose spool shares this session's state dir)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    checked = []
    for d in (root, root / "generations", root / "keys"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        for p in d.iterdir():
            if not p.is_file() or (d.name == "keys" and p.name.startswith(f"{KEY_ID}.")):
                continue  # the session's own key pair, written there by the fixture
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
            checked.append(p.name)
    for must in ("versions.json", "provenance.jsonl", "provenance.head", "lifecycle.lock",
                 "trust.json", f"{lab.applied[-1].generation}.json"):
        assert must in checked, (must, checked)




def test_cp_004_bpftool_style_map_writes_detected_by_the_tick_check(lab: Lab):
    """CP-004: delete a rule, flip the mode: each opens the file and each is reported."""
    f, g = lab.file("cp/t1"), lab.file("cp/t2")
    res = lab.apply([{"id": "cp-t1", "path": str(f)}, {"id": "cp-t2", "path": str(g)}])
    check = IntegrityChecker(lab.lifecycle.maps, lab.lifecycle.root)
    assert not check.check().findings
    r = res.policy.rules[0]
    key = abi.INODE_KEY.pack(r.ino, r.dev, res.slot)
    with bpftool_handle(lab, abi.MAP_RULES) as rules:
        val = rules.lookup(key)
        assert val is not None
        assert rules.delete(key)
        try:
            assert not _denied(lab, f) and _denied(lab, g)  # the bypass is real ...
            rep = check.check()
            assert rep.tampered, rep  # ... and not silent
            assert "missing cp-t1" in rep.findings[0].text
        finally:
            rules.update(key, val)
    assert not check.check().findings and _denied(lab, f)
    with bpftool_handle(lab, abi.MAP_CONFIG) as config:
        skey = slots.slot_key(res.slot)
        before = config.lookup(skey)
        assert before is not None
        gen, _mode, flags, rc, sc = abi.SLOT_CONFIG.unpack(before)
        config.update(skey, abi.SLOT_CONFIG.pack(gen, int(abi.Mode.AUDIT), flags, rc, sc))
        try:
            assert not _denied(lab, f)
            rep = check.check()
            assert rep.tampered and "is in audit mode" in rep.findings[0].text, rep
            print(f"tick check on the real maps: {rep.seconds * 1e3:.2f} ms")
        finally:
            config.update(skey, before)
    assert not check.check().findings and _denied(lab, f)
