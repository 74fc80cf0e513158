"""A direct consumer of the kernel's BPF ring-buffer layout (kernel/bpf/ringbuf.c).

Mapping: page 0 = consumer position (read-write); page 1 = producer position and,
after it, the data area (read-only).  The kernel maps the data pages twice in a row so
that a record that wraps is contiguous, and libbpf maps both copies; this reader maps
one and copies a wrapping record in two pieces (``_copy``).  Mapping both put every
data page in the agent's RSS twice once the ring had cycled: 10 MB of RSS for the 5 MiB
of the deny and audit rings, memory the kernel holds once (it is the maps' memlock).
Each record has an 8-byte header: u32 len (bit 31 BUSY, bit 30
DISCARD) and u32 page offset; records are 8-byte aligned.  The producer advances
``producer_pos`` when it *reserves* (the header still BUSY) and clears BUSY on submit,
so the consumer stops at the first BUSY record: later ones wait behind it.

Readiness: the map fd polls readable while ``producer_pos > consumer_pos``.  The kernel
wakes a waiting consumer only when a record is submitted at the position the consumer
has reached (adaptive wakeup), so the reader must drain until empty before waiting, and
it also polls on a short timeout.  :mod:`aegis_stream.testing` lays out the same
bytes in a memfd (with an eventfd as the readiness fd, ``wakeup_fd``).

Two drains:

* :meth:`RingBuffer.drain` -- the plain one: a ``bytes`` per record.
* :meth:`RingBuffer.drain_batch` -- the hot path: finds the leading run of committed
  ``aegis_event`` records (every header exactly 96, i.e. not BUSY, not DISCARD) with one
  strided read of the headers, copies that run out with one memcpy and advances the
  consumer once.  Anything else (BUSY, DISCARD, another size) falls back to the
  per-record walk.  Returns a :class:`RawBatch` of ``RECORD_STRIDE``-byte records.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

from aegis_stream.kernel.events import EVENT_SIZE, RECORD_STRIDE

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
PAGE = mmap.PAGESIZE

_u32 = struct.Struct("<I")
_STRIDE_WORDS = RECORD_STRIDE // 4


@dataclass(frozen=True)
class RingStatistics:
    """Running totals of one ring's consumer: records handed out, discarded and foreign ones, and how far
    behind the producer it is (``available_bytes``; :attr:`fill_ratio` feeds the ring metrics)."""
    name: str
    records: int  # records handed out (committed, not discarded)
    discarded: int  # records the producer discarded
    foreign: int  # committed records that were not an aegis_event (wrong size): skipped
    bytes: int
    batches: int
    available_bytes: int  # producer - consumer: how far behind the consumer is
    size: int

    @property
    def fill_ratio(self) -> float:
        return self.available_bytes / self.size if self.size else 0.0


@dataclass(frozen=True)
class RawBatch:
    """A run of ring records copied out: ``count`` records, ``stride`` bytes apart
    (``RECORD_STRIDE``: ring header + event)."""

    data: bytes
    count: int
    stride: int = RECORD_STRIDE

    def __len__(self) -> int:
        return self.count

    def select(self, keep: list[int]) -> RawBatch:
        """A batch of the records at the given indices (sampling)."""
        s = self.stride
        mv = memoryview(self.data)
        return RawBatch(b"".join(mv[i * s : (i + 1) * s] for i in keep), len(keep), s)


EMPTY_BATCH = RawBatch(b"", 0)


class RingBuffer:
    """The consumer side of one BPF ring buffer, mapped directly (no libbpf callback).  One reader
    per ring: it alone advances the consumer position, and only past records it has copied out.
    It stops at the first BUSY record, so records come out in ring order and none is passed over
    (discarded and foreign records are counted, not returned).  The positions are loaded and stored
    as whole 8-byte words because the kernel reads them concurrently.  Works on the kernel's map
    fd and on the fake kernel's memfd (``wakeup_fd``)."""

    def __init__(self, fd: int, size: int, name: str = "ring", *, wakeup_fd: int | None = None) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        self.fd = fd
        self.name = name
        self.size = size
        self.mask = size - 1
        #: the fd to poll for readability (the map fd itself for a kernel ring)
        self.poll_fd = fd if wakeup_fd is None else wakeup_fd
        self._wakeup_fd = wakeup_fd
        self._cons = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data = mmap.mmap(fd, PAGE + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        self._view = memoryview(self._data)
        self._words = self._view.cast("I")
        # the positions are 8-byte words shared with the producer (the kernel): load and
        # store each in one access.  struct's "<Q" copies byte by byte, so a producer could
        # see a torn consumer position (low bytes new, high bytes old: far behind), take the
        # ring for full and drop records (found with the forked bench producer: "1007% full")
        self._cons_word = ctypes.c_uint64.from_buffer(self._cons)
        self._prod_words = self._view[:8].cast("Q")
        self.records = 0
        self.discarded = 0
        self.foreign = 0
        self.bytes = 0
        self.batches = 0

    def consumer_pos(self) -> int:
        return int(self._cons_word.value)

    def producer_pos(self) -> int:
        return int(self._prod_words[0])

    def available_bytes(self) -> int:
        return self.producer_pos() - self.consumer_pos()

    def _copy(self, pos: int, n: int) -> bytes:
        """n bytes of the data area from ring position pos, in two pieces when they wrap."""
        start = pos & self.mask
        end = start + n
        if end <= self.size:
            return bytes(self._view[PAGE + start : PAGE + end])
        head = bytes(self._view[PAGE + start : PAGE + self.size])
        return head + bytes(self._view[PAGE : PAGE + end - self.size])

    def _ack_wakeup(self) -> None:
        if self._wakeup_fd is not None:
            try:
                os.eventfd_read(self._wakeup_fd)
            except BlockingIOError:
                pass

    def drain(self, max_records: int = 4096) -> list[bytes]:
        """Copy out up to max_records committed records and advance the consumer."""
        self._ack_wakeup()
        out: list[bytes] = []
        cons0 = cons = self.consumer_pos()
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
                out.append(self._copy(cons + HDR_SIZE, n))
            cons += (n + HDR_SIZE + 7) & ~7
        if cons != cons0:
            self._cons_word.value = cons
            self.records += len(out)
            self.bytes += sum(len(r) for r in out)
            self.batches += 1
        return out

    def _uniform_run(self, cons: int, prod: int, max_records: int) -> int:
        """How many committed 96-byte event records start at ``cons`` and end before the
        data area does: one strided read of the header words (the first one that is not
        exactly 96 is a real header, because every record before it was 104 bytes long)."""
        span = min(prod - cons, max_records * RECORD_STRIDE, self.size - (cons & self.mask))
        w0 = (PAGE + (cons & self.mask)) // 4
        lens = self._words[w0 : w0 + (span + 3) // 4 : _STRIDE_WORDS].tolist()
        n = len(lens)
        if lens.count(EVENT_SIZE) != n:
            n = next(i for i, v in enumerate(lens) if v != EVENT_SIZE)
        return min(n, span // RECORD_STRIDE)

    def drain_batch(self, max_records: int = 4096) -> RawBatch:
        """Copy out up to max_records committed aegis_event records as one RawBatch."""
        self._ack_wakeup()
        cons0 = cons = self.consumer_pos()
        prod = self.producer_pos()
        chunks: list[bytes] = []
        count = 0
        while cons < prod and count < max_records:
            n = self._uniform_run(cons, prod, max_records - count)
            if n:
                chunks.append(self._copy(cons, n * RECORD_STRIDE))  # a run never wraps: one piece
                cons += n * RECORD_STRIDE
                count += n
                continue
            # one record off the fast path: BUSY stops, DISCARD / foreign sizes are skipped
            length = _u32.unpack_from(self._data, PAGE + (cons & self.mask))[0]
            if length & BUSY_BIT:
                break
            if length == EVENT_SIZE:
                # an event that wraps past the end of the data area, or one the strided scan
                # saw BUSY and the producer has committed since: an event like the others
                # (skipping the latter as foreign lost a deny once in a CI soak;
                # tests/unit/test_ringbuf.py reproduces both)
                chunks.append(self._copy(cons, RECORD_STRIDE))
                cons += RECORD_STRIDE
                count += 1
                continue
            if length & DISCARD_BIT:
                self.discarded += 1
            else:
                self.foreign += 1
            cons += ((length & ~(BUSY_BIT | DISCARD_BIT)) + HDR_SIZE + 7) & ~7
        if cons != cons0:
            self._cons_word.value = cons
            self.records += count
            self.bytes += count * EVENT_SIZE
            self.batches += 1
        if not count:
            return EMPTY_BATCH
        return RawBatch(chunks[0] if len(chunks) == 1 else b"".join(chunks), count)

    def statistics(self) -> RingStatistics:
        return RingStatistics(
            self.name, self.records, self.discarded, self.foreign, self.bytes, self.batches,
            self.available_bytes(), self.size,
        )

    def close(self) -> None:
        self.__dict__.pop("_cons_word", None)  # an exported buffer keeps the mmap open
        self._prod_words.release()
        self._words.release()
        self._view.release()
        self._data.close()
        self._cons.close()

