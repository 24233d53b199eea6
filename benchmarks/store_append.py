#!/usr/bin/env python3
"""Bulk append into the record store (SQLite WAL, chunks + exact 1 s / 1 h rollups).

Appends batches of 25k records (a 0.25 s drain of 100 compartments at 1 ms
windows) until N records are stored, in one run; the baseline writes the
same records' bytes to a plain file (no database, no rollups).

    .venv/bin/python benchmarks/store_append.py [--records 1000000]

Goal: >= 500k records/s.

Aged (``--aged-hours``, default 1): the same appends for 1,000 compartments
(10 ms windows, so a second's rollup rows are flushed every 100 k records),
into a store whose rollup tables already hold that many hours of 1 s rows
of those compartments, and whose chunk_rollups table holds that many hours
of a 1 s batch's rollups (4 KiB each) within retention, as a running
meter's does, against a fresh store, alternating in one run. A store's
rollup tables only grow (raw records expire, rollups do not), and retention
looks at the kept chunks at every write: the append must not slow down as
they grow. Goal: the aged store >= 0.9x the fresh one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Result, report

from meter.records import build
from meter.sinks.store import Store, _Columns, _encode

T0 = 1_795_000_000 * 10**9


def batches(total: int, size: int = 25_000, rows: int = 102, window_ms: int = 1):
    tenants = np.array([f"t{i}" for i in range(rows)], dtype=object)
    for start in range(0, total, size):
        i = np.arange(start, start + size)
        yield build(size, {"window_start_ns": T0 + (i // rows) * window_ms * 1_000_000, "window_ms": window_ms,
                           "host": "bench",
                           "tenant": tenants[i % rows], "compartment": "vswitch", "cpu_ns": i % 1_000_000,
                           "cycles": i % 2_000_000, "energy_uj": i % 100, "seq": i, "cpu_source": "sched_switch",
                           "counters_source": "cpu-clock estimate", "energy_source": "model"})


def prefill(path: Path, hours: float, rows: int) -> None:
    """``hours`` of 1 s rollup rows (and their hours' rows) of the ``rows`` tenants ``batches()``
    writes, dated just before it, written as a store's flushes leave them; and ``hours`` of
    chunk rollups, one a second, within retention."""
    with Store(path):  # the tables, as this meter makes them
        pass
    seconds = round(hours * 3600)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for table, period, count in (("rollup_1s", 10**9, seconds), ("rollup_1h", 3600 * 10**9, -(-seconds // 3600))):
        start = (T0 - seconds * 10**9) // period * period
        db.execute(f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {count * rows - 1}) "
                   f"INSERT INTO {table} (host, tenant, compartment, period_start_ns, records, cpu_ns, cycles, "
                   f"energy_uj, estimated_cycles, estimated_energy) SELECT 'bench', 't' || (i % {rows}), 'vswitch', "
                   f"{start} + (i / {rows}) * {period}, 1000, i, 2 * i, 7, 1000, 1000 FROM s")
    # The chunks' own rollups a meter keeps for the retention period (7 days): the last `hours` of them.
    now = time.time_ns()
    db.execute(f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {seconds - 1}) "
               f"INSERT INTO chunk_rollups (host, first_seq, end_ns, data) "
               f"SELECT 'bench', -1 - i, {now} - i * 1000000000, zeroblob(4096) FROM s")
    db.execute("COMMIT")
    db.close()


def aged(hours: float, total: int, rounds: int = 3) -> Result:
    """Appends into a store holding ``hours`` of rollups against a fresh store (alternating, best of each)."""
    rows = 1000
    data = list(batches(total, rows=rows, window_ms=10))
    rates: dict[str, list[float]] = {"fresh": [], "aged": []}
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "aged.db"
        t = time.perf_counter()
        prefill(template, hours, rows)
        fill_s = time.perf_counter() - t
        for r in range(rounds):
            for kind in ("fresh", "aged"):
                path = Path(tmp) / f"{kind}{r}.db"
                if kind == "aged":
                    shutil.copyfile(template, path)
                    with open(path, "rb+") as f:  # its pages on disk, not left for the first checkpoint's fsync
                        os.fsync(f.fileno())
                with Store(path) as store:
                    t = time.perf_counter()
                    for b in data:
                        store.write(b)
                    t1 = time.perf_counter()
                rates[kind].append(total / (t1 - t))
                path.unlink()
    fresh, old = max(rates["fresh"]), max(rates["aged"])
    return Result(f"record store append, 1,000 compartments, store holding {hours:g} h of rollups", old, "records/s",
                  fresh, "the same appends into a fresh store", old / fresh, ">= 0.9x the fresh store",
                  old / fresh >= 0.9, {"rounds": rates, "prefill_s": round(fill_s, 1),
                                       "rollup_1s_rows_before": round(hours * 3600) * rows,
                                       "chunk_rollups_before": round(hours * 3600)})


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--aged-hours", type=float, default=1.0, help="hours of rollups the aged store holds (0: skip)")
    ap.add_argument("--aged-records", type=int, default=2_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = list(batches(args.records))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with open(Path(tmp) / "plain.bin", "wb") as f:
            for b in data:
                f.write(_encode(_Columns(b)))
        plain = args.records / (time.perf_counter() - t)
        with Store(Path(tmp) / "records.db") as store:
            t = time.perf_counter()
            for b in data:
                store.write(b)
            rate = args.records / (time.perf_counter() - t)
            assert sum(r["records"] for r in store.rollup("rollup_1h")) == args.records
    out = [Result("record store bulk append", rate, "records/s", plain, "the same bytes to a plain file", rate / plain,
                  ">= 500k records/s", rate >= 500_000, {"records": args.records, "batch": 25_000})]
    if args.aged_hours > 0:
        out.append(aged(args.aged_hours, args.aged_records))
    return out


if __name__ == "__main__":
    report(main())
