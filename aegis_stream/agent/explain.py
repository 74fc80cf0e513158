"""``aegis explain EVENT``: why one decision was made, exactly.

The event names its generation and rule index; the generation record in the store
(``$AEGIS_STATE_DIR/generations/<N>.json``) is the compiled table the kernel held, so
the explanation is a lookup, not a re-evaluation (pipelines/explain.py).  EVENT is an
``event_id`` looked up in the JSON-lines event log (``--events``, default
``$AEGIS_EVENTS``; rotated ``.1`` .. ``.N`` files are searched too), or ``-`` for one
JSON decision record on stdin.

The lead wires it into cli.py with ``add_pipeline_commands(sub)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import msgspec

from aegis_stream import inputs, textsafe
from aegis_stream.errors import AegisError, StateError
from aegis_stream.pipeline.schema import DecisionEvent, ExplanationEvent
from aegis_stream.policy.store import PolicyStore
from aegis_stream.processors.explain import explain

_dec = msgspec.json.Decoder(DecisionEvent)


class ExplainError(AegisError):
    """``aegis explain`` cannot find or read the decision to explain (no log, no such event_id, bad stdin)."""


def log_files(path: Path, backups: int = 32) -> list[Path]:
    """The event log and its rotated backups, newest first."""
    out = [path] + [path.with_name(f"{path.name}.{i}") for i in range(1, backups + 1)]
    return [p for p in out if p.exists()]


def _lines(files: list[Path]) -> Iterator[bytes]:
    # bounded (docs/INPUT_LIMITS.md): regular files only, each up to events-log-bytes and
    # read up to its size at open; a line over event-line-bytes is skipped, never held
    for p in files:
        yield from inputs.bounded_lines(p, inputs.EVENTS_LOG_BYTES, "event log", ExplainError)


def find_event(event_id: str, log: Path) -> DecisionEvent:
    files = log_files(log)
    if not files:
        raise ExplainError(f"event log {log} does not exist")
    needle = msgspec.json.encode(event_id)
    for line in _lines(files):
        if needle not in line or b'"aegis.decision.v1"' not in line:
            continue
        try:
            ev = _dec.decode(line)
        except msgspec.DecodeError:
            continue
        if ev.event_id == event_id:
            return ev
    raise ExplainError(f"no decision {event_id} in {log} (or its rotated files)")


def read_event(stream: IO[bytes]) -> DecisionEvent:
    data = stream.read(inputs.EVENT_LINE_BYTES.value + 1)
    inputs.check_bytes(data, inputs.EVENT_LINE_BYTES, "stdin", ExplainError)
    data = data.strip()
    try:
        return _dec.decode(data)
    except msgspec.ValidationError as exc:  # quotes the bad value: escaped to one line
        raise ExplainError(f"stdin is not an aegis.decision.v1 record: {textsafe.escape(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ExplainError(f"stdin is not one JSON record: {textsafe.escape(exc)}") from None


def explain_event(event: DecisionEvent, store: PolicyStore | None = None) -> ExplanationEvent:
    # imported here: the normaliser pulls in numpy, which every other CLI command (and
    # each CLI start under the QEMU lab) would otherwise pay for
    from aegis_stream.pipeline.normalise import GenerationIndex
    from aegis_stream.policy.provenance import checked_store

    store = checked_store(store)
    try:
        data: bytes | None = (store.gen_dir / f"{event.generation}.json").read_bytes()
    except FileNotFoundError:
        data = None  # the explanation says there is no record (exit 1)
    except OSError as exc:
        raise StateError(f"generation {event.generation}: cannot read its record: {exc.strerror}") from None
    if data is not None and store.check is not None:
        store.check(event.generation, data)  # an edited record is refused, not explained
    index = GenerationIndex(store)
    return explain(event, index.get(event.generation))


def render(x: ExplanationEvent) -> str:
    lines = [
        f"{x.decision} {x.event_id} at {x.time} on {x.host}: {x.outcome}",
        f"  task     pid {x.task.pid} tid {x.task.tid} uid {x.task.uid} comm '{x.task.comm}'"
        + (f" exe {x.task.exe}" if x.task.exe else "")
        + f" in {x.task.cgroup_path or x.task.cgroup_id}",
        f"  hook     {x.hook} (action {x.action}, mode {x.mode})",
        f"  rule     {x.rule.id or '?'} (index {x.rule.index}) {x.rule.source} -> inode {x.rule.inode}"
        + (f" [{','.join(x.rule.actions)}]" if x.rule.actions else "")
        + (f" ({x.rule.via})" if x.rule.via else ""),
        f"  policy   {x.policy.name} v{x.policy.version} generation {x.generation} "
        f"digest {x.policy.digest} signed by {x.policy.signer or 'nobody (unsigned)'}",
    ]
    if x.task.workload is not None:
        from aegis_stream.pipeline.enrich import describe

        lines.insert(2, f"  workload {describe(x.task.workload)}")
    if x.policy.source or x.policy.record:
        lines.append(f"           applied from {x.policy.source or '?'}; record {x.policy.record or '?'}")
    scope = {"host": "host-wide", "self": "the task's own cgroup", "ancestor": "an ancestor cgroup",
             "unknown": "unknown"}[x.scope.match]
    lines.append(f"  scope    {x.scope.path or x.scope.configured or '-'} ({scope})")
    lines.append("  decision path:")
    lines += [f"    {i}. {step}" for i, step in enumerate(x.decision_path, 1)]
    if not x.consistent:
        lines.append("  INCONSISTENT with the generation record:")
        lines += [f"    - {p}" for p in x.inconsistencies]
    # every line escaped on its own: a newline or an escape sequence in a process name,
    # path, cgroup or rule id stays inside its line and is shown, not obeyed
    return textsafe.join(lines)


def cmd_explain(args: argparse.Namespace) -> int:
    if args.event == "-":
        event = read_event(sys.stdin.buffer)
    else:
        log = args.events or os.environ.get("AEGIS_EVENTS")
        if not log:
            raise ExplainError("which event log? give --events LOG (or set AEGIS_EVENTS)")
        event = find_event(args.event, Path(log))
    try:
        x = explain_event(event)
    except StateError as exc:
        raise ExplainError(str(exc)) from None
    if args.json:
        print(msgspec.json.encode(x).decode())
    else:
        print(render(x))
    return 0 if x.consistent else 1


def add_pipeline_commands(top_subparsers: argparse._SubParsersAction) -> None:
    """Register ``aegis explain`` (cli.py calls this)."""
    e = top_subparsers.add_parser(
        "explain", help="why a decision was made: rule, policy, scope, decision path",
        description="Explain one decision exactly, from the generation record it names.",
    )
    e.add_argument("event", metavar="EVENT",
                   help="an event_id from the event log, or - for a JSON record on stdin")
    e.add_argument("--events", metavar="LOG", help="JSON-lines event log (default $AEGIS_EVENTS)")
    e.add_argument("--json", action="store_true", help="print the aegis.explanation.v1 record")
    e.set_defaults(func=cmd_explain)
