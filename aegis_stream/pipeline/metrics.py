"""Prometheus metrics (prometheus-client), served over HTTP at ``--metrics-addr``.

Every metric is computed at scrape time from ``Pipeline.statistics()`` (one frozen
snapshot), so the numbers on a scrape are consistent with each other and with the
pipeline's own accounting; nothing is double-booked.  Names are prefixed ``aegis_``;
docs/METRICS.md is the contract (tests/unit/test_metrics.py checks both ways).

One small collector per concern (prometheus client_python style): build info, state,
kernel counters, pipeline classes, rings, spool, SLO, sinks, memory, caches, policy
(signature expiry, canary results).  Each reads :class:`Sources`; adding one is a line in
:data:`COLLECTORS` (or pass it to :class:`AegisMetrics` as ``extra``).  The registry also
carries client_python's standard ``process_*`` and ``python_*`` collectors.

Deprecated names (:data:`DEPRECATED`) stay exported, with ``DEPRECATED`` in their HELP
text, for one release after their rename; ``AegisMetrics(deprecated=False)`` drops them early, e.g.
for a scrape that must pass ``promtool check metrics`` (which flags the old name).

The HTTP server is trio-native (``serve_metrics``): it runs in the agent's nursery, is
cancelled with it, and reads statistics on the trio thread (no locking needed).
"""

from __future__ import annotations

import calendar
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aegis_stream import __version__
from aegis_stream.agent.health import State
from aegis_stream.agent.reasons import STATE_CODES
from aegis_stream.fleet.metrics import KafkaSinkCollector
from aegis_stream.kernel import abi
from aegis_stream.pipeline import CLASSES, PipelineStatistics
from aegis_stream.pipeline.normalise import CacheStatistics

STATES: tuple[str, ...] = tuple(State)
MODES: tuple[str, ...] = (abi.Mode.ENFORCE.label, abi.Mode.AUDIT.label, abi.MODE_NONE)

#: deprecated exposed name -> (its replacement, the release that removes it); both are
#: exported until then (docs/METRICS.md, "Deprecated names")
DEPRECATED: dict[str, tuple[str, str]] = {
    "aegis_kernel_hook_counter_total": ("aegis_kernel_hook_counts_total", "0.2.0"),
}
#: canary outcomes as ``aegis policy apply --canary-seconds`` records them in the provenance log
CANARY_RESULTS: tuple[str, ...] = ("passed", "failed")


def _g(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _c(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


@dataclass(frozen=True)
class Sources:
    """What the collectors read: the statistics snapshot and the normaliser's caches."""

    stats: Callable[[], PipelineStatistics | None]
    caches: Callable[[], list[CacheStatistics]] = field(default=lambda: [])
    #: the policy state dir (generation records, provenance log); None: no policy metrics
    state_root: Path | None = None
    #: export the names of :data:`DEPRECATED` beside their replacements
    deprecated: bool = True


class StatsCollector(Collector):
    """One concern's families from one statistics snapshot (``None``: describe only)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> Iterator[Metric]:
        yield from self.families(None)

    def collect(self) -> Iterator[Metric]:
        yield from self.families(self.sources.stats())

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        raise NotImplementedError


class BuildInfoCollector(StatsCollector):
    """``aegis_build_info``: the agent version and event ABI as labels, so a scrape says what produced it."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        info = _g("aegis_build_info", "Agent version and event ABI (value 1)", ["version", "abi_version"])
        info.add_metric([__version__, str(abi.ABI_VERSION)], 1)
        yield info


def _state_codes(st: PipelineStatistics) -> Sequence[str]:
    return st.reason_codes  # the monitor's codes: never recovered from the texts


class StateCollector(StatsCollector):
    """Hooks, the active generation and mode, the protection state and its reasons."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        attached = _g("aegis_hook_attached", "1 when the hook's BPF program is attached", ["hook"])
        gen = _g("aegis_policy_generation", "Generation of the active policy slot (0 = none)")
        mode = _g("aegis_policy_mode", "1 for the active generation's mode (none = no valid slot)", ["mode"])
        state = _g("aegis_state", "1 for the agent's current protection state", ["state"])
        changes = _c("aegis_state_changes", "Protection state changes since start")
        why = _g("aegis_state_reason",
                 "1 for each reason code behind the current state (docs/DEGRADED_MODE.md)", ["reason"])
        if st is not None:
            active = set(_state_codes(st))
            for code in STATE_CODES:
                why.add_metric([code], 1.0 if code in active else 0.0)
            for hook, ok in sorted(st.hooks.items()):
                attached.add_metric([hook], 1.0 if ok else 0.0)
            gen.add_metric([], st.generation)
            for m in MODES:
                mode.add_metric([m], 1.0 if st.mode == m else 0.0)
            for s in STATES:
                state.add_metric([s], 1.0 if st.state == s else 0.0)
            changes.add_metric([], st.state_changes)
        yield from (attached, gen, mode, state, changes, why)


class KernelCountersCollector(StatsCollector):
    """The per-hook kernel counters (summed over CPUs)."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        kc = _c("aegis_kernel_hook_counts", "Raw per-hook kernel counters (summed over CPUs)",
                ["hook", "counter"])
        new, gone = DEPRECATED["aegis_kernel_hook_counter_total"]
        old = _c("aegis_kernel_hook_counter",
                 f"DEPRECATED: renamed {new}, removed in {gone}. Raw per-hook kernel counters",
                 ["hook", "counter"])
        kd = _c("aegis_kernel_decisions", "Kernel decisions by hook and decision", ["hook", "decision"])
        ks = _c("aegis_kernel_stale_rule_misses",
                "(dev, ino) matched a rule whose i_generation differs: a reused inode number, "
                "not the rule's file (allowed; GAP-INO-REUSE)", ["hook"])
        kf = _c("aegis_kernel_ringbuf_reserve_failures",
                "Ring-buffer reserves that failed in the kernel (event lost, decision kept)", ["hook"])
        inh = _c("aegis_path_rule_inherited",
                 "Files renamed over a path rule's path that inherited its rule in the kernel")
        inh_failed = _c("aegis_path_rule_inherit_failed",
                        "Renames over a path rule's path whose rule could not be inherited (rule map full)")
        if st is not None:
            cont = st.kernel.continuity
            inh.add_metric([], cont.get("inherited", 0))
            inh_failed.add_metric([], cont.get("inherit_failed", 0))
            for hook, ctrs in sorted(st.kernel.hooks.items()):
                for name, v in ctrs.items():
                    kc.add_metric([hook, name], v)
                    old.add_metric([hook, name], v)
                kd.add_metric([hook, "deny"], ctrs["denied"])
                kd.add_metric([hook, "audit"], ctrs["audited"])
                kf.add_metric([hook], ctrs["ringbuf_fail"])
                ks.add_metric([hook], ctrs.get("stale", 0))
        yield from (kc, kd, kf, ks, inh, inh_failed)
        if self.sources.deprecated:
            yield old


class ClassesCollector(StatsCollector):
    """Events per class through the pipeline: emitted, read, delivered, dropped, in flight."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        emitted = _c("aegis_events_emitted", "Decision events the kernel emitted since the agent started",
                     ["class"])
        read = _c("aegis_events_read", "Records read from the ring (or a previous run's spool)", ["class"])
        delivered = _c("aegis_events_delivered", "Events written by every sink", ["class"])
        dropped = _c("aegis_events_dropped", "Events lost, by stage and reason", ["stage", "class", "reason"])
        inflight = _g("aegis_events_in_flight", "Read, not yet delivered or dropped", ["class"])
        if st is not None:
            for k in CLASSES:
                c = st.classes[k]
                emitted.add_metric([k], c.kernel_emitted)
                read.add_metric([k], c.read)
                delivered.add_metric([k], c.delivered)
                inflight.add_metric([k], c.in_flight)
                dropped.add_metric(["kernel", k, "ringbuf_full"], c.kernel_dropped)
                for (stage, reason), n in sorted(c.dropped.items()):
                    dropped.add_metric([stage, k, reason], n)
        yield from (emitted, read, delivered, dropped, inflight)


class StormCollector(StatsCollector):
    """Deny-storm aggregation (bpf/storm.bpf.h): decisions folded into summaries, the keys the kernel
    tracks against its capacity, and what was not aggregated because the map was full."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        supp = _c("aegis_deny_storm_suppressed",
                  "Decisions the kernel folded into deny-storm summaries instead of an event each "
                  "(since the maps were created)", ["class"])
        untracked = _c("aegis_deny_storm_untracked",
                       "Decisions not aggregated because the storm map was full (each was an event)",
                       ["class"])
        reported = _c("aegis_deny_storm_reported", "Suppressed decisions in the summaries this agent wrote")
        summaries = _c("aegis_deny_storm_summaries", "aegis.storm.v1 summary records written")
        pruned = _c("aegis_deny_storm_pruned_keys", "Storm keys deleted (retired generation, process gone)")
        errors = _c("aegis_deny_storm_errors", "Storm map reads, commits and deletes that failed")
        keys = _g("aegis_deny_storm_keys", "Keys in the kernel's storm map at the last tick")
        cap = _g("aegis_deny_storm_keys_capacity", "The storm map's capacity (keys)")
        window = _g("aegis_deny_storm_window_seconds", "The aggregation window in force (0: off)")
        s = st.storms if st is not None else None
        if s is not None:
            for k in CLASSES:
                supp.add_metric([k], s.suppressed.get(k, 0))
                untracked.add_metric([k], s.untracked.get(k, 0))
            reported.add_metric([], s.reported)
            summaries.add_metric([], s.summaries)
            pruned.add_metric([], s.pruned)
            errors.add_metric([], s.errors)
            keys.add_metric([], s.keys)
            cap.add_metric([], s.capacity)
            window.add_metric([], s.window_s)
        yield from (supp, untracked, reported, summaries, pruned, errors, keys, cap, window)


class RingsCollector(StatsCollector):
    """Per ring: fill ratio, consumer lag and producer discards, the early warning before a ring overflows."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        fill = _g("aegis_ring_fill_ratio", "Ring bytes waiting / ring size", ["ring"])
        lag = _g("aegis_consumer_lag_bytes", "Producer - consumer position of the ring", ["ring"])
        disc = _c("aegis_ring_discarded_records", "Records the producer discarded", ["ring"])
        if st is not None:
            for k, r in sorted(st.rings.items()):
                fill.add_metric([k], r.fill_ratio)
                lag.add_metric([k], r.available_bytes)
                disc.add_metric([k], r.discarded)
        yield from (fill, lag, disc)


class SpoolCollector(StatsCollector):
    """The deny disk spool: denies waiting in it, its file size, and how many went through it."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        sp_pending = _g("aegis_spool_pending_events", "Denies waiting in the disk spool")
        sp_bytes = _g("aegis_spool_bytes", "Size of the disk spool file")
        sp_total = _c("aegis_spool_spooled_events", "Denies that went through the disk spool")
        if st is not None:
            sp_pending.add_metric([], st.spool.pending_events)
            sp_bytes.add_metric([], st.spool.file_bytes)
            sp_total.add_metric([], st.spool.spooled_events)
        yield from (sp_pending, sp_bytes, sp_total)


class SloCollector(StatsCollector):
    """The drop-rate SLO: the objective, drop ratio and burn rate per class and window, and which alerts
    fire."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        ratio = _g("aegis_slo_drop_ratio", "Dropped / emitted over the window", ["class", "window"])
        burn = _g("aegis_slo_burn_rate", "Drop ratio over the window / objective", ["class", "window"])
        firing = _g("aegis_slo_alert_firing", "1 while the burn-rate alert fires", ["class", "alert"])
        objective = _g("aegis_slo_objective_ratio", "Allowed drop ratio (the SLO objective)")
        if st is not None:
            objective.add_metric([], st.slo_objective)
            for (k, w), dr in sorted(st.drop_ratios.items()):
                ratio.add_metric([k, w], dr)
            for (k, w), b in sorted(st.burn_rates.items()):
                burn.add_metric([k, w], b)
            for (k, a), f in sorted(st.alerts_firing.items()):
                firing.add_metric([k, a], 1.0 if f else 0.0)
        yield from (objective, ratio, burn, firing)


class SinksCollector(StatsCollector):
    """Per sink: events accepted, failed writes and the events in them; plus the derived records written."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        s_events = _c("aegis_sink_events", "Events a sink accepted", ["sink"])
        s_fail = _c("aegis_sink_failures", "Sink write calls that failed", ["sink"])
        s_failev = _c("aegis_sink_failed_events", "Events in failed sink writes", ["sink"])
        derived = _c("aegis_derived_events", "state/slo/explanation records written", ["kind"])
        if st is not None:
            for sk in st.sinks:
                s_events.add_metric([sk.name], sk.events)
                s_fail.add_metric([sk.name], sk.failures)
                s_failev.add_metric([sk.name], sk.failed_events)
            for kind, n in sorted(st.derived_events.items()):
                derived.add_metric([kind], n)
        yield from (s_events, s_fail, s_failev, derived)


class MemoryCollector(StatsCollector):
    """How often the heap was trimmed after a drained burst (pipeline/memtrim.py)."""

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        trims = _c("aegis_memory_trims", "Heap trims after a drained burst (malloc_trim)")
        if st is not None:
            trims.add_metric([], st.memory_trims)
        yield trims


class CachesCollector(StatsCollector):
    """The normaliser's caches (their own statistics, not the pipeline snapshot)."""

    def describe(self) -> Iterator[Metric]:
        yield from self.cache_families([])

    def collect(self) -> Iterator[Metric]:
        yield from self.cache_families(self.sources.caches())

    def cache_families(self, caches: list[CacheStatistics]) -> Iterator[Metric]:
        lookups = _c("aegis_cache_lookups", "Normaliser cache lookups", ["cache", "result"])
        entries = _g("aegis_cache_entries", "Normaliser cache size", ["cache"])
        for cs in caches:
            lookups.add_metric([cs.name, "hit"], cs.hits)
            lookups.add_metric([cs.name, "miss"], cs.misses)
            entries.add_metric([cs.name], cs.size)
        yield from (lookups, entries)


def _iso_seconds(text: str) -> float | None:
    """A provenance record's ``time`` (``2026-12-01T12:00:00.000000Z``) as Unix seconds."""
    try:
        whole, _, frac = text.rstrip("Z").partition(".")
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))
    except ValueError:
        return None


class PolicyCollector(StatsCollector):
    """The active policy's signature expiry and the canary outcomes of ``aegis policy apply
    --canary-seconds``, read from the state dir (the generation's signed envelope; the
    provenance log, read incrementally: it is append-only)."""

    def __init__(self, sources: Sources) -> None:
        super().__init__(sources)
        self._expiry: dict[int, float | None] = {}  # generation -> expires_at (None: unsigned)
        self._log_pos = 0
        self._log_ino = 0
        self._canary_n = dict.fromkeys(CANARY_RESULTS, 0)
        self._canary_last: dict[str, float] = {}

    def _expires_at(self, generation: int) -> float | None:
        if generation in self._expiry:
            return self._expiry[generation]
        from aegis_stream.errors import SignatureError
        from aegis_stream.policy.signing import parse_envelope

        assert self.sources.state_root is not None
        path = self.sources.state_root / "generations" / f"{generation}.signed"
        try:
            exp: float | None = float(parse_envelope(path.read_bytes(), str(path)).signature.expires_at)
        except FileNotFoundError:
            exp = None  # applied unsigned (audit mode allows that): nothing expires
        except (OSError, SignatureError):
            return None  # unreadable now: not cached, tried again at the next scrape
        self._expiry = {generation: exp}  # only the active generation's is ever asked for
        return exp

    def _read_canaries(self) -> None:
        assert self.sources.state_root is not None
        path = self.sources.state_root / "provenance.jsonl"
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self._log_ino or st.st_size < self._log_pos:  # replaced: read it again
                    self._log_ino, self._log_pos = st.st_ino, 0
                    self._canary_n = dict.fromkeys(CANARY_RESULTS, 0)
                    self._canary_last = {}
                fh.seek(self._log_pos)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # whole records only: a torn last line is read when complete
        self._log_pos += end
        for line in data[:end].splitlines():
            if b'"canary"' not in line:
                continue
            try:
                rec = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if not isinstance(rec, dict) or rec.get("action") != "canary":
                continue
            result = "passed" if rec.get("result") == "ok" else "failed"
            self._canary_n[result] += 1
            ts = _iso_seconds(str(rec.get("time", "")))
            if ts is not None:
                self._canary_last[result] = ts

    def families(self, st: PipelineStatistics | None) -> Iterator[Metric]:
        expiry = _g("aegis_policy_signature_expiry_timestamp_seconds",
                    "When the active generation's policy signature expires (Unix seconds)")
        runs = _c("aegis_policy_canary_runs", "Canary applies recorded in the provenance log", ["result"])
        last = _g("aegis_policy_canary_last_run_timestamp_seconds",
                  "When the last canary of this result was recorded (Unix seconds)", ["result"])
        if st is not None and self.sources.state_root is not None:
            if st.generation:
                exp = self._expires_at(st.generation)
                if exp is not None:
                    expiry.add_metric([], exp)
            self._read_canaries()
            for r in CANARY_RESULTS:
                runs.add_metric([r], self._canary_n[r])
                if r in self._canary_last:
                    last.add_metric([r], self._canary_last[r])
        yield from (expiry, runs, last)


#: every aegis collector, in exposition order: adding a concern is one line here
COLLECTORS: tuple[Callable[[Sources], Collector], ...] = (
    BuildInfoCollector,
    StateCollector,
    KernelCountersCollector,
    ClassesCollector,
    RingsCollector,
    StormCollector,
    SpoolCollector,
    SloCollector,
    SinksCollector,
    KafkaSinkCollector,  # aegis_sink_* of Kafka sinks (aegis_stream/fleet/metrics.py)
    MemoryCollector,
    CachesCollector,
    PolicyCollector,
)


class AegisCollector(Collector):
    """Every aegis_ collector of :data:`COLLECTORS` as one (for describing them all)."""

    def __init__(
        self,
        stats: Callable[[], PipelineStatistics | None],
        caches: Callable[[], list[CacheStatistics]] | None = None,
        extra: Iterable[Collector] = (),
        *,
        state_root: Path | None = None,
        deprecated: bool = True,
    ) -> None:
        sources = Sources(stats, caches or (lambda: []), state_root, deprecated)
        self.parts: list[Collector] = [make(sources) for make in COLLECTORS] + list(extra)

    def describe(self) -> Iterator[Metric]:
        for part in self.parts:  # as the registry does: describe() is optional on a Collector
            describe = getattr(part, "describe", None)
            yield from (describe() if describe is not None else part.collect())

    def collect(self) -> Iterator[Metric]:
        for part in self.parts:
            yield from part.collect()


class AegisMetrics:
    """The registry (fresh per instance unless one is given) with one collector per
    concern; ``extra``: more collectors (e.g. a sink's own).  ``state_root``: the policy
    state dir, for the policy metrics; ``deprecated``: export deprecated names too
    (:data:`DEPRECATED`); ``standard``: register client_python's ``process_*`` and
    ``python_*`` collectors (not on a registry that already has them, such as the global
    default one)."""

    def __init__(
        self,
        stats: Callable[[], PipelineStatistics | None],
        registry: CollectorRegistry | None = None,
        *,
        caches: Callable[[], list[CacheStatistics]] | None = None,
        extra: Iterable[Collector] = (),
        state_root: Path | None = None,
        deprecated: bool = True,
        standard: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.collector = AegisCollector(stats, caches, extra, state_root=state_root, deprecated=deprecated)
        for part in self.collector.parts:
            self.registry.register(part)
        if standard:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def metric_names(self) -> dict[str, str]:
        """Exposed name -> type (counters with their ``_total``)."""
        out = {}
        for fam in self.collector.describe():
            name = fam.name + "_total" if fam.type == "counter" else fam.name
            out[name] = fam.type
        return out


# ------------------------------------------------------------------------------- HTTP
def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``, ``:PORT`` = all interfaces)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {addr!r} is not HOST:PORT")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


async def _handle(stream: trio.SocketStream, metrics: AegisMetrics) -> None:
    async with stream:
        data = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in data and len(data) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            status, ctype, body = b"405 Method Not Allowed", b"text/plain", b"GET /metrics\n"
        elif parts[1].split(b"?")[0] in (b"/metrics", b"/"):
            status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), metrics.exposition()
        elif parts[1] == b"/healthz":
            status, ctype, body = b"200 OK", b"text/plain", b"ok\n"
        else:
            status, ctype, body = b"404 Not Found", b"text/plain", b"not found\n"
        head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
        try:
            await stream.send_all(head + (body if parts[:1] != [b"HEAD"] else b""))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def open_metrics_listeners(addr: str) -> list[trio.SocketListener]:
    """Bind ``addr`` now (the agent does this before it touches the kernel, so a taken
    port refuses the start and changes nothing).  One-line ``OSError`` on failure."""
    try:
        host, port = parse_addr(addr)
    except ValueError as exc:
        raise OSError(str(exc)) from None
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise OSError(f"cannot listen on {addr}: {why}") from None


async def serve_metrics(
    metrics: AegisMetrics, addr: str, *, task_status: Any = trio.TASK_STATUS_IGNORED,
    listeners: list[trio.SocketListener] | None = None,
) -> None:
    """Serve ``/metrics`` until cancelled; ``task_status.started((host, port))``.
    ``listeners``: already bound (:func:`open_metrics_listeners`); else ``addr`` is bound."""
    if listeners is None:
        host, port = parse_addr(addr)
        listeners = await trio.open_tcp_listeners(port, host=host)
    sock = listeners[0].socket
    bound = sock.getsockname()
    task_status.started((bound[0], bound[1]))

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, metrics)

    await trio.serve_listeners(handler, listeners)
