"""Length-framed messages over a local socket pair: the one framing helper of the agent's
child processes (the audit encoder workers, pipeline/workers.py; the Kafka producer
process, fleet/producer.py) and of the broker's readiness probe (fleet/broker.py).

Deliberately import-light (no trio, no pipeline), so a child process that imports it
starts fast."""

from __future__ import annotations

import socket

#: socket buffer each way: a whole 4096-record batch (and its JSON) in flight
SOCKET_BUFFER = 4 << 20


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a blocking socket; EOFError when it ends first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError
        got += k
    return bytes(buf)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX stream pair with :data:`SOCKET_BUFFER` each way."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sk in (parent, child):
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return parent, child
