"""./scripts/demo's fleet half (``aegis_stream.cli.demo.fleet_demo``, the README's first
command after the lab deny): a local broker and fleet worker of its own, the decisions
shipped with ``aegis fleet ship``, every deny read back by ``aegis tail`` and the fleet
table counting them.  Fed the golden decision vectors here (the lab half is the demo's
own guest run: tests/kernel/test_agent_cli.py covers that agent path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aegis_stream.cli.demo import fleet_demo

pytestmark = pytest.mark.fleet
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "decision_vectors.json"


def test_demo_fleet_half_ships_tails_and_counts(tmp_path, capsys):
    docs = [v["expected"] for v in json.loads(GOLDEN.read_text())]
    assert {d["schema"] for d in docs} == {"aegis.decision.v1"}
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(d) + "\n" for d in docs))
    n_deny = sum(d["decision"] == "deny" for d in docs)
    rc = fleet_demo(events, tmp_path / "work")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"denies {n_deny}, audits {len(docs) - n_deny}" in out, out
    tailed = [ln for ln in out.splitlines() if "deny" in ln and any(d["rule_id"] in ln for d in docs)]
    assert len(tailed) >= n_deny, out  # one line per deny from aegis tail


def test_demo_fleet_half_without_events_is_one_line(tmp_path, capsys):
    assert fleet_demo(tmp_path / "missing.jsonl", tmp_path / "work") == 1
    assert capsys.readouterr().out.strip().startswith("fleet: no events came back from the guest")
