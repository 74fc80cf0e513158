"""Per-CPU maps: FakePercpuArray and FakePercpuHash.

They offer ``lookup_percpu`` and ``keys`` like the loader's map handles, so
:func:`aegis_stream.kernel.counters.read_counters` reads them exactly as it reads the
kernel's ``aegis_counters`` / ``aegis_rule_counters``.
"""

from __future__ import annotations

import struct

from aegis_stream.errors import KernelError
from aegis_stream.kernel import abi

_u64 = struct.Struct("<Q")
_u32 = struct.Struct("<I")


class FakePercpuArray:
    """BPF_MAP_TYPE_PERCPU_ARRAY of u64."""

    def __init__(self, name: str, max_entries: int, ncpu: int) -> None:
        self.name = name
        self.key_size = 4
        self.value_size = 8
        self.max_entries = max_entries
        self.ncpu = ncpu
        self.values = [[0] * ncpu for _ in range(max_entries)]

    def add(self, idx: int, cpu: int, n: int = 1) -> None:
        self.values[idx][cpu % self.ncpu] += n

    def lookup_percpu(self, key: bytes, ncpus: int) -> list[bytes] | None:
        (idx,) = _u32.unpack(key)
        if idx >= self.max_entries:
            return None
        return [_u64.pack(v) for v in self.values[idx]][:ncpus]

    def lookup(self, key: bytes) -> bytes | None:
        per = self.lookup_percpu(key, self.ncpu)
        return per[0] if per else None

    def keys(self) -> list[bytes]:
        return [_u32.pack(i) for i in range(self.max_entries)]


class FakePercpuHash:
    """BPF_MAP_TYPE_PERCPU_HASH with aegis_rule_counter values."""

    def __init__(self, name: str, key_size: int, value_size: int, max_entries: int, ncpu: int) -> None:
        self.name = name
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self.ncpu = ncpu
        self.data: dict[bytes, list[list[int]]] = {}

    def insert(self, key: bytes) -> bool:
        if key in self.data:
            return True
        if len(self.data) >= self.max_entries:
            return False
        self.data[key] = [[0, 0] for _ in range(self.ncpu)]
        return True

    def lookup_percpu(self, key: bytes, ncpus: int) -> list[bytes] | None:
        v = self.data.get(key)
        if v is None:
            return None
        return [abi.RULE_COUNTER.pack(*c) for c in v][:ncpus]

    def lookup(self, key: bytes) -> bytes | None:
        per = self.lookup_percpu(key, self.ncpu)
        return per[0] if per else None

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None:
        """Userspace update: ``value`` holds one 8-byte-aligned value per CPU, as
        bpf_map_update_elem takes for a per-CPU map."""
        stride = (self.value_size + 7) & ~7
        if len(key) != self.key_size or len(value) != stride * self.ncpu:
            raise KernelError(f"map {self.name}: update", err=22)
        if key not in self.data and len(self.data) >= self.max_entries:
            raise KernelError(f"map {self.name}: update", err=7)
        self.data[key] = [list(abi.RULE_COUNTER.unpack(value[i * stride : i * stride + self.value_size]))
                          for i in range(self.ncpu)]

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def keys(self) -> list[bytes]:
        return list(self.data)
