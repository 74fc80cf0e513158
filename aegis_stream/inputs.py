"""Hostile input: every limit on what ``aegis`` reads, in one place, and the bounded readers.

Everything ``aegis`` reads from outside (policy files, signed envelopes, key files, the trust
store, the status file, generation records, event logs, stdin, command-line arguments) is
checked for size and shape **before** any work is done on it, and refused in one line that
names the limit and the field.  docs/INPUT_LIMITS.md lists each surface, its limit and the test
that proves the refusal.

:func:`read_bounded` is the one way a file is read: it opens with ``O_NONBLOCK`` (a FIFO with
no writer must not hang the open), refuses anything that is not a regular file (FIFOs,
character devices such as ``/dev/zero``, directories, sockets) and anything larger than the
surface's limit, both from ``fstat`` before a byte is read, and reads at most limit + 1 bytes
(a file that grows while it is read cannot slip past the limit).

:func:`check_policy_shape` scans a policy's TOML text once, with one regular expression, before
the TOML parser sees it: nesting depth (``tomllib`` recurses per level, so a few thousand
nested arrays end in ``RecursionError``) and the number of ``[[rules]]`` / ``[[scope]]`` tables
(a 100,000-rule policy is refused in milliseconds, not after a minute of parsing).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from typing import Final

import msgspec

from aegis_stream.errors import AegisError, PolicyError
from aegis_stream.kernel import abi

KiB: Final = 1 << 10
MiB: Final = 1 << 20


class Limit(msgspec.Struct, frozen=True):
    """One bound on one input surface: ``name`` is how refusals and docs/INPUT_LIMITS.md name it."""

    name: str
    value: int
    unit: str
    surface: str


# ------------------------------------------------------------------------------ the limits
# A policy at the kernel's full 65,536 rules is ~6 MB of TOML with short descriptions;
# tomllib parses ~1 MB/s on a slow host, so 8 MiB keeps the worst legitimate parse ~10 s.
POLICY_BYTES: Final = Limit("policy-bytes", 8 * MiB, "bytes", "policy TOML file")
# sign_policy embeds the TOML as a JSON string: at worst every byte doubles (\" and \n)
ENVELOPE_BYTES: Final = Limit("envelope-bytes", 2 * POLICY_BYTES.value + 64 * KiB, "bytes",
                              "signed policy envelope")
POLICY_DEPTH: Final = Limit("policy-depth", 16, "levels",
                            "nesting of arrays and tables in a policy (aegis/v1 needs 4)")
POLICY_RULES: Final = Limit("policy-rules", abi.MAX_RULES, "rules",
                            "rules in one policy (the kernel's rule slots)")
POLICY_SCOPES: Final = Limit("policy-scopes", abi.MAX_SCOPES, "scopes",
                             "scopes in one policy (the kernel's scope slots)")
PATH_BYTES: Final = Limit("path-bytes", 4095, "bytes",
                          "a path in a policy or an argument (PATH_MAX less the NUL)")
NAME_BYTES: Final = Limit("name-bytes", 255, "bytes", "one path component (NAME_MAX)")
KEY_FILE_BYTES: Final = Limit("key-file-bytes", 64 * KiB, "bytes", "PEM key file")
TRUST_STORE_BYTES: Final = Limit("trust-store-bytes", 4 * MiB, "bytes",
                                 "trust store ($AEGIS_STATE_DIR/keys/trust.json)")
STATUS_FILE_BYTES: Final = Limit("status-file-bytes", 1 * MiB, "bytes", "the agent's status file")
# a record holds the compiled table (~150 bytes a rule) besides the policy itself
GENERATION_RECORD_BYTES: Final = Limit("generation-record-bytes", 64 * MiB, "bytes",
                                       "one generation record ($AEGIS_STATE_DIR/generations)")
EVENTS_LOG_BYTES: Final = Limit("events-log-bytes", 1024 * MiB, "bytes",
                                "one event log file given to explain or --dry-run --events")
EVENT_LINE_BYTES: Final = Limit("event-line-bytes", 64 * KiB, "bytes",
                                "one JSON event line (a decision is ~1 KiB)")
CONFIG_BYTES: Final = Limit("config-bytes", 1 * MiB, "bytes", "agent config file (aegis run --config)")
ARG_BYTES: Final = Limit("arg-bytes", 4096, "bytes", "one command-line argument")

LIMITS: Final = (
    POLICY_BYTES, ENVELOPE_BYTES, POLICY_DEPTH, POLICY_RULES, POLICY_SCOPES, PATH_BYTES,
    NAME_BYTES, KEY_FILE_BYTES, TRUST_STORE_BYTES, STATUS_FILE_BYTES, GENERATION_RECORD_BYTES,
    EVENTS_LOG_BYTES, EVENT_LINE_BYTES, CONFIG_BYTES, ARG_BYTES,
)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


# ------------------------------------------------------------------------------ files
def check_path(path: str, what: str = "path", error: type[AegisError] = PolicyError) -> str:
    """Refuse a path the kernel could never open as named: a NUL byte (Python raises
    ``ValueError: embedded null byte``), text that is not UTF-8 (surrogate escapes from
    ``argv``), or more than PATH_MAX / NAME_MAX bytes."""
    if "\x00" in path:
        raise error(f"{what}: contains a NUL byte at offset {path.index(chr(0))}")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what}: not valid UTF-8 (at character {exc.start})") from None
    if len(raw) > PATH_BYTES.value:
        raise error(f"{what}: {len(raw)} bytes exceed the limit {PATH_BYTES.name}="
                    f"{PATH_BYTES.value}")
    longest = max((len(c) for c in raw.split(b"/")), default=0)
    if longest > NAME_BYTES.value:
        raise error(f"{what}: a component of {longest} bytes exceeds the limit "
                    f"{NAME_BYTES.name}={NAME_BYTES.value}")
    return path


def open_regular(path: str | os.PathLike[str], limit: Limit, what: str,
                 error: type[AegisError] = PolicyError) -> tuple[int, int]:
    """(fd, size) of a regular file no larger than ``limit``; the caller closes the fd.

    ``O_NONBLOCK``: opening a FIFO with no writer returns at once instead of waiting for one;
    the fstat then refuses it like any other file that is not regular."""
    name = os.fspath(path)
    check_path(name, f"{name!r}" if "\x00" in name else name, error)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise error(f"{name}: cannot read {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name}: {what} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit.value:
            raise error(f"{name}: {what} is {_size(st.st_size)}, over the limit "
                        f"{limit.name}={_size(limit.value)}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_bounded(path: str | os.PathLike[str], limit: Limit, what: str,
                 error: type[AegisError] = PolicyError) -> bytes:
    """The bytes of a regular file of at most ``limit``; anything else is one-line ``error``."""
    fd, size = open_regular(path, limit, what, error)
    try:
        chunks: list[bytes] = []
        got = 0
        while got <= limit.value:
            try:
                b = os.read(fd, min(limit.value + 1 - got, 1 * MiB) or 1)
            except OSError as exc:
                raise error(f"{os.fspath(path)}: cannot read {what}: {exc.strerror}") from None
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit.value:  # it grew after the fstat
            raise error(f"{os.fspath(path)}: {what} grew over the limit "
                        f"{limit.name}={_size(limit.value)} while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_bytes(data: bytes, limit: Limit, what: str, error: type[AegisError] = PolicyError) -> None:
    """The in-memory form of the size check (bytes handed over by a caller, stdin, an envelope)."""
    if len(data) > limit.value:
        raise error(f"{what}: {_size(len(data))} over the limit {limit.name}={_size(limit.value)}")


def bounded_lines(path: str | os.PathLike[str], limit: Limit, what: str,
                  error: type[AegisError] = PolicyError) -> Iterator[bytes]:
    """The lines of a regular file no larger than ``limit``, read up to its size at open (a log
    that keeps growing cannot keep the reader going); a line longer than
    :data:`EVENT_LINE_BYTES` is skipped whole (it cannot be an event), never held in memory."""
    fd, size = open_regular(path, limit, what, error)
    with os.fdopen(fd, "rb") as fh:
        left = size
        cap = EVENT_LINE_BYTES.value
        while left > 0:
            line = fh.readline(min(cap + 1, left))
            if not line:
                return
            left -= len(line)
            if len(line) > cap and not line.endswith(b"\n"):
                while left > 0:  # skip the rest of an over-long line, a bounded chunk at a time
                    rest = fh.readline(min(cap, left))
                    if not rest:
                        return
                    left -= len(rest)
                    if rest.endswith(b"\n"):
                        break
                continue
            yield line


# ------------------------------------------------------------------------------ policy TOML
# Strings and comments, removed before the brackets are counted (a bracket inside a string does
# not nest).  Every alternative that starts matches to its end or to the end of its line/text
# (possessive: no backtracking), so the scan is linear even for unterminated strings, which
# the TOML parser refuses anyway.
_SKIP = re.compile(
    r'"""(?:[^"\\]++|\\[\s\S]|\\\Z|"(?!""))*+(?:"""|\Z)'
    r"|'''(?:[^']++|'(?!''))*+(?:'''|\Z)"
    r'|"(?:[^"\\\n]++|\\.?)*+(?:"|$)'
    r"|'[^'\n]*+(?:'|$)"
    r"|\#[^\n]*+",
    re.MULTILINE,
)
# then: the [[rules]] / [[scope]] headers, and the brackets and braces
_RULES_HEADER = re.compile(r"^[ \t]*+\[\[[ \t]*+rules[ \t]*+\]\]", re.MULTILINE)
_SCOPE_HEADER = re.compile(r"^[ \t]*+\[\[[ \t]*+scope[ \t]*+\]\]", re.MULTILINE)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_PAIR = re.compile(r"(?:\[\])++")
_OPEN_CLOSE = str.maketrans("{}", "[]")


class PolicyShape(msgspec.Struct, frozen=True):
    """What :func:`check_policy_shape` counted: deepest nesting, ``[[`` headers and inline
    tables (``{...}``)."""

    depth: int
    array_tables: int  # "[[" outside strings: an upper bound of [[rules]] + [[scope]]
    inline_tables: int


def _refuse_tables(source: str, key: str, n: int, limit: Limit) -> None:
    if n > limit.value:
        raise PolicyError(f"{source}: {key}: {n} [[{key}]] tables, over the limit "
                          f"{limit.name}={limit.value} (counted before parsing)")


def check_policy_shape(text: str, source: str = "policy") -> PolicyShape:
    """Refuse a policy whose nesting or table count is over the limits, before it is parsed.

    Everything here runs at the regular expression engine's speed (a Python loop per token
    took 30 s for 8 MiB of brackets): strings and comments are removed, ``[[`` headers are
    counted, and the brackets left are reduced by deleting innermost ``[]`` pairs (``{}``
    count as brackets), one nesting level per pass, at most :data:`POLICY_DEPTH` + 1 passes.
    A table in an inline array (``rules = [{...}, ...]``) counts as well: every rule and scope
    is a table, so more tables than the rules and scopes limits allow together is refused."""
    if text.count("[[") > POLICY_RULES.value and '"""' not in text and "'''" not in text:
        # without multi-line strings a line that starts with [[rules]] can only be a header:
        # the common over-limit case is counted before the (slower) removal of the strings
        # str.count of the plain spelling first (a lower bound at memchr speed: the regex
        # took ~1 s for 100,000 rules in a TCG guest); the regex (spacing variants) after
        plain = text.count("\n[[rules]]") + text.startswith("[[rules]]")
        _refuse_tables(source, "rules", plain, POLICY_RULES)
        _refuse_tables(source, "rules", len(_RULES_HEADER.findall(text)), POLICY_RULES)
    code = _SKIP.sub("", text)
    # str.count is an upper bound of the headers; the exact (slower) count only when it matters
    headers = code.count("[[")
    if headers > POLICY_RULES.value:
        _refuse_tables(source, "rules", len(_RULES_HEADER.findall(code)), POLICY_RULES)
    if headers > POLICY_SCOPES.value:
        _refuse_tables(source, "scope", len(_SCOPE_HEADER.findall(code)), POLICY_SCOPES)
    inline = code.count("{")
    tables = headers + inline
    if tables > POLICY_RULES.value + POLICY_SCOPES.value:
        raise PolicyError(f"{source}: {tables} tables, more than the limits {POLICY_RULES.name}="
                          f"{POLICY_RULES.value} + {POLICY_SCOPES.name}={POLICY_SCOPES.value} "
                          "allow (counted before parsing)")
    # a header is a balanced pair at the top ("[a]" one level, "[[rules]]" two): it needs no
    # special case below
    left = _NOT_BRACKET.sub("", code).translate(_OPEN_CLOSE)
    depth = 0
    while left and depth <= POLICY_DEPTH.value:
        shorter = _PAIR.sub("", left)
        if len(shorter) == len(left):  # only unmatched brackets left: each open one nests
            depth += shorter.count("[")
            break
        left = shorter
        depth += 1
    if depth > POLICY_DEPTH.value:
        raise PolicyError(f"{source}: nesting deeper than the limit {POLICY_DEPTH.name}="
                          f"{POLICY_DEPTH.value} (arrays and inline tables, counted before parsing)")
    return PolicyShape(depth, headers, inline)


def decode_policy_text(data: bytes | str, source: str = "policy") -> str:
    """The policy's text: size-checked, UTF-8 (the byte offset of the first bad byte named)."""
    if isinstance(data, str):
        check_bytes(data.encode("utf-8", "surrogatepass"), POLICY_BYTES, source)
        return data
    check_bytes(data, POLICY_BYTES, source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{source}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset "
                          f"{exc.start})") from None


def tree_depth(obj: object) -> int:
    """Nesting depth of a parsed document, without recursion (dotted keys ``a.b.c.d = 1`` nest
    tables that no bracket shows)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > POLICY_DEPTH.value:
                return deepest
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


# ------------------------------------------------------------------------------ argv
def check_argv(argv: list[str]) -> str | None:
    """Why a command line is refused before it is parsed (one line), or None.

    A NUL byte cannot be passed to the kernel in a path; bytes that are not UTF-8 arrive as
    surrogate escapes that cannot be printed in a one-line error or put in a policy; and no
    argument needs to be longer than PATH_MAX."""
    for i, a in enumerate(argv, 1):
        if "\x00" in a:
            return f"argument {i}: contains a NUL byte"
        try:
            raw = a.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"argument {i}: not valid UTF-8 (at character {exc.start})"
        if len(raw) > ARG_BYTES.value:
            return f"argument {i}: {len(raw)} bytes exceed the limit {ARG_BYTES.name}={ARG_BYTES.value}"
    return None
