"""The event schemas: checked-in JSON Schema files are current, the union decodes every
type, every record names its schema and version."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from aegis_stream.pipeline import schema
from aegis_stream.pipeline.schema import (
    EVENT_TYPES,
    DecisionEvent,
    ExplainedPolicy,
    ExplainedRule,
    ExplainedScope,
    ExplainedTask,
    ExplanationEvent,
    SloEvent,
    StateEvent,
    event_decoder,
)


def test_checked_in_schema_files_are_current():
    problems = schema.check()
    assert problems == [], "\n".join(problems)


def test_every_event_type_has_a_file_and_a_versioned_tag():
    names = {schema.schema_name(t) for t in EVENT_TYPES}
    assert names == {"aegis.decision.v1", "aegis.state.v1", "aegis.explanation.v1", "aegis.slo.v1",
                     "aegis.storm.v1"}
    for n in names:
        assert (schema.SCHEMA_DIR / f"{n}.json").exists()
        doc = msgspec.json.decode((schema.SCHEMA_DIR / f"{n}.json").read_bytes())
        (defn,) = [d for d in doc["$defs"].values() if "schema" in d.get("properties", {})]
        assert defn["properties"]["schema"] == {"enum": [n]}
        assert "schema" in defn["required"]


def _samples() -> list[msgspec.Struct]:
    dec = DecisionEvent(
        event_id="e", time="t", ktime_ns=1, host="h", hook="file_open", action="open",
        decision="deny", mode="enforce", rule_id="r", rule_index=0, generation=1, policy_name="p",
        policy_version=1, policy_digest="d", rule_source="/x", dev="8:1", ino=2, cgroup_id=3,
        cgroup_path="/c", scope_cgroup_id=3, scope_cgroup_path="/c", pid=4, tid=4, uid=0, gid=0,
        comm="cat",
    )
    state = StateEvent(event_id="s", time="t", host="h", state="degraded", previous="enforcing",
                       reasons=["x"], hooks_attached=["file_open"], hooks_expected=["file_open"],
                       mode="enforce", generation=1, ring_fill={"deny": 0.5},
                       consumer_lag_bytes={"deny": 5}, drop_ratio={"audit": 0.0})
    slo = SloEvent(event_id="o", time="t", host="h", event_class="audit", alert="page",
                   status="firing", objective=0.001, long_window_s=3600, short_window_s=300,
                   burn_threshold=14.4, burn_long=20.0, burn_short=30.0, emitted_long=10,
                   dropped_long=1)
    exp = ExplanationEvent(
        event_id="e", time="t", host="h", decision="deny", outcome="EPERM", hook="file_open",
        action="open", mode="enforce", generation=1, slot=0,
        rule=ExplainedRule(id="r", index=0, source="/x", inode="8:1:2", actions=["open"]),
        policy=ExplainedPolicy(name="p", version=1, digest="d", signer="", source="", record=""),
        scope=ExplainedScope(match="self", cgroup_id=3, path="/c", configured="/c"),
        task=ExplainedTask(pid=4, tid=4, uid=0, gid=0, comm="cat", exe="", cgroup_id=3, cgroup_path="/c"),
        decision_path=["a"], consistent=True,
    )
    return [dec, state, slo, exp]


@pytest.mark.parametrize("ev", _samples(), ids=lambda e: type(e).__name__)
def test_union_round_trip_and_schema_field(ev):
    data = msgspec.json.encode(ev)
    doc = msgspec.json.decode(data)
    assert doc["schema"] == schema.schema_name(type(ev))
    assert next(iter(doc)) == "schema"  # the tag comes first: cheap to route on
    assert event_decoder.decode(data) == ev


def test_unknown_schema_is_rejected():
    with pytest.raises(msgspec.ValidationError):
        event_decoder.decode(b'{"schema": "aegis.decision.v9", "event_id": "x"}')


def test_generate_command_writes_the_same_files(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aegis_stream.pipeline.schema", "generate", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert f"wrote {len(schema.generated_files())}" in out.stdout
    for name, content in schema.generated_files().items():
        assert (tmp_path / name).read_bytes() == content == (schema.SCHEMA_DIR / name).read_bytes()
    chk = subprocess.run([sys.executable, "-m", "aegis_stream.pipeline.schema", "check", "--dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert chk.returncode == 0, chk.stderr


def test_check_reports_a_stale_file(tmp_path):
    schema.generate(tmp_path)
    p = tmp_path / "aegis.slo.v1.json"
    p.write_bytes(p.read_bytes().replace(b'"burn_short"', b'"burn_shortx"'))
    problems = schema.check(tmp_path)
    assert any("stale" in x for x in problems)
