"""Append-only, hash-chained provenance log: ``<state dir>/provenance.jsonl``.

One JSON object per line.  Every record carries ``seq`` (1, 2, ...), ``prev_hash`` (the
previous record's ``hash``; 64 zeros for the first) and ``hash`` = sha256 of the record's
canonical JSON (sorted keys, no whitespace) without the ``hash`` key.  Editing a record
breaks its hash; deleting or reordering records breaks ``seq``/``prev_hash``; deleting
records at the end is caught by ``provenance.head`` (count and last hash, rewritten
atomically after every append).  This is tamper-evident, not tamper-proof: root can
rewrite the whole chain and the head, so ship the log off-host if that matters.

A record torn by a crash mid-append (no trailing newline) is not silently skipped: the
next append terminates it and writes a ``log-repair`` record naming the torn line and its
sha256, chained to the last intact record; :func:`verify` accepts exactly that pattern.

The log also notices its own loss and vouches for the generation records:

- an intact but *empty* chain (log and head deleted) fails :func:`verify` when the state
  directory shows history (generation records, anti-rollback entries, trusted keys, a
  break-glass marker, or a generation the kernel enforces);
- the apply or rollback that wrote ``generations/<N>.json`` records its sha256
  (``record_sha256``).  :meth:`ProvenanceLog.check_record` (every load of a
  :func:`checked_store`: ``policy show``, ``explain``, rollback) refuses a record whose bytes
  differ, or a generation the log has no successful record of; :func:`verify` checks every
  stored record the same way.  Records from before ``record_sha256`` existed (an ok record
  without it) are accepted unchecked.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream.errors import StateError
from aegis_stream.policy.store import PolicyStore, atomic_write, private_dir, record_digest, state_dir

GENESIS = "0" * 64
LOG_NAME = "provenance.jsonl"
HEAD_NAME = "provenance.head"

_enc = msgspec.json.Encoder(order="sorted")

#: the actions whose successful record names the generation the kernel then enforces
GENERATION_ACTIONS = ("apply", "rollback", "reconcile", "restage")  # restage: continuity.py


class _GenerationFact(msgspec.Struct):
    """The fields of a record :meth:`ProvenanceLog.recorded_generations` reads (others skipped)."""
    action: str = ""
    result: str = ""
    generation: int | None = None
    record_sha256: str | None = None


_fact_dec = msgspec.json.Decoder(_GenerationFact)


class RecordMismatchError(StateError):
    """A generation record differs from the sha256 its apply recorded in the provenance log,
    or the log has no record of the generation at all: it is refused, never used."""


def record_hash(rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "hash"}
    return hashlib.sha256(_enc.encode(body)).hexdigest()


def _user() -> dict[str, Any]:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    out: dict[str, Any] = {"uid": uid, "user": name}
    if os.environ.get("SUDO_USER"):
        out["sudo_user"] = os.environ["SUDO_USER"]
    return out


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


@dataclass(frozen=True)
class VerifyResult:
    """The verdict of :meth:`ProvenanceLog.verify`: the chain is intact, or the first bad line and why."""
    ok: bool
    records: int
    bad_line: int = 0  # 1-based; 0 when ok
    reason: str = ""


class ProvenanceLog:
    """The append-only, hash-chained record of every policy change and refusal
    (``<state dir>/provenance.jsonl``).  :meth:`append` is serialised by flock, fsync'd, and
    updates ``provenance.head`` so a truncated end is detected; a record torn by a crash is
    repaired by a chained ``log-repair`` record, never skipped.  Tamper-evident, not
    tamper-proof (see the module)."""

    def __init__(self, root: Path | str | None = None, *, host: str | None = None) -> None:
        self.root = Path(root) if root else state_dir()
        self.path = self.root / LOG_NAME
        self.head_path = self.root / HEAD_NAME
        self.host = host or socket.gethostname()
        # recorded_generations() parsed so far: (file identity, bytes parsed, result); the
        # log is append-only, so each call reads only what was appended since
        self._facts: tuple[tuple[int, int], int, dict[int, str]] | None = None

    # ------------------------------------------------------------------ writing
    def append(self, action: str, *, result: str = "ok", reason: str = "", **fields: Any) -> dict:
        """Append one record (fsync'd) and return it.  Raises StateError if it cannot."""
        now = time.time()
        rec: dict[str, Any] = {
            "time": _iso(now),
            "host": self.host,
            **_user(),
            "action": action,
            "result": result,
            "reason": reason,
        }
        for k, v in fields.items():
            if v is not None:
                rec[k] = v
        try:
            private_dir(self.root)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"{self.path}: cannot open provenance log: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # the chain needs only the last record: read the tail, and the whole log only
            # when the tail and the head file disagree (a torn or edited end)
            torn, count, last = self._tail_state(fd)
            prev_hash = last["hash"] if last else GENESIS
            seq = (last["seq"] if last else 0) + 1
            out = b""
            if torn:
                # a crash tore the last append: terminate it and say so, chained to the last
                # intact record, so verify() can tell a crash from an edit
                repair = {
                    "time": rec["time"], "host": self.host, **_user(), "action": "log-repair",
                    "result": "ok", "reason": "torn record left by a crash mid-append",
                    "discarded_line": count + 1,
                    "discarded_sha256": hashlib.sha256(torn).hexdigest(),
                    "seq": seq, "prev_hash": prev_hash,
                }
                repair["hash"] = record_hash(repair)
                out += b"\n" + _enc.encode(repair) + b"\n"
                prev_hash, seq, count = repair["hash"], seq + 1, count + 2
            rec["seq"] = seq
            rec["prev_hash"] = prev_hash
            rec["hash"] = record_hash(rec)
            out += _enc.encode(rec) + b"\n"
            n = os.write(fd, out)
            if n != len(out):
                raise OSError(28, "short write")
            os.fsync(fd)
            atomic_write(
                self.head_path,
                _enc.encode({"records": count + 1, "seq": seq, "hash": rec["hash"]}),
            )
        except OSError as exc:
            raise StateError(f"{self.path}: cannot append provenance record: {exc}") from None
        finally:
            os.close(fd)
        return rec

    # ------------------------------------------------------------------ reading
    def lines(self) -> list[bytes]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        out = data.split(b"\n")
        if out and out[-1] == b"":
            out.pop()
        return out

    def records(self) -> Iterator[dict]:
        for line in self.lines():
            try:
                rec = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(rec, dict):
                yield rec

    def last(self) -> dict | None:
        recs = list(self.records())
        return recs[-1] if recs else None

    def verify(self, *, kernel_generation: int = 0) -> VerifyResult:
        """The chain (hashes, seq, prev_hash, head), then what the chain must account for:
        the state directory's history and every stored generation record (see the module).
        ``kernel_generation``: the generation the kernel enforces now (0: none or unknown)."""
        res = self._verify_chain()
        if not res.ok:
            return res
        end = len(self.lines()) + 1
        if res.records == 0:
            evidence = self.history(kernel_generation)
            if evidence:
                what = "missing" if not self.path.exists() else "empty"
                return VerifyResult(False, 0, end, f"the log is {what}, but the state directory "
                                    f"shows history: {'; '.join(evidence)}")
        recorded = self.recorded_generations()
        if kernel_generation and kernel_generation not in recorded:
            return VerifyResult(False, res.records, end,
                                f"the kernel enforces generation {kernel_generation}, but the "
                                "log has no successful record of it")
        store = PolicyStore(self.root)
        pending = self._pending_generation()
        for gen in store.generations():
            if gen == pending:
                continue  # an interrupted apply's record: the next lifecycle call reconciles it
            try:
                data = (store.gen_dir / f"{gen}.json").read_bytes()
                self._check(gen, data, recorded)
            except OSError as exc:
                return VerifyResult(False, res.records, end, f"generation {gen}: {exc.strerror}")
            except RecordMismatchError as exc:
                return VerifyResult(False, res.records, end, str(exc))
        return res

    def history(self, kernel_generation: int = 0) -> list[str]:
        """What in the state directory (and the kernel) says policy changes happened: each
        item should have left records in this log."""
        out = []
        gens = PolicyStore(self.root).generations()
        if gens:
            out.append(f"{len(gens)} generation records (generations/{gens[0]}.json .. "
                       f"{gens[-1]}.json)")
        for name, what in (("versions.json", "anti-rollback counter"),
                           ("keys/trust.json", "trust store"),
                           ("break-glass.json", "break-glass marker")):
            p = self.root / name
            try:
                if p.stat().st_size > 2:  # more than "{}"
                    out.append(f"{what} {name}")
            except OSError:
                continue
        if kernel_generation:
            out.append(f"the kernel enforces generation {kernel_generation}")
        return out

    def recorded_generations(self) -> dict[int, str]:
        """generation -> the ``record_sha256`` of its last successful apply, rollback or
        reconcile record ("" when that record predates record digests)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._facts = None
            return {}
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        ident = (st.st_dev, st.st_ino)
        if self._facts is None or self._facts[0] != ident or st.st_size < self._facts[1]:
            self._facts = (ident, 0, {})  # new, replaced or truncated file: from the start
        _, done, out = self._facts
        if st.st_size > done:
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(done)
                    data = fh.read(st.st_size - done)
            except OSError as exc:
                raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
            whole = data.rfind(b"\n") + 1  # a torn last line is read when it is complete
            for line in data[:whole].splitlines():
                try:
                    rec = _fact_dec.decode(line)
                except msgspec.DecodeError:
                    continue
                gen = rec.generation
                if (rec.result != "ok" or rec.action not in GENERATION_ACTIONS
                        or gen is None or gen <= 0):
                    continue
                if rec.record_sha256:
                    out[gen] = rec.record_sha256  # the newest record that wrote it wins
                else:
                    out.setdefault(gen, "")
            self._facts = (ident, done + whole, out)
        return dict(out)

    def check_record(self, generation: int, data: bytes) -> None:
        """Refuse (:class:`RecordMismatchError`) generation record bytes that differ from the
        sha256 the log recorded for them, or a generation it has no successful record of."""
        self._check(generation, data, self.recorded_generations())

    def _check(self, gen: int, data: bytes, recorded: dict[int, str]) -> None:
        rel = f"generations/{gen}.json"
        if gen not in recorded:
            raise RecordMismatchError(
                f"{rel}: the provenance log has no record of applying generation {gen} (log "
                "lost or rewritten, or a record made outside aegis); refusing to use it")
        want = recorded[gen]
        got = record_digest(data)
        if want and got != want:
            raise RecordMismatchError(
                f"{rel} was changed after it was applied: {got} is not the {want} recorded in "
                "the provenance log; refusing to use it")

    def _pending_generation(self) -> int:
        try:
            doc = msgspec.json.decode((self.root / "lifecycle.pending.json").read_bytes())
        except (OSError, msgspec.DecodeError):
            return 0
        gen = doc.get("new_generation", 0) if isinstance(doc, dict) else 0
        return gen if isinstance(gen, int) else 0

    def _verify_chain(self) -> VerifyResult:
        lines = self.lines()
        prev_hash, prev_seq = GENESIS, 0
        pending_torn: tuple[int, bytes] | None = None
        good = 0
        for i, raw in enumerate(lines, start=1):
            try:
                rec = msgspec.json.decode(raw)
                if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str):
                    raise ValueError
            except (msgspec.DecodeError, ValueError):
                if pending_torn is None:
                    pending_torn = (i, raw)
                    continue
                return VerifyResult(False, good, pending_torn[0], "not a JSON record")
            if pending_torn is not None:
                ok = (
                    rec.get("action") == "log-repair"
                    and rec.get("discarded_line") == pending_torn[0]
                    and rec.get("discarded_sha256") == hashlib.sha256(pending_torn[1]).hexdigest()
                )
                if not ok:
                    return VerifyResult(False, good, pending_torn[0], "not a JSON record")
                pending_torn = None
            if record_hash(rec) != rec["hash"]:
                return VerifyResult(False, good, i, "record hash mismatch (record was edited)")
            if rec.get("seq") != prev_seq + 1:
                return VerifyResult(
                    False, good, i,
                    f"sequence {rec.get('seq')} follows {prev_seq} "
                    "(a record was deleted or records were reordered)",
                )
            if rec.get("prev_hash") != prev_hash:
                return VerifyResult(
                    False, good, i, "prev_hash does not match the previous record (chain broken)"
                )
            prev_hash, prev_seq = rec["hash"], rec["seq"]
            good += 1
        if pending_torn is not None:
            return VerifyResult(False, good, pending_torn[0], "torn record at the end of the log")
        head = self._head()
        if head is not None:
            if head.get("seq", 0) > prev_seq or (
                head.get("seq") == prev_seq and head.get("hash") != prev_hash
            ):
                return VerifyResult(
                    False, good, len(lines) + 1,
                    f"log ends at record {prev_seq} but {HEAD_NAME} says {head.get('seq')} "
                    "(records were deleted from the end)",
                )
        elif lines:
            return VerifyResult(False, good, len(lines) + 1, f"{HEAD_NAME} is missing")
        return VerifyResult(True, good)

    def _tail_state(self, fd: int) -> tuple[bytes, int, dict | None]:
        """(torn tail, record line count, last intact record)."""
        size = os.fstat(fd).st_size
        head = self._head()
        if size and head is not None and head.get("seq", -1) >= 0:
            start = max(0, size - TAIL_BYTES)
            data = os.pread(fd, size - start, start)
            lines = data.split(b"\n")
            torn = lines.pop()
            if start:
                lines = lines[1:]  # the first line of the window may be partial
            last = _last_intact(lines[-1:])
            if not torn and last is not None and last.get("seq") == head.get("seq") \
                    and last.get("hash") == head.get("hash"):
                return torn, int(head.get("records", 0)), last
        data = _read_all(fd)
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        return torn, len(lines), _last_intact(lines)

    def _head(self) -> dict | None:
        try:
            h = msgspec.json.decode(self.head_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError):
            return {"seq": -1, "hash": "corrupt"}
        return h if isinstance(h, dict) else {"seq": -1, "hash": "corrupt"}


TAIL_BYTES = 64 << 10  # more than any one record


def _read_all(fd: int) -> bytes:
    chunks = []
    off = 0
    while True:
        b = os.pread(fd, 1 << 20, off)
        if not b:
            break
        chunks.append(b)
        off += len(b)
    return b"".join(chunks)


def _last_intact(lines: list[bytes]) -> dict | None:
    for raw in reversed(lines):
        try:
            rec = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            continue
        if isinstance(rec, dict) and "hash" in rec and "seq" in rec:
            return rec
    return None


def checked_store(store: PolicyStore | None = None) -> PolicyStore:
    """``store`` (default: the state dir's) with every load checked against the digest the
    provenance log recorded for it (:meth:`ProvenanceLog.check_record`)."""
    root = store.root if store is not None else state_dir()
    return PolicyStore(root, check=ProvenanceLog(root).check_record)
