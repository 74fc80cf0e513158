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
"""

from __future__ import annotations

import compileall
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
