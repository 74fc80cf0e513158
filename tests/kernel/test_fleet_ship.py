"""The lab half of the fleet ship test (docs/FLEET.md, "Shipping afterwards").

A real agent in the lab kernel runs with ``--kafka`` pointed at a broker it cannot reach
(the guest has no network): its Kafka sink starts down, spools the denies and their
explanations to ``<state>/spool/kafka.spool``, and the file sink writes every event to
``events.jsonl``.  Both land in ``$AEGIS_FLEET_SHIP_DIR`` (a directory the host shares
read-write with the guest) with ``expected.json``, the denies the workload provoked.

The host half, tests/fleet/test_ship_lab.py (markers ``fleet`` and ``kernel``), boots
this test in the lab, then runs ``aegis fleet ship`` on the directory into a real broker
and reads every deny back with its explanation.  Run alone in the lab (without the
variable) it checks the guest side into a temp dir.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from .agentlib import policy_toml, signed, spawn_aegis, wait_for_json
from .conftest import EPERM, Lab

DENIES = 3


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: a broker that never answers
    return port


def test_fleet_ship_guest_agent_spools_denies_for_the_host(lab: Lab, agent_env, tmp_path):
    out = Path(os.environ.get("AEGIS_FLEET_SHIP_DIR") or tmp_path / "ship")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(agent_env, AEGIS_STATE_DIR=str(out / "state"))  # the Kafka spool: <state>/spool
    target = lab.file("fleet-ship-secret")
    pol = signed(env, tmp_path, policy_toml(tmp_path, lab, target, "enforce"))
    events = out / "events.jsonl"
    status = tmp_path / "status.json"
    agent = spawn_aegis(
        ["run", "--policy", str(pol), "--events", str(events), "--status-file", str(status),
         "--kafka", f"127.0.0.1:{_closed_port()}"], env)
    try:
        # the Kafka sink's start (a broker probe that times out, a producer process: a
        # fresh interpreter) is slow under TCG: 146 s for this test alone on a quiet 6.1
        # guest, and the 60 s default was missed in a kernel-suite run on a loaded host
        wait_for_json(status, timeout=240)
        for _ in range(DENIES):
            assert lab.probe("read", target).errno == EPERM
        deadline = time.monotonic() + 30
        denies: list[dict] = []
        while time.monotonic() < deadline:
            recs = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
            denies = [r for r in recs if r.get("schema") == "aegis.decision.v1"
                      and r["decision"] == "deny"]
            expl = {r["event_id"] for r in recs if r.get("schema") == "aegis.explanation.v1"}
            if len(denies) >= DENIES and {d["event_id"] for d in denies} <= expl:
                break
            time.sleep(0.2)
        assert len(denies) == DENIES, denies
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
    assert agent.returncode == 0, err
    # the sink never reached a broker: every deny and its explanation wait in its spool
    spool = out / "state" / "spool" / "kafka.spool"
    assert spool.exists() and spool.stat().st_size > 0, err
    for d in denies:
        assert d["rule_id"] == "deny-target" and d["rule_source"] == str(target)
        assert d["cgroup_path"] == str(lab.cg_selected)
    (out / "expected.json").write_text(json.dumps({
        "host": denies[0]["host"],
        "denies": [d["event_id"] for d in denies],
        "rule_id": "deny-target",
        "target": str(target),
    }))
