#!/usr/bin/env python3
"""Nothing lost at 100 / 500 / 1,000 compartments: lost and late time, and meter's own CPU.

Per size: that many discovered compartments, a task in each waking every
1 ms (one forked process each, so they share one interpreter's memory),
1 ms windows, meter's own drain loop in this process with its defaults. What
is reported, per size:

* lost: every loss ``MeterStats.losses()`` names (unsettled adjustments,
  missing windows, conservation violations; net drops are 0: no ports);
* late: CPU time billed in a later window than its own (named in the
  records: ``cpu_source`` late and the window's late row), and the share
  of all CPU time it is;
* the drain loop's CPU (this process's rusage) against one core over the
  same run (the baseline).

    sudo .venv/bin/python benchmarks/no_loss.py [--seconds 20] [--sizes 100,500,1000]

Goal: nothing lost at every size. Late time and CPU are reported. Late
time came from takes held back: the wakers saturate the CPUs, and a
normal-priority drain thread waited seconds to run (36-64 % of CPU time
late at 1,000 compartments); the loop now waits, takes and builds in the
real-time class (meter.loop). ``--drain-priority normal`` runs it as it
was, for the comparison.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

from _common import Result, cgroup_tree, report

from meter.engine import Meter
from meter.sinks.prometheus import Exporter
from meter.sinks.store import Store
from meter.topology import Topology
from tests.loads import WAKERS

SCRAPER = """
import sys, time, urllib.request
url, period = sys.argv[1], float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url, timeout=30).read()
    except OSError:
        pass
    time.sleep(period)
"""


def run(size: int, seconds: float, priority: str = "realtime", with_: str = "") -> Result:
    """``with_``: "store" writes each batch to a record store in the loop's body (as
    ``meter record``); "exporter" serves /metrics, scraped every 0.5 s by another
    process, while the loop runs in the exporter's meter thread (as ``meter serve``)."""
    with cgroup_tree("noloss") as root, tempfile.TemporaryDirectory() as tmp:
        dirs = [root / f"c{i:04d}" for i in range(size)]
        for d in dirs:
            d.mkdir()
        store = Store(f"{tmp}/records.db") if with_ == "store" else None
        with Meter(Topology.discover(root), window_ms=1, drain_priority=priority) as meter:
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            wakers = subprocess.Popen([sys.executable, "-S", "-c", WAKERS, *map(str, dirs), str(seconds)])
            if with_ == "exporter":
                exporter = Exporter(meter, "127.0.0.1:0")
                exporter.start()  # runs the meter's loop in a thread of its own
                scraper = subprocess.Popen([sys.executable, "-S", "-c", SCRAPER,
                                            f"http://127.0.0.1:{exporter.port}/metrics", "0.5"])
                wakers.wait()
                scraper.kill()
                exporter.stop()
            else:
                # meter's own loop: its defaults (takes, closes, batches; the columns, when they
                # go to a store: as meter record hands them)
                for batch in meter.batches(columns=store is not None):
                    if store is not None:
                        store.write(batch)
                    if wakers.poll() is not None:
                        break
                for batch in meter.batches(0.05, columns=store is not None):  # and its final flush
                    if store is not None:
                        store.write(batch)
        if store is not None:
            store.close()
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    st = meter.stats
    cpu_pct = ((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)) / wall * 100
    lost = {k: v for k, v in st.losses().items() if v}
    total_ns = int(meter.ncpu * wall * 1e9)  # every CPU's time while metering
    return Result(f"{size} compartments waking every 1 ms, 1 ms windows, {priority} drain"
                  f"{', ' + with_ if with_ else ''}: lost", float(sum(lost.values())),
                  "ns or windows", None, "", None, "0", not lost,
                  {"lost": lost, "late_ns": st.late_ns, "late_share": st.late_ns / total_ns if total_ns else 0.0,
                   "late_unmatched_ns": st.late_unmatched_ns, "unattributed_ns": st.unattributed_ns,
                   "agent_cpu_pct_of_core": cpu_pct, "records": st.records, "records_per_s": st.records / wall,
                   "windows": st.windows, "drain_priority": priority,
                   "realtime_refused": meter.realtime_refused, "duty_waits": meter.duty_waits})


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--sizes", default="100,500,1000")
    ap.add_argument("--drain-priority", default="realtime", choices=["realtime", "normal"],
                    help="the drain loop's scheduling (normal: the thread as it is, for comparison)")
    ap.add_argument("--with", dest="with_", default="", choices=["", "store", "exporter"],
                    help="store: each batch written to a record store in the loop (as meter record); exporter: "
                         "the loop in the exporter's thread, /metrics scraped every 0.5 s (as meter serve)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = []
    for size in (int(s) for s in args.sizes.split(",")):
        r = run(size, args.seconds, args.drain_priority, args.with_)
        d = r.detail
        print(f"  {size}: lost {d['lost'] or 0}, late {d['late_ns'] / 1e9:.3f} s ({d['late_share']:.1%} of CPU time), "
              f"agent {d['agent_cpu_pct_of_core']:.1f} % of a core, {d['records_per_s']:.0f} records/s, "
              f"takes put off by the real-time share {d['duty_waits']}", flush=True)
        out.append(r)
    return out


if __name__ == "__main__":
    report(main())
