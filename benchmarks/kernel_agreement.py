#!/usr/bin/env python3
"""How far a compartment's cpu_ns is from the kernel's own cpu.stat, over a mixed run.

Four compartments run different loads at once (a busy loop, a 35 % duty
cycle, a pipe ping-pong, a task waking every 0.5 ms from idle) while a
half-busy load per CPU runs outside them (billed to host). Each load
starts stopped inside its cgroup and every compartment is frozen
(cgroup.freeze) when cpu.stat is read, before and after, so the records
and the kernel cover exactly the same usage. The baseline is the kernel's
figure itself: the ratio is metered / cpu.stat of the worst compartment.

    sudo .venv/bin/python benchmarks/kernel_agreement.py [--seconds 60]

Goal: every compartment within 0.2 % of cpu.stat. Also reported: what
the steal and sched rows held (time the kernel charged to no task).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import Result, cgroup_tree, report

from meter.cgroup import cpu_usage_usec
from meter.engine import Meter
from meter.topology import Topology

LOADS = {
    "busy": "while True: pass\n",
    "duty35": ("import time\nwhile True:\n    end = time.monotonic() + 0.0035\n"
               "    while time.monotonic() < end: pass\n    time.sleep(0.0065)\n"),
    "pingpong": ("import os\na, b = os.pipe(); c, d = os.pipe()\nif os.fork() == 0:\n"
                 "    while True: os.read(a, 1); os.write(d, b'x')\n"
                 "while True: os.write(b, b'x'); os.read(c, 1)\n"),
    "wakeup": "import time\nwhile True: time.sleep(0.0005)\n",
}
NOISE = ("import time\nwhile True:\n    end = time.monotonic() + 0.005\n"
         "    while time.monotonic() < end: pass\n    time.sleep(0.005)\n")


def _freeze(cgs: list[Path], frozen: bool) -> None:
    for cg in cgs:
        (cg / "cgroup.freeze").write_text("1" if frozen else "0")
    for cg in cgs:
        while f"frozen {int(frozen)}" not in (cg / "cgroup.events").read_text():
            time.sleep(0.005)


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with cgroup_tree("agree") as root:
        cgs = {name: root / name for name in LOADS}
        for cg in [*cgs.values(), root / "noise"]:
            cg.mkdir()
        try:
            for _ in range(os.cpu_count() or 1):
                procs.append(subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"',
                                               str(root / "noise"), sys.executable, "-S", "-c", NOISE]))
            with Meter(Topology.discover(root), window_ms=1) as meter:
                for name, code in LOADS.items():
                    procs.append(subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"',
                                                   str(cgs[name]), sys.executable, "-S", "-c", code]))
                time.sleep(0.5)
                _freeze(list(cgs.values()), True)
                time.sleep(0.005)
                cut_ns = time.time_ns() - 2_000_000
                before = {n: cpu_usage_usec(cg) for n, cg in cgs.items()}
                _freeze(list(cgs.values()), False)
                batches = list(meter.batches(args.seconds))
                _freeze(list(cgs.values()), True)
                after = {n: cpu_usage_usec(cg) for n, cg in cgs.items()}
                batches += list(meter.batches(0.1))
        finally:
            for p in procs:
                p.send_signal(signal.SIGKILL)
                p.wait()
    batch = np.concatenate(batches)
    batch = batch[batch["window_start_ns"] >= cut_ns]
    devs = {}
    for name in LOADS:
        kernel = (after[name] - before[name]) * 1000
        metered = int(batch["cpu_ns"][batch["tenant"] == code(name)].sum())
        devs[name] = {"metered_ns": metered, "kernel_ns": kernel, "deviation_pct": (metered - kernel) / kernel * 100}
    worst = max(devs, key=lambda n: abs(devs[n]["deviation_pct"]))
    covered = meter.ncpu * (len(np.unique(batch["window_start_ns"])) * meter.window_ns)
    rows = {r: int(batch["cpu_ns"][batch["tenant"] == code(r)].sum()) for r in ("steal", "sched")}
    w = devs[worst]
    return [
        Result(f"worst cpu_ns vs cpu.stat over {args.seconds:g} s ({worst})", abs(w["deviation_pct"]), "%",
               None, "", w["metered_ns"] / w["kernel_ns"], "<= 0.2%", abs(w["deviation_pct"]) <= 0.2,
               {"compartments": devs}),
        Result("steal row", rows["steal"] / covered * 100, "% of CPU time", None, "", None, "", False,
               {"steal_ns": rows["steal"], "sched_ns": rows["sched"], "covered_cpu_ns": covered}),
        Result("sched row", rows["sched"] / covered * 100, "% of CPU time", None, "", None, "", False,
               {"sched_ns": rows["sched"]}),
    ]


if __name__ == "__main__":
    report(main())
