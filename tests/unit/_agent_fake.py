"""``run_agent`` on the fake kernel: a stand-in for the loader's BpfObject over a
:class:`~aegis_stream.testing.FakeKernel`, so the whole agent (start, status file,
pipeline, signals, systemd notify, sinks) runs in a unit test without BPF.

Only the loader is replaced: rings are the fake kernel's (the real RingBuffer reader over
its memfd), maps and policy slots are its fakes, everything else is the agent's code."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from aegis_stream.agent import run as agent
from aegis_stream.kernel import abi
from aegis_stream.kernel.loader import AttachReport, ProgramStatus
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import FakeKernel, install, sample_record

_CLASS_OF = {abi.MAP_DENY_EVENTS: "deny", abi.MAP_AUDIT_EVENTS: "audit"}


class _NoPathWatch:
    """The path watcher's stand-in: the sample generation names host paths (/etc/shadow,
    /usr/bin/nc) with made-up inodes and no stored source, which the real watcher would
    rightly report as moved and unrestageable.  tests/unit/test_path_watch.py runs the
    real one in the agent over real files."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        pass

    def conditions(self) -> dict:
        return {}

    def trigger(self, why: str = "") -> None:
        pass

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


def use_fake_kernel(monkeypatch: pytest.MonkeyPatch, kernel: FakeKernel, state_dir: str, *,
                    generation: int | None = 7, path_watch: bool = False) -> SimpleNamespace:
    """Point ``run_agent`` at ``kernel`` (state under ``state_dir``); ``generation``:
    a sample enforce-mode generation already active in the kernel, as after a restart.
    ``path_watch``: run the real path watcher (off: the sample world's paths are made up).
    Returns a handle whose ``report`` is the agent's AttachReport once it attached (a
    test sets a program's ``phase`` to ``failed`` to take its hook away)."""
    handle = SimpleNamespace(report=None)
    if not path_watch:
        monkeypatch.setattr(agent, "PathWatcher", _NoPathWatch)
    monkeypatch.setenv("AEGIS_STATE_DIR", state_dir)
    monkeypatch.setenv("AEGIS_PIN_ROOT", f"{state_dir}/pins")
    if generation is not None:
        install(kernel, PolicyStore(state_dir), sample_record(generation, mode="enforce"))
    consumers = kernel.consumers()

    class FakeBpfObject:
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.pin_root = f"{state_dir}/pins"

        def open(self) -> None:
            pass

        def reuse_pinned_maps(self) -> list[str]:
            return []

        def load(self) -> None:
            pass

        def attach_all(self, *, pin: bool = True) -> AttachReport:
            handle.report = AttachReport({h: ProgramStatus(name=h, hook=h, phase="attached"
                                                         if h in kernel.attached else "failed")
                                        for h in kernel.EXPECTED_HOOKS})
            return handle.report

        def maps(self) -> dict[str, Any]:
            out: dict[str, Any] = dict(kernel.maps())
            for name, klass in _CLASS_OF.items():
                ring = kernel.rings[klass]
                out[name] = SimpleNamespace(fd=ring.fd, max_entries=ring.size)
            return out

        def policy_maps(self) -> Any:
            return kernel.policy_maps

        def close(self, *, keep_pins: bool = True) -> None:
            pass

    monkeypatch.setattr(agent, "BpfObject", FakeBpfObject)
    # the fake ring's consumer polls its eventfd (a memfd is always readable)
    monkeypatch.setattr(agent, "RingBuffer", lambda fd, size, name: consumers[_CLASS_OF[name]])
    monkeypatch.setattr(agent.libbpf, "num_possible_cpus", lambda: kernel.ncpu)
    return handle
