"""SVC: the systemd unit's capability set is enough, and each of its BPF capabilities is
needed.  packaging/aegis.service bounds the agent (uid 0) to CapabilityBoundingSet with
NoNewPrivileges; here the agent runs under exactly that bound (setpriv, the same kernel
mechanism systemd uses: the bounding set, then exec as root) in a real kernel:

* SVC-001 the unit's set (no CAP_SYS_ADMIN): load, attach, apply a signed policy, enforce
  (EPERM for the selected cgroup), the deny event of another uid's process with its exe
  (CAP_SYS_PTRACE), clean stop; the agent's effective set is exactly the unit's.
* SVC-002 without CAP_PERFMON the LSM programs do not load: a refused start (exit 2,
  load_failed), nothing claimed.  So the set is not larger than it must be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .agentlib import AEGIS, aegis, policy_toml, signed, wait_for_json
from .conftest import EPERM, Lab

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "aegis.service"
CAP_BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21,
            "CAP_PERFMON": 38, "CAP_BPF": 39}


def unit_caps() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise AssertionError("no CapabilityBoundingSet in the unit")


def bounded(caps: list[str]) -> list[str]:
    """setpriv: drop every capability but ``caps`` from the bounding set, no new privileges."""
    spec = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])
    return ["setpriv", f"--bounding-set={spec}", "--no-new-privs", "--"]


def cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_svc_001_unit_capability_set_enforces(lab: Lab, agent_env, tmp_path):
    caps = unit_caps()
    assert "CAP_SYS_ADMIN" not in caps and {"CAP_BPF", "CAP_PERFMON"} <= set(caps)
    target = lab.file("svc-secret")
    pol = signed(agent_env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    events, status = tmp_path / "events.jsonl", tmp_path / "status.json"
    agent = subprocess.Popen(
        bounded(caps) + AEGIS + ["run", "--policy", str(pol), "--events", str(events),
                                 "--status-file", str(status)],
        env=agent_env, stderr=subprocess.PIPE, text=True)
    try:
        st = wait_for_json(status, timeout=240)
        if st["state"] != "enforcing":  # the agent's own account, not the pipe object
            agent.kill()
            pytest.fail(f"not enforcing: {st}; agent stderr: {agent.communicate(timeout=30)[1][-3000:]}")
        assert all(h["phase"] == "attached" for h in st["hooks"].values()), st["hooks"]
        assert cap_eff(agent.pid) == sum(1 << CAP_BITS[c] for c in caps)
        assert lab.probe("read", target).errno == EPERM
        # a denied process of another uid that stays alive: its exe is read from
        # /proc/<pid>/exe, which needs CAP_SYS_PTRACE across uids (why the unit has it)
        other = lab.spawn(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c",
                           f"import time\ntry:\n    open({str(target)!r})\n"
                           "except PermissionError:\n    print('EPERM', flush=True)\n"
                           "time.sleep(30)\n"])
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "EPERM"
            deadline = time.monotonic() + 30
            theirs: list[dict] = []
            while time.monotonic() < deadline and not theirs:
                recs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
                theirs = [r for r in recs if r.get("schema") == "aegis.decision.v1"
                          and r["decision"] == "deny" and r["uid"] == 65534]
                time.sleep(0.2)
        finally:
            other.kill()
            other.wait(timeout=10)
            for f in (other.stdin, other.stdout, other.stderr):  # unclosed: pytest's
                if f is not None:                                  # ResourceWarning failed
                    f.close()                                      # the test in a CI run
        assert theirs, "no deny event for the uid 65534 process"
        assert theirs[0]["exe"] == os.path.realpath(sys.executable), theirs[0]
        assert "exe" not in theirs[0]["enrichment_missing"], theirs[0]
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    assert lab.probe("read", target).errno == EPERM  # the pinned links keep enforcing


def test_svc_002_without_perfmon_the_start_is_refused(lab: Lab, agent_env, tmp_path):
    caps = [c for c in unit_caps() if c != "CAP_PERFMON"]
    target = lab.file("svc-secret-2")
    pol = signed(agent_env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    status = tmp_path / "status.json"
    out = subprocess.run(
        bounded(caps) + AEGIS + ["run", "--policy", str(pol), "--events", os.devnull,
                                 "--status-file", str(status), "--exit-after", "1"],
        env=agent_env, capture_output=True, text=True, timeout=300)
    doc = json.loads(status.read_text()) if status.exists() else {}
    if out.returncode == 2:
        assert doc.get("last_error_code") == "load_failed", (doc, out.stderr)
    else:  # programs loaded but not attached: never a claim of enforcement
        assert doc.get("state") != "enforcing", (doc, out.stderr)
    assert lab.probe("read", target).result == {"ok": True}
    aegis(["unload"], agent_env)
