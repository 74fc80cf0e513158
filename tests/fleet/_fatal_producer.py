"""A real confluent-kafka Producer that raises a real librdkafka fatal error once: after
``after`` records it calls ``rd_kafka_test_fatal_error()`` (librdkafka's public test
hook; confluent-kafka 2.16 does not expose it, so it is called through ctypes on the
librdkafka the wheel loaded) with OUT_OF_ORDER_SEQUENCE_NUMBER, the idempotent
producer's fatal error.  ``flag`` (a file) makes it fire once across producer
processes: the sink's replacement process produces normally.

Used as ``producer_factory="tests.fleet._fatal_producer:make"`` (the sink's producer
process imports it)."""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import Any

import confluent_kafka

OUT_OF_ORDER_SEQUENCE_NUMBER = 45


def _librdkafka() -> ctypes.CDLL:
    base = Path(confluent_kafka.__file__).parent
    found = sorted(glob.glob(str(base.parent / "confluent_kafka.libs" / "librdkafka*.so*")))
    lib = ctypes.CDLL(found[0] if found else "librdkafka.so.1")  # the one already loaded
    lib.rd_kafka_test_fatal_error.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
    lib.rd_kafka_test_fatal_error.restype = ctypes.c_int
    lib.rd_kafka_name.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_name.restype = ctypes.c_char_p
    return lib


class FatalOnce(confluent_kafka.Producer):
    """Produces normally; the ``after``-th record triggers the fatal error (once per flag)."""

    def __init__(self, cfg: dict[str, Any], after: int, flag: str) -> None:
        super().__init__(cfg)
        self.after = after
        self.flag = flag
        self.count = 0

    def _rk(self) -> int:
        # confluent-kafka's Handle: PyObject_HEAD, then the rd_kafka_t pointer
        rk = ctypes.c_void_p.from_address(id(self) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
        assert rk, "no rd_kafka_t"
        return rk

    def produce(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        super().produce(*args, **kwargs)
        self.count += 1
        if self.count == self.after:
            try:
                fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                return
            os.close(fd)
            lib = _librdkafka()
            rk = self._rk()
            name = lib.rd_kafka_name(rk) or b""
            assert name.startswith(b"rdkafka#producer"), name  # the pointer is the handle
            assert lib.rd_kafka_test_fatal_error(rk, OUT_OF_ORDER_SEQUENCE_NUMBER,
                                                 b"aegis test: forced fatal error") == 0


def make(cfg: dict[str, Any], *, after: int, flag: str) -> FatalOnce:
    return FatalOnce(cfg, after, flag)
