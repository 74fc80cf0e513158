"""The event pipeline: ring records in, versioned events out, every loss counted.

Readers drain the kernel rings (``aegis_stream.kernel.ringbuf``), decode and normalise
records into :mod:`~aegis_stream.pipeline.schema` Structs (``normalise``), feed the
engine-independent :mod:`aegis_stream.processors`, and write batches to sinks
(``sinks``); ``metrics`` exports the statistics of every stage to Prometheus.

The :class:`Pipeline` (``pipeline``) wires the stages, one module each: ``readers``
(ring -> raw channel, deny spool admission), ``normalising`` (raw -> encoded, with the
forked encoder ``workers``), ``writers`` (encoded -> every sink, retries) and
``ticker`` (kernel counters, SLO, degraded state); ``spool`` is the on-disk deny FIFO,
``accounting`` the per-class ledger and the statistics records.
"""

# Loaded on first use: ``aegis_stream.pipeline.schema`` (the event Structs) is imported by
# every CLI command, and an eager facade would pull trio, numpy and every stage into each
# `aegis` start (0.47 s on the build host, many seconds per call in a TCG guest).
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ClassStatistics": "accounting",
    "PipelineStatistics": "accounting",
    "window_label": "accounting",
    "CLASSES": "config",
    "PipelineConfig": "config",
    "KernelView": "kernel_view",
    "MapsKernelView": "kernel_view",
    "Pipeline": "pipeline",
    "DiskSpool": "spool",
    "SpoolStatistics": "spool",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from aegis_stream.pipeline.accounting import ClassStatistics as ClassStatistics
    from aegis_stream.pipeline.accounting import PipelineStatistics as PipelineStatistics
    from aegis_stream.pipeline.accounting import window_label as window_label
    from aegis_stream.pipeline.config import CLASSES as CLASSES
    from aegis_stream.pipeline.config import PipelineConfig as PipelineConfig
    from aegis_stream.pipeline.kernel_view import KernelView as KernelView
    from aegis_stream.pipeline.kernel_view import MapsKernelView as MapsKernelView
    from aegis_stream.pipeline.pipeline import Pipeline as Pipeline
    from aegis_stream.pipeline.spool import DiskSpool as DiskSpool
    from aegis_stream.pipeline.spool import SpoolStatistics as SpoolStatistics


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aegis_stream.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"aegis_stream.pipeline.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
