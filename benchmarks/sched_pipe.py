#!/usr/bin/env python3
"""Context-switch throughput with meter running vs not (perf bench sched pipe).

Runs alternating rounds in the same process (off, meter on, and the floor
program alone: the least any program reading clock and cgroup id per
switch can cost) and compares the median ops/s: the end-to-end price of
metering every schedule.

    sudo .venv/bin/python benchmarks/sched_pipe.py [--rounds 5] [--loops 200000]

Goal: with/without >= 0.97.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess

from _common import Result, bpf_stats, report

from meter import program
from meter.engine import Meter
from meter.topology import Topology


def pipe_ops(loops: int, pin: str | None) -> float:
    cmd = ["perf", "bench", "sched", "pipe", "-l", str(loops)]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"([\d.]+) ops/sec", out).group(1))


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loops", type=int, default=200_000)
    ap.add_argument("--pin", default=None, metavar="CPUS",
                    help="run perf bench under taskset -c CPUS (e.g. 0: every op is two switches on one CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed: apt-get install linux-perf (make bench does)")
    off, on, floor = [], [], []
    meter = Meter(Topology.discover())
    prog = program.load("floor", {"METER_NR_COUNTERS": 0})
    with bpf_stats(False):  # the stats' own clock reads would cost every switch
        try:
            for _ in range(args.rounds):
                off.append(pipe_ops(args.loops, args.pin))
                meter.open()
                meter.start()
                on.append(pipe_ops(args.loops, args.pin))
                meter.stop()
                meter.close()
                prog.attach_raw_tracepoint(tp=b"sched_switch", fn_name=b"floor_switch")
                floor.append(pipe_ops(args.loops, args.pin))
                prog.detach_raw_tracepoint(tp=b"sched_switch")
        finally:
            prog.cleanup()
    ratio = statistics.median(on) / statistics.median(off)
    label = "perf bench sched pipe with meter" + (f" (taskset -c {args.pin})" if args.pin else "")
    return [Result(label, statistics.median(on), "ops/s", statistics.median(off),
                   "without meter, alternating rounds", ratio, ">= 0.97", ratio >= 0.97,
                   {"on": on, "off": off, "floor_program": floor, "floor_ratio": statistics.median(floor) / statistics.median(off),
                    "loops": args.loops, "pin": args.pin})]


if __name__ == "__main__":
    report(main())
