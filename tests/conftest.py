"""Fixtures shared by the unit tests: a policy store, the fake kernel, and a pipeline
factory over them (the pipeline tests, the degraded-mode tests and the metrics tests
all build the same pipeline against the same fake kernel)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aegis_stream.pipeline import KernelView, Pipeline, PipelineConfig
from aegis_stream.pipeline.schema import StateEvent
from aegis_stream.pipeline.sinks import Sink
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import FakeKernel, fixed_normaliser


@pytest.fixture
def store(tmp_path: Path) -> PolicyStore:
    """An empty policy store under the test's tmp_path."""
    return PolicyStore(tmp_path / "state")


@pytest.fixture
def ring_sizes() -> tuple[int, int]:
    """The (deny, audit) ring sizes of the ``kernel`` fixture in bytes.  A module that
    needs other sizes (a ring that overflows at a known count, or one that never does)
    overrides this fixture."""
    return 1 << 16, 1 << 16


@pytest.fixture
def kernel(ring_sizes: tuple[int, int]) -> Iterator[FakeKernel]:
    """A fake kernel with rings of ``ring_sizes``, closed after the test."""
    deny, audit = ring_sizes
    k = FakeKernel(deny_ring_size=deny, audit_ring_size=audit)
    yield k
    k.close()


def new_pipeline(kernel: FakeKernel, store: PolicyStore, sinks: list[Sink], tmp_path: Path, *,
                 view: KernelView | None = None, on_state: Callable[[StateEvent], None] | None = None,
                 wall_clock: Callable[[], float] = time.time, **cfg: Any) -> Pipeline:
    """A Pipeline over the fake kernel's rings and a fixed normaliser of ``store``; the
    deny spool under ``tmp_path`` and a 0.5 s tick unless ``cfg`` says otherwise."""
    cfg.setdefault("spool_dir", str(tmp_path / "spool"))
    cfg.setdefault("tick_s", 0.5)
    return Pipeline(kernel.consumers(), fixed_normaliser(store), sinks,
                    kernel.view() if view is None else view,
                    config=PipelineConfig(**cfg), on_state=on_state, wall_clock=wall_clock)


@pytest.fixture
def make_pipeline() -> Callable[..., Pipeline]:
    """``new_pipeline`` as a fixture: ``make_pipeline(kernel, store, sinks, tmp_path, **cfg)``."""
    return new_pipeline
