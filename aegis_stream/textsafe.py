"""Terminal-safe text: what every human-readable output of ``aegis`` goes through.

Process names, paths, cgroup paths, rule ids, hosts and reasons reach the operator's
terminal from places an attacker controls (a process can name itself anything; a file or
cgroup can be created with any bytes but ``/`` and NUL in its name).  Written raw, a newline
forges a line of output and an escape sequence (``ESC ]``, ``ESC [``, the 8-bit ``CSI``)
retitles, recolours or rewrites the terminal.  :func:`escape` makes such text inert:

- C0 controls (``\\x00``-``\\x1f``, newline and tab included), DEL and the C1 controls
  (``\\x80``-``\\x9f``) become ``\\xNN``;
- the Unicode format characters that reorder or hide text (bidi embeddings, overrides and
  isolates, zero-width characters, the line and paragraph separators, BOM) become ``\\uNNNN``;
- a backslash becomes ``\\\\``, so the escaped form is unambiguous: a name spelled
  ``a\\nb`` and a name with a real newline print differently.

Printable text, non-ASCII letters included, is unchanged.  Escape each line *before* it is
joined to the next (:func:`join`, :func:`echo`): the separators between lines are the only
newlines that reach the terminal.  JSON output is never escaped here: it is exact, and the
JSON encoder escapes C0 controls itself.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import TextIO

# C0 controls, DEL, C1 controls, the Unicode format characters that reorder or hide text
# on a terminal (ALM, zero-width space/joiners, LRM/RLM, bidi embeddings/overrides/
# isolates, word joiner and invisible operators, BOM), the line/paragraph separators, and
# the backslash itself
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060-\u2069\ufeff\\\\]"
)


def _esc(m: re.Match[str]) -> str:
    c = m.group(0)
    if c == "\\":
        return "\\\\"
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape(text: object) -> str:
    """``text`` (``str()`` of it) safe to write to a terminal as part of one line."""
    s = str(text)
    return _UNSAFE.sub(_esc, s) if _UNSAFE.search(s) else s


def join(lines: Iterable[object]) -> str:
    """Each line escaped, then joined with newlines: one output line per element."""
    return "\n".join(escape(line) for line in lines)


def echo(*lines: object, file: TextIO | None = None) -> None:
    """Print each argument as one escaped line (``print`` for human output)."""
    out = sys.stdout if file is None else file
    for line in lines:
        print(escape(line), file=out)
