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
    """Bad policy input: the message is one line naming the field; nothing was changed."""


class SignatureError(PolicyError):
    """A signature, trust, revocation or anti-rollback refusal: the policy is well formed but not admitted."""


class SignatureExpiredError(SignatureError):
    """The signature or the signing key is expired, or issued in the future, by the wall
    clock (refusal code ``policy_expired``)."""


class KernelError(AegisError):
    """A bpf()/libbpf call failed.  The message names the object and the call; :attr:`errno` keeps the
    raw errno (0 when there is none) so callers classify by errno, never by the text."""

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
    """The BPF object or a program failed to load (verifier rejection included); :attr:`log_tail` keeps
    the end of the verifier log for the one-line error and ``aegis doctor``."""

    def __init__(self, message: str, *, err: int = 0, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message, err=err)


class AttachError(KernelError):
    """A program loaded but its LSM hook could not be attached: nothing enforces through it."""


class NoAgentError(KernelError):
    """The pinned maps are missing under the pin root: no agent has loaded the programs, so
    there is nothing to read or unload (the message says to start ``aegis run``)."""


class StateError(AegisError):
    """The state dir, provenance log, trust store or pinned state is unreadable or inconsistent; the
    operation stops rather than guess."""


class LabError(AegisError):
    """The QEMU kernel lab cannot run: a host tool is missing, a kernel package cannot be fetched or
    unpacked, or the kernel lacks the BPF LSM.  The message says which, and the fix."""
