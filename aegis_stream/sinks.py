"""Sinks: where normalised events go.  One small interface; JSON lines to a file or stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Protocol

import msgspec

_enc = msgspec.json.Encoder()


class Sink(Protocol):
    name: str

    def write(self, events: list[msgspec.Struct]) -> None: ...
    def close(self) -> None: ...


class JsonLinesSink:
    """JSON lines to a file (appended, flushed per batch) or stdout ("-")."""

    def __init__(self, target: str = "-") -> None:
        self.name = f"jsonl:{target}"
        self._own = target != "-"
        self._fh: IO[bytes] = open(Path(target), "ab") if self._own else sys.stdout.buffer
        self.written = 0

    def write(self, events: list[msgspec.Struct]) -> None:
        if not events:
            return
        buf = bytearray()
        for e in events:
            buf += _enc.encode(e)
            buf += b"\n"
        self._fh.write(buf)
        self._fh.flush()
        self.written += len(events)

    def close(self) -> None:
        if self._own:
            self._fh.close()
