"""The record model: fields as the README lists them, NULL never 0."""

from __future__ import annotations

import json

import numpy as np

from meter.records import FIELDS, NULL, RECORD_DTYPE, empty, to_dicts

README_FIELDS = (
    "window_start_ns window_ms host tenant compartment cgroup_id cpu_ns cycles instructions cache_misses "
    "softirq_ns softirq_given_ns energy_uj rx_packets rx_bytes tx_packets tx_bytes vf_rx_packets vf_rx_bytes vf_tx_packets "
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
    rec["tenant"] = "acme"
    (row,) = to_dicts(rec)
    assert row["cpu_ns"] == 5 and row["cycles"] == 0
    assert row["instructions"] is None and row["energy_uj"] is None
    assert row["energy_source"] is None
    assert list(row) == list(FIELDS)
    json.dumps(row)
    assert np.all(empty(3)["rx_packets"] == NULL)
