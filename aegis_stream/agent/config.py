"""The agent's config file (``aegis run --config``, default /etc/aegis/aegis.toml).

One TOML document, decoded straight into the frozen :class:`AgentFile` Struct: an unknown
key or a value of the wrong type is a one-line refusal (:class:`ConfigError`, the key's
path in it), never a silently ignored setting.  Every key has a default, so an empty
file (or none) is the same as no flags.  Flags given on the command line override the
file key by key (:func:`merge`); docs/OPERATIONS.md lists the keys.

``state_dir`` and ``pin_root`` are process-wide (the policy store, the status file and
the loader read ``$AEGIS_STATE_DIR`` / ``$AEGIS_PIN_ROOT``), so :func:`apply_environment`
exports them before anything is loaded; the rest becomes the
:class:`~aegis_stream.agent.run.AgentConfig` the agent runs with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from aegis_stream import inputs
from aegis_stream.errors import AegisError

if TYPE_CHECKING:
    from aegis_stream.agent.run import AgentConfig

DEFAULT_CONFIG = "/etc/aegis/aegis.toml"
CONFIG_ENV = "AEGIS_CONFIG"  # another default path; empty: no config file at all

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
FileMode = Annotated[int, msgspec.Meta(ge=0, le=0o777)]
#: the deny-storm window in seconds (bpf/storm.bpf.h); 0 = off, at most an hour
StormWindow = Annotated[float, msgspec.Meta(ge=0, le=3600)]
DEFAULT_STORM_WINDOW_S = 10.0


class ConfigError(AegisError):
    """The config file is unreadable, is not TOML, or has an unknown key or a bad value."""


class EventsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[events]``: the JSON-lines events file.  ``path`` ``-`` is stdout; the file is
    rotated at ``max_bytes`` into ``path.1`` .. ``path.<backups>`` (gzip-compressed
    ``path.N.gz`` when ``compress``), created with ``file_mode`` (TOML octal: ``0o640``);
    SIGHUP reopens it (logrotate)."""

    path: str = "-"
    max_bytes: Positive = 256 << 20
    backups: NonNegative = 5
    compress: bool = False
    file_mode: FileMode = 0o640


class FleetConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``[fleet]``: the Kafka sink (docs/FLEET.md).  ``kafka`` is the bootstrap
    ``HOST:PORT[,HOST:PORT...]`` (absent: no Kafka sink, as without ``--kafka``);
    ``host_key`` the record key of this host's events (default: the host name)."""

    kafka: str | None = None
    host_key: str | None = None


class AgentFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole config document.  Top-level keys are the agent's own settings; the
    events file and the fleet sink have a table each."""

    policy: str | None = None  # policy TOML (signed or not) applied at start
    mode: Literal["audit", "enforce"] | None = None  # overrides the policy's mode
    state_dir: str | None = None  # default $AEGIS_STATE_DIR or /var/lib/aegis
    pin_root: str | None = None  # default $AEGIS_PIN_ROOT or /sys/fs/bpf/aegis
    status_file: str | None = None  # default <state_dir>/status.json
    metrics_addr: str | None = None  # HOST:PORT of the Prometheus endpoint; absent: none
    # export the deprecated metric names next to their replacements until they are removed
    # (docs/METRICS.md "Deprecated names"); false: a scrape that passes promtool's lint now
    metrics_deprecated_names: bool = True
    log_format: Literal["text", "json"] = "text"
    # repeats of one (rule, hook, cgroup, process) deny within this many seconds are counted in
    # the kernel and summarised (aegis.storm.v1) instead of one event each; 0 = off
    storm_window_s: StormWindow = DEFAULT_STORM_WINDOW_S
    events: EventsConfig = EventsConfig()
    fleet: FleetConfig = FleetConfig()


def decode(data: bytes | str, source: str = "<config>") -> AgentFile:
    """Decode one document; any problem is a one-line :class:`ConfigError`."""
    try:
        return msgspec.toml.decode(data, type=AgentFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {source}: {exc}") from None
    except msgspec.DecodeError as exc:  # not TOML at all
        raise ConfigError(f"config {source}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses per nesting level
        raise ConfigError(f"config {source}: nested too deeply to be an aegis config") from None


def default_path() -> str | None:
    """The path used without ``--config``: ``$AEGIS_CONFIG`` if set (empty: none), else
    /etc/aegis/aegis.toml when it exists."""
    env = os.environ.get(CONFIG_ENV)
    if env is not None:
        return env or None
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def load(path: str | None) -> AgentFile:
    """The document at ``path`` (None: every default).  A path given but unreadable is an
    error: an operator who names a file means it."""
    if path is None:
        return AgentFile()
    # bounded: a FIFO, /dev/zero or an over-size file is one line (docs/INPUT_LIMITS.md)
    data = inputs.read_bounded(path, inputs.CONFIG_BYTES, "config", ConfigError)
    return decode(data, path)


def merge(doc: AgentFile, flags: Mapping[str, Any]) -> AgentFile:
    """The file's document with every flag that was given (not None) put over its key.
    ``flags`` uses the document's dotted names (``events.path``, ``fleet.kafka``); the
    result is checked like the file, so a flag cannot smuggle in a bad value either."""
    raw = msgspec.to_builtins(doc)
    for key, value in flags.items():
        if value is None:
            continue
        table, _, name = key.rpartition(".")
        target = raw.setdefault(table, {}) if table else raw
        target[name] = value
    try:
        return msgspec.convert(raw, AgentFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"command line: {exc}") from None


def apply_environment(doc: AgentFile) -> None:
    """Export the process-wide settings (state dir, pin root) the store and loader read."""
    if doc.state_dir:
        os.environ["AEGIS_STATE_DIR"] = doc.state_dir
    if doc.pin_root:
        os.environ["AEGIS_PIN_ROOT"] = doc.pin_root


def agent_config(doc: AgentFile, *, kafka: str | None = None,
                 exit_after: float | None = None) -> AgentConfig:
    """The :class:`~aegis_stream.agent.run.AgentConfig` of ``doc``; ``kafka`` is the
    bootstrap as the CLI's preflight normalised it."""
    from aegis_stream.agent.run import AgentConfig

    ev = doc.events
    return AgentConfig(
        policy=doc.policy, events=ev.path, metrics_addr=doc.metrics_addr, mode=doc.mode,
        status_file=doc.status_file, exit_after=exit_after,
        events_max_bytes=ev.max_bytes, events_backups=ev.backups,
        events_compress=ev.compress, events_file_mode=ev.file_mode,
        kafka=kafka, kafka_host_key=doc.fleet.host_key, storm_window_s=doc.storm_window_s,
        metrics_deprecated_names=doc.metrics_deprecated_names,
    )
