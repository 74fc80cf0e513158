"""The policy document (TOML, ``apiVersion = "aegis/v1"``) as frozen msgspec Structs.

Unknown keys are refused, not ignored: a typo in a security policy must never
silently weaken it.  Decoding errors are turned into one-line PolicyErrors that
name the file and the field.

Reading is bounded before any work (aegis_stream/inputs.py, docs/INPUT_LIMITS.md): a regular
file only (a FIFO or /dev/zero is refused at open, never read), at most ``policy-bytes``,
UTF-8, nesting and ``[[rules]]`` counted before the TOML parser runs, the rule and scope counts
checked before any path is resolved, and paths with a NUL byte or longer than PATH_MAX refused.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from aegis_stream import inputs
from aegis_stream.errors import PolicyError

API_VERSION = "aegis/v1"

#: versions are 1 .. 2**53 - 1: every JSON reader (a float64 in JavaScript, jq, ...) holds
#: them exactly, they fit the signature's u64, and no one counts past them
#: (docs/POLICY_LIFECYCLE.md "Versions").  Checked at decode, so at sign and apply too.
MAX_VERSION = 2**53 - 1

RuleId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
Action = Literal["open", "exec"]
ModeName = Literal["audit", "enforce"]
# what a rule's target may be when the author says so (``accept_target``); without it apply
# refuses each of these (compiler.target_problem, docs/POLICY_SEMANTICS.md)
TargetKind = Literal["directory", "pseudo-fs", "unstable-inode"]


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
    # opt-in, per rule, to a target apply refuses otherwise: a directory, a file on a pseudo
    # filesystem (procfs, sysfs, ...) or on one without stable inode numbers (9p, FUSE, NFS).
    # Left out of the canonical encoding while empty, so every digest signed before the field
    # existed still verifies.
    accept_target: list[TargetKind] = msgspec.field(default_factory=list)


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
    """Deterministic encoding: sorted keys, no whitespace, defaults included -- except a rule's
    empty ``accept_target``, a field newer than the encoding (omitting it keeps the digests of
    policies signed before it unchanged)."""
    doc = msgspec.to_builtins(policy)
    for r in doc["rules"]:
        if not r["accept_target"]:
            del r["accept_target"]
    return _json_encoder.encode(doc)


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
    _check_counts(len(policy.rules), len(policy.scope), source)
    if not policy.rules:
        raise PolicyError(f"{source}: rules: a policy needs at least one rule")
    for i, rule in enumerate(policy.rules):
        where = f"{source}: rules[{i}] ({rule.id})"
        if rule.id in seen:
            raise PolicyError(f"{where}: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        if (rule.path is None) == (rule.inode is None):
            raise PolicyError(f"{where}: give exactly one of 'path' or 'inode'")
        if rule.path is not None:
            inputs.check_path(rule.path, f"{where}: path", PolicyError)
            if not rule.path.startswith("/"):
                raise PolicyError(f"{where}: path {rule.path!r} must be absolute")
        if not rule.actions:
            raise PolicyError(f"{where}: actions must name at least one of open, exec")
        if len(set(rule.actions)) != len(rule.actions):
            raise PolicyError(f"{where}: actions repeat an entry")
        if len(set(rule.accept_target)) != len(rule.accept_target):
            raise PolicyError(f"{where}: accept_target repeats an entry")
    cgroups: set[str] = set()
    for i, sc in enumerate(policy.scope):
        inputs.check_path(sc.cgroup, f"{source}: scope[{i}].cgroup", PolicyError)
        if not sc.cgroup.startswith("/"):
            raise PolicyError(f"{source}: scope[{i}].cgroup {sc.cgroup!r} must be absolute")
        if sc.cgroup in cgroups:
            raise PolicyError(f"{source}: scope[{i}].cgroup {sc.cgroup!r} is listed twice")
        cgroups.add(sc.cgroup)
    return policy


def _check_counts(rules: int, scopes: int, source: str) -> None:
    if rules > inputs.POLICY_RULES.value:
        raise PolicyError(f"{source}: rules: {rules} rules exceed the limit "
                          f"{inputs.POLICY_RULES.name}={inputs.POLICY_RULES.value}")
    if scopes > inputs.POLICY_SCOPES.value:
        raise PolicyError(f"{source}: scope: {scopes} scopes exceed the limit "
                          f"{inputs.POLICY_SCOPES.name}={inputs.POLICY_SCOPES.value}")


_TOML_TYPES = (datetime.datetime, datetime.date, datetime.time)


def parse_toml(data: bytes | str, source: str = "policy") -> dict[str, Any]:
    """The policy's TOML as a plain document, every bound checked before the parser runs (size,
    UTF-8, nesting, table counts) and after it (nesting made by dotted keys, rule and scope
    counts).  ``lint`` reads through this too, so lint and apply refuse the same inputs."""
    text = inputs.decode_policy_text(data, source)
    inputs.check_policy_shape(text, source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # the shape check stops nesting long before; this is the backstop
        raise PolicyError(f"{source}: nesting deeper than the limit {inputs.POLICY_DEPTH.name}="
                          f"{inputs.POLICY_DEPTH.value}") from None
    if inputs.tree_depth(doc) > inputs.POLICY_DEPTH.value:
        raise PolicyError(f"{source}: nesting deeper than the limit {inputs.POLICY_DEPTH.name}="
                          f"{inputs.POLICY_DEPTH.value} (dotted keys)")
    rules, scopes = doc.get("rules"), doc.get("scope")
    _check_counts(len(rules) if isinstance(rules, list) else 0,
                  len(scopes) if isinstance(scopes, list) else 0, source)
    return doc


def loads(data: bytes | str, source: str = "policy") -> Policy:
    doc = parse_toml(data, source)
    try:
        policy = msgspec.convert(doc, Policy, builtin_types=_TOML_TYPES, str_keys=True)
    except msgspec.ValidationError as exc:
        raise _one_line(source, exc) from None
    return validate(policy, source)


def load(path: str | Path) -> Policy:
    data = inputs.read_bounded(path, inputs.POLICY_BYTES, "policy", PolicyError)
    return loads(data, str(path))
