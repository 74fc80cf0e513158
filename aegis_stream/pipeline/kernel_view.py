"""What the ticker reads from the kernel side: counters, hook attachment, policy state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.counters import CounterSnapshot, MapCounterSource


class KernelView(Protocol):
    """What the ticker reads from the kernel side (real maps or the fake kernel)."""

    def counters(self) -> CounterSnapshot: ...
    def attach_state(self) -> Mapping[str, bool]: ...
    def policy_state(self) -> tuple[str, int]: ...  # (enforce|audit|none, generation)


class MapsKernelView:
    """KernelView over map handles: pinned maps or a FakeKernel's."""

    def __init__(self, maps: Mapping[str, Any], policy_maps: Any,
                 attach_state: Callable[[], Mapping[str, bool]], ncpu: int | None = None) -> None:
        self._counters = MapCounterSource(maps, ncpu)
        self.policy_maps = policy_maps
        self._attach = attach_state

    def counters(self) -> CounterSnapshot:
        return self._counters.read()

    def attach_state(self) -> Mapping[str, bool]:
        return self._attach()

    def policy_state(self) -> tuple[str, int]:
        st = slots.read_state(self.policy_maps).active
        if not st.valid:
            return abi.MODE_NONE, 0
        return abi.Mode(st.mode).label, st.generation
