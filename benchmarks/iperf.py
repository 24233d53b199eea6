#!/usr/bin/env python3
"""TCP throughput between two namespaces with meter metering both ends vs not (iperf3).

Alternating rounds in the same run; meter's topology owns the veth end in
each namespace, so every packet passes its tc programs and softirq
attribution.

    sudo .venv/bin/python benchmarks/iperf.py [--rounds 3] [--seconds 3] [--programs]

Goal: with/without >= 0.95 (bpf_stats off; `benchmarks/run` takes the median of 5 rounds).
``--programs`` adds one round with meter and bpf_stats on, and reports each
of meter's programs' ns per run and share of a CPU under this load (the
stats' own clock reads inflate both a little).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import Result, bpf_stats, cgroup_tree, namespace_pair, report

from meter.engine import Meter
from meter.topology import Topology


def iperf(a: str, seconds: float) -> float:
    out = subprocess.run(["ip", "netns", "exec", a, "iperf3", "-c", "10.79.0.2", "-t", str(seconds), "-J"],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--programs", action="store_true", help="one more round with bpf_stats on: each program's cost")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not shutil.which("iperf3"):
        raise SystemExit("iperf3 is not installed: apt-get install iperf3 (make bench does)")
    off, on = [], []
    with bpf_stats(False), cgroup_tree("iperf") as cg, namespace_pair("ip") as (a, b, dev), \
            tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        cfg = Path(tmp) / "t.toml"
        cfg.write_text(f'[[tenant]]\nname = "t"\n[[tenant.compartment]]\nname = "vswitch"\n'
                       f'cgroup = "{cg}"\ninterfaces = ["{a}:va", "{b}:vb"]\n')
        meter = Meter(Topology.from_file(cfg))
        try:
            for _ in range(args.rounds):
                off.append(iperf(a, args.seconds))
                meter.open()
                meter.start()
                on.append(iperf(a, args.seconds))
                meter.stop()
                meter.close()
            if args.programs:
                programs = _program_costs(meter, a, args.seconds)
        finally:
            server.kill()
            server.wait()
    ratio = statistics.median(on) / statistics.median(off)
    return [Result("iperf3 TCP between namespaces with meter", statistics.median(on) / 1e9, "Gbit/s",
                   statistics.median(off) / 1e9, "without meter, alternating rounds", ratio, ">= 0.95", ratio >= 0.95,
                   {"on": on, "off": off, **({"programs": programs} if args.programs else {})})]


def _program_costs(meter: Meter, a: str, seconds: float) -> dict[str, dict[str, float]]:
    """One round with meter and bpf_stats on: each meter program's ns per run and % of a CPU."""
    with bpf_stats():
        meter.open()
        meter.start()
        try:
            t0 = time.monotonic()
            iperf(a, seconds)
            wall = time.monotonic() - t0
            costs = meter.program_stats()  # its own programs, each tc copy summed
        finally:
            meter.stop()
            meter.close()
    return {n: {"ns_per_run": round(ns / runs, 1), "runs": runs, "cpu_pct": round(ns / wall / 1e7, 2)}
            for n, (ns, runs) in sorted(costs.items(), key=lambda kv: -kv[1][0])}


if __name__ == "__main__":
    report(main())
