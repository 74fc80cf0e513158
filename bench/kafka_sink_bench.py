#!/usr/bin/env python3
"""Kafka sink throughput: decisions/s from the agent's sink into a real local broker, and
what it costs the agent's own process, the producer process side by side with the
in-process sink, in one run.

    .venv/bin/python -m bench.kafka_sink_bench                  # own broker (~1-2 min)
    .venv/bin/python -m bench.kafka_sink_bench --quick          # smaller
    .venv/bin/python -m bench.kafka_sink_bench --all            # + the client alternatives
    .venv/bin/python -m bench.kafka_sink_bench --bootstrap H:P  # an existing broker with the topics

Rows (every one writes the same encoded batches: ``--batch`` JSON lines of
``aegis.decision.v1`` records, ~700 bytes each, as the pipeline hands them to a sink):

``file``              the JSON-lines file sink (the baseline the agent has today)
``kafka in-process``  KafkaSink(producer_process=False): confluent-kafka (librdkafka),
                      produce() per record inline on the trio thread, delivery reports on
                      the sink's poll thread, lz4
``kafka process``     KafkaSink as shipped: the same produce loop in a forked producer
                      process, one frame per batch over a socket pair, one back per batch
``kafka deny ...``    the durable path in both modes: deny batches of ``--deny-batch``
                      awaited until acked (idempotent producer, acks=all), one after another
with ``--all`` also:
``kafka-nolz4``       in-process without compression (the aiokafka row has none)
``kafka-to-thread``   in-process but each batch's produce loop in ``trio.to_thread``
``aiokafka``          aiokafka 0.14 under plain asyncio (no trio): send() per record, all
                      futures awaited at the end.  An *upper bound* for the trio-asyncio
                      route (which adds its loop bridging on top); skipped if not installed

Audit rows are timed from the first write until the broker acked every record (so a
client queue is not mistaken for throughput); the kafka rows hand a batch over only while
at most 4 batches are unacknowledged (a sustained rate: a burst beyond librdkafka's bounded
queue would be shed, counted ``sink/queue_full``, and the rate would mean nothing).
``agent cpu`` is the agent process's CPU time (user+sys, all its threads, an in-process
librdkafka's included) over the same span, ``/100k`` the same per 100,000 events: the
number that decides whether the sink lowers the agent's own ceiling (200,000 audit
events/s).  ``producer cpu /100k`` is the producer process's (from /proc), paid on another
core.  ``write() cpu s`` (notes) is the trio thread's own CPU inside ``sink.write`` (the
rest of ``agent cpu`` is the sink's threads, librdkafka's in-process, and this bench's
own wait loop, the same in every row).  The broker's JVM is a separate process.  The
ratio column is events/s against the ``kafka in-process`` row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from aegis_stream.fleet.sink import KafkaSink
from aegis_stream.fleet.topics import DECISION_TOPIC, schema_headers
from aegis_stream.pipeline.schema import DecisionEvent
from aegis_stream.pipeline.sinks import JsonLinesFileSink, SinkBatch

_enc = msgspec.json.Encoder()


def make_batches(n: int, batch: int, host: str) -> list[SinkBatch]:
    proto = DecisionEvent(
        event_id="", time="2026-12-01T08:00:00.000000Z", ktime_ns=0, host=host, hook="file_open",
        action="open", decision="audit", mode="audit", rule_id="etc-shadow-read", rule_index=3,
        generation=7, policy_name="baseline", policy_version=12, policy_digest="sha256:" + "ab" * 32,
        rule_source="/etc/shadow", dev="8:1", ino=1311042, cgroup_id=4242,
        cgroup_path="/system.slice/nginx.service", scope_cgroup_id=0, scope_cgroup_path="",
        pid=31337, tid=31337, uid=33, gid=33, comm="nginx", exe="/usr/sbin/nginx",
        cmdline=["nginx", "-g", "daemon off;"],
    )
    out = []
    for start in range(0, n, batch):
        k = min(batch, n - start)
        lines = b"".join(
            _enc.encode(msgspec.structs.replace(proto, event_id=f"0badc0de-{1000 + i}-{i % 97}",
                                                ktime_ns=1000 + i)) + b"\n"
            for i in range(start, start + k))
        out.append(SinkBatch("audit", lines, k))
    return out


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ThreadProduceSink(KafkaSink):
    """The alternative: each best-effort batch's produce loop runs in trio.to_thread."""

    async def write(self, batch: SinkBatch) -> None:
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        if batch.klass == "audit":
            await trio.to_thread.run_sync(self._write_best_effort, batch)
            self.batches += 1
            self.events += batch.count
            return
        await super().write(batch)


def proc_cpu_s(pid: int) -> float:
    """utime+stime of another process (0.0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Result = tuple[float, float, dict[str, Any]]


async def run_kafka(cls: type[KafkaSink], bootstrap: str, batches: list[SinkBatch], spool: Path,
                    process: bool, **config: Any) -> Result:
    sink = cls(bootstrap, host_key=f"bench-{uuid.uuid4().hex[:8]}", spool_dir=spool, config=config,
               producer_process=process)
    notes: dict[str, Any] = {}
    try:
        total = sum(b.count for b in batches)
        pid = sink.producer_pid
        p0 = proc_cpu_s(pid) if pid else 0.0
        c0, t0 = cpu_s(), time.perf_counter()
        in_write = 0.0
        for b in batches:
            # sustained rate, not a burst into a shedding queue: wait while more than 4
            # batches are unacknowledged (aiokafka's send() waits for buffer room the same way)
            while sink.events - sink.acked - sum(sink.dropped.values()) > 4 * b.count:
                await trio.sleep(0.001)
            w0 = time.thread_time()
            await sink.write(b)  # audit: no checkpoint inside, so this is the trio thread's cost
            in_write += time.thread_time() - w0
            await trio.sleep(0)  # a real agent's other tasks get the loop between batches
        while sink.acked + sum(sink.dropped.values()) < total:
            await trio.sleep(0.002)
        dt, dc = time.perf_counter() - t0, cpu_s() - c0
        notes["write() cpu s"] = round(in_write, 3)
        if pid:
            notes["producer cpu s"] = round(proc_cpu_s(pid) - p0, 2)
    finally:
        await sink.aclose()
    st = sink.statistics()
    return dt, dc, {"acked": st.acked, "dropped": sum(st.dropped.values()), **notes}


async def run_deny(bootstrap: str, batches: list[SinkBatch], spool: Path, process: bool) -> Result:
    sink = KafkaSink(bootstrap, host_key=f"bench-{uuid.uuid4().hex[:8]}", spool_dir=spool,
                     producer_process=process)
    notes: dict[str, Any] = {}
    try:
        pid = sink.producer_pid
        p0 = proc_cpu_s(pid) if pid else 0.0
        c0, t0 = cpu_s(), time.perf_counter()
        for b in batches:
            await sink.write(SinkBatch("deny", b.lines, b.count))
        dt, dc = time.perf_counter() - t0, cpu_s() - c0
        if pid:
            notes["producer cpu s"] = round(proc_cpu_s(pid) - p0, 2)
    finally:
        await sink.aclose()
    st = sink.statistics()
    rtt = st.rtt_sum / st.rtt_count if st.rtt_count else 0.0
    if st.reason:
        notes["reason"] = st.reason
    if st.producer_lost:
        notes["producer lost"] = st.producer_lost
    return dt, dc, {"acked": st.acked, "spooled": st.spooled, "mean batch rtt ms": round(rtt * 1e3, 2),
                    **notes}


async def run_file(batches: list[SinkBatch], path: Path) -> Result:
    sink = JsonLinesFileSink(path, max_bytes=1 << 40)
    c0, t0 = cpu_s(), time.perf_counter()
    for b in batches:
        await sink.write(b)
        await trio.sleep(0)
    dt, dc = time.perf_counter() - t0, cpu_s() - c0
    await sink.aclose()
    return dt, dc, {}


def run_aiokafka(bootstrap: str, batches: list[SinkBatch]) -> Result | None:
    try:
        from aiokafka import AIOKafkaProducer
    except ImportError:
        return None
    headers = schema_headers("aegis.decision.v1", 1)
    key = f"bench-{uuid.uuid4().hex[:8]}".encode()

    async def main() -> tuple[float, float, dict[str, Any]]:
        p = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                             linger_ms=5, max_batch_size=1 << 20)
        await p.start()
        try:
            futs: list[Awaitable[Any]] = []
            c0, t0 = cpu_s(), time.perf_counter()
            for b in batches:
                for line in b.lines.splitlines():
                    futs.append(await p.send(DECISION_TOPIC, line, key=key, headers=headers))
                await asyncio.sleep(0)
            res = await asyncio.gather(*futs, return_exceptions=True)
            dt, dc = time.perf_counter() - t0, cpu_s() - c0
        finally:
            await p.stop()
        failed = sum(isinstance(r, BaseException) for r in res)
        return dt, dc, {"acked": len(res) - failed, "dropped": failed}

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", help="an existing broker with the aegis topics (default: start one)")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=4096, help="records per audit batch")
    ap.add_argument("--deny-batch", type=int, default=64, help="records per deny batch")
    ap.add_argument("--deny-events", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="20,000 audit / 2,000 deny events")
    ap.add_argument("--all", action="store_true",
                    help="also the client alternatives (nolz4, to_thread, aiokafka)")
    args = ap.parse_args()
    if args.quick:
        args.events, args.deny_events = 20_000, 2_000

    tmp = Path(tempfile.mkdtemp(prefix="aegis-kafka-bench-"))
    broker = None
    try:
        bootstrap = args.bootstrap
        if bootstrap is None:
            from aegis_stream.fleet.broker import LocalBroker
            from aegis_stream.fleet.topics import create_topics

            broker = LocalBroker(tmp / "kafka")
            print("starting a local broker ...", file=sys.stderr, flush=True)
            broker.start()
            bootstrap = broker.bootstrap
            create_topics(bootstrap)
        batches = make_batches(args.events, args.batch, "bench")
        deny = make_batches(args.deny_events, args.deny_batch, "bench")
        size = sum(len(b.lines) for b in batches) / args.events
        print(f"# {args.events} audit events in batches of {args.batch} ({size:.0f} B/event), "
              f"{args.deny_events} denies in batches of {args.deny_batch}; broker {bootstrap}; "
              f"load avg {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")

        rows: list[tuple[str, int, Result | None]] = []

        def row(name: str, n: int, fn: Callable[[], Result | None]) -> None:
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            rows.append((name, n, fn()))

        # warm-up, not reported: the broker's first connections, partition leaders, JIT
        print("  warm-up ...", file=sys.stderr, flush=True)
        for i, process in enumerate((False, True)):
            trio.run(run_kafka, KafkaSink, bootstrap, batches[:3], tmp / f"w{i}", process)
        row("file", args.events, lambda: trio.run(run_file, batches, tmp / "events.jsonl"))
        row("kafka in-process", args.events,
            lambda: trio.run(run_kafka, KafkaSink, bootstrap, batches, tmp / "s1", False))
        row("kafka process", args.events,
            lambda: trio.run(run_kafka, KafkaSink, bootstrap, batches, tmp / "s2", True))
        if args.all:
            row("kafka-nolz4", args.events, lambda: trio.run(
                lambda: run_kafka(KafkaSink, bootstrap, batches, tmp / "s3", False,
                                  **{"compression.type": "none"})))
            row("kafka-to-thread", args.events,
                lambda: trio.run(run_kafka, ThreadProduceSink, bootstrap, batches, tmp / "s4", False))
            row("aiokafka", args.events, lambda: run_aiokafka(bootstrap, batches))
        row("kafka deny in-proc", args.deny_events,
            lambda: trio.run(run_deny, bootstrap, deny, tmp / "s5", False))
        row("kafka deny process", args.deny_events,
            lambda: trio.run(run_deny, bootstrap, deny, tmp / "s6", True))

        ref = next(r for name, _, r in rows if name == "kafka in-process")
        ref_rate = args.events / ref[0] if ref else 0.0
        print(f"{'design':<19} {'events':>8} {'wall s':>7} {'events/s':>9} {'agent cpu s':>11} "
              f"{'/100k':>6} {'producer cpu /100k':>18} {'vs in-proc':>10}  notes")
        for name, n, r in rows:
            if r is None:
                print(f"{name:<19} {'skipped (not installed)':>40}")
                continue
            dt, dc, notes = r
            rate = n / dt
            ratio = f"{rate / ref_rate:.2f}x" if ref_rate else "-"
            pc = notes.get("producer cpu s")
            pcs = f"{pc / n * 1e5:.3f}" if pc is not None else "-"
            print(f"{name:<19} {n:>8} {dt:>7.2f} {rate:>9,.0f} {dc:>11.2f} {dc / n * 1e5:>6.3f} "
                  f"{pcs:>18} {ratio:>10}  {notes or ''}")
        return 0
    finally:
        if broker is not None:
            if not broker.stop():
                broker.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
