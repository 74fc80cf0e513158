"""Schema evolution: an incompatible change to a checked-in schema fails.

Rules: no field removed or retyped; no new required field (new fields need defaults);
new fields after the old ones; a field that was required stays required."""

from __future__ import annotations

import msgspec
import pytest

from aegis_stream.pipeline import schema
from aegis_stream.pipeline.schema import compat_problems


def test_current_structs_are_compatible_with_the_checked_in_schemas():
    for name, content in schema.generated_files().items():
        on_disk = msgspec.json.decode((schema.SCHEMA_DIR / name).read_bytes())
        assert compat_problems(on_disk, msgspec.json.decode(content)) == [], name


class V1(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    b: str
    c: list[str] = []


class AddedOptionalLast(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    b: str
    c: list[str] = []
    d: str = ""


class AddedRequired(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    b: str
    c: list[str] = []
    d: str


class AddedInTheMiddle(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    d: str = ""
    b: str
    c: list[str] = []


class Removed(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    c: list[str] = []


class Retyped(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    b: int
    c: list[str] = []


class MadeOptional(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    b: str = ""
    c: list[str] = []


class ChangedDefault(msgspec.Struct, kw_only=True, tag="t.v1", tag_field="schema"):
    a: int
    b: str
    c: list[str] = msgspec.field(default_factory=lambda: ["x"])


def _s(t: type) -> dict:
    doc = msgspec.json.schema(t)
    doc["$defs"] = {"T": next(iter(doc["$defs"].values()))}
    return doc


@pytest.mark.parametrize(
    ("new", "expect"),
    [
        (V1, []),
        (AddedOptionalLast, []),
        (AddedRequired, ["T.d: new required field (new fields need a default)"]),
        (AddedInTheMiddle, ["T: existing fields reordered or new fields not last"]),
        (Removed, ["T.b: removed"]),
        (Retyped, ["T.b: type changed from {'type': 'string'} to {'type': 'integer'}"]),
        (MadeOptional, ["T.b: no longer required (readers rely on it)"]),
        (ChangedDefault, ["T.c: default changed (old records would read differently)"]),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else "",
)
def test_compat_rules(new, expect):
    assert compat_problems(_s(V1), _s(new)) == expect


def test_generate_refuses_an_incompatible_change(tmp_path):
    schema.generate(tmp_path)
    p = tmp_path / "aegis.decision.v1.json"
    doc = msgspec.json.decode(p.read_bytes())
    # pretend the checked-in schema had a field the Struct no longer has
    doc["$defs"]["DecisionEvent"]["properties"]["legacy"] = {"type": "string"}
    p.write_bytes(msgspec.json.encode(doc))
    with pytest.raises(SystemExit, match="legacy: removed"):
        schema.generate(tmp_path)
    assert any("incompatible" in x for x in schema.check(tmp_path))
