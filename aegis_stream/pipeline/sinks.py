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

import concurrent.futures
import glob
import gzip
import os
import shutil
import stat
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
    reopens: int = 0  # reopen() calls (SIGHUP from logrotate)


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
    ``path.<backups>`` (the oldest is deleted).  A batch never straddles two files.

    ``compress``: rotated files are gzipped (``path.1.gz`` ... ``path.<backups>.gz``) in
    one background thread, in rotation order, so a 256 MiB gzip never stalls the event
    loop: the live file is renamed to ``path.rotating-<n>`` at once (cheap, on the trio
    thread), the thread compresses it into ``path.1.gz`` after shifting the older ones.
    A rename left behind by a crash is compressed at the next start.

    ``file_mode``: the mode of a file this sink creates (set with fchmod, so the umask
    does not narrow it).  :meth:`reopen` (the agent's SIGHUP) closes the file and opens
    ``path`` again: after logrotate renamed it, new batches go to a new file; a batch is
    written whole before or after the reopen, never split or repeated."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 256 << 20, backups: int = 5,
                 fsync: bool = False, compress: bool = False, file_mode: int = 0o640) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self.compress = compress
        self.file_mode = file_mode
        self.reopens = 0
        self.compressed = 0  # rotated files gzipped
        self.compress_failures = 0  # gzip attempts that failed (the plain file is kept)
        self._fd = -1
        self._size = 0
        self._seq = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._open()
        if self.compress:  # renames a crash left behind: finish them, oldest first
            left = sorted(self.path.parent.glob(f"{glob.escape(self.path.name)}.rotating-*"),
                          key=lambda p: p.stat().st_mtime)
            for p in left:
                self._submit(p)

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        while True:
            try:  # created here: give it file_mode exactly, whatever the umask
                self._fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, self.file_mode)
                os.fchmod(self._fd, self.file_mode)
                break
            except FileExistsError:
                pass
            try:
                self._fd = os.open(self.path, flags)
                break
            except FileNotFoundError:  # removed between the two opens: create it
                continue
        st = os.fstat(self._fd)
        self._size = st.st_size
        # only a regular file is rotated: renaming `--events /dev/null` (or a FIFO, or a
        # tty) away would replace the device node with a growing regular file
        self._rotatable = stat.S_ISREG(st.st_mode)

    def reopen(self) -> None:
        """Close the file and open ``path`` again (logrotate's ``postrotate`` SIGHUP).
        Synchronous and on the caller's thread, between two writes: no batch is split."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.reopens += 1
        self._open()

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}" + (".gz" if self.compress else ""))

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        if self.compress and self.backups > 0:
            self._seq += 1
            pending = self.path.with_name(f"{self.path.name}.rotating-{os.getpid()}-{self._seq}")
            os.replace(self.path, pending)
            self._submit(pending)
        elif self.backups > 0:
            self._shift()
            os.replace(self.path, self._backup(1))
        else:
            self.path.unlink(missing_ok=True)
        self.rotations += 1
        self._open()

    def _shift(self) -> None:
        """path.(N-1) -> path.N ... path.1 -> path.2 (the oldest falls off)."""
        for i in range(self.backups - 1, 0, -1):
            src = self._backup(i)
            if src.exists():
                os.replace(src, self._backup(i + 1))

    def _submit(self, pending: Path) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aegis-gzip")
        self._pool.submit(self._compress, pending)

    def _compress(self, pending: Path) -> None:
        """(worker thread) gzip ``pending`` into path.1.gz after shifting the older ones.
        A failure keeps the uncompressed rename (nothing is deleted that was not written
        elsewhere) and is counted."""
        tmp = self.path.with_name(f"{self.path.name}.1.gz.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, self.file_mode)
            os.fchmod(fd, self.file_mode)
            with open(fd, "wb") as raw, gzip.GzipFile(filename=self.path.name, mode="wb",
                                                      fileobj=raw, compresslevel=6) as gz, \
                    open(pending, "rb") as src:
                shutil.copyfileobj(src, gz, 1 << 20)
            self._shift()
            os.replace(tmp, self._backup(1))
            pending.unlink()
            self.compressed += 1
        except OSError as exc:
            self.compress_failures += 1
            tmp.unlink(missing_ok=True)
            print(f"aegis: events file {pending} not compressed: {exc}", file=sys.stderr, flush=True)

    def files(self) -> list[Path]:
        """The live file and its backups, newest first."""
        out = [self.path] + [self._backup(i) for i in range(1, self.backups + 1)]
        return [p for p in out if p.exists()]

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(self.name, self.batches, self.events, self.bytes, self.failures,
                              self.failed_events, self.rotations, self.reopens)

    async def write(self, batch: SinkBatch) -> None:
        if not batch.count:
            return
        try:
            if self._fd < 0:
                self._open()
            if self._rotatable and self._size and self._size + len(batch.lines) > self.max_bytes:
                self._rotate()
            _write_all(self._fd, batch.lines)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self._failed(batch)
            raise SinkError(f"{self.name}: {exc.strerror or exc}") from exc
        self._size += len(batch.lines)
        self._ok(batch)

    def wait_compressed(self) -> None:
        """Block until every rotated file queued so far is compressed (tests, shutdown)."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pool is not None:  # finish the queued gzips: a stop must not leave .rotating-*
            pool, self._pool = self._pool, None
            await trio.to_thread.run_sync(pool.shutdown)


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


def open_sink(target: str, *, max_bytes: int = 256 << 20, backups: int = 5, compress: bool = False,
              file_mode: int = 0o640) -> Sink:
    """``-`` = stdout, anything else = a rotated JSON-lines file."""
    if target == "-":
        return StdoutSink()
    return JsonLinesFileSink(target, max_bytes=max_bytes, backups=backups, compress=compress,
                             file_mode=file_mode)
