"""``aegis fleet ...`` and ``aegis tail``: the Kafka side of Aegis (docs/FLEET.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``aegis fleet`` (broker, worker, ship) and ``aegis tail``."""
    fleet = sub.add_parser("fleet", help="fleet streaming over Kafka (docs/FLEET.md)")
    # shared by every `aegis fleet X`: each part hangs its parsers on fleet_sub
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True)
    add_broker_commands(fleet_sub)
    add_worker_command(fleet_sub)

    from aegis_stream.fleet.ship import add_ship_arguments

    add_ship_arguments(fleet_sub.add_parser(
        "ship", help="publish an agent's events file / Kafka spool to Kafka afterwards",
        description="Idempotent by event_id: a ledger per Kafka cluster next to the input "
                    "records what the broker acknowledged; a re-ship skips it.  docs/FLEET.md"))

    from aegis_stream.fleet.tail import add_tail_arguments

    add_tail_arguments(sub.add_parser(
        "tail", help="follow aegis.decision.v1 on Kafka: one line per decision (or --json)",
        description="Assigns the partitions (no consumer group, no offsets committed): a tail "
                    "never takes partitions from a fleet worker.  docs/FLEET.md"))


def add_broker_commands(fleet_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``aegis fleet broker fetch|start|stop|status``: the local Kafka broker (scripts/kafka)."""
    import json
    import os
    import time

    from aegis_stream.fleet import broker as kb

    default_dir = os.environ.get("AEGIS_KAFKA_DIR") or kb.DEFAULT_DATA_DIR

    def cmd_fetch(a: argparse.Namespace) -> int:
        t0 = time.monotonic()
        lib = kb.fetch_kafka(a.cache, log=print)
        print(f"kafka {kb.KAFKA_VERSION}: {lib} ({time.monotonic() - t0:.1f} s)")
        return 0

    def cmd_start(a: argparse.Namespace) -> int:
        from aegis_stream.fleet.topics import TOPICS, create_topics

        b = kb.LocalBroker(a.dir, port=a.port, cache=a.cache, heap=a.heap)
        t0 = time.monotonic()
        b.start(timeout=a.timeout)
        ready = time.monotonic() - t0
        try:
            created = [] if a.no_topics else create_topics(b.bootstrap, TOPICS)
        except BaseException:
            b.stop()
            raise
        print(f"kafka broker up at {b.bootstrap} (pid {b.pid()}, ready in {ready:.1f} s, "
              f"data {b.data_dir}); topics created: {', '.join(created) or 'none (all exist)'}")
        return 0

    def cmd_stop(a: argparse.Namespace) -> int:
        b = kb.LocalBroker(a.dir)
        pid = b.pid()
        if pid is None:
            print(f"kafka broker of {b.data_dir}: not running")
            return 0
        t0 = time.monotonic()
        clean = b.stop(grace=a.grace)
        how = "stopped" if clean else f"killed (no clean stop within {a.grace:g} s)"
        print(f"kafka broker pid {pid} {how} in {time.monotonic() - t0:.1f} s")
        return 0 if clean else 1

    def cmd_status(a: argparse.Namespace) -> int:
        st = kb.LocalBroker(a.dir).status()
        up = st.running and st.answering
        if a.json:
            import msgspec

            print(json.dumps(msgspec.to_builtins(st)))
        elif st.running:
            print(f"kafka broker at {st.bootstrap}: pid {st.pid}, "
                  f"{'answering' if st.answering else 'NOT answering'} (data {st.data_dir})")
        else:
            print(f"kafka broker of {st.data_dir}: not running")
        return 0 if up else 1

    br = fleet_sub.add_parser("broker", help="the local single-node Kafka broker (KRaft)")
    bsub = br.add_subparsers(dest="broker_command", required=True)
    cache_help = f"jar cache (default $AEGIS_KAFKA_CACHE or {kb.DEFAULT_CACHE})"
    dir_help = f"data dir (default $AEGIS_KAFKA_DIR or {kb.DEFAULT_DATA_DIR})"

    f = bsub.add_parser("fetch", help=f"fetch Kafka {kb.KAFKA_VERSION} jars with Maven (idempotent)")
    f.add_argument("--cache", default=None, help=cache_help)
    f.set_defaults(func=cmd_fetch)

    s = bsub.add_parser("start", help="start the broker, wait until it answers, create the topics")
    s.add_argument("--dir", default=default_dir, help=dir_help)
    s.add_argument("--port", type=int, default=None,
                   help="listener port on 127.0.0.1 (default: the dir's, else a free one)")
    s.add_argument("--timeout", type=float, default=kb.DEFAULT_READY_TIMEOUT,
                   help="seconds to wait for readiness")
    s.add_argument("--heap", default=kb.DEFAULT_HEAP, help="JVM heap (-Xms = -Xmx)")
    s.add_argument("--no-topics", action="store_true", help="do not create the aegis topics")
    s.add_argument("--cache", default=None, help=cache_help)
    s.set_defaults(func=cmd_start)

    p = bsub.add_parser("stop", help="SIGTERM the broker (SIGKILL after --grace s)")
    p.add_argument("--dir", default=default_dir, help=dir_help)
    p.add_argument("--grace", type=float, default=kb.DEFAULT_STOP_GRACE)
    p.set_defaults(func=cmd_stop)

    t = bsub.add_parser("status", help="running? answering? (exit 0 up, 1 not)")
    t.add_argument("--dir", default=default_dir, help=dir_help)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_status)


def find_pipelines() -> Path | None:
    """The ``pipelines/`` folder (faust apps, not installed into site-packages):
    ``$AEGIS_PIPELINES``, else the one next to this ``aegis_stream`` package (a checkout
    or an editable install)."""
    env = os.environ.get("AEGIS_PIPELINES")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2] / "pipelines"
    return here if (here / "fleet.py").is_file() else None


def add_worker_arguments(w: argparse.ArgumentParser) -> None:
    """The worker's options (also ``python -m pipelines.fleet worker``)."""
    from aegis_stream.fleet.topics import DECISION_TOPIC, FLEET_TOPIC, STATE_TOPIC

    w.add_argument("--kafka", required=True, metavar="BOOTSTRAP", help="HOST:PORT[,HOST:PORT..]")
    w.add_argument("--metrics-addr", default="", metavar="HOST:PORT",
                   help="serve Prometheus metrics there (off by default)")
    w.add_argument("--web", action="store_true", help="run faust's web server (off by default)")
    w.add_argument("--app-id", default="aegis-fleet", help="faust app id = consumer group")
    w.add_argument("--window", type=int, default=60, metavar="S", help="tumbling window of rule counts")
    w.add_argument("--silent-after", type=float, default=60.0, metavar="S",
                   help="a host with no state record for S seconds is degraded")
    w.add_argument("--summary-every", type=float, default=10.0, metavar="S")
    w.add_argument("--batch", type=int, default=10_000, metavar="N", help="records per batch")
    w.add_argument("--data-dir", default="", help="faust's datadir")
    w.add_argument("--decision-topic", default=DECISION_TOPIC, help=argparse.SUPPRESS)
    w.add_argument("--state-topic", default=STATE_TOPIC, help=argparse.SUPPRESS)
    w.add_argument("--fleet-topic", default=FLEET_TOPIC, help=argparse.SUPPRESS)
    w.add_argument("--naive", action="store_true",
                   help="faust defaults (at-least-once, no dedup): over-counts after a crash")
    w.add_argument("--guarantee", default="at_least_once", choices=["at_least_once", "exactly_once"],
                   help="faust's processing_guarantee (Kafka transactions; for measurements)")
    w.add_argument("--loglevel", default="warn", choices=["crit", "error", "warn", "info", "debug"])



def add_worker_command(fleet_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``aegis fleet worker``: the faust fleet worker of ``pipelines/fleet.py``, in this
    process (faust owns its asyncio loop; no web server unless ``--web``)."""
    w = fleet_sub.add_parser(
        "worker", help="run the faust fleet worker (pipelines/fleet.py) until SIGTERM",
        description="Counts every decision of the fleet exactly (also across a kill -9), "
                    "judges each host, publishes aegis.fleet.v1.  docs/FLEET.md")
    add_worker_arguments(w)

    def cmd_worker(a: argparse.Namespace) -> int:
        where = find_pipelines()
        if where is None or not (where / "fleet.py").is_file():
            why = f"{where} has no fleet.py" if where else "no pipelines/ next to aegis_stream"
            print(f"aegis fleet worker: {why} (run from a checkout, or set AEGIS_PIPELINES "
                  f"to the pipelines folder)", file=sys.stderr)
            return 2
        if str(where.parent) not in sys.path:
            sys.path.insert(0, str(where.parent))  # `import pipelines.fleet` as from the repo root
        from aegis_stream.fleet.topics import TopicError
        from pipelines import fleet as fleet_app

        try:
            return fleet_app.run_worker(fleet_app.settings_from(a))
        except (TopicError, ValueError) as exc:
            print(f"aegis fleet worker: {exc}", file=sys.stderr)
            return 2

    w.set_defaults(func=cmd_worker)
