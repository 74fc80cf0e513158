"""Forked audit encoder workers: raw audit batches in, JSON lines out.

Each worker is a forked copy of the agent (it inherits the normaliser and its caches)
at the other end of a Unix socket pair; it runs no trio.  Requests are
``<u64 length><u32 stride><records>``, results ``<u64 length><u32 encoded><u32 abi
mismatches><u32 failed><lines>``, one result per request in request order, so the
dispatcher and the collector (``normalising``) keep the ring order.  A worker that dies
is marked lost and its batches are encoded in the agent (nothing lost)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct

import trio

from aegis_stream.framing import recv_exact, socket_pair
from aegis_stream.kernel.ringbuf import RawBatch
from aegis_stream.pipeline.config import log
from aegis_stream.pipeline.decoding import encode_audit_batch
from aegis_stream.pipeline.normalise import Normaliser

_REQ = struct.Struct("<QI")  # request: data length, stride; then the raw records
_RES = struct.Struct("<QIII")  # result: lines length, encoded, abi mismatches, failed

#: what a result is: (JSON lines, encoded, abi mismatches, normalise failures)
EncodedBatch = tuple[bytes, int, int, int]



def _worker_log(msg: str) -> None:
    log(f"audit worker {os.getpid()}: {msg}")


def worker_main(sock: socket.socket, norm: Normaliser, cpus: frozenset[int] | None) -> None:
    """A forked audit worker: raw batches in, JSON lines out, until EOF.  No trio here."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent drains; EOF ends the worker
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    while True:
        try:
            length, stride = _REQ.unpack(recv_exact(sock, _REQ.size))
            data = recv_exact(sock, length)
        except (EOFError, OSError):
            return
        lines, n_ok, bad, failed = encode_audit_batch(norm, data, stride, _worker_log)
        try:
            sock.sendall(_RES.pack(len(lines), n_ok, bad, failed) + lines)
        except OSError:
            return


class AuditWorker:
    """One forked audit worker and the parent's (trio) end of its socket."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.dead = False
        self._buf = bytearray()

    @classmethod
    def fork(cls, norm: Normaliser, cpus: frozenset[int] | None) -> AuditWorker:
        """Fork a worker that encodes with ``norm``, pinned to ``cpus`` (None: inherit)."""
        parent, child = socket_pair()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                parent.close()
                worker_main(child, norm, cpus)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        child.close()
        return cls(pid, parent)

    async def submit(self, batch: RawBatch) -> None:
        """Send a raw batch (raises trio.BrokenResourceError/OSError when the worker is gone)."""
        await self.stream.send_all(_REQ.pack(len(batch.data), batch.stride) + batch.data)

    async def _exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            chunk = await self.stream.receive_some(max(n - len(buf), 1 << 16))
            if not chunk:
                raise EOFError
            buf += chunk
        out = bytes(buf[:n])
        del buf[:n]
        return out

    async def result(self) -> EncodedBatch:
        """The result of the oldest batch submitted (EOFError when the worker died)."""
        length, n_ok, bad, failed = _RES.unpack(await self._exact(_RES.size))
        return await self._exact(length), n_ok, bad, failed

    def lost(self) -> None:
        """The worker is gone: its batches from here on are encoded in the agent."""
        if not self.dead:
            log(f"audit worker {self.pid} lost: its batches are encoded in the agent")
        self.dead = True

    def close(self) -> None:
        """Close the socket (EOF ends the worker), terminate and reap it."""
        self.dead = True
        with contextlib.suppress(OSError):
            self.stream.socket.close()
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            os.waitpid(self.pid, 0)
