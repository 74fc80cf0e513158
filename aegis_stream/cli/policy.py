"""CLI for the policy lifecycle: sign/verify/lint/log/rollback, keys, break-glass, and the
``policy apply`` handler with signed envelopes, ``--dry-run`` and canary.

cli.py wires it::

    add_policy_lifecycle_commands(pol, sub)     # pol: the `policy` subparsers, sub: top level
    add_policy_apply_arguments(pa)              # pa: the `policy apply` parser
    pa.set_defaults(func=cmd_policy_apply)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec

from aegis_stream import inputs, textsafe
from aegis_stream.errors import AegisError, NoAgentError, PolicyError, StateError
from aegis_stream.textsafe import echo  # every human line escaped (attacker-named paths, comms)

EXIT_OK, EXIT_ERROR = 0, 1

DenyReader = Callable[[int], Mapping[Any, int]]


# ------------------------------------------------------------------------ kernel access
@contextlib.contextmanager
def _kernel() -> Iterator[tuple[Any, DenyReader]]:
    """(PolicyMaps of the pinned agent, per-generation deny-count reader).  Tests replace
    this with fake maps."""
    from aegis_stream.kernel.counters import read_counters
    from aegis_stream.kernel.loader import open_pinned

    pinned = open_pinned()

    def denies(gen: int) -> dict[Any, int]:
        return {
            (r["rule_id"], r["hook"]): r["denied"]
            for r in read_counters(pinned.maps)["rules"]
            if r["generation"] == gen
        }

    try:
        yield pinned.policy_maps(), denies
    finally:
        pinned.close()


def _read(path: str, limit: inputs.Limit | None = None, what: str = "policy") -> bytes:
    """A regular file within its input limit (docs/INPUT_LIMITS.md): a FIFO, /dev/zero or an
    over-size file is one line, never a hang or an out-of-memory."""
    return inputs.read_bounded(path, limit or inputs.ENVELOPE_BYTES, what, PolicyError)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PolicyError(f"{what} must run as root")


# ------------------------------------------------------------------------ policy apply
def add_policy_apply_arguments(pa: argparse.ArgumentParser) -> None:
    """Extra `policy apply` flags (the parser already has FILE and --mode)."""
    pa.add_argument("--dry-run", action="store_true",
                    help="show what would change (and what --events would deny); change nothing")
    pa.add_argument("--events", metavar="LOG",
                    help="with --dry-run: JSON-lines event log to replay against the new policy")
    pa.add_argument("--canary-seconds", type=float, default=0.0,
                    help="watch the new generation's deny counters this long after applying")
    pa.add_argument("--max-deny-rate", type=float, default=None,
                    help="with --canary-seconds: roll back if denies/s exceed this")


def cmd_policy_apply(args: argparse.Namespace) -> int:
    from aegis_stream.policy.lifecycle import Lifecycle

    data = _read(args.file)
    if getattr(args, "dry_run", False):
        return _dry_run(args, data)
    if getattr(args, "events", None):
        raise PolicyError("--events needs --dry-run")
    canary = float(getattr(args, "canary_seconds", 0) or 0)
    max_rate = getattr(args, "max_deny_rate", None)
    if (canary > 0) != (max_rate is not None):
        raise PolicyError("--canary-seconds and --max-deny-rate go together")
    with _kernel() as (maps, denies):
        lc = Lifecycle(maps)
        if canary > 0:
            assert max_rate is not None
            out = lc.apply_with_canary(data, args.file, mode_override=args.mode,
                                       canary_seconds=canary, max_deny_rate=max_rate,
                                       read_denies=denies)
            res = out.apply
        else:
            res = lc.apply(data, args.file, mode_override=args.mode)
            out = None
    cp = res.policy
    echo(
        f"applied {cp.name} v{cp.version}: generation {res.generation} "
        f"(was {res.previous_generation}), slot {res.slot}, mode {res.mode}, "
        f"signed by {res.signer or 'nobody (unsigned)'}, {len(cp.rules)} rules, "
        f"{'host-wide' if cp.host_scope else f'{len(cp.scopes)} scopes'}"
    )
    if not res.signer:
        echo("note: unsigned policy accepted because it runs in audit mode; "
              "enforce mode requires a signed envelope")
    if out is not None:
        if out.passed:
            echo(f"canary passed: {out.deny_rate:.2f} denies/s over {canary:g}s")
        else:
            rb = out.rollback
            assert rb is not None
            raise PolicyError(
                f"canary failed ({out.deny_rate:.2f} denies/s > {max_rate:g}/s): rolled back "
                f"to generation {rb.generation} ({rb.method})"
            )
    return EXIT_OK


def _dry_run(args: argparse.Namespace, data: bytes) -> int:
    from aegis_stream.kernel import abi, slots
    from aegis_stream.policy import compiler, dryrun, model, signing
    from aegis_stream.policy.lifecycle import Lifecycle
    from aegis_stream.policy.provenance import checked_store
    from aegis_stream.policy.store import PolicyStore

    lines: list[str] = []
    refused = False
    lc = Lifecycle(None)  # type: ignore[arg-type]  # admission needs no maps
    try:
        adm = lc.admit(data, args.file, mode_override=args.mode)
        policy, mode = adm.policy, adm.mode
        lines.append(f"signature: {'valid, key ' + adm.signer if adm.signer else 'unsigned'}"
                     f"; mode {mode}")
    except PolicyError as exc:
        refused = True
        lines.append(f"WOULD BE REFUSED: {exc}")
        if signing.is_envelope(data):
            env = signing.parse_envelope(data, args.file)
            policy = model.loads(env.policy.encode(), args.file)
        else:
            policy = model.loads(data, args.file)
        mode = args.mode or policy.mode
    try:
        lc.counter.check(policy.name, policy.version, model.policy_digest(policy))
        lines.append(f"version: v{policy.version} passes anti-rollback")
    except PolicyError as exc:
        refused = True
        lines.append(f"WOULD BE REFUSED: {exc}")
    new = compiler.compile_policy(policy)
    store = checked_store(PolicyStore())  # the diff's base must be the record as applied
    old = None
    old_mode = ""
    try:
        with _kernel() as (maps, _):
            st = slots.read_state(maps)
        if st.active.valid:
            rec = store.load(st.active.generation)
            old, old_mode = rec.policy, abi.Mode(st.active.mode).label
            lines.append(f"active: generation {st.active.generation}")
        else:
            lines.append("active: no policy")
    except NoAgentError:
        gens = store.generations()
        if gens:
            rec = store.load(gens[-1])
            old, old_mode = rec.policy, rec.mode or rec.policy.mode
            lines.append(f"no agent loaded: diff against the latest stored generation {gens[-1]}")
        else:
            lines.append("no agent loaded and no stored generation")
    lines += dryrun.render_diff(dryrun.diff_policies(old, new, old_mode=old_mode, new_mode=mode))
    if args.events:
        ev = _read(args.events, inputs.EVENTS_LOG_BYTES, "event log").splitlines()
        rep = dryrun.replay_events(ev, new, old, new_mode=mode)
        lines += dryrun.render_replay(rep, args.events)
    lines.append("dry run: nothing was changed")
    print(textsafe.join(lines))
    return EXIT_ERROR if refused else EXIT_OK


# ------------------------------------------------------------------------ sign / verify
def cmd_policy_sign(args: argparse.Namespace) -> int:
    from aegis_stream.policy import signing

    key, file_id = signing.load_private_key(args.key)
    key_id = args.key_id or file_id
    if not key_id:
        raise PolicyError(f"{args.key}: no 'aegis-key-id:' line; pass --key-id")
    env = signing.sign_policy(_read(args.file), key, key_id, expires_in_days=args.expires_in,
                              source_name=args.file)
    out = Path(args.out or f"{args.file}.signed")
    try:
        out.write_bytes(env)
    except OSError as exc:
        raise PolicyError(f"{out}: cannot write: {exc.strerror}") from None
    meta = signing.parse_envelope(env).signature
    echo(f"signed {meta.policy_name} v{meta.policy_version} ({meta.policy_digest}) with key "
          f"{key_id}, expires {_iso(meta.expires_at)}: {out}")
    return EXIT_OK


def cmd_policy_verify(args: argparse.Namespace) -> int:
    from aegis_stream.policy import signing
    from aegis_stream.policy.antirollback import VersionCounter
    from aegis_stream.policy.trust import TrustStore

    vp = signing.verify_envelope(_read(args.file), TrustStore(), source=args.file)
    echo(f"valid: {vp.policy.name} v{vp.policy.version} ({vp.digest}) signed by {vp.key_id} "
          f"at {_iso(vp.issued_at)}, expires {_iso(vp.expires_at)}")
    try:
        VersionCounter().check(vp.policy.name, vp.policy.version, vp.digest)
    except PolicyError as exc:
        echo(f"note: apply would refuse it: {exc}")
    return EXIT_OK


# ------------------------------------------------------------------------ lint
def cmd_policy_lint(args: argparse.Namespace) -> int:
    from aegis_stream.policy import lint, signing
    from aegis_stream.policy.store import atomic_write

    data = _read(args.file)
    source = args.file
    if signing.is_envelope(data):
        if args.fix:
            raise PolicyError(f"{args.file}: a signed envelope cannot be fixed in place; fix the "
                              "policy source and sign it again")
        data = signing.parse_envelope(data, args.file).policy.encode()
        source = f"{args.file} (embedded policy)"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise PolicyError(f"{args.file}: not UTF-8") from None
    check_fs = not getattr(args, "no_fs", False)
    if args.fix:
        new, changes = lint.fix_text(text)
        for c in changes:
            echo(f"fix: {c}")
        if new != text:
            p = Path(args.file)
            mode = p.stat().st_mode & 0o7777
            atomic_write(p, new.encode())
            os.chmod(p, mode)
            echo(f"fix: rewrote {args.file} (rule order kept: it is the kernel rule index); "
                  "re-sign it before applying in enforce mode")
            text = new
        elif not changes:
            echo("fix: nothing to fix")
    rep = lint.lint_text(text, source, check_fs=check_fs)
    print(textsafe.join(rep.render()))
    return EXIT_ERROR if rep.errors else EXIT_OK


# ------------------------------------------------------------------------ log
def cmd_policy_log(args: argparse.Namespace) -> int:
    from aegis_stream.policy.provenance import ProvenanceLog

    log = ProvenanceLog()
    if args.verify:
        kernel_gen, note = _kernel_generation()
        if note:
            echo(note)
        res = log.verify(kernel_generation=kernel_gen)
        if not res.ok:
            raise StateError(f"{log.path}:{res.bad_line}: {res.reason} "
                             f"({res.records} records verified before it)")
    lines = log.lines()
    if args.tail:
        lines = lines[-args.tail:]
    for raw in lines:
        if args.json:
            sys.stdout.write(raw.decode(errors="replace") + "\n")
            continue
        try:
            r = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            echo(f"(unreadable line) {raw[:80].decode(errors='replace')}")
            continue
        pol = f" {r['policy']} v{r.get('version', '?')}" if "policy" in r else ""
        gen = ""
        if "generation" in r:
            gen = f" gen {r['generation']}"
            if "previous_generation" in r:
                gen += f" (was {r['previous_generation']})"
        extra = f" signer={r['signer']}" if "signer" in r else ""
        extra += f" key={r['key_id']}" if "key_id" in r else ""
        extra += f" method={r['method']}" if "method" in r else ""
        why = f": {r['reason']}" if r.get("reason") else ""
        echo(f"{r.get('seq', '?'):>5} {r.get('time', '?')} {r.get('user', '?')}@"
              f"{r.get('host', '?')} {r.get('action', '?')} {r.get('result', '?')}"
              f"{pol}{gen}{extra}{why}")
    if args.verify:
        echo(f"verified: {res.records} records, hash chain intact")
    return EXIT_OK


def _kernel_generation() -> tuple[int, str]:
    """(the generation the pinned kernel state enforces, 0 for none; a note when it could
    not be read): the log must account for it."""
    from aegis_stream.kernel import slots

    try:
        with _kernel() as (maps, _):
            st = slots.read_state(maps)
    except NoAgentError:
        return 0, ""
    except (AegisError, OSError) as exc:
        return 0, f"note: the kernel's active generation was not checked against the log ({exc})"
    return (st.active.generation if st.active.valid else 0), ""


# ------------------------------------------------------------------------ rollback
def cmd_policy_rollback(args: argparse.Namespace) -> int:
    from aegis_stream.policy.lifecycle import Lifecycle

    with _kernel() as (maps, _):
        rb = Lifecycle(maps).rollback(to_version=args.to, reason=args.reason or "")
    how = {"flip": "instant slot flip", "reapply": "re-applied from the store",
           "deactivate": "no policy"}[rb.method]
    echo(f"rolled back to {rb.policy_name} v{rb.version}: generation {rb.generation} "
          f"(was {rb.previous_generation}), {how}, mode {rb.mode}")
    return EXIT_OK


# ------------------------------------------------------------------------ keys
def cmd_keys_generate(args: argparse.Namespace) -> int:
    from aegis_stream.policy import signing

    k = signing.generate_keypair(args.id, args.out)
    echo(f"generated key {k.key_id} ({k.fingerprint})",
         f"  private: {k.private_path} (0600; keep it off the hosts that enforce)",
         f"  public:  {k.public_path}",
         f"trust it on each host with: aegis keys add {k.public_path} --id {k.key_id}")
    return EXIT_OK


def cmd_keys_add(args: argparse.Namespace) -> int:
    from aegis_stream.policy.trust import TrustStore

    pub = _read(args.pubfile, inputs.KEY_FILE_BYTES, "public key")
    st = TrustStore().add(pub, args.id or "", source=args.pubfile,
                          expires_in_days=args.expires_in or 0)
    echo(f"trusted key {st.key_id} ({st.fingerprint}), expires {_iso(st.expires_at)}")
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    from aegis_stream.policy.trust import TrustStore

    keys = TrustStore().list()
    if args.json:
        print(msgspec.json.encode([k.__dict__ for k in keys]).decode())
        return EXIT_OK
    if not keys:
        echo("no trusted keys (enforce mode will refuse every policy)")
    for k in keys:
        extra = f" revoked {_iso(k.revoked_at)}: {k.revoke_reason}" if k.revoked_at else ""
        echo(f"{k.key_id:<24} {k.status:<8} {k.fingerprint} added {_iso(k.added_at)} "
              f"expires {_iso(k.expires_at)}{extra}")
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from aegis_stream.policy.store import PolicyStore
    from aegis_stream.policy.trust import TrustStore

    st = TrustStore().revoke(args.id, args.reason)
    echo(f"revoked key {st.key_id} ({st.fingerprint}): {args.reason}")
    store = PolicyStore()
    signed = [g for g in store.generations()[-5:] if _signer(store, g) == args.id]
    if signed:
        echo(f"warning: recent generations {signed} were signed by {args.id}; what the kernel "
              "runs now is unchanged, but applying or rolling back to them is refused. Re-sign "
              "with a valid key and apply a new version.")
    return EXIT_OK


def _signer(store: Any, gen: int) -> str:
    try:
        return str(store.load(gen).signer)
    except AegisError:
        return ""


# ------------------------------------------------------------------------ break-glass
def cmd_break_glass(args: argparse.Namespace) -> int:
    from aegis_stream.policy.lifecycle import Lifecycle

    _require_root("break-glass")
    if args.clear:
        with _kernel() as (maps, _):
            Lifecycle(maps).clear_break_glass(args.reason)
        echo("break-glass cleared; enforcement stays off until a policy is applied or "
              "rolled back in enforce mode")
        return EXIT_OK
    with _kernel() as (maps, _):
        out = Lifecycle(maps).break_glass(args.reason, deactivate=args.deactivate)
    what = ("every hook allows (policy deactivated)" if out.method == "deactivate"
            else "both slots switched to audit (nothing is denied; events still flow)")
    echo(f"BREAK-GLASS: enforcement is OFF, generation {out.generation}: {what}")
    if out.problems:
        raise StateError("enforcement is off, but: " + "; ".join(out.problems))
    return EXIT_OK


# ------------------------------------------------------------------------ registration
def add_policy_lifecycle_commands(policy_subparsers: Any, top_subparsers: Any) -> None:
    from aegis_stream.policy.signing import DEFAULT_EXPIRES_DAYS

    pol = policy_subparsers
    s = pol.add_parser("sign", help="sign a policy with an Ed25519 key (writes FILE.signed)")
    s.add_argument("file")
    s.add_argument("--key", required=True, help="private key file (from `aegis keys generate`)")
    s.add_argument("--key-id", help="key id, when the key file does not name it")
    s.add_argument("--out", help="envelope path (default FILE.signed)")
    s.add_argument("--expires-in", type=float, default=DEFAULT_EXPIRES_DAYS, metavar="DAYS",
                   help=f"signature lifetime in days (default {DEFAULT_EXPIRES_DAYS})")
    s.set_defaults(func=cmd_policy_sign)

    v = pol.add_parser("verify", help="verify a signed policy against the trust store")
    v.add_argument("file")
    v.set_defaults(func=cmd_policy_verify)

    li = pol.add_parser("lint", help="check a policy; every problem with its line")
    li.add_argument("file")
    li.add_argument("--fix", action="store_true",
                    help="dedupe repeated actions, remove exact duplicate rules")
    li.add_argument("--no-fs", action="store_true",
                    help="skip checks that look at this host's files and mounts")
    li.set_defaults(func=cmd_policy_lint)

    lg = pol.add_parser("log", help="the provenance log (hash-chained)")
    lg.add_argument("--verify", action="store_true",
                    help="check the hash chain; fail naming the first bad line")
    lg.add_argument("--json", action="store_true")
    lg.add_argument("--tail", type=int, default=0, metavar="N")
    lg.set_defaults(func=cmd_policy_log)

    rb = pol.add_parser("rollback", help="go back to an earlier version (re-verified)")
    rb.add_argument("--to", type=int, metavar="VERSION",
                    help="policy version (default: the newest one older than the active)")
    rb.add_argument("--reason", default="")
    rb.set_defaults(func=cmd_policy_rollback)

    keys = top_subparsers.add_parser("keys", help="policy signing keys (trust store)")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    kg = ks.add_parser("generate", help="new Ed25519 key pair: ID.key (0600) and ID.pub")
    kg.add_argument("--id", required=True)
    kg.add_argument("--out", default=".", metavar="DIR")
    kg.set_defaults(func=cmd_keys_generate)
    kl = ks.add_parser("list", help="trusted and revoked keys")
    kl.add_argument("--json", action="store_true")
    kl.set_defaults(func=cmd_keys_list)
    ka = ks.add_parser("add", help="trust a public key")
    ka.add_argument("pubfile")
    ka.add_argument("--id", help="key id (default: the file's aegis-key-id line)")
    ka.add_argument("--expires-in", type=float, default=0, metavar="DAYS",
                    help="stop trusting the key after DAYS (default: until revoked)")
    ka.set_defaults(func=cmd_keys_add)
    kr = ks.add_parser("revoke", help="revoke a key (permanently)")
    kr.add_argument("id")
    kr.add_argument("--reason", required=True)
    kr.set_defaults(func=cmd_keys_revoke)

    bg = top_subparsers.add_parser("break-glass",
                                   help="emergency: stop enforcing now (root, recorded)")
    bg.add_argument("--reason", required=True)
    bg.add_argument("--deactivate", action="store_true",
                    help="invalidate the policy instead of switching it to audit")
    bg.add_argument("--clear", action="store_true",
                    help="end break-glass (does not re-enable enforcement by itself)")
    bg.set_defaults(func=cmd_break_glass)
