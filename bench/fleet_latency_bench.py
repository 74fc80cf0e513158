"""Fleet end-to-end latency: kernel ring -> Kafka -> the fleet worker's table, at a steady rate.

    python -m bench.fleet_latency_bench [--rate 10000] [--seconds 10] [--audit-share 0.9]
                                        [--spool-batches 500] [--json]

One run, two sections, on a local broker started for it (jars from ``scripts/kafka fetch``):

spool
    Before the broker is up, a KafkaSink (producer process mode, the default) is opened on
    its port: it starts down.  ``--spool-batches`` deny batches of 100 decisions (the
    records :mod:`pipelines.fleet_gen` makes, ~650 bytes each) are written to it: every one
    goes to its :class:`~aegis_stream.fleet.sink.LineSpool` (the write rate).  Then the
    broker starts, the topics are created, and the sink's poll thread replays the spool
    (``probe_max_s`` 1 s): the time from the topics being there to the first replayed
    batch (reconnect) and from then until the spool is empty (the replay rate), checked
    against the sink's own counts (every spooled record retried and acked).

latency
    The real agent :class:`~aegis_stream.pipeline.Pipeline` on the fake kernel, the real
    KafkaSink, one fleet worker process (``python -m pipelines.fleet worker``).  The fake
    kernel's ``ktime_ns`` is CLOCK_MONOTONIC (as bpf_ktime_get_ns); every 5 ms the bench
    puts the decisions due by then into the rings, stamped with the time they went in.
    Denies are 10% of the decisions by default (``--audit-share``).  Per decision:

    * ring -> Kafka ack: a deny batch's ``KafkaSink.write`` returns once every record of
      it is acked (acks=all, idempotent), so the bench's thin wrapper around the sink
      stamps each deny of the batch then (denies only: audit is produced without waiting).
      The sink's own round-trip histogram (produce -> ack per produced batch of any class,
      its ``aegis_sink_*`` buckets) is printed next to it.
    * ring -> table: the worker, run with ``AEGIS_FLEET_LATENCY_LOG`` (pipelines/fleet.py),
      writes per absorbed batch the CLOCK_MONOTONIC time its rows were in the table and
      the ``ktime_ns`` of its records; both clocks are the same host's.

    The worker is caught up (the spool section's records absorbed) before the agent
    starts; the first ``--warmup`` seconds of decisions are left out of the percentiles.

    Measured (shared 2-core machine; docs/PERFORMANCE.md): at 10,000/s every decision
    reached the table, none lost.  Before the deny writer coalesced (``--coalesce-max-events
    1`` reproduces it) the deny path did not keep up with a steady deny stream: one write
    per sink at a time, each waiting for its acks, one small batch (~5-25 denies) per
    5 ms ring read, so the sink took ~270 denies/s and deny ring -> ack grew to 15-27 s.
    Coalesced (the default), side by side at a load average of 4-5: deny ring -> ack p50
    53 ms / p99 240 ms and ring -> table p99 0.9 s at 10% denies, p99 556 ms / 603 ms at
    50%, against p50 18.6 s / p99 28.2 s with ``--coalesce-max-events 1``.  With audit
    only (``--audit-share 1``) ring -> table was p50 0.35 s, p99 2.4 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import trio

from pipelines import fleet_gen as g

SPOOL_BATCH = 100  # decisions per spooled deny batch
TICK_S = 0.005  # the emitter's period


class Percentiles(msgspec.Struct, frozen=True):
    n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class SpoolResult(msgspec.Struct, frozen=True):
    batches: int
    events: int
    bytes: int
    write_s: float
    write_events_per_s: float
    write_mb_per_s: float
    reconnect_s: float  # topics there -> first batch replayed
    replay_s: float  # first batch replayed -> spool empty
    replay_events_per_s: float
    replay_mb_per_s: float
    retried: int
    acked: int
    complete: bool  # every spooled record retried and acked, nothing left


class LatencyResult(msgspec.Struct, frozen=True):
    offered_per_s: int
    seconds: float
    emitted: int
    emitted_per_s: float
    table_per_s: float  # measured decisions that reached the table, per second of the window
    measured: int
    in_table: int  # of the measured decisions
    deny_ack: Percentiles | None
    deny_table: Percentiles | None
    audit_table: Percentiles | None
    sink_rtt: dict[str, float]  # per-batch produce -> ack, from the sink's histogram buckets
    kernel_dropped: int
    dropped_userspace: int
    sink_spooled: int
    sink_dropped: int
    rss_mb: dict[str, float]


class BenchResult(msgspec.Struct, frozen=True):
    spool: SpoolResult
    latency: LatencyResult


_stamp = msgspec.json.Decoder(type=dict[str, Any])


class _Kt(msgspec.Struct):
    ktime_ns: int = 0


_kt = msgspec.json.Decoder(_Kt)


def pct(values_ns: list[int]) -> Percentiles | None:
    if not values_ns:
        return None
    v = sorted(values_ns)
    n = len(v)

    def at(q: float) -> float:
        return round(v[min(n - 1, int(q * n))] / 1e6, 2)

    return Percentiles(n=n, p50_ms=at(0.50), p95_ms=at(0.95), p99_ms=at(0.99), max_ms=round(v[-1] / 1e6, 2))


def rtt_quantiles(buckets: tuple[int, ...]) -> dict[str, float]:
    """p50/p95/p99 of the sink's round-trip histogram as bucket upper bounds (ms)."""
    from aegis_stream.fleet.sink import RTT_BUCKETS

    total = sum(buckets)
    out: dict[str, float] = {"batches": float(total)}
    for name, q in (("p50_le_ms", 0.5), ("p95_le_ms", 0.95), ("p99_le_ms", 0.99)):
        acc = 0
        for i, c in enumerate(buckets):
            acc += c
            if total and acc >= q * total:
                out[name] = RTT_BUCKETS[i] * 1000 if i < len(RTT_BUCKETS) else float("inf")
                break
    return out


def rss_mb(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# ------------------------------------------------------------------ spool section
async def spool_section(broker: Any, bootstrap: str, batches: int, workdir: Path) -> SpoolResult:
    from aegis_stream.fleet.sink import open_kafka_sink
    from aegis_stream.fleet.topics import create_topics
    from aegis_stream.pipeline.sinks import SinkBatch

    enc = msgspec.json.Encoder()
    sink = await open_kafka_sink(bootstrap, host_key="bench-spool", spool_dir=workdir / "spool",
                                 spool_max_bytes=1 << 30, check_timeout_s=1.0, probe_max_s=1.0)
    try:
        if sink.up:
            raise RuntimeError(f"the sink is up before the broker started ({bootstrap})")
        bodies = []
        for b in range(batches):  # encoded before the clock runs: the spool's rate, not msgspec's
            lines = b"".join(enc.encode(ev) + b"\n" for ev in g.decisions(SPOOL_BATCH, start=b * SPOOL_BATCH))
            bodies.append(SinkBatch("deny", lines, SPOOL_BATCH))
        size = sum(len(x.lines) for x in bodies)
        t0 = time.perf_counter()
        for batch in bodies:
            await sink.write(batch)
        write_s = time.perf_counter() - t0
        del bodies
        st = sink.statistics()
        events = batches * SPOOL_BATCH
        if st.spooled != events:
            raise RuntimeError(f"{st.spooled} of {events} records spooled (sink {st.reason or 'up'})")
        await trio.to_thread.run_sync(broker.start)
        await trio.to_thread.run_sync(create_topics, bootstrap)
        t_up = time.perf_counter()
        t_first = 0.0
        deadline = t_up + 60
        while sink.spool.pending_batches and time.perf_counter() < deadline:
            if not t_first and sink.spool.replayed:
                t_first = time.perf_counter()
            await trio.sleep(0.005)
        t_end = time.perf_counter()
        t_first = t_first or t_end
        st = sink.statistics()
        replay_s = max(t_end - t_first, 1e-6)
        return SpoolResult(
            batches=batches, events=events, bytes=size, write_s=round(write_s, 3),
            write_events_per_s=round(events / write_s), write_mb_per_s=round(size / write_s / 1e6, 1),
            reconnect_s=round(t_first - t_up, 2), replay_s=round(replay_s, 2),
            replay_events_per_s=round(events / replay_s), replay_mb_per_s=round(size / replay_s / 1e6, 1),
            retried=st.retried, acked=st.acked,
            complete=not sink.spool.pending_batches and st.retried == events and st.acked >= events,
        )
    finally:
        await sink.aclose()


# ------------------------------------------------------------------ latency section
class AckStamps:
    """The Kafka sink, with each deny stamped when its batch's ``write`` returned (acked)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.acked: list[tuple[int, int]] = []  # (ktime_ns, acked at)

    async def write(self, batch: Any) -> None:
        await self.inner.write(batch)
        if batch.klass == "deny":
            now = time.monotonic_ns()
            self.acked += [(_kt.decode(line).ktime_ns, now) for line in batch.lines.splitlines()]

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self) -> Any:
        return self.inner.statistics()


async def agent_section(bootstrap: str, worker: g.WorkerProcess, rate: int, seconds: float,
                        warmup: float, audit_share: float, workdir: Path, base: float) -> dict[str, Any]:
    from aegis_stream.fleet.sink import open_kafka_sink
    from aegis_stream.kernel import abi
    from aegis_stream.pipeline import Pipeline, PipelineConfig
    from aegis_stream.policy.store import PolicyStore
    from aegis_stream.testing import FakeKernel, fixed_normaliser, install, make_events, sample_record

    kernel = FakeKernel(deny_ring_size=1 << 22, audit_ring_size=1 << 22)
    store = PolicyStore(workdir / "agent" / "state")
    install(kernel, store, sample_record(7, mode="enforce"))
    norm = fixed_normaliser(store)
    norm.host = "bench-agent"
    kafka = await open_kafka_sink(bootstrap, host_key="bench-agent", spool_dir=workdir / "agent" / "spool")
    sink = AckStamps(kafka)
    p = Pipeline(kernel.consumers(), norm, [sink], kernel.view(),
                 config=PipelineConfig(spool_dir=str(workdir / "agent" / "rawspool")))
    out: dict[str, Any] = {}
    try:
        async with trio.open_nursery() as n:
            await n.start(p.run)
            t0 = time.monotonic_ns()
            measure_from = t0 + int(warmup * 1e9)
            end = measure_from + int(seconds * 1e9)
            emitted = {"deny": 0, "audit": 0}
            total = measured = 0
            while True:
                now = time.monotonic_ns()
                if now >= end:
                    break
                due = int((now - t0) * rate / 1e9) - total
                if due > 0:
                    n_audit = int((total + due) * audit_share) - emitted["audit"]
                    for klass, cnt in (("deny", due - n_audit), ("audit", n_audit)):
                        if cnt > 0:
                            dec = abi.Decision.DENY if klass == "deny" else abi.Decision.AUDIT
                            # stamped now, 100 ns apart: unique event ids, never in the future
                            body = make_events(cnt, decision=dec, generation=7, rule_ids=3,
                                               start_ktime=now - cnt * 100, step_ns=100)
                            kernel.emit_bulk(klass, body, cnt)
                            emitted[klass] += cnt
                            s0 = now - cnt * 100  # stamps s0 + 100 i: those in the window
                            i_lo = max(0, -(-(measure_from - s0) // 100))
                            i_hi = min(cnt, -(-(end - s0) // 100))
                            measured += max(0, i_hi - i_lo)
                    total += due
                await trio.sleep(TICK_S)
            t_stop = time.monotonic_ns()
            with trio.fail_after(30):
                while any(c.in_flight or c.backlog for c in p.statistics().classes.values()):
                    await trio.sleep(0.05)
            # the worker has everything when its record count covers what was emitted
            def caught_up() -> None:
                worker.wait(lambda m: g.records(m) >= base + total, 30, "the agent's decisions")

            with trio.fail_after(40):
                await trio.to_thread.run_sync(caught_up)
            out.update(
                rss_mb={"agent": rss_mb(os.getpid()), "producer": rss_mb(kafka.producer_pid),
                        "worker": round(worker.rss_kb() / 1024, 1)},
            )
            st = p.statistics()
            ks = kafka.statistics()
            await p.drain_and_stop(timeout=30)
            n.cancel_scope.cancel()
        out.update(t0=t0, measure_from=measure_from, end=end, t_stop=t_stop, emitted=emitted, total=total,
                   measured=measured,
                   acked=sink.acked, kernel_dropped=sum(c.kernel_dropped for c in st.classes.values()),
                   dropped_userspace=sum(c.dropped_userspace for c in st.classes.values()),
                   sink_spooled=ks.spooled, sink_dropped=sum(ks.dropped.values()),
                   sink_rtt=rtt_quantiles(ks.rtt_buckets))
    finally:
        await kafka.aclose()
        kernel.close()
    return out


def table_stamps(path: Path) -> dict[str, list[tuple[int, int]]]:
    """(ktime_ns, applied at) per decision class from the worker's latency log."""
    out: dict[str, list[tuple[int, int]]] = {}
    with open(path, "rb") as f:
        for line in f:
            rec = _stamp.decode(line)
            t = rec["t"]
            for klass, kts in rec["kt"].items():
                out.setdefault(klass, []).extend((kt, t) for kt in kts)
    return out


def run(rate: int, seconds: float, warmup: float, audit_share: float, spool_batches: int,
        workdir: Path) -> BenchResult:
    from aegis_stream.fleet.broker import LocalBroker, free_port

    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = LocalBroker(workdir / "kafka", port=port)
    worker: g.WorkerProcess | None = None
    try:
        spool = trio.run(spool_section, broker, bootstrap, spool_batches, workdir)
        lat_log = workdir / "latency.jsonl"
        os.environ["AEGIS_FLEET_LATENCY_LOG"] = str(lat_log)  # the worker child inherits it
        try:
            worker = g.WorkerProcess(bootstrap, f"bench-lat-{uuid.uuid4().hex[:6]}", free_port(),
                                     data_dir=str(workdir / "worker"), log=str(workdir / "worker.log"),
                                     extra=["--summary-every", "3600", "--silent-after", "3600"])
            worker.start()
        finally:
            del os.environ["AEGIS_FLEET_LATENCY_LOG"]
        # caught up on the spool section's records before the clock of this one runs
        m = worker.wait(lambda m: g.records(m) >= spool.events, 90, "the spooled records")
        a = trio.run(agent_section, bootstrap, worker, rate, seconds, warmup, audit_share, workdir,
                     g.records(m))
        rss = dict(a["rss_mb"], broker=rss_mb(broker.pid()))
        worker.stop()
        worker = None
    except BaseException:
        log = workdir / "worker.log"
        if log.exists():  # the worker's own words go with the temp dir otherwise
            print(log.read_text(errors="replace")[-2000:], file=sys.stderr)
        raise
    finally:
        if worker is not None:
            worker.stop()
        if broker.pid() is not None and not broker.stop():
            broker.kill()

    lo, hi = a["measure_from"], a["end"]
    window_s = (hi - lo) / 1e9
    acked = [t - kt for kt, t in a["acked"] if lo <= kt < hi]
    tables = table_stamps(lat_log)
    deny_t = [t - kt for kt, t in tables.get("deny", []) if lo <= kt < hi]
    audit_t = [t - kt for kt, t in tables.get("audit", []) if lo <= kt < hi]
    measured = a["measured"]
    lat = LatencyResult(
        offered_per_s=rate, seconds=round(window_s, 2), emitted=a["total"],
        emitted_per_s=round(a["total"] / ((a["t_stop"] - a["t0"]) / 1e9)),
        table_per_s=round((len(deny_t) + len(audit_t)) / window_s), measured=measured,
        in_table=len(deny_t) + len(audit_t), deny_ack=pct(acked), deny_table=pct(deny_t),
        audit_table=pct(audit_t), sink_rtt=a["sink_rtt"], kernel_dropped=a["kernel_dropped"],
        dropped_userspace=a["dropped_userspace"], sink_spooled=a["sink_spooled"],
        sink_dropped=a["sink_dropped"], rss_mb=rss,
    )
    return BenchResult(spool=spool, latency=lat)


def _line(name: str, p: Percentiles | None) -> str:
    if p is None:
        return f"  {name:<22} (none)"
    return (f"  {name:<22} p50 {p.p50_ms:8.2f}  p95 {p.p95_ms:8.2f}  p99 {p.p99_ms:8.2f}  "
            f"max {p.max_ms:8.2f} ms   (n={p.n:,})")


def report(r: BenchResult) -> str:
    s, x = r.spool, r.latency
    rtt = x.sink_rtt
    return "\n".join([
        f"deny spool (KafkaSink LineSpool, broker down): {s.batches} batches x {SPOOL_BATCH} = "
        f"{s.events:,} denies, {s.bytes / 1e6:.1f} MB",
        f"  write   {s.write_s:.3f} s = {s.write_events_per_s:,} denies/s, {s.write_mb_per_s} MB/s",
        f"  replay  {s.replay_s:.2f} s = {s.replay_events_per_s:,} denies/s, {s.replay_mb_per_s} MB/s "
        f"(reconnect {s.reconnect_s:.2f} s after the topics existed); retried {s.retried:,}, "
        f"acked {s.acked:,}: {'complete' if s.complete else 'INCOMPLETE'}",
        f"end to end at {x.offered_per_s:,} decisions/s offered: emitted {x.emitted_per_s:,}/s, "
        f"{x.in_table:,} of {x.measured:,} measured decisions in the table "
        f"({x.table_per_s:,}/s over {x.seconds} s)",
        _line("ring -> Kafka ack deny", x.deny_ack),
        _line("ring -> table deny", x.deny_table),
        _line("ring -> table audit", x.audit_table),
        f"  sink round trip (produce -> ack per batch, any class, histogram, "
        f"{int(rtt.get('batches', 0)):,} batches): "
        f"p50 <= {rtt.get('p50_le_ms')} ms, p95 <= {rtt.get('p95_le_ms')} ms, "
        f"p99 <= {rtt.get('p99_le_ms')} ms",
        f"  lost: kernel {x.kernel_dropped}, pipeline {x.dropped_userspace}, sink dropped {x.sink_dropped}, "
        f"sink spooled {x.sink_spooled}",
        "  RSS MB: " + ", ".join(f"{k} {v}" for k, v in x.rss_mb.items()),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_latency_bench",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--rate", type=int, default=10_000, help="decisions/s offered to the rings")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds emitted before the window")
    p.add_argument("--audit-share", type=float, default=0.9, help="fraction of audit decisions")
    p.add_argument("--spool-batches", type=int, default=500, help=f"deny batches of {SPOOL_BATCH} to spool")
    p.add_argument("--coalesce-max-events", type=int, default=None, metavar="N",
                   help="the deny writer's coalescing limit (pipeline/writers.py; 1 = one "
                        "channel batch per write, the behaviour before coalescing)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.coalesce_max_events is not None:
        from aegis_stream.pipeline import writers

        writers.COALESCE_MAX_EVENTS = max(1, a.coalesce_max_events)
    if a.rate < 1 or a.seconds <= 0 or a.warmup < 0 or not 0 <= a.audit_share <= 1 or a.spool_batches < 1:
        print("fleet_latency_bench: --rate, --seconds, --spool-batches > 0, --warmup >= 0, "
              "0 <= --audit-share <= 1", file=sys.stderr)
        return 2
    from aegis_stream.fleet.broker import FETCH_HINT, kafka_lib

    if kafka_lib() is None:
        print(f"fleet_latency_bench: no Kafka jars; run {FETCH_HINT}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="aegis-fleet-latency-") as tmp:
        r = run(a.rate, a.seconds, a.warmup, a.audit_share, a.spool_batches, Path(tmp))
    print(msgspec.json.encode(r).decode() if a.json else report(r))
    x = r.latency
    ok = r.spool.complete and x.in_table == x.measured and not x.dropped_userspace and not x.kernel_dropped
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
