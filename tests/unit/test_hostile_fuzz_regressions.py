"""Every crash the fuzzers (fuzz/) found, as a regression test, and hypothesis properties for
the parsers the harnesses cover (policy decoder, compiler, envelope verifier, event decoder,
explain): whatever the input, a result or a one-line AegisError, never anything else."""

from __future__ import annotations

import io
import string

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis_stream.agent import explain as explain_cli
from aegis_stream.errors import AegisError, SignatureError
from aegis_stream.kernel import abi, events
from aegis_stream.pipeline.schema import DecisionEvent
from aegis_stream.policy import compiler, lint, model, signing
from aegis_stream.processors.explain import explain

HEAD = 'apiVersion = "aegis/v1"\nname = "h"\nversion = 1\n'
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one_line_or_ok(fn, *args) -> object:
    try:
        return fn(*args)
    except AegisError as exc:
        assert "\n" not in str(exc), str(exc)
        return exc


# ------------------------------------------------------------------ crashes found by fuzz/
def test_fuzz_envelope_unknown_field_with_newline_is_one_line() -> None:
    # fuzz/envelope.py: msgspec's message quotes the unknown key, newlines and all
    data = b'{"format": "aegis.signed-policy.v1", "si9apiVersion = \\"aegis/v1\\"\\nname": 1}'
    with pytest.raises(SignatureError) as ei:
        signing.parse_envelope(data, "e")
    assert "\n" not in str(ei.value) and "\\x0a" in str(ei.value)


@pytest.mark.parametrize("field", ["key_id", "policy_name", "policy_digest", "value"])
def test_fuzz_envelope_metadata_with_a_newline_is_refused_in_one_line(field: str) -> None:
    # fuzz/envelope.py: "policy digest sha256:8b2f...\n... does not match" was two lines
    sig = {"algorithm": "ed25519", "key_id": "k", "policy_name": "h", "policy_version": 1,
           "policy_digest": "sha256:00", "issued_at": 1, "expires_at": 2, "value": "AA=="}
    sig[field] = sig[field] + "\nforged line"
    env = msgspec.json.encode({"format": "aegis.signed-policy.v1", "policy": HEAD, "signature": sig})
    with pytest.raises(SignatureError, match=f"signature.{field}: not printable text") as ei:
        signing.parse_envelope(env, "e")
    assert "\n" not in str(ei.value)


def test_fuzz_explain_stdin_with_a_newline_in_a_value_is_one_line() -> None:
    # fuzz/explain.py: "Invalid value 'aegis.dec\n' - at `$.schema`" was two lines
    data = b'{"schema":"aegis.dec\\n","decision":"deny"}'
    with pytest.raises(explain_cli.ExplainError) as ei:
        explain_cli.read_event(io.BytesIO(data))
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("index", [-7, -1, 1])
def test_fuzz_explain_rule_index_outside_the_record_is_a_finding_not_a_crash(index: int) -> None:
    # fuzz/explain.py (in a CI run): rule_index -7 raised IndexError; -1 silently explained
    # the record's last rule as the match
    from aegis_stream.pipeline.normalise import GenerationInfo
    from aegis_stream.policy.store import GenerationRecord

    pol = model.loads(HEAD + '[[rules]]\nid = "a"\ninode = "8:1:12"\n')
    info = GenerationInfo(GenerationRecord(1, 1.0, compiler.compile_policy(pol)), "p.toml", "/r/1.json")
    ev = DecisionEvent(event_id="e1", time="t", ktime_ns=1, host="h", hook="file_open",
                       action="open", decision="deny", mode="enforce", rule_id="a",
                       rule_index=index, generation=1, policy_name="h", policy_version=1,
                       policy_digest="", rule_source="", dev="8:1", ino=12, cgroup_id=0,
                       cgroup_path="", scope_cgroup_id=0, scope_cgroup_path="", pid=1, tid=1,
                       uid=0, gid=0, comm="x")
    x = explain(ev, info)
    assert any(f"the event names index {index}" in p for p in x.inconsistencies), x.inconsistencies


# ------------------------------------------------------------------ hypothesis properties
_toml_chars = st.sampled_from(list('[]{}="\'\\#.,\n abcr01:/') + ["rules", "scope", "id", "path",
                                                                    "[[rules]]", '"""', "'''"])


@SETTINGS
@given(st.lists(_toml_chars, max_size=200).map("".join))
def test_policy_decoder_is_total_on_toml_like_text(body: str) -> None:
    _one_line_or_ok(model.loads, HEAD + body)


@SETTINGS
@given(st.binary(max_size=2000))
def test_policy_decoder_is_total_on_bytes(data: bytes) -> None:
    _one_line_or_ok(model.loads, data)


@SETTINGS
@given(st.lists(_toml_chars, max_size=200).map("".join))
def test_lint_never_raises_and_never_passes_what_the_decoder_refuses(body: str) -> None:
    rep = lint.lint_text(HEAD + body, "p", critical={}, check_fs=False)
    if not rep.errors:
        model.loads(HEAD + body)


_paths = st.one_of(
    st.sampled_from(["/", "/proc/self/status", "/proc/sys/kernel/hostname", "/sys/power/state",
                     "/dev/null", "/etc/hostname", "/tmp", "/nonexistent", "/etc/../etc/hostname"]),
    st.text(alphabet=string.printable, max_size=40).map(lambda s: "/" + s),
)


@SETTINGS
@given(st.lists(st.tuples(_paths, st.lists(st.sampled_from(["directory", "pseudo-fs",
                                                            "unstable-inode"]), unique=True)),
                min_size=1, max_size=4))
def test_compiler_is_total_and_refuses_each_unstable_target(rules: list) -> None:
    text = HEAD + "".join(
        f"[[rules]]\nid = \"r{i}\"\npath = {msgspec.json.encode(p).decode()}\n"
        f"accept_target = {msgspec.json.encode(acc).decode()}\n" for i, (p, acc) in enumerate(rules))
    pol = _one_line_or_ok(model.loads, text)
    if isinstance(pol, model.Policy):
        cp = _one_line_or_ok(compiler.compile_policy, pol)
        if isinstance(cp, compiler.CompiledPolicy):  # every accepted rule is stable or opted in
            import os
            import stat as st_

            for r, (_, acc) in zip(cp.rules, rules, strict=True):
                is_dir = st_.S_ISDIR(os.stat(r.source).st_mode)
                problem = compiler.target_problem(r.fstype, is_dir)
                assert problem is None or problem[0] in acc


@SETTINGS
@given(st.binary(max_size=600))
def test_envelope_verifier_is_total(data: bytes) -> None:
    class NoKeys(signing.KeyLookup):
        def public_key(self, key_id: str, *, now: float):
            raise SignatureError(f"unknown key {key_id!r}")

    _one_line_or_ok(signing.verify_envelope, b'{"format": ' + data, NoKeys())
    _one_line_or_ok(signing.verify_envelope, data, NoKeys())


@SETTINGS
@given(st.binary(max_size=3 * events.EVENT_SIZE))
def test_event_decoder_is_total(data: bytes) -> None:
    _one_line_or_ok(events.decode_raw, data)
    for stride in (events.RECORD_STRIDE, events.EVENT_SIZE):
        r = _one_line_or_ok(events.decode_batch, data, stride)
        if not isinstance(r, AegisError):
            events.rows(r)


@SETTINGS
@given(st.integers(0, 2**16 - 1), st.binary(min_size=events.EVENT_SIZE, max_size=events.EVENT_SIZE))
def test_event_decoder_refuses_a_foreign_abi_and_decodes_ours(abi_version: int, tail: bytes) -> None:
    data = abi_version.to_bytes(2, "little") + tail[2:]  # abi_version: the record's first u16
    r = _one_line_or_ok(events.decode_raw, data)
    assert isinstance(r, AegisError) == (abi_version != abi.ABI_VERSION)


_event = st.builds(
    DecisionEvent, event_id=st.text(max_size=8), time=st.text(max_size=8), ktime_ns=st.integers(0, 2**63),
    host=st.text(max_size=8), hook=st.sampled_from(["file_open", "bprm_check_security", "mmap_file"]),
    action=st.sampled_from(["open", "exec"]), decision=st.sampled_from(["deny", "audit", "allow"]),
    mode=st.sampled_from(["audit", "enforce"]), rule_id=st.text(max_size=8),
    rule_index=st.integers(-70_000, 70_000), generation=st.integers(0, 3), policy_name=st.text(max_size=8),
    policy_version=st.integers(0, 9), policy_digest=st.text(max_size=8), rule_source=st.text(max_size=8),
    dev=st.text(max_size=8), ino=st.integers(0, 2**64 - 1), cgroup_id=st.integers(0, 2**64 - 1),
    cgroup_path=st.text(max_size=8), scope_cgroup_id=st.integers(0, 2**64 - 1),
    scope_cgroup_path=st.text(max_size=8), pid=st.integers(0, 2**31), tid=st.integers(0, 2**31),
    uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1), comm=st.text(max_size=16),
)


@SETTINGS
@given(_event)
def test_explain_is_total_and_renders_one_line_per_field(ev: DecisionEvent) -> None:
    from aegis_stream.pipeline.normalise import GenerationInfo
    from aegis_stream.policy.store import GenerationRecord

    pol = model.loads(HEAD + '[[rules]]\nid = "a"\ninode = "8:1:12"\n')
    info = GenerationInfo(GenerationRecord(1, 1.0, compiler.compile_policy(pol)), "p.toml", "/r/1.json")
    x = explain(ev, info if ev.generation == 1 else None)
    text = explain_cli.render(x)
    assert all(line.strip() for line in text.splitlines())
    back = _one_line_or_ok(explain_cli.read_event, io.BytesIO(msgspec.json.encode(ev)))
    assert back == ev


@SETTINGS
@given(st.binary(max_size=400))
def test_explain_stdin_is_total(data: bytes) -> None:
    _one_line_or_ok(explain_cli.read_event, io.BytesIO(data))
