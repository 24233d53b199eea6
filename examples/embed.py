#!/usr/bin/env python3
"""Embed meter in your own agent: callbacks from a background thread.

    sudo .venv/bin/python examples/embed.py [CGROUP_ROOT] [SECONDS]

Meters each child cgroup of CGROUP_ROOT (default: the whole cgroup v2
tree) and prints, once a second, each tenant's CPU in the last second,
billed to the millisecond.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict

import numpy as np

from meter import NAMES, Meter, MeterError, Topology


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else None
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    lock = threading.Lock()
    usage: dict[str, int] = defaultdict(int)

    def on_batch(batch):  # runs in meter's drain thread
        with lock:
            # Text fields are codes into meter.NAMES: sum by code, name once per tenant.
            for code in np.unique(batch["tenant"]).tolist():
                usage[NAMES.text(code)] += int(batch["cpu_ns"][batch["tenant"] == code].sum())

    try:
        # A batch every second (the default is 2 s): this agent prints each second's usage.
        meter = Meter(Topology.discover(root), window_ms=1, batch_interval=1.0)
        meter.on_batch(on_batch)
        meter.start()
    except MeterError as err:
        print(f"embed: {err}", file=sys.stderr)
        return 1
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1)
            with lock:
                snapshot = dict(usage)
                usage.clear()
            print("  ".join(f"{t}={ns / 1e6:.1f}ms" for t, ns in sorted(snapshot.items())))
    finally:
        meter.stop()
        meter.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
