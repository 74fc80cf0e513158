"""The `aegis` command line.  Every error is one line on stderr and a non-zero exit.

:func:`main` is the top-level guard: the command line is screened before it is parsed
(inputs.check_argv: NUL bytes, text that is not UTF-8, over-long arguments), usage errors are
one line (not argparse's usage block), numbers must be finite and not negative, and whatever a
command raises ends as one line: an AegisError as its own message, anything else as an
internal error with a bug-report hint (``AEGIS_DEBUG=1`` re-raises it for the traceback).
Never a Python traceback for any input.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, NoReturn

import msgspec

from aegis_stream import __version__, textsafe
from aegis_stream.errors import AegisError, StateError
from aegis_stream.kernel import abi

# argparse exits 2 on a usage error; 70 is sysexits' EX_SOFTWARE (a bug in aegis), 130 SIGINT
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 0, 1, 2, 70, 130
BUG_HINT = ("this is a bug in aegis: please report it with the command line "
            "(AEGIS_DEBUG=1 prints the traceback)")


def _fail(msg: str, code: int = EXIT_ERROR) -> int:
    print(f"aegis: error: {textsafe.escape(msg)}", file=sys.stderr)  # names paths, ids
    return code


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error reported in one line (the usage block is what ``--help``
    is for); subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        print(f"aegis: error: {textsafe.escape(message)} (see: {textsafe.escape(self.prog)} "
              "--help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def check_numbers(args: argparse.Namespace) -> str | None:
    """Why a parsed number is refused: NaN and infinity pass ``float()`` (``--canary-seconds
    inf`` would wait forever), and no count, time or rate of aegis is negative."""
    for name, v in sorted(vars(args).items()):
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            return f"{flag}: {v} is not a finite number"
        if v < 0:
            return f"{flag}: {v} is negative"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    import trio

    from aegis_stream.agent import config as agent_file
    from aegis_stream.agent import logjson
    from aegis_stream.agent.run import run_agent

    if args.log_format:  # before the file is read: its refusal is in the asked format too
        logjson.install(args.log_format)
    # the config file, then every flag given over it (flags default to None: "not given")
    try:
        doc = agent_file.merge(
            agent_file.load(args.config if args.config is not None else agent_file.default_path()),
            {"policy": args.policy, "mode": args.mode, "metrics_addr": args.metrics_addr,
             "status_file": args.status_file, "state_dir": args.state_dir, "pin_root": args.pin_root,
             "log_format": args.log_format, "events.path": args.events,
             "storm_window_s": args.storm_window,
             "metrics_deprecated_names": False if args.no_deprecated_metrics else None,
             "fleet.kafka": args.kafka, "fleet.host_key": args.kafka_host_key})
    except agent_file.ConfigError as exc:
        return _fail(str(exc), 2)
    logjson.install(doc.log_format)
    agent_file.apply_environment(doc)
    kafka = None
    if doc.fleet.kafka is not None:  # refused here, before anything is loaded: a bad address, missing topics
        from aegis_stream.fleet.sink import KafkaSinkError, preflight

        try:
            kafka = preflight(doc.fleet.kafka, doc.fleet.host_key)
        except KafkaSinkError as exc:
            return _fail(str(exc), 2)
    return trio.run(run_agent, agent_file.agent_config(doc, kafka=kafka, exit_after=args.exit_after))


def cmd_policy_show(args: argparse.Namespace) -> int:
    from aegis_stream.kernel import slots
    from aegis_stream.kernel.loader import open_pinned
    from aegis_stream.policy.store import PolicyStore

    pinned = open_pinned()
    try:
        st = slots.read_state(pinned.policy_maps())
    finally:
        pinned.close()
    active = st.active
    doc: dict[str, object] = {
        "active_slot": st.active_slot,
        "generation": active.generation,
        "valid": active.valid,
        "mode": abi.Mode(active.mode).label,
        "rules_in_kernel": active.rule_count,
        "scopes_in_kernel": active.scope_count,
        "hooks_pinned": pinned.links,
    }
    if active.valid:
        from aegis_stream.policy.provenance import checked_store

        rec = checked_store(PolicyStore()).load(active.generation)  # refuses an edited record
        doc["policy"] = msgspec.to_builtins(rec.policy)
    if args.json:
        print(msgspec.json.encode(doc).decode())
        return EXIT_OK
    if not active.valid:
        print("no policy active (every hook allows)")
        return EXIT_OK
    pol = doc["policy"]
    assert isinstance(pol, dict)
    echo = textsafe.echo  # rule ids, paths and cgroups may hold newlines and escapes
    echo(f"policy {pol['name']} v{pol['version']} generation {active.generation} "
          f"mode {doc['mode']} digest {pol['digest']}")
    for r in pol["rules"]:
        from aegis_stream.kernel.devnum import split_kernel_dev
        from aegis_stream.policy.compiler import actions_names

        ma, mi = split_kernel_dev(r["dev"])
        echo(f"  rule {r['id']}: {r['source']} -> {ma}:{mi}:{r['ino']} "
              f"[{','.join(actions_names(r['actions']))}]")
    for s in pol["scopes"] or [{"cgroup": "(host-wide)", "cgroup_id": 0}]:
        echo(f"  scope {s['cgroup']} (cgroup id {s['cgroup_id']})")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from aegis_stream.agent.doctor import render, run_doctor

    report = run_doctor()
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(render(report))
    return report.exit_code


def cmd_stats(args: argparse.Namespace) -> int:
    from aegis_stream.kernel.counters import read_counters
    from aegis_stream.kernel.loader import open_pinned

    pinned = open_pinned()
    try:
        doc = read_counters(pinned.maps)
    finally:
        pinned.close()
    if args.json:
        print(msgspec.json.encode(doc).decode())
    else:
        echo = textsafe.echo
        for hook, ctrs in doc["hooks"].items():
            echo(f"{hook}: " + " ".join(f"{k}={v}" for k, v in ctrs.items()))
        for r in doc["rules"]:
            echo(f"rule gen={r['generation']} id={r['rule_id']} hook={r['hook']} "
                  f"denied={r['denied']} audited={r['audited']}")
        # per-rule rows of retired generations are folded into one total per hook
        for hook, tot in doc.get("retired", {}).items():
            if any(tot.values()):
                echo(f"retired generations {hook}: "
                      + " ".join(f"{k}={v}" for k, v in tot.items()))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from aegis_stream.agent.status import collect_coded, render

    report, codes = collect_coded(args.pin_root, args.status_file)
    if args.json:
        print(msgspec.json.encode(report).decode())
    else:
        print(render(report, codes))
    return report.exit_code


def cmd_unload(args: argparse.Namespace) -> int:
    from aegis_stream.kernel.loader import pin_root, remove_pins
    from aegis_stream.policy.provenance import ProvenanceLog

    removed = remove_pins()
    print(f"removed {len(removed)} pins; enforcement stops when no agent holds the programs")
    if removed:  # a state change like any other: recorded (after it, like break-glass)
        try:
            ProvenanceLog().append("unload", pin_root=pin_root(), pins_removed=len(removed))
        except StateError as exc:
            raise StateError(f"the pins were removed, but the unload is not recorded: {exc}") from None
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from aegis_stream.cli.demo import run_demo

    return run_demo(args.kernel, fleet=not args.no_fleet)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="aegis", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"aegis {__version__}")
    sub: Any = p.add_subparsers(dest="command", required=True)  # add_*_commands take the base type

    r = sub.add_parser("run", help="foreground agent: load, attach, apply, stream events",
                       description="Settings come from the config file (--config, default "
                                   "$AEGIS_CONFIG or /etc/aegis/aegis.toml when present); a flag "
                                   "overrides its key.  docs/OPERATIONS.md lists the keys.")
    r.add_argument("--config", metavar="FILE",
                   help="agent config TOML (default /etc/aegis/aegis.toml when it exists)")
    r.add_argument("--policy", help="policy TOML to apply at start")
    r.add_argument("--events", help="JSON lines output file ('-' = stdout, the default)")
    r.add_argument("--metrics-addr", help="HOST:PORT for Prometheus metrics")
    r.add_argument("--no-deprecated-metrics", action="store_true",
                   help="do not export deprecated metric names next to their replacements "
                        "(a scrape that passes promtool check metrics; docs/METRICS.md)")
    r.add_argument("--mode", choices=["audit", "enforce"], help="override the policy's mode")
    r.add_argument("--status-file",
                   help="write the agent's state (JSON) here (default $AEGIS_STATE_DIR/status.json)")
    r.add_argument("--exit-after", type=float, help=argparse.SUPPRESS)
    r.add_argument("--kafka", metavar="BOOTSTRAP",
                   help="also send events to Kafka at HOST:PORT[,HOST:PORT...] (docs/FLEET.md)")
    r.add_argument("--kafka-host-key", metavar="NAME",
                   help="record key of this host's events (default: the host name)")
    r.add_argument("--state-dir", help="state directory (default $AEGIS_STATE_DIR or /var/lib/aegis)")
    r.add_argument("--pin-root", help="bpffs pin root (default $AEGIS_PIN_ROOT or /sys/fs/bpf/aegis)")
    r.add_argument("--log-format", choices=["text", "json"],
                   help="the agent's own log on stderr: text lines (default) or JSON lines")
    r.add_argument("--storm-window", type=float, metavar="SECONDS",
                   help="deny-storm window: repeats of one (rule, hook, cgroup, process) decision "
                        "within it are counted and summarised, not one event each (default 10; "
                        "0 = off; docs/OPERATIONS.md)")
    r.set_defaults(func=cmd_run)

    pol = sub.add_parser("policy", help="policy lifecycle").add_subparsers(
        dest="policy_command", required=True
    )
    pa = pol.add_parser("apply", help="apply a policy to the loaded agent (pinned state)")
    pa.add_argument("file")
    pa.add_argument("--mode", choices=["audit", "enforce"])
    from aegis_stream.cli.policy import (
        add_policy_apply_arguments,
        add_policy_lifecycle_commands,
    )
    from aegis_stream.cli.policy import cmd_policy_apply as lifecycle_apply

    add_policy_apply_arguments(pa)  # --dry-run, --events, --canary-seconds, --max-deny-rate
    pa.set_defaults(func=lifecycle_apply)
    ps = pol.add_parser("show", help="the policy the kernel enforces now")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_policy_show)
    add_policy_lifecycle_commands(pol, sub)  # sign, verify, lint, log, rollback, keys, break-glass

    d = sub.add_parser("doctor", help="can this host enforce? (proves it with a real deny)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    st = sub.add_parser("stats", help="live counters from the pinned maps")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_stats)

    sts = sub.add_parser(
        "status", help="protection state now: kernel pins, active generation, agent, reasons",
        description="Exit codes: 0 enforcing/auditing, 1 degraded, 2 blind or nothing loaded, "
                    "3 unknown (pinned state unreadable).  docs/DEGRADED_MODE.md")
    sts.add_argument("--json", action="store_true", help="aegis.status.v1 JSON (schemas/)")
    sts.add_argument("--status-file", help="the agent's status file (default $AEGIS_STATE_DIR/status.json)")
    sts.add_argument("--pin-root", help="pin root (default $AEGIS_PIN_ROOT or /sys/fs/bpf/aegis)")
    sts.set_defaults(func=cmd_status)

    from aegis_stream.agent.explain import add_pipeline_commands

    add_pipeline_commands(sub)  # aegis explain EVENT [--events LOG] [--json]

    from aegis_stream.cli.fleet import add_fleet_commands

    add_fleet_commands(sub)  # aegis fleet broker|worker|ship, aegis tail

    u = sub.add_parser("unload", help="remove pinned programs and maps")
    u.set_defaults(func=cmd_unload)

    dm = sub.add_parser("demo", help="boot a lab kernel and show audit, enforce and a deny")
    dm.add_argument("--kernel", default="6.1")
    dm.add_argument("--no-fleet", action="store_true",
                    help="skip the fleet half (local Kafka broker, fleet worker, ship, tail)")
    dm.set_defaults(func=cmd_demo)

    from aegis_stream.lab import add_lab_subparsers

    lab = sub.add_parser("lab", help="real Debian kernels under QEMU")
    add_lab_subparsers(lab.add_subparsers(dest="lab_command", required=True))
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``aegis`` entry point: the top-level guard (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    why = _screen(argv)
    if why is not None:
        return _fail(why, EXIT_USAGE)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        why = check_numbers(args)
        if why is not None:
            return _fail(why, EXIT_USAGE)
        return int(args.func(args))
    except AegisError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("aegis: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`aegis policy log | head`): stop quietly, and keep Python's
        # exit-time flush of stdout from reporting the same broken pipe
        _silence_stdout()
        os._exit(0)
    except SystemExit:
        raise  # argparse's own exits (--help, --version, a usage error) and sys.exit
    except BaseException as exc:
        if os.environ.get("AEGIS_DEBUG") == "1":
            raise
        return _fail(_unexpected(exc), EXIT_BUG)


def _screen(argv: list[str]) -> str | None:
    from aegis_stream.inputs import check_argv

    return check_argv(argv)


def _unexpected(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return f"out of memory ({BUG_HINT}: an input limit should have refused this first)"
    if isinstance(exc, RecursionError):
        return f"input nested too deeply ({BUG_HINT}: an input limit should have refused it)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror} ({type(exc).__name__}; {BUG_HINT})"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error: {type(exc).__name__}{': ' + text if text else ''} ({BUG_HINT})"


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
