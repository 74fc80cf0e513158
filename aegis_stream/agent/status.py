"""``aegis status [--json]``: is aegis protecting this host right now, and if not, why.

Two sources, the kernel first:

* the **kernel** (pins under ``$AEGIS_PIN_ROOT``, default /sys/fs/bpf/aegis): which hook
  links are pinned (a pinned link keeps deciding with or without an agent), the active
  generation and mode from the config map (:func:`aegis_stream.slots.read_state`), the
  per-hook counters (:mod:`aegis_stream.counters`);
* the **agent** (the status file it writes, default ``$AEGIS_STATE_DIR/status.json``):
  its pid (checked against /proc, start time included, so a reused pid is not taken for
  the agent), its own published state, reasons and reason codes, and why its last start
  was refused.

When the agent is gone its file is history: the state is judged from the kernel alone
("agent not running; pinned programs still enforcing generation N").

Exit codes (docs/DEGRADED_MODE.md; Nagios-style): 0 enforcing or auditing, 1 degraded,
2 blind or nothing loaded, 3 unknown (the pinned state cannot be read, e.g. not root).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream.agent import reasons
from aegis_stream.kernel import abi
from aegis_stream.pipeline.schema import StatusAgent, StatusHook, StatusKernel, StatusReport

EXIT_BY_STATE = {"enforcing": 0, "auditing": 0, "degraded": 1, "blind": 2}
EXIT_UNKNOWN = 3
STALE_S = 30.0  # the agent refreshes its file every 5 s; older than this = unresponsive
_SEVERITY = {"enforcing": 0, "auditing": 0, "degraded": 1, "blind": 2}
HOOK_OF_PROGRAM = {prog: abi.HOOK_NAMES[h] for h, prog in abi.HOOK_PROGRAMS.items()}


@dataclass
class KernelFacts:
    loaded: bool
    pin_root: str
    links: dict[str, bool] = field(default_factory=dict)  # program -> pinned
    generation: int = 0
    mode: str = "none"
    active_slot: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str = ""


@dataclass
class AgentFacts:
    path: str
    doc: dict[str, Any] | None  # the status file, None when there is none
    alive: bool  # the pid in it is a live process with the same start time
    age_s: float | None  # monotonic seconds since it was written


def facts_from_maps(pin_root: str, links: Mapping[str, bool], policy_maps: Any,
                    maps: Mapping[str, Any] | None, ncpu: int | None = None) -> KernelFacts:
    """Kernel facts from map handles: the real pinned maps or the fake kernel's."""
    from aegis_stream.kernel import slots
    from aegis_stream.kernel.counters import read_hook_counters

    st = slots.read_state(policy_maps)
    active = st.active
    mode = "none"
    if active.valid:
        mode = "enforce" if active.mode == abi.Mode.ENFORCE else "audit"
    counters: dict[str, dict[str, int]] = {}
    if maps is not None:
        try:
            counters = read_hook_counters(maps, ncpu)
        except Exception:  # counters are informative; the state does not depend on them
            counters = {}
    return KernelFacts(True, pin_root, dict(links), active.generation if active.valid else 0,
                       mode, st.active_slot, counters)


def read_kernel(root: str | None = None) -> KernelFacts:
    """The pinned state; ``loaded=False`` when nothing is pinned.  Raises AegisError when
    pins exist but cannot be opened (permissions)."""
    from aegis_stream.kernel import libbpf
    from aegis_stream.kernel.loader import REQUIRED_PROGRAMS, open_pinned, pin_root

    root = root or pin_root()
    if not os.path.isdir(f"{root}/maps") and not os.path.isdir(f"{root}/links"):
        return KernelFacts(False, root, {p: False for p in REQUIRED_PROGRAMS})
    pinned = open_pinned(root)
    try:
        links: dict[str, bool] = {}
        for prog in REQUIRED_PROGRAMS:
            path = f"{root}/links/{prog}"
            ok = os.path.exists(path)
            if ok:  # the pin is a live BPF link object, not a stray file
                try:
                    os.close(libbpf.obj_get(path))
                except Exception:
                    ok = False
            links[prog] = ok
        return facts_from_maps(root, links, pinned.policy_maps(), pinned.maps)
    finally:
        pinned.close()


def _start_time(pid: int) -> int:
    from aegis_stream.agent.run import proc_start_time

    return proc_start_time(pid)


def pid_alive(pid: int, start_time: int = 0) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if start_time:
        return _start_time(pid) == start_time
    return True


def read_agent(path: str | None = None, *, now_monotonic: float | None = None) -> AgentFacts:
    from aegis_stream.agent.run import default_status_path

    p = Path(path) if path else default_status_path()
    try:
        doc = msgspec.json.decode(p.read_bytes())
        if not isinstance(doc, dict):
            doc = None
    except (OSError, msgspec.DecodeError):
        doc = None
    if doc is None:
        return AgentFacts(str(p), None, False, None)
    alive = bool(doc.get("running", True)) and pid_alive(int(doc.get("pid", 0) or 0),
                                                          int(doc.get("start_time", 0) or 0))
    age = None
    if "monotonic" in doc:
        now = time.monotonic() if now_monotonic is None else now_monotonic
        age = max(0.0, now - float(doc["monotonic"]))
    return AgentFacts(str(p), doc, alive, age)


def _worst(*states: str) -> str:
    return max(states, key=lambda s: _SEVERITY[s])


def _doing(k: KernelFacts) -> str:
    if not any(k.links.values()):
        return "none"
    return {"enforce": "enforcing", "audit": "auditing"}.get(k.mode, "none")


def judge(kernel: KernelFacts, agent: AgentFacts, *, stale_s: float = STALE_S) -> StatusReport:
    """The status from the facts (pure: the unit tests feed it fake kernels and files)."""
    doc = agent.doc or {}
    why: list[str] = []
    state = "enforcing"
    expected = list(abi.HOOK_PROGRAMS.values())
    pinned = [p for p in expected if kernel.links.get(p)]
    doing = _doing(kernel) if kernel.loaded else "none"
    if not kernel.loaded:
        state = "blind"
        why.append(reasons.text("not_loaded", f": no aegis programs pinned under {kernel.pin_root}"))
    else:
        if not pinned:
            state = "blind"
            why.append(f"no hooks attached (0/{len(expected)})")
        elif len(pinned) < len(expected):
            state = "degraded"
            missing = ", ".join(HOOK_OF_PROGRAM[p] for p in expected if p not in pinned)
            why.append(f"hooks {len(pinned)}/{len(expected)} attached (missing {missing})")
        if kernel.mode == "none":
            state = _worst(state, "degraded")
            why.append("no valid policy generation active (every hook allows)")
        if state == "enforcing" and kernel.mode == "audit":
            state = "auditing"
    if agent.alive:
        own = str(doc.get("state") or "")
        if own in _SEVERITY:
            if _SEVERITY[own] > _SEVERITY[state]:
                state = own
            elif _SEVERITY[own] == _SEVERITY[state] == 0 and kernel.loaded:
                state = "auditing" if kernel.mode == "audit" else "enforcing"
        for r in doc.get("reasons", []) or []:
            if r not in why:
                why.append(str(r))
        if agent.age_s is not None and agent.age_s > stale_s:
            state = _worst(state, "degraded")
            why.append(reasons.text("agent_unresponsive",
                                    f": pid {doc.get('pid')} alive but its status is "
                                    f"{agent.age_s:.0f}s old (> {stale_s:.0f}s)"))
    elif kernel.loaded:
        state = _worst(state, "degraded")
        if doing in ("enforcing", "auditing"):
            tail = f"; pinned programs still {doing} generation {kernel.generation}"
        elif pinned:
            tail = "; pinned programs attached but no policy active (every hook allows)"
        else:
            tail = "; no pinned hook links (nothing decides)"
        why.insert(0, reasons.text("agent_not_running", tail))
    last_error = str(doc.get("last_error", "")) if not agent.alive else ""
    if last_error and not kernel.loaded:
        why.append(f"last start refused: {last_error}")
    codes = [c for c in reasons.codes_of(why) if c != reasons.UNKNOWN]
    if last_error and doc.get("last_error_code"):
        code = str(doc["last_error_code"])
        if code not in codes:
            codes.append(code)
    summary = why[0] if why else (
        f"{state}: generation {kernel.generation}, {len(pinned)}/{len(expected)} hooks attached")
    if last_error and kernel.loaded and not agent.alive:
        summary += f" (last start refused: {last_error})"
    agent_hooks = doc.get("hooks", {}) if isinstance(doc.get("hooks"), dict) else {}
    hooks = []
    for prog in expected:
        hook = HOOK_OF_PROGRAM[prog]
        ah = agent_hooks.get(hook, {}) if isinstance(agent_hooks.get(hook), dict) else {}
        hooks.append(StatusHook(hook=hook, program=prog, pinned=bool(kernel.links.get(prog)),
                                agent_phase=str(ah.get("phase", "")), error=str(ah.get("error", ""))))
    return StatusReport(
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        host=socket.gethostname(),
        state=state,  # type: ignore[arg-type]
        summary=summary,
        reasons=why,
        reason_codes=codes,
        exit_code=EXIT_BY_STATE[state],
        agent=StatusAgent(
            running=agent.alive, pid=int(doc.get("pid", 0) or 0),
            state=str(doc.get("state", "") or ""),
            reasons=[str(r) for r in doc.get("reasons", []) or []],
            reason_codes=[str(c) for c in doc.get("reason_codes", []) or []],
            status_file=agent.path, age_s=agent.age_s, last_error=last_error,
            last_error_code=str(doc.get("last_error_code", "")) if last_error else "",
        ),
        kernel=StatusKernel(
            loaded=kernel.loaded, pin_root=kernel.pin_root,
            enforcement=doing,  # type: ignore[arg-type]
            generation=kernel.generation, mode=kernel.mode, active_slot=kernel.active_slot,
            counters=kernel.counters, error=kernel.error,
        ),
        hooks=hooks,
    )


def render(r: StatusReport) -> str:
    lines = [f"state: {r.state}  ({r.summary})"]
    a = r.agent
    if a.running:
        age = f", status {a.age_s:.0f}s old" if a.age_s is not None else ""
        lines.append(f"agent: running, pid {a.pid}{age} ({a.status_file})")
    else:
        lines.append("agent: not running" + (f" (last start refused: {a.last_error})"
                                             if a.last_error else ""))
    k = r.kernel
    if k.loaded:
        lines.append(f"kernel: {k.enforcement}, generation {k.generation}, mode {k.mode}, "
                     f"slot {k.active_slot} (pins under {k.pin_root})")
    else:
        lines.append(f"kernel: nothing loaded (no pins under {k.pin_root})")
    for h in r.hooks:
        extra = f" [agent: {h.agent_phase}{' ' + h.error if h.error else ''}]" if h.agent_phase else ""
        lines.append(f"  hook {h.hook}: {'attached (pinned)' if h.pinned else 'NOT attached'}{extra}")
    for hook, c in k.counters.items():
        lines.append(f"  counters {hook}: denied={c.get('denied', 0)} audited={c.get('audited', 0)} "
                     f"ringbuf_fail={c.get('ringbuf_fail', 0)} no_policy={c.get('no_policy', 0)}")
    for why in r.reasons:
        code = reasons.code_of(why)
        lines.append(f"  reason [{code}]: {why}")
    return "\n".join(lines)


def collect(pin_root: str | None = None, status_file: str | None = None) -> StatusReport:
    """Read the kernel and the status file and judge.  Unreadable pins -> state blind with
    ``kernel.error`` set and exit code 3 (unknown)."""
    from aegis_stream.errors import AegisError
    from aegis_stream.kernel.loader import pin_root as default_root

    agent = read_agent(status_file)
    try:
        kernel = read_kernel(pin_root)
    except (AegisError, OSError) as exc:
        kernel = KernelFacts(True, pin_root or default_root(), error=str(exc))
        r = judge(KernelFacts(False, kernel.pin_root), agent)
        return msgspec.structs.replace(
            r, state="blind", exit_code=EXIT_UNKNOWN,
            summary=f"cannot read the pinned state: {exc}",
            kernel=msgspec.structs.replace(r.kernel, error=str(exc)))
    return judge(kernel, agent)
