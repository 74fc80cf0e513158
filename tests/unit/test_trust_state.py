"""Provenance that notices its own loss, generation records checked against their recorded
digest, and the version range and anti-rollback semantics (issue 17)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import msgspec
import pytest

from aegis_stream.cli import main as cli_main
from aegis_stream.cli import policy as cli_policy
from aegis_stream.errors import PolicyError, SignatureError
from aegis_stream.kernel import slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import model, signing
from aegis_stream.policy.lifecycle import Lifecycle, SimulatedCrash
from aegis_stream.policy.provenance import ProvenanceLog, RecordMismatchError, checked_store
from aegis_stream.policy.store import PolicyStore, record_digest

MAX = model.MAX_VERSION


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp, self.state = tmp, tmp / "state"
        self.maps = PolicyMaps.fake(64)
        for n in "abc":
            (tmp / n).write_text(n)
        k = signing.generate_keypair("k1", tmp / "keys")
        self.key, _ = signing.load_private_key(k.private_path)
        self.lc = Lifecycle(self.maps, self.state)
        self.lc.trust.add(k.public_path.read_bytes())
        self.log = ProvenanceLog(self.state)

    def toml(self, version: int, files: str = "a", mode: str = "enforce") -> bytes:
        rules = "".join(f'[[rules]]\nid = "r-{f}"\npath = "{self.tmp / f}"\n' for f in files)
        return (f'apiVersion = "aegis/v1"\nname = "web"\nversion = {version}\n'
                f'mode = "{mode}"\n{rules}').encode()

    def signed(self, version: int, files: str = "a", mode: str = "enforce") -> bytes:
        return signing.sign_policy(self.toml(version, files, mode), self.key, "k1")

    def high_water(self) -> int | None:
        e = self.lc.counter.get("web")
        return None if e is None else e.high_water

    def record_path(self, gen: int) -> Path:
        return self.state / "generations" / f"{gen}.json"


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path)


@pytest.fixture
def cli(env, monkeypatch) -> Env:
    """The CLI pointed at env's state dir and fake kernel maps."""
    monkeypatch.setenv("AEGIS_STATE_DIR", str(env.state))
    monkeypatch.setenv("AEGIS_PIN_ROOT", str(env.tmp / "pins"))

    @contextlib.contextmanager
    def fake_kernel():
        yield env.maps, lambda gen: {}

    monkeypatch.setattr(cli_policy, "_kernel", fake_kernel)

    class Pinned:
        links = {"aegis_file_open": True}

        def policy_maps(self):
            return env.maps

        def close(self):
            pass

    monkeypatch.setattr("aegis_stream.kernel.loader.open_pinned", lambda: Pinned())
    return env


def _edit_record(path: Path) -> None:
    """Point rule 0 at another inode: still a valid record, no longer the one applied."""
    doc = json.loads(path.read_bytes())
    doc["policy"]["rules"][0]["ino"] += 1
    path.write_bytes(msgspec.json.encode(doc))


# ---------------------------------------------------------------- records that vouch
def test_apply_and_reapply_rollback_record_the_record_digest(env) -> None:
    r1 = env.lc.apply(env.signed(1), "v1")
    env.lc.apply(env.signed(2, "ab"), "v2")
    for rec in env.log.records():
        if rec["action"] == "apply":
            assert rec["record_sha256"] == record_digest(
                env.record_path(rec["generation"]).read_bytes())
    slots.clear_slot(env.maps, slots.read_state(env.maps).inactive_slot)  # force a re-apply
    rb = env.lc.rollback()
    assert rb.method == "reapply" and rb.generation == 3 and r1.generation == 1
    last = env.log.last()
    assert last["action"] == "rollback" and last["record_sha256"] == record_digest(
        env.record_path(3).read_bytes())
    assert env.log.verify().ok


def test_edited_record_is_refused_by_show_rollback_and_verify(cli, capsys) -> None:
    env = cli
    env.lc.apply(env.signed(1), "v1")
    env.lc.apply(env.signed(2, "ab"), "v2")
    assert cli_main.main(["policy", "show"]) == 0
    _edit_record(env.record_path(2))
    capsys.readouterr()
    assert cli_main.main(["policy", "show"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generations/2.json was changed after it was applied" in err
    with pytest.raises(RecordMismatchError):
        checked_store(PolicyStore(env.state)).load(2)
    PolicyStore(env.state).load(2)  # the plain store (the agent's event enrichment) still reads it
    # rollback reads the active record first: refused, nothing changed
    with pytest.raises(RecordMismatchError, match="changed after it was applied"):
        env.lc.rollback()
    assert slots.read_state(env.maps).active.generation == 2
    res = env.log.verify()
    assert not res.ok and "generations/2.json was changed" in res.reason
    assert cli_main.main(["policy", "log", "--verify"]) == 1
    assert "generations/2.json was changed" in capsys.readouterr().err


def test_edited_rollback_target_is_refused_not_skipped(env) -> None:
    env.lc.apply(env.signed(1), "v1")
    env.lc.apply(env.signed(2, "ab"), "v2")
    _edit_record(env.record_path(1))
    with pytest.raises(RecordMismatchError, match="generations/1.json"):
        env.lc.rollback()
    assert slots.read_state(env.maps).active.generation == 2
    assert env.log.last()["action"] == "rollback" and env.log.last()["result"] == "refused"


def test_explain_refuses_an_edited_record(cli, tmp_path, capsys) -> None:
    env = cli
    env.lc.apply(env.signed(1), "v1")
    golden = Path(__file__).resolve().parents[1] / "golden" / "decision_vectors.json"
    ev = dict(msgspec.json.decode(golden.read_bytes())[0]["expected"])
    ev.update(generation=1, rule_index=0)
    log = tmp_path / "events.jsonl"
    log.write_bytes(msgspec.json.encode(ev) + b"\n")
    argv = ["explain", ev["event_id"], "--events", str(log)]
    cli_main.main(argv)  # explained (consistent or not, it is the applied record)
    assert "changed after it was applied" not in capsys.readouterr().err
    _edit_record(env.record_path(1))
    assert cli_main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generations/1.json was changed after it was applied" in err


def test_record_with_no_provenance_is_refused_legacy_record_accepted(env) -> None:
    env.lc.apply(env.signed(1), "v1")
    store = PolicyStore(env.state)
    rec = store.load(1)
    store.record(msgspec.structs.replace(rec, generation=9))  # written outside the lifecycle
    with pytest.raises(RecordMismatchError, match="no record of applying generation 9"):
        checked_store(store).load(9)
    assert "generation 9" in env.log.verify().reason
    # an ok record from before record digests existed vouches without a digest
    env.log.append("apply", generation=9, policy="web", version=1)
    checked_store(store).load(9)
    assert env.log.verify().ok


def test_reconcile_after_a_crash_past_activation_vouches_for_the_record(env) -> None:
    def crash(step: str) -> None:
        if step == "activated":
            raise SimulatedCrash(step)

    env.lc.apply(env.signed(1), "v1")
    with pytest.raises(SimulatedCrash):
        Lifecycle(env.maps, env.state, hook=crash).apply(env.signed(2, "ab"), "v2")
    out = env.lc.reconcile()
    assert out.effective == "new" and out.generation == 2
    last = env.log.last()
    assert last["action"] == "reconcile" and last["record_sha256"] == record_digest(
        env.record_path(2).read_bytes())
    checked_store(PolicyStore(env.state)).load(2)
    assert env.log.verify().ok


# ---------------------------------------------------------------- loss of the log itself
@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_lost_log_with_history_fails_verify(cli, capsys, how) -> None:
    env = cli
    env.lc.apply(env.signed(1), "v1")
    assert env.log.verify().ok
    env.log.head_path.unlink()
    if how == "deleted":
        env.log.path.unlink()
    else:
        env.log.path.write_bytes(b"")
    res = env.log.verify()
    assert not res.ok and res.records == 0
    assert f"the log is {'missing' if how == 'deleted' else 'empty'}" in res.reason
    assert "generation records" in res.reason and "versions.json" in res.reason
    assert cli_main.main(["policy", "log", "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shows history" in err
    # and every use of the records notices too
    assert cli_main.main(["policy", "show"]) == 1
    assert "no record of applying generation 1" in capsys.readouterr().err


def test_fresh_state_dir_verifies_empty(tmp_path) -> None:
    assert ProvenanceLog(tmp_path / "nothing").verify().ok


def test_kernel_generation_unknown_to_the_log_fails_verify(cli, capsys) -> None:
    env = cli
    env.lc.apply(env.signed(1), "v1")
    assert cli_main.main(["policy", "log", "--verify"]) == 0
    res = env.log.verify(kernel_generation=7)
    assert not res.ok and "kernel enforces generation 7" in res.reason
    # the CLI reads the active generation from the (fake) kernel
    slots.swap(env.maps, PolicyStore(env.state).load(1).policy, 7, 2)
    capsys.readouterr()
    assert cli_main.main(["policy", "log", "--verify"]) == 1
    assert "kernel enforces generation 7" in capsys.readouterr().err


def test_unload_is_recorded(cli, capsys) -> None:
    env = cli
    pins = env.tmp / "pins"
    for sub in ("links", "maps"):
        (pins / sub).mkdir(parents=True)
        (pins / sub / "x").write_text("")
    assert cli_main.main(["unload"]) == 0
    last = env.log.last()
    assert last["action"] == "unload" and last["pins_removed"] == 2
    assert last["pin_root"] == str(pins) and env.log.verify().ok
    assert cli_main.main(["unload"]) == 0  # nothing left: nothing changed, nothing recorded
    assert env.log.last()["seq"] == last["seq"]


def test_break_glass_and_clear_are_recorded(env) -> None:
    env.lc.apply(env.signed(1), "v1")
    env.lc.break_glass("outage")
    env.lc.clear_break_glass("over")
    assert [r["action"] for r in env.log.records()][-2:] == ["break-glass", "break-glass-clear"]


# ---------------------------------------------------------------- versions
@pytest.mark.parametrize("version", [0, MAX + 1, 2**63 - 1, 2**64, 2**128])
def test_out_of_range_versions_are_one_line_refusals(env, version) -> None:
    with pytest.raises(PolicyError, match=r"version: Expected `int`") as ei:
        model.loads(env.toml(version), "p.toml")
    assert "\n" not in str(ei.value)
    with pytest.raises(PolicyError, match="version"):
        signing.sign_policy(env.toml(version), env.key, "k1")
    with pytest.raises(PolicyError, match="version"):
        env.lc.apply(env.toml(version, mode="audit"), "p.toml")
    assert env.lc.counter.get("web") is None


def test_max_version_signs_and_verifies(env) -> None:
    vp = signing.verify_envelope(env.signed(MAX), env.lc.trust)
    assert vp.policy.version == MAX


def test_sign_cli_2_64_is_one_line(env, tmp_path, capsys) -> None:
    src = tmp_path / "big.toml"
    src.write_bytes(env.toml(2**64))
    assert cli_main.main(["policy", "sign", str(src), "--key", str(env.tmp / "keys/k1.key")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "version" in err
    src.write_bytes(env.toml(1))
    for days in ("inf", "nan", "1e30", "-1"):  # 1 (sign refuses) or 2 (the CLI's number guard)
        assert cli_main.main(["policy", "sign", str(src), "--key", str(env.tmp / "keys/k1.key"),
                              "--expires-in", days]) in (1, 2)
        assert capsys.readouterr().err.count("\n") == 1
    for days in (float("inf"), float("nan"), 1e30, -1.0, 0.0):  # and sign_policy itself
        with pytest.raises(PolicyError, match="--expires-in"):
            signing.sign_policy(env.toml(1), env.key, "k1", expires_in_days=days)


def test_envelope_claiming_a_huge_version_is_refused(env) -> None:
    env_doc = json.loads(env.signed(1))
    env_doc["signature"]["policy_version"] = 2**64
    with pytest.raises(SignatureError):
        signing.verify_envelope(json.dumps(env_doc).encode(), env.lc.trust)


def test_audit_applies_do_not_move_the_counter(env) -> None:
    # unsigned audit at the top of the range on a fresh host: applied, counter untouched
    env.lc.apply(env.toml(MAX, mode="audit"), "audit-max")
    assert env.high_water() is None
    env.lc.apply(env.signed(1), "v1")
    assert env.high_water() == 1
    # a signed audit policy at the top of the range: applied, still does not block v2
    env.lc.apply(env.signed(MAX, "ab", mode="audit"), "signed-audit-max")
    assert env.high_water() == 1
    env.lc.apply(env.signed(2), "v2")
    assert env.high_water() == 2
    # an audit apply is still checked: an older version is refused
    with pytest.raises(SignatureError, match="older than v2"):
        env.lc.apply(env.signed(1, "b", mode="audit"), "old-audit")


def test_rollback_does_not_lower_the_counter(env) -> None:
    env.lc.apply(env.signed(1), "v1")
    env.lc.apply(env.signed(2, "ab"), "v2")
    env.lc.apply(env.signed(MAX, "abc", mode="audit"), "audit-max")
    rb = env.lc.rollback(to_version=2)
    assert rb.version == 2 and env.high_water() == 2
    rb = env.lc.rollback(to_version=1)
    assert rb.version == 1 and env.high_water() == 2
    with pytest.raises(SignatureError, match="older than v2"):
        env.lc.apply(env.signed(1, "b"), "replay")
    env.lc.apply(env.signed(2, "ab"), "v2 again")  # the identical v2: idempotent
    env.lc.apply(env.signed(3, "c"), "v3")
    assert env.high_water() == 3


def test_version_range_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "POLICY_LIFECYCLE.md").read_text()
    assert "9007199254740991" in doc and "only an enforce-mode apply" in doc.lower()


def test_recorded_generations_reads_only_what_was_appended(env) -> None:
    env.lc.apply(env.signed(1), "v1")
    assert set(env.log.recorded_generations()) == {1}
    env.lc.apply(env.signed(2, "ab"), "v2")  # another instance appended: seen
    assert set(env.log.recorded_generations()) == {1, 2}
    lines = env.log.path.read_bytes().splitlines(keepends=True)
    first_apply = next(i for i, ln in enumerate(lines) if b'"action":"apply"' in ln)
    env.log.path.write_bytes(b"".join(lines[:first_apply + 1]))
    assert set(env.log.recorded_generations()) == {1}  # truncated: parsed again
    env.log.path.unlink()
    assert env.log.recorded_generations() == {}


def test_unload_that_cannot_be_recorded_says_so(cli, capsys, monkeypatch) -> None:
    env = cli
    (env.tmp / "pins" / "links").mkdir(parents=True)
    (env.tmp / "pins" / "links" / "x").write_text("")
    blocker = env.tmp / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("AEGIS_STATE_DIR", str(blocker / "state"))  # cannot be created
    assert cli_main.main(["unload"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pins were removed, but the unload is not recorded" in err
    assert not (env.tmp / "pins").exists()
