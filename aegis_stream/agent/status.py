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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream import inputs, textsafe
from aegis_stream.agent import reasons
from aegis_stream.agent.health import Enforcement, Reason, ReasonCode, State, continuity_reason, hooks_reason
from aegis_stream.errors import StateError
from aegis_stream.kernel import abi
from aegis_stream.pipeline.schema import StatusAgent, StatusHook, StatusKernel, StatusReport

EXIT_UNKNOWN = 3
STALE_S = 30.0  # the agent refreshes its file every 5 s; older than this = unresponsive
HOOK_OF_PROGRAM = {prog: abi.HOOK_NAMES[h] for h, prog in abi.HOOK_PROGRAMS.items()} | abi.AUX_PROGRAMS
STATUS_FILE_VERSION = 1


# ------------------------------------------------------------------ the status file
class HookPhase(msgspec.Struct, frozen=True, kw_only=True):
    """The loader's state of one hook, as the agent saw it."""

    hook: str
    phase: str  # attached | failed | ... (aegis_stream.kernel.loader.ProgramStatus)
    name: str = ""  # the BPF program
    errno: int = 0
    error: str = ""
    pinned: str = ""  # the link's pin path ("" = not pinned)


class ReconcileInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The startup reconciliation (aegis_stream.policy.lifecycle.ReconcileOutcome)."""

    status: str
    effective: str
    generation: int
    detail: str = ""


class StatusFile(msgspec.Struct, frozen=True, kw_only=True):
    """The status file the agent keeps (docs/DEGRADED_MODE.md "The status file").

    Written at start, on every state change, every 5 s and at stop; on a refused start
    with ``running: false`` and ``last_error``.  ``version`` changes only when a field
    changes meaning; new fields get defaults (a file of an older agent still reads)."""

    version: int = STATUS_FILE_VERSION
    pid: int = 0
    start_time: int = 0  # /proc/PID/stat field 22: tells a reused pid apart
    running: bool = True
    state: str = ""  # a State; "" when the agent never published one (a refused start)
    hooks: dict[str, HookPhase] = {}
    time: float = 0.0  # wall clock, for humans
    monotonic: float | None = None  # CLOCK_MONOTONIC, for staleness (immune to clock jumps)
    reasons: list[str] = []
    reason_codes: list[str] = []  # the codes of ``reasons``, each once
    reused_maps: list[str] = []
    pin_root: str = ""
    reconcile: ReconcileInfo | None = None
    generation: int = 0
    mode: str = ""
    last_error: str = ""  # why the last start was refused
    last_error_code: str = ""
    stopped_at: float | None = None
    codes_by_reason: list[str] = []  # the code of each of ``reasons``, in order

    @property
    def published(self) -> State | None:
        """The agent's own published state, None if it has none (or one unknown here)."""
        return State(self.state) if self.state in State.__members__.values() else None

    def coded_reasons(self) -> list[Reason | str]:
        """``reasons`` with their codes; a bare text where the file does not say (an
        older agent's file: its texts are read by :func:`reasons.code_of`)."""
        if len(self.codes_by_reason) == len(self.reasons):
            pairs = zip(self.codes_by_reason, self.reasons, strict=True)
        else:
            pairs = zip((reasons.code_of(t) for t in self.reasons), self.reasons, strict=True)
        return [Reason(ReasonCode(c), t) if c in _CODES else t for c, t in pairs]


_CODES = frozenset(ReasonCode.__members__.values())
status_file_decoder = msgspec.json.Decoder(StatusFile)


@dataclass
class KernelFacts:
    """What the pinned kernel state says, read without the agent: which links are pinned, the active
    slot's generation and mode, the per-hook counters.  ``loaded`` False: nothing is pinned; ``error``
    set: pins exist but could not be read.  :func:`judge` weighs it against :class:`AgentFacts`."""
    loaded: bool
    pin_root: str
    links: dict[str, bool] = field(default_factory=dict)  # program -> pinned
    generation: int = 0
    mode: str = abi.MODE_NONE  # abi.Mode label of the active generation
    active_slot: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str = ""
    #: ``policy_tampered`` findings of a one-shot integrity check (:func:`tamper_findings`),
    #: made by ``aegis status`` itself when no agent runs to make it every tick
    tamper: list[Reason] = field(default_factory=list)


@dataclass
class AgentFacts:
    """What the agent's status file says and whether its writer is still alive (same pid and start time,
    so a reused pid does not count); ``age_s`` lets :func:`judge` call a live but silent agent stale."""
    path: str
    doc: StatusFile | None  # the status file, None when there is none (or unreadable)
    alive: bool  # the pid in it is a live process with the same start time
    age_s: float | None  # monotonic seconds since it was written


def facts_from_maps(pin_root: str, links: Mapping[str, bool], policy_maps: Any,
                    maps: Mapping[str, Any] | None, ncpu: int | None = None) -> KernelFacts:
    """Kernel facts from map handles: the real pinned maps or the fake kernel's."""
    from aegis_stream.kernel import slots
    from aegis_stream.kernel.counters import read_hook_counters

    st = slots.read_state(policy_maps)
    active = st.active
    mode = abi.Mode(active.mode).label if active.valid else abi.MODE_NONE
    counters: dict[str, dict[str, int]] = {}
    if maps is not None:
        try:
            counters = read_hook_counters(maps, ncpu)
        except Exception:  # counters are informative; the state does not depend on them
            counters = {}
    return KernelFacts(True, pin_root, dict(links), active.generation if active.valid else 0,
                       mode, st.active_slot, counters)


def tamper_findings(policy_maps: Any, state_root: str | Path | None = None) -> list[Reason]:
    """One integrity check of the kernel's active policy against the signed generation record
    and the provenance log (agent/integrity.py, what a running agent does every tick): its
    ``policy_tampered`` findings.  A check the lifecycle lock defers (an apply in progress)
    finds nothing; so does one that cannot read the state directory (not the question here)."""
    from aegis_stream.agent.integrity import IntegrityChecker
    from aegis_stream.errors import AegisError

    try:
        rep = IntegrityChecker(policy_maps, state_root).check()
    except (AegisError, OSError):
        return []
    return [f for f in rep.findings if f.code is ReasonCode.POLICY_TAMPERED]


def read_kernel(root: str | None = None, *, integrity: bool = False) -> KernelFacts:
    """The pinned state; ``loaded=False`` when nothing is pinned.  Raises AegisError when
    pins exist but cannot be opened (permissions).  ``integrity``: also run the tamper check
    (:func:`tamper_findings`) on the pinned maps."""
    from aegis_stream.kernel import libbpf
    from aegis_stream.kernel.loader import ALL_PROGRAMS, open_pinned, pin_root

    root = root or pin_root()
    if not os.path.isdir(f"{root}/maps") and not os.path.isdir(f"{root}/links"):
        return KernelFacts(False, root, {p: False for p in ALL_PROGRAMS})
    pinned = open_pinned(root)
    try:
        links: dict[str, bool] = {}
        for prog in ALL_PROGRAMS:
            path = f"{root}/links/{prog}"
            ok = os.path.exists(path)
            if ok:  # the pin is a live BPF link object, not a stray file
                try:
                    os.close(libbpf.obj_get(path))
                except Exception:
                    ok = False
            links[prog] = ok
        policy_maps = pinned.policy_maps()
        facts = facts_from_maps(root, links, policy_maps, pinned.maps)
        if integrity:
            facts.tamper = tamper_findings(policy_maps)
        return facts
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
        doc: StatusFile | None = status_file_decoder.decode(
            inputs.read_bounded(p, inputs.STATUS_FILE_BYTES, "status file", StateError))
    except (StateError, msgspec.DecodeError):  # bounded: a FIFO or /dev/zero never hangs it
        # missing, unreadable, corrupt or not a status file: no agent reports (documented
        # in docs/DEGRADED_MODE.md: judged from the kernel alone)
        doc = None
    if doc is None:
        return AgentFacts(str(p), None, False, None)
    alive = doc.running and pid_alive(doc.pid, doc.start_time)
    age = None
    if doc.monotonic is not None:
        now = time.monotonic() if now_monotonic is None else now_monotonic
        age = max(0.0, now - doc.monotonic)
    return AgentFacts(str(p), doc, alive, age)


def _doing(k: KernelFacts) -> Enforcement:
    if not any(k.links.values()) or k.mode == abi.MODE_NONE:
        return Enforcement.NONE
    return Enforcement(State.healthy(k.mode).value)


def judge(kernel: KernelFacts, agent: AgentFacts, *, stale_s: float = STALE_S) -> StatusReport:
    """The status from the facts (pure: the unit tests feed it fake kernels and files)."""
    return judge_coded(kernel, agent, stale_s=stale_s)[0]


def judge_coded(kernel: KernelFacts, agent: AgentFacts, *, stale_s: float = STALE_S,
                break_glass: dict | None = None) -> tuple[StatusReport, list[str]]:
    """:func:`judge`, and the code of each of the report's ``reasons`` (for :func:`render`;
    ``unknown`` for a text of an older agent that no code recognises).  ``break_glass``: the
    state directory's marker (:func:`reasons.break_glass_marker`), judged here when no agent
    reports it (a running agent's tick check does)."""
    doc = agent.doc or StatusFile()
    why: list[Reason | str] = []
    state = State.ENFORCING
    expected = list(abi.HOOK_PROGRAMS.values())
    pinned = [p for p in expected if kernel.links.get(p)]
    doing = _doing(kernel) if kernel.loaded else Enforcement.NONE
    if not kernel.loaded:
        state = State.BLIND
        why.append(reasons.reason(ReasonCode.NOT_LOADED,
                                  f": no aegis programs pinned under {kernel.pin_root}"))
    else:
        hooks = hooks_reason([HOOK_OF_PROGRAM[p] for p in expected],
                             [HOOK_OF_PROGRAM[p] for p in pinned])
        if hooks is not None:
            state = State.BLIND if hooks.code is ReasonCode.HOOKS_NONE else State.DEGRADED
            why.append(hooks)
        # judged only where the facts know the program (pins of an agent that has it)
        aux = [p for p in abi.AUX_PROGRAMS if p in kernel.links]
        cont = continuity_reason([HOOK_OF_PROGRAM[p] for p in aux],
                                 [HOOK_OF_PROGRAM[p] for p in aux if kernel.links.get(p)])
        if cont is not None and any(kernel.links.get(p) for p in expected):
            state = State.worst(state, State.DEGRADED)
            why.append(cont)
        if kernel.mode == abi.MODE_NONE:
            state = State.worst(state, State.DEGRADED)
            why.append(Reason(ReasonCode.NO_POLICY,
                              "no valid policy generation active (every hook allows)"))
        if state is State.ENFORCING:
            state = State.healthy(kernel.mode)
    if agent.alive:
        own = doc.published
        if own is not None:
            if own.severity > state.severity:
                state = own
            elif own.severity == state.severity == 0 and kernel.loaded:
                state = State.healthy(kernel.mode)
        texts = {_text(w) for w in why}
        for r in doc.coded_reasons():
            if _text(r) not in texts:
                why.append(r)
                texts.add(_text(r))
        if agent.age_s is not None and agent.age_s > stale_s:
            state = State.worst(state, State.DEGRADED)
            why.append(reasons.reason(ReasonCode.AGENT_UNRESPONSIVE,
                                      f": pid {doc.pid} alive but its status is "
                                      f"{agent.age_s:.0f}s old (> {stale_s:.0f}s)"))
    elif kernel.loaded:
        state = State.worst(state, State.DEGRADED)
        if doing is not Enforcement.NONE:
            tail = f"; pinned programs still {doing} generation {kernel.generation}"
        elif pinned:
            tail = "; pinned programs attached but no policy active (every hook allows)"
        else:
            tail = "; no pinned hook links (nothing decides)"
        why.insert(0, reasons.reason(ReasonCode.AGENT_NOT_RUNNING, tail))
    if kernel.tamper and not agent.alive:  # a running agent reports its own tick check
        state = State.worst(state, State.DEGRADED)
        why.extend(kernel.tamper)
    if break_glass is not None and not agent.alive:
        bg = reasons.break_glass_reason(break_glass)
        state = State.worst(state, State.DEGRADED)
        why.append(bg)
    last_error = doc.last_error if not agent.alive else ""
    if last_error and not kernel.loaded:
        why.append(f"last start refused: {last_error}")  # its code: last_error_code below
    codes: list[str] = []
    for w in why:
        if isinstance(w, Reason) and w.code not in codes:
            codes.append(w.code)
    if last_error and doc.last_error_code and doc.last_error_code not in codes:
        codes.append(doc.last_error_code)
    texts_out = [_text(w) for w in why]
    summary = texts_out[0] if why else (
        f"{state}: generation {kernel.generation}, {len(pinned)}/{len(expected)} hooks attached")
    if last_error and kernel.loaded and not agent.alive:
        summary += f" (last start refused: {last_error})"
    hooks_out = []
    for prog in expected + [p for p in abi.AUX_PROGRAMS if p in kernel.links]:
        hook = HOOK_OF_PROGRAM[prog]
        ah = doc.hooks.get(hook)
        hooks_out.append(StatusHook(hook=hook, program=prog, pinned=bool(kernel.links.get(prog)),
                                    agent_phase=ah.phase if ah else "",
                                    error=ah.error if ah else ""))
    report = StatusReport(
        time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        host=socket.gethostname(),
        state=state,
        summary=summary,
        reasons=texts_out,
        reason_codes=codes,
        exit_code=state.exit_code,
        agent=StatusAgent(
            running=agent.alive, pid=doc.pid,
            state=doc.state,
            reasons=list(doc.reasons),
            reason_codes=list(doc.reason_codes),
            status_file=agent.path, age_s=agent.age_s, last_error=last_error,
            last_error_code=doc.last_error_code if last_error else "",
        ),
        kernel=StatusKernel(
            loaded=kernel.loaded, pin_root=kernel.pin_root,
            enforcement=doing,
            generation=kernel.generation, mode=kernel.mode, active_slot=kernel.active_slot,
            counters=kernel.counters, error=kernel.error,
        ),
        hooks=hooks_out,
    )
    per_reason = [w.code if isinstance(w, Reason) else reasons.UNKNOWN for w in why]
    return report, per_reason


def _text(w: Reason | str) -> str:
    return w.text if isinstance(w, Reason) else w


def render(r: StatusReport, codes: Sequence[str] | None = None) -> str:
    """The human form of a report; ``codes``: the code of each reason (from
    :func:`judge_coded`), else read from the texts (a report decoded from JSON)."""
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
                     f"ringbuf_fail={c.get('ringbuf_fail', 0)} no_policy={c.get('no_policy', 0)} "
                     f"stale={c.get('stale', 0)}")
    if codes is None or len(codes) != len(r.reasons):
        codes = [reasons.code_of(why) for why in r.reasons]
    for code, why in zip(codes, r.reasons, strict=True):
        lines.append(f"  reason [{code}]: {why}")
    return textsafe.join(lines)  # each line escaped: paths and errors are attacker-named


def collect(pin_root: str | None = None, status_file: str | None = None) -> StatusReport:
    """Read the kernel and the status file and judge.  Unreadable pins -> state blind with
    ``kernel.error`` set and exit code 3 (unknown)."""
    return collect_coded(pin_root, status_file)[0]


def collect_coded(pin_root: str | None = None,
                  status_file: str | None = None) -> tuple[StatusReport, list[str]]:
    """:func:`collect` and the code of each reason (:func:`judge_coded`)."""
    from aegis_stream.errors import AegisError
    from aegis_stream.kernel.loader import pin_root as default_root
    from aegis_stream.policy.store import state_dir

    agent = read_agent(status_file)
    marker = reasons.break_glass_marker(state_dir())
    try:  # no agent to check the maps every tick: the status command checks them once
        kernel = read_kernel(pin_root, integrity=not agent.alive)
    except (AegisError, OSError) as exc:
        kernel = KernelFacts(True, pin_root or default_root(), error=str(exc))
        r, codes = judge_coded(KernelFacts(False, kernel.pin_root), agent)
        return msgspec.structs.replace(
            r, state=State.BLIND, exit_code=EXIT_UNKNOWN,
            summary=f"cannot read the pinned state: {exc}",
            kernel=msgspec.structs.replace(r.kernel, error=str(exc))), codes
    return judge_coded(kernel, agent, break_glass=marker)
