"""Shared by the atheris harnesses: what counts as a crash.

A harness feeds one parser arbitrary bytes.  The parser may refuse them with an
:class:`~aegis_stream.errors.AegisError` (a one-line, named refusal: the contract); any other
exception, a hang (libFuzzer's -timeout) or running out of memory (-rss_limit_mb) is a crash
that libFuzzer saves under the artifact prefix and that becomes a regression test in
tests/unit/test_hostile_fuzz_regressions.py.  Each refusal's message must be one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from aegis_stream.errors import AegisError


def refusal_ok(fn: Callable[[bytes], object]) -> Callable[[bytes], None]:
    """Wrap a target so that a one-line AegisError is an accepted outcome."""

    def target(data: bytes) -> None:
        try:
            fn(data)
        except AegisError as exc:
            msg = str(exc)
            if "\n" in msg:
                raise AssertionError(f"refusal is not one line: {msg!r}") from None

    return target


def main(target: Callable[[bytes], None]) -> None:
    import atheris

    atheris.Setup(sys.argv, target)
    atheris.Fuzz()
