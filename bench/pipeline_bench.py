#!/usr/bin/env python3
"""Event pipeline throughput: drain + decode + normalise (+ JSON) on one core, against
the fake kernel ring (the same mmap layout the agent reads from a kernel ring), side by
side with the plain baseline; then the drop ratio at a fixed offered load.

    .venv/bin/python -m bench.pipeline_bench            # full run (~1 min)
    .venv/bin/python -m bench.pipeline_bench --quick    # smaller, for a smoke test
    .venv/bin/python -m bench.pipeline_bench --json out.json

Method (docs/PERFORMANCE.md): every throughput number is the best of ``--repeat`` runs
over ``--events`` records, each run on a freshly filled ring (filling is not timed);
``time.perf_counter``; the process pinned to one CPU when possible.  The offered-load run
is real time: ``rate/1000`` records are written into the fake kernel's audit ring every
millisecond while the real Pipeline drains, normalises, encodes and writes JSON lines to
/dev/null.  ``--producer process`` (the honest one: a kernel producer is not on the
agent's core) forks the producer onto the other CPU, with the fake kernel's counters in
shared memory so the agent's ticker reads them as it reads kernel maps; ``inline`` is a
trio task on the agent's own core (the old method, a lower bound).  ``--workers N`` runs
the audit normalise+encode in N forked worker processes (``PipelineConfig.audit_workers``).
Every row checks the pipeline's accounting against the producer's count
(emitted = delivered + dropped + left in the ring) and prints the 1-minute load average.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import mmap
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import orjson
import trio

from aegis_stream.kernel.events import (
    EVENT_SIZE,
    RECORD_STRUCT,
    RawDecision,
    comm_str,
    decode_batch,
    decode_raw,
    rows,
)
from aegis_stream.pipeline import Pipeline, PipelineConfig
from aegis_stream.pipeline.sinks import JsonLinesFileSink
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import (
    FakeKernel,
    FakeRing,
    fixed_normaliser,
    make_events,
    sample_record,
)

_enc = msgspec.json.Encoder()


def pin_one_cpu() -> str:
    try:
        cpu = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned"


def best_of(repeat: int, setup: Callable[[], object], run: Callable[[object], object], n: int) -> float:
    """events/s: the best of ``repeat`` timed runs of ``run(setup())``."""
    best = float("inf")
    for _ in range(repeat):
        arg = setup()
        gc.collect()
        t0 = time.perf_counter()
        run(arg)
        best = min(best, time.perf_counter() - t0)
    return n / best


class Rig:
    def __init__(self, n: int) -> None:
        self.n = n
        self.tmp = tempfile.TemporaryDirectory(prefix="aegis-bench-")
        self.store = PolicyStore(Path(self.tmp.name) / "state")
        self.store.record(sample_record(7))
        # a realistic mix: 3 rules, 64 processes, one cgroup scope; generation 7
        self.blob = make_events(n, generation=7, rule_ids=3, pids=64)
        size = 1 << max(16, (n * 104).bit_length())
        self.ring = FakeRing("bench", size)
        self.consumer = self.ring.consumer()

    def fill(self) -> FakeRing:
        assert self.consumer.drain_batch(1 << 30).count == 0 or True
        assert self.ring.output_events(self.blob, self.n) == self.n
        return self.ring

    def normaliser(self):
        # the fixed normaliser: no /proc or cgroupfs in the timed path (both are cached
        # in the agent too; the cache hit is what a steady state pays)
        return fixed_normaliser(self.store, processes={1000 + i: ("/usr/bin/cat", ["cat", "/etc/shadow"])
                                                       for i in range(64)})

    def close(self) -> None:
        self.ring.close()
        self.tmp.cleanup()


def throughput(rig: Rig, repeat: int, batch: int) -> dict[str, float]:
    n = rig.n
    out: dict[str, float] = {}
    cons = rig.consumer

    # --- decode only (ring bytes already copied out), per path
    recs = [rig.blob[i * EVENT_SIZE : (i + 1) * EVENT_SIZE] for i in range(n)]
    out["decode: struct.unpack per record -> RawDecision"] = best_of(
        repeat, lambda: recs, lambda rs: [decode_raw(r) for r in rs], n)  # type: ignore[attr-defined]
    rig.fill()
    contiguous = cons.drain_batch(1 << 30).data

    def iter_unpack(blob: bytes) -> list[RawDecision]:
        return [RawDecision(*v[2:-2], comm_str(v[-1]), v[-2])  # type: ignore[call-arg]
                for v in RECORD_STRUCT.iter_unpack(blob)]

    out["decode: struct.iter_unpack (contiguous) -> RawDecision"] = best_of(
        repeat, lambda: contiguous, iter_unpack, n)  # type: ignore[arg-type]
    out["decode: numpy frombuffer -> RawDecision"] = best_of(
        repeat, lambda: contiguous, lambda b: rows(decode_batch(b)), n)  # type: ignore[arg-type]
    out["decode: numpy frombuffer -> columns (agent)"] = best_of(
        repeat, lambda: contiguous,
        lambda b: [decode_batch(b[i : i + batch * 104])["ktime_ns"].tolist()  # type: ignore[index]
                   for i in range(0, n * 104, batch * 104)], n)

    # --- drain + decode + normalise (+ encode), end to end from the ring
    def baseline(ring: FakeRing) -> int:
        norm = rig.normaliser()
        total = 0
        while True:
            got = cons.drain(batch)
            if not got:
                return total
            lines = b"".join(_enc.encode(norm.normalise(decode_raw(r))) + b"\n" for r in got)
            total += len(lines)

    def struct_path(ring: FakeRing) -> int:
        norm = rig.normaliser()
        total = 0
        while (b := cons.drain_batch(batch)).count:
            total += len(_enc.encode_lines([norm.normalise(r) for r in rows(decode_batch(b.data))]))
        return total

    def columnar(ring: FakeRing) -> int:
        norm = rig.normaliser()
        total = 0
        while (b := cons.drain_batch(batch)).count:
            total += len(norm.encode_batch(decode_batch(b.data)))
        return total

    def drain_only(ring: FakeRing) -> int:
        c = 0
        while (b := cons.drain_batch(batch)).count:
            c += b.count
        return c

    out["drain only: drain_batch (one memcpy per run)"] = best_of(repeat, rig.fill, drain_only, n)
    out["BASELINE drain + struct.unpack + normalise + JSON, per record"] = best_of(
        repeat, rig.fill, baseline, n)
    out["deny path: drain_batch + numpy + normalise Structs + encode_lines"] = best_of(
        repeat, rig.fill, struct_path, n)
    out["AGENT audit path: drain_batch + numpy + columnar normalise+JSON"] = best_of(
        repeat, rig.fill, columnar, n)
    return out


def json_encoders(rig: Rig, repeat: int) -> dict[str, float]:
    norm = rig.normaliser()
    m = min(rig.n, 20_000)
    evs = [norm.normalise(r) for r in rows(decode_batch(rig.blob[: m * EVENT_SIZE], EVENT_SIZE))]
    dicts = [msgspec.to_builtins(e) for e in evs]
    enc = msgspec.json.Encoder()
    o = orjson.OPT_APPEND_NEWLINE
    res = {
        "json: msgspec Encoder.encode_lines(Structs)": best_of(repeat, lambda: evs, enc.encode_lines, m),
        "json: msgspec encode per Struct + newline": best_of(
            repeat, lambda: evs, lambda es: b"".join(enc.encode(e) + b"\n" for e in es), m),  # type: ignore[attr-defined]
        "json: orjson.dumps per dict (dicts prebuilt)": best_of(
            repeat, lambda: dicts, lambda ds: b"".join(orjson.dumps(d, option=o) for d in ds), m),  # type: ignore[attr-defined]
        "json: orjson.dumps(to_builtins(Struct))": best_of(
            repeat, lambda: evs,
            lambda es: b"".join(orjson.dumps(msgspec.to_builtins(e), option=o) for e in es), m),  # type: ignore[attr-defined]
    }
    same = enc.encode_lines(evs) == b"".join(orjson.dumps(d, option=o) for d in dicts)
    res["json: (msgspec and orjson bytes identical)"] = float(same)
    return res


def share_counters(kernel: FakeKernel) -> mmap.mmap:
    """Back the fake kernel's per-CPU counter array with shared memory, so a forked
    producer's counts are what the agent's ticker reads (as with a real kernel)."""
    c = kernel.counters
    buf = mmap.mmap(-1, c.max_entries * c.ncpu * 8)  # anonymous, MAP_SHARED: survives fork
    arr = np.frombuffer(buf, dtype=np.int64).reshape(c.max_entries, c.ncpu)
    c.values = [arr[i] for i in range(c.max_entries)]  # type: ignore[misc]
    return buf


_RESULT = struct.Struct("<qdd")  # emitted, elapsed, max ring fill


def producer_process(kernel: FakeKernel, blob: bytes, per_ms: int, seconds: float,
                     start_r: int, done_w: int) -> None:
    """The forked producer (a kernel is not on the agent's core): waits for the start
    byte, then writes ``per_ms`` records every millisecond (catching up when late, so
    the offered rate holds on average) for ``seconds``, reports, and exits."""
    cpus = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpus[-1]})  # the other CPU than the agent's (CPU 0)
    os.read(start_r, 1)
    ring = kernel.rings["audit"]
    emitted = tick = 0
    lag_max = 0.0
    t0 = time.monotonic()
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        target = t0 + tick * 0.001
        if now < target:
            time.sleep(target - now)
        due = int((time.monotonic() - t0) * 1000) + 1 - tick
        for _ in range(max(1, due)):
            off = (tick % 1000) * per_ms * EVENT_SIZE
            kernel.emit_bulk("audit", blob[off : off + per_ms * EVENT_SIZE], per_ms)
            emitted += per_ms
            tick += 1
        lag_max = max(lag_max, ring.available_bytes() / ring.size)
    os.write(done_w, _RESULT.pack(emitted, time.monotonic() - t0, lag_max))
    os._exit(0)


async def offered_load(rate: int, seconds: float, tmpdir: str, producer: str = "process",
                       workers: int = 0, kafka: str | None = None) -> dict[str, float]:
    """Real-time run of the agent's Pipeline at a fixed offered audit load.

    ``producer="process"``: the records come from a forked process on the other CPU
    (the kernel's place); ``"inline"``: from a trio task on the agent's own core.
    ``kafka``: a bootstrap address; the Kafka sink (producer process, the agent's
    default) is attached next to the file sink, as ``aegis run --kafka`` does."""
    kernel = FakeKernel()  # the object's ring sizes (abi.DENY_RING_BYTES, abi.AUDIT_RING_BYTES)
    store = PolicyStore(Path(tmpdir) / f"state-{rate}-{producer}-{workers}")
    store.record(sample_record(7))
    norm = fixed_normaliser(store, processes={1000 + i: ("/usr/bin/cat", ["cat"]) for i in range(64)})
    sink: Any = JsonLinesFileSink(os.devnull)
    if kafka:
        sink = await _with_kafka(sink, kafka, Path(tmpdir) / f"kspool-{rate}-{producer}-{workers}")
    per_ms = max(1, rate // 1000)
    blob = make_events(per_ms * 1000, generation=7, rule_ids=3, pids=64)
    # workers (if any) may run on every CPU: the agent's main process stays pinned
    cfg = PipelineConfig(spool_dir=str(Path(tmpdir) / f"spool-{rate}-{producer}-{workers}"), tick_s=0.5,
                         audit_workers=workers,
                         audit_worker_cpus=frozenset(range(os.cpu_count() or 1)) if workers else None)
    if producer == "process":
        return await _offered_load_forked(kernel, norm, sink, blob, rate, per_ms, seconds, cfg)
    p = Pipeline(kernel.consumers(), norm, _sinks(sink), kernel.view(), config=cfg)
    emitted = 0
    lag_max = 0.0
    cpu0 = time.process_time()
    async with trio.open_nursery() as n:
        await n.start(p.run)
        t0 = trio.current_time()
        tick = 0
        while True:
            target = t0 + tick * 0.001
            now = trio.current_time()
            if now - t0 >= seconds:
                break
            if now < target:
                await trio.sleep(target - now)
            # catch up if the loop fell behind: the offered rate is kept on average
            due = int((trio.current_time() - t0) * 1000) + 1 - tick
            for _ in range(max(1, due)):
                off = (tick % 1000) * per_ms * EVENT_SIZE
                kernel.emit_bulk("audit", blob[off : off + per_ms * EVENT_SIZE], per_ms)
                emitted += per_ms
                tick += 1
            lag_max = max(lag_max, kernel.rings["audit"].available_bytes() / (4 << 20))
        elapsed = trio.current_time() - t0
        await p.drain_and_stop(timeout=30)
    return await _result(p, sink, kernel, "inline", rate, emitted, elapsed, lag_max,
                         time.process_time() - cpu0)


async def _offered_load_forked(kernel: FakeKernel, norm, sink, blob: bytes, rate: int, per_ms: int,  # type: ignore[no-untyped-def]
                               seconds: float, cfg: PipelineConfig) -> dict[str, float]:
    shared = share_counters(kernel)
    start_r, start_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the producer: no trio here
        try:
            producer_process(kernel, blob, per_ms, seconds, start_r, done_w)
        finally:
            os._exit(1)
    os.close(start_r)
    os.close(done_w)
    p = Pipeline(kernel.consumers(), norm, _sinks(sink), kernel.view(), config=cfg)
    cpu0 = time.process_time()
    try:
        async with trio.open_nursery() as n:
            await n.start(p.run)
            os.write(start_w, b"x")
            await trio.lowlevel.wait_readable(done_r)
            emitted, elapsed, lag_max = _RESULT.unpack(os.read(done_r, _RESULT.size))
            await p.drain_and_stop(timeout=30)
    finally:
        os.waitpid(pid, 0)
        for fd in (start_w, done_r):
            os.close(fd)
    del shared  # unmapped once the counter views are gone
    return await _result(p, sink, kernel, "process", rate, emitted, elapsed, lag_max,
                         time.process_time() - cpu0)


class _Both:
    """The file sink and the Kafka sink as the pipeline's one sink list entry would be
    two: the bench's helpers take one ``sink``; the pipeline gets ``sinks``."""

    def __init__(self, file: Any, kafka: Any) -> None:
        self.file = file
        self.kafka = kafka
        self.sinks = [file, kafka]

    async def aclose(self) -> None:
        await self.file.aclose()
        await self.kafka.aclose()


async def _with_kafka(file: Any, bootstrap: str, spool: Path) -> _Both:
    from aegis_stream.fleet.sink import open_kafka_sink

    kafka = await open_kafka_sink(bootstrap, host_key="bench-pipeline", spool_dir=spool)
    # the agent's process is pinned to CPU 0; its producer process (a child) inherited
    # that: let it run anywhere, as it would beside an unpinned agent
    if kafka.producer_pid:
        cpus = os.environ.get("AEGIS_BENCH_KAFKA_CPUS")
        os.sched_setaffinity(kafka.producer_pid, [int(c) for c in cpus.split(",")] if cpus
                             else range(os.cpu_count() or 1))
    return _Both(file, kafka)


def _sinks(sink: Any) -> list[Any]:
    return list(sink.sinks) if isinstance(sink, _Both) else [sink]


async def _result(p: Pipeline, sink, kernel: FakeKernel, producer: str, rate: int, emitted: int,  # type: ignore[no-untyped-def]
                  elapsed: float, lag_max: float, cpu_s: float) -> dict[str, float]:
    st = p.statistics()
    a = st.classes["audit"]
    kafka: dict[str, Any] = {}
    if isinstance(sink, _Both):
        t = time.monotonic()
        await sink.aclose()  # flushes what librdkafka holds (bounded): acked counts settle
        ks = sink.kafka.statistics()
        kafka = {"kafka_sent": ks.sent, "kafka_acked": ks.acked, "kafka_close_s": time.monotonic() - t,
                 "kafka_dropped": {r: n for r, n in ks.dropped.items() if n}}
    else:
        await sink.aclose()
    kernel.close()
    dropped = a.kernel_dropped + a.dropped_userspace
    # the pipeline's own accounting must add up against what the producer reports
    assert a.kernel_emitted == emitted, (a.kernel_emitted, emitted)
    assert emitted == a.delivered + dropped + a.backlog, (emitted, a)
    return {"producer": producer, "workers": p.config.audit_workers, "offered_per_s": rate,
            "achieved_offered_per_s": emitted / elapsed,
            "emitted": emitted, "delivered": a.delivered, "kernel_dropped": a.kernel_dropped,
            "userspace_dropped": a.dropped_userspace, "drop_ratio": dropped / emitted if emitted else 0.0,
            "max_ring_fill": lag_max, "agent_cpu_s": cpu_s, "elapsed_s": elapsed,
            "loadavg_1m": os.getloadavg()[0], **kafka}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--rates", default="100000,200000,400000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="20k events, 2 repeats, 1 s loads")
    ap.add_argument("--producer", default="process,inline",
                    help="offered-load producers to run: process (forked, on the other CPU: "
                         "where a kernel producer is) and/or inline (a trio task on the agent's core)")
    ap.add_argument("--workers", default="0",
                    help="audit worker processes to run the offered loads with, e.g. 0,2")
    ap.add_argument("--loads-only", action="store_true", help="skip the throughput tables")
    ap.add_argument("--kafka", metavar="BOOTSTRAP",
                    help="attach the Kafka sink (producer process) next to the file sink, "
                         "e.g. a broker from 'scripts/kafka start'")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.quick:
        args.events, args.repeat, args.seconds = 20_000, 2, 1.0
    pinned = pin_one_cpu()
    print(f"aegis pipeline bench: {args.events:,} events, best of {args.repeat}, batch {args.batch}, "
          f"{pinned}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.2f}")
    tp: dict[str, float] = {}
    js: dict[str, float] = {}
    if not args.loads_only:
        rig = Rig(args.events)
        try:
            tp = throughput(rig, args.repeat, args.batch)
            js = json_encoders(rig, args.repeat)
        finally:
            rig.close()
        base = tp["BASELINE drain + struct.unpack + normalise + JSON, per record"]
        print(f"\n{'throughput (one core)':70s} {'events/s':>12s} {'vs baseline':>12s}")
        for k, v in tp.items():
            print(f"{k:70s} {v:12,.0f} {v / base:11.1f}x")
        print()
        for k, v in js.items():
            print(f"{k:70s} {v:12,.0f}" if "identical" not in k else f"{k:70s} {bool(v)!s:>12s}")
    loads = []
    with tempfile.TemporaryDirectory(prefix="aegis-load-") as tmp:
        for producer in args.producer.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                for rate in (int(r) for r in args.rates.split(",") if r):
                    loads.append(trio.run(offered_load, rate, args.seconds, tmp, producer, workers,
                                          args.kafka))
    title = f"offered load (audit, real time, {args.seconds} s)"
    print(f"\n{title:30s} {'producer':>8s} {'wk':>2s} "
          f"{'achieved':>10s} {'delivered':>10s} {'kernel drop':>11s} {'user drop':>10s} "
          f"{'drop ratio':>10s} {'max fill':>8s} {'agent CPU':>9s} {'load 1m':>7s}")
    for r in loads:
        print(f"{r['offered_per_s']:>28,.0f}/s {r['producer']:>8s} {r['workers']:>2d} "
              f"{r['achieved_offered_per_s']:>10,.0f} "
              f"{r['delivered']:>10,} {r['kernel_dropped']:>11,} {r['userspace_dropped']:>10,} "
              f"{r['drop_ratio']:>10.4%} {r['max_ring_fill']:>8.1%} "
              f"{r['agent_cpu_s'] / r['elapsed_s']:>9.0%} {r['loadavg_1m']:>7.2f}")
        if "kafka_sent" in r:
            print(f"{'':30s} kafka: sent {r['kafka_sent']:,}, acked {r['kafka_acked']:,} "
                  f"({r['kafka_acked'] / max(1, r['emitted']):.1%} of emitted), dropped "
                  f"{r['kafka_dropped'] or 0} (close/flush {r['kafka_close_s']:.1f} s)")
    if args.json:
        Path(args.json).write_bytes(msgspec.json.encode(
            {"events": args.events, "repeat": args.repeat, "batch": args.batch, "pinned": pinned,
             "throughput": tp, "json": js, "loads": loads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
