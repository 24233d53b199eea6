#!/usr/bin/env python3
"""Context-switch throughput with meter running vs not (perf bench sched pipe).

Runs alternate off/on rounds in the same process and compares the median
ops/s: the end-to-end price of metering every schedule.

    sudo .venv/bin/python benchmarks/sched_pipe.py [--rounds 5] [--loops 200000]

Goal: with/without >= 0.97.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess

from _common import Result, report

from meter.engine import Meter
from meter.topology import Topology


def pipe_ops(loops: int) -> float:
    out = subprocess.run(["perf", "bench", "sched", "pipe", "-l", str(loops)], capture_output=True, text=True,
                         check=True).stdout
    return float(re.search(r"([\d.]+) ops/sec", out).group(1))


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--loops", type=int, default=200_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is not installed: apt-get install linux-perf (make bench does)")
    off, on = [], []
    meter = Meter(Topology.discover())
    for _ in range(args.rounds):
        off.append(pipe_ops(args.loops))
        meter.open()
        meter.start()
        on.append(pipe_ops(args.loops))
        meter.stop()
        meter.close()
    ratio = statistics.median(on) / statistics.median(off)
    return [Result("perf bench sched pipe with meter", statistics.median(on), "ops/s", statistics.median(off),
                   "without meter, alternating rounds", ratio, ">= 0.97", ratio >= 0.97,
                   {"on": on, "off": off, "loops": args.loops})]


if __name__ == "__main__":
    report(main())
