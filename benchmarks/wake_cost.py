#!/usr/bin/env python3
"""Wake cost: the same drain, back to back and after the thread has slept.

The agent sleeps between drains (0.25 s by default). On a VM whose vCPUs
idle between bursts, the first milliseconds after a wake run slower
(caches and frequency), so a drain costs more CPU than the same drain
run back to back. This benchmark measures that factor on this machine:
a simulated host like ``drain_cpu.py``'s (8 CPUs, 100 compartments,
1 ms windows, 250 windows a drain), the engine's own ``Meter.drain()``,
its thread CPU time (``time.thread_time``) per drain, first with no
sleep between drains (the baseline), then with ``--sleep`` seconds
before each one, alternating in rounds.

    .venv/bin/python benchmarks/wake_cost.py [--rounds 4] [--drains 20] [--sleep 0.25]

No goal: it is what ``drain_cpu.py``'s figure is made of here (the
warm cost per drain times this factor).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import Result, report

from meter.cgroup import cgroup_id
from meter.engine import Meter
from meter.sources.fake import FakeCPU, FakeEnergy, FakeSources, steady_load
from meter.topology import Topology


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--drains", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=0.25)
    ap.add_argument("--compartments", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    w, windows = 1_000_000, 250
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cg"
        for i in range(args.compartments):
            (root / f"c{i:03d}").mkdir(parents=True)
        topo = Topology.discover(root, mount=root)
        ids = [cgroup_id(c.cgroup) for c in topo.compartments]
        # ~13 busy compartments a window over 8 CPUs: about drain_cpu.py's records a drain.
        cpu = FakeCPU(ncpu=8, window_ns=w, load=steady_load(ids, 8, w, busy=0.5, per_cpu=2))
        warm: list[float] = []
        woken: list[float] = []
        records = 0
        with Meter(topo, 1, counters={}, sources=FakeSources(cpu, energy=FakeEnergy())) as meter:
            cpu.advance(windows)
            meter.drain()  # resolves every cgroup once
            for _ in range(args.rounds):
                for gap, out in ((0.0, warm), (args.sleep, woken)):
                    for _ in range(args.drains):
                        cpu.advance(windows)
                        if gap:
                            time.sleep(gap)
                        t0 = time.thread_time()
                        records += len(meter.drain())
                        out.append(time.thread_time() - t0)
    hot, cold = float(np.median(warm)) * 1e3, float(np.median(woken)) * 1e3
    per_drain = records / (2 * args.rounds * args.drains)
    return [Result(f"drain CPU after a {args.sleep:g} s sleep ({per_drain:.0f} records a drain)", cold, "ms a drain",
                   hot, "the same drains back to back", cold / hot, "", True,
                   {"warm_ms": hot, "woken_ms": cold, "records_per_drain": per_drain,
                    "percent_of_a_core_at_4_drains_a_second": cold * 4 / 10})]


if __name__ == "__main__":
    report(main())
