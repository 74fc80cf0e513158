"""The agent and the CLI end to end in a lab kernel: `aegis run`, `aegis policy apply`,
events as JSON lines, pinned links that keep enforcing after the agent is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import EPERM, Lab

AEGIS = [sys.executable, "-m", "aegis_stream.cli"]


@pytest.fixture
def agent_env(lab: Lab, tmp_path):
    env = dict(os.environ)
    env["AEGIS_PIN_ROOT"] = f"/sys/fs/bpf/aegis-cli-{os.getpid()}"
    env["AEGIS_STATE_DIR"] = str(tmp_path / "state")
    yield env
    subprocess.run([*AEGIS, "unload"], env=env, capture_output=True)


def _policy(tmp_path: Path, lab: Lab, target: Path, mode: str, version: int = 1) -> Path:
    p = tmp_path / f"policy-{version}.toml"
    p.write_text(
        f'apiVersion = "aegis/v1"\nname = "cli-test"\nversion = {version}\nmode = "{mode}"\n'
        f'[[scope]]\ncgroup = "{lab.cg_selected}"\n'
        f'[[rules]]\nid = "deny-target"\npath = "{target}"\nactions = ["open", "exec"]\n'
    )
    return p


def _signed(env: dict, tmp_path: Path, policy: Path) -> Path:
    """Enforce mode needs a signed envelope: make a key, trust it, sign."""
    keys = tmp_path / "keys"
    if not (keys / "kt.key").exists():
        subprocess.run([*AEGIS, "keys", "generate", "--id", "kt", "--out", str(keys)],
                       env=env, check=True, capture_output=True)
        subprocess.run([*AEGIS, "keys", "add", str(keys / "kt.pub"), "--id", "kt"],
                       env=env, check=True, capture_output=True)
    out = policy.with_suffix(".signed")
    subprocess.run([*AEGIS, "policy", "sign", str(policy), "--key", str(keys / "kt.key"),
                    "--out", str(out)], env=env, check=True, capture_output=True)
    return out


def _wait_for(path: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")


def test_cli_001_run_apply_deny_and_event(lab: Lab, agent_env, tmp_path):
    target = lab.file("cli-secret")
    events = tmp_path / "events.jsonl"
    status = tmp_path / "status.json"
    agent = subprocess.Popen(
        [*AEGIS, "run", "--policy", str(_policy(tmp_path, lab, target, "audit")),
         "--events", str(events), "--status-file", str(status)],
        env=agent_env, stderr=subprocess.DEVNULL,
    )
    try:
        st = _wait_for(status)
        assert st["state"] == "auditing"
        assert all(h["phase"] == "attached" for h in st["hooks"].values())
        assert lab.probe("read", target).result == {"ok": True}  # audit: allowed
        unsigned = _policy(tmp_path, lab, target, "enforce", 2)
        refused = subprocess.run([*AEGIS, "policy", "apply", str(unsigned)],
                                 env=agent_env, capture_output=True, text=True)
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1
        assert lab.probe("read", target).result == {"ok": True}  # refusal changed nothing
        out = subprocess.run([*AEGIS, "policy", "apply", str(_signed(agent_env, tmp_path, unsigned))],
                             env=agent_env, capture_output=True, text=True)
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
        show = subprocess.run([*AEGIS, "policy", "show", "--json"], env=agent_env,
                              capture_output=True, text=True, check=True)
        doc = json.loads(show.stdout)
        assert doc["generation"] == 2 and doc["mode"] == "enforce"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    # the agent is gone; its pinned links keep enforcing
    assert lab.probe("read", target).errno == EPERM
    stats = subprocess.run([*AEGIS, "stats", "--json"], env=agent_env, capture_output=True,
                           text=True, check=True)
    s = json.loads(stats.stdout)
    assert s["hooks"]["file_open"]["denied"] >= 2
    assert any(r["generation"] == 2 and r["denied"] >= 2 for r in s["rules"])
    # unload removes the pins: enforcement stops
    subprocess.run([*AEGIS, "unload"], env=agent_env, check=True, capture_output=True)
    assert lab.probe("read", target).result == {"ok": True}


def test_cli_002_restart_reuses_pinned_state(lab: Lab, agent_env, tmp_path):
    target = lab.file("restart-secret")
    pol = _signed(agent_env, tmp_path, _policy(tmp_path, lab, target, "enforce"))
    first = subprocess.run([*AEGIS, "run", "--policy", str(pol), "--events", os.devnull,
                            "--exit-after", "0.5"], env=agent_env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert lab.probe("read", target).errno == EPERM
    # a restart without a policy reuses the pinned maps: still enforcing generation 1
    second = subprocess.run([*AEGIS, "run", "--events", os.devnull, "--exit-after", "0.5"],
                            env=agent_env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "reusing pinned maps" in second.stderr
    assert lab.probe("read", target).errno == EPERM
    show = subprocess.run([*AEGIS, "policy", "show", "--json"], env=agent_env,
                          capture_output=True, text=True, check=True)
    assert json.loads(show.stdout)["generation"] == 1
    log = subprocess.run([*AEGIS, "policy", "log", "--verify"], env=agent_env,
                         capture_output=True, text=True)
    assert log.returncode == 0, log.stderr


def test_cli_003_apply_without_agent_fails_clearly(lab: Lab, tmp_path):
    env = dict(os.environ, AEGIS_PIN_ROOT="/sys/fs/bpf/aegis-none", AEGIS_STATE_DIR=str(tmp_path))
    target = lab.file("x")
    out = subprocess.run([*AEGIS, "policy", "apply", str(_policy(tmp_path, lab, target, "audit"))],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "no aegis state pinned" in out.stderr


def test_cli_004_bad_policy_changes_nothing(lab: Lab, agent_env, tmp_path):
    target = lab.file("bad-policy-target")
    src = _policy(tmp_path, lab, target, "enforce")
    pol = _signed(agent_env, tmp_path, src)
    subprocess.run([*AEGIS, "run", "--policy", str(pol), "--events", os.devnull,
                    "--exit-after", "0.2"], env=agent_env, check=True, capture_output=True)
    bad = tmp_path / "bad.toml"
    bad.write_text(src.read_text().replace(str(target), "/nonexistent/file").replace(
        "version = 1", "version = 2"))
    out = subprocess.run([*AEGIS, "policy", "apply", str(bad), "--mode", "audit"], env=agent_env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "No such file" in out.stderr and out.stderr.count("\n") == 1
    show = json.loads(subprocess.run([*AEGIS, "policy", "show", "--json"], env=agent_env,
                                     capture_output=True, text=True, check=True).stdout)
    assert show["generation"] == 1
    assert lab.probe("read", target).errno == EPERM
