"""Reason codes: the stable, enumerated set of *why* aegis is not in its healthy state.

Every weaker state the agent can be in has a code here, and nowhere else
(docs/DEGRADED_MODE.md has one row per code; ``tests/unit/test_degraded_mode.py`` fails when a
code is undocumented or no test triggers it).  A code never changes meaning and is never
removed; new codes are added at the end of :class:`~aegis_stream.agent.health.ReasonCode`
and of the table :data:`CODES` is read from (``aegis_stream/defaults/reason_codes.toml``).

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
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import msgspec

from aegis_stream.agent.health import Reason, ReasonCode, ReasonKind, Severity, State

TABLE = "reason_codes.toml"  # package data under aegis_stream/defaults/


class CodeInfo(msgspec.Struct, frozen=True, kw_only=True, rename={"state": "implies"}):
    """One row of the reason-code table."""

    code: ReasonCode
    kind: ReasonKind
    state: Severity  # the state it implies ("unchanged" for refusals)
    pattern: str  # regex of the texts of this code: reads records written without codes
    summary: str


class _Table(msgspec.Struct, frozen=True):
    code: list[CodeInfo]


def _load_table() -> tuple[CodeInfo, ...]:
    """The table is data (one row per code, with prose), checked here against the enum."""
    raw = resources.files("aegis_stream").joinpath("defaults", TABLE).read_bytes()
    rows = tuple(msgspec.toml.decode(raw, type=_Table).code)
    if tuple(r.code for r in rows) != tuple(ReasonCode):
        raise ImportError(f"{TABLE}: rows do not match aegis_stream.agent.health.ReasonCode")
    return rows


CODES: tuple[CodeInfo, ...] = _load_table()
BY_CODE: dict[str, CodeInfo] = {c.code: c for c in CODES}  # keyed by member (== its string)
REASON_CODES: tuple[ReasonCode, ...] = tuple(c.code for c in CODES)
STATE_CODES: tuple[ReasonCode, ...] = tuple(c.code for c in CODES if c.kind is ReasonKind.STATE)
STATES: tuple[State, ...] = tuple(State)
UNKNOWN = "unknown"  # a text no pattern recognises (never produced by aegis itself)

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


BREAK_GLASS_NAME = "break-glass.json"  # policy/lifecycle.py writes it, --clear removes it


def break_glass_marker(root: Path) -> dict | None:
    """The break-glass marker in the state directory ``root``: its document, a stand-in for
    an unreadable one (a marker that exists is break-glass whatever its bytes), or None."""
    unreadable = {"reason": "(unreadable break-glass marker)"}
    try:
        with open(root / BREAK_GLASS_NAME, "rb") as fh:
            data = fh.read(1 << 16)  # a few hundred bytes when the lifecycle wrote it
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None  # none, or a state dir this user may not read (0700): nothing to judge
    except OSError:
        return unreadable
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return unreadable
    return doc if isinstance(doc, dict) else unreadable


def break_glass_reason(doc: dict) -> Reason:
    """The ``break_glass`` reason for a marker document (:func:`break_glass_marker`)."""
    since = doc.get("since")
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) \
        if isinstance(since, int | float) else "?"
    what = ("no policy active, nothing is decided" if doc.get("method") == "deactivate"
            else "every slot in audit, nothing is denied")
    return Reason(ReasonCode.BREAK_GLASS,
                  f"break-glass in effect since {when} ({doc.get('reason', '')}): {what}; "
                  "`aegis break-glass --clear` and apply to enforce again")
