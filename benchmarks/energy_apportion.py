#!/usr/bin/env python3
"""Energy apportioning throughput: exact integer shares with largest remainder.

Splits measured energy over 1M records (100 compartments + host + idle, by
cpu_ns), once per drain interval (one group) and once per window (the power
model: one group a window). The baseline is a plain float proportional
split (E x w / Σw, no rounding, no exactness) over the same records in the
same run.

    .venv/bin/python benchmarks/energy_apportion.py [--records 1000000]

Goal: >= 5M records/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import Result, report

from meter.attribution import attribute_energy
from meter.records import build


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n, rows = args.records, 102
    rng = np.random.default_rng(0)
    batch = build(n, {"cpu_ns": rng.integers(0, 1_000_000, n)})
    idle = np.arange(n) % rows == rows - 1
    one = np.zeros(n, np.int64)
    per_window = np.arange(n) // rows
    nwin = per_window[-1] + 1
    w = batch["cpu_ns"]

    def floats() -> np.ndarray:
        return 25_000_000 * w / w.sum()

    def interval() -> np.ndarray:
        return attribute_energy(batch, one, np.array([25_000_000]), idle=idle, cycles_measured=False,
                                misses_measured=False)

    def windows() -> np.ndarray:
        return attribute_energy(batch, per_window, np.full(nwin, 100_000), idle=idle, cycles_measured=False,
                                misses_measured=False)

    base = n / best_of(floats)
    results = []
    for label, fn in (("energy apportioning, one interval", interval), ("energy apportioning, per window", windows)):
        rate = n / best_of(fn)
        results.append(Result(label, rate, "records/s", base, "float proportional split, no rounding",
                              rate / base, ">= 5M records/s", rate >= 5e6, {"records": n}))
    assert interval().sum() == 25_000_000 and windows().sum() == 100_000 * nwin
    return results


if __name__ == "__main__":
    report(main())
