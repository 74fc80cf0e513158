"""Attach-failure matrix and verifier budgets, in real kernels.

For every program: a missing hook (load fails before the verifier), a verifier
rejection, a CO-RE relocation no kernel satisfies (deliberately broken objects built by
tests/kernel/Makefile), and an attach refusal (AEGIS_FAULT_INJECT).  The loader must
name the failing hook and its reason, keep the other hooks, and never report
enforcing-capable: 0 silent partial attaches.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

import pytest

from aegis_stream.kernel import abi, builds
from aegis_stream.kernel.loader import BpfObject, fault_injection

from .agentlib import aegis
from .conftest import IN_LAB

# the fixtures of the build this kernel runs (tests/kernel/Makefile builds both sets)
BUILD = Path(__file__).parent / ".build"
if builds.probe_task_storage() is False:
    BUILD = BUILD / builds.Build.NO_TASK_STORAGE.value
HOOK_PROGS = {"file_open": "aegis_file_open", "bprm_check": "aegis_bprm_check",
              "mmap_file": "aegis_mmap_file", "file_mprotect": "aegis_file_mprotect"}
EXPECT = {
    "nohook": r"LSM hook 'aegis_no_such_hook' not found in kernel",
    # 7.x checks the LSM return range [-4095, 0] before it reaches the unchecked load
    "verifier": r"verifier rejected the program: .*(map_value_or_null|invalid mem access|R0 has unknown scalar)",
    "core": r"CO-RE relocation failed: .*inode___aegis_fixture\.aegis_no_such_field",
}
BUDGET = json.loads((Path(__file__).parents[2] / "bpf" / "verifier-budget.json").read_text())
PIN = "/sys/fs/bpf/aegis-matrix"


@pytest.fixture(autouse=True)
def _lab_mounts():
    if IN_LAB:
        from aegis_stream.lab.mounts import ensure_guest_mounts

        ensure_guest_mounts()


@pytest.mark.parametrize("kind", sorted(EXPECT))
@pytest.mark.parametrize("hook", sorted(HOOK_PROGS))
def test_attach_matrix_load_failures(hook: str, kind: str):
    obj = BpfObject(BUILD / f"{kind}-{hook}.bpf.o", pin_root_dir=PIN)
    try:
        obj.open()
        obj.load()
        report = obj.attach_all(pin=False)
        bad = HOOK_PROGS[hook]
        st = report.programs[bad]
        assert st.phase == "failed" and re.search(EXPECT[kind], st.error), st.error
        assert st.errno != 0
        others = [p for n, p in report.programs.items() if n != bad]
        assert all(p.phase == "attached" for p in others), report.summary()
        assert not report.enforcing_capable
        summary = report.summary()
        n = len(HOOK_PROGS)
        assert summary.startswith(f"partial attach: {n - 1}/{n}") and st.hook in summary
    finally:
        obj.close(keep_pins=False)


@pytest.mark.parametrize("prog", sorted(HOOK_PROGS.values()))
def test_attach_matrix_attach_refused(prog: str, monkeypatch):
    monkeypatch.setenv("AEGIS_FAULT_INJECT", f"attach:{prog}")
    assert fault_injection() == {"attach": {prog}}
    obj = BpfObject(pin_root_dir=PIN)
    try:
        obj.open()
        obj.load()
        report = obj.attach_all(pin=False)
        assert report.programs[prog].phase == "failed"
        assert report.programs[prog].errno == 95
        assert not report.enforcing_capable
        assert sum(report.programs[p].phase == "attached" for p in HOOK_PROGS.values()) == len(HOOK_PROGS) - 1
    finally:
        obj.close(keep_pins=False)


def test_attach_matrix_continuity_refused_is_degraded_not_refused(monkeypatch):
    """The path-continuity program (not a decision hook) refused: every hook attached, so the
    object is enforcing-capable, and the report names the missing program as degraded."""
    prog = abi.PROGRAM_CONTINUITY
    monkeypatch.setenv("AEGIS_FAULT_INJECT", f"attach:{prog}")
    obj = BpfObject(pin_root_dir=PIN)
    try:
        obj.open()
        obj.load()
        report = obj.attach_all(pin=False)
        assert report.programs[prog].phase == "failed"
        assert all(report.programs[p].phase == "attached" for p in HOOK_PROGS.values())
        assert report.enforcing_capable
        assert [p.name for p in report.degraded_optional] == [prog]
        assert "degraded, not attached: inode_rename" in report.summary()
    finally:
        obj.close(keep_pins=False)


def test_attach_matrix_agent_refuses_to_claim_enforcing(tmp_path):
    """The agent with a hook that fails verification: state degraded, names the hook."""
    target = tmp_path / "t"
    target.write_text("x")
    pol = tmp_path / "p.toml"
    pol.write_text(f'apiVersion = "aegis/v1"\nname = "m"\nversion = 1\nmode = "audit"\n'
                   f'[[rules]]\nid = "r"\npath = "{target}"\n')
    status = tmp_path / "status.json"
    env = dict(os.environ, AEGIS_BPF_OBJECT=str(BUILD / "verifier-file_open.bpf.o"),
               AEGIS_PIN_ROOT="/sys/fs/bpf/aegis-matrix-agent", AEGIS_STATE_DIR=str(tmp_path / "s"))
    try:
        out = aegis(["run", "--policy", str(pol), "--events", os.devnull, "--status-file",
                     str(status), "--exit-after", "0.2"], env)
        assert out.returncode == 0, out.stderr
        st = json.loads(status.read_text())
        assert st["state"] == "degraded"
        assert st["hooks"]["file_open"]["phase"] == "failed"
        assert "verifier rejected" in st["hooks"]["file_open"]["error"]
        assert "DEGRADED" in out.stderr and "file_open" in out.stderr
        assert "state: enforcing" not in out.stderr
    finally:
        aegis(["unload"], env)


def test_verifier_budget(record_testsuite_property):
    """Verified instruction counts per program stay within bpf/verifier-budget.json."""
    obj = BpfObject(pin_root_dir=PIN, log_level=4)
    try:
        obj.open()
        obj.load()
        stats = obj.verifier_stats
    finally:
        obj.close(keep_pins=False)
    assert set(stats) == set(abi.HOOK_PROGRAMS.values()) | set(abi.AUX_PROGRAMS)
    over = []
    for prog, s in stats.items():
        record_testsuite_property(f"{prog}.insns_processed", s.insns_processed)
        record_testsuite_property(f"{prog}.peak_states", s.peak_states)
        print(f"{platform.release()} {prog}: processed {s.insns_processed} insns, "
              f"peak_states {s.peak_states}, total_states {s.total_states}")
        if s.insns_processed > BUDGET[prog]["insns_processed"]:
            over.append(f"{prog}: {s.insns_processed} > {BUDGET[prog]['insns_processed']}")
    assert not over, "verifier budget exceeded: " + "; ".join(over)
