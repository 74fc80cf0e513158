"""Policy lifecycle orchestration: apply, rollback, break-glass, canary, reconciliation.

Every operation takes the lifecycle lock (``<state dir>/lifecycle.lock``), and every
outcome, refusals included, is appended to the provenance log.

apply, step by step (``STEPS``; a test hook can stop the process after any of them)::

    verified   envelope verified against the trust store (or unsigned + audit), the
               anti-rollback counter allows the version, the policy compiled
    pending    a journal (lifecycle.pending.json) names old and new generation
    recorded   generations/N.{json,toml,signed} written and fsync'd
    counter    the anti-rollback counter persisted (failure = refusal); enforce-mode
               applies only: an audit apply is checked against it but never moves it
    staged     the inactive slot written and verified by read-back digest
    activated  the single control-word write: the new generation is enforcing
    logged     the provenance record appended; then the journal is removed

Until ``activated`` the previously active generation is the one in force; a refusal
before it discards the new generation's record.  After a crash, :func:`reconcile` reads
the journal and the kernel's control word, finds that exactly the old or the new
generation is effective, cleans up, and records which.

restage (:meth:`Lifecycle.restage_paths`, policy/continuity.py) goes through the same
steps with the same signed policy: its path rules re-resolved, a new generation and record,
the counter untouched (the version does not move), a ``restage`` provenance record saying
which paths moved from which inode to which.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream.errors import AegisError, PolicyError, SignatureError, StateError
from aegis_stream.kernel import abi, slots
from aegis_stream.kernel.maps import PolicyMaps
from aegis_stream.policy import compiler, continuity, model, signing
from aegis_stream.policy.antirollback import RESTORE_ACTION, VersionCounter
from aegis_stream.policy.compiler import CarriedInode
from aegis_stream.policy.provenance import ProvenanceLog, RecordMismatchError
from aegis_stream.policy.store import (
    PRIVATE_DIR_MODE,
    GenerationRecord,
    PolicyStore,
    atomic_write,
    private_dir,
    record_digest,
    state_dir,
)
from aegis_stream.policy.trust import TrustStore

STEPS = ("verified", "pending", "recorded", "counter", "staged", "activated", "logged")
PENDING_NAME = "lifecycle.pending.json"
BREAK_GLASS_NAME = "break-glass.json"
LOCK_NAME = "lifecycle.lock"


class SimulatedCrash(BaseException):
    """Raised by the test hook: like kill -9, no except/finally cleanup in lifecycle runs."""


ENFORCE, AUDIT = abi.Mode.ENFORCE.label, abi.Mode.AUDIT.label  # policy mode names
JOURNAL_FORMAT = 1


def _mode_val(mode: str) -> int:
    return int(abi.Mode.from_name(mode))


class JournalOp(enum.StrEnum):
    """The operation a pending journal records, so :meth:`Lifecycle.reconcile` knows what it was finishing."""
    APPLY = "apply"
    ROLLBACK = "rollback"
    RESTAGE = "restage"  # the same policy, its path rules re-resolved (policy/continuity.py)


class PendingJournal(msgspec.Struct, frozen=True, kw_only=True):
    """The pending-apply journal (``lifecycle.pending.json``): written before anything
    changes, removed after the provenance record; what :meth:`Lifecycle.reconcile` reads
    after a crash.  ``format`` is the journal's own version (``version`` is the policy's,
    a name older journals already use)."""

    op: JournalOp
    old_generation: int
    new_generation: int
    new_record: bool = True  # False: a flip-rollback to a generation already recorded
    policy: str = ""
    version: int = 0  # the policy's version
    digest: str = ""
    format: int = JOURNAL_FORMAT


_journal_decoder = msgspec.json.Decoder(PendingJournal)


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Admission:
    """A policy that passed admission (parsed; signature and trust checked; enforce only when
    signed and not while break-glass is in effect) and the mode it would run in.  Nothing has
    changed yet: :meth:`Lifecycle.admit` has no side effects."""
    policy: model.Policy
    source: bytes  # policy TOML
    envelope: bytes  # b"" when unsigned
    signer: str  # key id, "" when unsigned
    mode: str  # effective mode
    digest: str

    @property
    def signer_label(self) -> str:
        return self.signer or "unsigned"


@dataclass(frozen=True)
class ApplyOutcome:
    """An apply that happened: the new generation is active in ``slot``, replacing ``previous_generation``."""
    generation: int
    previous_generation: int
    slot: int
    policy: compiler.CompiledPolicy
    mode: str
    signer: str


@dataclass(frozen=True)
class _Prepared:
    """A generation ready for :meth:`Lifecycle._commit`: compiled, with the mode, signer,
    source and envelope its record keeps, and whether it moves the anti-rollback counter."""
    compiled: compiler.CompiledPolicy
    mode: str
    signer: str
    source: bytes
    envelope: bytes
    move_counter: bool


@dataclass(frozen=True)
class RestageOutcome:
    """What :meth:`Lifecycle.restage_paths` did: the generation it looked at, the new
    generation when paths moved (None: nothing to restage), and what it found."""
    checked_generation: int
    applied: ApplyOutcome | None
    found: continuity.Reresolved


@dataclass(frozen=True)
class RollbackOutcome:
    """A rollback that happened: which generation is now active and how (flip to the other slot, re-apply
    a stored generation, or deactivate)."""
    generation: int  # the generation now active (0 = none)
    previous_generation: int
    method: str  # flip | reapply | deactivate
    policy_name: str
    version: int
    mode: str


@dataclass(frozen=True)
class BreakGlassOutcome:
    """Break-glass took effect (every slot in audit, or deactivated); ``problems`` lists what could not
    be recorded, because break-glass never fails on the lock or the log."""
    generation: int
    method: str  # audit | deactivate
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReconcileOutcome:
    """What startup reconciliation found after a possible crash mid-apply: whether the old or the new
    generation is effective, and whether that is clean, recovered or inconsistent."""
    status: str  # clean | recovered | inconsistent
    effective: str  # none | old | new | unknown
    generation: int
    detail: str = ""


@dataclass(frozen=True)
class CanaryOutcome:
    """An apply watched for a window: the measured deny rate, and the rollback when it ran hot."""
    passed: bool
    deny_rate: float
    apply: ApplyOutcome
    rollback: RollbackOutcome | None = None


# ------------------------------------------------------------------------------- canary
def deny_delta(before: Mapping[Any, int], after: Mapping[Any, int]) -> int:
    total = 0
    for k, a in after.items():
        b = before.get(k, 0)
        total += a - b if a >= b else a  # a counter that went down was reset
    return total


def evaluate_canary(
    deny_counts_before: Mapping[Any, int],
    deny_counts_after: Mapping[Any, int],
    seconds: float,
    *,
    max_deny_rate: float,
) -> bool:
    """True when the canary passes: denies per second over the window <= max_deny_rate."""
    if seconds <= 0:
        raise PolicyError("canary window must be positive")
    return deny_delta(deny_counts_before, deny_counts_after) / seconds <= max_deny_rate


# ------------------------------------------------------------------------------ lifecycle
class Lifecycle:
    """Every change to the kernel's policy: apply, rollback, break-glass, canary and reconcile, over the
    policy maps (pinned or the fake kernel's) and the state dir.  Each operation takes the lifecycle lock
    and writes its outcome, refusals included, to the provenance log.  An apply goes through the steps in
    ``STEPS`` (journal, record, anti-rollback counter, stage, one control word write), so after a crash
    :meth:`reconcile` finds exactly the old or the new generation in force.  Used by ``aegis run``
    (reconcile + apply at start) and ``aegis policy``."""

    def __init__(
        self,
        maps: PolicyMaps,
        root: Path | str | None = None,
        *,
        clock: Callable[[], float] = time.time,
        hook: Callable[[str], None] | None = None,
    ) -> None:
        self.maps = maps
        self.root = Path(root) if root else state_dir()
        self.log = ProvenanceLog(self.root)
        # every record rollback reads is checked against the sha256 its apply logged
        self.store = PolicyStore(self.root, check=self.log.check_record)
        self.trust = TrustStore(self.root, log=self.log)
        self.counter = VersionCounter(self.root)
        self.clock = clock
        self.hook = hook
        self._last_switch = 0.0

    # ---------------------------------------------------------------- helpers
    def _step(self, name: str) -> None:
        if self.hook is not None:
            self.hook(name)

    def _private_dirs(self) -> None:
        """The state dir and the directories holding records and keys are 0700: created so,
        and tightened when an older aegis (or a umask) left them readable by others."""
        private_dir(self.root)
        for d in (self.root, self.store.gen_dir, self.trust.dir):
            # best effort: break-glass must not fail here (a read-only state dir)
            with contextlib.suppress(OSError):
                st = os.stat(d)
                if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                    os.chmod(d, PRIVATE_DIR_MODE)

    @contextlib.contextmanager
    def _locked(self, *, wait_s: float | None = None) -> Iterator[bool]:
        self._private_dirs()
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        got = False
        try:
            if wait_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
                got = True
            else:
                deadline = time.monotonic() + wait_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        got = True
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            break
                        time.sleep(0.05)
            yield got
        finally:
            os.close(fd)

    def set_storm_window(self, window_ns: int) -> None:
        """Write the deny-storm aggregation window (0: off) into the kernel's control entry,
        under the lifecycle lock: an activation rewrites the same entry."""
        with self._locked():
            slots.set_storm_window(self.maps, window_ns)

    @property
    def pending_path(self) -> Path:
        return self.root / PENDING_NAME

    @property
    def break_glass_path(self) -> Path:
        return self.root / BREAK_GLASS_NAME

    def break_glass_state(self) -> dict | None:
        try:
            doc = msgspec.json.decode(self.break_glass_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError):
            return {"reason": "(unreadable break-glass marker)"}
        return doc if isinstance(doc, dict) else {"reason": "(unreadable break-glass marker)"}

    def _write_pending(self, journal: PendingJournal) -> None:
        atomic_write(self.pending_path, msgspec.json.encode(journal))

    def _clear_pending(self) -> None:
        self.pending_path.unlink(missing_ok=True)

    def _active(self) -> tuple[slots.KernelPolicyState, int]:
        st = slots.read_state(self.maps)
        return st, (st.active.generation if st.active.valid else 0)

    def _new_generation(self, st: slots.KernelPolicyState) -> int:
        return max(self.store.next_generation(), max(s.generation for s in st.slots) + 1)

    def _record_refusal(self, action: str, exc: AegisError, info: dict) -> None:
        try:
            self.log.append(action, result="refused", reason=str(exc), **info)
        except StateError as e2:
            raise StateError(f"{exc} (and the refusal could not be recorded: {e2})") from exc

    # ---------------------------------------------------------------- admission
    def admit(
        self, data: bytes, origin: str = "policy", *, mode_override: str | None = None
    ) -> Admission:
        """Parse and verify a policy document (TOML or signed envelope); no side effects."""
        if signing.is_envelope(data):
            vp = signing.verify_envelope(data, self.trust, now=self.clock(), source=origin)
            policy, source, envelope, signer = vp.policy, vp.source, data, vp.key_id
        else:
            policy = model.loads(data, origin)
            source, envelope, signer = data, b"", ""
        mode = mode_override or policy.mode
        if mode == ENFORCE and not signer:
            raise SignatureError(
                f"{origin}: enforce mode requires a signed policy (`aegis policy sign`); "
                "audit mode accepts an unsigned one"
            )
        if mode == AUDIT:
            self._check_leaving_enforce(origin, policy, signer, mode_override)
        bg = self.break_glass_state()
        if mode == ENFORCE and bg is not None:
            raise PolicyError(
                f"break-glass is in effect ({bg.get('reason', '')}); enforce is refused until "
                "`aegis break-glass --clear --reason ...`"
            )
        return Admission(policy, source, envelope, signer, mode, model.policy_digest(policy))

    def enforcing_generation(self) -> int:
        """The generation the kernel enforces now (its active slot valid and in enforce
        mode), 0 when it enforces nothing (no policy, audit, break-glass)."""
        if self.maps is None:  # a dry run without a loaded kernel side
            return 0
        try:
            st, gen = self._active()
        except StateError:
            return 0  # no control entry: nothing is loaded, so nothing enforces
        return gen if st.active.valid and st.active.mode == int(abi.Mode.ENFORCE) else 0

    def _check_leaving_enforce(self, origin: str, policy: model.Policy, signer: str,
                               mode_override: str | None) -> None:
        """Leaving enforce needs the trust entering it needed: while the kernel enforces,
        an audit-mode apply is admitted only when a signature says audit (a signed policy
        whose own mode is audit).  Break-glass is the recorded way out without a key."""
        gen = self.enforcing_generation()
        if not gen:
            return
        exit_ = ("or `aegis break-glass --reason TEXT` (recorded) to stop enforcing in an "
                 "emergency")
        if not signer:
            raise SignatureError(
                f"{origin}: generation {gen} is enforcing; an unsigned policy cannot replace it "
                f"(leaving enforce needs a signature): sign it with `aegis policy sign`, {exit_}"
            )
        if mode_override == AUDIT and policy.mode != AUDIT:
            raise SignatureError(
                f"{origin}: generation {gen} is enforcing; `--mode audit` would leave enforce "
                f"without a signature saying so: sign a new version with mode = \"audit\", {exit_}"
            )

    # ---------------------------------------------------------------- apply
    def apply(
        self, data: bytes, origin: str = "policy", *, mode_override: str | None = None
    ) -> ApplyOutcome:
        with self._locked():
            self._reconcile_locked()
            return self._apply_locked(data, origin, mode_override)

    def _apply_locked(self, data: bytes, origin: str, mode_override: str | None) -> ApplyOutcome:
        def prepare(info: dict[str, Any]) -> _Prepared:
            adm = self.admit(data, origin, mode_override=mode_override)
            info.update(policy=adm.policy.name, version=adm.policy.version, digest=adm.digest,
                        signer=adm.signer_label, mode=adm.mode)
            self._persist_rebuilt_counter()
            self.counter.check(adm.policy.name, adm.policy.version, adm.digest)
            # only an enforced (hence signed) version moves the counter: an audit apply,
            # which root may make unsigned, cannot block later signed versions
            return _Prepared(compiler.compile_policy(adm.policy), adm.mode, adm.signer,
                             adm.source, adm.envelope, move_counter=adm.mode == ENFORCE)

        return self._commit(JournalOp.APPLY, {"origin": origin}, prepare)

    def _commit(self, op: JournalOp, info: dict[str, Any],
                prepare: Callable[[dict[str, Any]], _Prepared]) -> ApplyOutcome:
        """The one way a new generation gets into the kernel (apply and restage): ``prepare``
        admits and compiles it (adding what it learns to ``info``), then the steps of
        ``STEPS``; any refusal discards what was written, restores the counter and is
        recorded as ``op`` ``refused``."""
        recorded_gen = 0
        counter_committed = False
        counter_before = None
        prep: _Prepared | None = None
        try:
            prep = prepare(info)
            compiled = prep.compiled
            st, old_gen = self._active()
            gen = self._new_generation(st)
            info.update(generation=gen, previous_generation=old_gen)
            self._step("verified")
            self._write_pending(PendingJournal(
                op=op, old_generation=old_gen, new_generation=gen,
                policy=compiled.name, version=compiled.version, digest=compiled.digest))
            self._step("pending")
            recorded_gen = gen
            info["record_sha256"] = self.store.record(
                GenerationRecord(gen, self.clock(), compiled, prep.signer, prep.mode),
                prep.source, envelope=prep.envelope,
            )
            self._step("recorded")
            if prep.move_counter:
                counter_before = self.counter.get(compiled.name)
                self.counter.commit(compiled.name, compiled.version, compiled.digest,
                                    now=self.clock())
                counter_committed = True
            self._step("counter")
            slots.wait_grace(self._last_switch)
            staged = slots.stage(self.maps, compiled, gen, _mode_val(prep.mode))
            self._step("staged")
            if prep.mode == ENFORCE and self.break_glass_state() is not None:
                raise PolicyError(f"break-glass was engaged during the {op}; not activated")
            slots.activate(self.maps, staged.slot)
            self._last_switch = time.monotonic()
        except AegisError as exc:
            if recorded_gen:
                self.store.discard(recorded_gen)
            if counter_committed and prep is not None:
                # the kernel refused the generation (e.g. rule map full) before activation:
                # the version was never effective, so it must not stay taken
                self.counter.restore(prep.compiled.name, counter_before)
            self._clear_pending()
            self._record_refusal(op.value, exc, info)
            raise
        except OSError as exc:  # store/journal write failed before activation
            if recorded_gen:
                self.store.discard(recorded_gen)
            self._clear_pending()
            err = StateError(f"cannot write the state dir ({exc}); nothing applied")
            self._record_refusal(op.value, err, info)
            raise err from None
        self._step("activated")
        self.log.append(op.value, slot=staged.slot, **info)
        self._step("logged")
        self._clear_pending()
        return ApplyOutcome(gen, old_gen, staged.slot, compiled, prep.mode, prep.signer)

    # ---------------------------------------------------------------- restage
    def restage_paths(
        self,
        paths: Iterable[str] | None = None,
        *,
        origin: str = "path-watch",
        generation: int | None = None,
        alive: Callable[[CarriedInode], bool | None] | None = None,
        lock_wait_s: float | None = None,
    ) -> RestageOutcome:
        """Follow the active generation's path rules to the inodes their paths name now
        (policy/continuity.py): the same signed policy (digest, version, signer, record
        source and envelope), a new generation through :meth:`_commit`, the anti-rollback
        counter untouched.  ``paths``: the rule paths to re-resolve (None: all); carried
        inodes are checked every time.  ``generation``: restage only if that generation is
        still the active one (the watcher's view may be a step behind an apply).  Nothing
        is written, and no record appended, when nothing moved.  ``lock_wait_s``: give up
        (StateError) when the lifecycle lock stays busy that long (None: wait)."""
        with self._locked(wait_s=lock_wait_s) as got:
            if not got:
                raise StateError(f"the lifecycle lock stayed busy for {lock_wait_s:g}s (another "
                                 "apply, rollback or restage); will retry")
            self._reconcile_locked()
            st, cur = self._active()
            if not st.active.valid or not cur or (generation is not None and cur != generation):
                return RestageOutcome(cur, None, continuity.Reresolved(None))
            rec = self.store.load(cur)  # checked against the digest its apply logged
            policy = self._restage_source(rec)
            found = continuity.reresolve(rec.policy, policy, paths=paths,
                                         alive=alive or continuity.inode_alive)
            if found.compiled is None:
                return RestageOutcome(cur, None, found)
            compiled = found.compiled
            mode = AUDIT if self.break_glass_state() is not None else (rec.mode or rec.policy.mode)
            info: dict[str, Any] = {
                # where the policy came from stays what it was (events' policy_source);
                # ``trigger`` says what restaged it
                "origin": self._origin_of(cur), "trigger": origin,
                "policy": compiled.name, "version": compiled.version,
                "digest": compiled.digest, "signer": rec.signer or "unsigned", "mode": mode,
                "restaged_from": cur,
                "moves": [msgspec.to_builtins(m) for m in found.moves],
                "carried": [continuity.ident(c.dev, c.ino, c.i_generation) for c in found.carried],
                "dropped": [continuity.ident(c.dev, c.ino, c.i_generation) for c in found.dropped],
            }
            if found.problems:
                info["problems"] = [msgspec.to_builtins(p) for p in found.problems]
            source = self.store.source(cur) or b""
            envelope = self.store.envelope(cur) or b""
            out = self._commit(JournalOp.RESTAGE, info, lambda _info: _Prepared(
                compiled, mode, rec.signer, source, envelope, move_counter=False))
            return RestageOutcome(cur, out, found)

    def _origin_of(self, gen: int) -> str:
        """The ``origin`` of the record that made generation ``gen`` ("" if none says)."""
        origin = ""
        for rec in self.log.records():
            if (rec.get("generation") == gen and rec.get("result") == "ok"
                    and rec.get("action") in ("apply", "rollback", "restage")):
                origin = str(rec.get("origin", "") or origin)
        return origin

    def _restage_source(self, rec: GenerationRecord) -> model.Policy:
        """The policy a generation was compiled from (its stored source), checked against the
        record's digest: a restage keeps the rules' ``accept_target`` s."""
        g = rec.generation
        src = self.store.source(g)
        if src is None:
            raise StateError(f"generation {g}: policy source missing from the store; "
                             "cannot restage its path rules (apply the policy again)")
        policy = model.loads(src, f"generation {g}")
        if model.policy_digest(policy) != rec.policy.digest:
            raise StateError(f"generation {g}: stored policy source does not match its record")
        return policy

    def _persist_rebuilt_counter(self) -> None:
        """versions.json was missing or corrupt and the counter was rebuilt from the
        provenance chain (antirollback.py): write it back now, and say so in the log."""
        self.counter.load()
        rb = self.counter.persist_rebuilt()
        if rb is not None:
            self.log.append(
                RESTORE_ACTION,
                reason=f"versions.json {rb.why}: rebuilt from {rb.records} apply records of "
                       "the verified provenance chain",
                versions={n: e.high_water for n, e in sorted(rb.entries.items())})

    # ---------------------------------------------------------------- rollback
    def rollback(
        self,
        *,
        to_version: int | None = None,
        to_generation: int | None = None,
        reason: str = "",
        restore_previous: bool = False,
    ) -> RollbackOutcome:
        """Go back to a stored generation (re-verified).  While the kernel enforces, a
        target that would run in audit must be signed as audit (as for apply);
        ``restore_previous`` is the canary's own undo: it returns to exactly what ran before
        its apply, which was admitted then, so that check does not apply."""
        with self._locked():
            self._reconcile_locked()
            return self._rollback_locked(to_version, to_generation, reason, restore_previous)

    def _pick_target(self, cur_gen: int, to_version: int | None) -> GenerationRecord:
        if not cur_gen:
            raise PolicyError("no policy is active; nothing to roll back from")
        cur = self.store.load(cur_gen).policy
        # choose from the store's index (name, version per generation), load only the winner
        candidates = {g: h for g, h in self.store.heads().items()
                      if g != cur_gen and h.name == cur.name}
        if to_version is not None:
            hits = [g for g, h in candidates.items() if h.version == to_version]
            if not hits:
                raise PolicyError(f"no stored generation of {cur.name} v{to_version}")
        else:
            older = {g: h for g, h in candidates.items() if h.version < cur.version}
            if not older:
                raise PolicyError(f"no stored version of {cur.name} older than v{cur.version}")
            best = max(h.version for h in older.values())
            hits = [g for g, h in older.items() if h.version == best]
        for g in sorted(hits, reverse=True):
            try:
                rec = self.store.load(g)
            except RecordMismatchError:
                raise  # an edited record is refused, not skipped for an older one
            except StateError:
                continue  # unreadable record: the next newest of that version, if any
            if rec.policy.name == cur.name and rec.policy.version == candidates[g].version:
                return rec
        raise PolicyError(f"no readable stored generation of {cur.name} to roll back to")

    def _reverify(self, rec: GenerationRecord, mode: str) -> Admission:
        """Re-verify a stored generation's signature and trust (keys may be revoked since)."""
        g = rec.generation
        env = self.store.envelope(g)
        if env:
            vp = signing.verify_envelope(env, self.trust, now=self.clock(),
                                         source=f"generation {g}")
            if vp.digest != rec.policy.digest:
                raise SignatureError(f"generation {g}: stored envelope does not match its record")
            return Admission(vp.policy, vp.source, env, vp.key_id, mode, vp.digest)
        if rec.signer:
            raise SignatureError(f"generation {g}: signed by {rec.signer!r} but its envelope is "
                                 "missing from the store; cannot re-verify")
        if mode == ENFORCE:
            raise SignatureError(f"generation {g} is unsigned; it cannot be enforced again")
        src = self.store.source(g)
        if src is None:
            raise StateError(f"generation {g}: policy source missing from the store")
        policy = model.loads(src, f"generation {g}")
        return Admission(policy, src, b"", "", mode, model.policy_digest(policy))

    def _rollback_locked(
        self, to_version: int | None, to_generation: int | None, reason: str,
        restore_previous: bool = False,
    ) -> RollbackOutcome:
        info: dict[str, Any] = {}
        if reason:
            info["why"] = reason
        new_rec: int = 0
        try:
            st, cur_gen = self._active()
            info["previous_generation"] = cur_gen
            enforcing = st.active.valid and st.active.mode == int(abi.Mode.ENFORCE)
            if to_generation == 0 and enforcing and not restore_previous:
                raise SignatureError(
                    f"generation {cur_gen} is enforcing; deactivating it needs "
                    "`aegis break-glass --deactivate --reason TEXT` (recorded)")
            if to_generation == 0:
                slots.deactivate_all(self.maps)
                self._last_switch = time.monotonic()
                info.update(generation=0, method="deactivate")
                self.log.append("rollback", **info)
                return RollbackOutcome(0, cur_gen, "deactivate", "", 0, AUDIT)
            if to_generation is not None:
                target = self.store.load(to_generation)
            else:
                target = self._pick_target(cur_gen, to_version)
            mode = target.mode or target.policy.mode
            if self.break_glass_state() is not None:
                mode = AUDIT
            info.update(policy=target.policy.name, version=target.policy.version,
                        digest=target.policy.digest, mode=mode,
                        target_generation=target.generation)
            adm = self._reverify(target, mode)
            info["signer"] = adm.signer_label
            if (mode == AUDIT and enforcing and not restore_previous
                    and not (adm.signer and adm.policy.mode == AUDIT)):
                raise SignatureError(
                    f"generation {cur_gen} is enforcing; rolling back to generation "
                    f"{target.generation} would run it in audit mode, which no signature says "
                    "(leaving enforce needs one): apply a signed audit-mode policy, or "
                    "`aegis break-glass --reason TEXT` (recorded)")
            inactive = st.inactive_slot
            ic = st.slots[inactive]
            if (
                ic.valid
                and ic.generation == target.generation
                and slots.slot_digest(self.maps, inactive)
                == slots.expected_digest(target.policy, inactive)
            ):
                method, gen, slot = "flip", target.generation, inactive
                info.update(generation=gen, method=method)
                self._write_pending(PendingJournal(op=JournalOp.ROLLBACK, old_generation=cur_gen,
                                                   new_generation=gen, new_record=False))
                self._step("pending")
                if ic.mode != _mode_val(mode):
                    slots.set_slot_mode(self.maps, inactive, _mode_val(mode))
                compiled = target.policy
            else:
                method = "reapply"
                compiled = compiler.compile_policy(adm.policy)  # re-resolve paths now
                gen = self._new_generation(st)
                info.update(generation=gen, method=method)
                self._write_pending(PendingJournal(op=JournalOp.ROLLBACK, old_generation=cur_gen,
                                                   new_generation=gen))
                self._step("pending")
                new_rec = gen
                info["record_sha256"] = self.store.record(
                    GenerationRecord(gen, self.clock(), compiled, adm.signer, mode),
                    adm.source, envelope=adm.envelope,
                )
                self._step("recorded")
                slots.wait_grace(self._last_switch)
                slot = slots.stage(self.maps, compiled, gen, _mode_val(mode)).slot
                self._step("staged")
            slots.activate(self.maps, slot)
            self._last_switch = time.monotonic()
        except AegisError as exc:
            if new_rec:
                self.store.discard(new_rec)
            self._clear_pending()
            self._record_refusal("rollback", exc, info)
            raise
        self._step("activated")
        self.log.append("rollback", slot=slot, **info)
        self._step("logged")
        self._clear_pending()
        return RollbackOutcome(gen, cur_gen, method, compiled.name, compiled.version, mode)

    # ---------------------------------------------------------------- canary
    def apply_with_canary(
        self,
        data: bytes,
        origin: str = "policy",
        *,
        mode_override: str | None = None,
        canary_seconds: float,
        max_deny_rate: float,
        read_denies: Callable[[int], Mapping[Any, int]],
        sleep: Callable[[float], None] = time.sleep,
    ) -> CanaryOutcome:
        """Apply, watch the new generation's deny counters, roll back if they run hot."""
        if canary_seconds <= 0 or max_deny_rate < 0:
            raise PolicyError("canary needs canary_seconds > 0 and max_deny_rate >= 0")
        res = self.apply(data, origin, mode_override=mode_override)
        before = dict(read_denies(res.generation))
        sleep(canary_seconds)
        after = dict(read_denies(res.generation))
        rate = deny_delta(before, after) / canary_seconds
        info: dict[str, Any] = dict(policy=res.policy.name, version=res.policy.version,
                    generation=res.generation, deny_rate=round(rate, 3),
                    max_deny_rate=max_deny_rate, canary_seconds=canary_seconds)
        if evaluate_canary(before, after, canary_seconds, max_deny_rate=max_deny_rate):
            self.log.append("canary", **info)
            return CanaryOutcome(True, rate, res)
        why = (f"canary: {rate:.2f} denies/s over {canary_seconds:g}s exceeds "
               f"{max_deny_rate:g}/s")
        self.log.append("canary", result="refused", reason=why, **info)
        _, cur = self._active()
        if cur != res.generation:
            raise StateError(f"{why}; but generation {cur} replaced {res.generation} meanwhile, "
                             "not rolling back")
        rb = self.rollback(to_generation=res.previous_generation, reason=why,
                           restore_previous=True)
        return CanaryOutcome(False, rate, res, rb)

    # ---------------------------------------------------------------- break-glass
    def break_glass(self, reason: str, *, deactivate: bool = False) -> BreakGlassOutcome:
        """Stop denying now.  Never blocked by a stuck lock or a broken log: the map writes
        come first; problems recording them are returned, not raised."""
        if not reason.strip():
            raise PolicyError("break-glass needs --reason")
        problems: list[str] = []
        with self._locked(wait_s=2.0) as got:
            if not got:
                problems.append("lifecycle lock busy; proceeded without it")
            st, gen = self._active()
            if deactivate:
                slots.deactivate_all(self.maps)
                method = "deactivate"
            else:
                order = (st.active_slot, st.inactive_slot)
                for s in order:
                    if st.slots[s].valid or s == st.active_slot:
                        slots.set_slot_mode(self.maps, s, int(abi.Mode.AUDIT))
                method = "audit"
            self._last_switch = time.monotonic()
            now = self.clock()
            try:
                atomic_write(self.break_glass_path, msgspec.json.encode(
                    {"since": now, "reason": reason, "uid": os.getuid(), "method": method}))
            except OSError as exc:
                problems.append(f"cannot write {self.break_glass_path}: {exc}")
            try:
                self.log.append("break-glass", reason=reason, generation=gen, method=method)
            except StateError as exc:
                problems.append(str(exc))
        return BreakGlassOutcome(gen, method, problems)

    def clear_break_glass(self, reason: str) -> None:
        if not reason.strip():
            raise PolicyError("clearing break-glass needs --reason")
        with self._locked():
            if self.break_glass_state() is None:
                raise PolicyError("break-glass is not in effect")
            self.break_glass_path.unlink()
            self.log.append("break-glass-clear", reason=reason)

    # ---------------------------------------------------------------- reconcile
    def reconcile(self) -> ReconcileOutcome:
        with self._locked():
            return self._reconcile_locked()

    def _reconcile_locked(self) -> ReconcileOutcome:
        pending: PendingJournal | None
        try:
            pending = _journal_decoder.decode(self.pending_path.read_bytes())
        except FileNotFoundError:
            _, gen = self._active()
            return ReconcileOutcome("clean", "none", gen)
        except (OSError, msgspec.DecodeError):  # corrupt, truncated or not a journal
            pending = None
        st, active = self._active()
        if pending is None:
            self.log.append("reconcile", result="refused", generation=active,
                            reason="unreadable lifecycle journal; discarded")
            self._clear_pending()
            return ReconcileOutcome("inconsistent", "unknown", active, "unreadable journal")
        op, old, new = pending.op, pending.old_generation, pending.new_generation
        last = self.log.last()
        if (
            active == new
            and last is not None
            and last.get("action") == op
            and last.get("result") == "ok"
            and last.get("generation") == new
        ):
            self._clear_pending()  # crashed after logging: nothing left to do
            return ReconcileOutcome("clean", "new", new)
        digest: str | None = None
        if active == new and new != old:
            effective, status = "new", "recovered"
            detail = f"interrupted {op} had completed: new generation {new} is effective"
            if pending.new_record:  # its apply record was never written: vouch for it here
                with contextlib.suppress(OSError):
                    digest = record_digest((self.store.gen_dir / f"{new}.json").read_bytes())
        elif active == old:
            effective, status = "old", "recovered"
            detail = f"interrupted {op} did not complete: old generation {old} is effective"
            self._undo_unactivated(st, pending)
        else:
            effective, status = "unknown", "inconsistent"
            detail = (f"interrupted {op}: kernel runs generation {active}, neither old {old} "
                      f"nor new {new}")
        self.log.append(
            "reconcile", result="ok" if status == "recovered" else "refused", reason=detail,
            interrupted=op, effective=effective, generation=active, previous_generation=old,
            new_generation=new, record_sha256=digest,
        )
        self._clear_pending()
        return ReconcileOutcome(status, effective, active, detail)

    def _undo_unactivated(self, st: slots.KernelPolicyState, pending: PendingJournal) -> None:
        new = pending.new_generation
        if not new or not pending.new_record:
            return  # a flip-rollback's target is an existing generation: keep slot and record
        ic = st.slots[st.inactive_slot]
        if ic.generation == new and st.active.generation != new:
            slots.clear_slot(self.maps, st.inactive_slot)  # half- or fully-staged, never active
        self.store.discard(new)


def reconcile(maps: PolicyMaps, store: PolicyStore | None = None) -> ReconcileOutcome:
    """Startup reconciliation after a crash (see :meth:`Lifecycle.reconcile`)."""
    return Lifecycle(maps, store.root if store is not None else None).reconcile()
