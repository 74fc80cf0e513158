"""Small facts about the machine a benchmark or soak runs on (the lab guest or a host),
for the ``meta`` of their reports: read from /proc, no dependencies."""

from __future__ import annotations


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first ``model name`` in /proc/cpuinfo ("" when there is none, e.g. on arm64,
    or the file cannot be read).  In a lab guest: "QEMU TCG CPU version 2.5+"."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
