"""Hand freed heap memory back to the kernel after a burst (glibc ``malloc_trim``).

An audit flood fills the pipeline's channels with large batches (raw records and encoded
JSON lines, a few MB each).  Once they are written, Python frees them, but glibc keeps
the freed pages in the heap, so the agent's RSS stays at its flood peak.  Trimming once
the burst has drained returns them: the steady-state RSS is then what the steady state
needs, not what the last flood needed.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim``, or None where there is none (e.g. musl)."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: True when the C library gave memory back, False otherwise
    (nothing to give, or no glibc)."""
    trim = malloc_trim()
    return trim is not None and bool(trim(0))
