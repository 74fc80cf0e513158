"""`aegis explain`: an event from the log (or stdin) -> its exact explanation."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import msgspec
import pytest

from aegis_stream.agent.explain import add_pipeline_commands, find_event, render
from aegis_stream.errors import AegisError
from aegis_stream.pipeline.schema import ExplanationEvent

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aegis")
    add_pipeline_commands(p.add_subparsers(dest="command", required=True))
    return p


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(args.func(args))


@pytest.fixture
def log(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AEGIS_STATE_DIR", str(GOLDEN / "state"))
    vectors = msgspec.json.decode((GOLDEN / "decision_vectors.json").read_bytes())
    path = tmp_path / "events.jsonl"
    lines = [msgspec.json.encode(v["expected"]) for v in vectors]
    # the first vector lives in a rotated file: explain searches those too
    path.with_name("events.jsonl.1").write_bytes(lines[0] + b"\n")
    path.write_bytes(b'{"schema":"aegis.state.v1","event_id":"x"}\n' + b"\n".join(lines[1:]) + b"\n")
    return path


def test_explain_text(log, capsys):
    assert _run(["explain", "01234567-5123456789-4243", "--events", str(log)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "deny 01234567-5123456789-4243 at 2026-05-28T20:26:45.123456Z on host-1: EPERM"
    assert "    1. slot 1 active (generation 7)" in out
    assert "    2. inode 8:1:1234 matched rule deny-shadow [open,exec]" in out
    assert ("    4. scope /sys/fs/cgroup/workloads matched via ancestor of "
            "/sys/fs/cgroup/workloads/app") in out
    assert "    5. mode enforce -> EPERM" in out
    assert "applied from /etc/aegis/prod-baseline.toml" in out and "signed by ops-2026" in out


def test_explain_json(log, capsys):
    assert _run(["explain", "01234567-5123457789-77", "--events", str(log), "--json"]) == 0
    x = msgspec.json.decode(capsys.readouterr().out, type=ExplanationEvent)
    assert x.rule.id == "deny-nc" and x.scope.match == "self" and x.outcome == "allowed (audit)"
    assert x.policy.record.endswith("generations/7.json")


def test_explain_stdin(log, capsys, monkeypatch):
    rec = find_event("01234567-5123456789-4243", log)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(msgspec.json.encode(rec))))
    assert _run(["explain", "-"]) == 0
    assert "EPERM" in capsys.readouterr().out


def test_explain_inconsistent_or_unknown_generation_exits_1(log, capsys):
    # vector 4 names generation 99, which has no record
    assert _run(["explain", "01234567-5123456789-4243", "--events", str(log)]) == 0
    vectors = msgspec.json.decode((GOLDEN / "decision_vectors.json").read_bytes())
    gen99 = vectors[3]["expected"]["event_id"]
    assert _run(["explain", gen99, "--events", str(log)]) == 1
    assert "no record of generation 99" in capsys.readouterr().out


def test_explain_errors(log, monkeypatch):
    with pytest.raises(AegisError, match="no decision nope"):
        _run(["explain", "nope", "--events", str(log)])
    monkeypatch.delenv("AEGIS_EVENTS", raising=False)
    with pytest.raises(AegisError, match="give --events"):
        _run(["explain", "x"])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"{not json")))
    with pytest.raises(AegisError, match="not one JSON record"):
        _run(["explain", "-"])
    with pytest.raises(AegisError, match="does not exist"):
        _run(["explain", "x", "--events", str(log) + ".missing"])


def test_render_is_total_for_an_unknown_record():
    from aegis_stream.pipeline.schema import DecisionEvent
    from aegis_stream.processors.explain import explain

    ev = DecisionEvent(event_id="e", time="t", ktime_ns=1, host="h", hook="mmap_file", action="exec",
                       decision="deny", mode="enforce", rule_id="", rule_index=3, generation=5,
                       policy_name="", policy_version=0, policy_digest="", rule_source="", dev="0:0",
                       ino=1, cgroup_id=0, cgroup_path="", scope_cgroup_id=0, scope_cgroup_path="",
                       pid=1, tid=1, uid=0, gid=0, comm="x")
    text = render(explain(ev, None))
    assert "INCONSISTENT" in text and "no record of generation 5" in text
