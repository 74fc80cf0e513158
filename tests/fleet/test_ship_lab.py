"""The lab ship test, host half (markers ``fleet`` and ``kernel``): a real agent in a lab
kernel spools its denies to a directory shared with the host (the guest has no network,
and none is routed to it); the host ships that directory to the real broker with
``aegis fleet ship`` and reads every deny back with its explanation.

The guest half is tests/kernel/test_fleet_ship.py, booted here through ``lab_exec``.
Run with the host's broker and lab:  pytest -m "fleet and kernel" tests/fleet/test_ship_lab.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .readback import read_topic

pytestmark = pytest.mark.kernel
AEGIS = [sys.executable, "-m", "aegis_stream.cli"]


def test_lab_agent_spool_shipped_afterwards_denies_arrive_with_explanations(kafka_broker, tmp_path):
    if os.environ.get("AEGIS_LAB") == "1":
        pytest.skip("the host half: it boots the lab itself")
    given = os.environ.get("AEGIS_FLEET_SHIP_FROM")
    if given:
        # scripts/test: the kernel suite's own run of the guest half left its spool here
        # (kernel-suite --fleet-ship-dir): one guest boot fewer in CI
        shared = Path(given)
        assert (shared / "expected.json").exists(), (
            f"AEGIS_FLEET_SHIP_FROM={given}: no expected.json (did tests/kernel/test_fleet_ship.py "
            "pass in the kernel suite?)")
    else:
        shared = _boot_guest_half(tmp_path)
    expected = json.loads((shared / "expected.json").read_text())
    spool = shared / "state" / "spool"
    assert (spool / "kafka.spool").stat().st_size > 0

    key = f"lab-{uuid.uuid4().hex[:8]}"  # this run's records, whatever the guest's hostname
    ship = [*AEGIS, "fleet", "ship", "--kafka", kafka_broker.bootstrap, "--spool", str(spool),
            "--events", str(shared / "events.jsonl"), "--host", key]
    out = subprocess.run(ship, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    n = len(expected["denies"])
    # the spool's denies and explanations are the file's too: each is shipped once
    assert f"deny {n}," in out.stdout and f"explanation {n}," in out.stdout, out.stdout
    assert f"{2 * n} duplicate(s)" in out.stdout, out.stdout

    decisions = [r for r in read_topic(kafka_broker.bootstrap, "aegis.decision.v1") if r.key == key.encode()]
    explanations = [r for r in read_topic(kafka_broker.bootstrap, "aegis.explanation.v1")
                    if r.key == key.encode()]
    denies = [r.doc for r in decisions if r.doc["decision"] == "deny"]
    assert sorted(d["event_id"] for d in denies) == sorted(expected["denies"])  # each exactly once
    assert all(d["rule_id"] == expected["rule_id"] and d["rule_source"] == expected["target"]
               and d["host"] == expected["host"] for d in denies)
    by_id = {r.doc["event_id"]: r.doc for r in explanations}
    assert len(explanations) == n == len(by_id)
    for d in denies:
        x = by_id[d["event_id"]]
        assert x["consistent"] and x["outcome"] == "EPERM" and x["rule"]["id"] == expected["rule_id"]
        assert x["generation"] == d["generation"]

    again = subprocess.run(ship, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("shipped 0 records"), again.stdout


def _boot_guest_half(tmp_path: Path) -> Path:
    """Boot a lab guest that runs tests/kernel/test_fleet_ship.py; its spool dir."""
    from aegis_stream import lab

    series = os.environ.get("AEGIS_LAB_KERNEL", lab.DEFAULT_SERIES)
    try:
        kernel = lab.find_kernel(series)
    except lab.LabError as exc:
        pytest.skip(f"no lab kernel {series}: {exc}")
    shared = tmp_path / "shared"
    shared.mkdir()
    res = lab.lab_exec(
        kernel,
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "kernel",
         "tests/kernel/test_fleet_ship.py"],
        env={"AEGIS_FLEET_SHIP_DIR": str(shared)}, rwdirs=[shared], timeout=900,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    return shared
