"""Prometheus metrics of the Kafka sinks (``aegis_sink_*`` with a ``sink`` label;
docs/METRICS.md, section "Kafka sink").

Read at scrape time from the :class:`~aegis_stream.fleet.sink.KafkaSinkStatistics`
snapshots in ``PipelineStatistics.sinks`` (the same snapshot as every other aegis metric),
so it is one entry of the pipeline's collector list.  Sinks of other kinds are skipped:
they have no broker.  This module does not import the pipeline's metrics module (which
lists this collector), only the statistics record.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aegis_stream.fleet.sink import RTT_BUCKETS, KafkaSinkStatistics


class KafkaSinkCollector(Collector):
    """``aegis_sink_*`` families of every Kafka sink.  ``sources.stats()`` returns the
    pipeline's statistics snapshot (or None: describe only)."""

    def __init__(self, sources: Any) -> None:
        self.sources = sources

    def describe(self) -> Iterator[Metric]:
        yield from self.families(())

    def collect(self) -> Iterator[Metric]:
        st = self.sources.stats()
        sinks = [s for s in (st.sinks if st is not None else ()) if isinstance(s, KafkaSinkStatistics)]
        yield from self.families(sinks)

    def families(self, sinks: Any) -> Iterator[Metric]:
        lab = ["sink"]
        up = GaugeMetricFamily("aegis_sink_up", "1 while the sink's broker answers and acks", labels=lab)
        sent = CounterMetricFamily("aegis_sink_sent", "Records handed to the Kafka client", labels=lab)
        acked = CounterMetricFamily("aegis_sink_acked", "Records the broker acknowledged", labels=lab)
        retried = CounterMetricFamily("aegis_sink_retried", "Records produced again from the spool",
                                      labels=lab)
        spooled = CounterMetricFamily("aegis_sink_spooled", "Durable records written to the sink's spool",
                                      labels=lab)
        failed = CounterMetricFamily("aegis_sink_delivery_failed",
                                     "Durable records whose delivery failed (spooled, not lost)", labels=lab)
        dropped = CounterMetricFamily("aegis_sink_dropped", "Best-effort records lost, by reason",
                                      labels=["sink", "reason"])
        lost = CounterMetricFamily("aegis_sink_producer_lost",
                                   "Producer processes that died (each replaced; their un-acked denies "
                                   "re-sent from the spool)", labels=lab)
        pending = GaugeMetricFamily("aegis_sink_spool_pending_events", "Records waiting in the sink's spool",
                                    labels=lab)
        rtt = HistogramMetricFamily("aegis_sink_roundtrip_seconds",
                                    "Produce-to-ack time of the last record of each batch", labels=lab)
        for s in sinks:
            name = [s.name]
            up.add_metric(name, 1.0 if s.up else 0.0)
            sent.add_metric(name, s.sent)
            acked.add_metric(name, s.acked)
            retried.add_metric(name, s.retried)
            spooled.add_metric(name, s.spooled)
            failed.add_metric(name, s.delivery_failed)
            lost.add_metric(name, s.producer_lost)
            for reason, n in sorted(s.dropped.items()):
                dropped.add_metric([s.name, reason], n)
            pending.add_metric(name, s.spool.pending_events if s.spool is not None else 0)
            buckets, total = [], 0
            counts = s.rtt_buckets or (0,) * (len(RTT_BUCKETS) + 1)
            for bound, n in zip((*map(str, RTT_BUCKETS), "+Inf"), counts, strict=True):
                total += n  # the sink keeps per-bucket counts; Prometheus wants cumulative
                buckets.append((bound, total))
            rtt.add_metric(name, buckets, s.rtt_sum)
        yield from (up, sent, acked, retried, spooled, failed, lost, dropped, pending, rtt)
