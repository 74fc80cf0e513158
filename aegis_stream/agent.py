"""The trio agent: load + attach + apply, then run the event pipeline.

Task tree (one nursery owns everything; cancellation is explicit)::

    run_agent
    └── serve_pipeline
        ├── Pipeline.run        readers, spool feeder, normalisers, writers, ticker
        │                       (see aegis_stream/pipeline.py)
        ├── serve_metrics       Prometheus text at --metrics-addr (trio-native HTTP)
        └── stop_on_signal      SIGINT/SIGTERM: drain what the kernel already produced,
                                then stop

On exit the links stay pinned: enforcement continues without the agent (documented
in docs/REFERENCE_ENFORCEMENT_SLICE.md).  ``aegis unload`` removes them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from aegis_stream import abi, libbpf
from aegis_stream.errors import AegisError
from aegis_stream.lifecycle import Lifecycle
from aegis_stream.loader import AttachReport, BpfObject
from aegis_stream.normalise import Normaliser
from aegis_stream.pipeline import MapsKernelView, Pipeline, PipelineConfig
from aegis_stream.ringbuf import RingBuffer
from aegis_stream.schema import StateEvent
from aegis_stream.sinks import Sink, open_sink
from aegis_stream.store import PolicyStore, atomic_write, state_dir
from pipelines.degraded import DegradedConfig
from pipelines.slo import AlertRule, SloConfig

POLL_INTERVAL_S = 0.05


@dataclass
class AgentConfig:
    policy: str | None = None
    events: str = "-"
    metrics_addr: str | None = None
    mode: str | None = None  # override the policy's mode
    status_file: str | None = None
    exit_after: float | None = None  # for demos and tests: stop after N seconds
    # pipeline knobs (defaults documented in docs/EVENTS.md)
    audit_sample_n: int = 1
    spool_dir: str | None = None  # default: <state dir>/spool
    spool_max_bytes: int = 64 << 20
    events_max_bytes: int = 256 << 20  # rotate the events file at this size
    events_backups: int = 5
    slo_objective: float = 0.001
    slo_burn: float = 14.4
    tick_s: float = 1.0
    explain_denies: bool = True
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
    path: str | None, report: AttachReport | Mapping[str, bool], state: str, extra: dict
) -> None:
    if not path:
        return
    if isinstance(report, AttachReport):
        hooks: dict[str, Any] = {p.hook: p.as_dict() for p in report.programs.values()}
    else:
        hooks = {h: {"hook": h, "phase": "attached" if ok else "failed"} for h, ok in report.items()}
    doc = {"pid": os.getpid(), "state": state, "hooks": hooks, "time": time.time(), **extra}
    atomic_write(Path(path), msgspec.json.encode(doc))


async def serve_pipeline(
    pipeline: Pipeline,
    *,
    metrics_addr: str | None = None,
    exit_after: float | None = None,
    signals: bool = True,
    drain_timeout: float = 5.0,
    metrics_started: Callable[[tuple[str, int]], None] | None = None,
) -> None:
    """Run the pipeline (and the metrics endpoint) until a signal or ``exit_after``;
    either way what the kernel already produced is drained first."""
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        if metrics_addr:
            from aegis_stream.metrics import AegisMetrics, serve_metrics

            metrics = AegisMetrics(pipeline.statistics, caches=pipeline.norm.cache_statistics)
            bound = await nursery.start(serve_metrics, metrics, metrics_addr)
            _log(f"metrics on http://{bound[0]}:{bound[1]}/metrics")
            if metrics_started is not None:
                metrics_started(bound)

        async def finish() -> None:
            await pipeline.drain_and_stop(drain_timeout)
            nursery.cancel_scope.cancel()

        if signals:
            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        nursery.start_soon(finish)
                        return

            nursery.start_soon(stop_on_signal)
        if exit_after is not None:
            await trio.sleep(exit_after)
            await finish()


def _summary(pipeline: Pipeline) -> str:
    st = pipeline.statistics()
    parts = []
    for k, c in st.classes.items():
        drops = ", ".join(f"{s}/{r}={n}" for (s, r), n in sorted(c.dropped.items()))
        parts.append(f"{k}: delivered={c.delivered} kernel_dropped={c.kernel_dropped}"
                     + (f" dropped {drops}" if drops else ""))
    return "; ".join(parts)


async def run_agent(cfg: AgentConfig) -> int:
    store = PolicyStore()
    obj = BpfObject()
    obj.open()
    reused = obj.reuse_pinned_maps()
    if reused:
        _log(f"reusing pinned maps: {', '.join(reused)}")
    obj.load()
    report = obj.attach_all(pin=True)
    if not report.enforcing_capable:
        _log(f"DEGRADED: {report.summary()}; refusing to claim enforcement")
    else:
        _log(report.summary())
    maps = obj.maps()
    state = "auditing"
    lifecycle = Lifecycle(obj.policy_maps())
    rec = lifecycle.reconcile()  # after a crash mid-apply: exactly old or new, recorded
    if rec.status != "clean":
        _log(f"reconciled pinned state: {rec.status}, effective {rec.effective} "
             f"(generation {rec.generation}) {rec.detail}")
    if cfg.policy:
        try:
            data = Path(cfg.policy).read_bytes()
            res = lifecycle.apply(data, cfg.policy, mode_override=cfg.mode)
        except OSError as exc:
            _log(f"policy not applied: {cfg.policy}: {exc.strerror}")
            obj.close()
            return 2
        except AegisError as exc:
            _log(f"policy not applied: {exc}")
            obj.close()
            return 2
        _log(
            f"applied policy {res.policy.name} v{res.policy.version} as generation "
            f"{res.generation} in {res.mode} mode ({len(res.policy.rules)} rules, "
            f"{len(res.policy.scopes) or 'host-wide'} scopes, "
            f"signed by {res.signer or 'nobody: unsigned, audit only'})"
        )
        state = "enforcing" if res.mode == "enforce" and report.enforcing_capable else "auditing"
    else:
        from aegis_stream import slots

        active = slots.read_state(obj.policy_maps()).active
        if active.valid and active.mode == abi.Mode.ENFORCE:
            state = "enforcing"
    if not report.enforcing_capable:
        state = "degraded"
    write_status(cfg.status_file, report, state, {"reused_maps": reused})
    _log(f"state: {state}")

    def on_state(ev: StateEvent) -> None:
        write_status(cfg.status_file, report, ev.state,
                     {"reused_maps": reused, "reasons": ev.reasons, "generation": ev.generation})

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
    sinks: list[Sink] = [open_sink(cfg.events, max_bytes=cfg.events_max_bytes, backups=cfg.events_backups)]
    pipeline = Pipeline(rings, Normaliser(store), sinks, view, config=cfg.pipeline_config(),
                        on_state=on_state)
    try:
        await serve_pipeline(pipeline, metrics_addr=cfg.metrics_addr, exit_after=cfg.exit_after)
    finally:
        with trio.CancelScope(shield=True):
            for s in sinks:
                await s.aclose()
        # the summary reads ring positions: take it before the rings are unmapped
        summary = _summary(pipeline)
        for r in rings.values():
            r.close()
        obj.close(keep_pins=True)
        _log(f"stopped; {summary}; pinned links keep enforcing")
    return 0


def ncpus() -> int:
    return libbpf.num_possible_cpus()
