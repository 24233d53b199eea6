#!/usr/bin/env python3
"""ns per packet of meter's tc program vs an empty tc program.

Both are attached to the same veth ingress at once (neither gives a
verdict, so both see every packet); the kernel's bpf_stats give
run_time_ns / run_cnt for each. Two rounds, each program first once.

    sudo .venv/bin/python benchmarks/tc_packet.py [--seconds 4]

Goal: <= 1.5x the empty program and <= 100 ns per packet.
"""

from __future__ import annotations

import argparse

from _common import Result, bpf_stats, namespace_pair, prog_stats, report, udp_flood

from meter import program
from meter.netns import iproute
from meter.sources.net import NetSource, Port


def _round(seconds: float, meter_first: bool) -> tuple[float, float, int]:
    with namespace_pair("tp") as (a, b, dev):
        floor = program.load("floor")
        meter = program.load(["sched", "net"], {"METER_NET": 1, "METER_MAX_PORTS": 1, "METER_RING": 64})
        src = NetSource(meter, [Port(0, b, "vb")], ring_windows=64, max_ports=1)
        ipr = iproute(b)
        try:
            idx = ipr.link_lookup(ifname="vb")[0]
            ipr.tc("add", "clsact", idx)
            fd = floor.load_func(b"floor_tc", floor.SCHED_CLS).fd
            mfd = src.program_fd(src.ports[0], b"meter_tc_ingress")
            for prio, f in ((1, mfd), (2, fd)) if meter_first else ((1, fd), (2, mfd)):
                ipr.tc("add-filter", "bpf", idx, ":1", fd=f, name="bench", parent="ffff:fff2", classid=1,
                       direct_action=True, prio=prio)
            udp_flood(a, "10.79.0.2", seconds)
            stats = prog_stats(["meter_tc_ingress", "floor_tc"])
        finally:
            ipr.close()
            floor.cleanup()
            src.close()
            meter.cleanup()
    (m_ns, m_cnt), (f_ns, f_cnt) = stats["meter_tc_ingress"], stats["floor_tc"]
    return m_ns / max(m_cnt, 1), f_ns / max(f_cnt, 1), m_cnt


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with bpf_stats():
        r1 = _round(args.seconds / 2, True)
        r2 = _round(args.seconds / 2, False)
    m, f = (r1[0] + r2[0]) / 2, (r1[1] + r2[1]) / 2
    return [Result("tc program cost per packet", m, "ns/packet", f, "empty tc program, same packets", m / f,
                   "<= 1.5x and <= 100 ns", m / f <= 1.5 and m <= 100,
                   {"packets": r1[2] + r2[2], "meter_first": r1[:2], "empty_first": r2[:2]})]


if __name__ == "__main__":
    report(main())
