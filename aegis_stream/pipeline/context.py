"""What the stages share: the configuration, the normaliser, the per-class ledger, the
deny spool and its wake-up, and the shutdown bookkeeping (which batches each stage
held when it was stopped, and why what cannot be kept is lost)."""

from __future__ import annotations

import enum
from typing import Any

import trio

from aegis_stream.kernel.ringbuf import RawBatch
from aegis_stream.pipeline.accounting import ClassAccount
from aegis_stream.pipeline.config import CLASSES, PipelineConfig, log
from aegis_stream.pipeline.normalise import Normaliser
from aegis_stream.pipeline.spool import DiskSpool


class ParkRank(enum.IntEnum):
    """Where a stopped stage held a deny batch, which is its place in stream order
    against the spool's pending contents (lower: older, written first at a rewrite)."""

    WRITER = 0  # normalised, being written: the oldest
    NORMALISER = 1  # read, not yet normalised: older than what is still in the spool
    READER = 2  # just drained from the ring: newer than the spool's contents


class ShutdownReason(enum.Enum):
    """Why events still in hand at the end were not delivered (the drop reason)."""

    STOPPED = "stopped"  # run() was cancelled from outside, without stop()
    DRAIN_TIMEOUT = "drain_timeout"  # stop(): the drain, then the flush, ran out of time


def drain_nowait(recv: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    """Everything a channel holds right now (a stopped stage's leftovers)."""
    out = []
    while True:
        try:
            out.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return out


class StageContext:
    """The state the pipeline's stages share (one trio thread: no locks)."""

    def __init__(self, config: PipelineConfig, norm: Normaliser) -> None:
        self.config = config
        self.norm = norm
        self.acct = {k: ClassAccount(k) for k in CLASSES}
        self.spool: DiskSpool | None = None
        if config.spool_dir:
            try:
                self.spool = DiskSpool(config.spool_dir, config.spool_max_bytes)
            except OSError as exc:
                log(f"deny spool disabled ({exc}); a full deny channel blocks the reader")
        if self.spool is not None and self.spool.recovered:
            self.acct["deny"].read += self.spool.recovered
            log(f"replaying {self.spool.recovered} denies spooled by a previous run")
        self.shutdown_reason = ShutdownReason.STOPPED
        self._parked: dict[ParkRank, list[RawBatch]] = {r: [] for r in ParkRank}
        self._spool_changed = trio.Event()

    # ---------------------------------------------------------------- spool wake-up
    def spool_event(self) -> trio.Event:
        """Set at the next change of the spool (a batch appended or replayed)."""
        return self._spool_changed

    def signal_spool(self) -> None:
        self._spool_changed.set()
        self._spool_changed = trio.Event()

    # ---------------------------------------------------------------- shutdown
    def in_flight(self, klass: str) -> int:
        return self.acct[klass].in_flight

    def park(self, klass: str, count: int, batch: RawBatch | None, rank: ParkRank) -> None:
        """Stopped (or cancelled) with events in hand.  Denies are kept for the spool,
        where run() puts them in stream order when it ends (by ``rank``); audit events
        are dropped, counted ``shutdown/<reason>`` (``drain_timeout`` after a stop whose
        flush ran out of time, ``stopped`` when run() was cancelled)."""
        if klass == "deny" and batch is not None and self.spool is not None:
            self._parked[rank].append(batch)
            self.acct["deny"].spooled += batch.count
            return
        self.acct[klass].drop("shutdown", self.shutdown_reason.value, count)

    def persist_parked(self) -> None:
        """Write the parked denies into the spool around its pending contents."""
        if self.spool is None or not any(self._parked.values()):
            return
        n = sum(b.count for bs in self._parked.values() for b in bs)
        older = self._parked[ParkRank.WRITER] + self._parked[ParkRank.NORMALISER]
        try:
            self.spool.rewrite(older, self._parked[ParkRank.READER])
        except OSError as exc:
            log(f"stopped with {n} denies in hand and the spool failed ({exc}): counted lost")
            self.acct["deny"].drop("shutdown", "spool_error", n)
        else:
            log(f"stopped with {n} denies in hand: kept in {self.spool.path} for the next run")
        self._parked = {r: [] for r in ParkRank}

    def reconcile_stop(self) -> None:
        """Every stage has ended: whatever was read and is neither delivered, nor counted
        dropped, nor (denies) kept in the spool is lost now -- count it, so that
        ``read = delivered + dropped (+ denies pending in the spool)`` holds exactly after
        a stop.  The stages count what they hold when cancelled; this is the backstop
        for any path that did not (logged: it means a stage lost track of a batch)."""
        reason = self.shutdown_reason.value
        for k in CLASSES:
            kept = self.spool.pending_events if (k == "deny" and self.spool is not None) else 0
            lost = self.in_flight(k) - kept
            if lost > 0:
                self.acct[k].drop("shutdown", reason, lost)
                if k == "deny" or self.shutdown_reason is ShutdownReason.STOPPED:
                    log(f"{k}: {lost} events in hand at the stop were not accounted by a "
                        f"stage; counted shutdown/{reason}")
