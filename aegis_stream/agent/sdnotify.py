"""systemd's notify protocol (sd_notify(3)), the few lines the agent needs.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket) and, with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``,
the process meant).  Each message is one ``AF_UNIX`` datagram of ``KEY=VALUE`` lines:

* ``READY=1`` once the agent enforces or audits after attach (start-up is over),
* ``STATUS=...`` the state line ``systemctl status`` shows,
* ``WATCHDOG=1`` from the pipeline's ticker: a ticker that stops ticking, or whose
  consumer is stalled, stops petting and systemd restarts the agent,
* ``STOPPING=1`` when a stop begins.

Written here rather than taken from PyPI: ``systemd-python`` needs libsystemd headers and
a compiler on the target, the pure-Python ``sdnotify`` package has had no release since
2017 and ignores ``WATCHDOG_PID``; the protocol is one ``sendto``.

Without ``$NOTIFY_SOCKET`` (a terminal, a container, the tests) every call is a no-op.
A send that fails (systemd gone, socket full) is counted, never raised: notifying is
never a reason for the agent to stop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

#: the variables systemd sets; cleared from the environment by :meth:`Notifier.from_env`
#: so children (audit workers, the Kafka producer process) cannot notify in our name
ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notify messages to ``address`` (None: disabled).  ``watchdog_s`` is the
    watchdog interval systemd asked for (None: no watchdog); :meth:`watchdog` sends
    at most every quarter of it, so a ticker that ticks faster does not flood the
    socket while a stalled one still misses the deadline by a wide margin."""

    def __init__(self, address: str | None, *, watchdog_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.watchdog_s = watchdog_s
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_pet: float | None = None
        self.is_ready = False
        self.sent = 0
        self.failed = 0
        self.last_error = ""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, *, unset: bool = True) -> Notifier:
        """The notifier systemd configured for this process (see sd_watchdog_enabled(3):
        ``WATCHDOG_PID``, when set, must be our pid).  ``unset`` removes the variables
        from ``os.environ``."""
        env = dict(os.environ if environ is None else environ)
        address = env.get("NOTIFY_SOCKET") or None
        watchdog_s: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                watchdog_s = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                watchdog_s = None
        if unset and environ is None:
            for k in ENV:
                os.environ.pop(k, None)
        return cls(address, watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``lines``; True when it was sent (False: disabled or failed)."""
        if self.address is None:
            return False
        addr = self.address
        if addr.startswith("@"):  # abstract namespace: a leading NUL byte
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never block the trio thread on systemd
            self._sock.sendto("\n".join(lines).encode(), addr)
        except OSError as exc:
            self.failed += 1
            self.last_error = str(exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (and a ``STATUS=`` line): start-up is over."""
        self.is_ready = self.send("READY=1", *([f"STATUS={status}"] if status else [])) or self.is_ready
        return self.is_ready

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` if a watchdog is configured, ``READY=1`` went out (the start's
        own timeout covers the time before), and a quarter interval has passed."""
        if self.address is None or self.watchdog_s is None or not self.is_ready:
            return False
        now = self._clock()
        if self._last_pet is not None and now - self._last_pet < self.watchdog_s / 4:
            return False
        if self.send("WATCHDOG=1"):
            self._last_pet = now
            return True
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
