"""A direct consumer of the kernel's BPF ring-buffer layout (kernel/bpf/ringbuf.c).

Mapping: page 0 = consumer position (read-write); page 1 = producer position and,
after it, the data area mapped twice (read-only) so a record that wraps is still
contiguous.  Each record has an 8-byte header: u32 len (bit 31 BUSY, bit 30
DISCARD) and u32 page offset; records are 8-byte aligned.

The consumer drains in batches and reports how far behind it is
(``available_bytes``), as cilium/ebpf's reader does.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
PAGE = mmap.PAGESIZE

_u64 = struct.Struct("<Q")
_u32 = struct.Struct("<I")


@dataclass(frozen=True)
class RingStatistics:
    records: int
    discarded: int
    bytes: int
    batches: int
    available_bytes: int
    size: int


class RingBuffer:
    def __init__(self, fd: int, size: int, name: str = "ring") -> None:
        if size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        self.fd = fd
        self.name = name
        self.size = size
        self.mask = size - 1
        self._cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        self._view = memoryview(self._data)
        self.records = 0
        self.discarded = 0
        self.bytes = 0
        self.batches = 0

    def consumer_pos(self) -> int:
        return int(_u64.unpack_from(self._cons, 0)[0])

    def producer_pos(self) -> int:
        return int(_u64.unpack_from(self._data, 0)[0])

    def available_bytes(self) -> int:
        return self.producer_pos() - self.consumer_pos()

    def drain(self, max_records: int = 4096) -> list[bytes]:
        """Copy out up to max_records committed records and advance the consumer."""
        out: list[bytes] = []
        cons = self.consumer_pos()
        prod = self.producer_pos()
        data = self._data
        while cons < prod and len(out) < max_records:
            off = PAGE + (cons & self.mask)
            length = _u32.unpack_from(data, off)[0]
            if length & BUSY_BIT:
                break  # producer still writing this one; later records wait behind it
            n = length & ~(BUSY_BIT | DISCARD_BIT)
            if length & DISCARD_BIT:
                self.discarded += 1
            else:
                out.append(bytes(self._view[off + HDR_SIZE : off + HDR_SIZE + n]))
            cons += (n + HDR_SIZE + 7) & ~7
        if out or cons != self.consumer_pos():
            _u64.pack_into(self._cons, 0, cons)
            self.records += len(out)
            self.bytes += sum(len(r) for r in out)
            self.batches += 1
        return out

    def statistics(self) -> RingStatistics:
        return RingStatistics(
            self.records, self.discarded, self.bytes, self.batches, self.available_bytes(), self.size
        )

    def close(self) -> None:
        self._view.release()
        self._data.close()
        self._cons.close()
