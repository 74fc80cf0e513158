"""``aegis fleet ...`` and ``aegis tail``: the Kafka side of Aegis (docs/FLEET.md)."""

from __future__ import annotations

import argparse


def add_fleet_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``aegis fleet`` (broker, worker, ship) and ``aegis tail``."""
    fleet = sub.add_parser("fleet", help="fleet streaming over Kafka (docs/FLEET.md)")
    fleet.add_subparsers(dest="fleet_command", required=True)
