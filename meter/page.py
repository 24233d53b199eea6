"""The usage page: ``meter report``, one self-contained HTML file.

Per tenant, CPU, packets on the wire, energy and cost over time, from the
store's exact rollups; a stacked view of all tenants; each tenant's invoice
table under its charts. The charts are matplotlib SVG inlined in the page,
the style sheet is in the page: nothing is fetched when it is viewed.

The invoice tables are :func:`meter.bill.invoices` of the same usage
``meter bill`` reads, in the same text as ``meter bill --format json``; the
cost over time is :func:`meter.bill.charges` per step, whose costs add up
exactly to those lines.
"""

from __future__ import annotations

import datetime
import html
import io
from collections.abc import Sequence
from typing import Any

from .bill import Invoice, PriceSheet, charges, invoices, merge_periods, money, price_text, quantity_text
from .errors import MeterError

__all__ = ["COLORS", "STEPS", "pick_step", "render", "series"]

#: Steps (s) a report may plot at: each divides a day, as charge periods must.
STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
#: Points a chart aims at, at most.
MAX_POINTS = 240
#: One colour per tenant, in name order (matplotlib's tab10), then again.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
#: (key, chart title, unit): what each chart shows per step.
CHARTS = (("cpu", "CPU", "cores"), ("packets", "Packets on the wire", "packets/s"), ("energy", "Energy", "W"),
          ("cost", "Cost", "per step"))

_NS = 1_000_000_000


def pick_step(start_ns: int, end_ns: int) -> int:
    """The smallest step (s) of :data:`STEPS` that plots the span in at most MAX_POINTS points."""
    span_s = -(-(end_ns - start_ns) // _NS)
    return next((s for s in STEPS if -(-span_s // s) <= MAX_POINTS), STEPS[-1])


#: The record fields behind each measured chart (cost is computed, so always there).
_FIELDS = {"cpu": ("cpu_ns",), "packets": ("rx_wire_packets", "tx_wire_packets"), "energy": ("energy_uj",)}
_SCALE = {"cpu": _NS, "packets": 1, "energy": 10**6}


def series(by_period: dict[int, dict[Any, dict[str, int | None]]], sheet: PriceSheet, start_ns: int, end_ns: int,
           step: int, tenants: Sequence[str]) -> dict[str, dict[str, list[float] | None]]:
    """Per tenant, per chart key, one value per step from start to end:
    CPU cores, wire packets/s, watts, and cost (currency per step). A chart
    the tenant has no measurement for in the whole span (packets of a
    tenant without ports) is None, never a line of zeros."""
    period = step * _NS
    first, last = start_ns // period, (end_ns - 1) // period
    n = last - first + 1
    vals = {t: {key: [0.0] * n for key, _, _ in CHARTS} for t in tenants}
    measured: set[tuple[str, str]] = {(t, "cost") for t in tenants}
    for k, usage in by_period.items():
        i = k - first
        width_s = (min((k + 1) * period, end_ns) - max(k * period, start_ns)) / _NS
        for (tenant, _host, _comp), u in usage.items():
            if tenant not in vals:
                continue
            for key, fields in _FIELDS.items():
                values = [v for v in (u.get(f) for f in fields) if v is not None]
                if values:
                    measured.add((tenant, key))
                    vals[tenant][key][i] += sum(values) / _SCALE[key] / width_s
    for ch in charges(by_period, sheet, start_ns, end_ns, period):
        if ch.tenant in vals:
            vals[ch.tenant]["cost"][ch.start_ns // period - first] += float(ch.line.cost)
    return {t: {key: v if (t, key) in measured else None for key, v in by_key.items()} for t, by_key in vals.items()}


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _times(start_ns: int, end_ns: int, step: int) -> list[datetime.datetime]:
    period = step * _NS
    first, last = start_ns // period, (end_ns - 1) // period
    return [datetime.datetime.fromtimestamp(k * step, datetime.UTC) for k in range(first, last + 1)]


def _charts(data: dict[str, dict[str, list[float] | None]], times: list[datetime.datetime], colors: dict[str, str],
            currency: str, *, stacked: bool, estimated: frozenset[str] = frozenset()) -> str:
    """One figure of the four charts: stacked areas of every tenant, or one
    tenant's areas; a chart key in ``estimated`` says so in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                                "axes.spines.right": False}):
        fig, axes = plt.subplots(1, 4, figsize=(15, 2.8), layout="constrained")
        for ax, (key, title, unit) in zip(axes, CHARTS):
            unit = f"{currency} per step" if key == "cost" else unit
            names = [t for t in data if data[t][key] is not None]
            ys = [data[t][key] for t in names]
            if not names:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#777")
                ax.set_yticks([])
            elif stacked:
                ax.stackplot(times, ys, labels=names, colors=[colors[t] for t in names], step="post")
            else:
                for t, y in zip(names, ys):
                    ax.fill_between(times, y, step="post", color=colors[t], label=t)
            ax.set_title(f"{title} ({unit}){', estimated' if key in estimated else ''}", loc="left")
            ax.set_ylim(bottom=0)
            locator = mdates.AutoDateLocator(maxticks=5)
            ax.xaxis.set_major_locator(locator)
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
            ax.margins(x=0)
        if stacked:
            handles, labels = axes[-1].get_legend_handles_labels()  # cost: every tenant's
            fig.legend(handles[::-1], labels[::-1], loc="outside right upper", frameon=False)
        svg = _svg(fig)
        plt.close(fig)
    return svg


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
figure.chart { margin: 8px 0; } figure.chart svg { width: 100%; height: auto; }
table.invoice { border-collapse: collapse; margin: 8px 0 24px; }
table.invoice th, table.invoice td { border-bottom: 1px solid #ddd; padding: 4px 10px; }
table.invoice td.num, table.invoice th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.invoice tfoot td { font-weight: bold; border-bottom: none; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: -1px; }
p.meta { color: #555; }
"""


def _table(inv: Invoice) -> str:
    rows = "".join(
        f'<tr><td class="meter">{html.escape(line.meter)}</td><td class="num quantity">{quantity_text(line.quantity)}</td>'
        f'<td class="unit">{html.escape(line.unit)}</td><td class="num unit_price">{price_text(line.unit_price)}</td>'
        f'<td class="num cost">{money(line.cost)}</td><td class="estimated">{html.escape(line.estimated)}</td></tr>'
        for line in inv.lines)
    empty = "<td></td>" * 3
    return (f'<table class="invoice" data-tenant="{html.escape(inv.tenant)}"><thead><tr><th>meter</th>'
            f'<th class="num">quantity</th><th>unit</th><th class="num">unit price</th>'
            f'<th class="num">cost ({html.escape(inv.currency)})</th><th>estimated</th></tr></thead><tbody>{rows}</tbody>'
            f'<tfoot><tr><td>subtotal</td>{empty}<td class="num subtotal">{money(inv.subtotal)}</td><td></td></tr>'
            f'<tr><td>total</td>{empty}<td class="num total">{inv.total}</td><td></td></tr></tfoot></table>')


#: The chart that shows each invoice meter's figure (an estimated line makes its chart say so).
_CHART_OF = {"kwh": "energy"}


def _estimated(invs: Sequence[Invoice]) -> frozenset[str]:
    """Chart keys whose figure some line of ``invs`` says was estimated."""
    return frozenset(_CHART_OF[line.meter] for inv in invs for line in inv.lines
                     if line.estimated and line.meter in _CHART_OF)


def render(by_period: dict[int, dict[Any, dict[str, int | None]]], sheet: PriceSheet, start_ns: int, end_ns: int,
           step: int, *, tenant: str | None = None, source: str = "") -> str:
    """The page for usage per step (``usage_from_store(..., step x 1e9,
    by_resource=True)``) priced with ``sheet``."""
    try:
        import matplotlib  # noqa: F401  (the charts; checked before any work)
    except ImportError as err:
        raise MeterError("meter report draws its charts with matplotlib: pip install -e .[report]") from err
    invs = invoices(merge_periods(by_period), sheet, start_ns, end_ns, tenant=tenant)
    if not invs:
        raise MeterError("no tenant has usage in this period: nothing to report (check --from/--to and the store)")
    names = [i.tenant for i in invs]
    colors = {t: COLORS[i % len(COLORS)] for i, t in enumerate(names)}
    data = series(by_period, sheet, start_ns, end_ns, step, names)
    times = _times(start_ns, end_ns, step)

    def when(ns: int) -> str:
        return datetime.datetime.fromtimestamp(ns / _NS, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>meter: usage {when(start_ns)} to {when(end_ns)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>Usage and cost, {when(start_ns)} to {when(end_ns)}</h1>",
             f'<p class="meta">{len(names)} tenant{"s" if len(names) != 1 else ""}, one point per {step} s, '
             f"prices in {html.escape(sheet.currency)} (price sheet {sheet.digest[:12]}); from {html.escape(source)}; "
             f"made {when(int(datetime.datetime.now(datetime.UTC).timestamp() * _NS))}.</p>"]
    if len(names) > 1:
        parts.append(f'<section id="all"><h2>All tenants, stacked</h2><figure class="chart" id="chart-all">'
                     f"{_charts(data, times, colors, sheet.currency, stacked=True, estimated=_estimated(invs))}"
                     "</figure></section>")
    for inv in invs:
        t = inv.tenant
        swatch = f'<span class="swatch" style="background:{colors[t]}"></span>'
        parts.append(f'<section class="tenant" id="tenant-{html.escape(t)}"><h2>{swatch}{html.escape(t)}</h2>'
                     f'<figure class="chart">{_charts({t: data[t]}, times, colors, sheet.currency, stacked=False, estimated=_estimated([inv]))}'
                     f"</figure>{_table(inv)}</section>")
    parts.append("</body></html>\n")
    return "".join(parts)

