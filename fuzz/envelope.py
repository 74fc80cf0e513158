"""atheris: the signed-envelope verifier against a trust store of one fixed key."""

import atheris

with atheris.instrument_imports(include=["aegis_stream", "tomllib"]):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from aegis_stream.errors import SignatureError
    from aegis_stream.policy import signing

from _harness import main, refusal_ok  # noqa: E402

_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


class _OneKey(signing.KeyLookup):
    def public_key(self, key_id: str, *, now: float):
        if key_id != "fz":
            raise SignatureError(f"unknown key {key_id!r}")
        return _KEY.public_key()


def one(data: bytes) -> None:
    signing.verify_envelope(data, _OneKey(), now=1_700_000_100, source="fuzz")


if __name__ == "__main__":
    main(refusal_ok(one))
