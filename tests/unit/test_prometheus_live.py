"""A real Prometheus (Debian's 2.42) on 127.0.0.1 scrapes a running pipeline on the fake
kernel every second with packaging/prometheus/aegis-rules.yml loaded; the fake kernel loses
a hook, the agent turns degraded, and the alert API says AegisHookNotAttached fires (and
AegisDegraded waits out its `for`).  The same Prometheus evaluates every expression of the
Grafana dashboard (packaging/grafana): each parses and returns data, and every series name
it queries is in the agent's real scrape.  ~10 s, so it stays in the unit suite."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from aegis_stream.agent.run import serve_pipeline
from aegis_stream.kernel import abi
from aegis_stream.pipeline.metrics import DEPRECATED
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.testing import make_events
from tests.unit._prometheus import http_get, need_module, signed_policy_world, tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "aegis-rules.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "dashboard.py"
WAIT_S = 60  # bound on every wait; a healthy run needs a few seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_expressions() -> list[str]:
    import importlib.util
    import sys

    need_module("grafana_foundation_sdk")
    spec = importlib.util.spec_from_file_location("aegis_dashboard", DASHBOARD)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        return mod.expressions()
    finally:
        del sys.modules[spec.name]


class PromAPI:
    """The Prometheus HTTP API (urllib in a worker thread: Go's server keeps connections open)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def _get(self, path: str, **params: str) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400 on a bad expression: its JSON says why
            with exc:
                return json.loads(exc.read())

    async def get(self, path: str, **params: str) -> Any:
        return await trio.to_thread.run_sync(lambda: self._get(path, **params))

    async def ready(self) -> bool:
        def probe() -> bool:
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False
        return await trio.to_thread.run_sync(probe)

    async def alerts(self) -> list[dict]:
        return (await self.get("/api/v1/alerts"))["data"]["alerts"]

    async def query(self, expr: str) -> dict:
        return await self.get("/api/v1/query", query=expr)


async def _until(what: str, check: Any) -> Any:
    deadline = trio.current_time() + WAIT_S
    while True:
        got = await check()
        if got:
            return got
        if trio.current_time() > deadline:
            pytest.fail(f"not within {WAIT_S} s: {what}")
        await trio.sleep(0.25)


def test_dashboard_json_is_what_the_code_builds():
    need_module("grafana_foundation_sdk")
    out = subprocess.run([__import__("sys").executable, str(DASHBOARD), "--check"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr


async def test_real_prometheus_fires_the_alert_and_evaluates_the_dashboard(make_pipeline, kernel, tmp_path):
    prometheus = tool("prometheus")
    t0 = time.monotonic()
    store = signed_policy_world(kernel, tmp_path)
    p = make_pipeline(kernel, store, [MemorySink()], tmp_path, tick_s=0.1)
    bound: list[tuple[str, int]] = []
    port = _free_port()
    api = PromAPI(port)
    log = tmp_path / "prometheus.log"
    async with trio.open_nursery() as n:
        n.start_soon(lambda: serve_pipeline(p, metrics_addr="127.0.0.1:0", signals=False,
                                            metrics_started=bound.append))
        while not bound:
            await trio.sleep(0.01)
        host, mport = bound[0]
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "aegis",
                                "static_configs": [{"targets": [f"{host}:{mport}"]}]}],
        }))
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                [prometheus, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=logf, stderr=subprocess.STDOUT)
        try:
            await _until("prometheus ready", api.ready)
            kernel.emit_bulk("audit", make_events(50, generation=3), 50)
            kernel.emit_bulk("deny", make_events(5, decision=abi.Decision.DENY, generation=3), 5)

            async def enforcing() -> bool:
                r = await api.query('aegis_state{job="aegis", state="enforcing"} == 1')
                return bool(r["data"]["result"])
            await _until("the agent scraped as enforcing", enforcing)
            # the fixture's state dir holds a canary that failed a moment ago: that alert may
            # fire (for an hour after a failure); nothing else may
            early = {a["labels"]["alertname"] for a in await api.alerts()
                     if a["labels"]["alertname"].startswith("Aegis")}
            assert early <= {"AegisPolicyCanaryFailed"}, early

            kernel.attached.discard("mmap_file")  # the hook is lost: partial attach, degraded

            async def firing() -> list[dict]:
                return [a for a in await api.alerts() if a["labels"]["alertname"] == "AegisHookNotAttached"
                        and a["state"] == "firing"]
            fired = await _until("AegisHookNotAttached firing", firing)
            t_fired = time.monotonic() - t0
            assert fired[0]["labels"] == {"alertname": "AegisHookNotAttached", "hook": "mmap_file",
                                          "instance": f"{host}:{mport}", "job": "aegis",
                                          "severity": "critical"}
            assert fired[0]["annotations"]["summary"] == \
                f"aegis hook mmap_file is not attached on {host}:{mport}"
            alerts = {a["labels"]["alertname"]: a["state"] for a in await api.alerts()}
            assert alerts.get("AegisDegraded") == "pending"  # for: 5m
            assert "AegisBlind" not in alerts

            # the dashboard: every expression parses and has data (a '> 0' loss filter may be
            # empty), every series name it queries is in the agent's real scrape
            _, body = await http_get(host, mport, "/metrics")
            scraped = {s.name for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
            exprs = _dashboard_expressions()
            assert len(exprs) >= 20
            for expr in exprs:
                promql = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
                r = await api.query(promql)
                assert r["status"] == "success", (expr, r.get("error"))
                names = set(re.findall(r"\b(?:aegis|process|python)_[a-z0-9_]+", expr))
                assert names and names <= scraped, (expr, names - scraped)
                assert not names & set(DEPRECATED), (expr, "queries a deprecated name")
                if not expr.endswith("> 0"):
                    assert r["data"]["result"], f"no data: {expr}"
            r = await api.query("aegis_state{")  # and a broken expression is refused, so the check can fail
            assert r["status"] == "error" and r["errorType"] == "bad_data"
        finally:
            proc.terminate()
            try:
                await trio.to_thread.run_sync(lambda: proc.wait(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            n.cancel_scope.cancel()
    print(f"AegisHookNotAttached firing {t_fired:.1f} s after the test started")
