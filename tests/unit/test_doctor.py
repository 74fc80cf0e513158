"""Doctor on the host that runs the unit suite: it must never crash, and its exit code
must agree with its verdict.  On this project's build machines the kernel refuses LSM
programs with EPERM before the verifier; doctor must say exactly that and exit 2."""

import json
import subprocess
import sys

from aegis_stream.agent import doctor


def test_doctor_json_is_versioned_and_consistent():
    out = subprocess.run([sys.executable, "-m", "aegis_stream.cli", "doctor", "--json"],
                         capture_output=True, text=True, timeout=120)
    doc = json.loads(out.stdout)
    assert doc["schema"] == doctor.SCHEMA
    assert out.returncode == doc["exit_code"] == {"ready": 0, "degraded": 1, "cannot_enforce": 2}[doc["verdict"]]
    checks = {c["name"]: c for c in doc["checks"]}
    assert {"kernel", "btf", "lsm", "bpffs", "cgroup2", "capabilities", "deny-proof"} <= set(checks)
    for c in doc["checks"]:
        assert c["status"] in ("pass", "warn", "fail")
        if c["status"] != "pass" and c["name"] != "deny-proof":
            assert c["reason"]
    probe = checks.get("load:aegis_file_open")
    if probe and probe["status"] == "fail" and "before the verifier" in probe["reason"]:
        # the measured behaviour of this project's hosts
        assert doc["verdict"] == "cannot_enforce" and out.returncode == 2
        assert "EPERM" in probe["reason"] and "lab" in probe["fix"]
        assert checks["deny-proof"]["status"] == "fail"


def test_render_lists_fixes_for_failures():
    rep = doctor.DoctorReport(doctor.SCHEMA, "6.1.0", "cannot_enforce", 2, [
        doctor.Check("lsm", "fail", "bpf is not in the active LSM list (lockdown,capability)",
                     "add lsm=lockdown,capability,bpf to the kernel command line and reboot"),
        doctor.Check("btf", "pass", "ok"),
    ])
    text = doctor.render(rep)
    assert "[FAIL] lsm" in text and "fix: add lsm=" in text and "verdict: cannot_enforce (exit 2)" in text
