#!/usr/bin/env python3
"""Where does the agent's memory grow?  The soak's steady state without a kernel.

The real ``Pipeline`` (readers, normalisers, processors, JSON sink, ticker) and the real
``Normaliser`` (live /proc and cgroupfs, as in the agent) run against the fake kernel,
driven the way soak/driver.py drives the agent in a lab kernel: a policy swap every
``--swap-s`` seconds (``slots.swap`` + generation record + provenance append, as an apply
does), ``--deny-rate`` denied opens per second from a new process id each, an audit flood
every ``--flood-every`` seconds, a Prometheus scrape and a status heartbeat every few
seconds.  tracemalloc snapshots are taken after ``--warmup`` seconds and at the end;
the allocation sites that grew most are printed with the RSS next to them, so a creep
seen in the soak (docs/PERFORMANCE.md) can be named, not guessed.

    .venv/bin/python -m soak.memgrowth --duration 600          # ~10 min, ~10% of a core
    .venv/bin/python -m soak.memgrowth --duration 120 --quick  # smoke

``--allocators pymalloc,malloc`` runs the same workload once per allocator and round, each in
its own interpreter (``PYTHONMALLOC`` is read at start-up), alternating, and prints what one
flood leaves behind on each, side by side.  Measured (docs/PERFORMANCE.md): once the ticker's
trim has run, both leave ~1.5 MB; the agent stays on pymalloc, the faster of the two:

    .venv/bin/python -m soak.memgrowth --allocators pymalloc,malloc --rounds 2 \\
        --duration 75 --flood-first 20 --flood-s 10 --flood-every 1000 --flood-rate 400000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

from aegis_stream.kernel import abi
from aegis_stream.pipeline import Pipeline, PipelineConfig
from aegis_stream.pipeline.memtrim import release_freed_memory
from aegis_stream.pipeline.metrics import AegisMetrics
from aegis_stream.pipeline.normalise import Normaliser
from aegis_stream.pipeline.sinks import open_sink
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import (
    CG_WORKLOADS,
    DEV_SDA1,
    FakeKernel,
    FakeTask,
    install,
    sample_record,
)

HOOKS = ((abi.Hook.FILE_OPEN, abi.ACTION_OPEN), (abi.Hook.BPRM_CHECK, abi.ACTION_EXEC))
DENIED_INO = 1234  # sample_record's rule 0 (open + exec) on DEV_SDA1


def rss_parts_mb() -> dict[str, float]:
    """Resident memory by kind, MB, from /proc/self/status: anon, file, shmem (their sum
    is the RSS)."""
    parts = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                parts[line.split(":")[0][3:].lower()] = int(line.split()[1]) / 1e3
    return parts


async def drive(args: argparse.Namespace, tmp: Path, retire: bool = True) -> dict[str, object]:
    store = PolicyStore(tmp / "state")
    kernel = FakeKernel()
    gen = 1
    install(kernel, store, sample_record(gen, mode="enforce"))
    sink = open_sink(str(tmp / "events.jsonl"), max_bytes=8 << 20, backups=2)
    pipeline = Pipeline(kernel.consumers(), Normaliser(store), [sink], kernel.view(),
                        config=PipelineConfig(spool_dir=str(tmp / "spool")))
    if not retire:  # the agent before generations were retired from the caches
        pipeline.norm.retire_generations = lambda keep: 0  # type: ignore[method-assign]
    metrics = AegisMetrics(pipeline.statistics, caches=pipeline.norm.cache_statistics)
    pid = 10_000
    t0 = time.monotonic()
    rows: list[tuple[float, float, float, int]] = []  # (t, rss, anon, generation)
    snap0 = None
    flooding = False
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        next_swap = next_scrape = next_row = 0.0
        while (now := time.monotonic() - t0) < args.duration:
            if now >= next_swap:  # a new generation, alternating modes only during floods
                gen += 1
                flooding = (bool(args.flood_every) and now >= args.flood_first
                            and ((now - args.flood_first) % args.flood_every) < args.flood_s)
                install(kernel, store, sample_record(gen, mode="audit" if flooding else "enforce"))
                next_swap = now + args.swap_s
            n = args.flood_rate // 10 if flooding else max(1, args.deny_rate // 10)
            for i in range(n):
                # a flood comes from a few processes (the soak's four loops), the denials
                # from a new process each
                if not flooding:
                    pid += 1
                fpid = 9_000 + i % 4 if flooding else pid
                # the soak's denials come from several programs (comm) and both hooks:
                # one normalisation context per (generation, rule, hook, comm, ...)
                hook, action = HOOKS[fpid % 2]
                kernel.decide(hook, DEV_SDA1, DENIED_INO, action,
                              FakeTask(pid=fpid, tgid=fpid, cgroups=(1, CG_WORKLOADS),
                                       comm=f"prog{fpid % args.comms}"))
            if now >= next_scrape:
                metrics.exposition()
                pipeline.statistics()
                next_scrape = now + args.scrape_s
            if now >= next_row:
                parts = rss_parts_mb()
                rows.append((now, sum(parts.values()), parts["anon"], gen))
                caches = " ".join(f"{c.name}={c.size}/{c.capacity}"
                                  for c in pipeline.norm.cache_statistics())
                split = " ".join(f"{k} {v:.1f}" for k, v in parts.items())
                print(f"[{now:7.1f}s] rss {rows[-1][1]:6.1f} MB ({split})  gen {gen}  "
                      f"traced {tracemalloc.get_traced_memory()[0] / 1e6:6.2f} MB  {caches}", flush=True)
                if snap0 is None and now >= args.warmup and not args.no_trace:
                    gc.collect()
                    release_freed_memory()
                    snap0 = tracemalloc.take_snapshot()
                next_row = now + args.row_s
            await trio.sleep(0.1)
        gc.collect()  # the second snapshot while the pipeline still runs, as the first
        release_freed_memory()
        # the last row after the trim the agent's ticker makes once a burst has drained
        # (natively a flood may not be in flight at a tick, so the run makes sure of it)
        parts = rss_parts_mb()
        rows.append((time.monotonic() - t0, sum(parts.values()), parts["anon"], gen))
        print(f"[{rows[-1][0]:7.1f}s] rss {rows[-1][1]:6.1f} MB (anon {parts['anon']:.1f}) "
              "after gc.collect() and malloc_trim(0)", flush=True)
        caches = {c.name: c.size for c in pipeline.norm.cache_statistics()}
        snap1 = tracemalloc.take_snapshot() if snap0 is not None else None
        await pipeline.drain_and_stop(5.0)
        nursery.cancel_scope.cancel()
    await sink.aclose()
    kernel.close()
    return {"rows": rows, "snap0": snap0, "snap1": snap1, "generations": gen, "caches": caches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--warmup", type=float, default=120.0)
    ap.add_argument("--swap-s", type=float, default=5.0)
    ap.add_argument("--deny-rate", type=int, default=10)
    ap.add_argument("--flood-every", type=float, default=150.0)
    ap.add_argument("--flood-s", type=float, default=20.0)
    ap.add_argument("--flood-first", type=float, default=0.0,
                    help="seconds before the first flood (a warm-up snapshot before any flood)")
    ap.add_argument("--flood-rate", type=int, default=5000)
    ap.add_argument("--comms", type=int, default=8, help="distinct programs that are denied")
    ap.add_argument("--scrape-s", type=float, default=2.0)
    ap.add_argument("--row-s", type=float, default=30.0)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--no-trace", action="store_true",
                    help="RSS only: tracemalloc's own tables are in the RSS too")
    ap.add_argument("--no-retire", action="store_true",
                    help="keep every generation in the caches (the agent before the fix)")
    ap.add_argument("--compare", action="store_true",
                    help="run --no-retire and the default, one after the other")
    ap.add_argument("--quick", action="store_true", help="warmup 30 s, rows every 10 s")
    ap.add_argument("--allocators", default="",
                    help="e.g. pymalloc,malloc: one interpreter per allocator and round, side by side")
    ap.add_argument("--rounds", type=int, default=1, help="with --allocators: alternating rounds")
    ap.add_argument("--summary-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocators:
        return compare_allocators(args)
    if args.quick:
        args.warmup, args.row_s = 30.0, 10.0
    if not args.no_trace:
        tracemalloc.start(args.frames)
    variants = [False, True] if args.compare else [not args.no_retire]
    summary = []
    for retire in variants:
        print(f"== generations retired from the caches: {retire}", flush=True)
        with tempfile.TemporaryDirectory(prefix="aegis-memgrowth-") as tmp:
            res = trio.run(drive, args, Path(tmp), retire)
        summary.append((retire, report(args, res)))
        if args.summary_json:
            print("SUMMARY " + json.dumps(res["rows"]), flush=True)
    if args.compare:
        print("\n| retire old generations | contexts cached at the end | rule tables cached "
              "| traced Python growth after warm-up, MB | RSS anon growth, MB |")
        print("|---|---:|---:|---:|---:|")
        for retire, (traced, anon, caches) in summary:
            print(f"| {'yes' if retire else 'no'} | {caches['context'] + caches['context_ref']:,} "
                  f"| {caches['generation']} | {traced:+.3f} | {anon:+.1f} |")
    return 0


def compare_allocators(args: argparse.Namespace) -> int:
    """The same run once per allocator and round, alternating; anonymous RSS before the
    first flood, at its peak and at the end (after every flood has drained)."""
    child: list[str] = []
    skip = False
    for a in sys.argv[1:]:  # the command line without --allocators/--rounds (and values)
        if skip or a.startswith(("--allocators=", "--rounds=")):
            skip = False
            continue
        skip = a in ("--allocators", "--rounds")
        if not skip:
            child.append(a)
    out: list[tuple[str, int, float, float, float]] = []
    for rnd in range(1, args.rounds + 1):
        for name in args.allocators.split(","):
            env = dict(os.environ, PYTHONMALLOC=name)
            proc = subprocess.run([sys.executable, "-m", "soak.memgrowth", *child, "--no-trace",
                                   "--summary-json"], env=env, capture_output=True, text=True,
                                  check=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("SUMMARY ")][-1]
            rows = json.loads(line[len("SUMMARY "):])  # (t, rss, anon, generation)
            before = [r[2] for r in rows if r[0] < args.flood_first] or [rows[0][2]]
            # rows[-2]: the last row of the run (the agent's own trims only); rows[-1]: after
            # a forced gc.collect() + malloc_trim(0)
            out.append((name, rnd, before[-1], max(r[2] for r in rows), rows[-2][2], rows[-1][2]))
            print(f"round {rnd} {name}: anon {before[-1]:.1f} -> peak {out[-1][3]:.1f} -> "
                  f"end {rows[-2][2]:.1f} -> forced trim {rows[-1][2]:.1f} MB", flush=True)
    print("\n| allocator | round | anon before the flood, MB | peak, MB | at the end, MB "
          "| left behind, MB | after a forced trim, MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rnd, b, peak, end, forced in out:
        print(f"| {name} | {rnd} | {b:.1f} | {peak:.1f} | {end:.1f} | {end - b:+.1f} | {forced:.1f} |")
    return 0


def report(args: argparse.Namespace, res: dict) -> tuple[float, float, dict[str, int]]:
    rows = res["rows"]
    after = [r for r in rows if r[0] >= args.warmup]
    anon = 0.0
    if len(after) >= 2:
        (ta, ra, aa, _), (tb, rb, ab, _) = after[0], after[-1]
        anon = ab - aa
        print(f"RSS after warm-up: {ra:.1f} -> {rb:.1f} MB over {tb - ta:.0f} s "
              f"(anonymous {anon:+.1f} MB); {res['generations']} generations applied")
    if res["snap0"] is None:
        print("no tracemalloc snapshots (--no-trace, or the run was shorter than --warmup)")
        return 0.0, anon, res["caches"]
    diff = res["snap1"].compare_to(res["snap0"], "traceback")
    total = sum(d.size_diff for d in diff)
    print(f"traced Python allocations grew {total / 1e6:+.3f} MB after warm-up; top sites:")
    for d in [d for d in diff if d.size_diff > 0][: args.top]:
        print(f"{d.size_diff / 1e3:+10.1f} KB {d.count_diff:+7d} blocks")
        for line in d.traceback.format()[-2 * args.frames:]:
            print("      " + line)
    return total / 1e6, anon, res["caches"]

if __name__ == "__main__":
    raise SystemExit(main())
