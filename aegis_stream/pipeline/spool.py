"""The deny spool: a bounded on-disk FIFO of raw deny batches.

When the deny raw channel is full the reader spills batches here (a deny is never
dropped in userspace), the feeder (``readers``) replays them in order, and at a stop the
batches the stages still hold are written around the pending ones in stream order.  A
file left by a previous run is replayed first."""

from __future__ import annotations

import os
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from aegis_stream.kernel.events import RECORD_STRIDE
from aegis_stream.kernel.ringbuf import RawBatch
from aegis_stream.pipeline.config import log

_FRAME = struct.Struct("<II")  # record count, byte length


@dataclass(frozen=True)
class SpoolStatistics:
    """A snapshot of a :class:`DiskSpool` (``Pipeline.statistics().spool``)."""

    enabled: bool
    path: str
    pending_batches: int
    pending_events: int
    file_bytes: int
    max_bytes: int
    spooled_events: int
    replayed_events: int
    recovered_events: int  # found on disk at start (a previous run's)
    full: int  # times a batch did not fit

    @classmethod
    def disabled(cls) -> SpoolStatistics:
        """The statistics of a pipeline without a spool."""
        return cls(False, "", 0, 0, 0, 0, 0, 0, 0, 0)


class DiskSpool:
    """A bounded FIFO of raw deny batches in one append-only file.

    Frames are ``<u32 count><u32 length><records>``; the file is truncated whenever it
    has been fully replayed.  A file left by a previous run is replayed first (a torn
    last frame is cut off)."""

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, name: str = "deny") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.spool"
        self.max_bytes = max_bytes
        self._fh = open(self.path, "a+b")  # noqa: SIM115 - held for the spool's life
        self._frames: deque[tuple[int, int, int]] = deque()  # (offset, count, length)
        self.spooled = self.replayed = self.recovered = self.full = 0
        self._recover()

    def _recover(self) -> None:
        self._fh.seek(0)
        data = self._fh.read()
        off = 0
        while off + _FRAME.size <= len(data):
            count, length = _FRAME.unpack_from(data, off)
            if length != count * RECORD_STRIDE or off + _FRAME.size + length > len(data):
                break
            self._frames.append((off + _FRAME.size, count, length))
            self.recovered += count
            off += _FRAME.size + length
        if off != len(data):
            self._fh.truncate(off)
        self._end = off

    @property
    def pending_batches(self) -> int:
        return len(self._frames)

    @property
    def pending_events(self) -> int:
        return sum(c for _, c, _ in self._frames)

    def append(self, batch: RawBatch, *, force: bool = False) -> bool:
        size = _FRAME.size + len(batch.data)
        if self._end + size > self.max_bytes and not force:
            self.full += 1
            return False
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(_FRAME.pack(batch.count, len(batch.data)) + batch.data)
        self._fh.flush()
        self._frames.append((self._end + _FRAME.size, batch.count, len(batch.data)))
        self._end += size
        self.spooled += batch.count
        return True

    def peek(self) -> RawBatch:
        off, count, length = self._frames[0]
        self._fh.seek(off)
        return RawBatch(self._fh.read(length), count)

    def pop(self) -> None:
        _, count, _ = self._frames.popleft()
        self.replayed += count
        if not self._frames:
            self._fh.truncate(0)
            self._end = 0

    def rewrite(self, before: list[RawBatch], after: list[RawBatch]) -> None:
        """Atomically: ``before`` + what is pending + ``after`` (stream order at a stop)."""
        pending = []
        for off, count, length in self._frames:
            self._fh.seek(off)
            pending.append(RawBatch(self._fh.read(length), count))
        batches = before + pending + after
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for b in batches:
                fh.write(_FRAME.pack(b.count, len(b.data)) + b.data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fh.close()
        self._fh = open(self.path, "a+b")  # noqa: SIM115
        self._frames.clear()
        off = 0
        for b in batches:
            self._frames.append((off + _FRAME.size, b.count, len(b.data)))
            off += _FRAME.size + len(b.data)
        self._end = off
        self.spooled += sum(b.count for b in before + after)

    def statistics(self) -> SpoolStatistics:
        return SpoolStatistics(True, str(self.path), self.pending_batches, self.pending_events,
                               self._end, self.max_bytes, self.spooled, self.replayed,
                               self.recovered, self.full)

    def close(self) -> None:
        """Close; frames already replayed are cut off first (otherwise the next run's
        recovery, which reads the file from its start, would replay them again)."""
        if self._frames and self._frames[0][0] != _FRAME.size:
            try:
                self.rewrite([], [])
            except OSError as exc:
                log(f"deny spool not compacted ({exc}): the next run replays some denies twice")
        self._fh.close()
