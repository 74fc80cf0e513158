"""The policy document (TOML, ``apiVersion = "aegis/v1"``) as frozen msgspec Structs.

Unknown keys are refused, not ignored: a typo in a security policy must never
silently weaken it.  Decoding errors are turned into one-line PolicyErrors that
name the file and the field.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from aegis_stream.errors import PolicyError

API_VERSION = "aegis/v1"

#: versions are 1 .. 2**53 - 1: every JSON reader (a float64 in JavaScript, jq, ...) holds
#: them exactly, they fit the signature's u64, and no one counts past them
#: (docs/POLICY_LIFECYCLE.md "Versions").  Checked at decode, so at sign and apply too.
MAX_VERSION = 2**53 - 1

RuleId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
Action = Literal["open", "exec"]
ModeName = Literal["audit", "enforce"]


class Scope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A cgroup v2 directory; the scope covers it and all its descendants."""

    cgroup: str


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One file rule: exactly one of ``path`` (absolute, resolved to its inode at apply) or ``inode``
    (``MAJOR:MINOR:INO``), and the actions it denies or audits."""
    id: RuleId
    path: str | None = None
    inode: str | None = None  # "MAJOR:MINOR:INO", kernel device numbers as major:minor
    actions: list[Action] = msgspec.field(default_factory=lambda: ["open", "exec"])
    description: str = ""


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``aegis/v1`` policy document as written.  Unknown keys are refused (a typo must not weaken
    it); :func:`validate` adds the cross-field rules (unique rule ids, one target per rule, absolute
    paths).  ``mode`` defaults to audit so enforcing is always explicit; an empty ``scope`` is host-wide.
    Its digest (:func:`policy_digest`) is what signatures and anti-rollback bind to."""
    api_version: Literal["aegis/v1"] = msgspec.field(name="apiVersion")
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9\-.]{0,62}$")]
    version: Annotated[int, msgspec.Meta(ge=1, le=MAX_VERSION)]
    rules: list[Rule]
    mode: ModeName = "audit"  # audit-first: enforcing is always an explicit choice
    scope: list[Scope] = msgspec.field(default_factory=list)
    description: str = ""


_json_encoder = msgspec.json.Encoder(order="sorted")


def canonical_bytes(policy: Policy) -> bytes:
    """Deterministic encoding: sorted keys, no whitespace, defaults included."""
    return _json_encoder.encode(policy)


def policy_digest(policy: Policy) -> str:
    return "sha256:" + hashlib.sha256(canonical_bytes(policy)).hexdigest()


_LOC = re.compile(r" - at `\$(.*)`$")


def _one_line(source: str, exc: Exception) -> PolicyError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = _LOC.search(msg)
    if m:
        field = m.group(1).lstrip(".") or "(document)"
        msg = f"{field}: {msg[: m.start()]}"
    return PolicyError(f"{source}: {msg}")


def validate(policy: Policy, source: str = "policy") -> Policy:
    seen: set[str] = set()
    if not policy.rules:
        raise PolicyError(f"{source}: rules: a policy needs at least one rule")
    for i, rule in enumerate(policy.rules):
        where = f"{source}: rules[{i}] ({rule.id})"
        if rule.id in seen:
            raise PolicyError(f"{where}: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        if (rule.path is None) == (rule.inode is None):
            raise PolicyError(f"{where}: give exactly one of 'path' or 'inode'")
        if rule.path is not None and not rule.path.startswith("/"):
            raise PolicyError(f"{where}: path {rule.path!r} must be absolute")
        if not rule.actions:
            raise PolicyError(f"{where}: actions must name at least one of open, exec")
        if len(set(rule.actions)) != len(rule.actions):
            raise PolicyError(f"{where}: actions repeat an entry")
    cgroups: set[str] = set()
    for i, sc in enumerate(policy.scope):
        if not sc.cgroup.startswith("/"):
            raise PolicyError(f"{source}: scope[{i}].cgroup {sc.cgroup!r} must be absolute")
        if sc.cgroup in cgroups:
            raise PolicyError(f"{source}: scope[{i}].cgroup {sc.cgroup!r} is listed twice")
        cgroups.add(sc.cgroup)
    return policy


def loads(data: bytes | str, source: str = "policy") -> Policy:
    try:
        policy = msgspec.toml.decode(data, type=Policy)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _one_line(source, exc) from None
    return validate(policy, source)


def load(path: str | Path) -> Policy:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read policy: {exc.strerror}") from None
    return loads(data, str(p))
