"""Apply a policy: load -> compile -> record -> stage -> verify -> activate.

All checks that can fail run before the kernel is touched; staging writes only the
inactive slot; activation is one map write.  A failure at any step leaves the
previously active generation enforcing, unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import compiler, model
from aegis_stream.policy.store import GenerationRecord, PolicyStore


@dataclass(frozen=True)
class ApplyResult:
    generation: int
    previous_generation: int
    slot: int
    policy: compiler.CompiledPolicy
    mode: str


def apply_policy(
    maps: PolicyMaps,
    store: PolicyStore,
    policy: model.Policy,
    source: bytes = b"",
    *,
    mode_override: str | None = None,
    signer: str = "",
) -> ApplyResult:
    compiled = compiler.compile_policy(policy)
    mode = mode_override or compiled.mode
    before = slots.read_state(maps)
    generation = max(store.next_generation(), before.active.generation + 1)
    store.record(GenerationRecord(generation, time.time(), compiled, signer), source)
    mode_val = abi.Mode.ENFORCE if mode == "enforce" else abi.Mode.AUDIT
    staged = slots.swap(maps, compiled, generation, int(mode_val))
    return ApplyResult(
        generation,
        before.active.generation if before.active.valid else 0,
        staged.slot,
        compiled,
        mode,
    )
