"""The agent config file (aegis_stream.agent.config): the shipped default decodes, every
key maps onto the agent, flags override keys, bad documents are one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from aegis_stream.agent import config as cf

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "packaging" / "aegis.toml"


def test_shipped_default_decodes_and_names_every_key():
    doc = cf.load(str(SHIPPED))
    assert doc.events.path == "/var/log/aegis/events.jsonl" and doc.events.file_mode == 0o640
    assert doc.state_dir == "/var/lib/aegis" and doc.metrics_addr == "127.0.0.1:9464"
    # every key of the Struct appears in the shipped file (set or commented), so the
    # file documents the whole surface
    text = SHIPPED.read_text()
    for struct in (cf.AgentFile, cf.EventsConfig, cf.FleetConfig):
        for name in struct.__struct_fields__:
            if name not in ("events", "fleet"):
                assert f"{name} = " in text, name
    docs = (ROOT / "docs" / "OPERATIONS.md").read_text()
    for key in ("policy", "mode", "state_dir", "pin_root", "status_file", "metrics_addr",
                "log_format", "metrics_deprecated_names", "events.path", "events.max_bytes", "events.backups",
                "events.compress", "events.file_mode", "fleet.kafka", "fleet.host_key"):
        assert f"`{key}`" in docs, key


def test_empty_document_is_every_default():
    assert cf.decode(b"") == cf.AgentFile()
    assert cf.load(None) == cf.AgentFile()


@pytest.mark.parametrize("text, words", [
    ("bogus = 1", "unknown field `bogus`"),
    ("[events]\nrotate = 3", "unknown field `rotate` - at `$.events`"),
    ("[fleet]\nbootstrap = 'x:1'", "unknown field `bootstrap` - at `$.fleet`"),
    ("metrics_addr = 9464", "Expected `str | null`, got `int` - at `$.metrics_addr`"),
    ("mode = 'enforcing'", "Invalid enum value 'enforcing' - at `$.mode`"),
    ("log_format = 'xml'", "Invalid enum value 'xml' - at `$.log_format`"),
    ("[events]\nfile_mode = 0o1777", "Expected `int` <= 511 - at `$.events.file_mode`"),
    ("[events]\nbackups = -1", "Expected `int` >= 0 - at `$.events.backups`"),
    ("[events]\nmax_bytes = 0", "Expected `int` >= 1 - at `$.events.max_bytes`"),
    ("[events]\ncompress = 'yes'", "Expected `bool`, got `str` - at `$.events.compress`"),
    ("events = 'x'", "Expected `object`, got `str` - at `$.events`"),
    ("state_dir = [", "not valid TOML"),
])
def test_bad_documents_are_one_line_refusals(text, words):
    with pytest.raises(cf.ConfigError) as ei:
        cf.decode(text, "/etc/aegis/aegis.toml")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("config /etc/aegis/aegis.toml: ") and words in msg, msg


def test_flags_override_keys_and_are_checked_too():
    doc = cf.decode(b'metrics_addr = "127.0.0.1:1"\n[events]\npath = "/a"\nbackups = 2\n'
                    b'[fleet]\nkafka = "k:9092"\nhost_key = "h"\n')
    merged = cf.merge(doc, {"metrics_addr": "127.0.0.1:2", "events.path": "/b", "fleet.host_key": None,
                            "fleet.kafka": "k2:9092", "mode": None})
    assert merged.metrics_addr == "127.0.0.1:2" and merged.events.path == "/b"
    assert merged.events.backups == 2  # not given: the file's
    assert merged.fleet == cf.FleetConfig(kafka="k2:9092", host_key="h")
    with pytest.raises(cf.ConfigError, match="command line: .*at `\\$.mode`"):
        cf.merge(doc, {"mode": "sometimes"})


def test_agent_config_carries_every_key():
    doc = cf.decode(b'policy = "/p.toml"\nmode = "enforce"\nstatus_file = "/s.json"\n'
                    b'metrics_addr = "127.0.0.1:9"\n[events]\npath = "/e"\nmax_bytes = 5\n'
                    b'backups = 1\ncompress = true\nfile_mode = 0o600\n[fleet]\nhost_key = "h"\n')
    a = cf.agent_config(doc, kafka="k:1", exit_after=3.0)
    assert (a.policy, a.mode, a.status_file, a.metrics_addr) == ("/p.toml", "enforce", "/s.json", "127.0.0.1:9")
    assert (a.events, a.events_max_bytes, a.events_backups, a.events_compress, a.events_file_mode) == \
        ("/e", 5, 1, True, 0o600)
    assert (a.kafka, a.kafka_host_key, a.exit_after) == ("k:1", "h", 3.0)
    assert a.metrics_deprecated_names is True  # the deprecation window's default
    off = cf.agent_config(cf.merge(doc, {"metrics_deprecated_names": False}))
    assert off.metrics_deprecated_names is False


def test_environment_exports_state_dir_and_pin_root(monkeypatch):
    monkeypatch.delenv("AEGIS_STATE_DIR", raising=False)
    monkeypatch.delenv("AEGIS_PIN_ROOT", raising=False)
    cf.apply_environment(cf.decode(b'state_dir = "/tmp/s"\npin_root = "/sys/fs/bpf/x"'))
    assert os.environ["AEGIS_STATE_DIR"] == "/tmp/s" and os.environ["AEGIS_PIN_ROOT"] == "/sys/fs/bpf/x"
    from aegis_stream.kernel.loader import pin_root
    from aegis_stream.policy.store import state_dir

    assert str(state_dir()) == "/tmp/s" and pin_root() == "/sys/fs/bpf/x"


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv(cf.CONFIG_ENV, str(tmp_path / "a.toml"))
    assert cf.default_path() == str(tmp_path / "a.toml")
    monkeypatch.setenv(cf.CONFIG_ENV, "")
    assert cf.default_path() is None
    monkeypatch.delenv(cf.CONFIG_ENV)
    assert cf.default_path() == (cf.DEFAULT_CONFIG if Path(cf.DEFAULT_CONFIG).exists() else None)
    with pytest.raises(cf.ConfigError, match="No such file"):
        cf.load(str(tmp_path / "missing.toml"))


def test_struct_is_frozen():
    with pytest.raises(AttributeError):
        cf.AgentFile().policy = "x"  # type: ignore[misc]
    assert msgspec.structs.asdict(cf.AgentFile())["log_format"] == "text"


def _aegis_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, AEGIS_STATE_DIR=str(tmp_path / "s"), AEGIS_PIN_ROOT=str(tmp_path / "pins"))
    return subprocess.run([sys.executable, "-m", "aegis_stream.cli", "run", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_refuses_a_bad_file_in_one_line_and_a_flag_wins(tmp_path):
    bad = tmp_path / "aegis.toml"
    bad.write_text('[events]\npath = "/x"\nrotation = 5\n')
    out = _aegis_run(tmp_path, "--config", str(bad))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr == f"aegis: error: config {bad}: Object contains unknown field `rotation` - at `$.events`\n"
    # the file's policy (missing) would refuse with policy_unreadable; state_dir from the
    # file is where the refusal is recorded; a flag's policy overrides the file's
    good = tmp_path / "good.toml"
    good.write_text(f'policy = "{tmp_path}/from-file.toml"\nstate_dir = "{tmp_path}/st"\n')
    out = _aegis_run(tmp_path, "--config", str(good), "--policy", str(tmp_path / "from-flag.toml"),
                     "--events", os.devnull)
    assert out.returncode == 2 and "from-flag.toml" in out.stderr and "from-file" not in out.stderr
    assert (tmp_path / "st" / "status.json").exists() and not (tmp_path / "s").exists()
    assert not (tmp_path / "pins").exists()  # refused before anything was loaded
