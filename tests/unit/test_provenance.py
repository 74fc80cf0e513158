"""Hash-chained provenance log: any edit, deletion or reordering is found, by line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis_stream.policy.provenance import GENESIS, ProvenanceLog, record_hash


@pytest.fixture
def log(tmp_path):
    lg = ProvenanceLog(tmp_path, host="h1")
    for i in range(5):
        lg.append("apply", policy="web", version=i + 1, generation=i + 1,
                  previous_generation=i, signer="k1", digest=f"sha256:{i}")
    return lg


def _lines(lg):
    return lg.path.read_bytes().splitlines(keepends=True)


def _write(lg, lines):
    lg.path.write_bytes(b"".join(lines))


def test_chain_is_intact_and_records_carry_the_fields(log) -> None:
    res = log.verify()
    assert res.ok and res.records == 5
    recs = list(log.records())
    assert recs[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(recs, recs[1:], strict=False))
    r = recs[2]
    for k in ("time", "host", "uid", "user", "action", "result", "reason", "policy", "version",
              "digest", "signer", "generation", "previous_generation", "seq", "prev_hash",
              "hash"):
        assert k in r, k
    assert r["host"] == "h1" and r["seq"] == 3 and record_hash(r) == r["hash"]


def test_edit_is_detected_at_its_line(log) -> None:
    lines = _lines(log)
    lines[2] = lines[2].replace(b'"version":3', b'"version":2')
    _write(log, lines)
    res = log.verify()
    assert not res.ok and res.bad_line == 3 and "edited" in res.reason


def test_edit_with_recomputed_hash_breaks_the_next_link(log) -> None:
    lines = _lines(log)
    rec = json.loads(lines[1])
    rec["result"] = "refused"
    rec["hash"] = record_hash(rec)
    lines[1] = json.dumps(rec).encode() + b"\n"
    _write(log, lines)
    res = log.verify()
    assert not res.ok and res.bad_line == 3


def test_deletion_is_detected(log) -> None:
    lines = _lines(log)
    del lines[1]
    _write(log, lines)
    res = log.verify()
    assert not res.ok and res.bad_line == 2 and "deleted" in res.reason


def test_reordering_is_detected(log) -> None:
    lines = _lines(log)
    lines[1], lines[2] = lines[2], lines[1]
    _write(log, lines)
    res = log.verify()
    assert not res.ok and res.bad_line == 2


def test_truncating_the_end_is_detected_by_the_head(log) -> None:
    _write(log, _lines(log)[:3])
    res = log.verify()
    assert not res.ok and res.bad_line == 4 and "end" in res.reason


def test_missing_head_is_detected(log) -> None:
    log.head_path.unlink()
    assert not log.verify().ok


def test_torn_append_is_repaired_on_next_append_and_still_verifies(log) -> None:
    with open(log.path, "ab") as fh:
        fh.write(b'{"action":"apply","res')  # crash mid-write
    res = log.verify()
    assert not res.ok and res.bad_line == 6
    log.append("rollback", generation=4)
    res = log.verify()
    assert res.ok, res
    recs = list(log.records())
    assert recs[-2]["action"] == "log-repair" and recs[-2]["discarded_line"] == 6
    assert recs[-1]["action"] == "rollback" and recs[-1]["seq"] == 7


def test_garbage_line_in_the_middle_is_not_excused(log) -> None:
    lines = _lines(log)
    lines.insert(2, b"garbage\n")
    _write(log, lines)
    res = log.verify()
    assert not res.ok and res.bad_line == 3


@settings(max_examples=40, deadline=None)
@given(line=st.integers(0, 4), pos=st.integers(0, 10_000), byte=st.integers(1, 255))
def test_any_single_byte_change_is_detected(tmp_path_factory, line, pos, byte) -> None:
    lg = ProvenanceLog(tmp_path_factory.mktemp("p"), host="h")
    for i in range(5):
        lg.append("apply", generation=i + 1, reason=f"r{i}")
    orig = _lines(lg)
    lines = list(orig)
    b = bytearray(lines[line])
    b[pos % (len(b) - 1)] ^= byte  # keep the newline
    lines[line] = bytes(b)
    _write(lg, lines)
    try:
        changed = [json.loads(x) for x in lines] != [json.loads(x) for x in orig]
    except ValueError:
        changed = True
    assert changed
    res = lg.verify()
    assert not res.ok and res.bad_line == line + 1
