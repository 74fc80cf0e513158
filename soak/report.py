#!/usr/bin/env python3
"""Render a soak.json (soak/driver.py) as soak.md and PNG plots next to it.

    python -m soak.report [--regate] results/soak/<run>/soak.json   (from the repository root)

--regate recomputes the resources and gates with the current soak/driver.py first.

Plots (matplotlib, the optional `soak` dependency group; skipped with a note when it is
missing): drop rate per class over time, consumer lag and delivery latency over time, and
agent RSS and CPU over time; flood windows are shaded, agent restarts are vertical lines.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RECORD_BYTES = 104


def series(doc: dict) -> dict[str, list]:
    """Per-interval rates from the cumulative samples."""
    s = doc["samples"]
    out: dict[str, list] = {k: [] for k in (
        "t", "emitted_deny", "emitted_audit", "kdrop_deny", "kdrop_audit", "udrop_deny",
        "udrop_audit", "lag_deny", "lag_audit", "rss_mb", "cpu_pct", "delivered_rate")}
    prev = None
    for cur in s:
        if prev is not None and cur["t"] > prev["t"]:
            dt = cur["t"] - prev["t"]
            out["t"].append(cur["t"])
            for klass, ctr in (("deny", "denied"), ("audit", "audited")):
                em = cur[ctr] - prev[ctr]
                reached = (cur[f"{klass}_prod"] - prev[f"{klass}_prod"]) // RECORD_BYTES
                out[f"emitted_{klass}"].append(em / dt)
                out[f"kdrop_{klass}"].append(max(0, em - reached) / dt)
                ud = 0
                if cur.get("agent") == prev.get("agent") and "m_drops" in cur and "m_drops" in prev:
                    for key, v in cur["m_drops"].items():
                        if key.startswith(klass + "/") and "/kernel/" not in key:
                            ud += max(0, v - prev["m_drops"].get(key, 0))
                out[f"udrop_{klass}"].append(ud / dt)
                out[f"lag_{klass}"].append(cur[f"{klass}_prod"] - cur[f"{klass}_cons"])
            out["rss_mb"].append(cur["rss"] / 2**20 if "rss" in cur else None)
            if "cpu_s" in cur and "cpu_s" in prev and cur.get("agent") == prev.get("agent"):
                out["cpu_pct"].append(100 * (cur["cpu_s"] - prev["cpu_s"]) / dt)
            else:
                out["cpu_pct"].append(None)
            out["delivered_rate"].append(
                (cur["delivered_deny"] + cur["delivered_audit"] - prev["delivered_deny"]
                 - prev["delivered_audit"]) / dt)
        prev = cur
    return out


def plots(doc: dict, outdir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    se = series(doc)
    t = se["t"]
    floods = [(f["flood_start"], f.get("drained", f.get("flood_end", f["flood_start"])))
              for f in doc["floods"] if "flood_start" in f]
    restarts = [i["stop_sent"] for i in doc["incarnations"] if i["stop_sent"]]

    def marks(ax) -> None:
        for a, b in floods:
            ax.axvspan(a, b, color="orange", alpha=0.15, lw=0)
        for r in restarts:
            ax.axvline(r, color="grey", ls=":", lw=1)
        ax.set_xlabel("seconds (shaded: audit flood; dotted: agent stop or restart)")
        ax.grid(alpha=0.3)

    files = []
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for ax, klass in zip(axes, ("deny", "audit"), strict=True):
        em = se[f"emitted_{klass}"]
        kd = [d / e if e else 0 for d, e in zip(se[f"kdrop_{klass}"], em, strict=True)]
        ud = [d / e if e else 0 for d, e in zip(se[f"udrop_{klass}"], em, strict=True)]
        ax.plot(t, [100 * x for x in kd], label="kernel: ring full", color="tab:red")
        ax.plot(t, [100 * x for x in ud], label="agent (reported, by stage)", color="tab:purple")
        ax.set_ylabel(f"{klass} drop rate %")
        ax2 = ax.twinx()
        ax2.plot(t, em, color="tab:blue", alpha=0.35, lw=0.8, label="emitted/s")
        ax2.set_ylabel("emitted events/s")
        ax.legend(loc="upper left", fontsize=8)
        marks(ax)
    axes[0].set_title(f"Drop rate per interval — {doc['meta']['kernel']}")
    fig.tight_layout()
    fig.savefig(outdir / "drop_rate.png", dpi=110)
    files.append("drop_rate.png")
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    axes[0].plot(t, [x / 1024 for x in se["lag_deny"]], label="deny ring (1 MiB)")
    axes[0].plot(t, [x / 1024 for x in se["lag_audit"]], label="audit ring (4 MiB)")
    axes[0].set_ylabel("consumer lag, KiB")
    axes[0].legend(fontsize=8)
    marks(axes[0])
    lat = doc.get("latency_ms", [])
    if lat:
        axes[1].scatter([x[0] for x in lat], [x[1] for x in lat], s=4, alpha=0.5)
        axes[1].set_yscale("log")
    axes[1].set_ylabel("decision -> file, ms (sampled)")
    marks(axes[1])
    axes[0].set_title("Consumer lag and delivery latency")
    fig.tight_layout()
    fig.savefig(outdir / "lag.png", dpi=110)
    files.append("lag.png")
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    axes[0].plot(t, [x if x is not None else float("nan") for x in se["rss_mb"]], color="tab:green")
    axes[0].axhline(doc["meta"]["args"].get("rss_budget_mb", 80), color="red", ls="--", lw=1,
                    label="budget")
    axes[0].set_ylabel("agent RSS, MB")
    axes[0].legend(fontsize=8)
    marks(axes[0])
    axes[1].plot(t, [x if x is not None else float("nan") for x in se["cpu_pct"]], color="tab:brown",
                 label="agent CPU %")
    axes[1].set_ylabel("agent CPU % (of one vCPU)")
    ax2 = axes[1].twinx()
    ax2.plot(t, se["delivered_rate"], color="tab:blue", alpha=0.35, lw=0.8)
    ax2.set_ylabel("delivered events/s")
    marks(axes[1])
    axes[0].set_title("Agent resources")
    fig.tight_layout()
    fig.savefig(outdir / "rss.png", dpi=110)
    files.append("rss.png")
    plt.close(fig)
    return files


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def markdown(doc: dict, pngs: list[str]) -> str:
    m, acc, res, can, g = doc["meta"], doc["accounting"], doc["resources"], doc["canary"], doc["gates"]
    a = m["args"]
    L = [f"# Soak: {m['kernel']} ({m['duration']:.0f} s)", ""]
    failed = [k for k, v in g.items() if not v["pass"]]
    L.append(f"**{'FAILED: ' + ', '.join(failed) if failed else 'All gates passed'}.**  "
             f"CPU `{m['cpu_model']}` × {m['nproc']} (QEMU TCG), {m['mem_total_kb'] // 1024} MiB; "
             f"swaps every {a['swap_every']:g} s, agent restart every {a['restart_every']:g} s"
             f"{' (every ' + str(a['kill_every']) + 'th SIGKILL)' if a['kill_every'] else ''}, "
             f"audit flood every {a['flood_every']:g} s for {a['flood_duration']:g} s; "
             f"offered: {a['deny_rate']:g} denied opens/s, {a['exec_deny_rate']:g} denied execs/s, "
             f"{a['allow_rate']:g} allowed opens/s, {a['exec_rate']:g} allowed execs/s, "
             f"{a['outside_rate']:g} protected opens/s from an unselected cgroup.")
    for i, c in enumerate(m.get("harness_crashes", []), 1):
        first = next((ln for ln in c["traceback"].splitlines() if ln.strip()), "")
        L += ["", f"**Harness crash {i} before this run** (soak/driver.py, not the agent: rc "
              f"{c['driver_rc']}, `{first[:160]}`); the soak ran again from a fresh boot. "
              "Full traceback: soak.json meta.harness_crashes."]
    L += ["", "## Gates", "", "| gate | result | value | limit |", "|---|---|---|---|"]
    for k, v in g.items():
        val = v["value"]
        val = f"{val:.5f}" if isinstance(val, float) else val
        L.append(f"| {k} | {'pass' if v['pass'] else '**FAIL**'} | {val} | {v['limit']} |")
    L += ["", "## Events by class", "",
          "| | deny | audit |", "|---|---|---|"]
    for key in ("emitted", "reached_ring", "delivered", "kernel_dropped", "waiting_in_ring",
                "unexplained", "duplicates"):
        L.append(f"| {key} | {acc['deny'][key]:,} | {acc['audit'][key]:,} |")
    L.append(f"| drop rate (all causes) | {acc['deny']['drop_rate']:.4%} | {acc['audit']['drop_rate']:.4%} |")
    L.append(f"| unexplained rate | {acc['deny']['unexplained_rate']:.4%} | "
             f"{acc['audit']['unexplained_rate']:.4%} |")
    L += ["", "Drops by stage/reason (kernel: decisions minus records that reached the ring; "
          "userspace: as the agent reported them per incarnation):", ""]
    for klass in ("deny", "audit"):
        d = acc[klass]["dropped_by_stage_reason"]
        L.append(f"- {klass}: " + (", ".join(f"`{k}` {v:,}" for k, v in sorted(d.items()) if v) or "none"))
    for klass in ("deny", "audit"):
        x = acc[klass]
        if x["unexplained"] > 0 and x.get("in_flight_at_unreported_stops"):
            L.append(f"- {klass}: {x['unexplained']:,} unexplained vs "
                     f"{x['in_flight_at_unreported_stops']:,} in flight at the last scrape before agent "
                     "stops that printed no stop summary: most likely lost at shutdown, unreported")
    L.append(f"- kernel `ringbuf_fail` counter {acc['ringbuf_fail_counter']:,}; matches the derived "
             f"kernel drops: {acc['kernel_dropped_matches_counter']}")
    L += ["", "## Enforcement canary", "",
          f"{can['attempts']} attempts (one per second from the selected cgroup): "
          f"{can['enforce_checked']} in enforce mode (must be EPERM), {can['audit_checked']} in audit "
          f"floods (must be allowed), {can['transition_excluded']} during a mode-changing apply "
          f"(excluded); **{can['miss_count']} misses**."]
    for miss in can["misses"][:10]:
        L.append(f"- t={miss['t']} s: errno {miss['errno']}, expected {miss['expected']}")
    L += ["", "## Policy swaps, floods, restarts", ""]
    for kind, what in (("library", "in-process `Lifecycle.apply` (what the CLI calls)"),
                       ("cli", "the `aegis policy apply` CLI")):
        ap = [x for x in doc["applies"] if x.get("kind", "cli") == kind]
        if not ap:
            continue
        secs = [x["seconds"] for x in ap]
        L.append(f"- {len(ap)} swaps through {what}, {sum(1 for x in ap if x['rc'])} failed; wall "
                 f"time p50 {_pct(secs, .5):.1f} s, p95 {_pct(secs, .95):.1f} s, max {max(secs):.1f} s"
                 + (" (mostly the Python start under TCG)" if kind == "cli" else ""))
    modes = sum(1 for x in doc["applies"] if x["mode"] != x["old_mode"] and x["old_mode"] != "none")
    L.append(f"- {modes} of them changed the mode (enforce <-> audit, for the floods)")
    for f in doc["floods"]:
        if "flood_start" in f:
            L.append(f"- flood {f['flood_start']:.0f}–{f.get('flood_end', 0):.0f} s, drained at "
                     f"{f.get('drained', float('nan')):.0f} s (lag left {f.get('lag_left_bytes', '?')} B)")
    fl = [x for k, v in doc["loadgen"].items() if k.startswith("flood") for x in v]
    if fl:
        n = sum(x.get("attempts", 0) for x in fl)
        secs = max(x.get("seconds", 0) for x in fl) * max(1, len(doc["floods"]))
        L.append(f"- flood offered: {n:,} audited opens from {len(fl)} loop(s), "
                 f"{n / max(1e-9, secs):,.0f}/s while flooding")
    for inc in doc["incarnations"]:
        if inc["stop_sent"]:
            L.append(f"- agent {inc['n']} (pid {inc['pid']}): ready {inc['ready'] - inc['started']:.1f} s "
                     f"after start; {inc['stop_signal']} at {inc['stop_sent']:.0f} s, exited after "
                     f"{inc['exited'] - inc['stop_sent']:.1f} s (rc {inc['returncode']}); accounting "
                     f"from {inc['final'].get('source')}")
    L += ["", "## Resources", ""]
    L.append("| agent | lived s | RSS peak MB (floods included) | steady-state max MB | "
             "steady median before / after its first flood, MB | "
             "growth after the last flood, MB | RSS slope MB/h (steady, after the first flood) | CPU s |")
    L.append("|---|---|---|---|---|---|---|---|")
    for i in res["incarnations"]:
        gr = (f"{i['rss_growth_from_mb']} → {i['rss_growth_to_mb']} over {i['rss_growth_span_s']:.0f} s"
              if "rss_growth_to_mb" in i else "–")
        slope = (f"{i['rss_slope_mb_per_h']:+.2f} over {i['rss_slope_span_s'] / 60:.0f} min"
                 if "rss_slope_mb_per_h" in i else "– (< 10 min)")
        medians = f"{i.get('rss_median_before_floods_mb', '–')} / {i.get('rss_median_after_floods_mb', '–')}"
        L.append(f"| {i['n']} | {i['seconds']:.0f} | {i['rss_peak_mb']} | {i.get('rss_steady_max_mb')} | "
                 f"{medians} | {gr} | {slope} | {i['cpu_s']} |")
    kids = [x["rss_children"] for x in doc["samples"] if x.get("rss_children")]
    if kids:
        L.append(f"\nThe agent's child processes (audit workers) held up to {max(kids) / 2**20:.1f} MB "
                 "of RSS besides the agent's own (not in the table).")
    peaks = [(inc["n"], inc["smaps_peak"]) for inc in doc["incarnations"] if inc.get("smaps_peak")]
    if peaks:
        n, sm = max(peaks, key=lambda x: x[1]["rss_kb"])
        L += ["", f"Where the RSS is (/proc/PID/smaps at the highest RSS sampled: agent {n}, "
                  f"t={sm['t']:.0f} s, {sm.get('phase', '')}): {sm['rss_kb'] / 1024:.1f} MB = "
                  f"{sm['anon_kb'] / 1024:.1f} MB anonymous + {sm['file_kb'] / 1024:.1f} MB file-backed "
                  "(code and data of the interpreter and extension modules).", "",
              "| mapping | RSS MB | of it anonymous MB |", "|---|---|---|"]
        for name, v in sm["by"].items():
            L.append(f"| `{name}` | {v['rss_kb'] / 1024:.1f} | {v['anon_kb'] / 1024:.1f} |")
        last = [(inc["n"], inc["smaps_last"]) for inc in doc["incarnations"] if inc.get("smaps_last")]
        if last:
            n2, sl = last[-1]
            L.append(f"\nLatest periodic breakdown (agent {n2}, t={sl['t']:.0f} s): "
                     f"{sl['rss_kb'] / 1024:.1f} MB = {sl['anon_kb'] / 1024:.1f} anonymous + "
                     f"{sl['file_kb'] / 1024:.1f} file-backed; "
                     + ", ".join(f"`{k}` {v['rss_kb'] / 1024:.1f}" for k, v in list(sl["by"].items())[:5]))
    cal = m.get("calibration", {})
    L.append("")
    if "cpu_cores_per_10k_events_per_s_flood" in res:
        c = res["cpu_cores_per_10k_events_per_s_flood"]
        L.append(f"- agent CPU during floods: {c} cores per 10,000 events/s under TCG "
                 f"(delivery {res.get('flood_delivery_rate_per_s', 0):,.0f} events/s)"
                 + (f"; emulation slowdown {cal['slowdown']}× (soak/calib.py) → native estimate "
                    f"{c / cal['slowdown']:.3f} cores per 10,000 events/s" if cal.get("slowdown") else ""))
    if "cpu_cores_per_10k_events_per_s_overall" in res:
        L.append(f"- overall: {res['cpu_seconds_total']} CPU s for {res['events_delivered']:,} delivered "
                 f"events ({res['cpu_cores_per_10k_events_per_s_overall']} cores per 10k events/s, "
                 "including idle polling)")
    lat = [x[1] for x in doc.get("latency_ms", [])]
    if lat:
        L.append(f"- decision → events file (sampled, includes the harness's 0.1 s poll): p50 "
                 f"{statistics.median(lat):.0f} ms, p99 {_pct(lat, .99):.0f} ms, max {max(lat):.0f} ms")
    rc = [s["rule_counter_entries"] for s in doc["samples"] if "rule_counter_entries" in s]
    if rc:
        L.append(f"- `aegis_rule_counters` entries: {rc[0]} → {rc[-1]}, max {max(rc)} (capacity 16,384; "
                 "the keys of retired generations are pruned at each stage)")
    mem = doc.get("maps_memlock", {})
    if mem:
        L.append(f"- BPF maps memlock (fdinfo): {sum(mem.values()) / 2**20:.1f} MiB")
    ms = doc["metrics_scrapes"]
    L.append(f"- metrics scrapes: {ms['ok']} ok, {ms['failed']} failed; "
             f"`aegis stats --json` cross-checks: {sum(1 for c in doc['cli_checks'] if c.get('consistent'))}"
             f"/{len(doc['cli_checks'])} consistent")
    if doc["errors"]:
        L += ["", "## Harness errors", ""] + [f"- {e}" for e in doc["errors"][:20]]
    if pngs:
        L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    else:
        L += ["", "_Plots skipped: matplotlib is not installed (pip install -e '.[soak]')._"]
    return "\n".join(L) + "\n"


def regate(doc: dict) -> None:
    """Recompute resources and gates with the current soak/driver.py (for old soak.json)."""
    import argparse

    from soak import driver

    doc["resources"] = driver.resources(doc)
    doc["gates"] = driver.gates(doc, argparse.Namespace(**doc["meta"]["args"]))


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--regate"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(args[0])
    doc = json.loads(path.read_text())
    if "--regate" in sys.argv:
        regate(doc)
        path.write_text(json.dumps(doc, indent=1) + "\n")
    pngs = plots(doc, path.parent)
    (path.parent / "soak.md").write_text(markdown(doc, pngs))
    print(f"wrote {path.parent / 'soak.md'}" + (f" and {', '.join(pngs)}" if pngs else " (no plots)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
