"""`aegis doctor` in a lab kernel: every check passes and the synthetic deny is proven."""

from __future__ import annotations

import json
import subprocess
import sys


def test_doctor_001_ready_with_deny_proof():
    out = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "doctor", "--json"],
                         capture_output=True, text=True)
    doc = json.loads(out.stdout)
    assert doc["schema"] == "aegis.doctor.v1"
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("load:aegis_file_open", "load:aegis_bprm_check", "load:aegis_mmap_file"):
        assert checks[name]["status"] == "pass", checks[name]
    proof = checks["deny-proof"]
    assert proof["status"] == "pass", proof
    assert "EPERM" in proof["reason"]
    assert doc["verdict"] == "ready" and out.returncode == 0, doc
