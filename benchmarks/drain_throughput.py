#!/usr/bin/env python3
"""Drain throughput: closed (cgroup, window) cells from the kernel's ring to numpy records.

1,000 real cgroups get rows in the sched program's ring, and every cell of
those rows is set (as a busy host would: each compartment active in every
window), then drained:

* source: ``SchedSource.drain()`` (reads the closed windows' cells straight
  from the mapped ring, zeroes them, and hands on the non-zero ones);
* engine: ``Meter.drain()`` (the same, plus resolution to compartments,
  grouping, and record building).

The baseline is a bare numpy copy of the same cells from the mapped ring
(the memory-read floor), measured in the same run.

    sudo .venv/bin/python benchmarks/drain_throughput.py [--cgroups 1000]

Goal: >= 1M records/s for the source drain; the engine figure is reported.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import Result, cgroup_tree, report

from meter.bpfabi import CTL_NEXT_ROW
from meter.cgroup import cgroup_id
from meter.engine import Meter
from meter.topology import Topology


def give_rows(src, cgids: np.ndarray) -> np.ndarray:
    """Rows for ``cgids`` in the ring, as the kernel takes them on a first charge."""
    ctl, rows = src.bpf[b"control"], src.bpf[b"rows"]
    first = int(ctl[ctl.Key(CTL_NEXT_ROW)].value)
    for i, c in enumerate(cgids.tolist()):
        rows[rows.Key(c)] = rows.Leaf(first + i)
    ctl[ctl.Key(CTL_NEXT_ROW)] = ctl.Leaf(first + len(cgids))
    return np.arange(first, first + len(cgids))


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroups", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with cgroup_tree("bench") as root:
        for i in range(args.cgroups):
            (root / f"c{i:04d}").mkdir()
        topo = Topology.discover(root)
        cgids = np.array([cgroup_id(c.cgroup) for c in topo.compartments], np.uint64)
        with Meter(topo, drain_interval=0.25) as meter:
            src = meter.cpu_source
            assert src is not None
            meter.drain()
            rows = give_rows(src, cgids)
            ring = src.ring_cells()
            results = {}
            for stage in ("source", "engine"):
                ring[rows, :] = 1000
                time.sleep(meter.drain_interval)
                t = time.perf_counter()
                got = len(src.drain()) if stage == "source" else len(meter.drain())
                results[stage] = (got, time.perf_counter() - t)
            # The floor: copying as many cells out of the mapped ring.
            nwin = max(1, results["source"][0] // len(rows))
            t = time.perf_counter()
            copy = ring[rows, :nwin].copy()
            floor = time.perf_counter() - t
    base = copy.size / floor
    n, source = results["source"]
    m, engine = results["engine"]
    return [
        Result("source drain into numpy", n / source, "records/s", base, "numpy copy of the same cells",
               (n / source) / base, ">= 1M records/s", n / source >= 1e6, {"entries": n, "cgroups": args.cgroups}),
        # The whole pipeline to resolved records: reported, no goal set.
        Result("engine drain to billable records", m / engine, "records/s", base, "numpy copy of the same cells",
               (m / engine) / base, "", True, {"entries": m}),
    ]


if __name__ == "__main__":
    report(main())
