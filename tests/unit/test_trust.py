"""Trust store: several valid keys (rotation), revocation, expiry, provenance of changes."""

from __future__ import annotations

import os
import stat

import pytest

from aegis_stream.errors import PolicyError, SignatureError, StateError
from aegis_stream.policy import signing
from aegis_stream.policy.trust import TrustStore

NOW = 1_800_000_000
POLICY = b'apiVersion = "aegis/v1"\nname = "p"\nversion = 1\n\n[[rules]]\nid = "r"\n' \
         b'inode = "8:1:5"\n'


@pytest.fixture
def ts(tmp_path):
    return TrustStore(tmp_path / "state")


def _key(tmp_path, kid):
    k = signing.generate_keypair(kid, tmp_path / "keys")
    return k, signing.load_private_key(k.private_path)[0]


def test_add_list_and_file_permissions(tmp_path, ts) -> None:
    k, _ = _key(tmp_path, "a")
    st = ts.add(k.public_path.read_bytes(), now=NOW)
    assert st.key_id == "a" and st.status == "valid" and st.fingerprint == k.fingerprint
    assert [s.key_id for s in ts.list(now=NOW)] == ["a"]
    assert stat.S_IMODE(os.stat(ts.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ts.dir).st_mode) == 0o700


def test_rotation_two_keys_valid_then_old_one_revoked(tmp_path, ts) -> None:
    old, old_priv = _key(tmp_path, "2025")
    new, new_priv = _key(tmp_path, "2026")
    ts.add(old.public_path.read_bytes(), now=NOW)
    ts.add(new.public_path.read_bytes(), now=NOW)
    e_old = signing.sign_policy(POLICY, old_priv, "2025", now=NOW)
    e_new = signing.sign_policy(POLICY, new_priv, "2026", now=NOW)
    signing.verify_envelope(e_old, ts, now=NOW)
    signing.verify_envelope(e_new, ts, now=NOW)
    ts.revoke("2025", "rotated out", now=NOW + 5)
    with pytest.raises(SignatureError, match="revoked"):
        signing.verify_envelope(e_old, ts, now=NOW + 6)
    signing.verify_envelope(e_new, ts, now=NOW + 6)
    assert {s.key_id: s.status for s in ts.list(now=NOW + 6)} == {"2025": "revoked",
                                                                   "2026": "valid"}


def test_revoked_key_cannot_come_back_under_another_id(tmp_path, ts) -> None:
    k, _ = _key(tmp_path, "a")
    ts.add(k.public_path.read_bytes(), now=NOW)
    ts.revoke("a", "compromised", now=NOW)
    with pytest.raises(SignatureError, match="revoked"):
        ts.add(k.public_path.read_bytes().split(b"\n", 1)[1], "b", now=NOW)


def test_duplicates_and_id_mismatch_refused(tmp_path, ts) -> None:
    k, _ = _key(tmp_path, "a")
    ts.add(k.public_path.read_bytes(), now=NOW)
    with pytest.raises(PolicyError, match="already trusted as 'a'"):
        ts.add(k.public_path.read_bytes().split(b"\n", 1)[1], "c", now=NOW)
    with pytest.raises(PolicyError, match="--id says"):
        ts.add(k.public_path.read_bytes(), "other", now=NOW)
    k2, _ = _key(tmp_path, "b")
    with pytest.raises(PolicyError, match="already in the trust store"):
        ts.add(k2.public_path.read_bytes().split(b"\n", 1)[1], "a", now=NOW)


def test_key_expiry(tmp_path, ts) -> None:
    k, priv = _key(tmp_path, "short")
    ts.add(k.public_path.read_bytes(), expires_in_days=1, now=NOW)
    env = signing.sign_policy(POLICY, priv, "short", now=NOW, expires_in_days=30)
    signing.verify_envelope(env, ts, now=NOW + 100)
    with pytest.raises(SignatureError, match="key 'short' expired"):
        signing.verify_envelope(env, ts, now=NOW + 86400)
    assert ts.list(now=NOW + 86400)[0].status == "expired"


def test_every_key_change_is_in_provenance(tmp_path, ts) -> None:
    k, _ = _key(tmp_path, "a")
    ts.add(k.public_path.read_bytes(), now=NOW)
    with pytest.raises(PolicyError):
        ts.add(k.public_path.read_bytes(), now=NOW)
    ts.revoke("a", "drill", now=NOW)
    recs = list(ts.log.records())
    assert [(r["action"], r["result"]) for r in recs] == [
        ("key-add", "ok"), ("key-add", "refused"), ("key-revoke", "ok")]
    assert recs[2]["reason"] == "drill" and recs[2]["fingerprint"] == k.fingerprint
    assert ts.log.verify().ok


def test_revoke_needs_reason_and_known_key(ts) -> None:
    with pytest.raises(PolicyError, match="reason"):
        ts.revoke("a", " ")
    with pytest.raises(PolicyError, match="not in the trust store"):
        ts.revoke("a", "x")


def test_group_writable_trust_store_is_not_trusted(tmp_path, ts) -> None:
    k, _ = _key(tmp_path, "a")
    ts.add(k.public_path.read_bytes(), now=NOW)
    os.chmod(ts.path, 0o620)
    with pytest.raises(StateError, match="writable by group"):
        ts.public_key("a", now=NOW)


def test_corrupt_trust_store_fails_closed(ts) -> None:
    ts.dir.mkdir(parents=True)
    ts.path.write_text("{not json")
    os.chmod(ts.path, 0o600)
    with pytest.raises(StateError, match="corrupt"):
        ts.public_key("a", now=NOW)
