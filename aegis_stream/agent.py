"""The trio agent: load + attach + apply, then drain both rings into the sinks.

Task tree (one nursery owns everything; cancellation is explicit)::

    run_agent
    ├── ring_reader(deny ring)   -> bounded channel (denies: block, never shed)
    ├── ring_reader(audit ring)  -> bounded channel (audit: shed when full, counted)
    └── sink_writer              <- both channels, normalise + write

On exit the links stay pinned: enforcement continues without the agent (documented
in docs/REFERENCE_ENFORCEMENT_SLICE.md).  ``aegis unload`` removes them.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from aegis_stream import abi, libbpf
from aegis_stream.errors import AegisError
from aegis_stream.events import decode_raw
from aegis_stream.lifecycle import Lifecycle
from aegis_stream.loader import AttachReport, BpfObject
from aegis_stream.normalise import Normaliser
from aegis_stream.ringbuf import RingBuffer
from aegis_stream.sinks import JsonLinesSink, Sink
from aegis_stream.store import PolicyStore, atomic_write

POLL_INTERVAL_S = 0.2


@dataclass
class AgentCounters:
    delivered: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})
    shed: dict[str, int] = field(default_factory=lambda: {"deny": 0, "audit": 0})
    decode_errors: int = 0


@dataclass
class AgentConfig:
    policy: str | None = None
    events: str = "-"
    metrics_addr: str | None = None
    mode: str | None = None  # override the policy's mode
    status_file: str | None = None
    exit_after: float | None = None  # for demos and tests: stop after N seconds


def _log(msg: str) -> None:
    print(f"aegis: {msg}", file=sys.stderr, flush=True)


async def ring_reader(
    ring: RingBuffer, send: trio.MemorySendChannel[bytes], klass: str, counters: AgentCounters
) -> None:
    async with send:
        while True:
            batch = ring.drain()
            if not batch:
                with trio.move_on_after(POLL_INTERVAL_S):
                    await trio.lowlevel.wait_readable(ring.fd)
                continue
            for rec in batch:
                if klass == "deny":
                    await send.send(rec)  # backpressure: denies are never shed
                else:
                    try:
                        send.send_nowait(rec)
                    except trio.WouldBlock:
                        counters.shed[klass] += 1
            await trio.sleep(0)


async def sink_writer(
    recv: trio.MemoryReceiveChannel[bytes],
    klass: str,
    norm: Normaliser,
    sinks: list[Sink],
    counters: AgentCounters,
) -> None:
    async with recv:
        async for rec in recv:
            batch: list[msgspec.Struct] = []
            for data in [rec, *_drain_nowait(recv)]:
                try:
                    batch.append(norm.normalise(decode_raw(data)))
                except AegisError:
                    counters.decode_errors += 1
            for s in sinks:
                s.write(batch)
            counters.delivered[klass] += len(batch)


def _drain_nowait(recv: trio.MemoryReceiveChannel[bytes], limit: int = 1024) -> list[bytes]:
    out = []
    while len(out) < limit:
        try:
            out.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return out


def write_status(path: str | None, report: AttachReport, state: str, extra: dict) -> None:
    if not path:
        return
    doc = {
        "pid": os.getpid(),
        "state": state,
        "hooks": {p.hook: p.as_dict() for p in report.programs.values()},
        "time": time.time(),
        **extra,
    }
    atomic_write(Path(path), msgspec.json.encode(doc))


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

    counters = AgentCounters()
    rings = {
        "deny": RingBuffer(maps[abi.MAP_DENY_EVENTS].fd, maps[abi.MAP_DENY_EVENTS].max_entries),
        "audit": RingBuffer(maps[abi.MAP_AUDIT_EVENTS].fd, maps[abi.MAP_AUDIT_EVENTS].max_entries),
    }
    sinks: list[Sink] = [JsonLinesSink(cfg.events)]
    norm = Normaliser(store)
    try:
        async with trio.open_nursery() as nursery:
            for klass, ring in rings.items():
                send, recv = trio.open_memory_channel[bytes](4096 if klass == "deny" else 1024)
                nursery.start_soon(ring_reader, ring, send, klass, counters)
                nursery.start_soon(sink_writer, recv, klass, norm, sinks, counters)

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if cfg.exit_after is not None:
                await trio.sleep(cfg.exit_after)
                # let readers catch up with what the kernel already produced
                for ring in rings.values():
                    while ring.available_bytes():
                        await trio.sleep(0.05)
                await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
    finally:
        for s in sinks:
            s.close()
        for r in rings.values():
            r.close()
        obj.close(keep_pins=True)
        _log(
            f"stopped; delivered deny={counters.delivered['deny']} audit={counters.delivered['audit']}"
            f" shed audit={counters.shed['audit']} decode_errors={counters.decode_errors};"
            " pinned links keep enforcing"
        )
    return 0


def ncpus() -> int:
    return libbpf.num_possible_cpus()
