#!/usr/bin/env python3
"""Memory of the agent on a big host: RSS over 10 minutes of 1 ms records for 1,000 compartments.

The simulated CPU source (``meter.sources.fake.FakeCPU`` with
``steady_load``, as scale.py) plays a host of 128 CPUs and 1,000
compartments; the real engine takes it as meter's loop does, every
drain interval (500 windows at 1 ms) or sooner when takes that far apart
would each hold more than a batch (``DrainLoop.next_interval``: on a host
this big, about every 128 windows), and builds a batch every batch
interval (2,000 windows) or as soon as the takes hold ``BATCH_ENTRIES``
(at every take here), and the real store takes every batch with its
rollups, as ``meter record`` does. Time is simulated, run as fast as this
machine goes. RSS is read after each simulated minute.

    .venv/bin/python benchmarks/rss.py [--minutes 10] [--cpus 128] [--compartments 1000]

Goal (issue "Big hosts"): memory bounded and stated: RSS after the first
minute grows by less than 5 MB to the end (the soak's bound); the figure is
the RSS at the end, the baseline the RSS after one minute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil
from _common import Result, report
from scale import _host

from meter.engine import Meter
from meter.sinks.store import Store
from meter.sources.fake import FakeCPU, FakeEnergy, FakeSources, steady_load

GROWTH_MB = 5.0


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0, help="simulated minutes (1,200 takes for 10)")
    ap.add_argument("--cpus", type=int, default=128, help="CPUs of the simulated host")
    ap.add_argument("--compartments", type=int, default=1000, help="its compartments")
    ap.add_argument("--window-ms", type=int, default=1, help="record width")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args()
    proc = psutil.Process()
    # meter's defaults, as its loop (DrainLoop.batches) runs them on simulated time: a take every
    # drain interval, sooner when takes that far apart would each hold more than a batch
    # (next_interval), a batch every batch interval or when the takes hold a batch's worth.
    minute = round(60e9 / (args.window_ms * 1e6))
    total = round(args.minutes * minute)
    rss: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        topo, ids = _host(Path(tmp) / "cg", args.compartments)
        w = args.window_ms * 1_000_000
        cpu = FakeCPU(ncpu=args.cpus, window_ns=w, load=steady_load(ids, args.cpus, w, busy=0.8, per_cpu=4))
        records = takes = 0
        t0 = time.monotonic()
        with Store(Path(tmp) / "records.db") as store, \
                Meter(topo, args.window_ms, counters={}, sources=FakeSources(cpu, energy=FakeEnergy())) as meter:
            step, since, before, done = round(meter.drain_interval * 1e9 / w), 0, 0.0, 0
            while done < total:
                step = min(step, total - done, minute - done % minute)  # and a reading at each minute
                cpu.advance(step)
                done, since, takes = done + step, since + 1, takes + 1
                full = meter._take()
                built = meter.batch_due(since, full) or done == total
                if built:
                    batch = meter._batch()
                    store.write(batch)
                    records += len(batch)
                    del batch
                step = max(1, round(meter.next_interval(step * w / 1e9, full - before) * 1e9 / w))
                since, before = (0, 0.0) if built else (since, full)
                if done % minute == 0:
                    rss.append(proc.memory_info().rss / 2**20)
                    print(f"minute {len(rss)}: RSS {rss[-1]:.1f} MB, {records:,} records, {takes:,} takes", flush=True)
            if not rss or done % minute:
                rss.append(proc.memory_info().rss / 2**20)  # the end, short of a whole minute
            assert meter.stats.conservation_violations == 0
            size = (Path(tmp) / "records.db").stat().st_size
    wall = time.monotonic() - t0
    growth = rss[-1] - rss[0]
    return [Result(f"RSS after {args.minutes:g} simulated minutes, {args.cpus} CPUs x {args.compartments} "
                   f"compartments, {args.window_ms} ms windows", rss[-1], "MB", rss[0], "RSS after the first minute",
                   rss[-1] / rss[0], f"grows < {GROWTH_MB:g} MB after the first minute", growth < GROWTH_MB,
                   {"rss_mb_by_minute": [round(r, 1) for r in rss], "growth_mb": round(growth, 1),
                    "records": records, "store_bytes_per_record": round(size / records, 2),
                    "wall_s": round(wall, 1)})]


if __name__ == "__main__":
    report(main())
