#!/usr/bin/env python3
"""ns per packet of meter's tc programs vs an empty tc program, as meter runs them.

The CPU source is open with its packet hooks (sched_switch, NET softirq
entry/exit, the window tick) and drained every 0.25 s, as in `meter
record`; meter's programs count the packets on both ends of a veth pair:
ingress on the receiving end (inside the NET_RX softirq, dated by the
span's start: no clock read) and egress on the sending end. Two loads: a
UDP flood of small packets (egress in the sender's process context: one
clock read) and a TCP stream (its egress mostly sent from the softirq that
receives its ACKs, so mostly dated by span starts). An empty tc program is
attached beside each (neither gives a verdict, so both see every packet);
the kernel's bpf_stats give run_time_ns / run_cnt for each. Two rounds a
load, each program first once. Each load runs with both ways of dating a
packet outside a softirq (meter's ``packet_time``): ``clock`` (the default:
a clock read) and ``charge`` (the CPU's last charge, no clock read; up to a
tick early), so the report carries the trade-off.

    sudo .venv/bin/python benchmarks/tc_packet.py [--seconds 4] [--load udp|tcp|both] [--packet-time clock|charge|both]

Goal: <= 1.5x the empty program and <= 100 ns per packet, each direction.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from _common import Result, bpf_stats, namespace_pair, per_run, prog_stats, report, tcp_stream, udp_flood

from meter import program
from meter.netns import iproute
from meter.sources.net import NetSource, Port
from meter.sources.sched import SchedSource


def _round(seconds: float, meter_first: bool, load: str, packet_time: str) -> dict[str, tuple[float, int]]:
    with namespace_pair("tp") as (a, b, _):
        floor = program.load("floor")
        src = SchedSource(1_000_000, net=True, max_ports=2, packet_time=packet_time)
        src.open()
        net = NetSource(src.bpf, [Port(0, b, "vb"), Port(1, a, "va")], ring_windows=src.ring_windows, max_ports=2)
        try:
            for ns, dev, port, fn, empty, parent in ((b, "vb", 0, b"meter_tc_ingress", b"floor_tc", "ffff:fff2"),
                                                       (a, "va", 1, b"meter_tc_egress", b"floor_tc_egress", "ffff:fff3")):
                ipr = iproute(ns)
                try:
                    idx = ipr.link_lookup(ifname=dev)[0]
                    ipr.tc("add", "clsact", idx)
                    mfd = net.program_fd(net.ports[port], fn)
                    efd = floor.load_func(empty, floor.SCHED_CLS).fd
                    for prio, f in ((1, mfd), (2, efd)) if meter_first else ((1, efd), (2, mfd)):
                        ipr.tc("add-filter", "bpf", idx, ":1", fd=f, name="bench", parent=parent, classid=1,
                               direct_action=True, prio=prio)
                finally:
                    ipr.close()
            with (tcp_stream(a, b, "10.79.0.2", seconds) if load == "tcp"
                  else contextlib.nullcontext(udp_flood(a, "10.79.0.2", seconds))) as sender:
                while sender.poll() is None:  # drained as meter drains: the cells stay open
                    time.sleep(0.25)
                    src.drain()
                    net.drain(src.closed_window)
            stats = prog_stats(["meter_tc_ingress", "floor_tc", "meter_tc_egress", "floor_tc_egress"])
        finally:
            floor.cleanup()
            net.close()
            src.close()
    return {name: (per_run(ns, cnt), cnt) for name, (ns, cnt) in stats.items()}


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--load", choices=["udp", "tcp", "both"], default="both")
    ap.add_argument("--packet-time", choices=["clock", "charge", "both"], default="both",
                    help="how packets outside a softirq are dated (meter's packet_time; default: measure both)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = []
    times = ("clock", "charge") if args.packet_time == "both" else (args.packet_time,)
    for load, packet_time in ((ld, t) for ld in (("udp", "tcp") if args.load == "both" else (args.load,))
                              for t in times):
        with bpf_stats():
            r1 = _round(args.seconds / 2, True, load, packet_time)
            r2 = _round(args.seconds / 2, False, load, packet_time)
        for what, fn, empty in (("ingress, in the NET_RX softirq", "meter_tc_ingress", "floor_tc"),
                                ("egress, from the sender", "meter_tc_egress", "floor_tc_egress")):
            if packet_time != "clock" and fn == "meter_tc_ingress":
                continue  # inside a softirq span either way: dated by the span's start
            m, f = (r1[fn][0] + r2[fn][0]) / 2, (r1[empty][0] + r2[empty][0]) / 2
            out.append(Result(f"tc program cost per packet ({load.upper()}, {what}, packet_time {packet_time})",
                              m, "ns/packet", f,
                              "empty tc program, same packets", m / f, "<= 1.5x and <= 100 ns",
                              m / f <= 1.5 and m <= 100,
                              {"packets": r1[fn][1] + r2[fn][1], "packet_time": packet_time,
                               "meter_first": (r1[fn][0], r1[empty][0]),
                               "empty_first": (r2[fn][0], r2[empty][0])}))
    return out


if __name__ == "__main__":
    report(main())
