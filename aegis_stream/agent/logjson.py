"""The agent's own log as JSON lines (``aegis run --log-format json``).

The agent logs one line per message on stderr (``aegis: ...``, from
:func:`aegis_stream.pipeline.config.log` and the agent's own ``_log``).  With JSON
logging, :func:`install` replaces ``sys.stderr`` with a :class:`JsonLogStream` that turns
every complete line into one JSON object, so the stages keep their one-line calls and
anything else written to stderr (a traceback, a warning) becomes JSON too instead of
breaking a log shipper's parser::

    {"time":"2026-12-01T12:00:00.123Z","level":"info","logger":"aegis","pid":42,"message":"state: enforcing"}

``level``: ``error`` for ``aegis: error: ...`` lines and for lines that did not come
through the agent's logger (tracebacks), ``warning`` for ``DEGRADED``/``warning:``
lines, ``info`` otherwise.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

import msgspec

PREFIX = "aegis: "


class LogRecord(msgspec.Struct, frozen=True):
    """One log line of the agent, as written with ``--log-format json``."""

    time: str
    level: str
    logger: str
    pid: int
    message: str


_enc = msgspec.json.Encoder()


def level_of(line: str) -> tuple[str, str]:
    """(level, message) of one stderr line."""
    if not line.startswith(PREFIX):
        return "error", line
    msg = line[len(PREFIX):]
    if msg.startswith("error:"):
        return "error", msg[len("error:"):].lstrip()
    if msg.startswith(("warning:", "DEGRADED")):
        return "warning", msg
    return "info", msg


class JsonLogStream(io.TextIOBase):
    """A text stream that writes each complete line to ``raw`` as one JSON object
    (a :class:`LogRecord`); a partial line waits for its newline."""

    def __init__(self, raw: TextIO, *, clock: Callable[[], float] = time.time) -> None:
        self.raw = raw
        self.clock = clock
        self._buf = ""

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.raw.fileno()

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line:
                self.raw.write(self._record(line))
        return len(s)

    def _record(self, line: str) -> str:
        sec, ms = divmod(round(self.clock() * 1000), 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ms:03d}Z"
        level, msg = level_of(line)
        rec = LogRecord(time=stamp, level=level, logger="aegis", pid=os.getpid(), message=msg)
        return _enc.encode(rec).decode() + "\n"

    def flush(self) -> None:
        self.raw.flush()


def install(fmt: str) -> None:
    """Make ``fmt`` (``text`` or ``json``) the format of everything on stderr."""
    if fmt == "json" and not isinstance(sys.stderr, JsonLogStream):
        sys.stderr = JsonLogStream(sys.stderr)
