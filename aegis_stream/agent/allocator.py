"""The agent runs on the C library's allocator (``PYTHONMALLOC=malloc``), not pymalloc.

Why: after an audit flood the agent's memory must come back down.  pymalloc serves small
objects from 1 MiB arenas and returns an arena to the kernel only once every object in it
is free; a flood interleaves millions of short-lived objects with a few long-lived ones
(cache entries, metric samples, trio's own), so the arenas it grew stay resident, pinned
by a handful of survivors.  glibc's ``malloc_trim`` (run by the ticker after each burst,
:mod:`aegis_stream.pipeline.memtrim`) returns every free page wherever it sits, so on the C
allocator the same survivors pin pages, not arenas.  Measured natively on the agent's real
pipeline (``python -m soak.memgrowth --allocators pymalloc,malloc``, docs/PERFORMANCE.md):
one flood leaves +10.8 MB of anonymous memory behind on pymalloc and +1.8 MB on malloc;
the cost is ~5-10 % of the pipeline's per-event throughput, far above what a host offers.

The allocator is chosen when the interpreter starts, so a process that did not start with
it re-executes itself once (same pid, file descriptors and environment, plus
``PYTHONMALLOC``).  The unit sets the variable, so under systemd there is no re-exec.  An
operator's own ``PYTHONMALLOC`` (``pymalloc`` included) is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

VARIABLE = "PYTHONMALLOC"
WANTED = "malloc"
# what the interpreter was started with: PYTHONMALLOC is read once, at start-up
STARTED_WITH = os.environ.get(VARIABLE)


def allocator() -> str:
    """The allocator this interpreter runs on, as ``PYTHONMALLOC`` names it."""
    return STARTED_WITH or "pymalloc"


def reexec_on_c_malloc(argv: Sequence[str] | None = None,
                       execv: Callable[[str, list[str]], object] | None = None) -> bool:
    """Re-execute this process on the C allocator unless ``PYTHONMALLOC`` was set.

    ``argv`` is the interpreter's full command line (default :data:`sys.orig_argv`, options
    such as ``-X`` included).  Returns False when nothing was done (the variable was set, or
    the command line is unknown); on success it does not return.  A failed exec leaves the
    process as it was, on pymalloc, and returns False: memory is not worth refusing to run.
    """
    if STARTED_WITH is not None or VARIABLE in os.environ:
        return False
    cmd = list(sys.orig_argv if argv is None else argv)
    if not cmd or not sys.executable:
        return False
    os.environ[VARIABLE] = WANTED
    try:
        (execv or os.execv)(sys.executable, cmd)
    except OSError:
        del os.environ[VARIABLE]
        return False
    return True  # only an injected execv returns
