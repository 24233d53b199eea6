#!/usr/bin/env python3
"""Fleet billing: ship, commit and bill N hosts x C compartments x S seconds of 1 s rollups.

* **ship**: the real shipping code (``meter.ship.ship``) on one sample host's
  store (C compartments, 1 ms records for ``--ship-seconds``), in raw
  records/s; baseline: only reading the same raw records from the store
  (what shipping would cost if it rolled them up again).
* **commit**: every host's segment (C x S rows, in the segment format,
  written to a local ``file://`` tree) committed by ``meter.fleet.commit``,
  one Delta commit per segment; baseline: one ``write_deltalake`` of all
  rows at once.
* **bill**: ``meter.fleet.fleet_usage`` over the committed table with DuckDB
  and with Dask (a local cluster, 2 workers); the ratio is Dask's rate over
  DuckDB's. Storage: segment bytes per host-day.

    .venv/bin/python benchmarks/fleet.py [--hosts 1000] [--compartments 20] [--seconds 3600]

Goal (info): rows/s of each stage; the bills of both engines are checked equal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Result, report

from meter import fleet, ship
from meter.records import build
from meter.sinks.store import ROLLUP_COLUMNS, Store


def _store(path: Path, comps: int, seconds: int) -> int:
    """One host's store: ``comps`` compartments, a record per compartment per 1 ms window."""
    t0 = (int(time.time()) // 3600 - 1) * 3600 * 10**9
    per = comps * 1000  # records per second
    names = np.array([f"c{i:02d}" for i in range(comps)], dtype=object)
    with Store(path) as s:
        for sec in range(seconds):
            i = np.arange(per)
            s.write(build(per, {"window_start_ns": t0 + sec * 10**9 + (i // comps) * 1_000_000, "window_ms": 1,
                                "host": "sample", "tenant": names[i % comps], "compartment": "vswitch",
                                "cpu_ns": (i * 7919) % 1_000_000, "rx_packets": i % 13, "rx_bytes": (i % 13) * 1500,
                                "energy_uj": i % 100, "seq": sec * per + i, "cpu_source": "kernel",
                                "counters_source": "cpu-clock estimate", "energy_source": "model"}))
    return seconds * per


def _segment_table(host: str, comps: int, seconds: int, t0: int, seq: int):  # type: ignore[no-untyped-def]
    import pyarrow as pa

    n = comps * seconds
    i = np.arange(n)
    cols = {"host": pa.array([host] * n), "tenant": pa.array([f"c{c:02d}" for c in (i % comps).tolist()]),
            "compartment": pa.array(["vswitch"] * n), "period_start_ns": pa.array(t0 + (i // comps) * 10**9),
            "records": pa.array(np.full(n, 1000))}
    for k, name in enumerate(ROLLUP_COLUMNS):
        cols[name] = pa.array((i * (k + 3)) % 1_000_000_000, type=pa.int64())
    cols["first_seq"] = pa.array(np.full(n, 0))
    cols["last_seq"] = pa.array(np.full(n, seq))
    return pa.table(cols)


def main() -> list[Result]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import write_deltalake

    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--compartments", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--ship-seconds", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Ship: the real code on one host.
        records = _store(root / "sample.db", args.compartments, args.ship_seconds)
        with Store(root / "sample.db") as s:
            t = time.perf_counter()
            done = ship.ship(s, str(root / "shipped"))
            ship_s = time.perf_counter() - t
            t = time.perf_counter()
            assert len(s.records_seq("sample", 0, records - 1)) == records
            read_s = time.perf_counter() - t
        results.append(Result("ship: store records -> 1 s rollup segment", records / ship_s, "records/s",
                              records / read_s, "reading the same records from the store", read_s / ship_s, "", True,
                              {"rollup_rows": done.rows, "records": records}))
        # Commit: one segment per host.
        segs = root / "segs"
        t0 = (int(time.time()) // 3600 - 1) * 3600 * 10**9
        nbytes = 0
        tables = []
        for h in range(args.hosts):
            host = f"host{h:04d}"
            tbl = _segment_table(host, args.compartments, args.seconds, t0, 10**6)
            path = segs / ship.segment_key(host, 0, 10**6, "0")
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(tbl, path, compression="zstd")
            nbytes += path.stat().st_size
            if h < 50:
                tables.append(tbl)
        rows = args.hosts * args.compartments * args.seconds
        t = time.perf_counter()
        c = fleet.commit(str(segs), str(root / "table"))
        commit_s = time.perf_counter() - t
        assert len(c.added) == args.hosts
        sample = pa.concat_tables(tables)
        t = time.perf_counter()
        write_deltalake(str(root / "bulk"), sample)
        bulk_rate = len(sample) / (time.perf_counter() - t)
        results.append(Result("commit: segments -> Delta table, one commit each", rows / commit_s, "rows/s", bulk_rate,
                              "one write_deltalake of 50 hosts' rows", rows / commit_s / bulk_rate, "", True,
                              {"hosts": args.hosts, "rows": rows, "seconds": commit_s}))
        # Bill: DuckDB, then Dask.
        span = (t0, t0 + args.seconds * 10**9)
        rates, bills = {}, {}
        for engine in ("duckdb", "dask"):
            t = time.perf_counter()
            bills[engine] = fleet.fleet_usage(str(root / "table"), *span, 3600 * 10**9, engine=engine)
            rates[engine] = rows / (time.perf_counter() - t)
        assert bills["duckdb"] == bills["dask"]
        results.append(Result("bill: committed rows summed by Dask (local cluster, 2 workers)", rates["dask"], "rows/s",
                              rates["duckdb"], "DuckDB over the same files", rates["dask"] / rates["duckdb"], "",
                              True, {"rows": rows}))
        per_host_day = nbytes / args.hosts * (86_400 / args.seconds)
        results.append(Result("storage per host-day", per_host_day / 1e6, "MB", None, "", None, "", True,
                              {"compartments": args.compartments}))
    return results


if __name__ == "__main__":
    report(main())
