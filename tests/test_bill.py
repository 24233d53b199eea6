"""Store, rollups, price sheets, invoices, FOCUS, Parquet + DuckDB, and the paper's cost model."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal

import numpy as np
import pytest

from meter.bill import (
    PriceSheet,
    charges,
    invoices,
    merge_periods,
    usage_from_parquet,
    usage_from_rollups,
    usage_from_store,
)
from meter.economics import Assumptions, model, tenant_charges
from meter.errors import ConfigError, MeterError, SinkError
from meter.focus import FOCUS_COLUMNS, focus_rows
from meter.records import NULL, build, code, text
from meter.sinks.parquet import write_parquet
from meter.sinks.store import Store

from .conftest import wait_for_records

# A whole second 400 s into an hour two hours ago: inside the store's retention
# (counted from the clock), and 3 s of records stay in one 1 h rollup.
T0 = (int(time.time()) // 3600 - 2) * 3600 * 10**9 + 400 * 10**9


def records(host: str, n_windows: int = 3000, seq0: int = 0, t0: int = T0) -> np.ndarray:
    """Synthetic 1 ms records: acme (cpu, packets), globex (cpu), host, idle."""
    tenants = ["acme", "globex", "host", "idle"]
    n = n_windows * len(tenants)
    w = np.repeat(np.arange(n_windows), len(tenants))
    tenant = np.tile(np.array(tenants, dtype=object), n_windows)
    cpu = np.tile(np.array([700_000, 300_000, 100_000, 900_000]), n_windows)
    rx = np.tile(np.array([3, NULL, NULL, NULL]), n_windows)
    return build(n, {"window_start_ns": t0 + w * 1_000_000, "window_ms": 1, "host": host, "tenant": tenant,
                     "compartment": "vs", "cpu_ns": cpu, "cycles": cpu * 2, "rx_packets": rx, "rx_bytes": np.where(rx == NULL, NULL, rx * 100),
                     "energy_uj": np.tile(np.array([70, 30, 10, 90]), n_windows), "seq": seq0 + np.arange(n),
                     "cpu_source": "sched_switch"})


PRICES = """\
currency = "EUR"
[prices]
cpu_second = "0.02"
gigacycle = "0.001"
kwh = "0.30"
gb = "0.05"
million_packets = "1"
[tenant.globex]
cpu_second = "0.01"
"""


@pytest.fixture
def sheet(tmp_path) -> PriceSheet:
    p = tmp_path / "prices.toml"
    p.write_text(PRICES)
    return PriceSheet.from_file(p)


def test_store_is_idempotent_rolls_up_exactly_and_continues_seq(tmp_path):
    path = tmp_path / "r.db"
    b = records("h1")
    with Store(path) as s:
        assert s.write(b[:5000]) == 5000
        assert s.write(b[:5000]) == 0  # the same batch again: nothing added
        assert s.write(b[3000:]) == len(b) - 5000  # overlapping: only the new part
        assert s.next_seq("h1") == len(b)
        back = s.records()
        assert np.array_equal(back["seq"], b["seq"]) and np.array_equal(back["cpu_ns"], b["cpu_ns"])
        assert np.array_equal(back["rx_packets"], b["rx_packets"])  # NULL survives as NULL
        for table in ("rollup_1s", "rollup_1h"):
            rows = s.rollup(table)
            for field in ("cpu_ns", "energy_uj"):
                assert sum(r[field] for r in rows) == int(b[field].sum())
            acme = [r for r in rows if r["tenant"] == "acme"]
            assert sum(r["rx_packets"] for r in acme) == 3 * 3000
            assert all(r["rx_packets"] is None for r in rows if r["tenant"] == "globex")
        assert len(s.rollup("rollup_1s")) == 3 * 4  # 3 seconds x 4 rows
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_whole_hours_are_billed_from_the_hour_rollups_and_agree_with_the_seconds(tmp_path):
    """Charge periods of whole hours read the range's whole hours from rollup_1h and only its
    partial hours from rollup_1s; the usage is the same as from the 1 s rows alone."""
    hour, minute = 3600 * 10**9, 60 * 10**9
    t0 = 1_800_000_000 // 3600 * hour  # on an hour
    n = 3 * 60 * 2  # 3 h of 1-minute windows, two compartments
    batch = build(n, {"window_start_ns": t0 + np.arange(n) // 2 * minute, "window_ms": 60_000, "host": "h",
                      "tenant": "acme", "compartment": np.array(["a", "b"] * (n // 2), object), "seq": np.arange(n),
                      "cpu_ns": 10**9 + np.arange(n), "rx_packets": np.where(np.arange(n) % 2, 7, NULL)})
    start, end = t0 + 25 * minute, t0 + 2 * hour + 40 * minute
    with Store(tmp_path / "r.db", clock=lambda: t0) as s:
        s.write(batch)
    with Store(tmp_path / "r.db", must_exist=True) as s:
        def from_seconds(period):
            rows: dict[int, list] = {}
            for r in s.rollup("rollup_1s", start, end):
                rows.setdefault(r["period_start_ns"] // period, []).append(r)
            return {k: usage_from_rollups(v, by_resource=True) for k, v in sorted(rows.items())}

        got = usage_from_store(s, start, end, hour, by_resource=True)
        assert got == from_seconds(hour) and len(got) == 3
        assert usage_from_store(s, start, end, 900 * 10**9, by_resource=True) == from_seconds(900 * 10**9)
        # The whole hour [t0 + 1 h, t0 + 2 h) is read from rollup_1h: without its 1 s rows, the same bill.
        s.db.execute("DELETE FROM rollup_1s WHERE period_start_ns >= ? AND period_start_ns < ?", (t0 + hour, t0 + 2 * hour))
        assert usage_from_store(s, start, end, hour, by_resource=True) == got
        assert from_seconds(hour) != got


def test_retention_keeps_rollups(tmp_path):
    now = [T0 + 15 * 10**8]
    with Store(tmp_path / "r.db", retention_s=1, clock=lambda: now[0]) as s:
        s.write(records("h", 1000))  # [T0, T0 + 1 s): inside retention at T0 + 1.5 s
        assert len(s.records()) == 4000
        now[0] = T0 + 12 * 10**9
        # Ten seconds on: the rollups are written (ROLL_EVERY_NS), so the first chunk may go.
        s.write(records("h", 1000, seq0=4000, t0=T0 + 11 * 10**9))
        assert len(s.records()) == 4000  # the first chunk is past retention
        assert sum(r["records"] for r in s.rollup("rollup_1s")) == 8000


def test_retention_counts_from_the_clock_not_from_a_future_dated_batch(tmp_path, caplog):
    """A clock that jumped ahead wrote one batch ten years on: the store keeps
    every record of today's (it used to keep 1 of 14,000), and says so."""
    with Store(tmp_path / "r.db") as s:  # 7 days' retention; the records are 2 h old
        s.write(records("h", 3500))
        s.write(records("h", 1, seq0=14_000, t0=T0 + 10 * 365 * 86400 * 10**9))
        assert len(s.records()) == 14_004
    assert "ahead of this host's clock" in caplog.text


def test_one_writer_per_store_the_second_is_told_the_firsts_pid(tmp_path):
    """Two writers would read the same next seq; the second's records would all be
    taken for duplicates and dropped. So the second is refused, naming the first."""
    path = tmp_path / "r.db"
    with Store(path) as first:
        assert first.claim("h") == 0
        first.write(records("h", 10))
        second = Store(path)
        with pytest.raises(SinkError, match=rf"being written by another meter \(pid {os.getpid()}\)"):
            second.claim("h")
        with pytest.raises(SinkError):
            second.write(records("h", 10, seq0=40))  # a write claims it too
        second.close()
        assert len(first.records()) == 40
    with Store(path) as third:  # the first has gone: the store is free
        assert third.claim("h") == 40
    assert os.stat(path.with_name("r.db.lock")).st_mode & 0o777 == 0o600


def test_packets_and_bytes_are_billed_on_the_wire(tmp_path, sheet):
    """A GSO/GRO skb is many packets on the wire: million_packets and gb bill the
    wire figures; rollups stored before wire counting (null wire figures) bill
    their skb counts."""
    new = records("h", 10)
    acme = new["tenant"] == code("acme")
    new["rx_wire_packets"] = np.where(acme, 45 * new["rx_packets"], NULL)
    new["rx_wire_bytes"] = np.where(acme, new["rx_bytes"] + 44 * 66, NULL)
    old = records("h", 10, seq0=len(new), t0=T0 + 10**9)  # no wire figures: an older meter's
    with Store(tmp_path / "r.db") as s:
        s.write(new)
        s.write(old)
        usage = merge_periods(usage_from_store(s, T0, T0 + 2 * 10**9, 10**9))
    lines = {line.meter: line for line in invoices(usage, sheet, T0, T0 + 2 * 10**9)[0].lines}
    assert lines["million_packets"].consumed == 10 * 3 * 45 + 10 * 3
    assert lines["gb"].consumed == 10 * (300 + 44 * 66) + 10 * 300
    # The same from Parquet, the older file written without the wire columns at all.
    import pyarrow.parquet as pq

    for b in (new, old):
        for path in write_parquet(b, tmp_path / "pq"):
            if b is old:
                table = pq.read_table(path)
                pq.write_table(table.drop_columns([c for c in table.column_names if "_wire_" in c]), path)
    usage = merge_periods(usage_from_parquet(tmp_path / "pq", T0, T0 + 2 * 10**9, 10**9))
    assert {line.meter: line.consumed for line in invoices(usage, sheet, T0, T0 + 2 * 10**9)[0].lines} == {
        m: line.consumed for m, line in lines.items()}


def test_invoices_lines_totals_and_overrides(tmp_path, sheet):
    with Store(tmp_path / "r.db") as s:
        s.write(records("h"))
        usage = merge_periods(usage_from_store(s, T0, T0 + 3 * 10**9, 3 * 10**9))
    invs = invoices(usage, sheet, T0, T0 + 3 * 10**9)
    assert [i.tenant for i in invs] == ["acme", "globex"]  # host and idle are not billed
    acme = {line.meter: line for line in invs[0].lines}
    # Nor are meter's other rows: unattributed usage and late rows (the late time
    # itself is in its tenant's own records, cpu_source late).
    extra = records("h", 10, seq0=20_000)
    extra["tenant"] = np.where(extra["tenant"] == code("host"), code("unattributed"), np.where(extra["tenant"] == code("idle"), code("late"),
                                                                                 extra["tenant"]))
    with Store(tmp_path / "r2.db") as s2:
        s2.write(extra)
        more = invoices(merge_periods(usage_from_store(s2, T0, T0 + 3 * 10**9, 3 * 10**9)), sheet, T0, T0 + 3 * 10**9)
    assert [i.tenant for i in more] == ["acme", "globex"]
    assert acme["cpu_second"].quantity == Decimal("2.1")  # 3000 x 0.7 ms
    assert acme["cpu_second"].cost == Decimal("0.042000")
    assert acme["million_packets"].consumed == 9000 and acme["gb"].consumed == 900_000
    # kWh is the one meter whose quantity is not a finite decimal: 18 decimals, half-even.
    assert acme["kwh"].quantity == Decimal("0.000000058333333333")
    assert acme["kwh"].cost == Decimal("0.0000000175")  # exact: 210,000 uJ x 0.30 / 3.6e12
    globex = {line.meter: line for line in invs[1].lines}
    assert globex["cpu_second"].unit_price == Decimal("0.01")  # override
    assert "million_packets" not in globex  # not measured: no line
    for inv in invs:
        assert inv.subtotal == sum(line.cost for line in inv.lines)
        assert inv.total == inv.subtotal.quantize(Decimal("0.01"))  # rounded once, to the cent
        assert all(isinstance(line.cost, Decimal) for line in inv.lines)
    # globex's negotiated CPU price is below the list price: list cost at list price.
    assert globex["cpu_second"].list_unit_price == Decimal("0.02")
    assert globex["cpu_second"].list_cost == Decimal("0.018") and globex["cpu_second"].cost == Decimal("0.009")


@pytest.mark.parametrize(("text", "key"), [
    ('currency = "EUR"\n[prices]\ncpu_second = "-1"\n', "prices.cpu_second"),
    ('currency = "EUR"\n[prices]\ncpu_secs = "1"\n', "prices.cpu_secs"),
    ('currency = "euro"\n', "currency"),
    ('currency = "EUR"\n[prices]\nkwh = "abc"\n', "prices.kwh"),
    ('currency = "EUR"\n[tenant.x]\ngb = "-0.1"\n', "tenant.x.gb"),
])
def test_bad_price_sheets(tmp_path, text, key):
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        PriceSheet.from_file(p)
    assert info.value.key == key and str(p) in str(info.value)


def test_bad_billing_requests(tmp_path, sheet):
    usage = {"acme": {"cpu_ns": 10, "cache_misses": 5}}
    with pytest.raises(MeterError, match="reversed"):
        invoices(usage, sheet, T0, T0)
    with pytest.raises(MeterError, match="no usage"):
        invoices(usage, sheet, T0, T0 + 10**9, tenant="nobody")
    with pytest.raises(MeterError, match="million_cache_misses"):
        invoices(usage, sheet, T0, T0 + 10**9)


def test_focus_rows(tmp_path, sheet):
    with Store(tmp_path / "r.db") as s:
        s.write(records("h"))
        by_period = usage_from_store(s, T0, T0 + 3 * 10**9, 10**9, by_resource=True)
    rows = focus_rows(charges(by_period, sheet, T0, T0 + 3 * 10**9, 10**9), sheet)
    assert list(rows[0]) == list(FOCUS_COLUMNS)
    mandatory = FOCUS_COLUMNS[:FOCUS_COLUMNS.index("PricingUnit") + 1]
    assert all(r[c] is not None for r in rows for c in mandatory if c not in ("ChargeClass", "InvoiceId"))
    assert {r["ChargeCategory"] for r in rows} == {"Usage"}
    assert {r["SubAccountId"] for r in rows} == {"acme", "globex"}
    assert rows[0]["ChargePeriodStart"].endswith("Z") and len(rows[0]["ChargePeriodStart"]) == 20
    # Calendar month (UTC) billing periods.
    assert {r["BillingPeriodStart"][8:] for r in rows} == {"01T00:00:00Z"}
    # One service name per category; resources are compartments on hosts, not price lines.
    assert len({(r["ServiceName"], r["ServiceCategory"], r["ServiceSubcategory"]) for r in rows}) == \
        len({r["ServiceName"] for r in rows}) == 3
    assert {r["ResourceId"] for r in rows} == {"h/acme/vs", "h/globex/vs"} and {r["x_Host"] for r in rows} == {"h"}
    # One row per resource, meter and charge period; costs add up to the one-period invoices.
    assert len({(r["ResourceId"], r["x_Meter"], r["ChargePeriodStart"]) for r in rows}) == len(rows)
    acme_cpu = sum(Decimal(r["BilledCost"]) for r in rows if r["SubAccountId"] == "acme" and r["x_Meter"] == "cpu_second")
    assert acme_cpu == Decimal("0.042000")
    # Fixed decimals per column, never E-notation.
    for col, decimals in (("BilledCost", 10), ("ListCost", 10), ("ContractedUnitPrice", 12), ("PricingQuantity", 18)):
        assert all(len(r[col].split(".")[1]) == decimals and "E" not in r[col] for r in rows), col
    # The negotiated price: contracted below list.
    g = [r for r in rows if r["SubAccountId"] == "globex" and r["x_Meter"] == "cpu_second"]
    assert all(Decimal(r["ListCost"]) == 2 * Decimal(r["ContractedCost"]) > 0 for r in g)
    assert {r["ListUnitPrice"] for r in g} == {"0.020000000000"} and {r["ContractedUnitPrice"] for r in g} == {
        "0.010000000000"}


def test_three_hosts_in_parquet_bill_like_each_host(tmp_path, sheet):
    root = tmp_path / "fleet"
    per_host = []
    for i, host in enumerate(("h1", "h2", "h3")):
        b = records(host, n_windows=1000 * (i + 1))
        write_parquet(b, root)
        with Store(tmp_path / f"{host}.db") as s:
            s.write(b)
            per_host.append(invoices(merge_periods(usage_from_store(s, T0, T0 + 3 * 10**9, 3 * 10**9)), sheet,
                                     T0, T0 + 3 * 10**9))
    assert {p.name for p in root.iterdir()} == {"host=h1", "host=h2", "host=h3"}
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in root.rglob("*.parquet"))  # billing data: owner only
    fleet = invoices(merge_periods(usage_from_parquet(root, T0, T0 + 3 * 10**9, 3 * 10**9)), sheet, T0, T0 + 3 * 10**9)
    for inv in fleet:
        lines = {line.meter: line for line in inv.lines}
        for meter in lines:
            consumed = sum({ln.meter: ln for ln in h[[i.tenant for i in h].index(inv.tenant)].lines}[meter].consumed
                           for h in per_host)
            assert lines[meter].consumed == consumed


def test_economics_matches_the_paper():
    out = {o.option: o for o in model()}
    assert out["state of the art"].income == Decimal(87_600) and out["state of the art"].spend == Decimal(17_520)
    assert out["state of the art"].net_revenue == Decimal(70_080)
    assert out["option 1"].net_revenue == Decimal(83_220)
    assert out["option 1"].change_vs_state_of_the_art == Decimal("0.1875")
    assert out["option 2"].income == Decimal(96_360) and out["option 2"].net_revenue == Decimal(87_600)
    assert out["option 2"].change_vs_state_of_the_art == Decimal("0.25")
    o3 = out["option 3"]
    assert (o3.income, o3.spend, o3.net_revenue) == (Decimal("112741.2"), Decimal("12526.8"), Decimal("100214.4"))
    assert o3.new_servers == 43 and o3.capital_dollars == 86_000
    assert round(o3.change_vs_state_of_the_art, 2) == Decimal("0.43")
    charges = {c["usage"]: Decimal(c["option_1"]) for c in tenant_charges()}
    assert charges["0.10"] == charges["0.30"] / 3  # "pays two thirds less"
    assert sum(Decimal(c["usage"]) for c in tenant_charges()) == Decimal("0.50")  # the paper's 50 %
    assert model(Assumptions(servers=200))[0].net_revenue == Decimal(140_160)


def test_economics_cli_json(meter_bin):
    res = subprocess.run([*meter_bin, "economics", "--json", "--set", "servers=200"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["options"][0]["net_revenue"] == "140160.00"
    bad = subprocess.run([*meter_bin, "economics", "--set", "cores=3"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "NAME=VALUE" in bad.stderr


def test_bill_cli_formats_and_errors(tmp_path, meter_bin):
    store = tmp_path / "r.db"
    with Store(store) as s:
        s.write(records("h"))
    prices = tmp_path / "p.toml"
    prices.write_text(PRICES)
    base = [*meter_bin, "bill", "--prices", str(prices), "--store", str(store), "--from", str(T0 // 10**9),
            "--to", str(T0 // 10**9 + 3)]
    res = subprocess.run([*base, "--format", "json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [i["tenant"] for i in json.loads(res.stdout)] == ["acme", "globex"]
    assert res.stderr == ""
    # A typo in an override's tenant would bill that tenant at list price without a word.
    prices.write_text(PRICES.replace("[tenant.globex]", "[tenant.globexx]"))
    res = subprocess.run([*base, "--format", "json"], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)
    assert res.stderr == (f"meter: warning: {prices}: [tenant.globexx] names no tenant billed in this period "
                          "(did you mean 'globex'?); its prices were not used\n")
    prices.write_text(PRICES)
    res = subprocess.run([*base, "--format", "focus", "--charge-period", "1"], capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert list(rows[0]) == list(FOCUS_COLUMNS) and len({r["ChargePeriodStart"] for r in rows}) == 3
    res = subprocess.run([*base, "--format", "csv"], capture_output=True, text=True)
    assert "acme,TOTAL" in res.stdout
    for extra, words in ((["--tenant", "nobody"], "no usage"), (["--to", "1"], "reversed"),
                         (["--store", str(tmp_path / "none.db")], "no record store")):
        res = subprocess.run([*base, *extra], capture_output=True, text=True)
        assert res.returncode == 1 and words in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.bpf
def test_kill_9_loses_at_most_the_batch_in_flight_and_restart_continues(tmp_path, cgroups, meter_bin):
    store = tmp_path / "r.db"
    cmd = [*meter_bin, "record", "--cgroup-root", str(cgroups.root), "--store", str(store)]
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    # Kill it once it has stored a few batches, whenever that is.
    wait_for_records(store, p, 600)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with Store(store) as s:
        first = s.records()
        nxt = s.next_seq(text(first, "host")[0])
    assert len(first) > 500 and nxt == int(first["seq"].max()) + 1
    p = subprocess.Popen([*cmd, "--duration", "1.5"], stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    with Store(store) as s:
        both = s.records()
        assert sum(r["records"] for r in s.rollup("rollup_1s")) == len(both)
    seqs = both["seq"]
    assert len(np.unique(seqs)) == len(seqs)  # no duplicated record
    assert seqs.min() == 0 and np.array_equal(np.sort(seqs), np.arange(len(seqs)))  # the sequence continued
    assert sys.executable  # (the killed run's last batch in flight is the only possible loss)


def test_overlapping_exports_bill_each_record_once(tmp_path):
    """Two exports over overlapping ranges hold the overlap twice; a bill sums it once."""
    pytest.importorskip("duckdb")
    from meter.sinks.parquet import write_parquet

    b = records("h", 3000)
    once = tmp_path / "once"
    write_parquet(b, once)
    twice = tmp_path / "twice"
    write_parquet(b[: 2000 * 4], twice)
    write_parquet(b[1000 * 4 :], twice)  # another first seq: another file, the middle third again
    assert len(list(twice.rglob("*.parquet"))) == 2
    args = (T0, T0 + 3 * 10**9, 3 * 10**9)
    assert usage_from_parquet(twice, *args) == usage_from_parquet(once, *args)
    assert merge_periods(usage_from_parquet(twice, *args))["acme"]["cpu_ns"] == 3000 * 700_000


def test_a_damaged_parquet_file_is_one_error_naming_it(tmp_path):
    pytest.importorskip("duckdb")
    from meter.errors import MeterError
    from meter.sinks.parquet import write_parquet

    (part,) = write_parquet(records("h", 10), tmp_path / "x")
    part.write_bytes(part.read_bytes()[:100])  # what a kill during a plain write left
    with pytest.raises(MeterError) as info:
        usage_from_parquet(tmp_path / "x", T0, T0 + 10**9, 10**9)
    assert str(part) in str(info.value) and "\n" not in str(info.value)
