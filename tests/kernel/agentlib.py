"""Helpers for kernel tests that drive the real `aegis` CLI and agent as subprocesses
(test_agent_cli, test_degraded_mode); the `agent_env` fixture is in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .conftest import Lab

AEGIS = [sys.executable, "-m", "aegis_stream.cli"]


def policy_toml(tmp_path: Path, lab: Lab, target: Path, mode: str, version: int = 1) -> Path:
    """A one-rule policy (open and exec of ``target`` for the selected cgroup)."""
    p = tmp_path / f"policy-{version}.toml"
    p.write_text(
        f'apiVersion = "aegis/v1"\nname = "cli-test"\nversion = {version}\nmode = "{mode}"\n'
        f'[[scope]]\ncgroup = "{lab.cg_selected}"\n'
        f'[[rules]]\nid = "deny-target"\npath = "{target}"\nactions = ["open", "exec"]\n'
    )
    return p


def signed(env: dict, tmp_path: Path, policy: Path) -> Path:
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


def wait_for_json(path: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")
