"""systemd notify (aegis_stream.agent.sdnotify) and the agent's use of it: READY=1 once
the pipeline runs, STATUS= lines, WATCHDOG=1 from the ticker, none once it stalls.

The "systemd" here is a real AF_UNIX datagram socket bound in the test's tmp dir and
named by $NOTIFY_SOCKET, as systemd does for a Type=notify unit."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from aegis_stream.agent import run as agent
from aegis_stream.agent.sdnotify import Notifier
from aegis_stream.pipeline.sinks import MemorySink, SinkBatch
from aegis_stream.testing import FakeKernel
from tests.unit._agent_fake import use_fake_kernel


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: every datagram, with trio's clock at arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[tuple[float, list[str]]] = []

    async def bind(self) -> None:
        await self.sock.bind(str(self.path))

    async def serve(self) -> None:
        while True:
            data = await self.sock.recv(4096)
            self.messages.append((trio.current_time(), data.decode().split("\n")))

    def close(self) -> None:
        self.sock.close()

    def times(self, line: str) -> list[float]:
        return [t for t, lines in self.messages if line in lines]

    def status_lines(self) -> list[str]:
        return [x[len("STATUS="):] for _, lines in self.messages for x in lines if x.startswith("STATUS=")]


def test_notifier_protocol_path_and_abstract(tmp_path):
    for address in (str(tmp_path / "notify"), f"@aegis-test-{os.getpid()}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
            rx.bind(address if not address.startswith("@") else "\0" + address[1:])
            n = Notifier.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000",
                                   "WATCHDOG_PID": str(os.getpid())})
            assert n.enabled and n.watchdog_s == 4.0
            assert not n.watchdog()  # not before READY=1
            assert n.ready("enforcing")
            assert rx.recv(100) == b"READY=1\nSTATUS=enforcing"
            assert n.watchdog() and rx.recv(100) == b"WATCHDOG=1"
            assert not n.watchdog()  # within a quarter interval: not sent again
            n.close()


def test_notifier_disabled_and_failures_counted(tmp_path):
    assert not Notifier.from_env({}).ready()  # no NOTIFY_SOCKET: a no-op
    other_pid = Notifier.from_env({"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_s is None  # the watchdog is meant for another process
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert not gone.ready() and gone.failed == 1 and "No such file" in gone.last_error
    gone.close()


def test_from_env_clears_the_variables_for_children(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "1000")
    n = Notifier.from_env()
    assert n.address == "/run/systemd/notify" and "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ


class StallableSink(MemorySink):
    """A sink whose state-record writes hang once ``stall`` is set (the ticker writes
    state records itself: it stops there, as behind any hung downstream)."""

    def __init__(self) -> None:
        super().__init__("stallable")
        self.stall = False

    async def write(self, batch: SinkBatch) -> None:
        if self.stall and batch.klass == "state":
            await trio.sleep_forever()
        await super().write(batch)


@pytest.fixture
def fake_agent(monkeypatch, tmp_path):
    k = FakeKernel(deny_ring_size=1 << 14, audit_ring_size=1 << 14)
    handle = use_fake_kernel(monkeypatch, k, str(tmp_path / "state"))
    sink = StallableSink()
    monkeypatch.setattr(agent, "open_sink", lambda *a, **kw: sink)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pets every >= 0.1 s, one per 0.2 s tick
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield handle, sink
    k.close()


async def test_agent_ready_status_and_watchdog_until_the_ticker_stalls(fake_agent, tmp_path):
    handle, sink = fake_agent
    systemd = FakeSystemd(tmp_path / "notify")
    await systemd.bind()
    cfg = agent.AgentConfig(events="unused", tick_s=0.2, spool_dir=str(tmp_path / "spool"))
    async with trio.open_nursery() as n:
        n.start_soon(systemd.serve)
        n.start_soon(agent.run_agent, cfg)
        await trio.sleep(2.0)
        ready = systemd.times("READY=1")
        pets = systemd.times("WATCHDOG=1")
        assert len(ready) == 1, systemd.messages
        assert len(pets) >= 5, systemd.messages  # ~ one per 0.2 s tick over 2 s
        assert all(b - a < 0.5 for a, b in zip(pets, pets[1:], strict=False))  # periodic
        assert min(pets) >= ready[0]  # petting starts once it is ready
        # the ticker now hangs on its next state record (a hook goes away: a transition)
        sink.stall = True
        handle.report.programs["mmap_file"].phase = "failed"
        await trio.sleep(0.6)  # the tick in flight finishes
        before = len(systemd.times("WATCHDOG=1"))
        await trio.sleep(2.0)  # five ticks' worth: no pet
        assert len(systemd.times("WATCHDOG=1")) == before, systemd.messages
        n.cancel_scope.cancel()
    systemd.close()
    statuses = systemd.status_lines()
    assert statuses and statuses[0].startswith("enforcing"), statuses
    assert any(s.startswith("degraded") and "mmap_file" in s for s in statuses), statuses


async def test_agent_stops_with_stopping_1_on_sigterm_path(fake_agent, tmp_path):
    """exit_after takes the same stop path as SIGTERM: STOPPING=1 before the drain."""
    systemd = FakeSystemd(tmp_path / "notify")
    await systemd.bind()
    cfg = agent.AgentConfig(events="unused", tick_s=0.2, spool_dir=str(tmp_path / "spool"), exit_after=1.0)
    async with trio.open_nursery() as n:
        n.start_soon(systemd.serve)
        assert await agent.run_agent(cfg) == 0
        await trio.sleep(0.1)
        n.cancel_scope.cancel()
    systemd.close()
    kinds = [lines[0] for _, lines in systemd.messages]
    assert kinds.count("READY=1") == 1 and "STOPPING=1" in kinds[kinds.index("READY=1"):]
    assert "WATCHDOG=1" not in kinds[kinds.index("STOPPING=1"):]


async def test_a_refused_start_says_why_in_status_and_never_ready(monkeypatch, tmp_path):
    monkeypatch.setenv("AEGIS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    systemd = FakeSystemd(tmp_path / "notify")
    await systemd.bind()
    async with trio.open_nursery() as n:
        n.start_soon(systemd.serve)
        cfg = agent.AgentConfig(policy=str(tmp_path / "missing.toml"), events=os.devnull)
        assert await agent.run_agent(cfg) == agent.EXIT_REFUSED
        await trio.sleep(0.1)
        n.cancel_scope.cancel()
    systemd.close()
    [(_, lines)] = systemd.messages  # one message, no READY=1
    assert len(lines) == 1 and lines[0].startswith(f"STATUS=refused: policy unreadable: {tmp_path}/missing.toml")
