"""Bytecode for the guest, compiled on the host.

The guest runs with ``PYTHONDONTWRITEBYTECODE=1`` (its writes would land in a throwaway
overlay anyway), so without ``.pyc`` files next to the sources every Python process in
the guest compiles every module it imports, under QEMU TCG, where Python runs ~50-70x
slower than natively.  The editable install leaves the repository's packages without
bytecode (site-packages has pip's).  Natively that compile is ~40% of an ``aegis`` CLI
start (0.38-0.45 s against 0.22-0.31 s); in the lab it is paid by every CLI call, agent
start and soak apply.  So before a boot, the host compiles the working tree's Python
packages into their ``__pycache__`` (gitignored), the way Python itself would: timestamp
pycs, which the guest reads through the 9p root and re-checks against the source's mtime
and size, so a stale one is never used.

pytest adds its own: it rewrites the asserts of test modules and conftests and caches the
rewritten code as ``__pycache__/<name>.cpython-311-pytest-<version>.pyc``, which it reads
even when it may not write.  Collecting ``tests/kernel`` natively takes 4.8 s of CPU
without that cache and 1.8 s with it, so a guest pytest spent minutes of TCG rewriting on
every boot.  :func:`prewrite_pytest` collects the command's test paths on the host first.
"""

from __future__ import annotations

import compileall
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# never descended into: virtual environments, results, build trees, caches
_SKIP = frozenset({"results", "build", "node_modules", "__pycache__"})


def precompile(root: str | Path) -> bool:
    """Compile the ``*.py`` files of the project at ``root`` (a directory with a
    ``pyproject.toml``; anything else is left alone) into ``__pycache__``.  Up-to-date
    pycs are kept (compileall reads 16 bytes each).  Returns False when a file did not
    compile (the guest then compiles it itself and reports the error where it is
    imported)."""
    top = Path(root)
    if not (top / "pyproject.toml").is_file():
        return True
    ok = True
    for entry in sorted(top.iterdir()):
        if entry.name.startswith(".") or entry.name in _SKIP or entry.is_symlink():
            continue
        if entry.is_dir():
            ok &= bool(compileall.compile_dir(str(entry), maxlevels=16, quiet=2, workers=1))
        elif entry.suffix == ".py":
            ok &= bool(compileall.compile_file(str(entry), quiet=2))
    return ok


def pytest_paths(argv: Sequence[str], cwd: str | Path) -> list[str] | None:
    """The test paths of a pytest command line (``pytest ...``, ``.../pytest ...`` or
    ``python -m pytest ...``): the arguments that name existing files or directories
    (``file::test`` ids by their file).  None when ``argv`` is not a pytest run."""
    if argv and Path(argv[0]).name == "pytest":
        rest = argv[1:]
    elif len(argv) >= 3 and list(argv[1:3]) == ["-m", "pytest"]:
        rest = argv[3:]
    else:
        return None
    found = []
    for a in rest:
        path = a.split("::", 1)[0]
        if path and not a.startswith("-") and (Path(cwd) / path).exists():
            found.append(path)
    return found


def prewrite_pytest(argv: Sequence[str], cwd: str | Path, timeout: float = 300.0) -> bool:
    """When ``argv`` runs pytest on some test paths: collect them on the host
    (``--collect-only``, which imports every test module and conftest and writes pytest's
    rewritten bytecode next to them).  Returns whether it ran and succeeded; a failure
    changes nothing (the guest rewrites for itself, and reports the error)."""
    paths = pytest_paths(argv, cwd)
    if not paths:
        return False
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            *paths], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0
