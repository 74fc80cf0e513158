"""The ring-buffer consumer against the fake kernel ring (kernel/bpf/ringbuf.c layout),
and the batch decode path against the per-record one."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import trio

from aegis_stream.kernel import abi
from aegis_stream.kernel.events import (
    EVENT_DTYPE,
    EVENT_SIZE,
    RECORD_DTYPE,
    RECORD_STRIDE,
    DecodeError,
    RawDecision,
    decode_batch,
    decode_raw,
    encode_raw,
    rows,
    split_valid,
)
from aegis_stream.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, PAGE, RingBuffer
from aegis_stream.testing import RINGBUF_DATA_PGOFF, FakeRing, make_events

SIZE = 4 * PAGE


def _ev(i: int, **kw: int) -> bytes:
    vals = dict(abi_version=abi.ABI_VERSION, hook=0, decision=1, rule_id=i % 3, generation=7, ktime_ns=1000 + i,
                cgroup_id=1001, scope_cgroup_id=1000, ino=1234, dev=(8 << 20) | 1, action=1,
                pid=4242, tgid=4242, uid=0, gid=0, mode=1, slot=1)
    vals.update(kw)
    return encode_raw(RawDecision(**vals, comm="cat"))  # type: ignore[arg-type]


@pytest.fixture
def ring():
    r = FakeRing("test", SIZE)
    yield r
    r.close()


def test_layout_matches_abi():
    assert EVENT_SIZE == 96 and RECORD_STRIDE == 104
    offs = abi.EVENT.offsets()
    for name, (_, off) in EVENT_DTYPE.fields.items():
        assert offs[name] == off, name
        assert RECORD_DTYPE.fields[name][1] == off + 8
    assert EVENT_DTYPE.itemsize == abi.EVENT.size


def test_memfd_layout_is_the_kernels(ring):
    """consumer page, producer page, data mapped twice: the bytes the consumer maps."""
    rb = ring.consumer()
    assert ring.output(_ev(1))
    raw = os.pread(ring.fd, 2 * PAGE + 2 * SIZE, 0)
    assert struct.unpack_from("<Q", raw, PAGE)[0] == RECORD_STRIDE  # producer_pos
    assert struct.unpack_from("<Q", raw, 0)[0] == 0  # consumer_pos
    length, pg_off = struct.unpack_from("<II", raw, 2 * PAGE)
    assert length == EVENT_SIZE and pg_off == RINGBUF_DATA_PGOFF
    assert raw[2 * PAGE + 8 : 2 * PAGE + 104] == _ev(1)
    # the second mapping of the data area holds the same bytes
    assert raw[2 * PAGE : 2 * PAGE + SIZE] == raw[2 * PAGE + SIZE : 2 * PAGE + 2 * SIZE]
    assert rb.drain() == [_ev(1)]
    assert struct.unpack_from("<Q", os.pread(ring.fd, 8, 0))[0] == RECORD_STRIDE


def test_capacity_is_size_minus_one(ring):
    """A reserve fails when the producer would run more than size-1 bytes ahead."""
    fits = (SIZE - 1) // RECORD_STRIDE
    assert sum(ring.output(_ev(i)) for i in range(fits + 5)) == fits
    assert ring.failed == 5
    rb = ring.consumer()
    assert len(rb.drain(10_000)) == fits
    assert ring.output(_ev(0))  # room again


def test_wrapping_record_is_contiguous(ring):
    rb = ring.consumer()
    n = 0
    # advance to near the end so a record straddles the wrap point
    while (ring.producer_pos() & (SIZE - 1)) + RECORD_STRIDE <= SIZE:
        ring.output(_ev(n))
        n += 1
        rb.drain()
    ring.output(_ev(999))
    assert (ring.producer_pos() - RECORD_STRIDE) & (SIZE - 1) > SIZE - RECORD_STRIDE
    got = rb.drain_batch()
    assert got.count == 1
    assert decode_raw(got.data[8:]).ktime_ns == 1000 + 999


def _scribble_mirror(ring: FakeRing) -> None:
    """Overwrite the second copy of the data area (the kernel's double mapping): a reader
    that maps the data once must not need it."""
    import mmap

    m = mmap.mmap(ring.fd, 2 * PAGE + 2 * SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[2 * PAGE + SIZE : 2 * PAGE + 2 * SIZE] = b"\xff" * SIZE
    m.close()


@pytest.mark.parametrize("drain", ["drain", "drain_batch"])
@pytest.mark.parametrize("tail", [RECORD_STRIDE - 8, 8, 40])  # bytes of a record before the end
def test_a_batch_across_the_end_of_the_data_area(ring, drain, tail):
    """Records before, across and after the wrap come out whole and in order, read from the
    one mapping of the data area (the mirror the kernel keeps is scribbled over first);
    tail 8: the record's header is the last 8 bytes of the area and its event starts at 0."""
    rb = ring.consumer()
    assert len(rb._data) == PAGE + SIZE  # the data area is mapped once
    for _ in range(5000):  # 104-byte records: every multiple of 8 comes round within 13 wraps
        left = SIZE - (ring.producer_pos() & (SIZE - 1))
        if left % RECORD_STRIDE == tail and left < 4 * RECORD_STRIDE:
            break
        ring.output(_ev(0))
        rb.drain()
    else:
        raise AssertionError(f"never {tail} bytes before the end")
    for i in range(1, 9):  # (left - tail) / 104 before the wrap, one across it, the rest after
        ring.output(_ev(i))
    _scribble_mirror(ring)
    got = rb.drain(100) if drain == "drain" else rb.drain_batch()
    if drain == "drain":
        records = got
    else:
        records = [got.data[j * RECORD_STRIDE + 8 : (j + 1) * RECORD_STRIDE] for j in range(got.count)]
    assert records == [_ev(i) for i in range(1, 9)]  # byte for byte
    assert rb.available_bytes() == 0


def test_busy_record_stops_the_consumer(ring):
    rb = ring.consumer()
    a = ring.reserve(EVENT_SIZE)
    assert a is not None
    assert ring.output(_ev(2))  # committed, but behind a BUSY one
    assert rb.drain() == [] and rb.drain_batch().count == 0
    ring.commit(a, _ev(1))
    assert [decode_raw(r).ktime_ns for r in rb.drain()] == [1001, 1002]


def test_pending_busy_record_limits_the_producer(ring):
    """new_prod_pos - pending_pos > mask fails even when the consumer has caught up."""
    rb = ring.consumer()
    first = ring.reserve(EVENT_SIZE)
    assert first is not None
    ok = 0
    while ring.output(_ev(ok)):
        ok += 1
    assert rb.drain() == []  # all behind the BUSY record
    ring.commit(first, _ev(500))
    assert len(rb.drain(10_000)) == ok + 1


def test_discard_and_foreign_records_are_skipped_and_counted(ring):
    rb = ring.consumer()
    ring.output(_ev(1))
    d = ring.reserve(EVENT_SIZE)
    assert d is not None
    ring.commit(d, discard=True)
    ring.output(b"x" * 40)  # a record that is not an aegis_event
    ring.output(_ev(2))
    batch = rb.drain_batch()
    assert batch.count == 2
    arr = decode_batch(batch.data)
    assert arr["ktime_ns"].tolist() == [1001, 1002]
    st = rb.statistics()
    assert (st.records, st.discarded, st.foreign, st.available_bytes) == (2, 1, 1, 0)
    # the header words carry the bits the kernel uses
    assert BUSY_BIT == 1 << 31 and DISCARD_BIT == 1 << 30


def test_drain_batch_equals_drain(ring):
    a, b = FakeRing("a", SIZE), FakeRing("b", SIZE)
    try:
        ra, rb = a.consumer(), b.consumer()
        for i in range(25):
            a.output(_ev(i))
            b.output(_ev(i))
        plain = ra.drain(7) + ra.drain(100)
        batch = rb.drain_batch(7)
        rest = rb.drain_batch(100)
        assert [r.ktime_ns for r in map(decode_raw, plain)] == (
            decode_batch(batch.data)["ktime_ns"].tolist() + decode_batch(rest.data)["ktime_ns"].tolist()
        )
        assert batch.count == 7 and rest.count == 18
    finally:
        a.close()
        b.close()


def test_bulk_output_is_byte_identical_to_per_record_output():
    a, b = FakeRing("a", SIZE), FakeRing("b", SIZE)
    try:
        ca, cb = a.consumer(), b.consumer()
        for _ in range(4):  # past the end of the data area: wrap-around included
            blob = make_events(60)
            assert a.output_events(blob, 60) == 60
            for i in range(60):
                assert b.output(blob[i * 96 : (i + 1) * 96])
            assert os.pread(a.fd, 2 * PAGE + 2 * SIZE, 0) == os.pread(b.fd, 2 * PAGE + 2 * SIZE, 0)
            ca.drain_batch(1000)
            cb.drain(1000)
        assert a.producer_pos() > SIZE
        assert a.output_events(make_events(200), 200) == (SIZE - 1) // RECORD_STRIDE
    finally:
        a.close()
        b.close()


def test_adaptive_wakeup(ring):
    """The kernel wakes the consumer only when the committed record is where it stands."""
    rb = ring.consumer()
    ring.output(_ev(1))
    ring.output(_ev(2))
    assert ring.wakeups == 1
    rb.drain()
    ring.output(_ev(3))
    assert ring.wakeups == 2


async def test_wait_readable_wakes_on_commit(ring):
    rb = ring.consumer()
    got: list[int] = []

    async def reader() -> None:
        await trio.lowlevel.wait_readable(rb.poll_fd)
        got.extend(decode_raw(r).ktime_ns for r in rb.drain())

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.sleep(0.01)
        assert not got
        ring.output(_ev(5))
    assert got == [1005]


def test_batch_decode_equals_per_record_decode():
    blob = make_events(50, rule_ids=3, pids=4)
    arr = decode_batch(blob, EVENT_SIZE)
    per = [decode_raw(blob[i * 96 : (i + 1) * 96]) for i in range(50)]
    assert rows(arr) == per
    assert np.array_equal(arr["ktime_ns"], [p.ktime_ns for p in per])


def test_abi_mismatch_is_detected_and_split():
    blob = bytearray(make_events(5))
    struct.pack_into("<H", blob, 2 * 96, abi.ABI_VERSION + 1)  # record 2 speaks another ABI
    with pytest.raises(DecodeError, match="record 2"):
        decode_batch(bytes(blob), EVENT_SIZE)
    arr, bad = split_valid(bytes(blob), EVENT_SIZE)
    assert bad == 1 and len(arr) == 4
    with pytest.raises(DecodeError):
        decode_raw(bytes(blob[192:288]))


def test_ring_size_must_be_a_power_of_two(ring):
    with pytest.raises(ValueError):
        RingBuffer(ring.fd, SIZE + 1)


def test_record_committed_between_the_strided_scan_and_the_header_read_is_delivered(ring):
    """The race a 600-s CI soak hit once in ~6,000 denies: the strided header scan sees the
    record at the consumer position still BUSY, the producer commits it, and the re-read
    of that header finds a plain committed 96-byte event.  It is the next record, not a
    foreign one: it must be handed out, never skipped."""
    rb = ring.consumer()
    assert ring.output(_ev(1))
    pending = ring.reserve(EVENT_SIZE)
    assert pending is not None
    scan = rb._uniform_run

    def scan_then_producer_commits(cons: int, prod: int, max_records: int) -> int:
        n = scan(cons, prod, max_records)
        if cons == pending:  # the scan saw it BUSY; the kernel submits it right now
            ring.commit(pending, _ev(2))
        return n

    rb._uniform_run = scan_then_producer_commits  # type: ignore[method-assign]
    first = rb.drain_batch()
    rest = rb.drain_batch()
    got = [*decode_batch(first.data)["ktime_ns"].tolist(), *(decode_batch(rest.data)["ktime_ns"].tolist()
                                                             if rest.count else [])]
    assert got == [1001, 1002]
    st = rb.statistics()
    assert (st.records, st.discarded, st.foreign, st.available_bytes) == (2, 0, 0, 0)
