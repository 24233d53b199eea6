#!/usr/bin/env python3
"""Bulk append into the record store (SQLite WAL, chunks + exact 1 s / 1 h rollups).

Appends batches of 25k records (a 0.25 s drain of 100 compartments at 1 ms
windows) until N records are stored, in one run; the baseline writes the
same records' bytes to a plain file (no database, no rollups).

    .venv/bin/python benchmarks/store_append.py [--records 1000000]

Goal: >= 500k records/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Result, report

from meter.records import build
from meter.sinks.store import Store, _Columns, _encode


def batches(total: int, size: int = 25_000, rows: int = 102):
    t0 = 1_795_000_000 * 10**9
    tenants = np.array([f"t{i}" for i in range(rows)], dtype=object)
    for start in range(0, total, size):
        i = np.arange(start, start + size)
        yield build(size, {"window_start_ns": t0 + (i // rows) * 1_000_000, "window_ms": 1, "host": "bench",
                           "tenant": tenants[i % rows], "compartment": "vswitch", "cpu_ns": i % 1_000_000,
                           "cycles": i % 2_000_000, "energy_uj": i % 100, "seq": i, "cpu_source": "sched_switch",
                           "counters_source": "cpu-clock estimate", "energy_source": "model"})


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = list(batches(args.records))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with open(Path(tmp) / "plain.bin", "wb") as f:
            for b in data:
                f.write(_encode(b, _Columns(b)))
        plain = args.records / (time.perf_counter() - t)
        with Store(Path(tmp) / "records.db") as store:
            t = time.perf_counter()
            for b in data:
                store.write(b)
            rate = args.records / (time.perf_counter() - t)
            assert sum(r["records"] for r in store.rollup("rollup_1h")) == args.records
    return [Result("record store bulk append", rate, "records/s", plain, "the same bytes to a plain file", rate / plain,
                   ">= 500k records/s", rate >= 500_000, {"records": args.records, "batch": 25_000})]


if __name__ == "__main__":
    report(main())
