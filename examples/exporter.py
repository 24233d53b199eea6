#!/usr/bin/env python3
"""Embed meter's Prometheus exporter in your own agent, and read its totals directly.

    sudo .venv/bin/python examples/exporter.py [CGROUP_ROOT] [SECONDS]

Serves http://127.0.0.1:9464/metrics while it runs and prints, every
second, the running CPU seconds per tenant from ``Meter.totals()`` (a
thread-safe snapshot). Stops cleanly: nothing stays attached.
"""

from __future__ import annotations

import sys
import time

from meter import Meter, MeterError, Topology
from meter.sinks.prometheus import Exporter


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else None
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    try:
        meter = Meter(Topology.discover(root))
        exporter = Exporter(meter, "127.0.0.1:9464")
        exporter.start()
    except MeterError as err:
        print(f"exporter: {err}", file=sys.stderr)
        return 1
    try:
        print(f"serving http://{exporter.host}:{exporter.port}/metrics")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(1)
            print("  ".join(f"{r['tenant']}={r['cpu_ns'] / 1e9:.3f}s" for r in meter.totals() if r["cpu_ns"]))
    finally:
        exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
