"""Signed policy envelopes: domain-separated Ed25519 over a length-delimited structure.

What is signed (``signed_bytes``) is, in order, each item as ``u32 big-endian length ||
bytes``::

    "aegis-policy-signature-v1"          domain tag
    sha256(model.canonical_bytes(p))     32 raw bytes
    policy name                          UTF-8
    policy version                       u64 big-endian (8 bytes)
    issued_at                            u64 big-endian, Unix seconds
    expires_at                           u64 big-endian, Unix seconds
    key id                               UTF-8

A fixed number of length-prefixed items is uniquely decodable (``decode_signed_bytes``
inverts it), so two different field tuples never sign the same bytes.  The domain tag
keeps an aegis policy signature from being valid for anything else signed with the
same key, and vice versa.

The envelope (``*.signed``) is JSON::

    {"format": "aegis.signed-policy.v1",
     "policy": "<the policy TOML source, verbatim>",
     "signature": {"algorithm": "ed25519", "key_id": "...", "policy_name": "...",
                   "policy_version": 3, "policy_digest": "sha256:<hex>",
                   "issued_at": 1700000000, "expires_at": 1707776000,
                   "value": "<base64 signature>"}}

Verification never trusts the metadata: name, version and digest are recomputed from the
embedded TOML, checked against the metadata, and the signature is verified over the
recomputed values.  Private keys are PKCS#8 PEM, public keys SubjectPublicKeyInfo PEM,
each preceded by one ``aegis-key-id: ID`` line (PEM parsers ignore text before BEGIN).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aegis_stream import inputs, textsafe
from aegis_stream.errors import PolicyError, SignatureError, SignatureExpiredError
from aegis_stream.policy import model

DOMAIN = b"aegis-policy-signature-v1"
ENVELOPE_FORMAT: Final = "aegis.signed-policy.v1"
KEY_ID_PREFIX = "aegis-key-id:"
DEFAULT_EXPIRES_DAYS = 90
MAX_EXPIRES_DAYS = 36_500  # a century: issued_at + lifetime always fits the u64 it is signed as
CLOCK_SKEW_S = 300  # a signature "issued" this far in the future is still accepted
_U64_MAX = (1 << 64) - 1
_KEY_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


# --------------------------------------------------------------------- canonical encoding
@dataclass(frozen=True)
class SignedFields:
    """The fields a signature covers, in the order :func:`signed_bytes` encodes them; decoding the signed
    bytes gives them back, so two different tuples never sign the same bytes."""
    digest: bytes  # 32 raw bytes: sha256(model.canonical_bytes(policy))
    name: str
    version: int
    issued_at: int
    expires_at: int
    key_id: str


def _lp(b: bytes) -> bytes:
    if len(b) > 0xFFFFFFFF:
        raise ValueError("field too long for a u32 length prefix")
    return struct.pack(">I", len(b)) + b


def _u64(v: int) -> bytes:
    if not 0 <= v <= _U64_MAX:
        raise ValueError(f"{v} does not fit a u64")
    return struct.pack(">Q", v)


def signed_bytes(f: SignedFields, *, domain: bytes = DOMAIN) -> bytes:
    """The exact bytes an aegis policy signature covers."""
    return b"".join(
        (
            _lp(domain),
            _lp(f.digest),
            _lp(f.name.encode()),
            _lp(_u64(f.version)),
            _lp(_u64(f.issued_at)),
            _lp(_u64(f.expires_at)),
            _lp(f.key_id.encode()),
        )
    )


def decode_signed_bytes(data: bytes) -> tuple[bytes, SignedFields]:
    """Inverse of :func:`signed_bytes` (the proof that the encoding is injective)."""
    items: list[bytes] = []
    off = 0
    for _ in range(7):
        if off + 4 > len(data):
            raise ValueError("truncated")
        (n,) = struct.unpack_from(">I", data, off)
        off += 4
        if off + n > len(data):
            raise ValueError("truncated")
        items.append(data[off : off + n])
        off += n
    if off != len(data):
        raise ValueError("trailing bytes")
    dom, digest, name, ver, iss, exp, kid = items
    for raw in (ver, iss, exp):
        if len(raw) != 8:
            raise ValueError("integer field is not 8 bytes")
    return dom, SignedFields(
        digest,
        name.decode(),
        struct.unpack(">Q", ver)[0],
        struct.unpack(">Q", iss)[0],
        struct.unpack(">Q", exp)[0],
        kid.decode(),
    )


def policy_sha256(policy: model.Policy) -> bytes:
    return hashlib.sha256(model.canonical_bytes(policy)).digest()


# --------------------------------------------------------------------------- key files
def _check_key_id(key_id: str) -> str:
    import re

    if not re.match(_KEY_ID_RE, key_id):
        raise PolicyError(
            f"key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-' (not starting with "
            "a symbol)"
        )
    return key_id


def public_raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(pub: Ed25519PublicKey) -> str:
    return "sha256:" + hashlib.sha256(public_raw(pub)).hexdigest()


def _key_id_line(text: bytes) -> str:
    for line in text.splitlines():
        s = line.decode(errors="replace").strip()
        if s.startswith(KEY_ID_PREFIX):
            return s[len(KEY_ID_PREFIX) :].strip()
        if s.startswith("-----BEGIN"):
            break
    return ""


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise PolicyError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # umask must not widen or narrow what we promise
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class GeneratedKey:
    """A keypair written by :func:`generate_keypair`: its id, the two PEM files and the fingerprint."""
    key_id: str
    private_path: Path
    public_path: Path
    fingerprint: str


def generate_keypair(key_id: str, out_dir: Path | str) -> GeneratedKey:
    """Write ``ID.key`` (0600, PKCS#8 PEM) and ``ID.pub`` (0644) into ``out_dir``."""
    _check_key_id(key_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    header = f"{KEY_ID_PREFIX} {key_id}\n".encode()
    priv = header + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = header + key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    priv_path, pub_path = out / f"{key_id}.key", out / f"{key_id}.pub"
    if pub_path.exists():
        raise PolicyError(f"{pub_path}: already exists; refusing to overwrite a key")
    _create_exclusive(priv_path, priv, 0o600)
    _create_exclusive(pub_path, pub, 0o644)
    return GeneratedKey(key_id, priv_path, pub_path, fingerprint(key.public_key()))


def load_private_key(path: Path | str) -> tuple[Ed25519PrivateKey, str]:
    """(key, key id from the file's ``aegis-key-id:`` line, or "")."""
    p = Path(path)
    data = inputs.read_bounded(p, inputs.KEY_FILE_BYTES, "private key", PolicyError)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"{p}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PolicyError(f"{p}: not an Ed25519 key")
    return key, _key_id_line(data)


def load_public_key_bytes(data: bytes, source: str) -> tuple[Ed25519PublicKey, str]:
    inputs.check_bytes(data, inputs.KEY_FILE_BYTES, source)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"{source}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PolicyError(f"{source}: not an Ed25519 public key")
    return key, _key_id_line(data)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


# ---------------------------------------------------------------------------- envelope
class SignatureMeta(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The signature block of an envelope.  Its name, version and digest are claims only: verification
    recomputes them from the embedded policy and refuses a mismatch."""
    algorithm: Literal["ed25519"]
    key_id: str
    policy_name: str
    policy_version: Annotated[int, msgspec.Meta(ge=1, le=model.MAX_VERSION)]
    policy_digest: str
    issued_at: int
    expires_at: int
    value: str


class Envelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signed policy (``*.signed``): the policy TOML verbatim and its :class:`SignatureMeta`."""
    format: Literal["aegis.signed-policy.v1"]
    policy: str
    signature: SignatureMeta


_env_dec = msgspec.json.Decoder(Envelope)
_env_enc = msgspec.json.Encoder(order="sorted")


def is_envelope(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"


def parse_envelope(data: bytes, source: str = "envelope") -> Envelope:
    inputs.check_bytes(data, inputs.ENVELOPE_BYTES, source, SignatureError)
    try:
        env = _env_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # the message quotes the envelope's own text (an unknown key): one line, escaped
        raise SignatureError(f"{source}: not a signed policy envelope: "
                             f"{textsafe.escape(exc)}") from None
    meta = env.signature  # quoted in refusals below: printable text only (fuzz/envelope.py)
    for name in ("key_id", "policy_name", "policy_digest", "value"):
        if not getattr(meta, name).isprintable():
            raise SignatureError(f"{source}: signature.{name}: not printable text")
    return env


def encode_envelope(env: Envelope) -> bytes:
    return msgspec.json.format(_env_enc.encode(env), indent=2) + b"\n"


def sign_policy(
    source: bytes,
    key: Ed25519PrivateKey,
    key_id: str,
    *,
    now: float | None = None,
    expires_in_days: float = DEFAULT_EXPIRES_DAYS,
    source_name: str = "policy",
    domain: bytes = DOMAIN,
) -> bytes:
    """Validate the policy TOML, sign it, return the envelope bytes."""
    _check_key_id(key_id)
    try:
        text = source.decode()
    except UnicodeDecodeError:
        raise PolicyError(f"{source_name}: policy is not UTF-8") from None
    policy = model.loads(source, source_name)  # refuses a version outside 1..MAX_VERSION
    if not (math.isfinite(expires_in_days) and 0 < expires_in_days <= MAX_EXPIRES_DAYS):
        raise PolicyError(f"--expires-in must be a number of days in (0, {MAX_EXPIRES_DAYS}]")
    issued = int(now if now is not None else time.time())
    expires = issued + int(expires_in_days * 86400)
    fields = SignedFields(
        policy_sha256(policy), policy.name, policy.version, issued, expires, key_id
    )
    try:
        msg = signed_bytes(fields, domain=domain)
    except ValueError as exc:  # a field that does not fit its encoding: one line, no traceback
        raise PolicyError(f"{source_name}: cannot sign: {exc}") from None
    sig = key.sign(msg)
    env = Envelope(
        ENVELOPE_FORMAT,
        text,
        SignatureMeta(
            "ed25519",
            key_id,
            policy.name,
            policy.version,
            model.policy_digest(policy),
            issued,
            expires,
            base64.b64encode(sig).decode(),
        ),
    )
    return encode_envelope(env)


@dataclass(frozen=True)
class VerifiedPolicy:
    """A policy whose envelope verified against the trust store: the parsed policy, its source bytes and
    the key and validity window it was signed with."""
    policy: model.Policy
    source: bytes  # the policy TOML
    key_id: str
    issued_at: int
    expires_at: int
    digest: str


class KeyLookup:
    """What verification needs from a trust store (see trust.TrustStore.public_key)."""

    def public_key(self, key_id: str, *, now: float) -> Ed25519PublicKey:  # pragma: no cover
        raise NotImplementedError


def verify_envelope(
    data: bytes, keys: KeyLookup, *, now: float | None = None, source: str = "envelope"
) -> VerifiedPolicy:
    """Verify an envelope against trusted keys; every failure is a SignatureError."""
    now = time.time() if now is None else now
    env = parse_envelope(data, source)
    meta = env.signature
    policy = model.loads(env.policy.encode(), f"{source}: policy")
    digest = model.policy_digest(policy)
    if meta.policy_digest != digest:
        raise SignatureError(f"{source}: policy digest {meta.policy_digest} does not match the "
                             f"embedded policy ({digest})")
    if meta.policy_name != policy.name or meta.policy_version != policy.version:
        raise SignatureError(
            f"{source}: signature metadata names {meta.policy_name} v{meta.policy_version}, "
            f"the embedded policy is {policy.name} v{policy.version}"
        )
    try:
        sig = base64.b64decode(meta.value, validate=True)
        fields = SignedFields(
            policy_sha256(policy), policy.name, policy.version,
            meta.issued_at, meta.expires_at, meta.key_id,
        )
        msg = signed_bytes(fields)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{source}: malformed signature: {exc}") from None
    pub = keys.public_key(meta.key_id, now=now)  # raises for unknown/revoked/expired keys
    try:
        pub.verify(sig, msg)
    except InvalidSignature:
        raise SignatureError(
            f"{source}: signature by key {meta.key_id!r} does not verify (policy or "
            "signature fields were altered, or a different key signed it)"
        ) from None
    if meta.expires_at <= meta.issued_at:
        raise SignatureError(f"{source}: signature expires before it was issued")
    if meta.issued_at > now + CLOCK_SKEW_S:
        raise SignatureExpiredError(f"{source}: signature issued in the future ({meta.issued_at})")
    if now >= meta.expires_at:
        raise SignatureExpiredError(
            f"{source}: signature by {meta.key_id!r} expired at {_iso(meta.expires_at)}; re-sign"
        )
    return VerifiedPolicy(
        policy, env.policy.encode(), meta.key_id, meta.issued_at, meta.expires_at, digest
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
