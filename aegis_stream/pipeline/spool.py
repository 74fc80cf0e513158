"""Bounded on-disk FIFOs of batches: the pipeline's deny spool, and the frame file the
Kafka sink's spool shares with it.

:class:`FrameSpool` is the file: append-only frames, a torn or corrupt tail cut off on
open (a previous run's frames are replayed first), pending counts, pop (the file is
truncated once fully replayed), an atomic rewrite, and at close the compaction that cuts
off replayed frames.  The frame's header and how a frame found on disk is checked are
the subclass's: :class:`DiskSpool` holds raw deny batches (``<u32 count><u32 length>``,
length checked against the record stride); the Kafka sink's ``LineSpool``
(:mod:`aegis_stream.fleet.sink`) holds encoded JSON lines with their class and a CRC.

The deny spool: when the deny raw channel is full the reader spills batches here (a deny
is never dropped in userspace), the feeder (``readers``) replays them in order, and at a
stop the batches the stages still hold are written around the pending ones in stream
order."""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Iterable
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


@dataclass(frozen=True)
class Frame:
    """One frame found in or written to a spool file: ``tag`` is the subclass's (the
    Kafka spool's event class code; 0 for raw denies), ``body`` its bytes."""

    tag: int
    count: int
    body: bytes


class FrameSpool:
    """A bounded FIFO of frames in one append-only file (see the module docstring).

    Subclasses set ``HEADER`` (a :class:`struct.Struct`) and implement :meth:`_pack` and
    :meth:`_unpack`.  Thread-safe: every method takes the lock (the Kafka sink's poll
    thread pops while its trio side appends); reads use ``pread``, appends ``O_APPEND``."""

    HEADER: struct.Struct

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, name: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.spool"
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd = self._open()
        self._frames: deque[tuple[int, int, int, int]] = deque()  # (body offset, tag, count, length)
        self._end = 0
        self.spooled = self.replayed = self.recovered = self.full = 0
        self._recover()

    # ------------------------------------------------------------------ the frame format
    def _pack(self, frame: Frame) -> bytes:
        """The header of ``frame``."""
        raise NotImplementedError

    def _unpack(self, header: bytes, data: bytes, body_at: int) -> tuple[int, int, int] | None:
        """(tag, count, length) of the frame whose header is ``header`` and whose body
        starts at ``data[body_at:]``; None when it is torn or corrupt (recovery stops)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the file
    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _recover(self) -> None:
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        off = 0
        hs = self.HEADER.size
        while off + hs <= len(data):
            got = self._unpack(data[off:off + hs], data, off + hs)
            if got is None:
                break
            tag, count, length = got
            self._frames.append((off + hs, tag, count, length))
            self.recovered += count
            off += hs + length
        if off != len(data):
            os.ftruncate(self._fd, off)
        self._end = off

    @property
    def pending_batches(self) -> int:
        return len(self._frames)

    @property
    def pending_events(self) -> int:
        with self._lock:
            return sum(f[2] for f in self._frames)

    def _append(self, frame: Frame, force: bool = False) -> bool:
        """False (and ``full`` counted) when the frame does not fit (``force``: it goes in
        all the same)."""
        size = self.HEADER.size + len(frame.body)
        with self._lock:
            if self._end + size > self.max_bytes and not force:
                self.full += 1
                return False
            view = memoryview(self._pack(frame) + frame.body)
            while view:
                view = view[os.write(self._fd, view):]
            self._frames.append((self._end + self.HEADER.size, frame.tag, frame.count, len(frame.body)))
            self._end += size
            self.spooled += frame.count
            return True

    def _peek(self, max_frames: int = 1, max_bytes: int = 1 << 62) -> list[Frame]:
        """The oldest frames (at least one if any), up to either limit, not removed."""
        out: list[Frame] = []
        size = 0
        with self._lock:
            for off, tag, count, length in self._frames:
                if out and (len(out) >= max_frames or size + length > max_bytes):
                    break
                out.append(Frame(tag, count, os.pread(self._fd, length, off)))
                size += length
        return out

    def pop(self) -> None:
        """The oldest frame was replayed: drop it (the file is emptied with the last)."""
        with self._lock:
            _, _, count, _ = self._frames.popleft()
            self.replayed += count
            if not self._frames:
                os.ftruncate(self._fd, 0)
                self._end = 0

    def _rewrite(self, before: Iterable[Frame], after: Iterable[Frame]) -> int:
        """Atomically (a temp file, fsync, rename): ``before`` + what is pending +
        ``after``.  Returns the events added (``before`` and ``after``)."""
        with self._lock:
            pending = [Frame(tag, count, os.pread(self._fd, length, off))
                       for off, tag, count, length in self._frames]
            before, after = list(before), list(after)
            frames = before + pending + after
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as fh:
                for f in frames:
                    fh.write(self._pack(f) + f.body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            os.close(self._fd)
            self._fd = self._open()
            self._frames.clear()
            off = 0
            for f in frames:
                self._frames.append((off + self.HEADER.size, f.tag, f.count, len(f.body)))
                off += self.HEADER.size + len(f.body)
            self._end = off
            added = sum(f.count for f in before + after)
            self.spooled += added
            return added

    def statistics(self) -> SpoolStatistics:
        with self._lock:
            pending = sum(f[2] for f in self._frames)
            return SpoolStatistics(True, str(self.path), len(self._frames), pending, self._end,
                                   self.max_bytes, self.spooled, self.replayed, self.recovered,
                                   self.full)

    def close(self) -> None:
        """Close; frames already replayed are cut off first (otherwise the next run's
        recovery, which reads the file from its start, would replay them again).  A
        spool whose frames were only read rewrites nothing."""
        if self._fd < 0:
            return
        if self._frames and self._frames[0][0] != self.HEADER.size:
            try:
                self._rewrite([], [])
            except OSError as exc:
                log(f"{self.path} not compacted ({exc}): the next run replays some batches twice")
        with self._lock:
            os.close(self._fd)
            self._fd = -1


class DiskSpool(FrameSpool):
    """A bounded FIFO of raw deny batches in one append-only file.

    Frames are ``<u32 count><u32 length><records>`` (a frame whose length is not
    ``count`` records is torn: recovery stops there)."""

    HEADER = _FRAME

    def __init__(self, directory: str | os.PathLike[str], max_bytes: int, name: str = "deny") -> None:
        super().__init__(directory, max_bytes, name)

    def _pack(self, frame: Frame) -> bytes:
        return _FRAME.pack(frame.count, len(frame.body))

    def _unpack(self, header: bytes, data: bytes, body_at: int) -> tuple[int, int, int] | None:
        count, length = _FRAME.unpack(header)
        if length != count * RECORD_STRIDE or body_at + length > len(data):
            return None
        return 0, count, length

    def append(self, batch: RawBatch, *, force: bool = False) -> bool:
        return self._append(Frame(0, batch.count, batch.data), force)

    def peek(self) -> RawBatch:
        f = self._peek()[0]
        return RawBatch(f.body, f.count)

    def rewrite(self, before: list[RawBatch], after: list[RawBatch]) -> None:
        """Atomically: ``before`` + what is pending + ``after`` (stream order at a stop)."""
        self._rewrite((Frame(0, b.count, b.data) for b in before),
                      (Frame(0, b.count, b.data) for b in after))
