"""atheris: ``aegis policy lint`` (no filesystem checks) never raises, and passes nothing apply refuses."""

import atheris

with atheris.instrument_imports(include=["aegis_stream", "tomllib"]):
    from aegis_stream.errors import PolicyError
    from aegis_stream.policy import lint, model

from _harness import main  # noqa: E402


def one(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    rep = lint.lint_text(text, "fuzz", critical={}, check_fs=False)
    for line in rep.render():
        assert "\n" not in line
    if not rep.errors:  # lint must never pass what apply refuses
        try:
            model.loads(text, "fuzz")
        except PolicyError as exc:
            raise AssertionError(f"lint passed what the decoder refuses: {exc}") from None


if __name__ == "__main__":
    main(one)
