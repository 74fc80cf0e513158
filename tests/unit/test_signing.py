"""Signed policy envelopes: canonical encoding, signature verification, key files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis_stream.errors import PolicyError, SignatureError
from aegis_stream.policy import model, signing
from aegis_stream.policy.trust import TrustStore

NOW = 1_800_000_000

POLICY = b"""apiVersion = "aegis/v1"
name = "web"
version = 3
mode = "enforce"

[[rules]]
id = "no-shell"
inode = "8:1:1234"
actions = ["exec"]
"""

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
fields = st.builds(
    signing.SignedFields,
    digest=st.binary(min_size=0, max_size=40),
    name=st.text(max_size=20),
    version=u64,
    issued_at=u64,
    expires_at=u64,
    key_id=st.text(max_size=20),
)


# --------------------------------------------------------------------------- encoding
@given(fields)
def test_encoding_roundtrips_so_it_is_injective(f: signing.SignedFields) -> None:
    dom, back = signing.decode_signed_bytes(signing.signed_bytes(f))
    assert dom == signing.DOMAIN
    assert back == f


@given(fields, fields)
def test_different_field_tuples_never_sign_the_same_bytes(
    a: signing.SignedFields, b: signing.SignedFields
) -> None:
    if a != b:
        assert signing.signed_bytes(a) != signing.signed_bytes(b)


@given(fields)
def test_domain_tag_is_part_of_the_signed_bytes(f: signing.SignedFields) -> None:
    assert signing.signed_bytes(f) != signing.signed_bytes(f, domain=b"some-other-protocol")
    assert signing.signed_bytes(f).startswith(len(signing.DOMAIN).to_bytes(4, "big") +
                                              signing.DOMAIN)


def _peer_signed_bytes(sha: str, version: int, ts: int, expires: int) -> bytes:
    # the peer's scheme: bare decimals joined without delimiters
    return f"{sha}{version}{ts}{expires}".encode()


def test_peer_encoding_is_ambiguous_ours_is_not() -> None:
    sha = hashlib.sha256(b"p").hexdigest()
    # version 12 issued at 3 vs version 1 issued at 23: the peer signs identical bytes
    assert _peer_signed_bytes(sha, 12, 3, 99) == _peer_signed_bytes(sha, 1, 23, 99)
    d = bytes.fromhex(sha)
    a = signing.SignedFields(d, "web", 12, 3, 99, "k")
    b = signing.SignedFields(d, "web", 1, 23, 99, "k")
    assert signing.signed_bytes(a) != signing.signed_bytes(b)


def test_u64_fields_refuse_out_of_range() -> None:
    with pytest.raises(ValueError):
        signing.signed_bytes(signing.SignedFields(b"", "n", -1, 0, 0, "k"))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def trust(tmp_path):
    return TrustStore(tmp_path / "state")


@pytest.fixture
def key(tmp_path, trust):
    k = signing.generate_keypair("ops-2026", tmp_path / "keys")
    trust.add(k.public_path.read_bytes(), now=NOW)
    priv, kid = signing.load_private_key(k.private_path)
    assert kid == "ops-2026"
    return priv


def _sign(key, *, now=NOW, days=30, key_id="ops-2026", domain=signing.DOMAIN, src=POLICY):
    return signing.sign_policy(src, key, key_id, now=now, expires_in_days=days, domain=domain)


def _edit(env: bytes, fn) -> bytes:
    doc = json.loads(env)
    fn(doc)
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------- verify
def test_sign_and_verify(key, trust) -> None:
    env = _sign(key)
    vp = signing.verify_envelope(env, trust, now=NOW + 10)
    assert vp.policy.name == "web" and vp.policy.version == 3
    assert vp.key_id == "ops-2026"
    assert vp.source == POLICY
    assert vp.digest == model.policy_digest(model.loads(POLICY))
    doc = json.loads(env)
    assert doc["format"] == signing.ENVELOPE_FORMAT
    assert doc["signature"]["expires_at"] == NOW + 30 * 86400


def test_comments_and_whitespace_do_not_change_the_signed_digest(key, trust) -> None:
    env = _edit(_sign(key), lambda d: d.update(policy="# reviewed\n" + d["policy"] + "\n\n"))
    assert signing.verify_envelope(env, trust, now=NOW).policy.version == 3


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda d: d.update(policy=d["policy"].replace("1234", "1235")), id="rule"),
        pytest.param(lambda d: d.update(policy=d["policy"].replace('"exec"', '"open"')),
                     id="action"),
        pytest.param(lambda d: d.update(policy=d["policy"].replace("enforce", "audit")),
                     id="mode"),
    ],
)
def test_tampered_policy_is_refused(key, trust, tamper) -> None:
    with pytest.raises(SignatureError, match="digest"):
        signing.verify_envelope(_edit(_sign(key), tamper), trust, now=NOW)


def test_tampered_policy_with_matching_metadata_still_fails_the_signature(key, trust) -> None:
    def tamper(d):
        d["policy"] = d["policy"].replace("1234", "1235")
        d["signature"]["policy_digest"] = model.policy_digest(model.loads(d["policy"]))

    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_envelope(_edit(_sign(key), tamper), trust, now=NOW)


def test_flipped_signature_byte_is_refused(key, trust) -> None:
    def tamper(d):
        sig = bytearray(base64.b64decode(d["signature"]["value"]))
        sig[7] ^= 1
        d["signature"]["value"] = base64.b64encode(bytes(sig)).decode()

    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_envelope(_edit(_sign(key), tamper), trust, now=NOW)


def test_every_single_byte_flip_of_the_envelope_is_refused(key, trust) -> None:
    env = _sign(key)
    for i in range(0, len(env), 7):
        bad = bytearray(env)
        bad[i] ^= 0x01
        try:
            vp = signing.verify_envelope(bytes(bad), trust, now=NOW)
        except PolicyError:
            continue
        # the only acceptable survivors are flips that do not change meaning (JSON whitespace)
        assert vp.digest == signing.verify_envelope(env, trust, now=NOW).digest
        assert json.loads(bytes(bad)) == json.loads(env)


def test_swapped_fields_are_refused(key, trust) -> None:
    def swap(d):
        s = d["signature"]
        s["issued_at"], s["expires_at"] = s["expires_at"], s["issued_at"]

    with pytest.raises(SignatureError):
        signing.verify_envelope(_edit(_sign(key), swap), trust, now=NOW)


def test_metadata_claiming_another_version_is_refused(key, trust) -> None:
    env = _edit(_sign(key), lambda d: d["signature"].update(policy_version=4))
    with pytest.raises(SignatureError, match="embedded policy is web v3"):
        signing.verify_envelope(env, trust, now=NOW)


def test_extended_expiry_is_refused(key, trust) -> None:
    env = _edit(_sign(key), lambda d: d["signature"].update(expires_at=NOW + 10 * 365 * 86400))
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_envelope(env, trust, now=NOW)


def test_expired_signature_is_refused(key, trust) -> None:
    env = _sign(key, days=1)
    signing.verify_envelope(env, trust, now=NOW + 86400 - 1)
    with pytest.raises(SignatureError, match="expired"):
        signing.verify_envelope(env, trust, now=NOW + 86400)


def test_signature_from_the_future_is_refused(key, trust) -> None:
    env = _sign(key, now=NOW + 3600)
    with pytest.raises(SignatureError, match="future"):
        signing.verify_envelope(env, trust, now=NOW)


def test_wrong_domain_is_refused(key, trust) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_envelope(_sign(key, domain=b"aegis-policy-signature-v0"), trust, now=NOW)


def test_revoked_key_is_refused(key, trust) -> None:
    env = _sign(key)
    trust.revoke("ops-2026", "laptop stolen", now=NOW + 1)
    with pytest.raises(SignatureError, match="revoked"):
        signing.verify_envelope(env, trust, now=NOW + 2)


def test_unknown_key_is_refused(tmp_path, trust) -> None:
    other = signing.generate_keypair("stranger", tmp_path / "k2")
    priv, _ = signing.load_private_key(other.private_path)
    with pytest.raises(SignatureError, match="not in the trust store"):
        signing.verify_envelope(_sign(priv, key_id="stranger"), trust, now=NOW)


def test_key_id_of_a_trusted_key_with_another_private_key_is_refused(tmp_path, key,
                                                                     trust) -> None:
    other = signing.generate_keypair("impostor", tmp_path / "k2")
    priv, _ = signing.load_private_key(other.private_path)
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify_envelope(_sign(priv, key_id="ops-2026"), trust, now=NOW)


def test_envelope_with_unknown_fields_is_refused(key, trust) -> None:
    env = _edit(_sign(key), lambda d: d.update(comment="hi"))
    with pytest.raises(SignatureError, match="not a signed policy envelope"):
        signing.verify_envelope(env, trust, now=NOW)


def test_sign_refuses_invalid_policy(key) -> None:
    with pytest.raises(PolicyError, match="version"):
        _sign(key, src=POLICY.replace(b"version = 3", b"version = 0"))


# --------------------------------------------------------------------------- key files
def test_generated_key_files(tmp_path) -> None:
    k = signing.generate_keypair("a-key", tmp_path)
    assert stat.S_IMODE(os.stat(k.private_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(k.public_path).st_mode) == 0o644
    assert k.public_path.read_bytes().startswith(b"aegis-key-id: a-key\n-----BEGIN PUBLIC KEY")
    with pytest.raises(PolicyError, match="refusing to overwrite"):
        signing.generate_keypair("a-key", tmp_path)


def test_bad_key_ids_are_refused(tmp_path) -> None:
    for bad in ("", "-x", "a b", "x" * 65):
        with pytest.raises(PolicyError, match="key id"):
            signing.generate_keypair(bad, tmp_path)
