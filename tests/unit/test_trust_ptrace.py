"""`aegis doctor`'s ptrace-scope check (BYP-PTRACE-FD, docs/BYPASS_CATALOG.md): warns when
Yama is off or at scope 0, with the sysctl fix; the lab measures the bypass (TRUST-001..005)."""

from __future__ import annotations

import pytest

from aegis_stream.agent import doctor


@pytest.mark.parametrize(("scope", "status"), [("0", "warn"), ("1", "pass"), ("2", "pass"),
                                               ("3", "pass"), (None, "warn")])
def test_ptrace_scope_check(tmp_path, scope, status) -> None:
    p = tmp_path / "ptrace_scope"
    if scope is not None:
        p.write_text(scope + "\n")
    c = doctor.check_ptrace_scope(doctor.Ctx(), str(p))
    assert (c.name, c.status) == ("ptrace-scope", status)
    if status == "warn":
        assert "pidfd_getfd" in c.reason and "/proc/PID/mem" in c.reason
        assert "kernel.yama.ptrace_scope=1" in c.fix
    else:
        assert f"ptrace_scope={scope}" in c.reason


def test_doctor_runs_the_check(tmp_path, monkeypatch) -> None:
    # no BPF object: the load probes and the deny proof are skipped, the host checks run
    monkeypatch.setenv("AEGIS_BPF_OBJECT", str(tmp_path / "missing.bpf.o"))
    rep = doctor.run_doctor()
    c = next(c for c in rep.checks if c.name == "ptrace-scope")
    assert c == doctor.check_ptrace_scope(doctor.Ctx())
