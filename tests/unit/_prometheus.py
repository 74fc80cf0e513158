"""Shared by the Prometheus tests: find promtool / prometheus (absent: skip, but fail under
CI=true, where scripts/setup installed them), and scrape a running pipeline's endpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from aegis_stream.policy.store import PolicyStore


def tool(name: str, package: str = "prometheus") -> str:
    """The path of a binary from a Debian package (default ``prometheus``): a skip when it is
    absent on a developer machine, a failure under ``CI=true`` (scripts/setup installs it)."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} not installed (apt-get install {package}; scripts/setup does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}, and CI=true")
        pytest.skip(why)
    return path


def need_module(name: str) -> None:
    """Import ``name`` or skip (fail under ``CI=true``: scripts/setup installs the extras)."""
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        why = f"{name} not installed (pip install -e '.[dashboards]'; scripts/setup does)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}, and CI=true")
        pytest.skip(why)


async def http_get(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """One plain HTTP/1.1 GET on a trio socket: (head, body)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def signed_policy_world(kernel: object, tmp_path: Path) -> PolicyStore:
    """The fake kernel's policy as an operator leaves it: signed generations applied through
    the real Lifecycle (trust store, envelopes, provenance log), one canary that failed and
    was rolled back, then one that passed.  Returns the store (the state dir)."""
    from aegis_stream.policy import signing
    from aegis_stream.policy.lifecycle import Lifecycle

    files = tmp_path / "protected"
    files.mkdir()
    for n in "abc":
        (files / n).write_text(n)
    k = signing.generate_keypair("ops-2026", tmp_path / "keys")
    key, _ = signing.load_private_key(k.private_path)
    lc = Lifecycle(kernel.policy_maps, tmp_path / "state")  # type: ignore[attr-defined]
    lc.trust.add(k.public_path.read_bytes())

    def signed(version: int, names: str) -> bytes:
        rules = "".join(f'[[rules]]\nid = "r-{n}"\npath = "{files / n}"\n\n' for n in names)
        src = f'apiVersion = "aegis/v1"\nname = "web"\nversion = {version}\nmode = "enforce"\n\n{rules}'
        return signing.sign_policy(src.encode(), key, "ops-2026")

    lc.apply(signed(1, "a"))
    hot = iter([{}, {(0, "file_open"): 500}])
    assert not lc.apply_with_canary(signed(2, "ab"), canary_seconds=10, max_deny_rate=1.0,
                                    read_denies=lambda g: next(hot), sleep=lambda s: None).passed
    assert lc.apply_with_canary(signed(3, "abc"), canary_seconds=10, max_deny_rate=1.0,
                                read_denies=lambda g: {}, sleep=lambda s: None).passed
    return lc.store
