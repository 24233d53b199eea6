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

``--calls`` measures what a wake costs by what it runs, with
``--neighbours`` busy processes beside it (drain_cpu.py's tenant tasks, not
in cgroups: no root needed): thread CPU per wake of a thread that sleeps
``--sleep`` s and then does nothing, one small numpy call, ten of that
call, or eleven different small calls, ``--wakes`` times each, in rounds;
each against doing nothing.

    .venv/bin/python benchmarks/wake_cost.py --calls [--neighbours 100] [--wakes 40]

No goal: it is what ``drain_cpu.py``'s figure is made of here (the
warm cost per drain times this factor; a first call of each numpy
function after a wake).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import BUSY_WORKER, Result, report

from meter.cgroup import cgroup_id
from meter.engine import Meter
from meter.sources.fake import FakeCPU, FakeEnergy, FakeSources, steady_load
from meter.topology import Topology


def _calls() -> dict[str, Callable[[], object]]:
    """What a wake runs: nothing, or small numpy calls (eight int64s each)."""
    x = np.arange(8, dtype=np.int64)

    def same() -> None:
        for _ in range(10):
            x + 1

    def different() -> None:  # eleven: the comparison and the boolean index are two
        x + 1; x * 2; x.max(); x.astype(np.uint64); np.zeros(0, np.int64)  # noqa: E702
        x[x > 3]; x.tolist(); np.concatenate([x, x]); x.copy(); x.sum()  # noqa: E702

    return {"nothing": lambda: None, "one numpy call": lambda: x + 1,
            "ten of one numpy call": same, "eleven different numpy calls": different}


def by_calls(args: argparse.Namespace) -> list[Result]:
    """Thread CPU a wake, by what the wake runs, with busy neighbours."""
    if args.wakes < 1 or args.rounds < 1:
        raise SystemExit(f"--calls needs at least one wake and one round, not --wakes {args.wakes} "
                         f"--rounds {args.rounds}")
    calls = _calls()
    spent: dict[str, list[float]] = {name: [] for name in calls}
    with contextlib.ExitStack() as stack:
        for _ in range(args.neighbours):
            p = subprocess.Popen([sys.executable, "-S", "-c", BUSY_WORKER])
            stack.callback(p.wait)
            stack.callback(p.kill)
        time.sleep(1)
        with contextlib.suppress(OSError):  # as meter's drain thread runs, where allowed
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        for _ in range(args.rounds):
            for name, call in calls.items():
                t0 = time.thread_time()
                for _ in range(args.wakes):
                    time.sleep(args.sleep)
                    call()
                spent[name].append((time.thread_time() - t0) / args.wakes * 1e6)
    base = float(np.median(spent["nothing"]))
    return [Result(f"a wake after {args.sleep:g} s that runs {name}, {args.neighbours} busy neighbours",
                   float(np.median(us)), "us of thread CPU", base, "a wake that runs nothing",
                   float(np.median(us)) / base, "", True, {"rounds_us": us})
            for name, us in spent.items()]


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--drains", type=int, default=20)
    ap.add_argument("--sleep", type=float, default=0.25)
    ap.add_argument("--compartments", type=int, default=100)
    ap.add_argument("--calls", action="store_true", help="thread CPU a wake by what it runs, with busy neighbours")
    ap.add_argument("--neighbours", type=int, default=100, help="busy processes beside --calls")
    ap.add_argument("--wakes", type=int, default=40, help="wakes of each kind a round, with --calls")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.calls:
        return by_calls(args)
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
