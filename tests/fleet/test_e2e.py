"""End to end: three agents -> Kafka -> the faust fleet worker (marker ``fleet``).

Three agents (the real agent pipeline on the fake kernel, each with its own host name)
replay one recorded kernel stream -- the same raw records for every host, so the hosts
differ only by name: denies of three rules and audit decisions; host A's audit ring is
too small for its bursts, so it loses audit events in the kernel (counted) and its
drop-rate SLO burns.  Each agent writes to the KafkaSink (the product's sink) and to a
memory sink (the truth).  A fleet worker (pipelines/fleet.py, a subprocess) consumes it
all.  The module has its own broker: the fleet's totals must be these three hosts only.

Proved:
* every deny an agent produced is on aegis.decision.v1 exactly once per (host, event_id),
  in the agent's order, with its explanation on aegis.explanation.v1;
* the worker counts them: per host (its Prometheus ``aegis_fleet_host_decisions``) and
  per (rule, generation) (``aegis_fleet_rule_denies``), equal to the agents' own counts;
* the fleet SLO matches the per-host SLOs the agents computed: each agent publishes its
  cumulative emitted/dropped totals per class in every state record (a heartbeat every
  second here, so one comes after its last event); the worker's per-host totals equal
  each agent's own statistics, the fleet drop ratio equals their sum's, the fleet's
  drop-rate window sums the agents' own windows per class, and the fleet alert fires
  because that sum burns past the threshold (host A's agent fires its own).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest
import trio

from aegis_stream.kernel import abi
from aegis_stream.pipeline import Pipeline, PipelineConfig, PipelineStatistics
from aegis_stream.pipeline.schema import DecisionEvent, SloEvent, event_decoder
from aegis_stream.pipeline.sinks import MemorySink
from aegis_stream.policy.store import PolicyStore
from aegis_stream.testing import FakeKernel, fixed_normaliser, install, make_events, sample_record

from .conftest import started_broker
from .readback import read_topic

ROOT = Path(__file__).resolve().parents[2]
BURSTS = 12
DENY_PER_BURST = 50
AUDIT_PER_BURST = 400
HEARTBEAT_S = 1.0  # the agents' state heartbeat (default 15 s): totals reach the worker soon


def recorded_stream() -> list[tuple[bytes, bytes]]:
    """The kernel stream every agent replays: (deny records, audit records) per burst."""
    out = []
    for i in range(BURSTS):
        kt = 10**9 + i * 10**7
        out.append((
            make_events(DENY_PER_BURST, decision=abi.Decision.DENY, generation=7, rule_ids=3,
                        start_ktime=kt, step_ns=1000),
            make_events(AUDIT_PER_BURST, generation=7, rule_ids=3, start_ktime=kt + 5 * 10**6,
                        step_ns=1000),
        ))
    return out


class Agent:
    """One host: the fake kernel, the pipeline, its KafkaSink and the truth sink."""

    def __init__(self, name: str, workdir: Path, audit_ring: int) -> None:
        self.name = name
        self.dir = workdir / name
        self.kernel = FakeKernel(deny_ring_size=1 << 20, audit_ring_size=audit_ring)
        self.store = PolicyStore(self.dir / "state")
        install(self.kernel, self.store, sample_record(7, mode="enforce"))
        self.truth = MemorySink()
        self.pipeline: Pipeline | None = None
        self.kafka = None
        self.slo_windows: dict[str, tuple[int, int]] = {}
        self.final: PipelineStatistics | None = None

    async def run(self, bootstrap: str, stream: list[tuple[bytes, bytes]]) -> None:
        from aegis_stream.fleet.sink import open_kafka_sink

        norm = fixed_normaliser(self.store)
        norm.host = self.name
        self.kafka = await open_kafka_sink(bootstrap, host_key=self.name,
                                           spool_dir=self.dir / "spool")
        self.pipeline = p = Pipeline(self.kernel.consumers(), norm, [self.kafka, self.truth],
                                     self.kernel.view(),
                                     config=PipelineConfig(spool_dir=str(self.dir / "rawspool"),
                                                           tick_s=0.2, state_heartbeat_s=HEARTBEAT_S))
        async with trio.open_nursery() as n:
            await n.start(p.run)
            for deny, audit in stream:
                self.kernel.emit_bulk("deny", deny, DENY_PER_BURST)
                self.kernel.emit_bulk("audit", audit, AUDIT_PER_BURST)
                await trio.sleep(0.05)
            # everything read and accounted, then two heartbeats: the last state record
            # carries the final totals (and the SLO is evaluated on them)
            with trio.fail_after(30):
                while any(c.in_flight or c.backlog for c in p.statistics().classes.values()):
                    await trio.sleep(0.05)
            await trio.sleep(2 * HEARTBEAT_S + 0.5)
            assert await p.drain_and_stop(timeout=60)
        self.final = p.statistics()
        await self.kafka.aclose()
        now = trio.current_time()
        for klass in ("deny", "audit"):
            w = p.slo.window(klass, max(a.long_s for a in p.slo.config.alerts), now)
            self.slo_windows[klass] = (w.emitted, w.dropped)

    def events(self) -> list:
        return [event_decoder.decode(x) for x in self.truth.lines]

    def denies(self) -> list[DecisionEvent]:
        return [e for e in self.events() if isinstance(e, DecisionEvent) and e.decision == "deny"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def e2e_broker(tmp_path_factory):
    """A broker of this module's own: the fleet's totals are these three hosts only."""
    yield from started_broker(tmp_path_factory.mktemp("e2e-kafka"))


@pytest.fixture(scope="module")
def fleet_run(e2e_broker, tmp_path_factory):
    """The whole run, once: worker up, three agents replay the stream, worker caught up."""
    work = tmp_path_factory.mktemp("e2e")
    port = _free_port()
    agents: list[Agent] = []
    log = open(work / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipelines.fleet", "worker", "--kafka", e2e_broker.bootstrap,
         "--app-id", f"e2e-{uuid.uuid4().hex[:6]}", "--metrics-addr", f"127.0.0.1:{port}",
         "--summary-every", "1", "--silent-after", "600", "--data-dir", str(work / "worker")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert worker.poll() is None, (work / "worker.log").read_text()[-3000:]
            try:
                _metrics(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "worker metrics never answered"
                time.sleep(0.5)
        tag = uuid.uuid4().hex[:6]
        agents += [Agent(f"e2e-{tag}-a", work, audit_ring=1 << 14),  # loses audit in the kernel
                   Agent(f"e2e-{tag}-b", work, audit_ring=1 << 22),
                   Agent(f"e2e-{tag}-c", work, audit_ring=1 << 22)]
        stream = recorded_stream()

        async def main() -> None:
            async with trio.open_nursery() as n:
                for a in agents:
                    n.start_soon(a.run, e2e_broker.bootstrap, stream)

        trio.run(main)
        # the worker has caught up when its per-host deny counts stop short of nothing
        # and read each agent's last state record (its final totals)
        want = {a.name: len(a.denies()) for a in agents}
        final = {a.name: a.final.classes["audit"].kernel_emitted for a in agents if a.final}
        deadline = time.monotonic() + 120
        m: dict = {}
        while time.monotonic() < deadline:
            m = _metrics(port)
            got = {h: m.get(("aegis_fleet_host_decisions", (("decision", "deny"), ("host", h))))
                   for h in want}
            emitted = {h: m.get(("aegis_fleet_host_slo_events",
                                 (("class", "audit"), ("host", h), ("kind", "emitted")))) for h in final}
            if got == want and emitted == final:
                break
            time.sleep(1.0)
        time.sleep(3.0)  # a few summaries / SLO evaluations on the final state
        yield agents, _metrics(port), work
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        for a in agents:
            a.kernel.close()


def test_every_deny_on_the_topic_exactly_once_per_host_in_order_with_its_explanation(
        fleet_run, e2e_broker):
    agents, _, _ = fleet_run
    decisions = read_topic(e2e_broker.bootstrap, "aegis.decision.v1")
    explanations = read_topic(e2e_broker.bootstrap, "aegis.explanation.v1")
    for a in agents:
        truth = [d.event_id for d in a.denies()]
        assert len(truth) == BURSTS * DENY_PER_BURST  # the agent lost no deny
        mine = [r for r in decisions if r.key == a.name.encode()]
        on_topic = [r.doc["event_id"] for r in mine if r.doc["decision"] == "deny"]
        assert len({r.partition for r in mine}) == 1  # key = host: one partition
        counts = Counter(on_topic)
        assert counts and max(counts.values()) == 1, "a deny is on the topic twice"
        assert on_topic == truth  # exactly the agent's denies, in its order
        assert all(r.headers["aegis-schema"] == b"aegis.decision.v1" for r in mine)
        expl = [r.doc["event_id"] for r in explanations if r.key == a.name.encode()]
        assert sorted(expl) == sorted(truth)
        st = a.kafka.statistics()
        assert st.spooled == 0 and st.delivery_failed == 0  # the broker was up throughout


def test_the_worker_counts_every_deny_per_host_and_per_rule(fleet_run, e2e_broker):
    agents, m, work = fleet_run
    decisions = read_topic(e2e_broker.bootstrap, "aegis.decision.v1")
    per_rule: Counter = Counter()
    for a in agents:
        denies = a.denies()
        got = m.get(("aegis_fleet_host_decisions", (("decision", "deny"), ("host", a.name))))
        assert got == len(denies), (work / "worker.log").read_text()[-2000:]
        # audit is best effort: the worker counts exactly what reached the topic, and
        # what did not is counted by the sink
        on_topic = sum(1 for r in decisions if r.key == a.name.encode() and r.doc["decision"] == "audit")
        truth = sum(1 for e in a.events() if isinstance(e, DecisionEvent) and e.decision == "audit")
        got_a = m.get(("aegis_fleet_host_decisions", (("decision", "audit"), ("host", a.name))))
        assert got_a == on_topic
        assert truth - on_topic <= sum(a.kafka.statistics().dropped.values())
        for d in denies:
            per_rule[(d.rule_id, d.generation)] += 1
    assert len(per_rule) == 3
    for (rule, gen), n in per_rule.items():
        assert m.get(("aegis_fleet_rule_denies", (("generation", str(gen)), ("rule", rule)))) == n
    assert m.get(("aegis_fleet_decisions_total", (("decision", "deny"),))) == sum(per_rule.values())
    # nothing spooled (the broker was up): nothing repeated, nothing refused as a repeat
    assert m.get(("aegis_fleet_duplicates_total", (("decision", "deny"),))) == 0


def _m(m: dict, name: str, **labels: str) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


def test_fleet_slo_matches_the_agents_slos(fleet_run, e2e_broker):
    agents, m, work = fleet_run
    a, b, c = agents
    # the agents' own view: host A burns its audit budget (kernel ring losses), B and C not
    assert a.slo_windows["audit"][1] > 0 and b.slo_windows["audit"][1] == 0 == c.slo_windows["audit"][1]
    assert any(isinstance(e, SloEvent) and e.event_class == "audit" and e.status == "firing"
               for e in a.events())
    log = (work / "worker.log").read_text()[-2000:]
    sums = {}
    for klass in ("deny", "audit"):
        e_sum = d_sum = 0
        for x in agents:
            assert x.final is not None
            st = x.final.classes[klass]
            e_sum += st.kernel_emitted
            d_sum += st.dropped_total
            # per host: what the worker holds from the agent's state records == its statistics
            got = (_m(m, "aegis_fleet_host_slo_events", host=x.name, **{"class": klass}, kind="emitted"),
                   _m(m, "aegis_fleet_host_slo_events", host=x.name, **{"class": klass}, kind="dropped"))
            assert got == (st.kernel_emitted, st.dropped_total), (x.name, klass, log)
            # and the agent's own SLO window holds the same totals (all inside its long window)
            assert x.slo_windows[klass] == (st.kernel_emitted, st.dropped_total), (x.name, klass)
        sums[klass] = (e_sum, d_sum)
        assert _m(m, "aegis_fleet_slo_events_total", **{"class": klass}, kind="emitted") == e_sum
        assert _m(m, "aegis_fleet_slo_events_total", **{"class": klass}, kind="dropped") == d_sum
        assert _m(m, "aegis_fleet_drop_ratio", **{"class": klass}) == pytest.approx(d_sum / e_sum, rel=1e-12)
        # the fleet's long window sums the agents' own long windows
        agents_long = (sum(x.slo_windows[klass][0] for x in agents), sum(x.slo_windows[klass][1] for x in agents))
        fleet_long = (_m(m, "aegis_fleet_slo_window_events", **{"class": klass}, window="1h", kind="emitted"),
                      _m(m, "aegis_fleet_slo_window_events", **{"class": klass}, window="1h", kind="dropped"))
        assert fleet_long == agents_long, klass
    assert sums["deny"][1] == 0  # no deny lost anywhere
    emitted, dropped = sums["audit"]
    burn = dropped / emitted / 0.001
    assert burn >= 14.4  # so the fleet alert must fire
    assert _m(m, "aegis_fleet_slo_burn_rate", **{"class": "audit"}, window="1h") == pytest.approx(burn)
    fleet = [msgspec.json.decode(r.value) for r in read_topic(e2e_broker.bootstrap, "aegis.fleet.v1")]
    alerts = [f for f in fleet if f["kind"] == "slo_alert" and f["event_class"] == "audit"]
    assert alerts, f"the fleet SLO never fired although the agents' sum burns at {burn:.0f}"
    assert alerts[-1]["status"] == "firing"
    assert _m(m, "aegis_fleet_slo_alert_firing", **{"class": "audit"}, alert="page") == 1
    # the alert's evidence is the fleet window when it fired: part of the final sums
    first = alerts[0]
    assert 0 < first["dropped_long"] <= dropped and 0 < first["emitted_long"] <= emitted
    assert first["dropped_long"] / first["emitted_long"] / 0.001 >= 14.4
    deny = [f for f in fleet if f["kind"] == "slo_alert" and f["event_class"] == "deny"]
    assert not deny  # no deny lost anywhere: the deny SLO never fires
    assert _m(m, "aegis_fleet_slo_alert_firing", **{"class": "deny"}, alert="page") == 0
