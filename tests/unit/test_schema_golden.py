"""Golden vectors: raw kernel records (hex) -> the exact normalised JSON.

tests/golden/decision_vectors.json holds, per vector, the 96-byte ``struct aegis_event``
in hex and the expected ``aegis.decision.v1`` record, produced with a fixed store
(tests/golden/state), cgroup table, process table, host and boot id
(``fakekernel.fixed_normaliser``).  Both normalise paths (per record and the columnar
batch encoder) must produce exactly these bytes.  A deliberate change regenerates the
file: ``AEGIS_REGEN_GOLDEN=1 pytest tests/unit/test_schema_golden.py`` (and review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from aegis_stream.kernel import abi
from aegis_stream.kernel.events import EVENT_SIZE, RawDecision, decode_batch, decode_raw, encode_raw
from aegis_stream.pipeline.schema import DecisionEvent, event_decoder
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import CG_APP, CG_OTHER, CG_WORKLOADS, DEV_SDA1, fixed_normaliser

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
VECTORS = GOLDEN / "decision_vectors.json"
_enc = msgspec.json.Encoder()


def _raw(**kw) -> RawDecision:
    base = dict(abi_version=abi.ABI_VERSION, hook=0, decision=1, rule_id=0, generation=7, ktime_ns=5_123_456_789,
                cgroup_id=CG_APP, scope_cgroup_id=CG_WORKLOADS, ino=1234, dev=DEV_SDA1,
                action=abi.ACTION_OPEN, pid=4243, tgid=4242, uid=1000, gid=1000, mode=1, slot=1,
                comm="cat")
    base.update(kw)
    return RawDecision(**base)  # type: ignore[arg-type]


CG_POD = 3000
POD_PATH = ("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/"
            "kubepods-burstable-pod0b6f6c1e_2f5a_4d0c_9f3e_7a1b2c3d4e5f.slice/"
            "cri-containerd-" + "4f2a" * 16 + ".scope")
CASES = {
    "deny-open-via-ancestor-scope": _raw(),
    "audit-exec-own-cgroup": _raw(ktime_ns=5_123_457_789, hook=1, decision=2, rule_id=1, ino=5678, action=abi.ACTION_EXEC,
                                  cgroup_id=CG_WORKLOADS, mode=0, comm="nc", pid=77, tgid=77),
    "odd-path-and-comm-process-gone": _raw(ktime_ns=6_000_000_001, rule_id=2, ino=9012, comm='a"b%\\c', pid=9, tgid=9),
    "unknown-generation-and-cgroup": _raw(ktime_ns=7_000_000_000, generation=99, cgroup_id=555, scope_cgroup_id=CG_OTHER),
    "host-scope-mmap-rule-out-of-range": _raw(ktime_ns=8_999_999_999, hook=2, rule_id=9, scope_cgroup_id=0, slot=0),
    "kubernetes-pod-workload": _raw(ktime_ns=9_000_000_000, cgroup_id=CG_POD, scope_cgroup_id=0, pid=31, tgid=31),
    # a file renamed over a path rule's path: the kernel passed the rule on (bpf/continuity.bpf.h)
    "deny-open-inherited-rule": _raw(ktime_ns=9_500_000_000, ino=4321,
                                     rule_flags=abi.RULE_PATH | abi.RULE_INHERITED),
}


def _bytes(raw: RawDecision) -> bytes:
    data = bytearray(encode_raw(raw))
    if raw.comm == 'a"b%\\c':  # and a byte that is not UTF-8
        data[-16:] = b'a"b%\\c\xff\x00'.ljust(16, b"\0")
    return bytes(data)


@pytest.fixture
def norm():
    n = fixed_normaliser(PolicyStore(GOLDEN / "state"))
    n.cgroups.static[CG_POD] = POD_PATH  # a containerd container of a burstable pod: the workload field
    return n


def _current(norm) -> list[dict]:
    out = []
    for name, raw in CASES.items():
        data = _bytes(raw)
        ev = norm.normalise(decode_raw(data))
        out.append({"name": name, "raw_hex": data.hex(), "expected": msgspec.to_builtins(ev)})
    return out


def test_golden_vectors(norm):
    if os.environ.get("AEGIS_REGEN_GOLDEN"):
        VECTORS.write_bytes(msgspec.json.format(_enc.encode(_current(norm)), indent=2) + b"\n")
    vectors = msgspec.json.decode(VECTORS.read_bytes())
    assert [v["name"] for v in vectors] == list(CASES), "vector set changed: regenerate"
    for v in vectors:
        data = bytes.fromhex(v["raw_hex"])
        want = _enc.encode(v["expected"])
        got = _enc.encode(norm.normalise(decode_raw(data)))
        assert got == want, v["name"]
        assert norm.encode_batch(decode_batch(data, EVENT_SIZE)) == want + b"\n", v["name"]
        ev = event_decoder.decode(want)
        assert isinstance(ev, DecisionEvent) and ev.event_id.startswith("01234567-")


def test_golden_vectors_as_one_batch(norm):
    vectors = msgspec.json.decode(VECTORS.read_bytes())
    blob = b"".join(bytes.fromhex(v["raw_hex"]) for v in vectors)
    want = b"".join(_enc.encode(v["expected"]) + b"\n" for v in vectors)
    assert norm.encode_batch(decode_batch(blob, EVENT_SIZE)) == want


def test_golden_store_fixture_is_the_sample_record():
    from aegis_stream.testing import sample_record

    assert PolicyStore(GOLDEN / "state").load(7) == sample_record(7)
