"""meter report: a self-contained HTML page, checked in a real browser.

Headless Chromium (Debian's) loads the page from a file with the network
off, draws it, and the screenshot shows every tenant's charts; the DOM it
built holds invoice tables whose every number is ``meter bill --format json``'s.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from meter.page import COLORS, pick_step
from meter.records import NULL, build
from meter.sinks.store import Store

from .test_bill import PRICES, T0

TENANTS = ("acme", "globex", "initech")
SPAN_S = 600


def _store(path: Path) -> None:
    """Ten minutes of 1 s records: three tenants whose CPU swings over time,
    two with packets, and meter's own host and idle rows (never billed)."""
    names = [*TENANTS, "host", "idle"]
    w = np.repeat(np.arange(SPAN_S), len(names))
    tenant = np.tile(np.array(names, dtype=object), SPAN_S)
    wave = 1 + 0.5 * np.sin(w / 40.0 + np.tile(np.arange(len(names)), SPAN_S))
    cpu = (np.tile(np.array([0.6, 0.3, 0.1, 0.05, 0.5]), SPAN_S) * wave * 1e9).astype(np.int64)
    pkts = np.where(tenant == "acme", (5000 * wave).astype(np.int64), np.where(tenant == "globex", 1200, NULL))
    nbytes = np.where(pkts == NULL, NULL, pkts * 900)
    batch = build(len(w), {"window_start_ns": T0 + w * 10**9, "window_ms": 1000, "host": "h1", "tenant": tenant,
                           "compartment": "vswitch", "cpu_ns": cpu, "cycles": cpu * 2, "rx_packets": pkts // 10,
                           "rx_bytes": nbytes, "rx_wire_packets": pkts, "rx_wire_bytes": nbytes,
                           "energy_uj": cpu // 100, "seq": np.arange(len(w)), "cpu_source": "kernel",
                           "counters_source": "cpu-clock estimate", "energy_source": "model"})
    with Store(path) as s:
        s.write(batch)


class _Tables(HTMLParser):
    """Each invoice table's cells by class: {tenant: {"lines": [...], "subtotal", "total"}}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, object]] = {}
        self._tenant: str | None = None
        self._cell: str | None = None
        self._row: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and "invoice" in (a.get("class") or ""):
            self._tenant = a["data-tenant"]
            self.tables[self._tenant] = {"lines": []}
        elif tag == "tr" and self._tenant:
            self._row = {}
        elif tag == "td" and self._tenant:
            self._cell = (a.get("class") or "").replace("num", "").strip() or None

    def handle_data(self, data: str) -> None:
        if self._cell:
            self._row[self._cell] = self._row.get(self._cell, "") + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr" and self._tenant and self._row:
            t = self.tables[self._tenant]
            if "meter" in self._row:
                t["lines"].append(self._row)  # type: ignore[union-attr]
            t.update({k: v for k, v in self._row.items() if k in ("subtotal", "total")})
        elif tag == "table":
            self._tenant = None


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is required (make setup installs it)"
    # Headless as root, and no network at all: a page that needs one draws nothing.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--proxy-server=127.0.0.1:9", f"--user-data-dir={cwd / 'chromium'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def page(tmp_path, meter_bin) -> tuple[Path, list[dict[str, object]]]:
    store, prices, out = tmp_path / "r.db", tmp_path / "prices.toml", tmp_path / "report.html"
    _store(store)
    prices.write_text(PRICES)
    span = ["--from", str(T0 // 10**9), "--to", str(T0 // 10**9 + SPAN_S)]
    subprocess.run([*meter_bin, "report", "--prices", str(prices), "--store", str(store), *span, "-o", str(out)],
                   check=True, capture_output=True, text=True)
    bill = subprocess.run([*meter_bin, "bill", "--prices", str(prices), "--store", str(store), *span,
                           "--format", "json"], check=True, capture_output=True, text=True)
    return out, json.loads(bill.stdout)


def test_the_page_needs_nothing_from_the_network(page):
    out, _ = page
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert text.count("<svg") == 1 + len(TENANTS)  # the stacked view and one figure per tenant


def test_chromium_draws_every_tenants_charts_and_the_bills_numbers(tmp_path, page):
    out, bill = page
    shot = tmp_path / "shot.png"
    res = _chromium("--window-size=1280,2600", f"--screenshot={shot}", out.as_uri(), cwd=tmp_path)
    assert shot.is_file(), res.stderr
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colors, counts = np.unique(img, axis=0, return_counts=True)
    share = {tuple(c): n / len(img) for c, n in zip(colors, counts)}
    for i, tenant in enumerate(TENANTS):
        rgb = tuple(int(COLORS[i][k:k + 2], 16) for k in (1, 3, 5))
        # Each tenant used CPU, energy and money in every step: its three
        # figures' areas are drawn in its colour, and each chart is about 2 %
        # of this page (four to a 1280 px row), at least a third filled.
        assert share.get(rgb, 0) > 0.01, (tenant, share.get(rgb, 0))
    # The page is not blank: white is most of it, but far from all.
    assert 0.4 < share.get((255, 255, 255), 0) < 0.95

    dom = _chromium("--dump-dom", out.as_uri(), cwd=tmp_path).stdout
    tables = _Tables()
    tables.feed(dom)
    assert sorted(tables.tables) == sorted(inv["tenant"] for inv in bill) == sorted(TENANTS)
    for inv in bill:
        shown = tables.tables[inv["tenant"]]
        assert (shown["subtotal"], shown["total"]) == (inv["subtotal"], inv["total"])
        assert [(r["meter"], r["quantity"], r["unit_price"], r["cost"], r.get("estimated", ""))
                for r in shown["lines"]] == [  # type: ignore[union-attr]
            (line["meter"], line["quantity"], line["unit_price"], line["cost"], line["estimated"]) for line in inv["lines"]]
    # Modelled energy and estimated cycles say so, in the table and on the energy chart.
    assert {line["meter"]: line["estimated"] for line in bill[0]["lines"]}["kwh"] == "energy from a power model"
    assert dom.count("Energy (W), estimated") == 1 + len(TENANTS)


def test_cost_over_time_adds_up_to_the_invoice(tmp_path):
    """The cost chart's points are charges per step, carried so that they add
    up to the invoice line: their sum is each tenant's subtotal exactly."""
    from decimal import Decimal

    from meter.bill import PriceSheet, charges, invoices, merge_periods, usage_from_store

    _store(tmp_path / "r.db")
    (tmp_path / "p.toml").write_text(PRICES)
    sheet = PriceSheet.from_file(tmp_path / "p.toml")
    start, end = T0, T0 + SPAN_S * 10**9
    step = pick_step(start, end)
    assert SPAN_S // step <= 240 and 86_400 % step == 0
    with Store(tmp_path / "r.db") as s:
        by_period = usage_from_store(s, start, end, step * 10**9, by_resource=True)
    per_step: dict[str, Decimal] = {}
    for ch in charges(by_period, sheet, start, end, step * 10**9):
        per_step[ch.tenant] = per_step.get(ch.tenant, Decimal(0)) + ch.line.cost
    assert per_step == {i.tenant: i.subtotal for i in invoices(merge_periods(by_period), sheet, start, end)}


def test_a_period_without_usage_is_one_clear_error(tmp_path, meter_bin):
    _store(tmp_path / "r.db")
    (tmp_path / "p.toml").write_text(PRICES)
    res = subprocess.run([*meter_bin, "report", "--prices", str(tmp_path / "p.toml"), "--store", str(tmp_path / "r.db"),
                          "--from", "2001-01-01T00:00:00Z", "--to", "2001-01-02T00:00:00Z", "-o", str(tmp_path / "x.html")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "no tenant has usage" in res.stderr
    assert not (tmp_path / "x.html").exists()


def test_a_tenant_without_ports_has_no_packet_chart_not_a_line_of_zeros(tmp_path, page):
    """initech has no ports (its packet fields are null): its packet chart says
    'not measured' instead of drawing 0 packets/s; the others' are drawn."""
    from meter.bill import PriceSheet, usage_from_store
    from meter.page import series

    out, _ = page
    assert out.read_text().count("not measured") == 1
    _store(tmp_path / "r2.db")
    (tmp_path / "p2.toml").write_text(PRICES)
    with Store(tmp_path / "r2.db") as s:
        by_period = usage_from_store(s, T0, T0 + SPAN_S * 10**9, 5 * 10**9, by_resource=True)
    got = series(by_period, PriceSheet.from_file(tmp_path / "p2.toml"), T0, T0 + SPAN_S * 10**9, 5, TENANTS)
    assert got["initech"]["packets"] is None and got["initech"]["cpu"] is not None
    assert min(got["globex"]["packets"]) == 1200.0 and len(got["acme"]["packets"]) == SPAN_S // 5


def test_without_matplotlib_the_report_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from meter.bill import PriceSheet
    from meter.errors import MeterError
    from meter.page import render

    (tmp_path / "p.toml").write_text(PRICES)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MeterError, match=r"matplotlib: pip install -e \.\[report\]"):
        render({}, PriceSheet.from_file(tmp_path / "p.toml"), T0, T0 + 10**9, 1)
