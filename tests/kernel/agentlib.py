"""Helpers for kernel tests that drive the real `aegis` CLI and agent as subprocesses
(test_agent_cli, test_degraded_mode); the `agent_env` fixture is in conftest.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import aegisproc
from .conftest import Lab

# the console entry, for the scenario that proves `python -m aegis_stream.cli` itself (CLI-003)
AEGIS = [sys.executable, "-m", "aegis_stream.cli"]
# every other `aegis` command: a child of the preloaded forkserver (aegisproc's docstring says why)
aegis = aegisproc.run
spawn_aegis = aegisproc.AegisProcess


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
        aegis(["keys", "generate", "--id", "kt", "--out", str(keys)], env, check=True)
        aegis(["keys", "add", str(keys / "kt.pub"), "--id", "kt"], env, check=True)
    out = policy.with_suffix(".signed")
    aegis(["policy", "sign", str(policy), "--key", str(keys / "kt.key"), "--out", str(out)], env,
          check=True)
    return out


def wait_for_json(path: Path, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{path} never appeared")
