"""Prometheus endpoint of the fleet worker (opt-in: ``--metrics-addr HOST:PORT``).

A collector that reads the worker's tables at scrape time: nothing is double-booked,
and the counts are the exact table counts (they survive a worker restart, restored
from the changelog, so ``_total`` series stay monotonic across restarts).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aegis_stream.pipeline.accounting import window_label
from aegis_stream.processors.slo import SloConfig
from pipelines import fleet_logic as fl

STATES = ("enforcing", "auditing", "degraded", "blind")


class FleetCollector(Collector):
    """aegis_fleet_* series from the worker's tables and consumer positions."""

    def __init__(
        self,
        host_rows: Callable[[], Iterable[fl.HostRow]],
        decision_rows: Callable[[str], Iterable[tuple[str, fl.Counts]]],
        stats: dict[str, Any],
        slo: SloConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host_rows = host_rows
        self.decision_rows = decision_rows
        self.stats = stats
        self.slo = slo or SloConfig()
        self.clock = clock

    def collect(self) -> Iterator[Any]:
        dec = CounterMetricFamily("aegis_fleet_decisions", "decisions counted by the fleet "
                                  "(exact, per source offset)", labels=["decision"])
        d = a = 0
        per_host = GaugeMetricFamily("aegis_fleet_host_decisions", "decisions per host",
                                     labels=["host", "decision"])
        dup = CounterMetricFamily("aegis_fleet_duplicates", "repeats of an event_id a host row "
                                  "had absorbed (the sink's at-least-once replay), not counted; "
                                  "exact, from the tables", labels=["decision"])
        host_dup = GaugeMetricFamily("aegis_fleet_host_duplicates", "repeated event_ids refused "
                                     "per host", labels=["host", "decision"])
        dups = dict.fromkeys(fl.CLASSES, 0)
        for key, row in self.decision_rows("h"):
            d += row.deny
            a += row.audit
            host = key.split("|", 1)[1]
            per_host.add_metric([host, "deny"], row.deny)
            per_host.add_metric([host, "audit"], row.audit)
            for klass in fl.CLASSES:
                n = row.duplicates.get(klass, 0)
                dups[klass] += n
                host_dup.add_metric([host, klass], n)
        dec.add_metric(["deny"], d)
        dec.add_metric(["audit"], a)
        yield dec
        yield per_host
        for klass, n in dups.items():
            dup.add_metric([klass], n)
        yield dup
        yield host_dup
        rules = GaugeMetricFamily("aegis_fleet_rule_denies", "denies per (rule, generation), "
                                  "all-time", labels=["rule", "generation"])
        for (rule, gen), c in fl.merge_rules(self.decision_rows("r")).items():
            rules.add_metric([rule, str(gen)], c.deny)
        yield rules
        by_state = {s: 0 for s in STATES}
        state = GaugeMetricFamily("aegis_fleet_host_state", "1 for the fleet's state of a host",
                                  labels=["host", "state"])
        silent = GaugeMetricFamily("aegis_fleet_host_silent", "1 when no state record came for "
                                   "silent_after_s", labels=["host"])
        slo_in = GaugeMetricFamily("aegis_fleet_host_slo_events", "a host's cumulative decisions "
                                   "emitted and lost, per class, from its state records (the "
                                   "fleet SLO's input)", labels=["host", "class", "kind"])
        hosts_seen = list(self.host_rows())
        for h in hosts_seen:
            for klass in sorted(set(h.emitted) | set(h.dropped)):
                slo_in.add_metric([h.host, klass, "emitted"], h.emitted.get(klass, 0))
                slo_in.add_metric([h.host, klass, "dropped"], h.dropped.get(klass, 0))
            for s in STATES:
                state.add_metric([h.host, s], 1 if h.state == s else 0)
            by_state[h.state] = by_state.get(h.state, 0) + 1
            silent.add_metric([h.host], 1 if h.silent else 0)
        yield state
        yield silent
        yield slo_in
        yield from self.collect_slo(hosts_seen)
        hosts = GaugeMetricFamily("aegis_fleet_hosts", "hosts per fleet state", labels=["state"])
        for s, n in sorted(by_state.items()):
            hosts.add_metric([s], n)
        yield hosts
        lag = GaugeMetricFamily("aegis_fleet_consumer_lag_records", "records behind the "
                                "partition's high watermark", labels=["topic", "partition"])
        for (topic, p), n in sorted(self.stats["lag"].items()):
            lag.add_metric([topic, str(p)], n)
        yield lag
        bad = CounterMetricFamily("aegis_fleet_records_dropped", "source records not counted, "
                                  "by reason (this worker process)", labels=["reason"])
        for why in ("undecodable", "bad_field", "state_undecodable", "duplicate"):
            bad.add_metric([why], self.stats["bad_reasons"].get(why, 0))
        yield bad
        seen = CounterMetricFamily("aegis_fleet_records", "source records read by this worker "
                                   "process (replays included)", labels=["topic"])
        seen.add_metric(["decision"], self.stats["records"])
        seen.add_metric(["state"], self.stats["state_records"])
        yield seen
        yield CounterMetricFamily("aegis_fleet_records_replayed", "decision records this worker "
                                  "process re-read that its restored tables had absorbed (a "
                                  "restart's replay: skipped, idempotent)",
                                  value=self.stats.get("replayed", 0))


    def collect_slo(self, rows: list[fl.HostRow]) -> Iterator[Any]:
        """The fleet drop-rate SLO: the hosts' cumulative totals and drop ratio, their
        DropRateSlo windows summed and the burn rates (the same sums the worker's
        aegis.fleet.v1 slo_alert records judge), and which fleet alerts fire."""
        total = CounterMetricFamily("aegis_fleet_slo_events", "decisions the hosts' agents "
                                    "emitted and lost since they started, summed over the "
                                    "fleet (their state records' cumulative totals)",
                                    labels=["class", "kind"])
        ratio = GaugeMetricFamily("aegis_fleet_drop_ratio", "fleet decisions lost / emitted "
                                  "since the agents started", labels=["class"])
        win = GaugeMetricFamily("aegis_fleet_slo_window_events", "emitted and lost in the "
                                "SLO window, the hosts' windows summed",
                                labels=["class", "window", "kind"])
        burn = GaugeMetricFamily("aegis_fleet_slo_burn_rate", "the fleet's drop ratio in the "
                                 "window / the objective", labels=["class", "window"])
        now = self.clock()
        seconds = sorted({a.long_s for a in self.slo.alerts} | {a.short_s for a in self.slo.alerts})
        for klass in fl.CLASSES:
            e = sum(r.emitted.get(klass, 0) for r in rows)
            d = sum(r.dropped.get(klass, 0) for r in rows)
            total.add_metric([klass, "emitted"], e)
            total.add_metric([klass, "dropped"], d)
            ratio.add_metric([klass], d / max(e, d) if max(e, d) else 0.0)
            for sec in seconds:
                w = fl.fleet_window(rows, klass, sec, now)
                label = window_label(sec)
                win.add_metric([klass, label, "emitted"], w.emitted)
                win.add_metric([klass, label, "dropped"], w.dropped)
                burn.add_metric([klass, label], w.ratio / self.slo.objective)
        firing = GaugeMetricFamily("aegis_fleet_slo_alert_firing", "1 while the fleet's "
                                   "burn-rate alert fires", labels=["class", "alert"])
        for klass in fl.CLASSES:
            for rule in self.slo.alerts:
                on = self.stats.get("slo_firing", {}).get(f"{klass}/{rule.name}", False)
                firing.add_metric([klass, rule.name], 1 if on else 0)
        yield from (total, ratio, win, burn, firing)


def serve_metrics(addr: str, **kw: Any) -> CollectorRegistry:
    """Serve a fresh registry with the fleet collector on ``HOST:PORT``."""
    host, _, port = addr.rpartition(":")
    registry = CollectorRegistry()
    registry.register(FleetCollector(**kw))
    start_http_server(int(port), addr=host, registry=registry)
    return registry
