"""Deny storms, the agent's half (STORM-003): `aegis run` reads the kernel's storm map
(bpf/storm.bpf.h) and writes aegis.storm.v1 summaries.  An agent-process file
(scripts/kernel-suite AGENT_PROCESS_FILES: it starts `aegis run`); the kernel's half,
STORM-001/002, is tests/kernel/test_deny_storm.py and runs on every kernel."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from .agentlib import policy_toml, signed, spawn_aegis, wait_for_json
from .conftest import PROBE, Lab
from .test_deny_storm import _finish


def test_storm_003_agent_writes_summaries_that_add_up(lab: Lab, agent_env, tmp_path: Path,
                                                       record_testsuite_property):
    """STORM-003: `aegis run --storm-window 30`: one process denied in a loop gets one
    aegis.decision.v1 event and aegis.storm.v1 summaries whose suppressed counts add up to
    the rest of its denies, each counted once."""
    target = lab.file("storm-agent")
    pol = signed(agent_env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    events = tmp_path / "events.jsonl"
    status = tmp_path / "status.json"
    agent = spawn_aegis(["run", "--policy", str(pol), "--events", str(events), "--status-file",
                         str(status), "--storm-window", "30"], agent_env)
    try:
        wait_for_json(status, timeout=240)
        proc = lab.spawn([PROBE, "open_loop", str(target), "1000"])
        (r,) = _finish([proc])
        assert r["eperm"] == 1000
        deadline = time.monotonic() + 120
        recs: list[dict] = []
        while time.monotonic() < deadline:
            recs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
            mine = [x for x in recs if x.get("pid") == proc.pid]
            got = sum(1 for x in mine if x["schema"] == "aegis.decision.v1") + sum(
                x["suppressed"] for x in mine if x["schema"] == "aegis.storm.v1")
            if got >= r["eperm"]:
                break
            time.sleep(0.5)
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err
    mine = [x for x in recs if x.get("pid") == proc.pid]
    decisions = [x for x in mine if x["schema"] == "aegis.decision.v1"]
    storms = [x for x in mine if x["schema"] == "aegis.storm.v1"]
    facts = json.dumps({"denies": r["eperm"], "events": len(decisions), "summaries": len(storms)})
    print(f"STORM-003 {facts}")
    record_testsuite_property("storm_003", facts)
    assert len(decisions) == 1 and decisions[0]["decision"] == "deny"
    assert len(decisions) + sum(s["suppressed"] for s in storms) == r["eperm"]
    assert len({s["event_id"] for s in storms}) == len(storms)
    s = storms[-1]
    assert (s["rule_id"], s["hook"], s["decision"], s["window_s"]) == ("deny-target", "file_open", "deny", 30.0)
    assert s["suppressed_total"] == r["eperm"] - 1
    assert "deny-storm window: 30 s" in err
