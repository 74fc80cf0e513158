"""Prometheus metrics: docs/METRICS.md is the contract; the real HTTP endpoint serves them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from aegis_stream.agent.run import serve_pipeline
from aegis_stream.kernel import abi
from aegis_stream.pipeline.metrics import AegisCollector, AegisMetrics, parse_addr, serve_metrics
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.testing import install, make_events, sample_record

from ._prometheus import http_get

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
ROW = re.compile(r"^\| `(aegis_\w+)` \| (\w+) \| ([^|]*) \| (.+) \|$")


def documented() -> dict[str, tuple[str, list[str]]]:
    out = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            labels = [x.strip(" `") for x in m.group(3).split(",") if x.strip()]
            out[m.group(1)] = (m.group(2), labels)
    return out


def registered() -> dict[str, tuple[str, list[str]]]:
    out = {}
    for fam in AegisCollector(lambda: None).describe():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        out[name] = (fam.type, list(getattr(fam, "_labelnames", ())))
    return out


def test_every_metric_is_documented_and_every_documented_metric_exists():
    doc, reg = documented(), registered()
    assert sorted(set(reg) - set(doc)) == [], "registered but not in docs/METRICS.md"
    assert sorted(set(doc) - set(reg)) == [], "in docs/METRICS.md but not registered"
    for name, (typ, labels) in reg.items():
        assert doc[name] == (typ, labels), name
    assert all(n.startswith("aegis_") for n in reg)


def test_fresh_registry_per_instance():
    a = AegisMetrics(lambda: None)
    b = AegisMetrics(lambda: None, CollectorRegistry())
    assert a.registry is not b.registry
    assert set(a.metric_names()) == set(registered())
    text = a.exposition().decode()
    assert f'aegis_build_info{{abi_version="{abi.ABI_VERSION}"' in text


def test_parse_addr():
    assert parse_addr("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_addr(":9100") == ("0.0.0.0", 9100)
    assert parse_addr("[::1]:9100") == ("::1", 9100)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def ring_sizes():
    return 1 << 16, 1 << 14


async def test_scrape_the_real_endpoint(make_pipeline, kernel, store, tmp_path):
    install(kernel, store, sample_record(7, mode="audit"))
    kernel.attached.discard("mmap_file")
    sink = MemorySink()
    p = make_pipeline(kernel, store, [sink], tmp_path, tick_s=0.05)
    bound: list[tuple[str, int]] = []
    async with trio.open_nursery() as n:
        n.start_soon(lambda: serve_pipeline(p, metrics_addr="127.0.0.1:0", signals=False,
                                            metrics_started=bound.append))
        while not bound:
            await trio.sleep(0.01)
        kernel.emit_bulk("audit", make_events(400), 400)  # 157 fit in 16 KiB
        kernel.emit_bulk("deny", make_events(3, decision=abi.Decision.DENY), 3)
        await p.drain(timeout=5)
        await trio.sleep(0.2)  # a tick
        head, body = await http_get(*bound[0], "/metrics")
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Type: text/plain; version=" in head
        h2, b2 = await http_get(*bound[0], "/nope")
        assert h2.startswith(b"HTTP/1.1 404")
        n.cancel_scope.cancel()
    s = _samples(body.decode())
    assert s[("aegis_hook_attached", (("hook", "mmap_file"),))] == 0
    assert s[("aegis_hook_attached", (("hook", "file_open"),))] == 1
    assert s[("aegis_policy_generation", ())] == 7
    assert s[("aegis_policy_mode", (("mode", "audit"),))] == 1
    assert s[("aegis_state", (("state", "degraded"),))] == 1
    assert s[("aegis_events_delivered_total", (("class", "audit"),))] == 157
    assert s[("aegis_events_delivered_total", (("class", "deny"),))] == 3
    assert s[("aegis_events_dropped_total", (("class", "audit"), ("reason", "ringbuf_full"),
                                             ("stage", "kernel")))] == 243
    assert s[("aegis_kernel_ringbuf_reserve_failures_total", (("hook", "file_open"),))] == 243
    assert s[("aegis_kernel_decisions_total", (("decision", "audit"), ("hook", "file_open")))] == 400
    assert s[("aegis_events_emitted_total", (("class", "audit"),))] == 400
    assert ("aegis_slo_burn_rate", (("class", "audit"), ("window", "5m"))) in s
    assert s[("aegis_ring_fill_ratio", (("ring", "audit"),))] == 0
    assert s[("aegis_derived_events_total", (("kind", "explanation"),))] == 3


async def test_serve_metrics_task_status_and_cancel():
    m = AegisMetrics(lambda: None)
    async with trio.open_nursery() as n:
        host, port = await n.start(serve_metrics, m, "127.0.0.1:0")
        head, body = await http_get(host, port, "/healthz")
        assert body == b"ok\n"
        n.cancel_scope.cancel()


def test_one_collector_per_concern_and_extra_collectors():
    """Each concern is its own collector registered on the registry; a further collector
    (e.g. a sink's own) is one argument, and its families are exposed and described."""
    from prometheus_client.core import GaugeMetricFamily

    from aegis_stream.pipeline.metrics import COLLECTORS

    class Extra:
        def collect(self):
            g = GaugeMetricFamily("aegis_test_extra", "a test family")
            g.add_metric([], 7)
            yield g

        describe = collect

    m = AegisMetrics(lambda: None, extra=[Extra()])
    assert len(m.collector.parts) == len(COLLECTORS) + 1 >= 10
    assert m.metric_names()["aegis_test_extra"] == "gauge"
    assert "aegis_test_extra 7.0" in m.exposition().decode()
