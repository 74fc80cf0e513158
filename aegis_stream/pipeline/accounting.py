"""Drop accounting: the per-class ledger the stages write, and the frozen statistics
records a :class:`~aegis_stream.pipeline.Pipeline` hands out.

Per class::

    read      = delivered + dropped (userspace, by stage/reason) + in_flight
    emitted   = read + kernel_dropped + backlog            (emitted: kernel counters)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aegis_stream.kernel.counters import CounterSnapshot
from aegis_stream.kernel.ringbuf import RingStatistics
from aegis_stream.pipeline.sinks import SinkStatistics
from aegis_stream.pipeline.spool import SpoolStatistics

if TYPE_CHECKING:
    from aegis_stream.pipeline.storms import StormStatistics


@dataclass(frozen=True)
class ClassStatistics:
    """The ledger of one event class (deny or audit) at one moment."""

    klass: str
    read: int  # records consumed from the ring (or recovered from the spool)
    delivered: int  # written by every sink
    dropped: Mapping[tuple[str, str], int]  # (stage, reason) -> events, userspace
    in_flight: int  # read - delivered - dropped: in channels, spool, being written
    spooled: int  # (deny) batches that went through the disk spool, in events
    kernel_emitted: int  # decisions of this class since the pipeline started
    kernel_dropped: int  # ring reserve failures attributed to this class
    backlog: int  # records waiting in the ring

    @property
    def dropped_userspace(self) -> int:
        return sum(self.dropped.values())

    @property
    def dropped_total(self) -> int:
        return self.dropped_userspace + self.kernel_dropped


@dataclass(frozen=True)
class PipelineStatistics:
    """Everything ``Pipeline.statistics()`` reports: the per-class ledgers, rings, sinks,
    spool, kernel counters, health state and SLO burn rates (the metrics' source)."""

    classes: Mapping[str, ClassStatistics]
    rings: Mapping[str, RingStatistics]
    sinks: tuple[SinkStatistics, ...]
    spool: SpoolStatistics
    kernel: CounterSnapshot
    hooks: Mapping[str, bool]
    mode: str
    generation: int
    state: str
    reasons: tuple[str, ...]
    state_changes: int
    burn_rates: Mapping[tuple[str, str], float]  # (class, window "5m"/"1h"...) -> burn rate
    drop_ratios: Mapping[tuple[str, str], float]
    alerts_firing: Mapping[tuple[str, str], bool]  # (class, alert name)
    derived_events: Mapping[str, int]  # state/slo/explanation records written
    derived_failed: int
    slo_objective: float
    memory_trims: int = 0  # heap trims after a drained burst (aegis_stream.memtrim)
    state_callback_failures: int = 0  # on_state calls that raised (logged each time)
    reason_codes: tuple[str, ...] = ()  # the stable codes of ``reasons``, in order
    storms: StormStatistics | None = None  # deny-storm summaries (None: not reported)


def window_label(seconds: float) -> str:
    """An SLO window as a metric label: ``300`` -> ``"5m"``, ``3600`` -> ``"1h"``."""
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


class ClassAccount:
    """The running ledger of one class, written by the stages (one trio thread)."""

    def __init__(self, klass: str) -> None:
        self.klass = klass
        self.read = 0
        self.delivered = 0
        self.dropped: dict[tuple[str, str], int] = {}
        self.spooled = 0
        self.kernel_dropped = 0
        # at the pipeline's start (ticker.baseline): kernel decisions, ring backlog, and
        # the ring's consumed records, so that the kernel side counts from the same moment
        self.base_decisions = 0
        self.base_backlog = 0
        self.base_ring_records = 0

    def drop(self, stage: str, reason: str, n: int) -> None:
        """Count ``n`` events lost at ``stage`` for ``reason`` (0: nothing to count)."""
        if n:
            self.dropped[(stage, reason)] = self.dropped.get((stage, reason), 0) + n

    @property
    def dropped_userspace(self) -> int:
        return sum(self.dropped.values())

    @property
    def in_flight(self) -> int:
        """Read and neither delivered nor dropped: in a channel, the spool, or a stage."""
        return self.read - self.delivered - self.dropped_userspace
