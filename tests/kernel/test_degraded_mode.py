"""The degraded-mode contract in a lab kernel (docs/DEGRADED_MODE.md): the agent killed
with SIGKILL (pinned links keep enforcing, `aegis status` says so from the kernel), a
restart that reconciles with the pinned state, and a hook whose attach fails."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .agentlib import aegis, policy_toml, signed, spawn_aegis, wait_for_json
from .conftest import EPERM, Lab


def _status(env: dict) -> tuple[int, dict]:
    out = aegis(["status", "--json"], env, timeout=60)
    assert out.stderr == "", out.stderr
    return out.returncode, json.loads(out.stdout)


def test_dm_001_sigkill_pins_keep_enforcing_status_from_kernel(lab: Lab, agent_env, tmp_path):
    target = lab.file("dm-killed")
    pol = signed(agent_env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    status_file = Path(agent_env["AEGIS_STATE_DIR"]) / "status.json"
    agent = spawn_aegis(["run", "--policy", str(pol), "--events", os.devnull], agent_env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if status_file.exists() and wait_for_json(status_file).get("state") == "enforcing":
                break
            time.sleep(0.2)
        rc, st = _status(agent_env)
        assert (rc, st["state"], st["agent"]["running"]) == (0, "enforcing", True), st
        assert st["kernel"]["generation"] == 1 and all(h["pinned"] for h in st["hooks"])
        assert lab.probe("read", target).errno == EPERM
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
    # no cleanup ran: the pinned links still decide
    assert lab.probe("read", target).errno == EPERM
    rc, st = _status(agent_env)
    assert rc == 1 and st["state"] == "degraded", st
    assert st["summary"] == "agent not running; pinned programs still enforcing generation 1"
    assert st["reason_codes"] == ["agent_not_running"]
    assert st["kernel"]["enforcement"] == "enforcing" and not st["agent"]["running"]
    assert st["kernel"]["counters"]["file_open"]["denied"] >= 2
    txt = aegis(["status"], agent_env)
    assert txt.returncode == 1
    assert "agent not running; pinned programs still enforcing generation 1" in txt.stdout


def test_dm_002_restart_reconciles_with_pinned_state(lab: Lab, agent_env, tmp_path):
    target = lab.file("dm-restart")
    pol = signed(agent_env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    agent = spawn_aegis(["run", "--policy", str(pol), "--events", os.devnull], agent_env)
    status_file = Path(agent_env["AEGIS_STATE_DIR"]) / "status.json"
    try:
        wait_for_json(status_file)
        assert lab.probe("read", target).errno == EPERM
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=30)
    # a crash mid-apply left a journal: the restart reconciles (old generation effective)
    journal = Path(agent_env["AEGIS_STATE_DIR"]) / "lifecycle.pending.json"
    journal.write_text(json.dumps({"op": "apply", "old_generation": 1, "new_generation": 2}))
    second = aegis(["run", "--events", os.devnull, "--exit-after", "1"], agent_env, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "reusing pinned maps" in second.stderr
    assert "reconciled pinned state: recovered, effective old (generation 1)" in second.stderr
    assert "state: enforcing" in second.stderr
    assert not journal.exists()
    assert lab.probe("read", target).errno == EPERM
    doc = json.loads(status_file.read_text())
    assert doc["reconcile"]["status"] == "recovered" and doc["running"] is False
    rc, st = _status(agent_env)
    assert rc == 1 and st["summary"].startswith("agent not running; pinned programs still "
                                                "enforcing generation 1")


def test_dm_003_hook_attach_failure_status_degraded_with_hook(lab: Lab, agent_env, tmp_path):
    target = lab.file("dm-attach")
    env = dict(agent_env, AEGIS_FAULT_INJECT="attach:aegis_mmap_file")
    pol = policy_toml(tmp_path, lab, target, "audit")
    agent = spawn_aegis(["run", "--policy", str(pol), "--events", os.devnull], env)
    status_file = Path(agent_env["AEGIS_STATE_DIR"]) / "status.json"
    try:
        doc = wait_for_json(status_file)
        assert doc["state"] == "degraded" and doc["reason_codes"] == ["hooks_missing"], doc
        assert doc["hooks"]["mmap_file"]["phase"] == "failed"
        rc, st = _status(agent_env)
        assert rc == 1 and st["state"] == "degraded" and st["agent"]["running"]
        assert "hooks_missing" in st["reason_codes"]
        assert "missing mmap_file" in st["summary"]
        hooks = {h["hook"]: h for h in st["hooks"]}
        assert not hooks["mmap_file"]["pinned"] and hooks["mmap_file"]["agent_phase"] == "failed"
        assert hooks["file_open"]["pinned"] and hooks["bprm_check_security"]["pinned"]
        assert lab.probe("read", target).result == {"ok": True}  # audit mode: allowed
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=30)
    assert "DEGRADED" in err and "mmap_file" in err and "state: enforcing" not in err
