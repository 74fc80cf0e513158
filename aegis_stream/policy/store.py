"""The on-disk policy store: one record per generation, written before activation.

Layout under the state dir (``$AEGIS_STATE_DIR``, default /var/lib/aegis)::

    generations/<N>.json   the compiled policy the kernel's generation N enforces
    generations/<N>.toml   the policy source it was compiled from

A generation record is fsync'd before its slot is activated, so whatever generation
the kernel holds after a crash, its record exists (startup reconciliation relies on it).

The sha256 of each ``<N>.json`` as written (:func:`record_digest`) goes into the provenance
record of the apply or rollback that made it (``record_sha256``); a store built with a
``check`` (``provenance.checked_store``) compares every record it loads against it, so an
edited record is refused, not explained or rolled back to.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from aegis_stream import inputs
from aegis_stream.errors import StateError
from aegis_stream.policy.compiler import CompiledPolicy

DEFAULT_STATE_DIR = "/var/lib/aegis"


class GenerationRecord(msgspec.Struct, frozen=True):
    """What the kernel's generation N enforces: the compiled policy, the signer and the effective mode.
    Written (fsync'd) before the slot is activated, so an active generation always has one."""
    generation: int
    applied_at: float
    policy: CompiledPolicy
    signer: str = ""  # key id when the policy was signed; "" = unsigned
    mode: str = ""  # effective mode it was applied in ("" = policy.mode)


def record_digest(data: bytes) -> str:
    """``sha256:<hex>`` of a generation record's bytes, as the provenance log records it."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def state_dir() -> Path:
    return Path(os.environ.get("AEGIS_STATE_DIR", DEFAULT_STATE_DIR))


PRIVATE_DIR_MODE, PRIVATE_FILE_MODE = 0o700, 0o600  # docs/POLICY_LIFECYCLE.md "State directory"


def private_dir(path: Path) -> None:
    """Create ``path`` and every missing parent as 0700 (``mkdir(parents=True)`` would make
    the parents 0777 & ~umask: a world-readable state dir)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created meanwhile by another writer: its mode is its creator's
        os.chmod(d, PRIVATE_DIR_MODE)  # a umask such as 0o277 must not narrow it either


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write temp, fsync, rename, fsync the directory.  The file is ``mode`` (0600) and any
    directory created for it 0700, whatever the umask."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, mode)  # an older temp file of this pid keeps its mode through O_CREAT
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class PolicyHead(msgspec.Struct, frozen=True):
    """A policy's name, version and digest: the part of a record rollback needs to choose a target."""
    name: str
    version: int
    digest: str = ""


class GenerationHead(msgspec.Struct, frozen=True):
    """What rollback needs to choose a target, without the rule table."""

    generation: int
    policy: PolicyHead


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(GenerationRecord)
_dec_head = msgspec.json.Decoder(GenerationHead)  # unknown fields (the rules) are skipped
_dec_index = msgspec.json.Decoder(dict[int, PolicyHead])
INDEX_NAME = "index.json"


class PolicyStore:
    """The generation records under ``<state dir>/generations``: compiled policy, source TOML and signed
    envelope per generation.  Records are written atomically before activation and only a generation that
    never became active is :meth:`discard`-ed, so every event's generation can be explained and rolled
    back to; ``index.json`` is only a cache of the heads.  With ``check`` (generation, record
    bytes; raises StateError), every :meth:`load` is checked before it is decoded."""

    def __init__(self, root: Path | str | None = None, *,
                 check: Callable[[int, bytes], None] | None = None) -> None:
        self.root = Path(root) if root else state_dir()
        self.gen_dir = self.root / "generations"
        self.check = check

    def generations(self) -> list[int]:
        try:
            names = os.listdir(self.gen_dir)  # plain names: thousands of records, every apply
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def next_generation(self) -> int:
        gens = self.generations()
        return (gens[-1] + 1) if gens else 1

    def record(self, rec: GenerationRecord, source: bytes = b"", *, envelope: bytes = b"") -> str:
        """Write generation ``rec`` (record last); returns the record's :func:`record_digest`."""
        if envelope:  # the signed envelope, kept so rollback can re-verify it
            atomic_write(self.gen_dir / f"{rec.generation}.signed", envelope)
        if source:
            atomic_write(self.gen_dir / f"{rec.generation}.toml", source)
        data = _enc.encode(rec)
        atomic_write(self.gen_dir / f"{rec.generation}.json", data)
        return record_digest(data)

    def load(self, generation: int) -> GenerationRecord:
        p = self.gen_dir / f"{generation}.json"
        if not os.path.lexists(p):
            raise StateError(f"no record of policy generation {generation} in {self.gen_dir}")
        data = inputs.read_bounded(p, inputs.GENERATION_RECORD_BYTES, "generation record", StateError)
        if self.check is not None:
            self.check(generation, data)
        try:
            return _dec.decode(data)
        except msgspec.DecodeError as exc:
            raise StateError(f"{p}: corrupt generation record: {exc}") from None

    def heads(self) -> dict[int, PolicyHead]:
        """Name, version and digest of every stored generation, from ``generations/index.json``
        (a cache: entries for records written since are read and added, entries whose record
        is gone are dropped, and an unreadable index is rebuilt), so choosing a rollback target
        does not read thousands of rule tables."""
        gens = set(self.generations())
        index_path = self.gen_dir / INDEX_NAME
        try:
            index = _dec_index.decode(index_path.read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            index = {}
        changed = False
        for g in [g for g in index if g not in gens]:
            del index[g]
            changed = True
        for g in sorted(gens - index.keys()):
            try:
                index[g] = _dec_head.decode((self.gen_dir / f"{g}.json").read_bytes()).policy
            except (OSError, msgspec.DecodeError, msgspec.ValidationError):
                continue  # unreadable record: not a candidate (load() reports it when asked)
            changed = True
        if changed:
            try:
                atomic_write(index_path, _enc.encode(dict(sorted(index.items()))))
            except OSError:
                pass  # a cache: the next call rebuilds what is missing
        return index

    def source(self, generation: int) -> bytes | None:
        p = self.gen_dir / f"{generation}.toml"
        return p.read_bytes() if p.exists() else None

    def envelope(self, generation: int) -> bytes | None:
        p = self.gen_dir / f"{generation}.signed"
        return p.read_bytes() if p.exists() else None

    def discard(self, generation: int) -> None:
        """Forget a generation that was recorded but never became active."""
        for ext in ("json", "toml", "signed"):
            (self.gen_dir / f"{generation}.{ext}").unlink(missing_ok=True)
        # its number may be recorded again with another policy: the index is rebuilt
        (self.gen_dir / INDEX_NAME).unlink(missing_ok=True)
