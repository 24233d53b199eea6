#!/usr/bin/env python3
"""ns per sched_switch event of meter's program (meter_switch, with meter_charge and meter_settle as its tail calls) vs a floor program.

Both are attached to the raw tracepoint sched_switch at once, so they see
the same events; the kernel's bpf_stats give run_time_ns / run_cnt for
each. The floor reads the same inputs (clock, pid, cgroup id, the counters)
and writes one per-CPU slot.

    sudo .venv/bin/python benchmarks/sched_event.py [--seconds 5] [--counters N] [--pin CPUS]

Without --pin it also measures 0 counters with the load pinned to CPU 0,
where every switch is between two tasks of one cgroup and joins a run
(bpf/sched.bpf.c, same_run()): no clock read. ``in_runs`` in the details
is the share of switches that did; ``idle_outs`` and ``idle_ins`` the
shares that were a switch away from idle, or into it, charged in
meter_switch itself (idle_out(), idle_in()).

``--two-compartments`` puts the load's two tasks in two compartments,
pinned to one CPU (``--pin``, default 0): every switch between them is
charged, on meter_charge's general path (0 counters only).

``--unseen-check off`` measures the same without the unseen-slice check
(task storage: a lookup per switch; meter compiles it out on kernels before
5.11): the trade-off, not a setting meter offers. Without it the time
tasks run in slices no switch event shows stays with ``sched``, not their
compartment (docs/architecture.md, "CPU time").

Goal: <= 1.3x the floor and <= 150 ns per event. It also reports
meter_tick's ns per tick (the window's roll-over included) against
meter_switch's in the same rounds, for each counter set (goal: < 3x, issue 16).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _common import Result, bpf_stats, cgroup_tree, per_run, prog_stats, report, switch_load

from meter import program
from meter.cgroup import cgroup_id, find_mount
from meter.perf import parse_event
from meter.sources import sched as sched_mod
from meter.sources.base import KernelCompartments
from meter.sources.sched import SchedSource


@contextlib.contextmanager
def _as_a_tenant() -> Iterator[tuple[dict[int, int], Path]]:
    """Run this process (and so the switch load it starts) in a tenant's
    compartment, tenant/vswitch, and yield it, its parent and a second
    compartment, tenant/other, as compartments ({id: level}), and the second's
    path: the load is resolved in the kernel as a tenant's would be."""
    mount = find_mount()
    rel = next(line.split("::", 1)[1].strip() for line in open("/proc/self/cgroup") if line.startswith("0::"))
    home = mount / rel.lstrip("/")
    with cgroup_tree("sched-event") as root:
        load, other = root / "tenant" / "vswitch", root / "tenant" / "other"
        load.mkdir(parents=True)
        other.mkdir()
        (load / "cgroup.procs").write_text(str(os.getpid()))
        try:
            level = len(load.relative_to(mount).parts)
            yield {cgroup_id(load.parent): level - 1, cgroup_id(load): level, cgroup_id(other): level}, other
        finally:
            (home / "cgroup.procs").write_text(str(os.getpid()))


def _split(other: Path) -> Callable[[int], None]:
    """A ``switch_load`` start hook: perf's worker moved into ``other``, so that its two
    tasks are in two compartments and every switch between them is charged."""
    def started(pid: int) -> None:
        for _ in range(100):  # perf forks its worker right after it starts
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError as err:
                raise SystemExit(f"cannot read perf's children to move its worker into a second compartment "
                                 f"({err}): perf exited, or this kernel lists no task children "
                                 "(CONFIG_PROC_CHILDREN)") from None
            if children:
                for child in children:
                    (other / "cgroup.procs").write_text(child)
                return
            time.sleep(0.01)
        raise SystemExit("perf bench sched pipe started no worker to move into a second compartment")
    return started


def _round(seconds: float, counters: list, floor_first: bool, resolve: bool,
           pin: str | None, split: bool = False) -> tuple[float, float, int, str, int, float, int, int, int]:
    """One round with both programs on sched_switch; returns (meter ns, floor ns, events, load,
    switches in runs, meter_tick's total ns, ticks, switches away from idle and into it charged in
    meter_switch)."""
    with _as_a_tenant() as (compartments, other):
        return _round_in(seconds, counters, floor_first, compartments if resolve else {}, pin,
                         _split(other) if split else None)


def _round_in(seconds: float, counters: list, floor_first: bool, compartments: dict,
              pin: str | None, started: Callable[[int], None] | None = None
              ) -> tuple[float, float, int, str, int, float, int, int, int]:
    floor = program.load("floor", {"METER_NR_COUNTERS": len(counters)})
    src = SchedSource(1_000_000, counters)
    src.set_compartments(KernelCompartments(compartments))
    try:
        for i, ev in enumerate(counters):
            floor[f"counter{i}".encode()].open_perf_event(ev.type, ev.config)
        if floor_first:
            floor.attach_raw_tracepoint(tp=b"sched_switch", fn_name=b"floor_switch")
        src.open()
        if not floor_first:
            floor.attach_raw_tracepoint(tp=b"sched_switch", fn_name=b"floor_switch")
        load = switch_load(seconds, pin, started)
        src.drain()
        stats = prog_stats(["meter_switch", "floor_switch", "meter_tick"])
        in_runs = getattr(src, "same_run_switches", 0)
        idle_outs = getattr(src, "idle_out_switches", 0)
        idle_ins = getattr(src, "idle_in_switches", 0)
    finally:
        floor.cleanup()
        src.close()
    # meter's cost per switch: meter_switch's run time includes meter_charge and meter_settle, its
    # tail calls (a tail-called program has no run time of its own in bpf_stats).
    (m_ns, m_cnt), (f_ns, f_cnt), (t_ns, t_cnt) = stats["meter_switch"], stats["floor_switch"], stats["meter_tick"]
    return per_run(m_ns, m_cnt), per_run(f_ns, f_cnt), m_cnt, load, in_runs, t_ns, t_cnt, idle_outs, idle_ins


def measure(seconds: float, ncounters: int, resolve: bool = True, pin: str | None = None,
            split: bool = False) -> Result:
    """Two rounds, each program first once: the first program on a tracepoint
    pays the cache misses both share (task, cgroup), so order is averaged out.
    ``split``: the load's two tasks in two compartments."""
    counters = [parse_event("sw:cpu-clock")] * ncounters
    with bpf_stats():
        a = _round(seconds / 2, counters, floor_first=False, resolve=resolve, pin=pin, split=split)
        b = _round(seconds / 2, counters, floor_first=True, resolve=resolve, pin=pin, split=split)
    meter_ns, floor_ns = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
    ratio = meter_ns / floor_ns
    what = ", ".join([f"{ncounters} counters"] + (["compartments resolved"] if resolve else [])
                     + (["two compartments"] if split else [])
                     + ([f"pinned to CPU {pin}"] if pin else [])
                     + ([] if sched_mod.task_storage() else ["no unseen-slice check"]))
    tick_ns = per_run(a[5] + b[5], a[6] + b[6])
    return Result(
        f"sched_switch cost ({what})", meter_ns, "ns/event", floor_ns, "floor program, same events",
        ratio, "<= 1.3x floor and <= 150 ns", ratio <= 1.3 and meter_ns <= 150,
        {"events": a[2] + b[2], "load": a[3], "meter_first": a[:2], "floor_first": b[:2],
         "in_runs": round((a[4] + b[4]) / max(a[2] + b[2], 1), 4),
         "idle_outs": round((a[7] + b[7]) / max(a[2] + b[2], 1), 4),
         "idle_ins": round((a[8] + b[8]) / max(a[2] + b[2], 1), 4),
         "tick_ns": round(tick_ns, 1), "ticks": a[6] + b[6], "what": what},
    )


def tick_result(switch: Result) -> Result:
    """meter_tick (the window tick: its charge and, at 1 ms windows, nearly always the
    window's roll-over, every slot flushed to the ring) against meter_switch, same rounds.
    No tick seen (a tickless run): no figure, and not met."""
    tick_ns = switch.detail["tick_ns"]  # NaN with no tick: then the ratio is too, and not met
    ratio = tick_ns / switch.value
    return Result(f"window tick cost, roll-over included ({switch.detail['what']})", tick_ns, "ns", switch.value,
                  "meter_switch per switch, same rounds", ratio, "< 3x a switch", ratio < 3,
                  {"ticks": switch.detail["ticks"]})


def main() -> list[Result]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--counters", type=int, default=None, help="software counters read per event (default: 0 and 2)")
    ap.add_argument("--pin", default=None, metavar="CPUS",
                    help="run the switch load under taskset -c CPUS (e.g. 0: every switch is between its two tasks, one cgroup)")
    ap.add_argument("--unseen-check", choices=("on", "off"), default="on",
                    help="off: the programs without the unseen-slice check (task storage), to measure what it costs")
    ap.add_argument("--two-compartments", action="store_true",
                    help="only: 0 counters, the load's two tasks in two compartments, pinned (--pin, default 0): "
                         "every switch between them is charged (meter_charge's path)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.unseen_check == "off":
        sched_mod.task_storage = lambda release=None: False  # as on a kernel before 5.11
    if args.two_compartments:
        return [measure(args.seconds, 0, pin=args.pin or "0", split=True)]
    sets = [args.counters] if args.counters is not None else [0, 2]
    # With 0 counters also without compartments: the cost of resolving them in the kernel.
    out = ([measure(args.seconds, n, pin=args.pin) for n in sets]
           + ([measure(args.seconds, 0, resolve=False, pin=args.pin)] if 0 in sets else []))
    out += [tick_result(r) for r in out[:len(sets)]]
    if args.pin is None and 0 in sets:
        # Both tasks on one CPU: every switch is inside one cgroup (a run).
        out.append(measure(args.seconds, 0, pin="0"))
    return out


if __name__ == "__main__":
    report(main())
