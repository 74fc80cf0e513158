"""The vocabulary of protection health: states, severities, reason codes, as enums.

Each name is spelled here once.  The enums are :class:`enum.StrEnum`, so msgspec encodes them as
the plain strings the documents have always carried (``"enforcing"``, ``"hooks_missing"``)
and a consumer reading JSON sees no difference; Python code compares members, not text.

* :class:`State`: the protection state of ``aegis.state.v1``, ``aegis status`` and the
  ``aegis_state{state}`` metric, worst last, with its :attr:`State.severity` and the
  Nagios-style :attr:`State.exit_code` of ``aegis status``.
* :class:`Severity`: the state a reason code implies (``unchanged`` for refusals).
* :class:`ReasonKind`: who judges a code (the monitor, ``aegis status``, a refusal).
* :class:`ReasonCode`: every reason code (docs/DEGRADED_MODE.md); the table of what each
  means is :data:`aegis_stream.agent.reasons.CODES`.
* :class:`Reason`: a code with its human text, as the judges produce them: nothing parses
  a text back into a code (only records written before codes existed are read that way,
  :func:`aegis_stream.agent.reasons.codes_of`).

Modes (``enforce`` / ``audit``) are the kernel's: :class:`aegis_stream.kernel.abi.Mode`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import msgspec

from aegis_stream.kernel import abi


class State(enum.StrEnum):
    """The protection state, best first."""

    ENFORCING = "enforcing"
    AUDITING = "auditing"
    DEGRADED = "degraded"
    BLIND = "blind"

    @property
    def severity(self) -> int:
        """0 healthy (enforcing or auditing), 1 degraded, 2 blind."""
        return _SEVERITY[self]

    @property
    def exit_code(self) -> int:
        """``aegis status`` exit code: 0 healthy, 1 degraded, 2 blind."""
        return _SEVERITY[self]

    @classmethod
    def healthy(cls, mode: str | int) -> State:
        """The healthy state of a mode: ``enforcing`` for enforce, else ``auditing``."""
        if isinstance(mode, int):
            return cls.ENFORCING if mode == abi.Mode.ENFORCE else cls.AUDITING
        return cls.ENFORCING if mode == abi.Mode.ENFORCE.label else cls.AUDITING

    @classmethod
    def worst(cls, *states: State) -> State:
        return max(states, key=lambda s: _SEVERITY[s])


_SEVERITY = {State.ENFORCING: 0, State.AUDITING: 0, State.DEGRADED: 1, State.BLIND: 2}


class Enforcement(enum.StrEnum):
    """What the kernel does now (``aegis status``): a healthy state, or nothing."""

    ENFORCING = State.ENFORCING.value
    AUDITING = State.AUDITING.value
    NONE = "none"  # no pinned hook link, or no valid generation


class Severity(enum.StrEnum):
    """The state a reason code implies."""

    DEGRADED = "degraded"
    BLIND = "blind"
    UNCHANGED = "unchanged"  # a refusal: nothing changed, the state stays what it was


class ReasonKind(enum.StrEnum):
    """Who judges a code (docs/DEGRADED_MODE.md)."""

    STATE = "state"  # the degraded monitor, on every tick of a running agent
    STATUS = "status"  # ``aegis status``, when no agent reports for itself
    REFUSAL = "refusal"  # an operation was refused and nothing changed


class ReasonCode(enum.StrEnum):
    """Every reason code.  A code never changes meaning and is never removed; new codes
    are added at the end (and a row in :data:`aegis_stream.agent.reasons.CODES`)."""

    HOOKS_NONE = "hooks_none"
    HOOKS_MISSING = "hooks_missing"
    DENY_EVENTS_LOST = "deny_events_lost"
    CONSUMER_STALLED = "consumer_stalled"
    NO_POLICY = "no_policy"
    RING_HIGH = "ring_high"
    CONSUMER_LAG = "consumer_lag"
    AUDIT_DROPS = "audit_drops"
    SINK_FAILING = "sink_failing"
    DENIES_SPOOLED = "denies_spooled"
    RECONCILE_INCONSISTENT = "reconcile_inconsistent"
    NOT_LOADED = "not_loaded"
    AGENT_NOT_RUNNING = "agent_not_running"
    AGENT_UNRESPONSIVE = "agent_unresponsive"
    POLICY_UNREADABLE = "policy_unreadable"
    POLICY_REJECTED = "policy_rejected"
    POLICY_EXPIRED = "policy_expired"
    RULE_MAP_FULL = "rule_map_full"
    METRICS_UNAVAILABLE = "metrics_unavailable"
    LOAD_FAILED = "load_failed"
    POLICY_TAMPERED = "policy_tampered"
    BREAK_GLASS = "break_glass"
    PATH_RULE_MOVED = "path_rule_moved"
    PATH_CONTINUITY_UNAVAILABLE = "path_continuity_unavailable"


class Reason(msgspec.Struct, frozen=True):
    """One reason behind a state: its stable code and the human text."""

    code: ReasonCode
    text: str


def unique_codes(reasons: Iterable[Reason]) -> list[ReasonCode]:
    """The codes of ``reasons``, in order, each once."""
    out: list[ReasonCode] = []
    for r in reasons:
        if r.code not in out:
            out.append(r.code)
    return out


#: the attach-state names of programs that are not decision hooks (abi.AUX_PROGRAMS): their
#: absence is judged by :func:`continuity_reason`, never counted as a missing hook
AUX_HOOKS = frozenset(abi.AUX_PROGRAMS.values())


def hooks_reason(expected: Sequence[str], attached: Iterable[str]) -> Reason | None:
    """The "hooks N/M attached" reason (the monitor, ``aegis status`` and the agent's
    start all say it the same way); ``None`` when every expected hook is attached."""
    expected = [h for h in expected if h not in AUX_HOOKS]
    up = set(attached)
    n = sum(1 for h in expected if h in up)
    if n == 0:
        return Reason(ReasonCode.HOOKS_NONE, f"no hooks attached (0/{len(expected)})")
    if n < len(expected):
        missing = ", ".join(h for h in expected if h not in up)
        return Reason(ReasonCode.HOOKS_MISSING,
                      f"hooks {n}/{len(expected)} attached (missing {missing})")
    return None


def continuity_reason(expected: Iterable[str], attached: Iterable[str]) -> Reason | None:
    """``path_continuity_unavailable`` when the path-continuity program (lsm/inode_rename,
    bpf/continuity.bpf.h) was expected and is not attached: enforcement works, but a file
    renamed over a path rule's path is protected only once the agent restages."""
    hook = abi.AUX_PROGRAMS[abi.PROGRAM_CONTINUITY]
    if hook in set(expected) and hook not in set(attached):
        return Reason(ReasonCode.PATH_CONTINUITY_UNAVAILABLE,
                      f"path continuity unavailable: {hook} not attached (a file renamed over a "
                      "path rule's path is protected only once the agent restages)")
    return None
