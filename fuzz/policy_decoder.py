"""atheris: the policy decoder (model.loads) on arbitrary bytes: a Policy or a one-line PolicyError."""

import atheris

with atheris.instrument_imports(include=["aegis_stream", "tomllib"]):
    from aegis_stream import inputs
    from aegis_stream.policy import model

from _harness import main, refusal_ok  # noqa: E402


def one(data: bytes) -> None:
    p = model.loads(data, "fuzz")
    assert len(p.rules) <= inputs.POLICY_RULES.value
    model.policy_digest(p)  # the canonical encoding of anything accepted works


if __name__ == "__main__":
    main(refusal_ok(one))
