"""Raw ring records to decoded rows, the one way every stage does it.

A batch normally decodes whole; when it does not (a record of another ABI), the valid
records are kept and the others are counted, never skipped in silence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aegis_stream.kernel.events import DecodeError, decode_batch, split_valid
from aegis_stream.pipeline.normalise import Normaliser


def decode_valid(data: bytes, stride: int) -> tuple[Any, int]:
    """Decode a batch of raw records: ``(rows, abi_mismatches)``.  When the batch does
    not decode whole, the valid records are returned and the others counted."""
    try:
        return decode_batch(data, stride), 0
    except DecodeError:
        return split_valid(data, stride)


def encode_audit_batch(norm: Normaliser, data: bytes, stride: int,
                       log: Callable[[str], None]) -> tuple[bytes, int, int, int]:
    """An audit batch to JSON lines: ``(lines, encoded, abi_mismatches, failed)``, the
    same bytes in a forked worker or in the agent.  A normaliser error must not stop
    the agent: it is logged and the batch's valid records are counted ``failed``."""
    bad = 0
    try:
        arr, bad = decode_valid(data, stride)
        return norm.encode_batch(arr), len(arr), bad, 0
    except Exception as exc:
        log(f"audit: normalise failed for a batch of {len(data) // stride - bad}: {exc!r}")
        return b"", 0, bad, len(data) // stride - bad
