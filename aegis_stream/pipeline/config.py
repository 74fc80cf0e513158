"""What the pipeline is configured with: :class:`PipelineConfig`, the event classes it
carries (:data:`CLASSES`), and the one stderr line every stage reports through."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from aegis_stream.processors.degraded import DegradedConfig
from aegis_stream.processors.slo import SloConfig

#: the event classes, one ring, one raw channel, one normaliser and one writer each
CLASSES = ("deny", "audit")


def log(msg: str) -> None:
    """One line on the agent's stderr (the journal)."""
    print(f"aegis: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class PipelineConfig:
    """Sizes, timings and options of a :class:`~aegis_stream.pipeline.Pipeline`.

    Channel depths are in batches of at most ``batch_max`` records; the defaults are
    the agent's (docs/PERFORMANCE.md explains the audit ones)."""

    batch_max: int = 4096  # records per drain / per channel item
    # audit is shallow on purpose: the 4 MiB ring is its buffer, and 16 batches of encoded
    # JSON lines (~3.5 MB each) was most of the agent's RSS after a flood (docs/PERFORMANCE.md)
    raw_channel_batches: Mapping[str, int] = field(default_factory=lambda: {"deny": 64, "audit": 8})
    out_channel_batches: Mapping[str, int] = field(default_factory=lambda: {"deny": 64, "audit": 4})
    poll_interval_s: float = 0.05  # timeout poll next to wait_readable
    audit_shed_fill: float = 0.5  # audit: wait for room until the ring is this full, then shed
    audit_sample_n: int = 1  # keep 1 in N audit events (1 = all)
    spool_dir: str | None = None  # None: no spool (a full deny channel blocks the reader)
    spool_max_bytes: int = 64 << 20
    tick_s: float = 1.0
    #: a state record every this many seconds even without a change (0: only changes), so
    #: fleet consumers see the host alive and get its cumulative SLO totals
    state_heartbeat_s: float = 15.0
    explain_denies: bool = True
    sink_retry_initial_s: float = 0.05
    sink_retry_max_s: float = 2.0
    degraded: DegradedConfig = field(default_factory=DegradedConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    slo_short_window_s: float = 300.0  # the window the degraded signal reads drop ratios on
    shutdown_timeout_s: float = 5.0  # after stop(): then the stages are cancelled (denies parked)
    #: audit normalise+encode in this many forked worker processes (0: in the agent's
    #: process).  Raw batches in, JSON lines out, results taken in dispatch order, so the
    #: output order is the ring order; a worker that dies is replaced by in-process
    #: encoding for its batches (nothing lost).  See docs/PERFORMANCE.md.
    audit_workers: int = 0
    audit_worker_cpus: frozenset[int] | None = None  # affinity of the workers (None: inherit)
