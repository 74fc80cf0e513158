#!/usr/bin/env python3
"""Policy applier for the soak: one long-lived process that applies signed policies the way
`aegis policy apply` does (cli_policy.cmd_policy_apply -> Lifecycle.apply), one per line of
stdin, answering one JSON line each.  It exists because a Python start under QEMU TCG costs
30-170 s, which would make "a swap every few seconds" impossible through the CLI; a
separate process (not a thread in the driver) keeps a crash here out of the harness.

    python -m soak.applier   (soak.driver starts it, cwd = the repository root)

    stdin:  <pin root>\t<state dir>\t<policy path>
    stdout: {"rc": 0|1, "output": "...", "seconds": S}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from aegis_stream.errors import AegisError
from aegis_stream.kernel.loader import open_pinned
from aegis_stream.policy.lifecycle import Lifecycle


def main() -> int:
    for line in sys.stdin:
        root, state, path = line.rstrip("\n").split("\t")
        t0 = time.monotonic()
        try:
            pinned = open_pinned(root)
            try:
                out = Lifecycle(pinned.policy_maps(), state).apply(Path(path).read_bytes(), path)
            finally:
                pinned.close()
            res = {"rc": 0, "output": f"generation {out.generation} (was {out.previous_generation}), "
                                      f"slot {out.slot}, mode {out.mode}"}
        except (AegisError, OSError) as exc:
            res = {"rc": 1, "output": f"{type(exc).__name__}: {exc}"}
        res["seconds"] = round(time.monotonic() - t0, 3)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
