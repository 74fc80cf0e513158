"""The aegis Grafana dashboard, built in code with grafana-foundation-sdk (the ``[dashboards]``
extra): ``python packaging/grafana/dashboard.py`` writes aegis-dashboard.json beside it,
``--check`` exits 1 when the checked-in file differs from what this code builds.

tests/unit/test_prometheus_live.py runs every panel expression through a real Prometheus
(so each one parses and evaluates) and checks every series name they query exists in a real
scrape of the agent.  Expressions use the ``$instance`` variable and ``$__rate_interval``;
:data:`PANELS` is the table the test reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

OUT = Path(__file__).with_name("aegis-dashboard.json")
UID = "aegis-agent"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
I = 'instance=~"$instance"'  # noqa: E741 (every expression's selector)


@dataclass(frozen=True)
class P:
    """One panel: kind (``stat`` or ``timeseries``), title, unit, and (expression, legend) pairs."""

    kind: str
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]
    description: str = ""
    width: int = 8
    red_at: float | None = None  # stat: red from this value (green below)


#: rows of panels; the test evaluates every expression of every panel
PANELS: tuple[tuple[str, tuple[P, ...]], ...] = (
    ("Protection", (
        P("stat", "State", "none", ((f"aegis_state{{{I}}} == 1", "{{instance}} {{state}}"),),
          "1 for the current state: enforcing, auditing, degraded or blind (docs/DEGRADED_MODE.md)", 6),
        P("stat", "Reasons (state not clean)", "none",
          ((f"aegis_state_reason{{{I}}} == 1", "{{instance}} {{reason}}"),),
          "The reason codes behind a degraded or blind state", 6),
        P("stat", "Hooks not attached", "none",
          ((f"count by (instance) (aegis_hook_attached{{{I}}} == 0) or "
            f"count by (instance) (aegis_hook_attached{{{I}}}) * 0", "{{instance}}"),),
          "LSM hooks expected but not attached (nothing decides on them)", 4, red_at=1),
        P("stat", "Policy generation / mode", "none",
          ((f"aegis_policy_generation{{{I}}}", "{{instance}} generation"),
           (f"aegis_policy_mode{{{I}}} == 1", "{{instance}} {{mode}}")), width=4),
        P("stat", "Policy signature expires in", "s",
          ((f"aegis_policy_signature_expiry_timestamp_seconds{{{I}}} - time()", "{{instance}}"),),
          "Re-sign before it expires: the agent refuses an expired policy at its next start", 4),
    )),
    ("Decisions", (
        P("timeseries", "Kernel decisions /s", "ops",
          ((f"sum by (instance, hook, decision) "
            f"(rate(aegis_kernel_decisions_total{{{I}}}[$__rate_interval]))",
            "{{instance}} {{hook}} {{decision}}"),), width=12),
        P("timeseries", "Hook evaluations /s", "ops",
          ((f"sum by (instance, counter) (rate(aegis_kernel_hook_counts_total{{{I}}}[$__rate_interval]))",
            "{{instance}} {{counter}}"),), width=12),
    )),
    ("Events and loss", (
        P("timeseries", "Events emitted and delivered /s", "ops",
          ((f"sum by (instance, class) (rate(aegis_events_emitted_total{{{I}}}[$__rate_interval]))",
            "{{instance}} {{class}} emitted"),
           (f"sum by (instance, class) (rate(aegis_events_delivered_total{{{I}}}[$__rate_interval]))",
            "{{instance}} {{class}} delivered")), width=8),
        P("timeseries", "Events lost /s by stage and reason", "ops",
          ((f"sum by (instance, class, stage, reason) "
            f"(rate(aegis_events_dropped_total{{{I}}}[$__rate_interval])) > 0",
            "{{instance}} {{class}} {{stage}}/{{reason}}"),),
          "Every stage counts what it loses; deny loss should stay 0", 8),
        P("timeseries", "Drop SLO burn rate", "none",
          ((f"aegis_slo_burn_rate{{{I}}}", "{{instance}} {{class}} {{window}}"),
           (f"max by (instance, class) (aegis_slo_alert_firing{{{I}}}) * 14.4",
            "{{instance}} {{class}} alert (14.4 = firing)")),
          "Drop ratio over the window / objective; the page alert fires at 14.4 on both windows", 8),
    )),
    ("Rings, spool and sinks", (
        P("timeseries", "Ring fill", "percentunit",
          ((f"aegis_ring_fill_ratio{{{I}}}", "{{instance}} {{ring}}"),),
          "At 100% the kernel drops events (decisions stand)", 6),
        P("timeseries", "Consumer lag", "bytes",
          ((f"aegis_consumer_lag_bytes{{{I}}}", "{{instance}} {{ring}}"),), width=6),
        P("timeseries", "Deny spool", "short",
          ((f"aegis_spool_pending_events{{{I}}}", "{{instance}} pending"),
           (f"rate(aegis_spool_spooled_events_total{{{I}}}[$__rate_interval])", "{{instance}} spooled /s")),
          width=6),
        P("timeseries", "Sink records and failures /s", "ops",
          ((f"sum by (instance, sink) (rate(aegis_sink_events_total{{{I}}}[$__rate_interval]))",
            "{{instance}} {{sink}}"),
           (f"sum by (instance, sink) (rate(aegis_sink_failures_total{{{I}}}[$__rate_interval]))",
            "{{instance}} {{sink}} failures")), width=6),
    )),
    ("Agent process", (
        P("timeseries", "CPU", "percentunit",
          ((f"rate(process_cpu_seconds_total{{{I}}}[$__rate_interval])", "{{instance}}"),), width=8),
        P("timeseries", "Resident memory", "bytes",
          ((f"process_resident_memory_bytes{{{I}}}", "{{instance}}"),), width=8),
        P("timeseries", "Open file descriptors", "short",
          ((f"process_open_fds{{{I}}}", "{{instance}}"),
           (f"process_max_fds{{{I}}}", "{{instance}} max")), width=8),
    )),
)


def expressions() -> list[str]:
    """Every PromQL expression of the dashboard, in panel order."""
    return [expr for _, panels in PANELS for p in panels for expr, _ in p.queries]


def _panel(p: P, panel_id: int) -> stat.Panel | timeseries.Panel:
    panel = stat.Panel() if p.kind == "stat" else timeseries.Panel()
    panel.id(panel_id).title(p.title).unit(p.unit).span(p.width).datasource(DS)
    panel.height(6 if p.kind == "stat" else 8)
    if p.description:
        panel.description(p.description)
    if p.red_at is not None:
        panel.thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
            [Threshold(value=None, color="green"), Threshold(value=p.red_at, color="red")]))
    for n, (expr, legend) in enumerate(p.queries):
        panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend)
                          .ref_id(chr(ord("A") + n)).datasource(DS))
    return panel


def build() -> Dashboard:
    """The dashboard builder (``.build()`` gives the model)."""
    dash = (
        Dashboard("Aegis agent").uid(UID).tags(["aegis", "security", "bpf"])
        .description("The aegis runtime-security agent: protection state, decisions, event loss, "
                     "rings and the agent process (docs/METRICS.md, docs/OPERATIONS.md)")
        .refresh("30s").time("now-1h", "now").timezone("utc").tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(QueryVariable("instance").label("Instance").datasource(DS)
                       .query("label_values(aegis_build_info, instance)").multi(True).include_all(True)
                       .all_value(".*").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .sort(VariableSort.ALPHABETICAL_ASC))
    )
    ids = iter(range(1, 1000))  # unique and stable: Grafana keys panel links and state on them
    for title, panels in PANELS:
        dash.with_row(Row(title).id(next(ids)))
        for p in panels:
            dash.with_panel(_panel(p, next(ids)))
    return dash


def render() -> str:
    """The dashboard JSON exactly as checked in (sorted keys, 2-space indent, final newline)."""
    return json.dumps(json.loads(JSONEncoder().encode(build().build())), sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help=f"exit 1 when {OUT.name} is not what this builds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out}: differs from packaging/grafana/dashboard.py; regenerate it", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
