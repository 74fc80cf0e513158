"""Hand freed heap memory back to the kernel after a burst (glibc ``malloc_trim``).

An audit flood fills the pipeline's channels with large batches (raw records and encoded
JSON lines, a few MB each).  Once they are written, Python frees them, but glibc keeps
the freed pages in the heap, so the agent's RSS stays at its flood peak.  Trimming once
the burst has drained returns them: the steady-state RSS is then what the steady state
needs, not what the last flood needed.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_trim: Callable[[int], int] | None | bool = False  # False: not looked up yet


def _lookup() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def release_freed_memory() -> bool:
    """``malloc_trim(0)``: True when the C library gave memory back, False otherwise
    (nothing to give, or no glibc)."""
    global _trim
    if _trim is False:
        _trim = _lookup()
    if _trim is None or _trim is True:
        return False
    return bool(_trim(0))
