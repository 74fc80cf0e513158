"""Versioned, normalised event schemas (msgspec Structs; JSON Schema in schemas/).

Every record the agent writes carries its schema name and version in the ``schema``
field (the msgspec tag): ``aegis.decision.v1``, ``aegis.state.v1``,
``aegis.explanation.v1``, ``aegis.slo.v1``, ``aegis.storm.v1``.  :data:`Event` is the tagged union; decode
any line of the event log with :data:`event_decoder`.

Evolution rules (msgspec's, enforced by :func:`compat_problems` against the checked-in
files in schemas/, see tests/unit/test_schema_compat.py): new fields go last and have
defaults; a field is never removed, renamed or retyped; anything else is a new version
(``.v2``) of the schema.

``python -m aegis_stream.pipeline.schema generate`` rewrites schemas/ from these Structs;
``python -m aegis_stream.pipeline.schema check`` fails when the files are stale or a change is
incompatible.  docs/EVENTS.md describes every field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

import msgspec

from aegis_stream.agent.health import Enforcement, State

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

__all__ = ["State"]  # re-exported: the state enum of these documents (aegis_stream.agent.health)


class Workload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the task's cgroup path shows about its workload (aegis_stream/pipeline/enrich.py); a field
    the path does not show is left out."""

    systemd_unit: str = ""  # the deepest .service/.scope unit: "nginx.service", "session-3.scope"
    container_id: str = ""  # 64 hex digits
    container_runtime: str = ""  # containerd | cri-o | docker | podman ("" when the path does not say)
    pod_uid: str = ""  # Kubernetes pod UID, with dashes
    pod_qos: str = ""  # guaranteed | burstable | besteffort


class DecisionEvent(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.decision.v1", tag_field="schema"):
    """One kernel decision (deny or audit), enriched for humans and consumers."""

    event_id: str  # "<boot_id8>-<ktime_ns>-<tid>": unique per host boot
    time: str  # RFC 3339 wall-clock time of the decision
    ktime_ns: int
    host: str
    hook: str  # file_open | bprm_check_security | mmap_file | file_mprotect
    action: str  # open | exec
    decision: str  # deny | audit
    mode: str  # enforce | audit (of the deciding generation)
    rule_id: str  # the policy's rule id ("" when the generation record is missing)
    rule_index: int
    generation: int
    policy_name: str
    policy_version: int
    policy_digest: str
    rule_source: str  # the path (or inode literal) the rule was compiled from
    dev: str  # "MAJOR:MINOR" of the superblock (kernel s_dev)
    ino: int
    cgroup_id: int
    cgroup_path: str
    scope_cgroup_id: int  # 0 = host-wide scope
    scope_cgroup_path: str
    pid: int  # process id (tgid)
    tid: int
    uid: int
    gid: int
    comm: str
    exe: str = ""  # best effort: empty when the process was gone
    enrichment_missing: list[str] = msgspec.field(default_factory=list)
    abi_version: int = 1
    slot: int = 0
    cmdline: list[str] = msgspec.field(default_factory=list)  # best effort, like exe
    policy_signer: str = ""  # key id that signed the generation ("" = unsigned)
    policy_source: str = ""  # the file the generation was applied from (provenance log)
    workload: Workload | None = None  # from cgroup_path; None when the path shows no workload
    # the deciding rule was inherited in the kernel: the file was renamed over the rule's
    # path, and the rule passed to it (bpf/continuity.bpf.h; docs/POLICY_SEMANTICS.md)
    inherited: bool = False


class StormEvent(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.storm.v1", tag_field="schema"):
    """A deny storm's summary (bpf/storm.bpf.h, docs/OPERATIONS.md "Deny storms"): how many decisions
    of one key -- (generation, rule, hook, cgroup, process, deny|audit) -- the kernel counted without
    sending an event each, since the key's previous summary.  The key's first decision, and the first
    after each window, are ``aegis.decision.v1`` events; decision events + ``suppressed`` of every
    summary = the kernel's decisions."""

    # "<boot_id8>-storm-<generation>-<rule_index>-<hook>-<cgroup_id>-<pid>-<decision>-<first
    # ktime>-<suppressed_total>": a summary repeated after an agent crash has the same id
    event_id: str
    time: str  # RFC 3339: when the agent read the count
    host: str
    hook: str
    decision: str  # deny | audit
    rule_id: str  # the policy's rule id ("" when the generation record is missing)
    rule_index: int
    generation: int
    policy_name: str
    policy_digest: str
    rule_source: str
    cgroup_id: int
    cgroup_path: str
    pid: int  # process id (tgid)
    suppressed: int  # decisions folded into this summary
    suppressed_total: int  # of this key since first_time (this summary included)
    first_time: str  # RFC 3339 of the key's first decision (an event)
    window_start: str  # RFC 3339 of the current window's first decision (an event)
    window_s: float  # the aggregation window in force
    exe: str = ""  # best effort: empty when the process was gone
    workload: Workload | None = None  # from cgroup_path


class StateEvent(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.state.v1", tag_field="schema"):
    """The agent's protection state changed (pipelines.degraded)."""

    event_id: str
    time: str
    host: str
    state: State
    previous: str  # the state before ("" for the first)
    reasons: list[str]  # why the state is not the healthy one, human readable
    hooks_attached: list[str]
    hooks_expected: list[str]
    mode: str  # enforce | audit | none (no valid generation)
    generation: int
    ring_fill: dict[str, float]  # by ring class: producer-consumer / size
    consumer_lag_bytes: dict[str, int]
    drop_ratio: dict[str, float]  # by class, short SLO window
    # the stable codes of ``reasons`` (aegis_stream.reasons, docs/DEGRADED_MODE.md); filled
    # from the reason texts when a writer (or an older record) leaves it empty
    reason_codes: list[str] = msgspec.field(default_factory=list)
    # a periodic record (``state_heartbeat_s``) with the state unchanged: it tells a fleet
    # consumer the host is alive and carries the drop-rate SLO's input
    heartbeat: bool = False
    # per class since the agent started: decisions the kernel made (its counters) and
    # those lost at any stage (kernel ring + userspace), the fleet SLO's cumulative input
    emitted_total: dict[str, int] = msgspec.field(default_factory=dict)
    dropped_total: dict[str, int] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reasons and not self.reason_codes:
            from aegis_stream.agent.reasons import codes_of

            msgspec.structs.force_setattr(self, "reason_codes", codes_of(self.reasons))


class SloEvent(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.slo.v1", tag_field="schema"):
    """A drop-rate SLO burn-rate alert started or stopped firing (pipelines.slo)."""

    event_id: str
    time: str
    host: str
    event_class: str  # deny | audit
    alert: str  # the alert rule's name (e.g. "page")
    status: Literal["firing", "resolved"]
    objective: float  # allowed drop ratio (0.001 = 0.1%)
    long_window_s: float
    short_window_s: float
    burn_threshold: float
    burn_long: float  # drop ratio / objective over the long window
    burn_short: float
    emitted_long: int
    dropped_long: int


class ExplainedRule(msgspec.Struct, frozen=True, kw_only=True):
    """The rule that decided: its policy id, the kernel's index, the source it was compiled from and the
    inode the kernel matched."""
    id: str
    index: int  # the kernel's rule_id
    source: str  # the path (or inode literal) the rule was compiled from
    inode: str  # MAJOR:MINOR:INO the kernel matched
    actions: list[str]
    # how that inode holds the rule: "" the inode the path names (or the inode rule's),
    # "inherited" renamed over the rule's path (the kernel passed the rule on), "carried" an
    # earlier inode of the rule's path, kept while it exists (a restaged generation)
    via: str = ""


class ExplainedPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The policy of the decision's generation: name, version, digest and signer, and where it came from."""
    name: str
    version: int
    digest: str
    signer: str  # key id, "" = unsigned
    source: str  # the file it was applied from ("" if the provenance log does not say)
    record: str  # the generation record in the state dir


class ExplainedScope(msgspec.Struct, frozen=True, kw_only=True):
    """Why the task was in scope: host-wide, its own cgroup or an ancestor selected by the policy."""
    match: Literal["host", "self", "ancestor", "unknown"]
    cgroup_id: int  # the selected cgroup that matched (0 = host-wide)
    path: str  # its path now
    configured: str  # as written in the policy ("" for host-wide)


class ExplainedTask(msgspec.Struct, frozen=True, kw_only=True):
    """The task that was decided on, as the event recorded it (ids, comm, exe, cgroup)."""
    pid: int
    tid: int
    uid: int
    gid: int
    comm: str
    exe: str
    cgroup_id: int
    cgroup_path: str
    workload: Workload | None = None  # the decision event's (systemd unit, container, pod)


class ExplanationEvent(
    msgspec.Struct, frozen=True, kw_only=True, tag="aegis.explanation.v1", tag_field="schema"
):
    """Why one decision was made, from the exact generation record it names."""

    event_id: str  # the explained decision's event_id
    time: str
    host: str
    decision: str
    outcome: str  # "EPERM" (enforce) or "allowed (audit)"
    hook: str
    action: str
    mode: str
    generation: int
    slot: int
    rule: ExplainedRule
    policy: ExplainedPolicy
    scope: ExplainedScope
    task: ExplainedTask
    decision_path: list[str]
    consistent: bool  # the record agrees with the event (inode, action, scope)
    inconsistencies: list[str] = msgspec.field(default_factory=list)


class FleetRule(msgspec.Struct, frozen=True, kw_only=True):
    """One (rule, generation)'s deny and audit counts across the fleet (``FleetEvent.top_rules``)."""
    rule_id: str
    generation: int
    denies: int
    audits: int = 0


class FleetHost(msgspec.Struct, frozen=True, kw_only=True):
    """The fleet worker's view of one host: its judged state, what the agent last said, and silence."""
    host: str
    state: str  # the fleet's judgement: worst of the agent's state, the monitor, silence
    agent_state: str  # what the agent itself last published
    silent: bool  # no state record for silent_after_s
    reason_codes: list[str]


class FleetEvent(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.fleet.v1", tag_field="schema"):
    """Fleet SLO and alerts from the faust fleet worker (pipelines/fleet.py, topic
    aegis.fleet.v1): a periodic ``summary``, a ``host_state`` change of one host (silence
    included), or a fleet drop-rate SLO alert change (``slo_alert``)."""

    event_id: str  # "<worker>-<ns>-<seq>"
    time: str
    worker: str  # the worker's id (host:pid)
    kind: Literal["summary", "host_state", "slo_alert"]
    partitions: list[int]  # the decision partitions this worker's counts cover
    hosts: int  # hosts known to this worker (state partitions it owns)
    hosts_by_state: dict[str, int]
    silent_hosts: list[str]
    denies: int  # all-time, exact (idempotent per source offset)
    audits: int
    window_s: int  # tumbling window length of the per-rule counts
    window_start: str  # start of the last complete window (RFC 3339)
    window_denies: int  # denies in that window, all rules
    top_rules: list[FleetRule]  # most denied (rule, generation), all-time
    host: FleetHost | None = None  # kind host_state: the host that changed
    previous: str = ""  # kind host_state: its state before
    event_class: str = ""  # kind slo_alert: deny | audit
    alert: str = ""  # kind slo_alert: the alert rule's name
    status: str = ""  # kind slo_alert: firing | resolved
    objective: float = 0.0
    burn_long: float = 0.0  # fleet drop ratio / objective over the long window
    burn_short: float = 0.0
    emitted_long: int = 0
    dropped_long: int = 0


class StatusAgent(msgspec.Struct, frozen=True, kw_only=True):
    """What the status file says about the agent process, checked against /proc."""

    running: bool  # a live agent process owns the status file
    pid: int  # 0 = no status file
    state: str  # the agent's own last published state ("" = none)
    reasons: list[str]
    reason_codes: list[str]
    status_file: str
    age_s: float | None  # since the agent last refreshed the file (monotonic clock)
    last_error: str  # why the last start was refused ("" = it was not)
    last_error_code: str


class StatusHook(msgspec.Struct, frozen=True, kw_only=True):
    """One hook in ``aegis status``: whether the kernel runs its program (pinned link) and what the agent
    reported for it."""
    hook: str  # file_open | bprm_check_security | mmap_file | file_mprotect
    program: str
    pinned: bool  # a pinned link under <pin root>/links: the kernel runs it
    agent_phase: str  # loader phase the agent reported (attached, failed, ...; "" = unknown)
    error: str  # the agent's attach/load error for this hook


class StatusKernel(msgspec.Struct, frozen=True, kw_only=True):
    """The kernel half of ``aegis status``: what is pinned and enforced now (generation, mode, slot,
    counters), read from the pinned maps, not from the agent."""
    loaded: bool  # aegis maps pinned under pin_root
    pin_root: str
    enforcement: Enforcement  # what the kernel does now
    generation: int  # active generation (0 = none)
    mode: str  # enforce | audit | none
    active_slot: int
    counters: dict[str, dict[str, int]]  # per hook, summed over CPUs (aegis stats)
    error: str = ""  # why the pinned state could not be read


class StatusReport(msgspec.Struct, frozen=True, kw_only=True, tag="aegis.status.v1", tag_field="schema"):
    """``aegis status --json``: the protection state from the kernel and the agent."""

    time: str
    host: str
    state: State
    summary: str  # one line, e.g. "agent not running; pinned programs still enforcing generation 3"
    reasons: list[str]
    reason_codes: list[str]
    exit_code: int  # 0 enforcing/auditing, 1 degraded, 2 blind / not loaded, 3 unknown
    agent: StatusAgent
    kernel: StatusKernel
    hooks: list[StatusHook]


Event = DecisionEvent | StateEvent | ExplanationEvent | SloEvent | StormEvent
EVENT_TYPES: tuple[type[msgspec.Struct], ...] = (DecisionEvent, StateEvent, ExplanationEvent, SloEvent,
                                                 StormEvent)
event_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)  # type: ignore[arg-type]
# versioned documents that are not events (CLI output): a schema file each, not in the union
DOCUMENT_TYPES: tuple[type[msgspec.Struct], ...] = (StatusReport,)
# the fleet worker's output topic (pipelines/fleet.py): an event, but not in the agent's log
FLEET_TYPES: tuple[type[msgspec.Struct], ...] = (FleetEvent,)


def schema_name(t: type[msgspec.Struct]) -> str:
    tag = t.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


# ------------------------------------------------------------------ JSON Schema files
_enc = msgspec.json.Encoder()  # keeps field order: "new fields last" is checked on it


def _pretty(doc: Any) -> bytes:
    return msgspec.json.format(_enc.encode(doc), indent=2) + b"\n"


def _inline_enums(doc: Any, defs: dict[str, Any]) -> Any:
    """``{"$ref": <an enum definition>}`` -> its ``{"enum": [...]}``, inline (how msgspec
    writes a Literal): typing a field with a str enum does not change its schema file."""
    if isinstance(doc, dict):
        ref = doc.get("$ref", "")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = defs.get(ref.removeprefix("#/$defs/"), {})
            if "enum" in target and len(doc) == 1:
                return {"enum": list(target["enum"])}
        return {k: _inline_enums(v, defs) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_inline_enums(v, defs) for v in doc]
    return doc


def json_schema(t: Any) -> dict[str, Any]:
    doc = msgspec.json.schema(t)
    defs = doc.get("$defs", {})
    doc = _inline_enums(doc, defs)
    if "$defs" in doc:
        doc["$defs"] = {k: v for k, v in doc["$defs"].items() if "enum" not in defs.get(k, {})}
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return doc


def generated_files() -> dict[str, bytes]:
    """File name -> content for schemas/: one file per event type and the union."""
    out = {f"{schema_name(t)}.json": _pretty(json_schema(t))
           for t in EVENT_TYPES + DOCUMENT_TYPES + FLEET_TYPES}
    union = json_schema(Event)
    union["title"] = "aegis event (any schema)"
    out["aegis.event.json"] = _pretty(union)
    return out


def _strip(doc: Any) -> Any:
    """A type schema without its prose (descriptions and titles do not break readers) and
    without its default (checked on its own)."""
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in ("description", "title", "default")}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def compat_problems(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Why ``new`` cannot read what ``old``'s writers wrote (or vice versa); [] = compatible.

    Per object definition: no property removed or retyped; properties already required
    stay required and no new property is required (new fields need defaults); new
    properties come after all the old ones, in order."""
    problems: list[str] = []
    old_defs, new_defs = old.get("$defs", {}), new.get("$defs", {})
    for name, od in old_defs.items():
        nd = new_defs.get(name)
        if nd is None:
            problems.append(f"{name}: definition removed")
            continue
        op, np_ = od.get("properties", {}), nd.get("properties", {})
        for field, ftype in op.items():
            if field not in np_:
                problems.append(f"{name}.{field}: removed")
            elif _strip(np_[field]) != _strip(ftype):
                problems.append(f"{name}.{field}: type changed from {_strip(ftype)} to {_strip(np_[field])}")
            elif "default" in ftype and ftype.get("default") != np_[field].get("default"):
                problems.append(f"{name}.{field}: default changed (old records would read differently)")
        old_order = list(op)
        new_order = list(np_)
        if new_order[: len(old_order)] != old_order and all(f in np_ for f in op):
            problems.append(f"{name}: existing fields reordered or new fields not last")
        oreq, nreq = set(od.get("required", [])), set(nd.get("required", []))
        for field in sorted(oreq - nreq):
            if field in np_:
                problems.append(f"{name}.{field}: no longer required (readers rely on it)")
        for field in sorted(nreq - oreq):
            problems.append(f"{name}.{field}: new required field (new fields need a default)")
    return problems


def check(directory: Path = SCHEMA_DIR) -> list[str]:
    """Stale or incompatible files in ``directory``; [] = up to date."""
    problems: list[str] = []
    for name, content in generated_files().items():
        path = directory / name
        if not path.exists():
            problems.append(f"{path}: missing (run: python -m aegis_stream.pipeline.schema generate)")
            continue
        on_disk = path.read_bytes()
        if on_disk != content:
            old = msgspec.json.decode(on_disk)
            for p in compat_problems(old, msgspec.json.decode(content)):
                problems.append(f"{name}: incompatible: {p}")
            problems.append(f"{path}: stale (run: python -m aegis_stream.pipeline.schema generate)")
    return problems


def generate(directory: Path = SCHEMA_DIR, *, force: bool = False) -> list[str]:
    """Write schemas/; refuses an incompatible change unless ``force``.  Returns the
    names written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in generated_files().items():
        path = directory / name
        if path.exists():
            if path.read_bytes() == content:
                continue
            bad = compat_problems(msgspec.json.decode(path.read_bytes()), msgspec.json.decode(content))
            if bad and not force:
                raise SystemExit(
                    f"{name}: incompatible schema change (make a .v2 schema instead):\n  "
                    + "\n  ".join(bad)
                )
        path.write_bytes(content)
        written.append(name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aegis_stream.pipeline.schema",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write schemas/*.json from the Structs")
    g.add_argument("--dir", type=Path, default=SCHEMA_DIR)
    g.add_argument("--force", action="store_true", help="write even an incompatible change")
    c = sub.add_parser("check", help="fail when schemas/ is stale or a change is incompatible")
    c.add_argument("--dir", type=Path, default=SCHEMA_DIR)
    args = p.parse_args(argv)
    if args.cmd == "generate":
        written = generate(args.dir, force=args.force)
        print(f"wrote {len(written)} schema file(s) to {args.dir}: {', '.join(written) or 'none changed'}")
        return 0
    problems = check(args.dir)
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
