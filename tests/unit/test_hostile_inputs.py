"""Hostile input (issue 16): each case measured in the lab is refused in one line, fast.

Every refusal here is timed in CPU seconds of this process (``time.process_time``: what the
refusal costs, not how busy the shared CI host is) and must stay well under a second; the
figures are in docs/INPUT_LIMITS.md.  The cases: deep nesting (was a RecursionError), a NUL
byte in a path (ValueError), /dev/zero (MemoryError after 37 s), a FIFO with no writer (a
hang), a 20 MB policy and a 100,000-rule policy (no answer in 180 s), and rules on targets
with no stable identity (directories, procfs, /proc/sys, sysfs: accepted before).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from aegis_stream import inputs
from aegis_stream.agent import explain as explain_cli
from aegis_stream.agent.status import read_agent
from aegis_stream.errors import AegisError, PolicyError, SignatureError, StateError
from aegis_stream.policy import compiler, lint, model, signing
from aegis_stream.policy.store import PolicyStore
from aegis_stream.policy.trust import TrustStore

HEAD = 'apiVersion = "aegis/v1"\nname = "h"\nversion = 1\n'
FAST_S = 0.5  # CPU seconds: "well under a second"


@contextlib.contextmanager
def fast(limit: float = FAST_S) -> Iterator[None]:
    t = time.process_time()
    yield
    spent = time.process_time() - t
    assert spent < limit, f"refusal took {spent:.3f} CPU s (limit {limit})"


def refused(fn, *args, exc: type[Exception] = PolicyError, match: str = "", **kw) -> str:
    """Call ``fn``; it must raise ``exc`` with a one-line message containing ``match``, fast."""
    with fast(), pytest.raises(exc) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def _rule(i: int, path: str) -> str:
    return f'[[rules]]\nid = "r{i}"\npath = "{path}"\n'


# ---------------------------------------------------------------------------- nesting
@pytest.mark.parametrize("doc", [
    "x = " + "[" * 100_000 + "]" * 100_000,
    "x = " + "{a = " * 50_000 + "1" + "}" * 50_000,
    "rules = [" + "[" * 5_000,  # unbalanced too
])
def test_deep_nesting_is_refused_before_the_parser_recurses(doc: str) -> None:
    msg = refused(model.loads, HEAD + doc, match="policy-depth=16")
    assert "nesting deeper" in msg
    rep = lint.lint_text(HEAD + doc, "p.toml")  # lint reads through the same bounds
    assert [i.code for i in rep.errors] == ["limit"] and "policy-depth" in rep.errors[0].message


def test_dotted_keys_nest_without_brackets_and_are_bounded_too() -> None:
    refused(model.loads, HEAD + ".".join(["a"] * 200) + " = 1\n", match="policy-depth=16")


def test_brackets_inside_strings_and_comments_do_not_count() -> None:
    deep = "[" * 40
    text = (HEAD + f'description = "{deep}"\n# {deep}\n' + _rule(0, f"/tmp/{deep}")
            + f"actions = ['open'] # {deep}\n" + f'[[scope]]\ncgroup = """/x{deep}\n"""\n')
    shape = inputs.check_policy_shape(text)
    assert (shape.depth, shape.array_tables, shape.inline_tables) == (2, 2, 0)  # [[rules]], [[scope]]
    assert model.loads(text).rules[0].path == f"/tmp/{deep}"


# ---------------------------------------------------------------------------- paths
def test_nul_byte_in_a_policy_path_is_refused_before_any_open() -> None:
    msg = refused(model.loads, HEAD + _rule(0, "/etc/pass\\u0000wd"), match="NUL byte")
    assert "rules[0] (r0): path" in msg


def test_nul_byte_in_a_scope_is_refused() -> None:
    refused(model.loads, HEAD + _rule(0, "/etc/passwd") + '[[scope]]\ncgroup = "/a\\u0000"\n',
            match="scope[0].cgroup: contains a NUL byte")


@pytest.mark.parametrize("path, match", [
    ("/" + "a/" * 2100, "path-bytes=4095"),
    ("/" + "n" * 300, "name-bytes=255"),
])
def test_overlong_paths_are_refused(path: str, match: str) -> None:
    refused(model.loads, HEAD + _rule(0, path), match=match)


def test_policy_that_is_not_utf8_names_the_byte() -> None:
    refused(model.loads, (HEAD + _rule(0, "/x")).encode() + b"\xff\n",
            match="not UTF-8 (byte 0xff at offset")


# ---------------------------------------------------------------------------- files
def test_dev_zero_is_refused_at_open_without_reading() -> None:
    refused(model.load, "/dev/zero", match="character device, not a regular file")


def test_fifo_with_no_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "p.toml"
    os.mkfifo(fifo)
    out: list[str] = []

    def attempt() -> None:
        try:
            model.load(fifo)
        except PolicyError as exc:
            out.append(str(exc))

    t = threading.Thread(target=attempt, daemon=True)  # a regression would hang here
    t.start()
    t.join(5)
    assert not t.is_alive(), "model.load blocked on a FIFO with no writer"
    assert out and "is a FIFO, not a regular file" in out[0]


def test_directory_as_policy_file(tmp_path: Path) -> None:
    refused(model.load, tmp_path, match="is a directory, not a regular file")


def test_20mb_policy_is_refused_from_its_size_before_a_byte_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    body = (HEAD + 'mode = "enforce"\n' + _rule(0, "/x")).encode()
    big.write_bytes(body + b"# " + b"x" * (20_000_000 - len(body)) + b"\n")
    msg = refused(model.load, big, match="policy-bytes=8.0 MiB")
    assert "19.1 MiB" in msg
    with fast():  # the bytes in memory (an envelope's policy, an in-process caller)
        with pytest.raises(PolicyError, match="policy-bytes"):
            model.loads(big.read_bytes())


def test_100000_rules_are_counted_and_refused_before_parsing() -> None:
    # compact rules keep it under the size limit: only the count can refuse it
    text = HEAD + "".join(f'[[rules]]\nid="r{i}"\ninode="8:1:{i + 1}"\n' for i in range(100_000))
    assert len(text) < inputs.POLICY_BYTES.value
    msg = refused(model.loads, text, match="policy-rules=65536")
    assert "100000 [[rules]] tables" in msg and "before parsing" in msg


def test_inline_rule_tables_count_too() -> None:
    text = HEAD + "rules = [" + ",".join(f'{{id="r{i}",inode="8:1:{i + 1}"}}' for i in range(70_000)) + "]\n"
    refused(model.loads, text, match="tables, more than the limits")


def test_file_that_grows_past_the_limit_while_read_is_refused(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "g"
    f.write_bytes(b"x" * 10)
    small = inputs.Limit("t", 16, "bytes", "test")
    real_fstat = os.fstat

    def fstat_before_growth(fd: int):  # fstat saw 10 bytes; then the file grew
        st = real_fstat(fd)
        f.write_bytes(b"x" * 100)
        return st

    monkeypatch.setattr(inputs.os, "fstat", fstat_before_growth)
    with pytest.raises(PolicyError, match="grew over the limit t="):
        inputs.read_bounded(f, small, "thing")


# ---------------------------------------------------------------------------- targets
def _compile(text: str) -> compiler.CompiledPolicy:
    return compiler.compile_policy(model.loads(text))


@pytest.mark.parametrize("target, kind", [
    ("/proc/self/status", "pseudo-fs"),
    ("/proc/sys/kernel/hostname", "pseudo-fs"),
    ("/sys/kernel/mm", "directory"),
    ("/sys/power/state", "pseudo-fs"),
])
def test_pseudo_filesystem_targets_are_refused_unless_accepted(target: str, kind: str) -> None:
    if not os.path.exists(target):
        pytest.skip(f"{target} is not on this host")
    msg = refused(_compile, HEAD + _rule(0, target), match=f'accept_target = ["{kind}"]')
    assert msg.startswith("rules[0] (r0): ") and "refused" in msg
    accepted = _compile(HEAD + _rule(0, target) + f'accept_target = ["{kind}"]\n')
    assert accepted.rules[0].source == target
    rep = lint.lint_text(HEAD + _rule(0, target), "p.toml", critical={})
    assert [(i.code, i.level) for i in rep.errors] == [(kind, "error")]  # /proc/self: + symlink info
    assert f'accept_target = ["{kind}"]' in rep.errors[0].message


def test_directory_target_is_refused_unless_accepted(tmp_path: Path) -> None:
    refused(_compile, HEAD + _rule(0, str(tmp_path)), match="is a directory")
    ok = _compile(HEAD + _rule(0, str(tmp_path)) + 'accept_target = ["directory"]\n')
    assert ok.rules[0].ino == os.stat(tmp_path).st_ino


def test_regular_file_needs_no_opt_in(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    assert _compile(HEAD + _rule(0, str(f))).rules[0].ino == os.stat(f).st_ino


def test_accept_target_is_signed_but_leaves_old_digests_unchanged() -> None:
    # the canonical encoding as it was before accept_target existed (digest pinned)
    p = model.loads(HEAD + _rule(0, "/etc/passwd") + 'actions = ["open"]\n')
    assert model.canonical_bytes(p) == (
        b'{"apiVersion":"aegis/v1","description":"","mode":"audit","name":"h","rules":[{"actions":'
        b'["open"],"description":"","id":"r0","inode":null,"path":"/etc/passwd"}],"scope":[],'
        b'"version":1}')
    q = model.loads(HEAD + _rule(0, "/etc/passwd") + 'actions = ["open"]\naccept_target = ["directory"]\n')
    assert model.policy_digest(q) != model.policy_digest(p)
    assert b'"accept_target":["directory"]' in model.canonical_bytes(q)
    refused(model.loads, HEAD + _rule(0, "/x") + 'accept_target = ["directory", "directory"]\n',
            match="accept_target repeats")
    with pytest.raises(PolicyError, match="accept_target"):
        model.loads(HEAD + _rule(0, "/x") + 'accept_target = ["anything"]\n')


# ---------------------------------------------------------------------------- envelopes, keys
def test_envelope_over_its_limit_is_refused_before_json_decoding() -> None:
    data = b'{"format": "' + b"x" * (inputs.ENVELOPE_BYTES.value + 1) + b'"}'
    refused(signing.parse_envelope, data, "e.signed", exc=SignatureError, match="envelope-bytes")


def test_envelope_embedding_a_deeply_nested_policy_is_refused() -> None:
    env = msgspec.json.encode({"format": "aegis.signed-policy.v1",
                               "policy": HEAD + "x = " + "[" * 50_000,
                               "signature": {"algorithm": "ed25519", "key_id": "k",
                                             "policy_name": "h", "policy_version": 1,
                                             "policy_digest": "sha256:00", "issued_at": 1,
                                             "expires_at": 2, "value": ""}})
    refused(signing.verify_envelope, env, TrustStore("/nonexistent-aegis-state"),
            match="policy-depth")


@pytest.mark.parametrize("bad", ["/dev/zero", "fifo", "big"])
def test_key_files_are_bounded(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "k.key"
    if bad == "fifo":
        os.mkfifo(path)
    elif bad == "big":
        with open(path, "wb") as fh:
            fh.truncate(10 << 20)  # sparse: the size alone refuses it
    else:
        path = Path(bad)
    refused(signing.load_private_key, path, match="private key")
    refused(signing.load_public_key_bytes, b"x" * (inputs.KEY_FILE_BYTES.value + 1), "k.pub",
            match="key-file-bytes")


def test_trust_store_over_its_limit_is_refused(tmp_path: Path) -> None:
    ts = TrustStore(tmp_path)
    ts.path.parent.mkdir(parents=True, exist_ok=True)
    with open(ts.path, "wb") as fh:
        fh.truncate(inputs.TRUST_STORE_BYTES.value + 1)
    os.chmod(ts.path, 0o600)
    refused(ts.list, exc=StateError, match="trust-store-bytes")


def test_generation_record_over_its_limit_is_refused(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    store.gen_dir.mkdir(parents=True)
    with open(store.gen_dir / "1.json", "wb") as fh:
        fh.truncate(inputs.GENERATION_RECORD_BYTES.value + 1)
    refused(store.load, 1, exc=StateError, match="generation-record-bytes")


@pytest.mark.parametrize("bad", ["/dev/zero", "fifo", "big"])
def test_status_file_that_is_not_a_status_file_reads_as_no_agent(tmp_path: Path, bad: str) -> None:
    path = str(tmp_path / "status.json")
    if bad == "fifo":
        os.mkfifo(path)
    elif bad == "big":
        with open(path, "wb") as fh:
            fh.truncate(inputs.STATUS_FILE_BYTES.value + 1)
    else:
        path = bad
    with fast():
        facts = read_agent(path)
    assert facts.doc is None and not facts.alive


# ---------------------------------------------------------------------------- explain
def test_explain_log_that_is_a_device_is_refused() -> None:
    refused(explain_cli.find_event, "e1", Path("/dev/zero"), exc=explain_cli.ExplainError,
            match="character device")


def test_explain_skips_an_overlong_line_without_holding_it(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    with open(log, "wb") as fh:
        fh.write(b'{"schema": "aegis.decision.v1", "event_id": "e1", ' + b"x" * (5 << 20) + b"\n")
        fh.write(b'{"schema": "aegis.decision.v1", "event_id": "e1"}\n')
    lines = list(inputs.bounded_lines(log, inputs.EVENTS_LOG_BYTES, "event log"))
    assert lines == [b'{"schema": "aegis.decision.v1", "event_id": "e1"}\n']


def test_explain_stdin_is_bounded() -> None:
    stream = io.BytesIO(b"{" + b" " * (inputs.EVENT_LINE_BYTES.value + 10))
    refused(explain_cli.read_event, stream, exc=explain_cli.ExplainError, match="event-line-bytes")


# ---------------------------------------------------------------------------- argv
@pytest.mark.parametrize("arg, match", [
    ("a\x00b", "NUL byte"),
    ("a\udcffb", "not valid UTF-8"),
    ("x" * 5000, "arg-bytes=4096"),
])
def test_argv_screen(arg: str, match: str) -> None:
    why = inputs.check_argv(["policy", "lint", arg])
    assert why is not None and why.startswith("argument 3: ") and match in why


def test_every_limit_is_named_once_and_documented() -> None:
    names = [lim.name for lim in inputs.LIMITS]
    assert len(names) == len(set(names))
    doc = (Path(__file__).parents[2] / "docs" / "INPUT_LIMITS.md").read_text()
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/INPUT_LIMITS.md does not name {missing}"


def test_errors_are_aegis_errors() -> None:
    # what the CLI guard turns into its own one line, never "internal error"
    for exc in (PolicyError, SignatureError, StateError, explain_cli.ExplainError):
        assert issubclass(exc, AegisError)


def test_lint_names_the_bad_path_like_apply() -> None:
    text = (HEAD + _rule(0, "/etc/pass\\u0000wd") + _rule(1, "/" + "n" * 300)
            + '[[scope]]\ncgroup = "/a\\u0000"\n')
    rep = lint.lint_text(text, "p.toml", critical={})
    assert [(i.code, i.line) for i in rep.errors] == [("bad-path", 6), ("bad-path", 9), ("bad-path", 11)]
    assert "NUL byte" in rep.errors[0].message and "name-bytes=255" in rep.errors[1].message
