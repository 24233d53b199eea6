#!/usr/bin/env python3
"""User-space CPU of meter's drain loop at 1 ms windows with 100 busy compartments.

100 cgroups, each with a process that wakes every 10 ms and works briefly,
so every compartment has records in most windows. meter runs in this
process with its defaults (takes every 0.5 s with a close between, a batch every 2 s); its
CPU time (this process's rusage: takes, nudges, resolution, record
building) is compared with the wall time, i.e. the baseline is one core
over the same run. ``--batch-interval 0.25`` builds at every take, as
meter did before batches were a second. ``--store`` writes each batch to a
record store in a temporary directory, as ``meter record`` does (the
batch's columns, never laid out as records): the agent end to end. The
figure is the steady state:
measured from the end of the first batch (whose one-time costs are
reported apart, ``first_batch_cpu_s``) to the end of the last batch
before the final one (the stop's final drain and the store's close are
reported apart, ``stop_cpu_s``), about ``--seconds``.

``--stages`` also says where that CPU goes, in thread CPU a batch over the
same span: the takes (``Meter._take_locked``; of it the ring's read,
``SchedSource._take``), the closes between takes (``Meter._close``), the build (``Meter._build``; of it energy,
``EnergyBooks.apportion``), the stats' check (``Meter._account``) and the
store's write; the rest is the loop's own (its waits and wakes, the batch's
concat). Each stage is timed by a wrapper around its method: two clock
reads a call, some twenty calls a batch.

    sudo .venv/bin/python benchmarks/drain_cpu.py [--seconds 10] [--compartments 100] [--store] [--stages]

Goal (issue "Big hosts"): < 1% of one core (it was < 2% before).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import BUSY_WORKER, Result, cgroup_tree, report, spawn_in

from meter.books import EnergyBooks
from meter.engine import BATCH_INTERVAL, DRAIN_INTERVAL, Meter
from meter.resolver import PSEUDO_ROWS
from meter.sinks.store import Store
from meter.sources.sched import SchedSource
from meter.topology import Topology

#: (stage, class, method) timed by --stages; an "of which" stage runs inside the one before it.
STAGES = (("take", Meter, "_take_locked"), ("take: ring read", SchedSource, "_take"),
          ("close", Meter, "_close"), ("build", Meter, "_build"), ("build: energy", EnergyBooks, "apportion"),
          ("stats check", Meter, "_account"), ("store write", Store, "write"))


@contextlib.contextmanager
def timed_stages(on: bool) -> Iterator[collections.Counter[str]]:
    """Thread CPU (ns) spent in each of STAGES while the block runs, summed (empty when not on)."""
    spent: collections.Counter[str] = collections.Counter()
    saved = []
    for stage, cls, name in STAGES if on else ():
        method = getattr(cls, name)

        def wrapper(*a: Any, _method: Any = method, _stage: str = stage, **kw: Any) -> Any:
            t = time.thread_time_ns()
            try:
                return _method(*a, **kw)
            finally:
                spent[_stage] += time.thread_time_ns() - t

        saved.append((cls, name, method))
        setattr(cls, name, functools.wraps(method)(wrapper))
    try:
        yield spent
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--compartments", type=int, default=100)
    ap.add_argument("--batch-interval", type=float, default=BATCH_INTERVAL, help="meter's default: %(default)s s")
    ap.add_argument("--drain-interval", type=float, default=DRAIN_INTERVAL, help="meter's default: %(default)s s")
    ap.add_argument("--store", action="store_true", help="write every batch to a record store, as meter record")
    ap.add_argument("--stages", action="store_true", help="also the thread CPU of each stage, per batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with cgroup_tree("bench") as root, tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "records.db") if args.store else None
        for i in range(args.compartments):
            (root / f"c{i:03d}").mkdir()
            # 50 us of work every 10 ms (half a core for 100 of them): the CPUs are
            # not saturated and meter's own thread runs when it wants.
            spawn_in(root / f"c{i:03d}", [sys.executable, "-S", "-c", BUSY_WORKER])
        time.sleep(1)
        records = 0
        with timed_stages(args.stages) as spent, Meter(
                Topology.discover(root), window_ms=1, batch_interval=args.batch_interval,
                drain_interval=args.drain_interval) as meter:
            # Steady state: from the end of the first batch, whose build pays
            # one-time costs (first calls, first touches of the rings: 11-20 ms
            # of CPU in session 38's runs), reported apart.
            # It ends at the last batch before the final one: the final drain (every CPU
            # nudged, the last window waited for) and the store's close (its last seconds'
            # rollups) are the stop's costs, reported apart (stop_cpu_s).
            start = resource.getrusage(resource.RUSAGE_SELF)
            r0, t0, s0 = start, time.monotonic(), spent.copy()
            counted, marks = 0, []  # (rusage, time, records, stages) after each batch is written
            for batch in meter.batches(args.seconds + 1.0, columns=store is not None):
                if store is not None:
                    store.write(batch)
                if r0 is start:
                    r0, t0, s0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), spent.copy()
                    continue
                counted += len(batch)
                marks.append((resource.getrusage(resource.RUSAGE_SELF), time.monotonic(), counted, spent.copy()))
            if len(marks) < 2:  # the last is the final batch: none measured between
                raise SystemExit(f"--seconds {args.seconds:g} held no batch between the first and the final "
                                 f"one: run {2 * meter.batch_interval + 1:g} s or more")
            r1, t1, records, s1 = marks[-2]
            batches = len(marks) - 1
            if store is not None:
                store.close()  # its last seconds' rollups
            r2 = resource.getrusage(resource.RUSAGE_SELF)
            wall = t1 - t0
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        first = (r0.ru_utime - start.ru_utime) + (r0.ru_stime - start.ru_stime)
        stop = (r2.ru_utime - r1.ru_utime) + (r2.ru_stime - r1.ru_stime)
    pct = cpu / wall * 100
    busy = len(meter.row_names) - PSEUDO_ROWS  # less meter's own rows
    what = "meter record (drain loop and store)" if args.store else "drain loop"
    results = [Result(f"{what} CPU, {args.compartments} compartments, 1 ms windows", pct, "% of a core",
                      100.0, "one core over the same run", pct / 100, "< 1%", pct < 1,
                      {"records": records, "records_per_s": records / wall, "compartments_seen": busy,
                       "seconds_measured": wall, "first_batch_cpu_s": first, "stop_cpu_s": stop,
                       "drain_interval_s": meter.drain_interval, "batch_interval_s": meter.batch_interval,
                       "batches_measured": batches})]
    if args.stages:
        per_batch = {stage: (s1[stage] - s0[stage]) / 1e6 / batches for stage, _, _ in STAGES}
        total = cpu * 1e3 / batches
        top = sum(v for stage, v in per_batch.items() if ":" not in stage)  # the "of which" are inside
        per_batch["rest (the loop: waits, wakes, concat)"] = total - top
        for stage, ms in per_batch.items():
            results.append(Result(f"  {stage}", ms, "ms of CPU a batch", total, "the process's CPU a batch",
                                   ms / total, "", True))
    return results


if __name__ == "__main__":
    report(main())
