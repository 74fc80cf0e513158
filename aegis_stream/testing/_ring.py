"""FakeRing: a BPF_MAP_TYPE_RINGBUF in a memfd, the producer side in Python.

The memfd is laid out as the kernel maps a ring buffer (consumer page, producer page,
data area, data area again).  The kernel maps the data pages twice; here the producer
writes every byte to both copies, so the consumer (the real
:class:`~aegis_stream.kernel.ringbuf.RingBuffer`, mmapping the memfd at the same offsets
it uses on a map fd) sees identical bytes.  Reserve/commit/discard follow
``kernel/bpf/ringbuf.c``: 8-byte headers with BUSY/DISCARD bits, 8-byte alignment, the
producer position advanced at reserve time, a reserve refused when the new producer
position would run more than ``size - 1`` bytes ahead of the consumer (or of the oldest
record still BUSY), and the adaptive wakeup (only when the committed record is where the
consumer is) through an eventfd, the consumer's ``wakeup_fd``.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import struct

import numpy as np

from aegis_stream.kernel.events import EVENT_SIZE, RECORD_STRIDE, RING_HDR
from aegis_stream.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SIZE, PAGE, RingBuffer

#: page offset of the data area inside struct bpf_ringbuf (waitq/work page, consumer
#: page, producer page, then data): what the kernel writes into each header's pg_off
RINGBUF_DATA_PGOFF = 3
BPF_RB_NO_WAKEUP = 1
BPF_RB_FORCE_WAKEUP = 2
PAGE_SHIFT = PAGE.bit_length() - 1

_u64 = struct.Struct("<Q")
_u32 = struct.Struct("<I")


class FakeRing:
    """A BPF ring buffer in a memfd; the producer side is this object's methods."""

    def __init__(self, name: str, size: int) -> None:
        if size < PAGE or size & (size - 1):
            raise ValueError(f"ring size {size} must be a power of two >= {PAGE}")
        self.name = name
        self.size = size
        self.mask = size - 1
        self.fd = os.memfd_create(f"aegis-fake-{name}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 2 * PAGE + 2 * size)
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._m = mmap.mmap(self.fd, 2 * PAGE + 2 * size, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        # single 8-byte loads/stores, as the kernel's smp_load_acquire/smp_store_release
        # (struct's "<Q" is a byte-by-byte copy: torn across processes)
        self._cons_word = ctypes.c_uint64.from_buffer(self._m, 0)
        self._prod_word = ctypes.c_uint64.from_buffer(self._m, PAGE)
        self._busy: collections.deque[int] = collections.deque()  # positions still BUSY
        self._committed: set[int] = set()
        self.reserved = 0
        self.failed = 0  # reserve failures (what the BPF side counts as RINGBUF_FAIL)
        self.wakeups = 0
        self._consumers: list[RingBuffer] = []

    # ---------------------------------------------------------------- positions
    def consumer_pos(self) -> int:
        return int(self._cons_word.value)

    def producer_pos(self) -> int:
        return int(self._prod_word.value)

    def _set_producer(self, pos: int) -> None:
        self._prod_word.value = pos

    def available_bytes(self) -> int:
        return self.producer_pos() - self.consumer_pos()

    # ---------------------------------------------------------------- data area
    def _write(self, pos: int, data: bytes | memoryview) -> None:
        """Write at ring position ``pos`` into the data area and its second mapping."""
        base = 2 * PAGE
        off = pos & self.mask
        n = len(data)
        m = self._m
        m[base + off : base + off + n] = data
        if off + n <= self.size:
            m[base + self.size + off : base + self.size + off + n] = data
        else:
            first = self.size - off
            m[base + self.size + off : base + 2 * self.size] = data[:first]
            m[base : base + n - first] = data[first:]

    def _pg_off(self, pos: int) -> int:
        return RINGBUF_DATA_PGOFF + ((pos & self.mask) >> PAGE_SHIFT)

    # ---------------------------------------------------------------- producer API
    def reserve(self, size: int) -> int | None:
        """bpf_ringbuf_reserve: the record's position, or None when it does not fit."""
        length = (size + HDR_SIZE + 7) & ~7
        if length > self.size:
            self.failed += 1
            return None
        cons = self.consumer_pos()
        prod = self.producer_pos()
        while self._busy and self._busy[0] in self._committed:
            self._committed.discard(self._busy.popleft())
        pend = self._busy[0] if self._busy else prod
        new_prod = prod + length
        if new_prod - cons > self.mask or new_prod - pend > self.mask:
            self.failed += 1
            return None
        self._write(prod, RING_HDR.pack(size | BUSY_BIT, self._pg_off(prod)))
        self._busy.append(prod)
        self._set_producer(new_prod)
        self.reserved += 1
        return prod

    def commit(self, pos: int, data: bytes = b"", *, discard: bool = False, flags: int = 0) -> None:
        """Write the record body, then bpf_ringbuf_submit (or _discard) it."""
        size = _u32.unpack_from(self._m, 2 * PAGE + (pos & self.mask))[0] & ~(BUSY_BIT | DISCARD_BIT)
        if data:
            if len(data) > size:
                raise ValueError(f"record body of {len(data)} bytes in a {size}-byte reservation")
            self._write(pos + HDR_SIZE, data)
        self._write(pos, _u32.pack(size | (DISCARD_BIT if discard else 0)))
        self._committed.add(pos)
        self._maybe_wake(pos, flags)

    def _maybe_wake(self, rec_pos: int, flags: int = 0) -> None:
        if flags & BPF_RB_FORCE_WAKEUP or (
            not flags & BPF_RB_NO_WAKEUP and self.consumer_pos() == rec_pos
        ):
            os.eventfd_write(self.wakeup_fd, 1)
            self.wakeups += 1

    def output(self, data: bytes) -> bool:
        """bpf_ringbuf_output: reserve + copy + submit; False when the ring is full."""
        pos = self.reserve(len(data))
        if pos is None:
            return False
        self.commit(pos, data)
        return True

    def output_events(self, bodies: bytes | memoryview, count: int) -> int:
        """Bulk ``output`` of ``count`` 96-byte events (a contiguous run): writes as many as
        fit and returns that number; the rest are reserve failures.  Byte-identical to
        ``count`` calls of :meth:`output` (tested), one memcpy instead of ``count``."""
        if self._busy:  # keep the exact semantics while reservations are open
            return sum(self.output(bytes(bodies[i * EVENT_SIZE : (i + 1) * EVENT_SIZE]))
                       for i in range(count))
        cons = self.consumer_pos()
        prod = self.producer_pos()
        fit = max(0, (cons + self.mask - prod) // RECORD_STRIDE)
        n = min(count, fit)
        self.failed += count - n
        if n:
            recs = np.empty((n, RECORD_STRIDE), dtype=np.uint8)
            recs[:, HDR_SIZE:] = np.frombuffer(bodies, dtype=np.uint8, count=n * EVENT_SIZE).reshape(n, -1)
            pos = prod + np.arange(n, dtype=np.uint64) * np.uint64(RECORD_STRIDE)
            hdr = recs[:, :HDR_SIZE].view("<u4")
            hdr[:, 0] = EVENT_SIZE
            hdr[:, 1] = RINGBUF_DATA_PGOFF + ((pos & np.uint64(self.mask)) >> np.uint64(PAGE_SHIFT))
            self._write(prod, recs.tobytes())
            self._set_producer(prod + n * RECORD_STRIDE)
            self.reserved += n
            self._maybe_wake(prod)
        return n

    # ---------------------------------------------------------------- consumer side
    def consumer(self) -> RingBuffer:
        """The agent's reader over this ring: the real RingBuffer class on the memfd."""
        rb = RingBuffer(self.fd, self.size, self.name, wakeup_fd=self.wakeup_fd)
        self._consumers.append(rb)
        return rb

    def close(self) -> None:
        for rb in self._consumers:
            try:
                rb.close()
            except (ValueError, BufferError):
                pass
        del self._cons_word, self._prod_word  # exported buffers keep the mmap open
        self._m.close()
        os.close(self.wakeup_fd)
        os.close(self.fd)
