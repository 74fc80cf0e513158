"""Decision events: the raw kernel record (abi.EVENT) decoded into a versioned Struct."""

from __future__ import annotations

import msgspec

from aegis_stream import abi
from aegis_stream.errors import AegisError

SCHEMA = "aegis.decision.v1"
DECISION_NAMES = {abi.Decision.ALLOW: "allow", abi.Decision.DENY: "deny", abi.Decision.AUDIT: "audit"}
MODE_NAMES = {abi.Mode.AUDIT: "audit", abi.Mode.ENFORCE: "enforce"}
ACTION_NAMES = {abi.ACTION_OPEN: "open", abi.ACTION_EXEC: "exec"}


class DecodeError(AegisError):
    pass


class RawDecision(msgspec.Struct, frozen=True):
    """One kernel decision record, field for field."""

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


def decode_raw(data: bytes) -> RawDecision:
    if len(data) < abi.EVENT.size:
        raise DecodeError(f"decision record of {len(data)} bytes, expected {abi.EVENT.size}")
    vals = abi.EVENT.unpack(data[: abi.EVENT.size])
    if vals[0] != abi.ABI_VERSION:
        raise DecodeError(f"decision record ABI {vals[0]}, agent speaks {abi.ABI_VERSION}")
    comm = vals[-1].split(b"\0", 1)[0].decode(errors="replace")
    return RawDecision(*vals[:-1], comm)  # type: ignore[arg-type]
