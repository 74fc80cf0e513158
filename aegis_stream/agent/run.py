"""The trio agent: load + attach + apply, then run the event pipeline.

Task tree (one nursery owns everything; cancellation is explicit)::

    run_agent
    └── serve_pipeline
        ├── Pipeline.run        readers, spool feeder, normalisers, writers, ticker
        │                       (see aegis_stream/pipeline.py)
        ├── serve_metrics       Prometheus text at --metrics-addr (trio-native HTTP)
        ├── PathWatcher.run     path rules follow their paths: inotify on their parent
        │                       directories, restage on a move (agent/pathwatch.py)
        └── stop_on_signal      SIGINT/SIGTERM: drain what the kernel already produced,
                                then stop

On exit the links stay pinned: enforcement continues without the agent (documented
in docs/REFERENCE_ENFORCEMENT_SLICE.md).  ``aegis unload`` removes them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from aegis_stream import inputs
from aegis_stream.agent import reasons
from aegis_stream.agent.health import (
    Reason,
    ReasonCode,
    State,
    continuity_reason,
    hooks_reason,
    unique_codes,
)
from aegis_stream.agent.integrity import IntegrityChecker
from aegis_stream.agent.pathwatch import PathWatcher
from aegis_stream.agent.sdnotify import Notifier
from aegis_stream.agent.status import HookPhase, ReconcileInfo, StatusFile
from aegis_stream.errors import AegisError, LoadError
from aegis_stream.kernel import abi, libbpf
from aegis_stream.kernel.loader import AttachReport, BpfObject
from aegis_stream.kernel.ringbuf import RingBuffer
from aegis_stream.pipeline import MapsKernelView, Pipeline, PipelineConfig, PipelineStatistics
from aegis_stream.pipeline.normalise import Normaliser
from aegis_stream.pipeline.schema import StateEvent
from aegis_stream.pipeline.sinks import Sink, open_sink
from aegis_stream.pipeline.storms import reporter_for
from aegis_stream.policy.lifecycle import Lifecycle, ReconcileOutcome
from aegis_stream.policy.store import PolicyStore, atomic_write, state_dir
from aegis_stream.processors.degraded import DegradedConfig
from aegis_stream.processors.slo import AlertRule, SloConfig

POLL_INTERVAL_S = 0.05
STATUS_NAME = "status.json"  # <state dir>/status.json: what `aegis status` reads
HEARTBEAT_S = 5.0  # the status file is refreshed this often (aegis status: stale after 30 s)
EXIT_REFUSED = 2  # the agent refused to start; nothing in the kernel changed


def default_status_path() -> Path:
    return state_dir() / STATUS_NAME


def proc_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[19])


@dataclass
class AgentConfig:
    """How ``aegis run`` was asked to run: built by the CLI from its flags (cli/main.py), read by
    :func:`run_agent`.  ``policy`` None applies nothing: the kernel keeps its pinned, reconciled
    generation; ``mode`` overrides the policy's mode; ``events`` ``-`` is stdout.  The pipeline
    knobs become a :class:`PipelineConfig` through :meth:`pipeline_config` (spool under the state
    dir unless ``spool_dir`` says otherwise), so the pipeline never sees the CLI's names.
    ``kafka`` None means no Kafka sink."""
    policy: str | None = None
    events: str = "-"
    metrics_addr: str | None = None
    metrics_deprecated_names: bool = True  # docs/METRICS.md "Deprecated names"
    mode: str | None = None  # override the policy's mode
    status_file: str | None = None
    exit_after: float | None = None  # for demos and tests: stop after N seconds
    # pipeline knobs (defaults documented in docs/EVENTS.md)
    audit_sample_n: int = 1
    spool_dir: str | None = None  # default: <state dir>/spool
    spool_max_bytes: int = 64 << 20
    events_max_bytes: int = 256 << 20  # rotate the events file at this size
    events_backups: int = 5
    events_compress: bool = False  # gzip rotated files (path.N.gz)
    events_file_mode: int = 0o640  # mode of a newly created events file
    slo_objective: float = 0.001
    slo_burn: float = 14.4
    tick_s: float = 1.0
    explain_denies: bool = True
    kafka: str | None = None  # bootstrap of the Kafka sink (docs/FLEET.md); None: no Kafka
    kafka_host_key: str | None = None  # its record key (default: the host name)
    storm_window_s: float = 10.0  # deny-storm window (bpf/storm.bpf.h); 0 = off
    extra: dict[str, Any] = field(default_factory=dict)

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            audit_sample_n=self.audit_sample_n,
            spool_dir=self.spool_dir or str(state_dir() / "spool"),
            spool_max_bytes=self.spool_max_bytes,
            tick_s=self.tick_s,
            explain_denies=self.explain_denies,
            poll_interval_s=POLL_INTERVAL_S,
            degraded=DegradedConfig(),
            slo=SloConfig(objective=self.slo_objective, alerts=[AlertRule(burn=self.slo_burn)]),
        )


def _log(msg: str) -> None:
    print(f"aegis: {msg}", file=sys.stderr, flush=True)


def write_status(
    path: str | None, report: AttachReport | Mapping[str, bool], state: str,
    extra: Mapping[str, Any], coded: list[Reason] | None = None,
) -> None:
    """The status file (:class:`~aegis_stream.agent.status.StatusFile`,
    docs/DEGRADED_MODE.md): the agent's state, reasons and reason codes, per-hook loader
    state, its pid and process start time, and when it was written (wall clock ``time``
    for humans, ``monotonic`` for staleness: immune to clock jumps).

    ``coded``: the reasons with their codes (the monitor's); ``extra`` sets any other
    field of the file, checked against the Struct (a wrong type raises
    ``msgspec.ValidationError``, a programming error, not an I/O one)."""
    if not path:
        return
    if isinstance(report, AttachReport):
        hooks = {p.hook: HookPhase(hook=p.hook, phase=p.phase, name=p.name, errno=p.errno,
                                   error=p.error, pinned=p.pinned)
                 for p in report.programs.values()}
    else:
        hooks = {h: HookPhase(hook=h, phase="attached" if ok else "failed")
                 for h, ok in report.items()}
    fields: dict[str, Any] = {"time": time.time(), "monotonic": time.monotonic(), **extra}
    if coded is not None:
        fields["reasons"] = [r.text for r in coded]
        fields["reason_codes"] = unique_codes(coded)
        fields["codes_by_reason"] = [r.code for r in coded]
    doc = msgspec.convert(fields, StatusFile)
    doc = msgspec.structs.replace(doc, pid=os.getpid(), start_time=proc_start_time(os.getpid()),
                                  state=state, hooks=hooks)
    atomic_write(Path(path), msgspec.json.encode(doc))


def _refuse(path: str | None, code: str, detail: str, extra: dict | None = None) -> int:
    """A start refused before anything changed (or with the kernel left as it was): one
    line on stderr, the reason recorded in the status file for `aegis status`, exit 2."""
    why = reasons.text(code, detail)
    _log(f"error: {why}; not started")
    notify = Notifier.from_env(unset=False)  # `systemctl status` shows why (a no-op elsewhere)
    notify.status(f"refused: {why}")
    notify.close()
    try:
        write_status(path, {}, "", {"running": False, "last_error": why, "last_error_code": code,
                                    **(extra or {})})
    except OSError:
        pass  # the refusal is on stderr already; a missing status file reads as "not running"
    return EXIT_REFUSED


async def serve_pipeline(
    pipeline: Pipeline,
    *,
    metrics_addr: str | None = None,
    metrics_deprecated: bool = True,
    exit_after: float | None = None,
    signals: bool = True,
    drain_timeout: float = 5.0,
    metrics_started: Callable[[tuple[str, int]], None] | None = None,
    metrics_listeners: list[trio.SocketListener] | None = None,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_s: float = HEARTBEAT_S,
    started: Callable[[], object] | None = None,
    reopen: Callable[[], None] | None = None,
    stopping: Callable[[], object] | None = None,
    background: Sequence[Callable[..., Awaitable[object]]] = (),
) -> None:
    """Run the pipeline (and the metrics endpoint) until a signal or ``exit_after``;
    either way what the kernel already produced is drained first.  ``started`` is
    called once the pipeline and the metrics endpoint run (systemd's READY=1),
    ``reopen`` on SIGHUP (the events file, for logrotate), ``stopping`` when a stop
    begins.  ``background``: more tasks the nursery owns (``nursery.start``: each says
    when it is running), cancelled with the rest."""
    # the signal receiver opens before anything slow starts (a Kafka sink's broker probe and
    # producer process take minutes under TCG): a SIGTERM during start-up waits in it instead
    # of killing the agent by the default action (6.12 CI: exit -15), and it stays open
    # through the drain so a repeated SIGTERM cannot cut the drain short
    with contextlib.ExitStack() as stack:
        sigs = (stack.enter_context(trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
                if signals else None)
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            for task in background:
                await nursery.start(task)
            if metrics_addr:
                from aegis_stream.pipeline.metrics import AegisMetrics, serve_metrics

                metrics = AegisMetrics(pipeline.statistics, caches=pipeline.norm.cache_statistics,
                                       state_root=pipeline.norm.store.root,  # policy expiry, canaries
                                       deprecated=metrics_deprecated)
                bound = await nursery.start(partial(serve_metrics, listeners=metrics_listeners),
                                            metrics, metrics_addr)
                _log(f"metrics on http://{bound[0]}:{bound[1]}/metrics")
                if metrics_started is not None:
                    metrics_started(bound)

            if started is not None:
                started()

            async def finish() -> None:
                if stopping is not None:
                    stopping()
                await pipeline.drain_and_stop(drain_timeout)
                nursery.cancel_scope.cancel()

            if heartbeat is not None:
                async def beat() -> None:
                    failures = 0
                    while True:
                        await trio.sleep(heartbeat_s)
                        try:
                            heartbeat()
                        except OSError as exc:  # a full disk must not stop the agent; a bug must
                            failures += 1       # not be swallowed, so nothing else is caught
                            if failures == 1 or failures % 60 == 0:
                                _log(f"status file not refreshed ({failures} times): {exc}")

                nursery.start_soon(beat)

            if sigs is not None:
                async def stop_on_signal(sigs: AsyncIterator[int]) -> None:
                    stopping_now = False
                    async for signum in sigs:
                        if signum == signal.SIGHUP:  # logrotate: reopen, keep running
                            if reopen is not None:
                                reopen()
                            continue
                        if not stopping_now:  # a repeated SIGTERM while draining changes nothing
                            stopping_now = True
                            nursery.start_soon(finish)

                nursery.start_soon(stop_on_signal, sigs)
            if exit_after is not None:
                await trio.sleep(exit_after)
                await finish()


def _summary(st: PipelineStatistics) -> str:
    parts = []
    for k, c in st.classes.items():
        drops = ", ".join(f"{s}/{r}={n}" for (s, r), n in sorted(c.dropped.items()))
        parts.append(f"{k}: delivered={c.delivered} kernel_dropped={c.kernel_dropped}"
                     + (f" dropped {drops}" if drops else ""))
    return "; ".join(parts)


def reconcile_conditions(rec: ReconcileOutcome) -> dict[ReasonCode, str]:
    """Monitor conditions from the startup reconciliation: an interrupted apply whose
    outcome the kernel does not explain keeps the agent degraded until the next apply."""
    if rec.status == "inconsistent":
        code = ReasonCode.RECONCILE_INCONSISTENT
        return {code: reasons.text(code, rec.detail)}
    return {}


async def run_agent(cfg: AgentConfig) -> int:
    """Start order (docs/DEGRADED_MODE.md): everything that can refuse without touching the
    kernel first (metrics address, policy file), then load/attach/pin, reconcile, apply."""
    status_path = cfg.status_file or str(default_status_path())
    listeners: list[trio.SocketListener] | None = None
    if cfg.metrics_addr:
        from aegis_stream.pipeline.metrics import open_metrics_listeners

        try:
            listeners = await open_metrics_listeners(cfg.metrics_addr)
        except OSError as exc:
            return _refuse(status_path, "metrics_unavailable", str(exc))
    data: bytes | None = None
    if cfg.policy:
        try:  # bounded: a FIFO, /dev/zero, an over-size file is one line (docs/INPUT_LIMITS.md)
            data = inputs.read_bounded(cfg.policy, inputs.ENVELOPE_BYTES, "policy")
        except AegisError as exc:
            await _close_listeners(listeners)
            return _refuse(status_path, "policy_unreadable", str(exc))
        try:  # its shape checked before the kernel is touched (an envelope's on apply)
            if data.lstrip()[:1] != b"{":
                inputs.check_policy_shape(inputs.decode_policy_text(data, cfg.policy), cfg.policy)
        except AegisError as exc:
            await _close_listeners(listeners)
            return _refuse(status_path, reasons.refusal_code(exc), str(exc))
    try:
        return await _run_loaded(cfg, status_path, listeners, data)
    finally:
        await _close_listeners(listeners)


async def _close_listeners(listeners: list[trio.SocketListener] | None) -> None:
    for ln in listeners or []:
        with contextlib.suppress(OSError):  # closing a bound socket: nothing else expected
            await ln.aclose()


async def _run_loaded(cfg: AgentConfig, status_path: str,
                      listeners: list[trio.SocketListener] | None, data: bytes | None) -> int:
    store = PolicyStore()
    obj = BpfObject()
    try:
        obj.open()
        reused = obj.reuse_pinned_maps()
        if reused:
            _log(f"reusing pinned maps: {', '.join(reused)}")
        obj.load()
    except LoadError as exc:
        obj.close()
        return _refuse(status_path, "load_failed", str(exc))
    report = obj.attach_all(pin=True)
    if not report.enforcing_capable:
        _log(f"DEGRADED: {report.summary()}; refusing to claim enforcement")
    else:
        _log(report.summary())
    maps = obj.maps()
    state = State.AUDITING
    lifecycle = Lifecycle(obj.policy_maps())
    rec = lifecycle.reconcile()  # after a crash mid-apply: exactly old or new, recorded
    lifecycle.set_storm_window(int(cfg.storm_window_s * 1e9))  # 0: off
    _log(f"deny-storm window: {cfg.storm_window_s:g} s" if cfg.storm_window_s
         else "deny-storm aggregation off")
    conditions = reconcile_conditions(rec)
    if rec.status != "clean":
        _log(f"reconciled pinned state: {rec.status}, effective {rec.effective} "
             f"(generation {rec.generation}) {rec.detail}")
    base: dict[str, Any] = {"reused_maps": reused, "pin_root": obj.pin_root,
                            "reconcile": ReconcileInfo(status=rec.status, effective=rec.effective,
                                                       generation=rec.generation,
                                                       detail=rec.detail)}
    if cfg.policy and data is not None:
        try:
            res = lifecycle.apply(data, cfg.policy, mode_override=cfg.mode)
        except (AegisError, OSError) as exc:
            obj.close()
            code = reasons.refusal_code(exc)
            return _refuse(status_path, code, str(exc), base)
        _log(
            f"applied policy {res.policy.name} v{res.policy.version} as generation "
            f"{res.generation} in {res.mode} mode ({len(res.policy.rules)} rules, "
            f"{len(res.policy.scopes) or 'host-wide'} scopes, "
            f"signed by {res.signer or 'nobody: unsigned, audit only'})"
        )
        state = State.healthy(res.mode) if report.enforcing_capable else State.AUDITING
    else:
        from aegis_stream.kernel import slots

        active = slots.read_state(obj.policy_maps()).active
        if active.valid:
            state = State.healthy(active.mode)
    start_reasons = [Reason(code, why) for code, why in conditions.items()]
    hooks = hooks_reason([p.hook for p in report.programs.values()], report.attached)
    cont = continuity_reason([p.hook for p in report.programs.values()], report.attached)
    if hooks is not None:
        state = State.BLIND if hooks.code is ReasonCode.HOOKS_NONE else State.DEGRADED
        start_reasons.insert(0, hooks)
    elif conditions or cont is not None:
        state = State.DEGRADED
    if cont is not None:
        start_reasons.append(cont)
    try:
        write_status(status_path, report, state, base, start_reasons)
    except OSError as exc:
        _log(f"status file {status_path} not written: {exc}")
    _log(f"state: {state}")

    notify = Notifier.from_env()  # systemd Type=notify (a no-op outside systemd)

    def on_state(ev: StateEvent) -> None:
        notify.status(f"{ev.state}" + (f": {'; '.join(ev.reasons)}" if ev.reasons else ""))
        judged = list(pipeline.monitor.judged)
        if [r.text for r in judged] == ev.reasons:  # the monitor's reasons, with their codes
            write_status(status_path, report, ev.state,
                         {**base, "generation": ev.generation, "mode": ev.mode}, judged)
        else:  # the monitor moved on since the event: the event's own texts and codes
            write_status(status_path, report, ev.state,
                         {**base, "generation": ev.generation, "mode": ev.mode,
                          "reasons": ev.reasons, "reason_codes": ev.reason_codes})

    rings = {
        "deny": RingBuffer(maps[abi.MAP_DENY_EVENTS].fd, maps[abi.MAP_DENY_EVENTS].max_entries,
                           abi.MAP_DENY_EVENTS),
        "audit": RingBuffer(maps[abi.MAP_AUDIT_EVENTS].fd, maps[abi.MAP_AUDIT_EVENTS].max_entries,
                            abi.MAP_AUDIT_EVENTS),
    }
    view = MapsKernelView(
        maps, obj.policy_maps(),
        lambda: {p.hook: p.phase == "attached" for p in report.programs.values()},
        libbpf.num_possible_cpus(),
    )
    sinks: list[Sink] = [open_sink(cfg.events, max_bytes=cfg.events_max_bytes, backups=cfg.events_backups,
                                   compress=cfg.events_compress, file_mode=cfg.events_file_mode)]
    kafka = None
    if cfg.kafka:  # denies acked or spooled, audit best effort (docs/FLEET.md)
        from aegis_stream.fleet.sink import open_kafka_sink

        kafka = await open_kafka_sink(cfg.kafka, host_key=cfg.kafka_host_key, strict=False,
                                      spool_dir=cfg.pipeline_config().spool_dir or ".",
                                      spool_max_bytes=cfg.spool_max_bytes)
        sinks.append(kafka)
    norm = Normaliser(store)
    pipeline = Pipeline(rings, norm, sinks, view, config=cfg.pipeline_config(), on_state=on_state,
                        storms=reporter_for(maps, obj.policy_maps(), norm, libbpf.num_possible_cpus()))
    for code, why in conditions.items():
        pipeline.monitor.set_condition(code, why)
    # every tick: the kernel's active slot, mode and rule map against the signed generation
    # record and the provenance log (a bpftool write is reported, never silent)
    integrity = IntegrityChecker(obj.policy_maps())
    pipeline.ticker.checks.append(integrity.conditions)
    # path rules follow their paths (delete + create, a replaced parent directory, what moved
    # while the agent was down): restaged through the lifecycle, path_rule_moved until then
    watcher = PathWatcher(lifecycle)
    pipeline.ticker.checks.append(watcher.conditions)
    integrity.on_inherited = watcher.trigger
    if kafka is not None:
        kafka.bind_monitor(pipeline.monitor)  # broker away: degraded, sink_failing

    def status_line() -> str:
        m = pipeline.monitor
        now = m.state or state
        return f"{now}" + (f": {'; '.join(m.reasons)}" if m.reasons else "")

    def on_tick() -> None:
        # a stalled consumer (records waiting, none read) stops the petting as a stalled
        # ticker does: systemd restarts the agent, the pinned links enforce meanwhile
        if ReasonCode.CONSUMER_STALLED not in pipeline.monitor.codes:
            notify.watchdog()

    pipeline.ticker.on_tick = on_tick

    def reopen() -> None:
        for s in sinks:
            fn = getattr(s, "reopen", None)
            if fn is None:
                continue
            try:
                fn()
            except OSError as exc:  # the next write opens it again (and counts a failure)
                _log(f"{s.name}: reopen failed: {exc}")
        _log("SIGHUP: events file reopened")

    def heartbeat() -> None:
        st = pipeline.statistics()
        write_status(status_path, report, st.state or state,
                     {**base, "generation": st.generation, "mode": st.mode},
                     list(pipeline.monitor.judged))

    try:
        await serve_pipeline(pipeline, metrics_addr=cfg.metrics_addr,
                             metrics_deprecated=cfg.metrics_deprecated_names, exit_after=cfg.exit_after,
                             metrics_listeners=listeners, heartbeat=heartbeat,
                             started=lambda: notify.ready(status_line()), reopen=reopen,
                             stopping=lambda: notify.stopping(f"stopping: draining; {status_line()}"),
                             background=[watcher.run])
    finally:
        with trio.CancelScope(shield=True):
            for s in sinks:
                await s.aclose()
        # statistics read ring positions: take them before the rings are unmapped
        final = pipeline.statistics()
        summary = _summary(final)
        for r in rings.values():
            r.close()
        obj.close(keep_pins=True)
        write_status(status_path, report, final.state or state,
                     {**base, "running": False, "stopped_at": time.time()},
                     list(pipeline.monitor.judged))
        _log(f"stopped; {summary}; pinned links keep enforcing")
        notify.close()
    return 0
