"""The fleet worker: a faust-streaming app over aegis.decision.v1 and aegis.state.v1.

Run from the repository root (``pipelines/`` is not installed)::

    python -m pipelines.fleet worker --kafka 127.0.0.1:9092 [--metrics-addr 127.0.0.1:9108] [--web]

or ``aegis fleet worker --kafka ...``, which finds this folder next to the
``aegis_stream`` package of a checkout (or in ``$AEGIS_PIPELINES``).

Tables (faust, in-memory stores restored from their changelog topics at start)
    ``<app>-decisions``  keyed ``<decision partition>|...``: per host (``h|host``), per
        (rule, generation) all-time (``r|rule|gen``), per (rule, generation, window start)
        in tumbling windows (``w|rule|gen|start``), and one progress row per partition
        (``@``): the highest decision offset every row of the batch has absorbed.
    ``<app>-hosts``  keyed ``<state partition>|host``: the fleet's judgement of each host
        (the agent's DegradedMonitor and DropRateSlo over its state records, silence).

Exactness across kill -9 (measured: tests/fleet/test_worker_kill.py)
    Rows are idempotent (``hw`` per row, :mod:`pipelines.fleet_logic`), all rows of one
    decision partition live in one changelog partition written in order, and the
    decision consumer starts each partition at the progress row + 1.  Whatever prefix of
    that changelog survived a crash, replaying from there re-applies nothing twice.
    The host rows also refuse a repeated ``event_id`` (the sink's at-least-once spool
    replay): each deny counts once per (host, event_id), repeats are counted as
    ``duplicate`` (fleet_logic, "Each decision once").
    ``--naive`` runs faust's defaults instead (``stream.take()``, at-least-once offset
    commits, no dedup), kept to show that they over-count.  Measured here, kill -9 at a
    third of 60,000 decisions, then restart: this worker exact (every run); ``--naive``
    +4,003; ``--naive --guarantee exactly_once`` (faust's Kafka transactions) stalled
    after the restart at 59,734 (producer buffer full, no progress for 6 minutes) and at
    ~600 records/s before that: not usable here, so exactness is by idempotence.

Throughput
    faust delivers every record through its own per-message path (two asyncio waits per
    record): measured here at ~5,500 records/s with ``stream.take()`` and nothing else to
    do, 1,183/s with this fold (``python -m bench.fleet_worker_bench --naive``).  The
    decision topic, the fleet's volume, is therefore read by a batch consumer (aiokafka,
    the client faust itself uses) inside the worker, fed to the same fold, one table write
    per key per batch: 36,000-64,000 decisions/s, RSS ~130-160 MB
    (``python -m bench.fleet_worker_bench``); with the event_id dedup 28,000-61,500/s,
    RSS ~170-180 MB, against 38,000-65,700/s for the code before it run side by side on
    the same (shared, 2-core) machine: the fold costs ~25% more CPU, the worker ~5-25%.
    The state topic (a record per host state change) goes through an ordinary faust
    agent.  The decision consumer follows faust's assignment of the decisions table's
    changelog partitions, so workers of one app id share the partitions the way faust
    shares the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream.cli.fleet import add_worker_arguments
from aegis_stream.fleet.topics import (
    DECISION_TOPIC,
    FLEET_TOPIC,
    HEADER_SCHEMA,
    HEADER_SCHEMA_VERSION,
    STATE_TOPIC,
    TopicError,
    list_topics,
)
from aegis_stream.pipeline.schema import FleetEvent, FleetHost, FleetRule, SloEvent
from aegis_stream.processors.degraded import DegradedConfig
from aegis_stream.processors.slo import SloConfig
from pipelines import fleet_logic as fl


class FleetSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How one fleet worker runs (``python -m pipelines.fleet worker --help``)."""

    bootstrap: str
    app_id: str = "aegis-fleet"
    decision_topic: str = DECISION_TOPIC
    state_topic: str = STATE_TOPIC
    fleet_topic: str = FLEET_TOPIC
    window_s: int = 60
    windows_kept: int = 60
    # dedup of a host's repeated event ids (the sink's at-least-once spool replay): the
    # reorder window below a (host, boot, class)'s newest ktime (fleet_logic.seen_before)
    dedup_window_s: float = 1.0
    batch_max: int = 10_000
    batch_within_s: float = 0.2
    silent_after_s: float = 60.0
    summary_every_s: float = 10.0
    top_n: int = 10
    metrics_addr: str = ""  # "" = no Prometheus endpoint; else HOST:PORT
    web: bool = False
    naive: bool = False  # faust defaults (at-least-once, no dedup): the over-count demo
    guarantee: str = "at_least_once"  # faust's processing_guarantee (measured with --naive)
    data_dir: str = ""  # faust's datadir ("" = ~/.cache/aegis/fleet-worker/<app id>)
    loglevel: str = "warn"


class LatencyStamp(msgspec.Struct, frozen=True):
    """The two fields of a decision record the opt-in latency log reads."""

    ktime_ns: int = 0
    decision: str = ""


class SourceTopics(msgspec.Struct, frozen=True):
    decision_partitions: int
    state_partitions: int


def check_sources(s: FleetSettings) -> SourceTopics:
    """The source topics must exist before the worker starts (faust ignores a topic
    created later until it restarts); a one-line error otherwise."""
    topics = list_topics(s.bootstrap)
    missing = [t for t in (s.decision_topic, s.state_topic, s.fleet_topic) if t not in topics]
    if missing:
        raise TopicError(f"topic(s) {', '.join(missing)} missing on {s.bootstrap} "
                         f"(create them first: `aegis fleet broker start` does for a local broker; "
                         f"docs/FLEET.md lists them)")
    return SourceTopics(topics[s.decision_topic], topics[s.state_topic])


def _rfc3339(t: float) -> str:
    ns = int(t * 1e9)
    s, rem = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{rem // 1000:06d}Z"


def recovery(app: Any) -> Any:
    """faust's table recovery service (its TableManagerT type does not declare it)."""
    return app.tables.recovery


def build(settings: FleetSettings, sources: SourceTopics) -> Any:
    """The faust app with its tables, agents and timers (not started)."""
    import faust
    from aiokafka import AIOKafkaConsumer, TopicPartition

    s = settings
    datadir = Path(s.data_dir or f"~/.cache/aegis/fleet-worker/{s.app_id}").expanduser()
    app = faust.App(
        s.app_id,
        broker=f"kafka://{s.bootstrap}",
        store="memory://",  # always rebuilt from the changelog: the changelog is the truth
        datadir=str(datadir),
        web_enabled=s.web,
        # measured: a session timeout above the request timeout makes faust refuse to start
        broker_session_timeout=10.0,
        broker_request_timeout=40.0,
        broker_heartbeat_interval=3.0,
        topic_partitions=sources.decision_partitions,
        topic_disable_leader=True,
        producer_acks=-1,
        stream_buffer_maxsize=s.batch_max * 2,
        table_cleanup_interval=3600.0,
        processing_guarantee=s.guarantee,
    )

    class PartitionedTable(faust.Table):  # type: ignore[misc]
        """A table whose keys name their changelog partition (``"3|..."``): rows are
        written outside a per-event stream context, by the batch consumer and timers."""

        def partition_for_key(self, key: Any) -> int | None:
            return fl.key_partition(key)

    def table(name: str, partitions: int) -> Any:
        # json keys: a str key must read back as the same str after a restore
        schema: Any = faust.Schema(key_type=str, value_type=bytes, key_serializer="json",
                                   value_serializer="raw")
        t = PartitionedTable(app, name=name, default=None, partitions=partitions,
                             schema=schema, help=f"aegis fleet {name}")
        return app.tables.add(t)

    decisions = table("decisions", sources.decision_partitions)
    hosts = table("hosts", sources.state_partitions)
    fleet_topic = app.topic(s.fleet_topic, key_type=bytes, value_type=bytes,
                            key_serializer="raw", value_serializer="raw")
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    degraded_cfg = DegradedConfig()
    slo_cfg = SloConfig()
    stats: dict[str, Any] = {"records": 0, "bad": 0, "bad_reasons": {}, "batches": 0, "replayed": 0,
                             "lag": {}, "owned": set(), "seq": 0, "state_records": 0,
                             "slo_firing": {}}

    def _key(raw: Any) -> str:
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def get_counts(kind: str, key: str) -> fl.Counts:
        full = f"{fl.key_partition(key)}|{kind[0]}|{key.split('|', 1)[1]}"
        return fl.decode_counts(decisions.get(full))

    # host and rule rows as the tables hold them, for the views (metrics, summaries)
    # without walking the tables: rebuilt from the restored table on every (re)assignment
    mirror: dict[str, fl.Counts] = {}

    def rebuild_mirror(owned: set[int] | None = None) -> None:
        """From the restored table; only the partitions this worker owns (None: all),
        so two workers never both report a partition's counts."""
        mirror.clear()
        for k, v in list(decisions.items()):
            key = _key(k)
            parts = key.split("|", 2)  # "<p>|h|host", "<p>|r|rule|gen", "<p>|@"
            if len(parts) == 3 and parts[1] in ("h", "r") and (owned is None or int(parts[0]) in owned):
                mirror[key] = fl.decode_counts(v)

    def write_changed(changed: dict[tuple[str, str], fl.Counts]) -> None:
        # in the fold's order, host rows (dedup state) after the rule and window rows of
        # the batch, all in the partition's changelog partition: see fl.fold_exact
        for (kind, key), row in changed.items():
            p, rest = key.split("|", 1)
            full = f"{p}|{kind[0]}|{rest}"
            decisions[full] = fl.encode_row(row)
            if kind != "windows":
                mirror[full] = row

    def write_progress(last: dict[int, int]) -> None:
        # written after the rows of the batch, in the same changelog partition: if this
        # record survived a crash, every row of the batch did
        for p, off in last.items():
            row = fl.decode_counts(decisions.get(f"{p}|@"))
            row.hw = max(row.hw, off)
            decisions[f"{p}|@"] = fl.encode_row(row)

    fold = fl.fold_naive if s.naive else fl.fold_exact
    # opt-in, for bench/fleet_latency_bench.py (AEGIS_FLEET_LATENCY_LOG=PATH): one JSON
    # line per absorbed batch, the CLOCK_MONOTONIC ns its rows were in the table and each
    # record's ktime_ns by decision (bpf_ktime_get_ns: the same clock on one host)
    lat_path = os.environ.get("AEGIS_FLEET_LATENCY_LOG", "")
    lat_log = open(lat_path, "ab") if lat_path else None  # noqa: SIM115 - the worker's lifetime
    lat_decoder = msgspec.json.Decoder(LatencyStamp) if lat_log else None

    def absorb(records: list[tuple[int, int, bytes]]) -> None:
        if not stats.get("mirrored"):  # first batch after a (re)start: tables restored
            rebuild_mirror()
            stats["mirrored"] = True
        changed, result = fold(records, s.window_s, get_counts, int(s.dedup_window_s * 1e9))
        write_changed(changed)
        last: dict[int, int] = {}
        for p, off, _ in records:
            last[p] = off
        write_progress(last)
        if lat_log is not None and lat_decoder is not None:
            applied = time.monotonic_ns()
            kt: dict[str, list[int]] = {}
            for _, _, raw in records:
                with contextlib.suppress(msgspec.DecodeError, ValueError):
                    st = lat_decoder.decode(raw)
                    kt.setdefault(st.decision, []).append(st.ktime_ns)
            lat_log.write(msgspec.json.encode({"t": applied, "kt": kt}) + b"\n")
            lat_log.flush()
        stats["records"] += result.records
        stats["bad"] += result.bad
        stats["replayed"] += result.replayed
        for why, n in result.bad_reasons.items():
            stats["bad_reasons"][why] = stats["bad_reasons"].get(why, 0) + n
        dups = sum(result.duplicates.values())  # counted, never silently skipped
        if dups:
            stats["bad_reasons"]["duplicate"] = stats["bad_reasons"].get("duplicate", 0) + dups
        stats["batches"] += 1

    # ------------------------------------------------------------ decisions
    if s.naive:
        decision_src = app.topic(s.decision_topic, key_type=bytes, value_type=bytes,
                                 key_serializer="raw", value_serializer="raw")

        @app.agent(decision_src)
        async def naive_decisions(stream: Any) -> None:
            async for events in stream.take_events(s.batch_max, within=s.batch_within_s):
                absorb([(e.message.partition, e.message.offset, e.message.value) for e in events])
    else:
        def owned_partitions() -> set[int]:
            name = decisions.changelog_topic.get_topic_name()
            return {tp.partition for tp in recovery(app).active_tps if tp.topic == name}

        @app.task
        async def batch_decisions() -> None:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=s.bootstrap, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest", max_partition_fetch_bytes=4 << 20,
                fetch_max_bytes=16 << 20, request_timeout_ms=40_000,
            )
            await consumer.start()
            try:
                while not app.should_stop:
                    rec = recovery(app)
                    if app.rebalancing or rec.in_recovery or not rec.completed.is_set():
                        await asyncio.sleep(0.05)
                        continue
                    want = owned_partitions()
                    if want != stats["owned"]:
                        tps = [TopicPartition(s.decision_topic, p) for p in sorted(want)]
                        consumer.assign(tps)
                        for tp in tps:
                            done = fl.decode_counts(decisions.get(f"{tp.partition}|@")).hw
                            if done >= 0:
                                consumer.seek(tp, done + 1)
                            else:
                                await consumer.seek_to_beginning(tp)
                        stats["owned"] = want
                        rebuild_mirror(want)
                        stats["mirrored"] = True
                    if not want:
                        await asyncio.sleep(0.1)
                        continue
                    got = await consumer.getmany(timeout_ms=int(s.batch_within_s * 1000),
                                                 max_records=s.batch_max)
                    if app.rebalancing or rec.in_recovery:
                        # the partitions may be someone else's by now: drop the batch and
                        # seek again from the (restored) progress rows once it settles
                        stats["owned"] = set()
                        continue
                    records = [(tp.partition, m.offset, m.value) for tp, msgs in got.items()
                               for m in msgs if m.value is not None]
                    if records:
                        absorb(records)
                    for tp in consumer.assignment():
                        hw = consumer.highwater(tp)
                        if hw is not None:
                            stats["lag"][(s.decision_topic, tp.partition)] = max(
                                0, hw - await consumer.position(tp))
            finally:
                await consumer.stop()

    # ------------------------------------------------------------ host state
    state_src = app.topic(s.state_topic, key_type=bytes, value_type=bytes,
                          key_serializer="raw", value_serializer="raw")

    async def publish(ev: FleetEvent) -> None:
        await fleet_topic.send(
            key=b"fleet", value=msgspec.json.encode(ev),
            headers=[(HEADER_SCHEMA, b"aegis.fleet.v1"), (HEADER_SCHEMA_VERSION, b"1")],
        )

    def next_id() -> str:
        stats["seq"] += 1
        return f"{worker_id}-{time.time_ns()}-{stats['seq']}"

    @app.agent(state_src)
    async def host_states(stream: Any) -> None:
        async for events in stream.take_events(1000, within=0.2):
            now = time.time()
            for e in events:
                m = e.message
                try:
                    ev = fl.state_topic_decoder.decode(m.value)
                except (msgspec.DecodeError, ValueError):
                    stats["bad"] += 1
                    stats["bad_reasons"]["state_undecodable"] = stats["bad_reasons"].get(
                        "state_undecodable", 0) + 1
                    continue
                key = fl.host_key(m.partition, ev.host)
                row = fl.decode_host(hosts.get(key), ev.host)
                before = row.state
                if isinstance(ev, SloEvent):  # the agent's own SLO alert change
                    if fl.apply_slo(row, m.offset, ev):
                        hosts[key] = fl.encode_row(row)
                    continue
                # when the record was written (Kafka timestamp, never ahead of this
                # clock), not when a catching-up worker read it: a host silent during
                # the worker's downtime must still show as silent
                at = min(now, m.timestamp) if m.timestamp else now
                if fl.apply_state(row, m.offset, ev, at, degraded_cfg, slo_cfg):
                    hosts[key] = fl.encode_row(row)
                    stats["state_records"] += 1
                    if row.state != before:
                        await publish(host_event(row, before))

    # ------------------------------------------------------------ views and outputs
    def host_rows() -> Iterator[fl.HostRow]:
        for k, v in list(hosts.items()):
            key = _key(k)
            yield fl.decode_host(v, key.split("|", 1)[1])

    def decision_rows(kind: str) -> Iterator[tuple[str, fl.Counts]]:
        if kind in ("h", "r"):
            items: list[tuple[str, Any]] = [(k, msgspec.structs.replace(v)) for k, v in mirror.items()]
        else:
            items = [(_key(k), fl.decode_counts(v)) for k, v in list(decisions.items())]
        for key, row in items:
            p, rest = key.split("|", 1)
            if rest.startswith(kind + "|"):
                yield f"{p}|{rest[2:]}", row

    def totals() -> tuple[int, int]:
        d = a = 0
        for _, row in decision_rows("h"):
            d += row.deny
            a += row.audit
        return d, a

    def summary(kind: str = "summary", **extra: Any) -> FleetEvent:
        rows = list(host_rows())
        by_state: dict[str, int] = {}
        for r in rows:
            by_state[r.state or "unknown"] = by_state.get(r.state or "unknown", 0) + 1
        d, a = totals()
        now = time.time()
        last_start = int(now) // s.window_s * s.window_s - s.window_s
        wd = sum(row.deny for key, row in decision_rows("w")
                 if fl.split_window_key(key)[3] == last_start)
        top = fl.top_rules(fl.merge_rules(decision_rows("r")), s.top_n)
        return FleetEvent(
            event_id=next_id(), time=_rfc3339(now), worker=worker_id, kind=kind,  # type: ignore[arg-type]
            partitions=sorted(stats["owned"]), hosts=len(rows), hosts_by_state=by_state,
            silent_hosts=sorted(r.host for r in rows if r.silent), denies=d, audits=a,
            window_s=s.window_s, window_start=_rfc3339(last_start), window_denies=wd,
            top_rules=[FleetRule(rule_id=t.rule_id, generation=t.generation, denies=t.denies,
                                 audits=t.audits) for t in top],
            **extra,
        )

    def host_event(row: fl.HostRow, previous: str) -> FleetEvent:
        return summary("host_state", previous=previous, host=FleetHost(
            host=row.host, state=row.state, agent_state=row.agent_state, silent=row.silent,
            reason_codes=list(row.reason_codes)))

    @app.timer(interval=max(1.0, min(s.silent_after_s / 4, 5.0)))
    async def silence() -> None:
        now = time.time()
        for k, v in list(hosts.items()):
            key = _key(k)
            row = fl.decode_host(v, key.split("|", 1)[1])
            before = row.state
            if fl.check_silence(row, now, s.silent_after_s):
                hosts[key] = fl.encode_row(row)
                if row.state != before:
                    await publish(host_event(row, before))

    @app.timer(interval=s.summary_every_s)
    async def outputs() -> None:
        await publish(summary())
        now = time.time()
        rows = list(host_rows())
        for klass in fl.CLASSES:
            for rule in slo_cfg.alerts:
                lw = fl.fleet_window(rows, klass, rule.long_s, now)
                sw = fl.fleet_window(rows, klass, rule.short_s, now)
                bl, bs = lw.ratio / slo_cfg.objective, sw.ratio / slo_cfg.objective
                firing = bl >= rule.burn and bs >= rule.burn
                key = f"{klass}/{rule.name}"
                if firing != stats["slo_firing"].get(key, False):
                    stats["slo_firing"][key] = firing
                    await publish(summary(
                        "slo_alert", event_class=klass, alert=rule.name,
                        status="firing" if firing else "resolved", objective=slo_cfg.objective,
                        burn_long=bl, burn_short=bs, emitted_long=lw.emitted,
                        dropped_long=lw.dropped))

    @app.timer(interval=float(s.window_s))
    async def expire_windows() -> None:
        oldest = int(time.time()) // s.window_s * s.window_s - s.windows_kept * s.window_s
        for k in list(decisions.keys()):
            key = _key(k)
            p, rest = key.split("|", 1)
            if rest.startswith("w|") and fl.split_window_key(f"{p}|{rest[2:]}")[3] < oldest:
                del decisions[key]

    if s.metrics_addr:
        from pipelines.fleet_metrics import serve_metrics

        # the HTTP thread reads a copy refreshed on the event loop, never the live tables
        snap: dict[str, Any] = {"hosts": [], "h": [], "r": []}

        def start_metrics() -> None:
            serve_metrics(s.metrics_addr, host_rows=lambda: snap["hosts"],
                          decision_rows=lambda kind: snap[kind], stats=stats, slo=slo_cfg)

        @app.timer(interval=0.5)
        async def refresh_metrics() -> None:
            snap.update(hosts=list(host_rows()), h=list(decision_rows("h")),
                        r=list(decision_rows("r")))
            # the state topic's lag, from faust's own consumer
            consumer = app.consumer
            for tp in consumer.assignment():
                if tp.topic != s.state_topic:
                    continue
                hw = consumer.highwater(tp)
                pos = await consumer.position(tp)
                if hw is not None and pos is not None:
                    stats["lag"][(s.state_topic, tp.partition)] = max(0, hw - pos)

    handles: dict[str, Any] = {"stats": stats, "decisions": decisions, "hosts": hosts,
                               "summary": summary,
                               "start_metrics": start_metrics if s.metrics_addr else None}
    app.aegis = handles  # type: ignore[attr-defined]
    return app


# ------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.fleet",
                                description="the aegis fleet worker (faust-streaming)")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="run a fleet worker until SIGTERM/SIGINT")
    add_worker_arguments(w)  # one definition, shared with `aegis fleet worker`
    return p


def settings_from(a: argparse.Namespace) -> FleetSettings:
    if a.window < 1 or a.batch < 1 or a.silent_after <= 0 or a.summary_every <= 0:
        raise ValueError("--window, --batch, --silent-after and --summary-every must be > 0")
    if a.metrics_addr:
        host, _, port = a.metrics_addr.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad --metrics-addr {a.metrics_addr!r} (want HOST:PORT)")
    return FleetSettings(
        bootstrap=a.kafka, app_id=a.app_id, window_s=a.window, silent_after_s=a.silent_after,
        summary_every_s=a.summary_every, batch_max=a.batch, metrics_addr=a.metrics_addr,
        web=a.web, naive=a.naive, data_dir=a.data_dir, loglevel=a.loglevel,
        guarantee=a.guarantee, decision_topic=a.decision_topic, state_topic=a.state_topic,
        fleet_topic=a.fleet_topic,
    )


def run_worker(settings: FleetSettings) -> int:
    """Build and run the worker in this process until it is stopped."""
    import faust

    sources = check_sources(settings)
    app = build(settings, sources)
    if app.aegis["start_metrics"] is not None:
        try:
            app.aegis["start_metrics"]()
        except OSError as exc:
            raise ValueError(f"cannot serve metrics on {settings.metrics_addr}: {exc.strerror}") from None
    worker = faust.Worker(app, loglevel=settings.loglevel, quiet=True)
    worker.execute_from_commandline()  # exits the process (faust's own signal handling)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run_worker(settings_from(args))
    except (TopicError, ValueError) as exc:
        print(f"aegis fleet worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
