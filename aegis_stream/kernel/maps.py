"""Map handles: one small interface over a BPF map, with a real (fd) and a fake
(in-memory) implementation, so the policy store and the pipeline run without a kernel."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Protocol

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi, libbpf


class MapHandle(Protocol):
    """The map operations the policy code uses, so one code path serves real BPF maps (:class:`FdMap`)
    and the fake kernel's maps in the unit tests."""
    name: str
    key_size: int
    value_size: int
    max_entries: int

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None: ...
    def lookup(self, key: bytes) -> bytes | None: ...
    def delete(self, key: bytes) -> bool: ...
    def keys(self) -> list[bytes]: ...


class FdMap:
    """A real BPF map, by fd (from a loaded object or a pin)."""

    def __init__(self, name: str, fd: int, *, owns_fd: bool = False) -> None:
        info = libbpf.map_info(fd)
        self.name = name
        self.fd = fd
        self.key_size = info.key_size
        self.value_size = info.value_size
        self.max_entries = info.max_entries
        self.map_type = info.type
        self.map_id = info.id
        self._owns = owns_fd

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        try:
            libbpf.map_update(self.fd, key, value, flags)
        except KernelError as exc:
            raise KernelError(f"map {self.name}: update", err=exc.errno) from None

    def lookup(self, key: bytes) -> bytes | None:
        return libbpf.map_lookup(self.fd, key, self.value_size)

    def lookup_percpu(self, key: bytes, ncpus: int) -> list[bytes] | None:
        stride = (self.value_size + 7) & ~7
        raw = libbpf.map_lookup(self.fd, key, stride * ncpus)
        if raw is None:
            return None
        return [raw[i * stride : i * stride + self.value_size] for i in range(ncpus)]

    def delete(self, key: bytes) -> bool:
        return libbpf.map_delete(self.fd, key)

    def keys(self) -> list[bytes]:
        return libbpf.map_keys(self.fd, self.key_size)

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map: batched lookups (one syscall for the whole map on
        6.1+), else a get_next_key walk with one lookup per key."""
        try:
            return libbpf.map_lookup_batch(self.fd, self.key_size, self.value_size, self.max_entries)
        except KernelError:
            out = []
            for k in self.keys():
                v = self.lookup(k)
                if v is not None:
                    out.append((k, v))
            return out

    def close(self) -> None:
        if self._owns and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FakeMap:
    """In-memory stand-in with the kernel's semantics for HASH/ARRAY maps."""

    def __init__(
        self, name: str, key_size: int, value_size: int, max_entries: int, *, array: bool = False
    ) -> None:
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.array = array
        self.data: dict[bytes, bytes] = {}
        self.fail_update_after: int | None = None  # fault injection for tests
        if array:
            for i in range(max_entries):
                self.data[struct.pack("<I", i)] = bytes(value_size)

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if len(key) != self.key_size or len(value) != self.value_size:
            raise KernelError(f"map {self.name}: update", err=22)
        if self.fail_update_after is not None:
            if self.fail_update_after <= 0:
                raise KernelError(f"map {self.name}: update (injected)", err=12)
            self.fail_update_after -= 1
        if self.array:
            if key not in self.data:
                raise KernelError(f"map {self.name}: update", err=7)  # E2BIG
        elif key not in self.data and len(self.data) >= self.max_entries:
            raise KernelError(f"map {self.name}: update", err=7)
        if flags == libbpf.BPF_NOEXIST and key in self.data and not self.array:
            raise KernelError(f"map {self.name}: update", err=17)
        self.data[key] = value

    def lookup(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: bytes) -> bool:
        if self.array:
            raise KernelError(f"map {self.name}: delete", err=22)
        return self.data.pop(key, None) is not None

    def keys(self) -> list[bytes]:
        return list(self.data)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.data.items())


@dataclass
class PolicyMaps:
    """The maps a policy apply touches."""

    rules: MapHandle
    scopes: MapHandle
    config: MapHandle
    #: aegis_rule_counters (per-CPU hash): staging prunes the keys of retired generations;
    #: None = not pruned
    rule_counters: MapHandle | None = None
    #: aegis_cg_scopes (the no-task-storage build's per-cgroup scope answers, keyed by
    #: generation): staging deletes the keys of retired generations; None = not pruned
    cg_scopes: MapHandle | None = None

    @classmethod
    def fake(cls, max_rules: int = abi.MAX_RULES) -> PolicyMaps:
        return cls(
            rules=FakeMap(abi.MAP_RULES, abi.INODE_KEY.size, abi.RULE.size, max_rules * abi.SLOTS),
            scopes=FakeMap(
                abi.MAP_SCOPES, abi.SCOPE_KEY.size, abi.SCOPE.size,
                abi.MAP_MAX_ENTRIES[abi.MAP_SCOPES],
            ),
            config=FakeMap(
                abi.MAP_CONFIG, 4, abi.SLOT_CONFIG.size, abi.MAP_MAX_ENTRIES[abi.MAP_CONFIG],
                array=True,
            ),
            rule_counters=FakeMap(
                abi.MAP_RULE_COUNTERS, abi.RULE_COUNTER_KEY.size, abi.RULE_COUNTER.size,
                abi.MAP_MAX_ENTRIES[abi.MAP_RULE_COUNTERS],
            ),
            cg_scopes=FakeMap(
                abi.MAP_CG_SCOPES, abi.CG_SCOPE_KEY.size, 8, abi.MAP_MAX_ENTRIES[abi.MAP_CG_SCOPES],
            ),
        )
