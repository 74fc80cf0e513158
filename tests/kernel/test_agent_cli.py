"""The agent and the CLI end to end in a lab kernel: `aegis run`, `aegis policy apply`,
events as JSON lines, pinned links that keep enforcing after the agent is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from .agentlib import AEGIS, aegis, policy_toml, signed, spawn_aegis, wait_for_json
from .conftest import EPERM, Lab


def test_cli_001_run_apply_deny_and_event(lab: Lab, agent_env, tmp_path):
    target = lab.file("cli-secret")
    events = tmp_path / "events.jsonl"
    status = tmp_path / "status.json"
    agent = spawn_aegis(
        ["run", "--policy", str(policy_toml(tmp_path, lab, target, "audit")),
         "--events", str(events), "--status-file", str(status)], agent_env)
    try:
        st = wait_for_json(status)
        assert st["state"] == "auditing"
        assert all(h["phase"] == "attached" for h in st["hooks"].values())
        assert lab.probe("read", target).result == {"ok": True}  # audit: allowed
        unsigned = policy_toml(tmp_path, lab, target, "enforce", 2)
        refused = aegis(["policy", "apply", str(unsigned)], agent_env)
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1
        assert lab.probe("read", target).result == {"ok": True}  # refusal changed nothing
        out = aegis(["policy", "apply", str(signed(agent_env, tmp_path, unsigned))], agent_env)
        assert out.returncode == 0, out.stderr
        assert "generation 2" in out.stdout and "mode enforce" in out.stdout
        assert lab.probe("read", target).errno == EPERM
        deadline = time.monotonic() + 20
        recs: list[dict] = []
        while time.monotonic() < deadline and len(recs) < 3:
            recs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
            recs = [r for r in recs if r.get("schema") == "aegis.decision.v1"]
            time.sleep(0.2)
        # two audited reads (before and after the refused apply), then the deny
        assert [r["decision"] for r in recs] == ["audit", "audit", "deny"]
        deny = recs[2]
        assert deny["schema"] == "aegis.decision.v1"
        assert deny["rule_id"] == "deny-target" and deny["generation"] == 2
        assert deny["policy_name"] == "cli-test" and deny["policy_version"] == 2
        assert deny["rule_source"] == str(target) and deny["hook"] == "file_open"
        assert deny["cgroup_path"] == str(lab.cg_selected)
        assert deny["scope_cgroup_path"] == str(lab.cg_selected)
        show = aegis(["policy", "show", "--json"], agent_env, check=True)
        doc = json.loads(show.stdout)
        assert doc["generation"] == 2 and doc["mode"] == "enforce"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    # the agent is gone; its pinned links keep enforcing
    assert lab.probe("read", target).errno == EPERM
    stats = aegis(["stats", "--json"], agent_env, check=True)
    s = json.loads(stats.stdout)
    assert s["hooks"]["file_open"]["denied"] >= 2
    assert any(r["generation"] == 2 and r["denied"] >= 2 for r in s["rules"])
    # unload removes the pins: enforcement stops
    aegis(["unload"], agent_env, check=True)
    assert lab.probe("read", target).result == {"ok": True}


def test_cli_002_restart_reuses_pinned_state(lab: Lab, agent_env, tmp_path):
    target = lab.file("restart-secret")
    pol = signed(agent_env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    first = aegis(["run", "--policy", str(pol), "--events", os.devnull, "--exit-after", "0.5"],
                  agent_env)
    assert first.returncode == 0, first.stderr
    assert lab.probe("read", target).errno == EPERM
    # a restart without a policy reuses the pinned maps: still enforcing generation 1
    second = aegis(["run", "--events", os.devnull, "--exit-after", "0.5"], agent_env)
    assert second.returncode == 0, second.stderr
    assert "reusing pinned maps" in second.stderr
    assert lab.probe("read", target).errno == EPERM
    show = aegis(["policy", "show", "--json"], agent_env, check=True)
    assert json.loads(show.stdout)["generation"] == 1
    log = aegis(["policy", "log", "--verify"], agent_env)
    assert log.returncode == 0, log.stderr


def test_cli_003_apply_without_agent_fails_clearly(lab: Lab, tmp_path):
    env = dict(os.environ, AEGIS_PIN_ROOT="/sys/fs/bpf/aegis-none", AEGIS_STATE_DIR=str(tmp_path))
    target = lab.file("x")
    # the console entry itself, a fresh interpreter (the other scenarios fork a preloaded one)
    out = subprocess.run([*AEGIS, "policy", "apply", str(policy_toml(tmp_path, lab, target, "audit"))],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no aegis state pinned" in out.stderr


def test_cli_004_bad_policy_changes_nothing(lab: Lab, agent_env, tmp_path):
    target = lab.file("bad-policy-target")
    src = policy_toml(tmp_path, lab, target, "enforce")
    pol = signed(agent_env, tmp_path, src)
    aegis(["run", "--policy", str(pol), "--events", os.devnull, "--exit-after", "0.2"], agent_env,
          check=True)
    bad = tmp_path / "bad.toml"
    bad.write_text(src.read_text().replace(str(target), "/nonexistent/file").replace(
        "version = 1", "version = 2"))
    # signed (an unsigned or --mode audit apply over enforce is refused before it compiles)
    out = aegis(["policy", "apply", str(signed(agent_env, tmp_path, bad))], agent_env)
    assert out.returncode == 1 and "No such file" in out.stderr and out.stderr.count("\n") == 1
    show = json.loads(aegis(["policy", "show", "--json"], agent_env, check=True).stdout)
    assert show["generation"] == 1
    assert lab.probe("read", target).errno == EPERM
