"""``aegis lab ...`` and ``python -m aegis_stream.lab``: list and fetch kernels, run a
command in one."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from aegis_stream.errors import LabError
from aegis_stream.lab import kernels
from aegis_stream.lab.vm import DEFAULT_TIMEOUT, LabTimeout, lab_exec, stream_writer


def cmd_lab_kernels(args: argparse.Namespace) -> int:
    """``aegis lab kernels [--fetch] [--refresh]``: list the series, fetched or not."""
    cache = getattr(args, "cache", None)
    if getattr(args, "fetch", False) or getattr(args, "refresh", False):
        kernels.fetch_all(
            cache,
            refresh=getattr(args, "refresh", False),
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    have: dict[str, kernels.LabKernel] = {}
    for k in kernels.list_kernels(cache):
        have.setdefault(k.series, k)
    print(f"{'SERIES':<7} {'SUITE':<9} {'VERSION':<26} VMLINUZ")
    for series, suite in kernels.KERNELS.items():
        got = have.get(series)
        if got:
            print(f"{series:<7} {suite:<9} {got.version:<26} {got.vmlinuz}")
        else:
            print(f"{series:<7} {suite:<9} {'(not fetched)':<26} -")
    return 0


def cmd_lab_exec(
    kernel_series: str,
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    cache: str | os.PathLike[str] | None = None,
    fetch: bool = False,
    verbose: bool = False,
    qemu_opts: str | Sequence[str] = (),
) -> int:
    """``aegis lab exec [--kernel SERIES] -- CMD...``: run CMD in the guest, return its rc.

    The command's stdout/stderr stream to ours while it runs; a one-line summary (kernel,
    exit status, boot and total time) goes to stderr.  2 = the lab could not run, 124 =
    timeout, else the command's own exit status.  ``verbose`` also prints the guest's
    serial console (boot log) afterwards.
    """
    argv = list(argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]

    err = stream_writer(sys.stderr)
    try:
        k = kernels.fetch_kernel(kernel_series, cache) if fetch else kernels.find_kernel(kernel_series, cache)
        res = lab_exec(k, argv, timeout=timeout, stream=True, qemu_opts=qemu_opts)
    except LabTimeout as e:
        if verbose:
            err(e.console)
        print(f"aegis lab: {e}", file=sys.stderr)
        return 124
    except LabError as e:
        print(f"aegis lab: {e}", file=sys.stderr)
        return 2
    if verbose:
        err(res.console)
    boot = f"command started {res.boot_seconds:.1f}s after boot, " if res.boot_seconds else ""
    print(
        f"[lab] {k.version}: exit {res.returncode} ({boot}{res.seconds:.1f}s in all)",
        file=sys.stderr,
    )
    return res.returncode


def add_lab_subparsers(subparsers) -> None:
    """Register ``kernels`` and ``exec`` on ``subparsers`` (of the ``aegis lab`` parser).

    Each sets ``func`` to a callable taking the parsed Namespace and returning an exit code.
    """
    p = subparsers.add_parser("kernels", help="list lab kernels (fetched or not)")
    p.add_argument("--fetch", action="store_true", help="download all missing series")
    p.add_argument(
        "--refresh", action="store_true", help="update apt lists and fetch newer kernels if any"
    )
    p.add_argument(
        "--cache",
        default=None,
        help=f"kernel cache (default $AEGIS_KERNEL_CACHE or {kernels.DEFAULT_CACHE})",
    )
    p.set_defaults(func=cmd_lab_kernels)

    e = subparsers.add_parser("exec", help="boot a lab kernel and run a command as root in it")
    e.add_argument("--kernel", default=kernels.DEFAULT_SERIES, choices=list(kernels.KERNELS))
    e.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    e.add_argument("--fetch", action="store_true", help="fetch the kernel if missing")
    e.add_argument("--cache", default=None)
    e.add_argument("-v", "--verbose", action="store_true", help="show the guest's boot log")
    e.add_argument("--qemu-opts", default="", metavar="OPTS",
                   help='extra QEMU arguments, e.g. --qemu-opts="-icount shift=0"')
    e.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    e.set_defaults(
        func=lambda a: cmd_lab_exec(
            a.kernel, a.argv, timeout=a.timeout, cache=a.cache, fetch=a.fetch, verbose=a.verbose,
            qemu_opts=a.qemu_opts,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aegis_stream.lab")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_lab_subparsers(sub)
    f = sub.add_parser("fetch", help="fetch kernels into the cache")
    f.add_argument("series", nargs="*", help=f"series to fetch ({', '.join(kernels.KERNELS)})")
    f.add_argument("--all", action="store_true")
    f.add_argument("--refresh", action="store_true")
    f.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        series = list(kernels.KERNELS) if args.all or not args.series else args.series
        try:
            for s in series:
                k = kernels.fetch_kernel(
                    s,
                    args.cache,
                    refresh=args.refresh,
                    log=lambda m: print(m, file=sys.stderr, flush=True),
                )
                print(f"{k.series}\t{k.version}\t{k.vmlinuz}")
        except LabError as e:
            print(f"aegis lab: {e}", file=sys.stderr)
            return 2
        return 0
    return int(args.func(args))
