"""Sinks: where encoded events go.

One small async interface, :class:`Sink`: ``await write(batch)`` takes a
:class:`SinkBatch` (JSON lines already encoded once by the pipeline, with their class
and count) and either stores all of it or raises; ``await aclose()``; ``statistics()``
returns a frozen record.  A Kafka sink plugs in the same way later (split
``batch.lines`` on ``\\n`` for one message per event; ``batch.klass`` picks the topic).

Failures: the pipeline, not the sink, decides what a failure means (denies are retried
until written, audit batches are dropped and counted) -- see docs/EVENTS.md.  The file
and stdout sinks write synchronously from the trio thread: a batch is a few hundred KiB
at most, and an event-loop stall of that write is cheaper than a thread hop per batch
(measured in docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from aegis_stream.errors import AegisError


class SinkError(AegisError):
    """A sink could not store a batch; the pipeline decides what that means (denies retried, audits
    dropped)."""


@dataclass(frozen=True)
class SinkBatch:
    """One write to a sink: ``count`` events of one class, already encoded as JSON lines.  For denies
    ``raw`` keeps the kernel records, so a batch that cannot be written before shutdown is spooled to
    disk instead of lost."""
    klass: str  # deny | audit | state | slo | explanation
    lines: bytes  # JSON lines, each ending in "\n"
    count: int
    raw: Any = None  # (denies) the raw records, so a forced shutdown can spool them


@dataclass(frozen=True)
class SinkStatistics:
    """One sink's running totals (``aegis_sink_*`` metrics): batches, events and bytes written, and the
    failed write calls with the events in them."""
    name: str
    batches: int
    events: int
    bytes: int
    failures: int  # write calls that raised
    failed_events: int  # events in those calls
    rotations: int = 0


class Sink(Protocol):
    """Where encoded events go (stdout, a JSON-lines file, Kafka).  ``write`` stores the whole batch or
    raises; it never keeps part of one silently, because the pipeline counts a batch as delivered only
    when ``write`` returns.  Retry and drop policy is the pipeline's, not the sink's."""
    name: str

    async def write(self, batch: SinkBatch) -> None: ...
    async def aclose(self) -> None: ...
    def statistics(self) -> SinkStatistics: ...


class _Counting:
    name: str

    def __init__(self) -> None:
        self.batches = self.events = self.bytes = self.failures = self.failed_events = 0
        self.rotations = 0

    def _ok(self, batch: SinkBatch) -> None:
        self.batches += 1
        self.events += batch.count
        self.bytes += len(batch.lines)

    def _failed(self, batch: SinkBatch) -> None:
        self.failures += 1
        self.failed_events += batch.count

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(self.name, self.batches, self.events, self.bytes, self.failures,
                              self.failed_events, self.rotations)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class JsonLinesFileSink(_Counting):
    """JSON lines appended to a file, rotated by size: ``path`` -> ``path.1`` -> ... ->
    ``path.<backups>`` (the oldest is deleted).  A batch never straddles two files."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 256 << 20, backups: int = 5,
                 fsync: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self.rotations += 1
        self._open()

    def files(self) -> list[Path]:
        """The live file and its backups, newest first."""
        out = [self.path]
        out += [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, self.backups + 1)]
        return [p for p in out if p.exists()]

    async def write(self, batch: SinkBatch) -> None:
        if not batch.count:
            return
        try:
            if self._fd < 0:
                self._open()
            if self._size and self._size + len(batch.lines) > self.max_bytes:
                self._rotate()
            _write_all(self._fd, batch.lines)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._failed(batch)
            raise SinkError(f"{self.name}: {exc.strerror or exc}") from exc
        self._size += len(batch.lines)
        self._ok(batch)

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StdoutSink(_Counting):
    """JSON lines on stdout (or any fd)."""

    def __init__(self, fd: int | None = None) -> None:
        super().__init__()
        self.fd = sys.stdout.fileno() if fd is None else fd
        self.name = "stdout" if fd is None else f"fd:{fd}"

    async def write(self, batch: SinkBatch) -> None:
        if not batch.count:
            return
        try:
            _write_all(self.fd, batch.lines)
        except OSError as exc:
            self._failed(batch)
            raise SinkError(f"{self.name}: {exc.strerror or exc}") from exc
        self._ok(batch)

    async def aclose(self) -> None:
        pass


class MemorySink(_Counting):
    """Keeps every line (tests, the bench).  ``fail_next`` makes the next N writes raise;
    ``delay`` makes each write take that long (a slow downstream)."""

    def __init__(self, name: str = "memory", *, keep: bool = True, delay: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.keep = keep
        self.delay = delay
        self.fail_next = 0
        self.lines: list[bytes] = []
        self.by_class: dict[str, int] = {}

    async def write(self, batch: SinkBatch) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail_next > 0:
            self.fail_next -= 1
            self._failed(batch)
            raise SinkError(f"{self.name}: injected failure")
        if self.keep:
            self.lines.extend(batch.lines.splitlines())
        self.by_class[batch.klass] = self.by_class.get(batch.klass, 0) + batch.count
        self._ok(batch)

    async def aclose(self) -> None:
        pass


def open_sink(target: str, *, max_bytes: int = 256 << 20, backups: int = 5) -> Sink:
    """``-`` = stdout, anything else = a rotated JSON-lines file."""
    if target == "-":
        return StdoutSink()
    return JsonLinesFileSink(target, max_bytes=max_bytes, backups=backups)
