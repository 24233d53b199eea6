"""The record model: fields as the README lists them, NULL never 0."""

from __future__ import annotations

import json

import numpy as np

from meter.records import FIELDS, NULL, RECORD_DTYPE, code, empty, to_dicts

README_FIELDS = (
    "window_start_ns window_ms host tenant compartment cgroup_id cpu_ns cycles instructions cache_misses "
    "softirq_ns softirq_given_ns energy_uj rx_packets rx_bytes tx_packets tx_bytes rx_wire_packets rx_wire_bytes tx_wire_packets tx_wire_bytes "
    "vf_rx_packets vf_rx_bytes vf_tx_packets "
    "vf_tx_bytes seq"
).split()


def test_core_fields_in_design_order():
    assert list(FIELDS[: len(README_FIELDS)]) == README_FIELDS
    assert set(FIELDS[len(README_FIELDS):]) == {"cpu_source", "counters_source", "energy_source", "net_source", "vf_source"}


def test_counters_are_integers():
    for name in README_FIELDS:
        if name not in ("host", "tenant", "compartment"):
            assert RECORD_DTYPE[name].kind in "iu", name


def test_unavailable_is_null_not_zero():
    rec = empty(1)
    rec["cpu_ns"] = 5
    rec["cycles"] = 0
    rec["tenant"] = code("acme")
    (row,) = to_dicts(rec)
    assert row["tenant"] == "acme"  # a text field's code comes out as its text
    assert row["cpu_ns"] == 5 and row["cycles"] == 0
    assert row["instructions"] is None and row["energy_uj"] is None
    assert row["energy_source"] is None
    assert list(row) == list(FIELDS)
    json.dumps(row)
    assert np.all(empty(3)["rx_packets"] == NULL)


def test_csv_cells_a_spreadsheet_would_run_are_quoted_numbers_are_not():
    from meter.report import csv_cells

    assert csv_cells(["@evil", "-1+1", "+x", "=1", "\tx", "acme", "-5", "-0.25", "1e-3", 7, None]) == [
        "'@evil", "'-1+1", "'+x", "'=1", "'\tx", "acme", "-5", "-0.25", "1e-3", 7, None]


def test_csv_records_and_bills_never_hold_a_formula(tmp_path):
    """Tenant names may start with @, + or - (the name rule allows them)."""
    import csv
    import io
    from decimal import Decimal

    from meter.bill import PriceSheet, invoices
    from meter.report import invoices_csv
    from meter.sinks.files import FileSink

    from .test_bill import T0, records

    batch = records("h", 2)
    batch["tenant"] = np.where(batch["tenant"] == code("acme"), code("@SUM"), batch["tenant"])
    out = tmp_path / "r.csv"
    sink = FileSink(str(out), "csv")
    sink.write(batch)
    sink.close()
    rows = list(csv.DictReader(out.open()))
    assert {r["tenant"] for r in rows} == {"'@SUM", "globex", "host", "idle"}
    prices = tmp_path / "p.toml"
    prices.write_text('currency = "EUR"\n[prices]\ncpu_second = "1"\ngigacycle = "1"\nkwh = "1"\ngb = "1"\n'
                      'million_packets = "1"\n')
    invs = invoices({"-1+1": {"cpu_ns": 10**9}}, PriceSheet.from_file(prices), T0, T0 + 10**9)
    text = io.StringIO()
    invoices_csv(invs, text)
    assert all(r["tenant"] == "'-1+1" for r in csv.DictReader(io.StringIO(text.getvalue())))
    assert invs[0].total == Decimal(1)
