"""Fleet worker throughput: decisions/s one worker process absorbs, and its RSS.

    python -m bench.fleet_worker_bench [--kafka BOOTSTRAP] [-n 400000] [--naive]

Without ``--kafka`` a local broker is started on a temp dir (jars from ``scripts/kafka
fetch``) and stopped after.  N decisions (12 hosts, 40 rules, 2 generations) are produced
first onto fresh topics (6 partitions, like aegis.decision.v1); then one worker starts
and the clock runs from its first absorbed record to the last (its Prometheus endpoint,
polled every 0.1 s), so start-up and restore are not in the rate.  The counts it ends
with are checked against what was produced.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec

from pipelines import fleet_gen as g


class BenchResult(msgspec.Struct, frozen=True):
    decisions: int
    seconds: float
    decisions_per_s: float
    worker_rss_mb: float
    exact: bool
    naive: bool


def run(bootstrap: str, n: int, workdir: Path, *, naive: bool = False) -> BenchResult:
    from aegis_stream.fleet.broker import free_port
    from aegis_stream.fleet.topics import TopicSpec, create_topics

    tag = uuid.uuid4().hex[:8]
    topics = (f"bench.decision.{tag}", f"bench.state.{tag}", f"bench.fleet.{tag}")
    create_topics(bootstrap, [TopicSpec(topics[0], 6, "host"), TopicSpec(topics[1], 3, "host"),
                              TopicSpec(topics[2], 1, "fleet")])
    events = list(g.decisions(n))
    want = g.expected(events)
    g.produce_decisions(bootstrap, iter(events), topic=topics[0])
    del events
    w = g.WorkerProcess(bootstrap, f"bench-{tag}", free_port(), data_dir=str(workdir / "w"),
                        topics=topics, naive=naive, log=str(workdir / "worker.log"),
                        extra=["--summary-every", "3600"])
    w.start()
    try:
        w.wait(lambda m: g.records(m) > 0, 120, "first record")
        t0 = time.monotonic()
        first = g.records(w.metrics())
        m = w.wait(lambda m: g.records(m) >= n, 600, f"{n} records")
        dt = time.monotonic() - t0
        rss = w.rss_kb() / 1024
        # the counts are served from a copy refreshed every 0.5 s: let it catch up
        try:
            m = w.wait(lambda m: g.denies(m) + g.audits(m) >= n, 10, "the counts")
        except TimeoutError:
            m = w.metrics()
        exact = (g.denies(m), g.audits(m)) == (want.denies, want.audits)
        done = n - first
        return BenchResult(decisions=int(done), seconds=round(dt, 2),
                           decisions_per_s=round(done / dt), worker_rss_mb=round(rss, 1),
                           exact=exact, naive=naive)
    finally:
        w.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_worker_bench", description=__doc__.split("\n")[0])
    p.add_argument("--kafka", default="", metavar="BOOTSTRAP", help="an existing broker (default: start one)")
    p.add_argument("-n", type=int, default=400_000, help="decisions to absorb")
    p.add_argument("--naive", action="store_true", help="faust's own stream.take() path, for comparison")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aegis-fleet-bench-") as tmp:
        broker = None
        bootstrap = a.kafka
        if not bootstrap:
            from aegis_stream.fleet.broker import LocalBroker

            broker = LocalBroker(Path(tmp) / "kafka")
            broker.start()
            bootstrap = broker.bootstrap
        try:
            r = run(bootstrap, a.n, Path(tmp), naive=a.naive)
        finally:
            if broker is not None and not broker.stop():
                broker.kill()
    if a.json:
        print(msgspec.json.encode(r).decode())
    else:
        print(f"fleet worker ({'naive faust stream.take()' if r.naive else 'batch consumer'}): "
              f"{r.decisions} decisions in {r.seconds} s = {r.decisions_per_s:,} decisions/s, "
              f"worker RSS {r.worker_rss_mb} MB, counts {'exact' if r.exact else 'WRONG'}")
    return 0 if r.exact else 1


if __name__ == "__main__":
    sys.exit(main())
