"""atheris: ``aegis explain -`` on arbitrary stdin, against a fixed generation record."""

import io

import atheris

with atheris.instrument_imports(include=["aegis_stream", "tomllib"]):
    from aegis_stream.agent import explain as explain_cli
    from aegis_stream.pipeline.normalise import GenerationInfo
    from aegis_stream.policy import compiler, model
    from aegis_stream.policy.store import GenerationRecord
    from aegis_stream.processors.explain import explain

from _harness import main, refusal_ok  # noqa: E402

_POLICY = model.loads(
    'apiVersion = "aegis/v1"\nname = "fz"\nversion = 1\n'
    '[[rules]]\nid = "a"\ninode = "8:1:12"\n[[rules]]\nid = "b"\ninode = "8:1:13"\nactions = ["exec"]\n'
)
_INFO = GenerationInfo(GenerationRecord(1, 1.0, compiler.compile_policy(_POLICY)), "fz.toml",
                       "/state/generations/1.json")


def one(data: bytes) -> None:
    ev = explain_cli.read_event(io.BytesIO(data))
    x = explain(ev, _INFO if ev.generation == 1 else None)
    for line in explain_cli.render(x).splitlines():
        assert line  # every line rendered; attacker text escaped into one line each


if __name__ == "__main__":
    main(refusal_ok(one))
