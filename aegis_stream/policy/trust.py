"""The trust store: which Ed25519 public keys may sign policies, and which are revoked.

Layout: ``<state dir>/keys/trust.json`` (0600, dir 0700), rewritten atomically::

    {"keys": {"<id>": {"public_key": "<base64 raw 32 bytes>", "fingerprint": "sha256:..",
                       "added_at": 1700000000, "expires_at": 0, "revoked_at": 0,
                       "revoke_reason": ""}},
     "revoked_fingerprints": {"sha256:..": "<reason>"}}

Several keys can be valid at once (rotation).  A revoked key stays listed (with its
reason) and its fingerprint is on the revocation list, so it can never be re-added under
another id.  Every change is recorded in the provenance log.
"""

from __future__ import annotations

import base64
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aegis_stream import inputs
from aegis_stream.errors import PolicyError, SignatureError, SignatureExpiredError, StateError
from aegis_stream.policy import signing
from aegis_stream.policy.provenance import ProvenanceLog
from aegis_stream.policy.store import atomic_write, private_dir, state_dir


class TrustedKey(msgspec.Struct):
    """One signing key in the trust file: the raw public key, its fingerprint and validity times."""
    public_key: str
    fingerprint: str
    added_at: int
    expires_at: int = 0  # 0 = no expiry
    revoked_at: int = 0
    revoke_reason: str = ""


class TrustFile(msgspec.Struct):
    """The trust file's content: keys by id and the fingerprints revoked for good."""
    keys: dict[str, TrustedKey] = msgspec.field(default_factory=dict)
    revoked_fingerprints: dict[str, str] = msgspec.field(default_factory=dict)


_dec = msgspec.json.Decoder(TrustFile)
_enc = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True)
class KeyStatus:
    """One key as ``aegis keys list`` shows it, with its status (valid, revoked or expired) now."""
    key_id: str
    fingerprint: str
    added_at: int
    expires_at: int
    revoked_at: int
    revoke_reason: str
    status: str  # valid | revoked | expired


class TrustStore(signing.KeyLookup):
    """Which Ed25519 keys may sign policies (``<state dir>/keys/trust.json``).  A file that others can
    write or another user owns is refused, not trusted; a revoked key's fingerprint stays on the
    revocation list so it cannot come back under another id.  :meth:`public_key` is what signature
    verification asks, and refuses unknown, revoked or expired keys.  Every change is logged to the
    provenance log."""

    def __init__(self, root: Path | str | None = None, *, log: ProvenanceLog | None = None):
        self.root = Path(root) if root else state_dir()
        self.dir = self.root / "keys"
        self.path = self.dir / "trust.json"
        self.log = log or ProvenanceLog(self.root)

    # ------------------------------------------------------------------ persistence
    def _load(self) -> TrustFile:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return TrustFile()
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateError(f"{self.path}: writable by group or others; refusing to trust it")
        if st.st_uid not in (0, os.geteuid()):
            raise StateError(f"{self.path}: owned by uid {st.st_uid}; refusing to trust it")
        try:
            return _dec.decode(inputs.read_bounded(self.path, inputs.TRUST_STORE_BYTES,
                                                   "trust store", StateError))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateError(f"{self.path}: corrupt trust store: {exc}") from None

    def _save(self, tf: TrustFile) -> None:
        try:
            private_dir(self.dir)
            atomic_write(self.path, msgspec.json.format(_enc.encode(tf), indent=2) + b"\n")
            os.chmod(self.path, 0o600)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot write trust store: {exc.strerror}") from None

    # ------------------------------------------------------------------ queries
    def list(self, *, now: float | None = None) -> list[KeyStatus]:
        now = time.time() if now is None else now
        out = []
        for kid, k in sorted(self._load().keys.items()):
            status = "valid"
            if k.revoked_at:
                status = "revoked"
            elif k.expires_at and now >= k.expires_at:
                status = "expired"
            out.append(KeyStatus(kid, k.fingerprint, k.added_at, k.expires_at, k.revoked_at,
                                 k.revoke_reason, status))
        return out

    def public_key(self, key_id: str, *, now: float) -> Ed25519PublicKey:
        tf = self._load()
        k = tf.keys.get(key_id)
        if k is None:
            raise SignatureError(f"key {key_id!r} is not in the trust store ({self.path})")
        if k.revoked_at or k.fingerprint in tf.revoked_fingerprints:
            reason = k.revoke_reason or tf.revoked_fingerprints.get(k.fingerprint, "")
            raise SignatureError(f"key {key_id!r} is revoked ({reason})")
        if k.expires_at and now >= k.expires_at:
            raise SignatureExpiredError(f"key {key_id!r} expired at {signing._iso(k.expires_at)}")
        return signing.public_from_raw(base64.b64decode(k.public_key))

    # ------------------------------------------------------------------ changes
    def add(
        self, pem: bytes, key_id: str = "", *, expires_in_days: float = 0, source: str = "key",
        now: float | None = None,
    ) -> KeyStatus:
        now = time.time() if now is None else now
        pub, file_id = signing.load_public_key_bytes(pem, source)
        if key_id and file_id and key_id != file_id:
            raise PolicyError(f"{source}: file says key id {file_id!r}, --id says {key_id!r}")
        key_id = signing._check_key_id(key_id or file_id or "")  # "" is refused
        fp = signing.fingerprint(pub)
        tf = self._load()
        try:
            if fp in tf.revoked_fingerprints:
                raise SignatureError(f"key {fp} was revoked ({tf.revoked_fingerprints[fp]}); "
                                     "a revoked key can never be trusted again")
            if key_id in tf.keys:
                raise PolicyError(f"key id {key_id!r} is already in the trust store")
            for other, k in tf.keys.items():
                if k.fingerprint == fp:
                    raise PolicyError(f"this key is already trusted as {other!r}")
        except PolicyError as exc:
            self.log.append("key-add", result="refused", reason=str(exc), key_id=key_id,
                            fingerprint=fp)
            raise
        tf.keys[key_id] = TrustedKey(
            base64.b64encode(signing.public_raw(pub)).decode(), fp, int(now),
            int(now + expires_in_days * 86400) if expires_in_days > 0 else 0,
        )
        self._save(tf)
        self.log.append("key-add", key_id=key_id, fingerprint=fp,
                        key_expires_at=tf.keys[key_id].expires_at)
        return next(s for s in self.list(now=now) if s.key_id == key_id)

    def revoke(self, key_id: str, reason: str, *, now: float | None = None) -> KeyStatus:
        now = time.time() if now is None else now
        if not reason.strip():
            raise PolicyError("revoking a key needs --reason")
        tf = self._load()
        k = tf.keys.get(key_id)
        if k is None:
            self.log.append("key-revoke", result="refused", reason=f"unknown key {key_id!r}",
                            key_id=key_id)
            raise PolicyError(f"key {key_id!r} is not in the trust store")
        if k.revoked_at:
            raise PolicyError(f"key {key_id!r} is already revoked ({k.revoke_reason})")
        k.revoked_at = int(now)
        k.revoke_reason = reason
        tf.revoked_fingerprints[k.fingerprint] = reason
        self._save(tf)
        self.log.append("key-revoke", reason=reason, key_id=key_id, fingerprint=k.fingerprint)
        return next(s for s in self.list(now=now) if s.key_id == key_id)
