"""`aegis doctor` in a lab kernel: every check passes and the synthetic deny is proven."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from aegis_stream.kernel import abi

from .agentlib import aegis


@pytest.fixture(autouse=True)
def _ptrace_scope_1() -> Iterator[None]:
    """Debian's kernels boot with kernel.yama.ptrace_scope=0, which doctor warns about
    (BYP-PTRACE-FD, TRUST-005): the ready verdict is measured at scope 1."""
    p = Path("/proc/sys/kernel/yama/ptrace_scope")
    old = p.read_text().strip()
    p.write_text("1")
    yield
    p.write_text(old)


def test_doctor_001_ready_with_deny_proof():
    out = aegis(["doctor", "--json"])
    doc = json.loads(out.stdout)
    assert doc["schema"] == "aegis.doctor.v1"
    checks = {c["name"]: c for c in doc["checks"]}
    for name in (f"load:{p}" for p in abi.HOOK_PROGRAMS.values()):
        assert checks[name]["status"] == "pass", checks[name]
    proof = checks["deny-proof"]
    assert proof["status"] == "pass", proof
    assert "EPERM" in proof["reason"]
    assert doc["verdict"] == "ready" and out.returncode == 0, doc
