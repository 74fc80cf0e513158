"""`promtool check metrics` on a real scrape of a running pipeline (fake kernel), the
deprecated name's rename, the standard process_/python_ metrics and the policy metrics
(signature expiry, canary results read from the state dir)."""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from aegis_stream.agent.run import serve_pipeline
from aegis_stream.kernel import abi
from aegis_stream.pipeline.metrics import (
    DEPRECATED,
    AegisMetrics,
    PolicyCollector,
    Sources,
    serve_metrics,
)
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.policy.provenance import ProvenanceLog
from aegis_stream.policy.signing import DEFAULT_EXPIRES_DAYS
from aegis_stream.testing import make_events
from tests.unit._prometheus import http_get, signed_policy_world, tool


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def ring_sizes():
    return 1 << 16, 1 << 14  # the audit ring overflows: drops and a degraded state on the scrape


def _world(make_pipeline, kernel, tmp_path):
    """promtool present (or the skip/failure), a signed policy world, a pipeline over it."""
    tool("promtool")
    store = signed_policy_world(kernel, tmp_path)
    return store, make_pipeline(kernel, store, [MemorySink()], tmp_path, tick_s=0.05)


async def _agent_endpoint(n: trio.Nursery, p, **kw) -> tuple[str, int]:
    """serve_pipeline (the agent's own stop path and metrics endpoint) in ``n``; its address."""
    bound: list[tuple[str, int]] = []
    n.start_soon(lambda: serve_pipeline(p, metrics_addr="127.0.0.1:0", signals=False,
                                        metrics_started=bound.append, **kw))
    while not bound:
        await trio.sleep(0.01)
    return bound[0]


async def test_promtool_check_metrics_on_a_real_scrape(make_pipeline, kernel, tmp_path):
    store, p = _world(make_pipeline, kernel, tmp_path)
    async with trio.open_nursery() as n:
        bound = [await _agent_endpoint(n, p)]
        clean = AegisMetrics(p.statistics, caches=p.norm.cache_statistics, state_root=store.root,
                             deprecated=False)
        host, port = await n.start(serve_metrics, clean, "127.0.0.1:0")
        kernel.emit_bulk("audit", make_events(400, generation=3), 400)
        kernel.emit_bulk("deny", make_events(3, decision=abi.Decision.DENY, generation=3), 3)
        await p.drain(timeout=5)
        await trio.sleep(0.2)  # a tick
        _, agent_body = await http_get(*bound[0], "/metrics")
        _, clean_body = await http_get(host, port, "/metrics")
        n.cancel_scope.cancel()
    agent_text, clean_text = agent_body.decode(), clean_body.decode()

    # without deprecated names the real scrape is lint-clean
    out = _promtool_check(clean_text)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    # the agent's default keeps the old name one release: its one finding is that name
    out = _promtool_check(agent_text)
    assert out.returncode != 0
    assert (out.stdout + out.stderr).strip().splitlines() == [
        "aegis_kernel_hook_counter_total metric name should not include type 'counter'"]

    s = _samples(agent_text)
    new, gone = DEPRECATED["aegis_kernel_hook_counter_total"]
    assert new == "aegis_kernel_hook_counts_total" and gone == "0.2.0"
    key = (("counter", "denied"), ("hook", "file_open"))
    assert s[("aegis_kernel_hook_counts_total", key)] == s[("aegis_kernel_hook_counter_total", key)] == 3
    assert "# HELP aegis_kernel_hook_counter_total DEPRECATED: renamed aegis_kernel_hook_counts_total, " \
           "removed in 0.2.0." in agent_text
    assert "aegis_kernel_hook_counter_total" not in clean_text
    assert s[("aegis_kernel_hook_counts_total", key)] == _samples(clean_text)[("aegis_kernel_hook_counts_total", key)]
    # standard process and python metrics on the agent's own registry
    assert s[("process_resident_memory_bytes", ())] > 0 and s[("process_open_fds", ())] > 0
    assert any(k[0] == "python_info" for k in s)
    assert any(k[0].startswith("python_gc_") for k in s)
    # the policy metrics: generation 3 is active, signed for the default 90 days
    exp = s[("aegis_policy_signature_expiry_timestamp_seconds", ())]
    assert abs(exp - (time.time() + DEFAULT_EXPIRES_DAYS * 86400)) < 120
    assert s[("aegis_policy_generation", ())] == 3
    assert s[("aegis_policy_canary_runs_total", (("result", "failed"),))] == 1
    assert s[("aegis_policy_canary_runs_total", (("result", "passed"),))] == 1
    assert 0 < time.time() - s[("aegis_policy_canary_last_run_timestamp_seconds", (("result", "failed"),))] < 120


async def test_agent_without_deprecated_names_passes_promtool(make_pipeline, kernel, tmp_path):
    """``metrics_deprecated_names = false`` (``aegis run --no-deprecated-metrics``): the
    agent's own endpoint drops the old name and its scrape passes the lint."""
    _, p = _world(make_pipeline, kernel, tmp_path)
    async with trio.open_nursery() as n:
        bound = [await _agent_endpoint(n, p, metrics_deprecated=False)]
        kernel.emit_bulk("deny", make_events(2, decision=abi.Decision.DENY, generation=3), 2)
        await p.drain(timeout=5)
        await trio.sleep(0.2)  # a tick
        _, body = await http_get(*bound[0], "/metrics")
        n.cancel_scope.cancel()
    text = body.decode()
    out = _promtool_check(text)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    assert "aegis_kernel_hook_counter_total" not in text
    assert _samples(text)[("aegis_kernel_hook_counts_total", (("counter", "denied"), ("hook", "file_open")))] == 2


def _policy_samples(col: PolicyCollector) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in col.collect() for s in fam.samples}


def test_policy_collector_follows_the_log_and_the_active_generation(kernel, tmp_path):
    """The provenance log is read incrementally (a torn last line waits until it is whole, a
    replaced log is read again); the expiry follows the active generation, and an unsigned
    generation has none."""
    store = signed_policy_world(kernel, tmp_path)
    gen = {"n": 3}
    col = PolicyCollector(Sources(lambda: SimpleNamespace(generation=gen["n"]),  # type: ignore[arg-type]
                                  state_root=store.root))
    s = _policy_samples(col)
    assert s[("aegis_policy_canary_runs_total", (("result", "failed"),))] == 1
    signed3 = s[("aegis_policy_signature_expiry_timestamp_seconds", ())]
    log = ProvenanceLog(store.root)
    log.append("canary", policy="web", version=9, generation=9, deny_rate=9.0)
    with open(log.path, "ab") as fh:
        fh.write(b'{"action":"canary","result":"refused","time":"2026-')  # torn: not yet counted
    s = _policy_samples(col)
    assert s[("aegis_policy_canary_runs_total", (("result", "passed"),))] == 2
    assert s[("aegis_policy_canary_runs_total", (("result", "failed"),))] == 1
    with open(log.path, "ab") as fh:
        fh.write(b'12-01T10:00:00.500000Z"}\n')
    s = _policy_samples(col)
    assert s[("aegis_policy_canary_runs_total", (("result", "failed"),))] == 2
    assert s[("aegis_policy_canary_last_run_timestamp_seconds", (("result", "failed"),))] == 1796119200.5
    log.path.unlink()  # a replaced (here: emptied) log is counted from its start again
    log.path.write_bytes(b"")
    s = _policy_samples(col)
    assert s[("aegis_policy_canary_runs_total", (("result", "failed"),))] == 0
    assert ("aegis_policy_canary_last_run_timestamp_seconds", (("result", "failed"),)) not in s
    gen["n"] = 1
    s = _policy_samples(col)
    assert 0 < s[("aegis_policy_signature_expiry_timestamp_seconds", ())] <= signed3
    (store.gen_dir / "1.signed").unlink()  # as if applied unsigned (audit mode)
    col2 = PolicyCollector(Sources(lambda: SimpleNamespace(generation=1),  # type: ignore[arg-type]
                                   state_root=store.root))
    assert ("aegis_policy_signature_expiry_timestamp_seconds", ()) not in _policy_samples(col2)
