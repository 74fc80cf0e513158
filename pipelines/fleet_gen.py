"""Synthetic fleet traffic for the fleet worker's tests and bench.

Records as the agent's Kafka sink writes them: one JSON :class:`DecisionEvent` /
:class:`StateEvent` per record, key = host, the schema in the record headers.  The
expected fleet counts are computed from what was generated, independently of the worker.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec

from aegis_stream.fleet.topics import DECISION_TOPIC, HEADER_SCHEMA, HEADER_SCHEMA_VERSION, STATE_TOPIC
from aegis_stream.pipeline.schema import DecisionEvent, StateEvent

_enc = msgspec.json.Encoder()
DECISION_HEADERS: list[tuple[str, str | bytes | None]] = [
    (HEADER_SCHEMA, b"aegis.decision.v1"), (HEADER_SCHEMA_VERSION, b"1")]
STATE_HEADERS: list[tuple[str, str | bytes | None]] = [
    (HEADER_SCHEMA, b"aegis.state.v1"), (HEADER_SCHEMA_VERSION, b"1")]


class Expected(msgspec.Struct):
    """What the fleet tables must hold after the generated stream."""

    by_host: dict[str, list[int]]  # host -> [deny, audit]
    by_rule: dict[str, int]  # "rule|gen" -> denies
    denies: int = 0
    audits: int = 0


def decision(i: int, *, hosts: int, rules: int, t0: int, rate: int) -> DecisionEvent:
    host = f"host-{i % hosts:03d}"
    t = t0 + i // max(rate, 1)
    # ktime advances with the decision time (``rate`` per second): the fleet worker's
    # dedup window (1 s of ktime) then holds about a second of a host's ids, as it would live
    kt = 1_000_000_000 + i * (1_000_000_000 // max(rate, 1))
    return DecisionEvent(
        event_id=f"0123abcd-{kt}-{i % 97}", time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        + f".{i % 1_000_000:06d}Z", ktime_ns=kt, host=host, hook="file_open", action="open",
        decision="audit" if i % 5 == 0 else "deny", mode="enforce", rule_id=f"rule-{(i * 7) % rules}",
        rule_index=(i * 7) % rules, generation=1 + (i // 1000) % 2, policy_name="fleet", policy_version=1,
        policy_digest="sha256:00", rule_source="/etc/shadow", dev="8:1", ino=1234, cgroup_id=1,
        cgroup_path="/", scope_cgroup_id=0, scope_cgroup_path="", pid=100 + i % 50, tid=100 + i % 50,
        uid=0, gid=0, comm="cat",
    )


def decisions(n: int, *, start: int = 0, hosts: int = 12, rules: int = 40, t0: int = 1_796_000_000,
              rate: int = 20_000) -> Iterator[DecisionEvent]:
    for i in range(start, start + n):
        yield decision(i, hosts=hosts, rules=rules, t0=t0, rate=rate)


def expected(events: list[DecisionEvent] | Iterator[DecisionEvent]) -> Expected:
    by_host: dict[str, list[int]] = {}
    by_rule: Counter[str] = Counter()
    d = a = 0
    for ev in events:
        c = by_host.setdefault(ev.host, [0, 0])
        if ev.decision == "deny":
            c[0] += 1
            d += 1
            by_rule[f"{ev.rule_id}|{ev.generation}"] += 1
        else:
            c[1] += 1
            a += 1
    return Expected(by_host=by_host, by_rule=dict(by_rule), denies=d, audits=a)


def state(host: str, state_: str = "enforcing", *, seq: int = 0, emitted: dict[str, int] | None = None,
          dropped: dict[str, int] | None = None, reasons: list[str] | None = None) -> bytes:
    """A state record as the agent writes it (cumulative per-class totals included)."""
    ev = StateEvent(
        event_id=f"0123abcd-agent-{seq}", time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        + ".000000Z", host=host, state=state_, previous="", reasons=list(reasons or []),  # type: ignore[arg-type]
        hooks_attached=["file_open", "bprm_check_security"],
        hooks_expected=["file_open", "bprm_check_security"], mode="enforce", generation=1,
        ring_fill={"deny": 0.0, "audit": 0.0}, consumer_lag_bytes={"deny": 0, "audit": 0},
        drop_ratio={"deny": 0.0, "audit": 0.0}, emitted_total=dict(emitted or {}),
        dropped_total=dict(dropped or {}),
    )
    return _enc.encode(ev)


def produce_decisions(bootstrap: str, events: Iterator[DecisionEvent], *, topic: str = DECISION_TOPIC) -> int:
    """Produce with the agent sink's settings (idempotent, acks=all); returns the count."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                  "linger.ms": 20, "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000})
    n = 0
    for ev in events:
        value = _enc.encode(ev)
        while True:
            try:
                p.produce(topic, value, key=ev.host.encode(), headers=DECISION_HEADERS)
                break
            except BufferError:
                p.poll(0.05)
        n += 1
        if n % 5000 == 0:
            p.poll(0)
    left = p.flush(60)
    if left:
        raise RuntimeError(f"{left} decision records not delivered")
    return n


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The consumer group's committed offsets on ``topic``, summed (records it will not
    read again after a restart; a partition with no commit counts 0)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    return sum(max(tp.offset, 0) for tp in tps)


def produce_states(bootstrap: str, records: list[tuple[str, bytes]], *, topic: str = STATE_TOPIC) -> None:
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for host, value in records:
        p.produce(topic, value, key=host.encode(), headers=STATE_HEADERS)
    if p.flush(30):
        raise RuntimeError("state records not delivered")


# ------------------------------------------------------------------ a worker process
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


class WorkerProcess:
    """``python -m pipelines.fleet worker`` as a child process (cwd = the repository),
    read through its Prometheus endpoint; for tests and the bench."""

    def __init__(self, bootstrap: str, app_id: str, metrics_port: int, *, data_dir: str,
                 topics: tuple[str, str, str] | None = None, naive: bool = False,
                 extra: list[str] | None = None, log: str | None = None) -> None:
        import sys

        self.metrics_port = metrics_port
        self.argv = [sys.executable, "-m", "pipelines.fleet", "worker", "--kafka", bootstrap,
                     "--app-id", app_id, "--metrics-addr", f"127.0.0.1:{metrics_port}",
                     "--data-dir", data_dir, "--summary-every", "2"]
        if topics:
            self.argv += ["--decision-topic", topics[0], "--state-topic", topics[1],
                          "--fleet-topic", topics[2]]
        if naive:
            self.argv.append("--naive")
        self.argv += extra or []
        self.log = log
        self.proc: Any = None

    def start(self) -> WorkerProcess:
        import subprocess

        if self.log:
            with open(self.log, "ab") as out:  # the child keeps its own descriptor
                self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        else:
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def metrics(self) -> dict[str, float]:
        """Sample name with labels -> value (empty while the endpoint is not up); the key
        is the sample as exposed, e.g. ``aegis_fleet_decisions_total{decision="deny"}``."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return sample_map(text)

    def wait(self, pred: Any, timeout: float, what: str) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        m: dict[str, float] = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}) waiting for {what}")
            m = self.metrics()
            if m and pred(m):
                return m
            time.sleep(0.25)
        raise TimeoutError(f"worker: no {what} within {timeout:.0f}s (last {summary_of(m)})")

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def kill9(self) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (faust's clean shutdown), SIGKILL after 20 s."""
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill9()


def sample_map(text: str) -> dict[str, float]:
    """A Prometheus exposition read by prometheus_client's parser: ``name{k="v",...}`` (labels
    in exposition order) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def summary_of(m: dict[str, float]) -> str:
    keys = ('aegis_fleet_decisions_total{decision="deny"}', 'aegis_fleet_decisions_total{decision="audit"}',
            'aegis_fleet_records_total{topic="decision"}')
    return ", ".join(f"{k.split('{')[1][:-1]}={m.get(k)}" for k in keys)


def denies(m: dict[str, float]) -> float:
    return m.get('aegis_fleet_decisions_total{decision="deny"}', -1)


def audits(m: dict[str, float]) -> float:
    return m.get('aegis_fleet_decisions_total{decision="audit"}', -1)


def records(m: dict[str, float]) -> float:
    return m.get('aegis_fleet_records_total{topic="decision"}', -1)


def host_counts(m: dict[str, float]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for k, v in m.items():
        if k.startswith("aegis_fleet_host_decisions{"):
            labels = dict(p.split("=", 1) for p in k[k.index("{") + 1:-1].split(","))
            host, dec = labels["host"].strip('"'), labels["decision"].strip('"')
            out.setdefault(host, [0, 0])[0 if dec == "deny" else 1] = int(v)
    return out
