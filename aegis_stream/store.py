"""The on-disk policy store: one record per generation, written before activation.

Layout under the state dir (``$AEGIS_STATE_DIR``, default /var/lib/aegis)::

    generations/<N>.json   the compiled policy the kernel's generation N enforces
    generations/<N>.toml   the policy source it was compiled from

A generation record is fsync'd before its slot is activated, so whatever generation
the kernel holds after a crash, its record exists (startup reconciliation relies on it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec

from aegis_stream.errors import StateError
from aegis_stream.policy.compiler import CompiledPolicy

DEFAULT_STATE_DIR = "/var/lib/aegis"


class GenerationRecord(msgspec.Struct, frozen=True):
    generation: int
    applied_at: float
    policy: CompiledPolicy
    signer: str = ""  # key id when the policy was signed; "" = unsigned
    mode: str = ""  # effective mode it was applied in ("" = policy.mode)


def state_dir() -> Path:
    return Path(os.environ.get("AEGIS_STATE_DIR", DEFAULT_STATE_DIR))


def atomic_write(path: Path, data: bytes) -> None:
    """Write temp, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_GEN = re.compile(r"^(\d+)\.json$")
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(GenerationRecord)


class PolicyStore:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root else state_dir()
        self.gen_dir = self.root / "generations"

    def generations(self) -> list[int]:
        if not self.gen_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.gen_dir.iterdir() if (m := _GEN.match(p.name)))

    def next_generation(self) -> int:
        gens = self.generations()
        return (gens[-1] + 1) if gens else 1

    def record(self, rec: GenerationRecord, source: bytes = b"", *, envelope: bytes = b"") -> None:
        if envelope:  # the signed envelope, kept so rollback can re-verify it
            atomic_write(self.gen_dir / f"{rec.generation}.signed", envelope)
        if source:
            atomic_write(self.gen_dir / f"{rec.generation}.toml", source)
        atomic_write(self.gen_dir / f"{rec.generation}.json", _enc.encode(rec))

    def load(self, generation: int) -> GenerationRecord:
        p = self.gen_dir / f"{generation}.json"
        try:
            return _dec.decode(p.read_bytes())
        except FileNotFoundError:
            raise StateError(f"no record of policy generation {generation} in {self.gen_dir}") from None
        except msgspec.DecodeError as exc:
            raise StateError(f"{p}: corrupt generation record: {exc}") from None

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
