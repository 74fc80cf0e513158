"""PATHW-001..003: path rules follow replacements the kernel's rename hook cannot see, through
the agent's path watcher (aegis_stream/agent/pathwatch.py), with a real `aegis run`.

* PATHW-001: delete + create of the rule's path (``install(1)``: unlink, then an O_EXCL create).  While the test holds the lifecycle lock the
  agent cannot restage: the new file at the path is open to the scoped process (the window,
  shown, not hidden) and `aegis status` is degraded with ``path_rule_moved`` naming the rule
  and the path; once the lock is released the new file is denied, and the provenance log has
  a ``restage`` record (the same digest and version) from the old inode to the new one.
* PATHW-002: the rule's parent directory replaced (the directory renamed away, a new one
  renamed to its name): the new file is denied, the old one, still there under the moved
  directory, stays denied.
* PATHW-003: the path replaced while no agent ran: the next `aegis run` (no policy: the
  pinned generation) restages at start, and the pinned programs deny the new file after it
  exits.

Times from the change to the first deny are recorded as junit properties; the only bounds
are hang guards (TCG guests: no timed assertions).  The unit versions:
tests/unit/test_path_watch.py.  Renames onto the path (the kernel's own inheritance):
tests/kernel/test_path_continuity.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .agentlib import aegis, policy_toml, signed, spawn_aegis
from .conftest import EPERM, Lab

HANG_S = 120.0  # hang guard for each wait; the times are recorded, never asserted


def _wait(pred: Callable[[], object], what: str, timeout: float = HANG_S) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"hang guard: {what} not within {timeout:.0f} s")


def _status_file(env: dict) -> dict:
    p = Path(env["AEGIS_STATE_DIR"]) / "status.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _denied(lab: Lab, path: Path) -> bool:
    out = lab.probe("read", path)
    if out.errno == EPERM:
        return True
    assert out.result.get("ok") or out.errno is not None, out
    return False


def _records(env: dict, action: str) -> list[dict]:
    p = Path(env["AEGIS_STATE_DIR"]) / "provenance.jsonl"
    return [r for r in map(json.loads, p.read_text().splitlines())
            if r.get("action") == action and r.get("result") == "ok"]


def _start(lab: Lab, env: dict, tmp_path: Path, target: Path):
    pol = signed(env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    agent = spawn_aegis(["run", "--policy", str(pol), "--events", os.devnull], env)
    _wait(lambda: _status_file(env).get("state") == "enforcing" or agent.poll() is not None,
          "the agent enforcing")
    assert agent.poll() is None, agent.output()
    return agent


def _stop(agent) -> str:
    agent.send_signal(signal.SIGTERM)
    _, err = agent.communicate(timeout=60)
    return err


def _ino(path: Path) -> int:
    return os.stat(path).st_ino


def test_pathw_001_delete_and_create_restaged_degraded_until_then(lab: Lab, agent_env, tmp_path,
                                                                   record_testsuite_property):
    """PATHW-001: delete + create; degraded and exposed until the restage, denied after."""
    target = lab.file("pathw001/secret", "old\n")
    old_ino = _ino(target)
    agent = _start(lab, agent_env, tmp_path, target)
    try:
        assert _denied(lab, target)
        applied = _records(agent_env, "apply")[-1]
        fd = os.open(Path(agent_env["AEGIS_STATE_DIR"]) / "lifecycle.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the agent's restage waits for this lock
            src = lab.file("pathw001/secret.build", "new\n")
            # install(1): unlink + O_EXCL create (no rename for the kernel to see)
            subprocess.run(["install", "-m", "0644", str(src), str(target)], check=True)
            new_ino = _ino(target)
            t_seen = _wait(lambda: "path_rule_moved" in _status_file(agent_env).get("reason_codes", []),
                           "status.json reporting path_rule_moved")
            doc = _status_file(agent_env)
            text = next(r for r in doc["reasons"] if r.startswith("path rule moved: "))
            assert "rule deny-target" in text and str(target) in text, text
            assert doc["state"] == "degraded"
            out = aegis(["status", "--json"], agent_env, timeout=120)
            st = json.loads(out.stdout)
            assert out.returncode == 1 and st["state"] == "degraded", st
            assert "path_rule_moved" in st["reason_codes"], st
            assert not _denied(lab, target)  # the window, until the restage
            assert not _records(agent_env, "restage")
        finally:
            os.close(fd)
        t_deny = _wait(lambda: _denied(lab, target), "the new file denied after the restage")
        # the record is appended just after the activation that made the deny
        _wait(lambda: _records(agent_env, "restage"), "the restage record")
        (rs,) = _records(agent_env, "restage")
        assert (rs["digest"], rs["version"], rs["policy"]) == (
            applied["digest"], applied["version"], applied["policy"])
        assert rs["restaged_from"] == applied["generation"] and rs["trigger"] == "path-watch"
        assert rs["origin"] == applied["origin"]
        (mv,) = rs["moves"]
        assert mv["rule"] == "deny-target" and mv["path"] == str(target)
        assert mv["old"].split("/")[0].endswith(f":{old_ino}") and mv["new"].split("/")[0].endswith(
            f":{new_ino}"), mv
        record_testsuite_property("PATHW-001", json.dumps({"status_degraded_s": round(t_seen, 2),
                                                 "deny_after_unlock_s": round(t_deny, 2)}))
    finally:
        err = _stop(agent)
    assert "restaged as generation" in err, err


def test_pathw_002_parent_directory_replaced_restaged(lab: Lab, agent_env, tmp_path, record_testsuite_property):
    """PATHW-002: a new directory renamed over the rule's parent's name: the new file is
    denied; the old file, still there under the moved directory, stays denied."""
    base = lab.files / "pathw002"
    conf = base / "conf"
    target = conf / "secret"
    lab.file("pathw002/conf/secret", "old\n")
    agent = _start(lab, agent_env, tmp_path, target)
    try:
        assert _denied(lab, target)
        new = base / "conf.new"
        new.mkdir()
        (new / "secret").write_text("new\n")
        t0 = time.monotonic()
        os.rename(conf, base / "conf.old")
        os.rename(new, conf)
        _wait(lambda: _denied(lab, target), "the new file under the new directory denied")
        t_deny = time.monotonic() - t0
        assert _denied(lab, base / "conf.old" / "secret")  # the old inode exists: still protected
        _wait(lambda: _records(agent_env, "restage"), "the restage record")
        rs = _records(agent_env, "restage")
        assert rs and rs[-1]["moves"][0]["path"] == str(target), rs
        assert rs[-1]["carried"], rs[-1]  # the old file's inode, kept while it exists
        _wait(lambda: "path_rule_moved" in _status_file(agent_env).get("reason_codes", []),
              "status.json reporting the restage")
        record_testsuite_property("PATHW-002", json.dumps({"deny_after_replace_s": round(t_deny, 2)}))
    finally:
        _stop(agent)


def test_pathw_003_moved_while_the_agent_was_down_restaged_at_start(lab: Lab, agent_env, tmp_path,
                                                                    record_testsuite_property):
    """PATHW-003: replaced while no agent ran: the next start restages before it runs."""
    target = lab.file("pathw003/secret", "old\n")
    agent = _start(lab, agent_env, tmp_path, target)
    _stop(agent)
    target.unlink()
    target.write_text("new\n")
    assert not _denied(lab, target)  # nobody followed the path while the agent was down
    t0 = time.monotonic()
    second = aegis(["run", "--events", os.devnull, "--exit-after", "2"], agent_env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "restaged as generation" in second.stderr and "agent-start" in second.stderr
    assert _denied(lab, target)  # the pinned programs, after the agent exited
    (rs,) = _records(agent_env, "restage")
    assert rs["trigger"] == "agent-start" and rs["moves"][0]["rule"] == "deny-target"
    record_testsuite_property("PATHW-003", json.dumps({"agent_run_s": round(time.monotonic() - t0, 2)}))
