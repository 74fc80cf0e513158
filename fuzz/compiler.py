"""atheris: decoder + compiler (paths resolved on this host, read-only: O_PATH opens and stats)."""

import atheris

with atheris.instrument_imports(include=["aegis_stream", "tomllib"]):
    from aegis_stream.policy import compiler, model

from _harness import main, refusal_ok  # noqa: E402


def one(data: bytes) -> None:
    compiler.compile_policy(model.loads(data, "fuzz"))


if __name__ == "__main__":
    main(refusal_ok(one))
