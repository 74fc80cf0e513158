"""``aegis fleet ...`` and ``aegis tail``: the Kafka side of Aegis (docs/FLEET.md)."""

from __future__ import annotations

import argparse


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``aegis fleet`` (broker, worker, ship) and ``aegis tail``."""
    fleet = sub.add_parser("fleet", help="fleet streaming over Kafka (docs/FLEET.md)")
    fleet.add_subparsers(dest="fleet_command", required=True)

    from aegis_stream.fleet.tail import add_tail_arguments

    add_tail_arguments(sub.add_parser(
        "tail", help="follow aegis.decision.v1 on Kafka: one line per decision (or --json)",
        description="Assigns the partitions (no consumer group, no offsets committed): a tail "
                    "never takes partitions from a fleet worker.  docs/FLEET.md"))
