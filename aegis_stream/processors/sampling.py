"""Deterministic 1-in-N sampling of a stream (the audit class under load)."""

from __future__ import annotations

from typing import Any


class Sampler:
    """Keeps every record whose position in the stream is a multiple of ``n``.

    ``select(count)`` consumes the next ``count`` positions and returns the indices (0 ..
    count-1) kept.  The position is the only state, so a restored sampler continues
    exactly where the old one stopped."""

    def __init__(self, n: int = 1, *, position: int = 0) -> None:
        if n < 1:
            raise ValueError("sample 1 in n needs n >= 1")
        self.n = n
        self.position = position
        self.kept = 0
        self.sampled_out = 0

    def select(self, count: int) -> list[int]:
        n, pos = self.n, self.position
        first = (-pos) % n
        keep = list(range(first, count, n))
        self.position = pos + count
        self.kept += len(keep)
        self.sampled_out += count - len(keep)
        return keep

    def snapshot(self) -> dict[str, Any]:
        return {"n": self.n, "position": self.position, "kept": self.kept,
                "sampled_out": self.sampled_out}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Sampler:
        s = cls(int(state["n"]), position=int(state["position"]))
        s.kept = int(state.get("kept", 0))
        s.sampled_out = int(state.get("sampled_out", 0))
        return s
