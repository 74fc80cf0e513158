"""Reason codes: the stable, enumerated set of *why* aegis is not in its healthy state.

Every weaker state the agent can be in has a code here, and nowhere else
(docs/DEGRADED_MODE.md has one row per code; ``tests/test_degraded_mode.py`` fails when a
code is undocumented or no test triggers it).  A code never changes meaning and is never
removed; new codes are added at the end of :data:`CODES`.

Three kinds:

``state``
    Judged by the degraded monitor (aegis_stream/processors/degraded.py) on every tick of a running
    agent; the code names the worst ``state`` it implies.  Exposed in the
    ``aegis.state.v1`` event (``reason_codes``), as the ``aegis_state_reason{reason}``
    metric, in the status file and in ``aegis status``.
``status``
    Judged by ``aegis status`` from the kernel (pins) and the status file when no agent
    reports for itself (agent dead, hung, nothing loaded).
``refusal``
    An operation was refused and nothing changed: the agent does not start (exit 2,
    recorded in the status file as ``last_error``), or ``aegis policy apply`` fails
    (exit 1, a ``refused`` provenance record).  The state stays what it was.

The codes are :class:`aegis_stream.agent.health.ReasonCode`; every judge emits a
:class:`~aegis_stream.agent.health.Reason` (code + text), so no text is parsed back.
The human-readable texts stay free-form and stable for humans; each code's ``pattern``
still recognises its texts, so a plain list of reason strings written before codes
existed (an old ``aegis.state.v1`` record) maps to codes (:func:`codes_of`).
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass

from aegis_stream.agent.health import (
    Enforcement,
    Reason,
    ReasonCode,
    ReasonKind,
    Severity,
    State,
    hooks_reason,
    unique_codes,
)

__all__ = ["BY_CODE", "CODES", "REASON_CODES", "STATES", "STATE_CODES", "UNKNOWN", "CodeInfo",
           "Enforcement", "Reason", "ReasonCode", "ReasonKind", "Severity", "State", "code_of",
           "codes_of", "hooks_reason", "reason", "refusal_code", "text", "unique_codes"]


@dataclass(frozen=True)
class CodeInfo:
    """One row of the reason-code table."""

    code: ReasonCode
    kind: ReasonKind
    state: Severity  # the state it implies ("unchanged" for refusals)
    pattern: str  # regex of the texts of this code: reads records written without codes
    summary: str


CODES: tuple[CodeInfo, ...] = (
    # --------------------------------------------------------- state (the monitor)
    CodeInfo(ReasonCode.HOOKS_NONE, ReasonKind.STATE, Severity.BLIND,
             r"no hooks attached \(0/\d+\)",
             "no expected LSM hook is attached: every file open/exec is allowed unseen"),
    CodeInfo(ReasonCode.HOOKS_MISSING, ReasonKind.STATE, Severity.DEGRADED,
             r"hooks \d+/\d+ attached \(missing ",
             "some expected hooks are not attached: those hooks allow everything"),
    CodeInfo(ReasonCode.DENY_EVENTS_LOST, ReasonKind.STATE, Severity.BLIND,
             r"\d+ deny events lost",
             "deny events lost (deny ring full or a userspace loss): the denies were still "
             "enforced, the agent cannot account for them"),
    CodeInfo(ReasonCode.CONSUMER_STALLED, ReasonKind.STATE, Severity.BLIND,
             r"\w+ ring consumer stalled",
             "a ring consumer made no progress for stall_s while records wait"),
    CodeInfo(ReasonCode.NO_POLICY, ReasonKind.STATE, Severity.DEGRADED,
             r"no valid policy generation active",
             "no valid generation in the kernel: every hook allows (fail-open)"),
    CodeInfo(ReasonCode.RING_HIGH, ReasonKind.STATE, Severity.DEGRADED,
             r"\w+ ring \d+% full",
             "a ring is at or above fill_high (80%): events will be lost soon"),
    CodeInfo(ReasonCode.CONSUMER_LAG, ReasonKind.STATE, Severity.DEGRADED,
             r"\w+ consumer \d+ bytes behind",
             "consumer lag at or above lag_high_bytes"),
    CodeInfo(ReasonCode.AUDIT_DROPS, ReasonKind.STATE, Severity.DEGRADED,
             r"audit drop ratio ",
             "audit events dropped above audit_drop_max (1%) over the short window"),
    CodeInfo(ReasonCode.SINK_FAILING, ReasonKind.STATE, Severity.DEGRADED,
             r"sink failing: ",
             "an event sink (the event log) fails writes, e.g. disk full"),
    CodeInfo(ReasonCode.DENIES_SPOOLED, ReasonKind.STATE, Severity.DEGRADED,
             r"\d+ denies waiting in the disk spool",
             "deny events wait in the on-disk spool to be written"),
    CodeInfo(ReasonCode.RECONCILE_INCONSISTENT, ReasonKind.STATE, Severity.DEGRADED,
             r"reconcile: ",
             "startup reconciliation found the kernel running neither the old nor the new "
             "generation of an interrupted apply"),
    # --------------------------------------------------------- status (aegis status)
    CodeInfo(ReasonCode.NOT_LOADED, ReasonKind.STATUS, Severity.BLIND,
             r"nothing loaded",
             "no aegis programs are pinned: nothing is enforced"),
    CodeInfo(ReasonCode.AGENT_NOT_RUNNING, ReasonKind.STATUS, Severity.DEGRADED,
             r"agent not running",
             "the agent is gone; the pinned links keep deciding but nobody drains the "
             "rings or reports"),
    CodeInfo(ReasonCode.AGENT_UNRESPONSIVE, ReasonKind.STATUS, Severity.DEGRADED,
             r"agent unresponsive",
             "the agent process is alive but has not refreshed the status file"),
    # --------------------------------------------------------- refusals (nothing changed)
    CodeInfo(ReasonCode.POLICY_UNREADABLE, ReasonKind.REFUSAL, Severity.UNCHANGED,
             r"policy unreadable: ",
             "the policy file cannot be read"),
    CodeInfo(ReasonCode.POLICY_REJECTED, ReasonKind.REFUSAL, Severity.UNCHANGED,
             r"policy rejected: ",
             "the policy does not parse, verify or compile, or anti-rollback refuses it"),
    CodeInfo(ReasonCode.POLICY_EXPIRED, ReasonKind.REFUSAL, Severity.UNCHANGED,
             r"policy expired: ",
             "the policy's signature is expired (or issued in the future) by the wall clock"),
    CodeInfo(ReasonCode.RULE_MAP_FULL, ReasonKind.REFUSAL, Severity.UNCHANGED,
             r"rule map full: ",
             "the kernel rule map has no room for the new generation (E2BIG)"),
    CodeInfo(ReasonCode.METRICS_UNAVAILABLE, ReasonKind.REFUSAL, Severity.UNCHANGED,
             r"metrics unavailable: ",
             "--metrics-addr cannot be bound (port taken, bad address)"),
    CodeInfo(ReasonCode.LOAD_FAILED, ReasonKind.REFUSAL, Severity.UNCHANGED,
             r"load failed: ",
             "the BPF object cannot be opened or loaded at all"),
)

BY_CODE: dict[str, CodeInfo] = {c.code: c for c in CODES}  # keyed by member (== its string)
REASON_CODES: tuple[ReasonCode, ...] = tuple(c.code for c in CODES)
STATE_CODES: tuple[ReasonCode, ...] = tuple(c.code for c in CODES if c.kind is ReasonKind.STATE)
STATES: tuple[State, ...] = tuple(State)
UNKNOWN = "unknown"  # a text no pattern recognises (never produced by aegis itself)
assert REASON_CODES == tuple(ReasonCode), "every ReasonCode has one row, in enum order"

_PATTERNS = [(c.code, re.compile(c.pattern)) for c in CODES]


def code_of(text: str) -> str:
    """The code of one reason text (``unknown`` when no pattern matches).

    Only for records written without codes (an ``aegis.state.v1`` record or a status file
    of an older agent): everything aegis judges now carries its :class:`Reason` code."""
    for code, pat in _PATTERNS:
        if pat.match(text):
            return code
    return UNKNOWN


def codes_of(reasons: Iterable[str]) -> list[str]:
    """Codes of reason texts (see :func:`code_of`), in order, each once."""
    out: list[str] = []
    for r in reasons:
        c = code_of(r)
        if c not in out:
            out.append(c)
    return out


def text(code: str, detail: str) -> str:
    """A reason text for a code whose pattern is a fixed prefix (``<prefix><detail>``).

    Used for the refusal and status codes: ``text("policy_unreadable", "/p: EACCES")``."""
    rc = BY_CODE[code]
    prefix = re.sub(r"\\(.)", r"\1", rc.pattern)
    return prefix + detail


def reason(code: ReasonCode, detail: str) -> Reason:
    """:func:`text` with its code: the form the judges emit."""
    return Reason(code, text(code, detail))


def refusal_code(exc: BaseException) -> ReasonCode:
    """The refusal code for an error raised while reading or applying a policy (by the
    error's type and errno, never its text)."""
    from aegis_stream.errors import KernelError, SignatureExpiredError

    if isinstance(exc, OSError):
        return ReasonCode.POLICY_UNREADABLE
    if isinstance(exc, KernelError) and exc.errno in (errno.E2BIG, errno.ENOSPC):
        return ReasonCode.RULE_MAP_FULL
    if isinstance(exc, SignatureExpiredError):
        return ReasonCode.POLICY_EXPIRED
    return ReasonCode.POLICY_REJECTED
