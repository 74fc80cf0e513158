"""Anti-rollback: a monotonic version counter per policy name.

``<state dir>/versions.json`` maps each policy name to the highest version ever applied
(``high_water``) and that version's digest.  A fresh apply must carry a version greater
than ``high_water``; the one exception is the byte-identical policy (same version, same
digest) being applied again, which is idempotent and is what makes a retry after a failed
or interrupted apply possible.  An old signed policy replayed later is refused.  Going
back is only possible through ``aegis policy rollback`` (explicit, recorded), which does
not lower the counter.

The file is replaced atomically (temp, fsync, rename, fsync dir): a crash leaves either
the old or the new content.  Failing to persist it is an error, never a warning.

Losing the file must not reset the counter (deleting it used to let v1 back in).  A
missing or corrupt ``versions.json`` is never read as "nothing applied yet": the counter
is rebuilt from the second copy of the same facts, the hash-chained provenance log (every
successful enforce-mode ``apply`` record names its policy, version and digest), and only
after ``ProvenanceLog.verify`` accepts the whole chain.  When the log is missing, broken
or disagrees, the counter cannot be trusted and every check is refused
(:class:`StateError`) until an operator restores ``versions.json`` from a backup.  Only a
state dir with neither file (a fresh install) starts from zero.  The lifecycle persists a
rebuilt counter at once and records an ``antirollback-restore`` provenance record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from aegis_stream.errors import SignatureError, StateError
from aegis_stream.policy import store as _store
from aegis_stream.policy.provenance import ProvenanceLog

FILE_NAME = "versions.json"
RESTORE_ACTION = "antirollback-restore"  # the provenance record of a rebuilt counter


class Entry(msgspec.Struct, frozen=True):
    """One policy name's anti-rollback state: the highest version ever applied and that version's digest."""
    high_water: int
    digest: str
    updated_at: float = 0.0


_dec = msgspec.json.Decoder(dict[str, Entry])
_enc = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True)
class Rebuilt:
    """A counter rebuilt from the provenance chain because ``versions.json`` was missing or
    corrupt: why, and how many records it was rebuilt from."""
    why: str
    records: int
    entries: dict[str, Entry]


def counts(rec: dict) -> bool:
    """Whether a provenance record moved the counter: a successful apply of a signed policy
    in enforce mode (records written before the mode field was logged count when signed:
    rebuilding too high refuses a version, too low would readmit one)."""
    if rec.get("action") != "apply" or rec.get("result") != "ok":
        return False
    if not isinstance(rec.get("policy"), str) or not isinstance(rec.get("version"), int):
        return False
    return rec.get("signer", "unsigned") != "unsigned" and rec.get("mode", "enforce") == "enforce"


def rebuild(root: Path, why: str) -> Rebuilt:
    """The counter from the verified provenance chain (StateError when it cannot be)."""
    log = ProvenanceLog(root)
    fix = f"restore {root / FILE_NAME} from a backup; applies are refused until then"
    if not log.path.exists():
        raise StateError(f"{root / FILE_NAME}: anti-rollback counter {why} and there is no "
                         f"provenance log to rebuild it from: {fix}")
    v = log.verify()
    if not v.ok:
        raise StateError(f"{root / FILE_NAME}: anti-rollback counter {why} and the provenance "
                         f"chain that would rebuild it is broken ({log.path.name}:{v.bad_line}: "
                         f"{v.reason}): {fix}")
    entries: dict[str, Entry] = {}
    n = 0
    for rec in log.records():
        if not counts(rec):
            continue
        n += 1
        name, ver = rec["policy"], rec["version"]
        cur = entries.get(name)
        if cur is None or ver >= cur.high_water:
            entries[name] = Entry(ver, str(rec.get("digest", "")), 0.0)
    return Rebuilt(why, n, entries)


class VersionCounter:
    """The per-policy-name anti-rollback counter in ``<state dir>/versions.json``, used by
    :class:`Lifecycle` on every apply.  :meth:`check` refuses a version that is not newer (the
    byte-identical policy excepted, so a retry works); :meth:`commit` never lets the counter go
    backwards; :meth:`restore` undoes a commit only for a policy that never became active.  Every write
    is atomic and a failed write is an error, so a replayed old policy cannot slip in."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else _store.state_dir()
        self.path = self.root / FILE_NAME
        #: set when :meth:`load` found versions.json missing or corrupt and rebuilt it from
        #: the provenance chain (not yet written back: :meth:`persist_rebuilt`)
        self.rebuilt: Rebuilt | None = None

    def load(self) -> dict[str, Entry]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            if not self._history():
                return {}  # a fresh state dir: nothing was ever logged or recorded here
            return self._rebuild("is missing")
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot read anti-rollback counter: {exc.strerror}"
            ) from None
        try:
            return _dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # fail closed: without the counter we cannot tell a replay from an upgrade
            return self._rebuild(f"is corrupt ({exc})")

    def _history(self) -> bool:
        """Whether anything was ever logged or recorded in this state dir."""
        if any((self.root / n).exists() for n in ("provenance.jsonl", "provenance.head")):
            return True
        return bool(_store.PolicyStore(self.root).generations())

    def _rebuild(self, why: str) -> dict[str, Entry]:
        rb = rebuild(self.root, why)
        if rb.records:  # no enforce apply ever logged: empty is what the counter held
            self.rebuilt = rb
        return dict(rb.entries)

    def persist_rebuilt(self) -> Rebuilt | None:
        """Write a counter :meth:`load` rebuilt (the unreadable file is kept beside it as
        ``versions.json.corrupt``); returns what was rebuilt, None when nothing was."""
        rb = self.rebuilt
        if rb is None:
            return None
        try:
            if self.path.exists():
                os.replace(self.path, self.path.with_name(FILE_NAME + ".corrupt"))
        except OSError as exc:
            raise StateError(f"{self.path}: cannot set the corrupt counter aside: {exc}") from None
        self._write(rb.entries, "cannot persist the rebuilt anti-rollback counter ({})")
        self.rebuilt = None
        return rb

    def get(self, name: str) -> Entry | None:
        return self.load().get(name)

    def check(self, name: str, version: int, digest: str) -> None:
        """Refuse a version that is not newer than what was applied (SignatureError)."""
        cur = self.get(name)
        if cur is None or version > cur.high_water:
            return
        if version == cur.high_water and digest == cur.digest:
            return  # the same policy again
        if version == cur.high_water:
            raise SignatureError(
                f"policy {name} v{version} differs from the v{version} already applied "
                f"({cur.digest}); bump the version"
            )
        raise SignatureError(
            f"policy {name} v{version} is older than v{cur.high_water} already applied "
            "(anti-rollback); use `aegis policy rollback --to VERSION` to go back on purpose"
        )

    def commit(self, name: str, version: int, digest: str, *, now: float = 0.0) -> None:
        entries = self.load()
        cur = entries.get(name)
        if cur is not None and version < cur.high_water:
            raise StateError(f"anti-rollback counter for {name} would go backwards")
        entries[name] = Entry(version, digest, now)
        self._write(entries, "cannot persist anti-rollback counter ({}); nothing applied")

    def restore(self, name: str, previous: Entry | None) -> None:
        """Undo a ``commit`` whose policy never became effective (the kernel refused it):
        the counter goes back to ``previous`` (None: no entry), so the operator can fix
        the policy and apply the same version again.  Only called before activation."""
        entries = self.load()
        if previous is None:
            entries.pop(name, None)
        else:
            entries[name] = previous
        self._write(entries, "cannot restore anti-rollback counter ({})")

    def _write(self, entries: dict[str, Entry], failure: str) -> None:
        try:
            _store.atomic_write(self.path, _enc.encode(entries))
        except OSError as exc:
            raise StateError(f"{self.path}: " + failure.format(exc)) from None
