"""The exception tree.  Everything the agent raises on purpose derives from AegisError::

    AegisError
    ├── PolicyError          bad policy input (one line, names the field); nothing changed
    │   └── SignatureError   signature, trust, revocation or anti-rollback refusal
    │       └── SignatureExpiredError  expired (or issued in the future) by the wall clock
    ├── KernelError          a bpf()/libbpf call failed (names the object, the call, errno)
    │   ├── LoadError        object/program load or verifier rejection (keeps the log tail)
    │   ├── AttachError      a program loaded but its hook could not be attached
    │   └── NoAgentError     no pinned state: nothing is loaded
    ├── StateError           state dir / provenance / pinned state inconsistent
    └── LabError             the QEMU kernel lab cannot run
"""

from __future__ import annotations

import errno as _errno
import os


class AegisError(Exception):
    """Base of every error the agent raises on purpose."""


class PolicyError(AegisError):
    pass


class SignatureError(PolicyError):
    pass


class SignatureExpiredError(SignatureError):
    """The signature or the signing key is expired, or issued in the future, by the wall
    clock (refusal code ``policy_expired``)."""


class KernelError(AegisError):
    def __init__(self, message: str, *, err: int = 0) -> None:
        self.errno = err
        if err:
            name = _errno.errorcode.get(err, str(err))
            message = f"{message}: {name} ({os.strerror(err)})"
        super().__init__(message)

    @classmethod
    def wrapping(cls, cause: KernelError, message: str) -> KernelError:
        """A new error saying ``message`` (which already quotes ``cause``) that keeps the
        cause's errno, so callers classify it by errno, not by its text."""
        err = cls(message)
        err.errno = cause.errno
        return err


class LoadError(KernelError):
    def __init__(self, message: str, *, err: int = 0, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message, err=err)


class AttachError(KernelError):
    pass


class NoAgentError(KernelError):
    pass


class StateError(AegisError):
    pass


class LabError(AegisError):
    pass
