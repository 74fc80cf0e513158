"""The pipeline's parts on their own: the public facade, the one decode step shared by
the normaliser, the forked workers and the collector, and the shutdown ranks."""

from __future__ import annotations

import importlib

import pytest

import aegis_stream.pipeline as pipeline
from aegis_stream.kernel.events import EVENT_SIZE, RawDecision, encode_raw
from aegis_stream.pipeline.context import ParkRank
from aegis_stream.pipeline.decoding import decode_valid, encode_audit_batch
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import fixed_normaliser, make_events

PUBLIC = {
    "Pipeline": "pipeline", "PipelineConfig": "config", "CLASSES": "config",
    "PipelineStatistics": "accounting", "ClassStatistics": "accounting", "window_label": "accounting",
    "KernelView": "kernel_view", "MapsKernelView": "kernel_view",
    "DiskSpool": "spool", "SpoolStatistics": "spool",
}


def test_the_facade_re_exports_the_public_names_from_their_modules():
    # the facade loads its names on first use (the CLI imports pipeline.schema on every start)
    assert set(pipeline.__all__) == set(PUBLIC) == set(dir(pipeline))
    for name, module in PUBLIC.items():
        assert getattr(pipeline, name) is getattr(
            importlib.import_module(f"aegis_stream.pipeline.{module}"), name)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("aegis_stream.pipeline.core")


def _submodules() -> list[str]:
    import pkgutil

    return [m.name for m in pkgutil.iter_modules(pipeline.__path__, "aegis_stream.pipeline.")]


def _foreign() -> bytes:
    return encode_raw(RawDecision(1, 0, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, "x"))  # ABI 1


def test_decode_valid_keeps_the_valid_records_and_counts_the_others():
    good = make_events(3)
    arr, bad = decode_valid(good, EVENT_SIZE)
    assert (len(arr), bad) == (3, 0)
    mixed = good[:EVENT_SIZE] + _foreign() + good[EVENT_SIZE:]
    arr2, bad2 = decode_valid(mixed, EVENT_SIZE)
    assert (len(arr2), bad2) == (3, 1)
    assert list(arr2["ktime_ns"]) == list(arr["ktime_ns"])


def test_encode_audit_batch_same_bytes_with_a_foreign_record_and_counts_a_failure(tmp_path):
    norm = fixed_normaliser(PolicyStore(tmp_path / "state"))
    good = make_events(3)
    logged: list[str] = []
    lines, n_ok, bad, failed = encode_audit_batch(norm, good, EVENT_SIZE, logged.append)
    assert (n_ok, bad, failed) == (3, 0, 0) and lines.count(b"\n") == 3
    mixed = good[:EVENT_SIZE] + _foreign() + good[EVENT_SIZE:]
    assert encode_audit_batch(norm, mixed, EVENT_SIZE, logged.append) == (lines, 3, 1, 0)

    def broken(arr: object) -> bytes:
        raise ValueError("normaliser bug")

    norm.encode_batch = broken  # type: ignore[method-assign]
    assert encode_audit_batch(norm, mixed, EVENT_SIZE, logged.append) == (b"", 0, 1, 3)
    assert logged == ["audit: normalise failed for a batch of 3: ValueError('normaliser bug')"]


def test_park_ranks_are_stream_order():
    """At a stop the spool is rewritten as WRITER + NORMALISER batches, then what it held,
    then READER batches: the ranks sort oldest first."""
    assert sorted(ParkRank, reverse=True) == [ParkRank.READER, ParkRank.NORMALISER, ParkRank.WRITER]
    assert ParkRank.WRITER < ParkRank.NORMALISER < ParkRank.READER
