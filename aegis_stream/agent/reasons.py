"""Reason codes: the stable, enumerated set of *why* aegis is not in its healthy state.

Every weaker state the agent can be in has a code here, and nowhere else
(docs/DEGRADED_MODE.md has one row per code; ``tests/test_degraded_mode.py`` fails when a
code is undocumented or no test triggers it).  A code never changes meaning and is never
removed; new codes are added at the end of :data:`CODES`.

Three kinds:

``state``
    Judged by the degraded monitor (pipelines/degraded.py) on every tick of a running
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

The human-readable reason texts stay free-form and stable for humans; each code's
``pattern`` recognises its texts, so a plain list of reason strings (an old
``aegis.state.v1`` record, a restored monitor snapshot) still maps to codes.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["state", "status", "refusal"]
Severity = Literal["degraded", "blind", "unchanged"]


@dataclass(frozen=True)
class ReasonCode:
    code: str
    kind: Kind
    state: Severity  # the state it implies ("unchanged" for refusals)
    pattern: str  # regex matching the reason texts of this code (re.match)
    summary: str


CODES: tuple[ReasonCode, ...] = (
    # --------------------------------------------------------- state (the monitor)
    ReasonCode("hooks_none", "state", "blind", r"no hooks attached \(0/\d+\)",
               "no expected LSM hook is attached: every file open/exec is allowed unseen"),
    ReasonCode("hooks_missing", "state", "degraded", r"hooks \d+/\d+ attached \(missing ",
               "some expected hooks are not attached: those hooks allow everything"),
    ReasonCode("deny_events_lost", "state", "blind", r"\d+ deny events lost",
               "deny events lost (deny ring full or a userspace loss): the denies were still "
               "enforced, the agent cannot account for them"),
    ReasonCode("consumer_stalled", "state", "blind", r"\w+ ring consumer stalled",
               "a ring consumer made no progress for stall_s while records wait"),
    ReasonCode("no_policy", "state", "degraded", r"no valid policy generation active",
               "no valid generation in the kernel: every hook allows (fail-open)"),
    ReasonCode("ring_high", "state", "degraded", r"\w+ ring \d+% full",
               "a ring is at or above fill_high (80%): events will be lost soon"),
    ReasonCode("consumer_lag", "state", "degraded", r"\w+ consumer \d+ bytes behind",
               "consumer lag at or above lag_high_bytes"),
    ReasonCode("audit_drops", "state", "degraded", r"audit drop ratio ",
               "audit events dropped above audit_drop_max (1%) over the short window"),
    ReasonCode("sink_failing", "state", "degraded", r"sink failing: ",
               "an event sink (the event log) fails writes, e.g. disk full"),
    ReasonCode("denies_spooled", "state", "degraded", r"\d+ denies waiting in the disk spool",
               "deny events wait in the on-disk spool to be written"),
    ReasonCode("reconcile_inconsistent", "state", "degraded", r"reconcile: ",
               "startup reconciliation found the kernel running neither the old nor the new "
               "generation of an interrupted apply"),
    # --------------------------------------------------------- status (aegis status)
    ReasonCode("not_loaded", "status", "blind", r"nothing loaded",
               "no aegis programs are pinned: nothing is enforced"),
    ReasonCode("agent_not_running", "status", "degraded", r"agent not running",
               "the agent is gone; the pinned links keep deciding but nobody drains the "
               "rings or reports"),
    ReasonCode("agent_unresponsive", "status", "degraded", r"agent unresponsive",
               "the agent process is alive but has not refreshed the status file"),
    # --------------------------------------------------------- refusals (nothing changed)
    ReasonCode("policy_unreadable", "refusal", "unchanged", r"policy unreadable: ",
               "the policy file cannot be read"),
    ReasonCode("policy_rejected", "refusal", "unchanged", r"policy rejected: ",
               "the policy does not parse, verify or compile, or anti-rollback refuses it"),
    ReasonCode("policy_expired", "refusal", "unchanged", r"policy expired: ",
               "the policy's signature is expired (or issued in the future) by the wall clock"),
    ReasonCode("rule_map_full", "refusal", "unchanged", r"rule map full: ",
               "the kernel rule map has no room for the new generation (E2BIG)"),
    ReasonCode("metrics_unavailable", "refusal", "unchanged", r"metrics unavailable: ",
               "--metrics-addr cannot be bound (port taken, bad address)"),
    ReasonCode("load_failed", "refusal", "unchanged", r"load failed: ",
               "the BPF object cannot be opened or loaded at all"),
)

BY_CODE: dict[str, ReasonCode] = {c.code: c for c in CODES}
REASON_CODES: tuple[str, ...] = tuple(c.code for c in CODES)
STATE_CODES: tuple[str, ...] = tuple(c.code for c in CODES if c.kind == "state")
STATES: tuple[str, ...] = ("enforcing", "auditing", "degraded", "blind")
UNKNOWN = "unknown"  # a text no pattern recognises (never produced by aegis itself)

_PATTERNS = [(c.code, re.compile(c.pattern)) for c in CODES]


def code_of(text: str) -> str:
    """The code of one reason text (``unknown`` when no pattern matches)."""
    for code, pat in _PATTERNS:
        if pat.match(text):
            return code
    return UNKNOWN


def codes_of(reasons: Iterable[str]) -> list[str]:
    """Codes of reason texts, in order, each once."""
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


def refusal_code(exc: BaseException) -> str:
    """The refusal code for an error raised while reading or applying a policy."""
    from aegis_stream.errors import KernelError, SignatureError

    if isinstance(exc, OSError):
        return "policy_unreadable"
    msg = str(exc)
    if isinstance(exc, KernelError) and (exc.errno in (errno.E2BIG, errno.ENOSPC)
                                         or "E2BIG" in msg or "ENOSPC" in msg):
        return "rule_map_full"  # (slots.stage re-raises without the errno; its text keeps it)
    if isinstance(exc, SignatureError) and (" expired at " in msg or "issued in the future" in msg):
        return "policy_expired"
    return "policy_rejected"
