"""Decision events: the raw kernel record (abi.EVENT) decoded, one at a time or in batches.

Two decode paths, same answer (tests/unit/test_ringbuf.py and tests/unit/test_normalise.py check
that they agree field for field):

* :func:`decode_raw` -- one record -> :class:`RawDecision` (``struct.unpack``).  The
  plain path; the kernel lab and the deny class use it.
* :func:`decode_batch` -- a contiguous run of ring records (8-byte ring header + 96-byte
  event, 104 bytes apart, as :meth:`RingBuffer.drain_batch` copies them out) -> a numpy
  structured array over the same bytes (zero copy, vectorised ABI check).  The telemetry
  hot path reads columns from it; see docs/PERFORMANCE.md for the measurements that
  chose it over ``struct.unpack`` per record and ``struct.iter_unpack``.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec
import numpy as np

from aegis_stream.errors import AegisError
from aegis_stream.kernel import abi

SCHEMA = "aegis.decision.v1"
DECISION_NAMES = {abi.Decision.ALLOW: "allow", abi.Decision.DENY: "deny", abi.Decision.AUDIT: "audit"}
MODE_NAMES = {m: m.label for m in abi.Mode}
ACTION_NAMES = {abi.ACTION_OPEN: "open", abi.ACTION_EXEC: "exec"}

#: struct for one event body (96 bytes)
EVENT_STRUCT: Final = struct.Struct(abi.EVENT.fmt)
EVENT_SIZE: Final = EVENT_STRUCT.size
#: ring record header (u32 len | BUSY/DISCARD bits, u32 page offset)
RING_HDR: Final = struct.Struct("<II")
#: one ring record carrying an aegis_event: header + body, already 8-byte aligned
RECORD_STRIDE: Final = RING_HDR.size + EVENT_SIZE
#: header + body in one struct (the baseline ``iter_unpack`` path in bench/)
RECORD_STRUCT: Final = struct.Struct("<II" + abi.EVENT.fmt[1:])

_NP_FORMATS = {"H": "<u2", "B": "u1", "I": "<u4", "Q": "<u8", "16s": "S16"}
_EV_NAMES = [n for n, _ in abi.EVENT.fields]
_EV_FORMATS = [_NP_FORMATS[f] for _, f in abi.EVENT.fields]
_EV_OFFSETS = list(abi.EVENT.offsets().values())
#: numpy mirror of struct aegis_event (same offsets: checked in tests/unit/test_ringbuf.py)
EVENT_DTYPE: Final = np.dtype(
    {"names": _EV_NAMES, "formats": _EV_FORMATS, "offsets": _EV_OFFSETS, "itemsize": EVENT_SIZE}
)
#: a ring record: header then the event
RECORD_DTYPE: Final = np.dtype(
    {
        "names": ["rec_len", "rec_pg_off", *_EV_NAMES],
        "formats": ["<u4", "<u4", *_EV_FORMATS],
        "offsets": [0, 4, *[RING_HDR.size + o for o in _EV_OFFSETS]],
        "itemsize": RECORD_STRIDE,
    }
)


class DecodeError(AegisError):
    """A ring record or batch that is not a whole, current-ABI decision record (wrong size or ABI version)."""


class RawDecision(msgspec.Struct, frozen=True):
    """One kernel decision record, field for field, except that ``rule_flags`` (ABI 2: the
    u16 after ``slot`` in the record) comes last here so it can default to 0 (no flags):
    :data:`abi.EVENT` has the record's order.  ``rule_flags & abi.RULE_INHERITED``: the
    deciding rule was inherited by a rename onto a path rule's path (bpf/continuity.bpf.h)."""

    abi_version: int
    hook: int
    decision: int
    rule_id: int
    generation: int
    ktime_ns: int
    cgroup_id: int
    scope_cgroup_id: int
    ino: int
    dev: int
    action: int
    pid: int
    tgid: int
    uid: int
    gid: int
    mode: int
    slot: int
    comm: str
    rule_flags: int = 0

    @property
    def inherited(self) -> bool:
        """The deciding rule was inherited by a rename onto a path rule's path."""
        return bool(self.rule_flags & abi.RULE_INHERITED)


def comm_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def decode_raw(data: bytes | memoryview) -> RawDecision:
    if len(data) < EVENT_SIZE:
        raise DecodeError(f"decision record of {len(data)} bytes, expected {EVENT_SIZE}")
    vals = EVENT_STRUCT.unpack_from(data, 0)
    if vals[0] != abi.ABI_VERSION:
        raise DecodeError(f"decision record ABI {vals[0]}, agent speaks {abi.ABI_VERSION}")
    return RawDecision(*vals[:-2], comm_str(vals[-1]), vals[-2])  # type: ignore[call-arg]


def encode_raw(ev: RawDecision) -> bytes:
    """The inverse of :func:`decode_raw` (the fake kernel and golden vectors use it)."""
    vals = msgspec.structs.astuple(ev)
    return EVENT_STRUCT.pack(*vals[:-2], ev.rule_flags, ev.comm.encode()[:16])


def decode_batch(blob: bytes | bytearray | memoryview, stride: int = RECORD_STRIDE) -> np.ndarray:
    """A run of records -> structured array over ``blob`` (no copy).

    ``stride`` is :data:`RECORD_STRIDE` for ring records (header included) or
    :data:`EVENT_SIZE` for bare events.  Raises DecodeError naming the first record
    whose ABI version is not the agent's; use :func:`split_valid` to keep the rest.
    """
    dtype = RECORD_DTYPE if stride == RECORD_STRIDE else EVENT_DTYPE
    if stride not in (RECORD_STRIDE, EVENT_SIZE) or len(blob) % stride:
        raise DecodeError(f"batch of {len(blob)} bytes is not a whole number of {stride}-byte records")
    arr = np.frombuffer(blob, dtype=dtype)
    bad = np.flatnonzero(arr["abi_version"] != abi.ABI_VERSION)
    if bad.size:
        raise DecodeError(
            f"record {int(bad[0])} of the batch has ABI {int(arr['abi_version'][bad[0]])}, "
            f"agent speaks {abi.ABI_VERSION}"
        )
    return arr


def split_valid(
    blob: bytes | bytearray | memoryview, stride: int = RECORD_STRIDE
) -> tuple[np.ndarray, int]:
    """Like :func:`decode_batch` but drops (and counts) records of another ABI."""
    dtype = RECORD_DTYPE if stride == RECORD_STRIDE else EVENT_DTYPE
    arr = np.frombuffer(blob, dtype=dtype)
    ok = arr["abi_version"] == abi.ABI_VERSION
    if ok.all():
        return arr, 0
    return arr[ok], int((~ok).sum())


def rows(arr: np.ndarray) -> list[RawDecision]:
    """Structured array -> RawDecision per record (for the per-event paths)."""
    cols = [arr[n].tolist() for n in _EV_NAMES[:-2]]
    comms = [comm_str(c) for c in arr["comm"].tolist()]
    flags = arr["rule_flags"].tolist()
    return [RawDecision(*vals, c, f)  # type: ignore[call-arg]
            for *vals, c, f in zip(*cols, comms, flags, strict=True)]
