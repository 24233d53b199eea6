"""Source: per-schedule CPU time and perf counters per (cgroup, window).

Owns ``bpf/sched.bpf.c``: loads it, opens the configured perf counters
into its per-CPU perf arrays, attaches the window tick, and drains closed
windows in bulk (the ring is mapped into this process: numpy reads and
zeroes it in place, with no syscall and no Python object per entry).

Usage lives in a fixed ring: one row per cgroup (or pseudo-cgroup) charged,
``ring_windows`` cells per row, so memory is ``max_rows x ring_windows``
cells whatever the load, and no charge is ever dropped: one whose cell is
not open goes to its row's late total, which the next drain hands on.

Closing protocol (no increment is ever lost to a window still open):
each drain publishes a *watermark* (the newest window it will take next
time, ``now - lag``); the kernel side stops writing windows at or below
it and adds such charges to the row's late total. The next drain, at least
one drain interval later, takes exactly the windows at or below the
watermark it published before, which no program can touch any more, zeroes
their cells and tells the kernel (``CTL_TAKEN``) that those cells are open
again, for the windows ``ring_windows`` later.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import mmap
import os
import time
from typing import Any, Literal

import numpy as np

from .. import program, records
from ..bpfabi import (
    COUNTS_DTYPE,
    CTL_FIRST,
    CTL_GEN,
    CTL_LEVELS,
    CTL_NET_TAKEN,
    CTL_NEXT_ROW,
    CTL_NUDGE,
    CTL_OTHER,
    CTL_TAKEN,
    CTL_WATERMARK,
    MAX_COMPARTMENTS,
    MAX_COUNTERS,
    MAX_CPUS,
    MAX_LEVEL,
    NR_CONTROLS,
    ROOT_BIT,
    STATS,
    UNATTRIBUTED_CGID,
    UNATTRIBUTED_ROW,
    USAGE_DTYPE,
    check_table,
    cpu_state_dtype,
)
from ..errors import BPFError, ConfigError, PerfEventError
from ..perf import PerfEvent
from .base import KernelCompartments, packet_time_problem

__all__ = ["SchedDrain", "SchedSource"]

log = logging.getLogger("meter")

#: Kernel fields the program reads, as (-D setting, BTF path). The first
#: makes CPU time the kernel's own charge; the rest find steal time.
KERNEL_FIELDS = (
    ("METER_TASK_SUM_OFF", "task_struct.se.sum_exec_runtime"),
    ("METER_TASK_PREV_SUM_OFF", "task_struct.se.prev_sum_exec_runtime"),
    ("METER_TASK_POLICY_OFF", "task_struct.policy"),
    ("METER_TASK_CGROUPS_OFF", "task_struct.cgroups"),
    ("METER_TASK_CFS_RQ_OFF", "task_struct.se.cfs_rq"),
    ("METER_CFS_RQ_RQ_OFF", "cfs_rq.rq"),
    ("METER_RQ_CLOCK_OFF", "rq.clock"),
    ("METER_RQ_CLOCK_TASK_OFF", "rq.clock_task"),
    ("METER_RQ_CPU_OFF", "rq.cpu"),
    ("METER_RQ_IDLE_OFF", "rq.idle"),
)


def task_storage(release: str | None = None) -> bool:
    """Whether sched_switch programs can keep per-task storage (Linux 5.11+:
    task storage and bpf_get_current_task_btf), for the time of unseen slices."""
    import re

    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    if m is None:
        return False
    return (int(m.group(1)), int(m.group(2))) >= (5, 11)


def kernel_field_defines(btf_path: str | None = None) -> tuple[dict[str, int], str | None]:
    """``-D`` offsets of the kernel fields found in the running kernel's BTF.

    Returns (defines, reason): without ``task_struct.se.sum_exec_runtime``
    the defines are empty and ``reason`` says why (CPU time then comes from
    the clock alone, flagged in the records' ``cpu_source``). Besides the
    ``*_OFF`` offsets, ``METER_SKB_TSTAMP_TYPE`` says the tc programs may
    read ``__sk_buff.tstamp_type`` (a UAPI field, Linux 5.18+).
    """
    from ..btf import BTFError, kernel_btf

    try:
        btf = kernel_btf(btf_path)
    except BTFError as err:
        return {}, str(err)
    out: dict[str, int] = {}
    for define, path in KERNEL_FIELDS:
        try:
            out[define] = btf.offset(path)
        except BTFError as err:
            if define == "METER_TASK_SUM_OFF":
                return {}, str(err)
    # The hypervisor's own steal counter (KVM guests): read at every tick,
    # so a tick after the VM was paused does not charge the pause to a task.
    try:
        out |= {
            "METER_PCPU_RUNQUEUES_OFF": btf.percpu_offset("runqueues"),
            "METER_PCPU_CPU_NUMBER_OFF": btf.percpu_offset("cpu_number"),
            "METER_PCPU_STEAL_TIME_OFF": btf.percpu_offset("steal_time"),
            "METER_KVM_STEAL_OFF": btf.offset("kvm_steal_time.steal"),
        }
    except BTFError:
        pass  # not a KVM guest kernel: steal from the run queue's clocks at switches
    # Egress packets TCP sent are dated by the time it stamped on them (bpf/net.bpf.c,
    # packet_time()): the tc programs may read __sk_buff.tstamp_type from Linux 5.18.
    try:
        btf.offset("__sk_buff.tstamp_type")
        out["METER_SKB_TSTAMP_TYPE"] = 1
    except BTFError:
        pass  # older kernel: every packet outside a softirq span reads the clock
    return out, None


_NEVER = 2**63 - 1

#: Ring windows beyond the longest charge split, by default (the drain's own lag).
RING_SPARE = 32
#: The most rows a ring may have (4,096 compartments, as many given-away
#: rows, the ports and the pseudo-rows).
MAX_ROWS_LIMIT = 2 * MAX_COMPARTMENTS + 1024 + 64

#: The longest period of the window tick (sched.bpf.c charges any span).
TICK_MAX_NS = 1_000_000_000
PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CPU_CLOCK = 0


def _none(dtype: Any, *shape: int) -> Any:
    return dataclasses.field(default_factory=lambda: np.zeros((0, *shape), dtype))


#: No cgroup met for the first time.
_NONE_MET = np.zeros(0, np.uint64)
_NONE_MET.flags.writeable = False


#: How long _nudge sleeps to switch away from the CPU it runs on when it may
#: run on no other: any sleep blocks, and so switches.
_NUDGE_SLEEP_S = 0.0002
#: How long a take waits after a publication of the watermark, for the programs that
#: read the one before (SchedSource.drain): a program's run is microseconds.
_SETTLE_NS = 1_000_000


@functools.cache
def _sched_getcpu() -> Any:
    import ctypes

    try:
        return ctypes.CDLL(None).sched_getcpu
    except (AttributeError, OSError):
        return None


def _current_cpu() -> int:
    """The CPU this thread runs on now (the C library's sched_getcpu()), or -1."""
    getcpu = _sched_getcpu()
    return int(getcpu()) if getcpu is not None else -1


@dataclasses.dataclass
class SchedDrain:
    """One drain: parallel arrays, one entry per (cgroup, window).

    ``counts`` has one column per configured counter, in the order given to
    :class:`SchedSource`. ``late_*``: per cgroup, what arrived since the
    last drain for windows whose cells were not open (closed already, or a
    stalled drain's ring full); billed in the drain's newest window, as late.
    """

    cgid: np.ndarray
    window: np.ndarray
    ns: np.ndarray
    counts: np.ndarray
    late_cgid: np.ndarray = _none(np.uint64)
    late_ns: np.ndarray = _none(np.int64)
    late_counts: np.ndarray = _none(np.int64, 0)
    #: Per cgroup, the kernel/clock differences no per-CPU entry could hold
    #: since the last drain (> 0: owed to it; < 0: it owes), settled in the records.
    spill_cgid: np.ndarray = _none(np.uint64)
    spill_ns: np.ndarray = _none(np.int64)
    #: The cgroup ids this drain met for the first time (None: not known, so any of them).
    met_cgid: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.cgid)


class SchedSource:
    """The sched_switch + tick programs and their drain.

    ``counters`` are the perf events to read per schedule (at most 4).
    ``max_span`` is the most windows one charge may be split over; it must
    cover the time between drains (idle CPUs are only nudged then).
    ``max_rows`` is how many cgroups (and pseudo-cgroups) the ring holds;
    beyond that, usage is kept in the ``unattributed`` row. The ring holds
    ``ring_windows`` windows (default: ``max_span`` and RING_SPARE more):
    what charges may bring between two drains, and what a late drain adds.
    """

    program_name = "sched"

    def __init__(
        self,
        window_ns: int,
        counters: list[PerfEvent] | None = None,
        *,
        max_rows: int = 256,
        max_span: int = 512,
        ring_windows: int | None = None,
        net: bool = False,
        max_ports: int = 0,
        packet_time: str = "clock",
    ) -> None:
        counters = list(counters or [])
        if problem := packet_time_problem(packet_time):
            raise ConfigError(f"packet_time {problem}", setting="packet_time")
        if len(counters) > MAX_COUNTERS:
            raise PerfEventError(f"at most {MAX_COUNTERS} counters can be read per schedule, not {len(counters)}")
        self.window_ns = int(window_ns)
        self.counters = counters
        if not 2 <= max_rows <= MAX_ROWS_LIMIT:
            raise BPFError(f"the CPU ring holds 2 to {MAX_ROWS_LIMIT} rows, not {max_rows}", program="sched")
        self.max_rows = int(max_rows)
        self.max_span = int(max_span)
        self.ring_windows = int(ring_windows) if ring_windows is not None else self.max_span + RING_SPARE
        if self.ring_windows <= self.max_span:
            raise BPFError(f"the CPU ring must hold more windows than one charge spans ({self.max_span}), "
                           f"not {self.ring_windows}", program="sched")
        #: With net, net.bpf.c is compiled in too (shared per-CPU state and
        #: the net ring for max_ports ports) and NET softirq time is charged
        #: to ports' pseudo-cgroups.
        self.net = bool(net)
        self.max_ports = max_ports
        #: How a packet no cheaper time dates is dated: "clock" (a clock read)
        #: or "charge" (the CPU's last charge; docs/architecture.md, "When a
        #: packet is counted").
        self.packet_time = packet_time
        self.bpf: Any = None
        #: True when cpu time is the kernel's own charge (se.sum_exec_runtime
        #: from BTF offsets); False: the clock between switches (fallback).
        self.kernel_charge = False
        self.same_run = False
        #: Strided views of the CPU states' buffer, one per field a take or close reads.
        self._cpu_field: dict[str, memoryview] = {}
        self._nudge_gen = 0
        #: Why kernel_charge is False (None when it is True, or not open).
        self.kernel_charge_reason: str | None = None
        self.ncpu = 0
        self._cpus: list[int] = []
        self._cpu_dtype = np.dtype(np.int64)  # struct meter_cpu's, narrowed: set at open
        #: Reads every CPU's struct meter_cpu for _cpu_states (made at the first read).
        self._cpu_reader: program.EntryReader | None = None
        self.nudges = 0
        self._published = 0
        self._published_ns = 0
        self._first_window = 0
        #: Every window up to this one has been taken by a drain.
        self.closed_window = 0
        self._taken = 0
        self._ring: np.ndarray | None = None
        self._ring_counts: np.ndarray | None = None
        self._late: np.ndarray | None = None
        self._late_seen = np.zeros(0, USAGE_DTYPE)
        self._spill: np.ndarray | None = None
        self._spill_seen = np.zeros(0, np.int64)
        self._maps: list[mmap.mmap] = []
        #: The control array (enum meter_control), mapped like the ring.
        self._ctl: np.ndarray | None = None
        self._row_cgid = np.zeros(0, np.uint64)
        self._row_known = np.zeros(0, bool)
        #: Rows below this one all have their cgroup known (_learn_rows).
        self._rows_learned = 0
        #: Rows taken by the kernel when publish() last looked for new ones.
        self._rows_looked = 0
        self._compartments = KernelCompartments()
        self._gen = 0

    # -- lifecycle -------------------------------------------------------------

    def defines(self) -> tuple[list[str], dict[str, Any]]:
        """The program files and ``-D`` settings this source compiles (kernel fields from BTF)."""
        defines: dict[str, Any] = {
            "METER_WINDOW_NS": f"{self.window_ns}ULL",
            "METER_NR_COUNTERS": len(self.counters),
            "METER_MAX_ROWS": self.max_rows,
            "METER_RING": self.ring_windows,
            "METER_MAX_SPAN": self.max_span,
        }
        fields, self.kernel_charge_reason = kernel_field_defines()
        defines |= fields
        self.kernel_charge = "METER_TASK_SUM_OFF" in fields
        # Switches inside one css_set join a run (bpf/sched.bpf.c, same_run()).
        self.same_run = self.kernel_charge and "METER_TASK_CGROUPS_OFF" in fields
        if self.kernel_charge and task_storage():
            defines["METER_TASK_STORAGE"] = 1
        names = [self.program_name]
        if self.net:
            defines |= {"METER_NET": 1, "METER_MAX_PORTS": max(1, self.max_ports)}
            if self.packet_time == "charge":
                defines["METER_PACKET_TIME_CHARGE"] = 1
            names.append("net")
        return names, defines

    def listing(self) -> str:
        """The program as it would be compiled: ``-D`` settings, then the text."""
        return program.listing(*self.defines())

    def open(self) -> None:
        """Load, open counters, attach, and start every CPU's clock."""
        from bcc.utils import get_online_cpus

        self.bpf = program.load(*self.defines())
        try:
            self._map_ring()
            self._push_compartments()
            for i, ev in enumerate(self.counters):
                try:
                    self.bpf[f"counter{i}".encode()].open_perf_event(ev.type, ev.config)
                except Exception as err:  # bcc raises bare Exception
                    raise PerfEventError(f"cannot open perf event {ev.spec} on every CPU: {err}", event=ev.spec) from err
            self._cpus = get_online_cpus()
            self.ncpu = len(self._cpus)
            self._cpu_dtype = cpu_state_dtype(self.bpf[b"cpu_state"].sLeaf)
            if max(self._cpus) >= MAX_CPUS:
                raise BPFError(f"this host has CPU {max(self._cpus)}; meter meters CPUs 0 to {MAX_CPUS - 1} "
                               "(METER_MAX_CPUS in bpf/meter.h)", program="sched")
            # Nothing before every CPU's clock runs is a whole window: discard it.
            self._control(CTL_FIRST, _NEVER)
            self._publish(_NEVER)
            if self.same_run:
                self._fill_slot(b"charge_call", b"meter_charge")
            hooks = [(b"sched_switch", b"meter_switch")]
            if self.net:
                # Exit first: an entry without its exit would hold the CPU's charges.
                hooks += [(b"softirq_exit", b"meter_softirq_exit"), (b"softirq_entry", b"meter_softirq_entry")]
            for tp, fn in hooks:
                try:
                    self.bpf.attach_raw_tracepoint(tp=tp, fn_name=fn)
                except Exception as err:  # bcc raises bare Exception (the verifier log went to stderr)
                    raise BPFError(f"the kernel rejected {fn.decode()} on {tp.decode()}: {err}", program="sched") from err
            if self.kernel_charge:
                self._attach_settle()
            self.bpf.attach_perf_event(
                ev_type=PERF_TYPE_SOFTWARE,
                ev_config=PERF_COUNT_SW_CPU_CLOCK,
                fn_name=b"meter_tick",
                # At most 1 s between ticks: a long window is closed by the
                # tick after its end, and perf periods above 2^31 ns misbehave.
                sample_period=min(self.window_ns, TICK_MAX_NS),
                cpu=-1,
            )
            self._nudge(self._cpus)
            self._start_windows()
        except Exception:
            self.close()
            raise

    def set_compartments(self, compartments: KernelCompartments) -> None:
        """Have the kernel charge compartments, not leaf cgroups.

        Usage in any cgroup below a listed one is then charged to the deepest
        listed ancestor when it happens (a child cgroup removed before the
        next drain is still billed to its compartment). Takes effect at
        open, or at once when open; compartments past the kernel's limits
        (MAX_COMPARTMENTS, level MAX_LEVEL) are left to user space, and then
        every task below no listed compartment is charged by its own id.
        """
        given = compartments.levels
        wanted = {cgid: lvl for cgid, lvl in given.items() if lvl < MAX_LEVEL}
        if len(wanted) < len(given):
            log.warning("meter: %d compartments are deeper than cgroup level %d: their child cgroups are "
                        "resolved in user space (usage in children removed before a drain counts as host)",
                        len(given) - len(wanted), MAX_LEVEL - 1)
        roots = {cgid: ld for cgid, ld in compartments.roots.items() if ld[0] < MAX_LEVEL and cgid not in wanted}
        room = MAX_COMPARTMENTS - len(roots)
        if len(wanted) > room:
            log.warning("meter: %d compartments, the kernel resolves %d: the rest are resolved in user space",
                        len(wanted), room)
            wanted = dict(sorted(wanted.items(), key=lambda kv: -kv[1])[:room])
        complete = len(wanted) == len(given) and len(roots) == len(compartments.roots)
        other = compartments.other if complete else 0
        self._compartments = dataclasses.replace(compartments, levels=wanted, roots=roots, other=other)
        if self.bpf is not None:
            self._push_compartments()

    def _push_compartments(self) -> None:
        kc = self._compartments
        table = self.bpf[b"compartments"]
        want = {cgid: 1 for cgid in kc.levels}
        want.update({cgid: ROOT_BIT + lvl + depth for cgid, (lvl, depth) in kc.roots.items()})
        have = {int(k.value): int(v.value) for k, v in table.items()}
        for cgid in set(have) - set(want):
            del table[table.Key(cgid)]
        for cgid, value in want.items():
            if have.get(cgid) != value:
                table[table.Key(cgid)] = table.Leaf(value)
        levels = 0
        for lvl in [*kc.levels.values(), *(lvl for lvl, _depth in kc.roots.values())]:
            levels |= 1 << lvl
        self._control(CTL_LEVELS, levels)
        self._control(CTL_OTHER, kc.other)
        # Generation 0 tells the kernel nothing is to be resolved (one lookup per charge).
        self._gen += 1
        self._control(CTL_GEN, self._gen if levels or kc.other else 0)

    def program_fds(self) -> dict[str, list[int]]:
        """The programs bcc loaded for this source (the tc copies are the packet source's)."""
        if self.bpf is None:
            return {}
        return {name.decode(): [fn.fd] for name, fn in self.bpf.funcs.items()}

    def _map_ring(self) -> None:
        """Map the ring and the late totals into this process; give the
        ``unattributed`` pseudo-cgroup its row before anything is charged."""
        rows, nw = self.max_rows, self.ring_windows
        check_table(self.bpf[b"late"], np.dtype(np.uint32), USAGE_DTYPE, "late")

        def view(name: bytes, dtype: np.dtype, n: int) -> np.ndarray:
            m, array = program.map_array(self.bpf, name, dtype, n)
            self._maps.append(m)
            return array

        check_table(self.bpf[b"control"], np.dtype(np.uint32), np.dtype(np.uint64), "control")
        self._ctl = view(b"control", np.dtype(np.uint64), NR_CONTROLS)
        self._ring = view(b"ring", np.dtype(np.uint64), rows * nw).reshape(rows, nw)
        if self.counters:
            check_table(self.bpf[b"ring_counts"], np.dtype(np.uint32), COUNTS_DTYPE, "ring_counts")
            self._ring_counts = view(b"ring_counts", COUNTS_DTYPE, rows * nw).reshape(rows, nw)
        self._late = view(b"late", USAGE_DTYPE, rows)
        self._late_seen = np.zeros(rows, USAGE_DTYPE)
        self._spill = view(b"spill", np.dtype(np.int64), rows)
        self._spill_seen = np.zeros(rows, np.int64)
        self._row_cgid = np.zeros(rows, np.uint64)
        self._row_known = np.zeros(rows, bool)
        table = self.bpf[b"rows"]
        table[table.Key(UNATTRIBUTED_CGID)] = table.Leaf(UNATTRIBUTED_ROW)
        self._row_cgid[UNATTRIBUTED_ROW] = UNATTRIBUTED_CGID
        self._row_known[UNATTRIBUTED_ROW] = True
        self._control(CTL_NEXT_ROW, UNATTRIBUTED_ROW + 1)

    def ring_cells(self) -> np.ndarray:
        """The ring's ns cells as a (max_rows, ring_windows) view of kernel memory
        (for benchmarks and tests; writing to it changes what will be billed)."""
        if self._ring is None:
            raise BPFError("the sched source is not open")
        return self._ring

    def rows_used(self) -> int:
        """Ring rows taken so far (of :attr:`max_rows`)."""
        if self.bpf is None:
            return 0
        return min(self._control_get(CTL_NEXT_ROW), self.max_rows)

    def _learn_rows(self, rows: np.ndarray) -> np.ndarray:
        """Know the cgroup of each of ``rows`` (read after their cells: the
        kernel names a row before it writes the row's first cell); returns the
        cgroup ids of the rows learned now."""
        met = _NONE_MET
        if not np.all(self._row_known[rows]):
            keys = np.zeros(self.max_rows, np.uint64)
            vals = np.zeros(self.max_rows, np.uint32)
            got = program.lookup_batch(program.map_fd(self.bpf, b"rows"), keys, vals)
            met = keys[:got][~self._row_known[vals[:got]]]
            self._row_cgid[vals[:got]] = keys[:got]
            self._row_known[vals[:got]] = True
        unknown = np.flatnonzero(~self._row_known)
        self._rows_learned = int(unknown[0]) if len(unknown) else self.max_rows
        return met

    def _attach_settle(self) -> None:
        """meter_settle into the switch charge's tail-call slot: it settles, in windows not
        closed yet, what the switches found owed either way (see bpf/sched.bpf.c,
        meter_settle()), and runs only when there is something to settle (about once
        per window on a CPU that owes or is owed), not at every switch."""
        self._fill_slot(b"settle_call", b"meter_settle")

    def _fill_slot(self, table: bytes, fn: bytes) -> None:
        """Load program ``fn`` into slot 0 of the tail-call table ``table``."""
        import ctypes

        from bcc import BPF

        try:
            fd = self.bpf.load_func(fn, BPF.RAW_TRACEPOINT).fd
            self.bpf[table][ctypes.c_int(0)] = ctypes.c_int(fd)
        except Exception as err:  # bcc raises bare Exception
            raise BPFError(f"the kernel rejected {fn.decode()}: {err}", program="sched") from err

    def close(self) -> None:
        """Detach and unload everything this source attached."""
        self._ring = self._ring_counts = self._late = self._spill = self._ctl = self._cpu_reader = None
        program.unmap(self._maps)
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            finally:
                self.bpf = None

    @property
    def first_window(self) -> int:
        """The first window every CPU covers completely."""
        return self._first_window

    # -- closing windows ---------------------------------------------------------

    def _start_windows(self) -> None:
        """Every CPU's clock runs now: the next window is the first whole one.

        Until the kernel is told so, it discards every window as start-up. A
        window is stored once a CPU's clock passes its end, so if this thread
        was held up past the end of the window it chose (a busy or paused
        host), that window may have gone: choose again (the windows between
        are start-up; the build skips them as such).
        """
        while True:
            self._first_window = time.monotonic_ns() // self.window_ns + 1
            self._publish(self._first_window - 1)
            self._set_taken(self._first_window - 1)
            self._control(CTL_NET_TAKEN, self._first_window - 1)
            self._control(CTL_FIRST, self._first_window)
            if time.monotonic_ns() < (self._first_window + 1) * self.window_ns:
                return

    def _control(self, index: int, value: int) -> None:
        """Write a control value, in place: programs read it at their next run
        (an x86 store is seen after the stores before it, such as a take's
        zeroed cells before CTL_TAKEN opens them)."""
        if self._ctl is None:
            raise BPFError("the sched source is not open")
        self._ctl[index] = value

    def _control_get(self, index: int) -> int:
        if self._ctl is None:
            raise BPFError("the sched source is not open")
        return int(self._ctl[index])

    def _set_taken(self, window: int) -> None:
        self._taken = window
        self._control(CTL_TAKEN, window)

    def _publish(self, watermark: int) -> None:
        self._control(CTL_WATERMARK, watermark)
        self._published = watermark
        self._published_ns = time.monotonic_ns()

    def _publish_closed(self, now_win: int) -> None:
        """Publish the newest window every CPU has charged past (nudging stale CPUs), never back."""
        self._publish(max(self._closed_window(now_win), self._published))

    def publish(self) -> np.ndarray:
        """Close the CPUs' windows between takes: nudge the CPUs more than a
        window behind, and publish the newest window every CPU has charged
        past; the next :meth:`drain` takes up to it. Returns the cgroup ids
        of the rows the kernel took since the last take or close (to be
        named now, while their cgroups exist)."""
        if self.bpf is None:
            raise BPFError("the sched source is not open")
        self._publish_closed(time.monotonic_ns() // self.window_ns)
        # Rows taken since the last look: one lookup of the rows map each time some are
        # (a row the kernel counted but has not named yet is named by the take that
        # meets its cells: _learn_rows).
        n = self.rows_used()
        if n <= self._rows_looked:
            return _NONE_MET
        rows, self._rows_looked = np.arange(self._rows_looked, n), n
        return self._learn_rows(rows)

    def _read_cpus(self) -> np.ndarray:
        """Every possible CPU's struct meter_cpu, read by one lookup into the
        reader's buffer (bytes; overwritten at the next read)."""
        if self._cpu_reader is None:
            from bcc.utils import get_possible_cpus

            # A per-CPU value is a slot per possible CPU, each rounded up to 8 bytes.
            size = self._cpu_dtype.itemsize
            if size % 8:
                raise BPFError(f"struct meter_cpu is {size} bytes, not a multiple of 8", program="sched")
            raw = np.zeros(len(get_possible_cpus()) * size, np.uint8)
            self._cpu_reader = program.EntryReader(program.map_fd(self.bpf, b"cpu_state"), 0, raw)
            # The fields a take or close reads, each a strided view of the buffer (one per
            # CPU): their values come out as Python ints with no numpy call.
            words: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}
            for name in ("window", "net_window", "net_ndirty"):
                sub, offset = self._cpu_dtype.fields[name][:2]  # type: ignore[index]
                if sub.kind != "u" or sub.itemsize not in words or offset % sub.itemsize:
                    raise BPFError(f"struct meter_cpu's {name} is not an aligned unsigned integer", program="sched")
                self._cpu_field[name] = raw.data.cast(words[sub.itemsize])[
                    offset // sub.itemsize::size // sub.itemsize]
        return self._cpu_reader.read()

    def _cpu_states(self) -> np.ndarray:
        """Every online CPU's state as the last read left it, the fields a drain
        reads (``bpfabi.cpu_state_dtype``; a view of the reader's buffer)."""
        if self._cpu_reader is None:
            return np.zeros(0, self._cpu_dtype)
        states = self._cpu_reader.values.view(self._cpu_dtype)
        return states if len(states) == len(self._cpus) else states[self._cpus]

    def _cpu_windows(self) -> list[int]:
        """Each online CPU's oldest open window: its CPU slots' or its packet slots'.
        Read at every take and close: Python ints from the buffer, no numpy call
        (each costs tens of microseconds after the loop's sleep)."""
        self._read_cpus()
        field = self._cpu_field
        windows = field["window"].tolist()
        dirty = field["net_ndirty"].tolist()
        if any(dirty):
            windows = [min(w, n) if d else w for w, n, d in zip(windows, field["net_window"].tolist(), dirty)]
        return windows if len(windows) == len(self._cpus) else [windows[c] for c in self._cpus]

    def _summed(self, field: str) -> int:
        return int(self._cpu_states()[field].sum())

    @property
    def same_run_switches(self) -> int:
        """Switches that joined a run of one css_set and read no clock
        (bpf/sched.bpf.c, same_run()), at the last take."""
        return self._summed("runs")

    @property
    def idle_out_switches(self) -> int:
        """Switches away from idle charged in the switch program itself, at the last take."""
        return self._summed("idle_outs")

    @property
    def idle_in_switches(self) -> int:
        """Switches into idle charged in the switch program itself, at the last take."""
        return self._summed("idle_ins")

    @property
    def pending_adjustment_ns(self) -> int:
        """Σ |ns| of the CPUs' adjustments waiting to be settled, at the last take."""
        return int(np.abs(self._cpu_states()["adj_ns"]).sum())

    def _pending_adjustments(self) -> tuple[np.ndarray, np.ndarray]:
        """(cgroup ids, ns) of every CPU's adjustments not settled yet (see
        struct meter_cpu): at stop they are settled in the records instead."""
        self._read_cpus()
        st = self._cpu_states()
        cgid, ns = st["adj_cgid"].ravel(), st["adj_ns"].ravel().astype(np.int64)
        held = ns != 0
        return cgid[held].astype(np.uint64), ns[held]

    def _nudge(self, cpus: list[int]) -> None:
        """Make each CPU in ``cpus`` switch tasks, so it charges its pending time.

        The cpu-clock tick does not fire on an idle CPU here (NOHZ idle), so
        an idle CPU would otherwise hold its idle time until it next wakes.
        Moving this thread onto the CPU switches it from whatever ran there
        (the idle task, usually), which charges that time to its owner. The
        kernel is told first (``CTL_NUDGE``), so that the CPU's first switch
        after it charges even when both tasks are of one cgroup (a thread of
        this process that ran there): it joins no run (bpf/sched.bpf.c,
        same_run()).

        The CPU this thread runs on is nudged by leaving it: moving onto it
        would switch nothing, and this thread may have come onto it by a
        switch that joined a run, so that the CPU has charged nothing since
        (docs/architecture.md, "Runs of one cgroup").
        """
        if not cpus:
            return
        self._nudge_gen += 1
        self._control(CTL_NUDGE, self._nudge_gen)
        original = os.sched_getaffinity(0)
        here = _current_cpu()
        hops = [c for c in cpus if c != here]
        if here in cpus and not hops:
            hops = [c for c in sorted(original) if c != here][:1]
        left = False
        try:
            for cpu in hops:
                try:
                    os.sched_setaffinity(0, {cpu})
                except OSError:
                    continue  # not allowed on this CPU (cpuset): the watermark waits for it
                left = True
                if cpu in cpus:
                    self.nudges += 1
        finally:
            os.sched_setaffinity(0, original)
        if here < 0 or (here in cpus and not left):
            # No other CPU to move to (or which CPU this is is unknown):
            # sleeping switches away from this one too.
            time.sleep(_NUDGE_SLEEP_S)
        if here in cpus:
            self.nudges += 1

    def _closed_window(self, now_win: int, *, lag: int = 1) -> int:
        """Newest window that every CPU has charged past (nudging stale CPUs).

        A CPU's current window still sits in its per-CPU slots, so the
        closed window is one before the oldest current window. CPUs more
        than ``lag`` windows behind ``now_win`` are nudged: at stop (lag 0)
        every CPU is, so an idle CPU's last packets and idle time, still in
        its slots in the window that just ended, are stored and taken.
        """
        windows = self._cpu_windows()
        stale = [c for c, w in zip(self._cpus, windows) if w < now_win - lag]
        if stale:
            self._nudge(stale)
            windows = self._cpu_windows()
        return min(windows) - 1

    # -- draining ----------------------------------------------------------------

    def drain(self, *, final: bool = False) -> SchedDrain:
        """Take every window at or below the previously published watermark.

        Then publish a new watermark: the newest window every CPU has
        charged past. With ``final`` (at stop), close and take everything
        up to the last complete window at once.
        """
        if self.bpf is None:
            raise BPFError("the sched source is not open")
        now_win = time.monotonic_ns() // self.window_ns
        if final:
            while (wait := (now_win + 1) * self.window_ns - time.monotonic_ns()) > 0:
                time.sleep(wait / 1e9)  # let the current window end
            self._publish(max(self._closed_window(now_win + 1, lag=0), self._published))
        # Programs that read the watermark before it moved finish (a run is microseconds)
        # before their windows are taken: a take right after a publication waits for them.
        if (wait := self._published_ns + _SETTLE_NS - time.monotonic_ns()) > 0:
            time.sleep(wait / 1e9)
        closable = self._published
        self.closed_window = max(self.closed_window, closable)
        out = self._take(closable)
        if final and self.kernel_charge:
            # What no later switch on its CPU will settle now: the records settle it.
            cgid, ns = self._pending_adjustments()
            out.spill_cgid = np.concatenate([out.spill_cgid, cgid])
            out.spill_ns = np.concatenate([out.spill_ns, ns])
        if not final:
            self._publish_closed(now_win)
        return out

    def _take(self, closable: int) -> SchedDrain:
        """Read the cells of windows (taken, closable] and the late totals; zero
        those cells and open them for the windows one ring later.

        Run four times a second after a sleep, so each numpy call costs
        tens of microseconds here whatever its size: the cells are read in
        place (no program writes a closed window's cells), and unchanged late
        and spill totals cost one comparison each."""
        assert self._ring is not None and self._late is not None and self._spill is not None
        ncount = len(self.counters)
        n = self.rows_used()
        lo, hi = self._taken + 1, min(closable, self._taken + self.ring_windows)
        a, b = lo % self.ring_windows, hi % self.ring_windows
        # The windows' cells are one run of the ring, or two when it wraps.
        runs = [] if hi < lo else [slice(a, b + 1)] if a <= b else [slice(a, None), slice(0, b + 1)]

        def cells_of(ring: np.ndarray) -> np.ndarray:
            if len(runs) == 1:
                return ring[:n, runs[0]]
            return np.concatenate([ring[:n, run] for run in runs], axis=1) if runs else ring[:n, :0]

        cells = cells_of(self._ring)
        # Window by window (each window's rows in order): successive takes are later
        # windows, so a batch's entries come ascending by (window, row), the order its
        # records are grouped in (meter.build), and grouping them needs no sort.
        if self._ring_counts is None:
            j, r = records.nonzero_cells(cells.T)
            counts = np.zeros((len(r), ncount), np.int64)
        else:
            all_counts = cells_of(self._ring_counts)["count"][:, :, :ncount]
            j, r = records.nonzero_cells(((cells != 0) | np.any(all_counts != 0, axis=2)).T)
            counts = all_counts[r, j].astype(np.int64)
        ns = cells[r, j].astype(np.int64)
        # Zeroed before the kernel is told: then the cells are open for windows one ring later.
        for run in runs:
            self._ring[:n, run] = 0
            if self._ring_counts is not None:
                self._ring_counts[:n, run] = 0
        if closable > self._taken:
            self._set_taken(closable)
        late = self._late[:n].copy()
        if late.tobytes() == self._late_seen[:n].tobytes():
            lr, d_ns, d_counts = np.zeros(0, np.intp), np.zeros(0, np.int64), np.zeros((0, ncount), np.int64)
        else:
            d_ns = late["ns"].astype(np.int64) - self._late_seen["ns"][:n].astype(np.int64)
            d_counts = (late["count"][:, :ncount].astype(np.int64)
                        - self._late_seen["count"][:n, :ncount].astype(np.int64))
            self._late_seen[:n] = late
            lr = np.flatnonzero((d_ns != 0) | np.any(d_counts != 0, axis=1))
            d_ns, d_counts = d_ns[lr], d_counts[lr]
        spill = self._spill[:n].copy()
        if spill.tobytes() == self._spill_seen[:n].tobytes():
            sr, d_spill = np.zeros(0, np.intp), np.zeros(0, np.int64)
        else:
            d_spill = spill - self._spill_seen[:n]
            self._spill_seen[:n] = spill
            sr = np.flatnonzero(d_spill)
            d_spill = d_spill[sr]
        # A row past those known has its cgroup looked up (lr and sr are sorted; r is by window).
        top = max(int(r.max()) if len(r) else -1, int(lr[-1]) if len(lr) else -1, int(sr[-1]) if len(sr) else -1)
        met = self._learn_rows(np.concatenate([r, lr, sr])) if top >= self._rows_learned else _NONE_MET
        return SchedDrain(
            cgid=self._row_cgid[r], window=j + lo, ns=ns, counts=counts,
            late_cgid=self._row_cgid[lr], late_ns=d_ns, late_counts=d_counts,
            spill_cgid=self._row_cgid[sr], spill_ns=d_spill, met_cgid=met,
        )

    def _kernel_stats(self) -> dict[str, int]:
        table = self.bpf[b"stats"]
        return {name: int(sum(table[table.Key(i)])) for i, name in enumerate(STATS)}

    def stats(self) -> dict[str, int]:
        """Kernel-side losses since start: late ns, dropped ns/updates, counter errors.

        Charges for windows before :attr:`first_window` are start-up,
        discarded in the kernel, and not counted.
        """
        if self.bpf is None:
            return {name: 0 for name in STATS}
        return self._kernel_stats()
