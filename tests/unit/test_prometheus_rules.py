"""packaging/prometheus/aegis-rules.yml: `promtool check rules` and every alert's `promtool
test rules` unit test (packaging/prometheus/tests/*.yml) pass, and no alert is untested."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.unit._prometheus import tool

PROM = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
RULES = PROM / "aegis-rules.yml"
TESTS = sorted((PROM / "tests").glob("*.yml"))


def _alerts() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_rules_check():
    out = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_every_alert_has_a_firing_and_a_quiet_case():
    """Each alert is evaluated in some unit test both where it must fire (with its labels and
    annotations) and where it must not."""
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../aegis-rules.yml"], path
        for t in doc["tests"]:
            for case in t.get("alert_rule_test", []):
                exp = case.get("exp_alerts") or []
                (fires if exp else quiet).add(case["alertname"])
                assert all("exp_annotations" in a for a in exp), (path, case["alertname"])
    alerts = set(_alerts())
    assert sorted(alerts - fires) == [], "alerts never tested firing"
    assert sorted(alerts - quiet) == [], "alerts never tested quiet"
    assert sorted((fires | quiet) - alerts) == [], "tests name alerts the rule file lacks"


def test_promtool_test_rules():
    out = subprocess.run([tool("promtool"), "test", "rules", *map(str, TESTS)], cwd=PROM,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(TESTS) >= 9


def test_rules_use_no_deprecated_name():
    from aegis_stream.pipeline.metrics import DEPRECATED

    text = RULES.read_text()
    assert [n for n in DEPRECATED if n in text] == []
