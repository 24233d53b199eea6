"""Renderings for the CLI: bills (rich tables, CSV, FOCUS), the cost model, check findings.

The numbers come from :mod:`meter.bill`, :mod:`meter.focus` and
:mod:`meter.economics`; this module only lays them out, for ``meter bill``
and ``meter economics``.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import IO, Any

from .bill import money, price_text, quantity_text
from .focus import FOCUS_COLUMNS, focus_rows

__all__ = ["csv_cells", "economics_tables", "findings_table", "focus_csv", "invoices_csv", "invoices_tables"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def csv_cells(values: Iterable[Any]) -> list[Any]:
    """Cells safe to open in a spreadsheet (OWASP, CSV injection): text that a
    spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a
    leading ``'``; numbers, also negative ones, are left as they are."""
    out = []
    for v in values:
        if isinstance(v, str) and v.startswith(_FORMULA_START) and not _NUMBER.fullmatch(v):
            v = "'" + v
        out.append(v)
    return out


def invoices_csv(invs: Sequence[Any], out: IO[str]) -> None:
    """One CSV line per invoice line, and a TOTAL line per tenant."""
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["tenant", "meter", "quantity", "unit", "unit_price", "cost", "currency"])
    for inv in invs:
        for line in inv.lines:
            w.writerow(csv_cells([inv.tenant, line.meter, quantity_text(line.quantity), line.unit,
                                  price_text(line.unit_price), money(line.cost), inv.currency]))
        w.writerow(csv_cells([inv.tenant, "TOTAL", "", "", "", inv.total, inv.currency]))


def focus_csv(charges: list[Any], sheet: Any, period: str, invoice_of: Any, out: IO[str]) -> None:
    """FOCUS rows of charges (see :func:`meter.focus.focus_rows`)."""
    fw = csv.DictWriter(out, fieldnames=list(FOCUS_COLUMNS), lineterminator="\n")
    fw.writeheader()
    for row in focus_rows(charges, sheet, period=period, invoice_of=invoice_of):
        fw.writerow(dict(zip(row, csv_cells(row.values()))))


def invoices_tables(invs: Sequence[Any], span: str, console: Any) -> None:
    """One rich table per invoice, titled with the tenant and ``span``."""
    from rich.table import Table

    for inv in invs:
        t = Table(title=f"{inv.tenant}: {span}", show_footer=True)
        t.add_column("meter", footer="total")
        t.add_column("quantity", justify="right")
        t.add_column("unit")
        t.add_column("unit price", justify="right")
        t.add_column(f"cost ({inv.currency})", justify="right", footer=str(inv.total))
        for line in inv.lines:
            t.add_row(line.meter, f"{line.quantity:.6f}", line.unit, price_text(line.unit_price), money(line.cost))
        console.print(t)


def economics_tables(outcomes: Sequence[Any], charges: Sequence[dict[str, Any]], console: Any) -> None:
    """The operator's options and the tenant charges of the paper's cost model."""
    from rich.table import Table

    t = Table(title="Operator, dollars per year")
    for col in ("option", "income", "spend", "net revenue", "vs state of the art", "new servers", "capital"):
        t.add_column(col, justify="left" if col == "option" else "right")
    for o in outcomes:
        t.add_row(o.option, f"{o.income:,.2f}", f"{o.spend:,.2f}", f"{o.net_revenue:,.2f}",
                  f"{o.change_vs_state_of_the_art * 100:+.2f} %", str(o.new_servers), f"{o.capital_dollars:,.0f}")
    c = Table(title="Tenant vswitch charges, dollars per year")
    for col in ("vswitch usage", "state of the art", "option 1", "option 2 (cycles)", "option 3"):
        c.add_column(col, justify="right")
    for row in charges:
        c.add_row(f"{Decimal(row['usage']) * 100:.0f} %", row["state_of_the_art"], row["option_1"], row["option_2"],
                  row["option_3"])
    console.print(t)
    console.print(c)


def findings_table(findings: Sequence[Any], ok: bool, reason: str, console: Any) -> None:
    """``meter check``: one line per probe, then the verdict."""
    from rich.table import Table

    style = {"ok": "green", "fallback": "yellow", "missing": "yellow", "fail": "red"}
    table = Table(title="meter check", show_lines=False)
    for col in ("", "what", "found", "meter will"):
        table.add_column(col)
    for f in findings:
        table.add_row(f"[{style[f.status]}]{f.status}[/]", f.title, f.detail, f.action)
    console.print(table)
    console.print(f"[{'green' if ok else 'red'}]{reason}[/]")
