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
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from aegis_stream.errors import SignatureError, StateError
from aegis_stream.policy import store as _store

FILE_NAME = "versions.json"


class Entry(msgspec.Struct, frozen=True):
    """One policy name's anti-rollback state: the highest version ever applied and that version's digest."""
    high_water: int
    digest: str
    updated_at: float = 0.0


_dec = msgspec.json.Decoder(dict[str, Entry])
_enc = msgspec.json.Encoder(order="sorted")


class VersionCounter:
    """The per-policy-name anti-rollback counter in ``<state dir>/versions.json``, used by
    :class:`Lifecycle` on every apply.  :meth:`check` refuses a version that is not newer (the
    byte-identical policy excepted, so a retry works); :meth:`commit` never lets the counter go
    backwards; :meth:`restore` undoes a commit only for a policy that never became active.  Every write
    is atomic and a failed write is an error, so a replayed old policy cannot slip in."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else _store.state_dir()
        self.path = self.root / FILE_NAME

    def load(self) -> dict[str, Entry]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StateError(
                f"{self.path}: cannot read anti-rollback counter: {exc.strerror}"
            ) from None
        try:
            return _dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # fail closed: without the counter we cannot tell a replay from an upgrade
            raise StateError(f"{self.path}: corrupt anti-rollback counter: {exc}") from None

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
