"""The engine: sources in, resolved and checked record batches out.

``Meter`` owns the sources, drains them on a period, merges their arrays
per window, resolves cgroup ids to tenant/compartment rows (with ``host``
and ``idle``), estimates what must be estimated (and says so), checks
per-window CPU conservation, and hands numpy batches of
:data:`meter.records.RECORD_DTYPE` to the caller (``batches()``) or to
callbacks (``on_batch``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import build
from .books import ENERGY_DOMAINS, Books, EnergyBooks
from .bpfabi import MAX_COMPARTMENTS
from .bpfsys import Bpf
from .errors import ConfigError, MeterError
from .host import realtime_offset_ns
from .loop import DRAIN_PRIORITIES, DrainLoop
from .perf import CounterPlan, plan_counters
from .ports import PORT_ROOM, Ports
from .records import Columns, window_sums, window_totals
from .resolver import Resolver
from .sources.base import (
    CPUSource,
    CPUSpec,
    KernelSources,
    PacketSource,
    SourceFactory,
    VFPoller,
    concat,
    packet_time_problem,
)
from .sources.energy import EnergyReader, EnergySettings
from .sources.net import NetDrain
from .sources.sched import SchedDrain
from .stats import MeterStats
from .topology import Topology, window_ms_problem

__all__ = ["ENERGY_DOMAINS", "CounterPlan", "Meter", "MeterStats", "plan_counters", "window_sums", "window_totals"]

log = logging.getLogger("meter")


#: The most windows one kernel charge may be split over. The verifier walks
#: the split loop once per window: with 4 counters and ports the switch's
#: charge (meter_charge) takes 996k of its 1M instructions at 560 here
#: (tests/test_program.py loads this limit), so idle CPUs are closed at least every
#: (560 - 16) / 2 windows (Meter.closes_per_take), and takes come at most twice that apart.
MAX_SPAN_LIMIT = 560

#: Entries (cgroup or port x window) taken since the last batch that make a batch
#: due before its interval, and that the loop keeps a take under (DrainLoop.next_interval):
#: a batch much bigger leaves the caches and costs more a record (benchmarks/scale.py,
#: 128 CPUs x 1,000 compartments, ns a record: 800 in batches of 400,000 records, 557-600
#: of 100,000; with takes kept under 50,000 / 65,536 / 100,000 entries: 464-501 / 439-452
#: / 494-497).
BATCH_ENTRIES = 65_536

#: Seconds between takes (Meter's default). Idle CPUs are closed at every take, and
#: between takes when one charge could otherwise span more than MAX_SPAN_LIMIT windows
#: (Meter.closes_per_take: at 1 ms windows every 0.25 s, a close between two takes); a
#: take costs tens of numpy calls after a sleep, a close a map read (docs/architecture.md,
#: "Takes and batches"). At most 0.544 s at 1 ms windows.
DRAIN_INTERVAL = 0.5

#: Seconds between batches (Meter's default): each batch pays some hundreds of numpy
#: calls and SQL statements whatever its size, after a sleep that left the caches cold,
#: so fewer, bigger batches (up to BATCH_ENTRIES) cost less a second; the takes stay
#: every drain interval, so only the records' latency grows (docs/architecture.md,
#: "Takes and batches").
BATCH_INTERVAL = 2.0

#: Ring rows a file topology keeps free for compartments added by reloads.
RELOAD_ROOM = 64
#: Rows for cgroups that are not compartments: meter's pseudo-rows, the
#: host's cgroup, and any leaf cgroup the kernel charges by its own id.
PSEUDO_CGROUPS = 16


class Meter(DrainLoop):
    """Meter a topology's compartments; a context manager.

    >>> with Meter(Topology.discover()) as m:        # doctest: +SKIP
    ...     for batch in m.batches(duration=5):
    ...         print(meter.text(batch, "compartment"), batch["cpu_ns"])

    ``window_ms`` (default: the topology's, else 1) is the record width.
    ``counters`` maps record fields to perf event specs (see
    :func:`plan_counters`). Batches come every ``batch_interval`` seconds;
    the kernel's rings are taken into this process every ``drain_interval``
    seconds or less (a whole number of times per batch), which the kernel's
    window split bounds (docs/architecture.md, "Takes and batches").
    ``drain_priority`` (default: the topology's, else "realtime"): "realtime" runs ``batches()`` (its
    caller's loop body included) and every take and build in the real-time
    class, so that tenants saturating the host cannot hold the takes back
    (:mod:`meter.loop`); "normal" leaves the threads as they are.
    ``vf_links(pf)`` replaces the netlink query for a PF's VF counters
    (for agents that have them already, and for tests). ``sources`` builds
    the sources (default: :class:`~meter.sources.base.KernelSources`, the
    real ones; ``meter.sources.fake.FakeSources`` simulates a host).
    """

    def __init__(
        self,
        topology: Topology,
        window_ms: int | None = None,
        *,
        counters: dict[str, str] | None = None,
        drain_interval: float = DRAIN_INTERVAL,
        batch_interval: float = BATCH_INTERVAL,
        host: str | None = None,
        first_seq: int = 0,
        max_rows: int | None = None,
        energy: EnergySettings | None = None,
        vf_links: Callable[[str], list[Any]] | None = None,
        sources: SourceFactory | None = None,
        packet_time: str | None = None,
        drain_priority: str | None = None,
    ) -> None:
        window_ms = window_ms if window_ms is not None else (topology.window_ms or 1)
        if problem := window_ms_problem(window_ms):
            raise ConfigError(f"window_ms {problem}", setting="window_ms")
        packet_time = packet_time if packet_time is not None else (topology.packet_time or "clock")
        if problem := packet_time_problem(packet_time):
            raise ConfigError(f"packet_time {problem}", setting="packet_time")
        if len(topology.compartments) > MAX_COMPARTMENTS:
            raise ConfigError(f"{len(topology.compartments)} compartments: meter resolves at most {MAX_COMPARTMENTS} "
                              "in the kernel; split the host's tenants over fewer compartments")
        drain_priority = drain_priority if drain_priority is not None else (topology.drain_priority or "realtime")
        if drain_priority not in DRAIN_PRIORITIES:
            raise ConfigError(f"drain_priority must be one of {', '.join(DRAIN_PRIORITIES)}, not {drain_priority!r}",
                              setting="drain_priority")
        for name, value in (("drain_interval", drain_interval), ("batch_interval", batch_interval)):
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}", setting=name)
        # A whole number of takes per batch, none further apart than drain_interval.
        takes = max(1, math.ceil(batch_interval / drain_interval - 1e-9))
        asked, drain_interval = drain_interval, batch_interval / takes
        # Idle CPUs are closed (nudged) at every take, and once between takes where one
        # charge could otherwise span more windows than the kernel splits it over.
        def spans(interval: float) -> bool:
            return 2 * interval * 1000 / window_ms + 16 <= MAX_SPAN_LIMIT
        closes = 1 if spans(drain_interval) else 2
        if not spans(drain_interval / closes):
            raise ConfigError(  # the interval asked is at least the one that does not fit
                f"a drain interval of {asked:g} s is too long for {window_ms} ms windows "
                f"(at most {(MAX_SPAN_LIMIT - 16) * window_ms / 1000:g} s): idle CPUs are closed at most twice a "
                "drain; batches can still come less often (batch_interval)"
            )
        self.topology = topology
        self.window_ms = window_ms
        self.window_ns = window_ms * 1_000_000
        #: How a packet sent outside a NET softirq is dated (sources.base.PACKET_TIMES).
        self.packet_time = packet_time
        self.drain_interval = float(drain_interval)
        self.batch_interval = float(batch_interval)
        #: The drain's thread in the real-time class ("realtime", meter.loop), or as it is ("normal").
        self.drain_priority = drain_priority
        self.takes_per_batch = takes
        self.closes_per_take = closes
        self.host = host or socket.gethostname()
        self.plan = plan_counters(counters)
        src = str(topology.source) if topology.source else None
        self.energy = energy if energy is not None else EnergySettings.from_table(topology.energy, path=src)
        self._sources: SourceFactory = sources if sources is not None else KernelSources(vf_links)
        self._reader: EnergyReader | None = None
        self.stats = MeterStats()
        self._seq = int(first_seq)
        DrainLoop.__init__(self)
        self._lock = threading.Lock()
        self._max_rows = max_rows
        self._taken_from = 0
        #: Takes since the last batch (what the sources drained), built at the next batch.
        self._pending: list[tuple[SchedDrain, NetDrain | None]] = []
        #: The CPU source's closed window before the first of them.
        self._closed_before = 0
        #: Records built before the next batch (at a reload), handed out with it.
        self._held: list[Columns] = []
        #: Late time billed and not yet matched by a late row (meter.build).
        self._late_budget = 0
        #: Per row, kernel/clock differences still to settle (meter.build).
        self._spill: dict[int, int] = {}
        self._sched: CPUSource | None = None
        self._net: PacketSource | None = None
        self._vf: VFPoller | None = None
        self._row_has_vfs = np.zeros(0, bool)
        self._books = Books()
        self._energy = EnergyBooks(None, self.plan, self.energy.policy)
        self._ports = Ports()
        self._port_row = np.zeros(0, np.int64)
        self._row_has_ports = np.zeros(0, bool)
        self._resolver: Resolver | None = None
        self._pushed_generation = -1
        self._offset_ns = 0
        self._flushed = False
        self._bpf: Bpf | None = None  # the bpf(2) syscall, for program_stats()

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Meter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Check the topology, load and attach the kernel programs."""
        if self._sched is not None:
            return
        self.topology.require_cgroups()
        self._resolver = Resolver(self.topology)
        self._ports = Ports()
        self._ports.follow(self.topology.compartments, strict=True)
        wanted = self._ports.wanted(self._resolver)
        self._ports.capacity = self._port_capacity(len(wanted))
        ports, _ = self._ports.plan(wanted)
        try:
            sched = self._sources.cpu(self._cpu_spec(self._ports.capacity))
            sched.set_compartments(self._resolver.kernel_compartments())
            self._pushed_generation = self._resolver.generation
            sched.open()
        except BaseException:
            self._ports.close()  # the databases' sockets: nothing else is open yet
            raise
        self._sched = sched
        try:
            vfs = self._resolver.owned_vfs()
            if vfs:
                self._row_has_vfs = np.zeros(self._resolver.nrows, bool)
                self._row_has_vfs[[row for row, _pf, _vf in vfs]] = True
                self._vf = self._sources.vfs(vfs)
            self._books = Books(len(ports))
            if self._ports.capacity:
                self._port_row = self._ports.port_row()
                self._row_has_ports = np.zeros(self._resolver.nrows, bool)
                self._row_has_ports[self._port_row] = True
                self._net = self._sources.packets(sched, ports)
                self._net.attach()
            self._reader = self._sources.energy(self.energy)
            self._energy = EnergyBooks(self._reader, self.plan, self.energy.policy)
        except Exception:
            self._close_sources()
            raise
        self._offset_ns = realtime_offset_ns()
        # _stop is not cleared here: a stop asked for while opening (SIGTERM
        # during start-up) must still stop the meter. close() clears it.
        self._flushed = False
        self._pending, self._held = [], []

    def _push_compartments(self) -> None:
        """Tell the CPU source the compartments again if they changed (reload, discovery)."""
        res = self._resolver
        if self._sched is not None and res is not None and res.generation != self._pushed_generation:
            self._sched.set_compartments(res.kernel_compartments())
            self._pushed_generation = res.generation

    def _port_capacity(self, nports: int) -> int:
        """Port numbers the kernel's maps are sized for: the ports now and
        PORT_ROOM more for ports added while metering, when the meter counts
        packets at all (some interface listed, or an Open vSwitch database)."""
        follows = any(c.ovsdb for c in self.topology.compartments)
        return nports + PORT_ROOM if nports or follows else 0

    def _sync_ports(self) -> None:
        """Count the ports the compartments own now (a reload, a vswitch's port
        added or removed): new ones attached, gone ones detached with their
        counts kept. The caller holds the lock."""
        if self._resolver is None:
            return
        wanted = self._ports.wanted(self._resolver)
        if self._net is None:
            if wanted:
                log.warning("meter: interfaces added while metering take effect at the next restart: this meter "
                            "was started without any, so its packet programs are not loaded")
            return
        added, removed = self._ports.plan(wanted)
        for port in removed:
            self._net.remove(port)
        for port in added:
            self._net.add(port)
        if added:
            self._port_row = self._ports.port_row()
            self._books.grow_ports(len(self._ports.known))
            has = np.zeros(max(self._resolver.nrows, len(self._row_has_ports)), bool)
            has[:len(self._row_has_ports)] = self._row_has_ports
            has[self._port_row] = True
            self._row_has_ports = has

    def ring_rows(self, nports: int) -> int:
        """Rows of the CPU source's ring: every cgroup it may charge.

        The pseudo-rows, each compartment (under discovery as many as the
        kernel resolves, MAX_COMPARTMENTS; a file topology's own, and room
        for RELOAD_ROOM more added by reloads), and with ports each one's
        given-away time and the ports' own. Beyond them usage is kept in
        the ``unattributed`` row (docs/architecture.md, "The ring").
        """
        if self._max_rows is not None:
            return self._max_rows
        n = MAX_COMPARTMENTS if self.topology.discovers else len(self.topology.compartments) + RELOAD_ROOM
        rows = PSEUDO_CGROUPS + n
        if nports:
            rows += PSEUDO_CGROUPS + n + nports
        return rows

    def _cpu_spec(self, nports: int) -> CPUSpec:
        # An idle CPU is nudged only at closes: one charge may span two close intervals.
        drain_windows = int(self.drain_interval * 1e9 // self.window_ns)
        close_windows = int(self.drain_interval / self.closes_per_take * 1e9 // self.window_ns)
        span = min(2 * close_windows + 16, MAX_SPAN_LIMIT)
        # The ring holds the windows between the last one taken and the newest
        # charged (a drain interval and the close interval before the take's
        # watermark: two drain intervals without closes between), and room for a
        # drain that comes late on a busy host: two drain intervals more, and at
        # least one second.
        held = drain_windows + close_windows + 16
        ring = max(span, held) + max(32, 2 * drain_windows, -(-1_000_000_000 // self.window_ns))
        return CPUSpec(self.window_ns, list(self.plan.events.values()), span, nports, self.ring_rows(nports), ring,
                       self.packet_time)

    def program_listing(self) -> str:
        """The kernel program this meter would load, with its ``-D`` settings
        (``meter record --print-bpf``); nothing is loaded."""
        nports = self._port_capacity(sum(len(c.interfaces) for c in self.topology.compartments))
        cpu = self._sources.cpu(self._cpu_spec(nports))
        listing = getattr(cpu, "listing", None)
        if listing is None:
            raise MeterError("this meter's CPU source loads no kernel program")
        return str(listing())

    def close(self) -> None:
        """Flush what was measured to callbacks, then detach everything."""
        self.stop()
        if self._sched is not None:
            try:
                if self._callbacks and not self._flushed:
                    self._dispatch(self._drain(final=True))
            finally:
                self._close_sources()
        self._stop.clear()  # ready to be opened and run again

    def _close_sources(self) -> None:
        """Detach tc filters first (they use the sched object's maps), then the rest."""
        self._ports.close()
        if self._resolver is not None:
            self._resolver.close()
        if self._vf is not None:
            self._vf.close()
            self._vf = None
        try:
            if self._net is not None:
                self._net.close()
        finally:
            self._net = None
            if self._sched is not None:
                self._sched.close()
                self._sched = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    @property
    def is_open(self) -> bool:
        """Whether the sources are open (between :meth:`open` and :meth:`close`)."""
        return self._sched is not None

    @property
    def cpu_source(self) -> CPUSource | None:
        """The open CPU source (None when closed)."""
        return self._sched

    @property
    def packet_source(self) -> PacketSource | None:
        """The open packet source (None when closed or without ports)."""
        return self._net

    def program_fds(self) -> dict[str, list[int]]:
        """This meter's loaded kernel programs, {name: [fd, ...]} ({} when closed)."""
        out: dict[str, list[int]] = {}
        for src in (self._sched, self._net):
            for name, fds in (src.program_fds() if src is not None else {}).items():
                out.setdefault(name, []).extend(fds)
        return out

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """(run_time_ns, run_cnt) per program name, of this meter's programs only
        (the kernel's bpf_stats, while ``kernel.bpf_stats_enabled`` is 1).

        Read from the meter's own program fds (BPF_OBJ_GET_INFO_BY_FD), so
        another meter's programs, or any program named ``meter_*``, never
        count, and names are meter's own, not the kernel's 15-character cut;
        a tc program's copies (one per port) are summed. A program that never
        ran with stats on is absent; {} when closed.
        """
        if self._bpf is None:
            self._bpf = Bpf()
        bpf = self._bpf
        stats: dict[str, tuple[int, int]] = {}
        for name, fds in self.program_fds().items():
            for fd in fds:
                try:
                    info = bpf.prog_info(fd)
                except OSError:
                    continue  # closed by a stopping meter meanwhile
                ns, cnt = stats.get(name, (0, 0))
                stats[name] = (ns + info.run_time_ns, cnt + info.run_cnt)
        return {name: v for name, v in stats.items() if v[1]}

    @property
    def row_names(self) -> list[tuple[str, str]]:
        """(tenant, compartment) of every row so far, pseudo-rows first."""
        res = self._resolver
        return list(zip(res.tenants, res.names)) if res is not None else []

    @property
    def energy_source(self) -> str:
        """The records' energy_source: the energy reader in use ("" before open)."""
        return self._reader.source if self._reader is not None else ""

    @property
    def next_seq(self) -> int:
        """The seq of the next record (``first_seq`` until the first one)."""
        return self._seq

    @next_seq.setter
    def next_seq(self, value: int) -> None:
        if self.is_open:
            raise MeterError("next_seq is set before the meter opens")
        self._seq = int(value)

    @property
    def offset_ns(self) -> int:
        """CLOCK_REALTIME - CLOCK_MONOTONIC at open: record times are kernel times plus this."""
        return self._offset_ns

    @property
    def ncpu(self) -> int:
        return self._sched.ncpu if self._sched is not None else os.cpu_count() or 1

    # -- topology ---------------------------------------------------------------------

    def set_topology(self, topology: Topology) -> None:
        """Switch to a new topology between drains (SIGHUP); no count is lost.

        Kept compartments keep their running totals; added ones start; removed
        ones stop receiving (their tasks count as host from now: what was
        taken before is built at once, under the old compartments, and its
        records come with the next batch).
        Interfaces (listed, or on an ``ovsdb``'s bridges) added are attached
        and removed ones detached, their counts kept; VFs are fixed at open
        (a change needs a restart, and is logged), as are interfaces for a
        meter started without any.
        """
        topology.require_cgroups()
        with self.urgent(), self._lock:  # it may take and build (as _working)
            old = self.topology
            self.topology = topology
            if self._resolver is None:
                return
            if self._sched is not None:
                # What was charged under the old compartments is named under them:
                # taken and built now, its records held for the next batch.
                self._take_locked(False)
                self._held.append(self._build_pending())
            self._resolver.update(topology)
            self._push_compartments()
            self._books.grow(self._resolver.nrows)
            self._ports.follow(topology.compartments, strict=False)
            self._sync_ports()
            if {(c.tenant, c.name, v) for c in old.compartments for v in c.vfs} != {
                    (c.tenant, c.name, v) for c in topology.compartments for v in c.vfs}:
                log.warning("meter: VF changes in the new topology take effect at the next restart")
            want = topology.packet_time or "clock"
            if topology.packet_time != old.packet_time and want != self.packet_time:
                # Compiled into the kernel program: it stays what the meter opened with.
                log.warning("meter: packet_time %s in the new topology takes effect at the next restart "
                            "(still %s)", want, self.packet_time)
            want = topology.drain_priority or "realtime"
            if topology.drain_priority != old.drain_priority and want != self.drain_priority:
                # The loop holds its thread's class from its start to its end.
                log.warning("meter: drain_priority %s in the new topology takes effect at the next restart "
                            "(still %s)", want, self.drain_priority)

    # -- producing batches ---------------------------------------------------------

    def drain(self, *, final: bool = False) -> np.ndarray:
        """Drain the sources once and return the closed windows' records (those of
        the takes since the last batch too)."""
        return self._drain(final=final).records()

    def _take(self, *, final: bool = False) -> float:
        """Take what the sources hold for closed windows into this process (their
        rings open again for later windows); the records are built at the next
        batch (docs/architecture.md, "Takes and batches"). Returns the entries
        taken since the last batch over BATCH_ENTRIES: from 1.0 a batch is due."""
        with self._working():
            self._take_locked(final)
            return sum(len(d) + (len(n) if n is not None else 0) for d, n in self._pending) / BATCH_ENTRIES

    @contextlib.contextmanager
    def _working(self) -> Iterator[None]:
        """The lock, for a take or a batch, in the real-time class (``drain_priority``,
        meter.loop): its time counted in ``stats.drain_seconds``. Every take and
        build goes through here: the loop's, ``drain()``'s, the final flush at
        close and a reload's."""
        if self._sched is None:
            raise MeterError("the meter is not open: use it as a context manager or call open()")
        t0 = time.perf_counter()
        try:
            with self.urgent(), self._lock:
                yield
        finally:
            self.stats.drain_seconds += time.perf_counter() - t0

    def _take_locked(self, final: bool) -> None:
        assert self._sched is not None and self._resolver is not None
        if not self._pending:
            self._closed_before = self._sched.closed_window
        drained = self._sched.drain(final=final)
        net = None
        if self._net is not None:
            if self._ports.poll():
                self._sync_ports()
            self._net.refresh()
            self.stats.filter_reattachments = self._net.reattachments
            net = self._net.drain(self._sched.closed_window)
        self._pending.append((drained, net))
        self.stats.takes += 1
        self._follow_cgroups(build.cgroup_ids(drained))

    def _close(self) -> None:
        """Close the CPUs' windows between takes (meter.loop): idle CPUs nudged,
        the watermark published; the next take takes what it closed, and the
        cgroups are followed as at a take."""
        with self._working():
            assert self._sched is not None
            met = self._sched.publish()
            self._follow_cgroups(build.cgroups_of(met) if len(met) else met)
            self.stats.closes += 1

    def _follow_cgroups(self, met: np.ndarray) -> None:
        """At every take and close, not only at batches: a cgroup met for the first
        time (``met``) is named while it still exists, and a compartment's cgroup
        made again (or found by discovery) is charged to it in the kernel from now on."""
        assert self._resolver is not None
        if len(met):
            self._resolver.rows(met)
        self._resolver.refresh_ids()
        self._push_compartments()

    def _drain(self, *, final: bool) -> Columns:
        with self._working():
            self._take_locked(final)
            self._flushed = self._flushed or final
            return self._batch_locked()

    def _batch(self) -> Columns:
        """The records of the takes since the last batch, without another take."""
        with self._working():
            return self._batch_locked()

    def _batch_locked(self) -> Columns:
        batch = self._build_pending()
        if self._held:
            batch = Columns.concat([*self._held, batch])
            self._held = []
        self.stats.drains += 1
        return batch

    def _build_pending(self) -> Columns:
        """The records of the takes since the last batch (the caller holds the lock)."""
        closed_before, self._taken_from = self._closed_before, self._closed_before + 1
        pending, self._pending = self._pending, []
        drained = concat([d for d, _ in pending])
        nets = [n for _, n in pending if n is not None]
        net = concat(nets) if nets else None
        vf = self._vf.poll() if self._vf is not None else None
        columns, ranges = self._build(drained, net, vf)
        self._account(columns, closed_before, ranges)
        return columns

    def _build(self, d: SchedDrain, nd: NetDrain | None = None,
               vf: dict[int, tuple[int, int, int, int]] | None = None
               ) -> tuple[Columns, tuple[np.ndarray, np.ndarray] | None]:
        """Merge one drain of every source into records (``meter.build``), then
        apportion energy and add them to the running totals. Returns the records'
        columns and their column ranges (None for no records).

        Energy, ranges and totals are taken from the columns, and the records
        are laid out only for a caller that wants them (``batches()``,
        ``drain()``, callbacks): each pass reads contiguous memory, not a field
        every 248 bytes, and the store takes the columns as they are
        (docs/architecture.md, "Records")."""
        assert self._sched is not None and self._resolver is not None
        ctx = build.Context(
            window_ns=self.window_ns, host=self.host, plan=self.plan, offset_ns=self._offset_ns,
            first_window=self._sched.first_window, closed_window=self._sched.closed_window,
            kernel_charge=self._sched.kernel_charge, first_seq=self._seq,
            port_row=self._port_row if self._net is not None else None,
            row_has_ports=self._row_has_ports if self._net is not None else None,
            row_has_vfs=self._row_has_vfs if self._vf is not None else None,
            vf_source=self._vf.source if self._vf is not None else "",
            ncpu=self.ncpu, taken_from=self._taken_from, late_budget_ns=self._late_budget, spill=self._spill,
        )
        built = build.build(d, nd, vf, self._resolver, ctx)
        self._late_budget = built.late_budget_ns
        self.stats.late_unmatched_ns = max(built.late_budget_ns, 0)
        self._spill = built.spill
        self.stats.unsettled_ns = sum(abs(v) for v in built.spill.values())
        self.stats.warmup_windows_skipped += built.warmup_windows
        cols = built.columns
        domains = self._energy.apportion(cols, built.window, built.row, self.ncpu, self.window_ns)
        ranges = cols.ranges() if len(cols) else None  # once, for the books and the stats
        self._books.add(cols, built.row, nd, ranges)
        self._books.add_energy(built.row, domains)
        self._seq += len(cols)
        st = self.stats
        st.energy_measured_uj, st.energy_attributed_uj = self._energy.measured, self._energy.attributed
        st.energy_pending_uj = self._energy.pending
        self.stats.unresolved_cgroups = self._resolver.unresolved
        return cols, ranges

    # -- cumulative totals (for exporters and embedding agents) --------------------------

    def totals(self) -> list[dict[str, Any]]:
        """Running totals since open, one dict per row (tenant, compartment, then
        every counter field; None when never measured), plus per-domain energy
        (``energy_uj_by_domain``), per-port network totals (``ports``), when
        the row began counting (``created``, Unix seconds) and whether it can
        still receive usage (``present``: meter's own rows, and compartments
        of the current topology whose cgroup exists).

        Thread-safe: a consistent copy, taken between drains.
        """
        with self._lock:
            res = self._resolver
            if res is None:
                return []
            books = self._books.copy()
            ports = list(self._ports.known)
            port_row = self._port_row.copy()
            names = list(zip(res.tenants, res.names))
            created, present = list(res.created), res.present()
        rows = books.totals(names, ports, port_row)
        for r, made, here in zip(rows, created, present):
            r["created"], r["present"] = made, here
        return rows

    def _account(self, batch: Columns, closed_before: int, ranges: tuple[np.ndarray, np.ndarray] | None) -> None:
        assert self._sched is not None
        src = self._sched
        self.stats.take_kernel(src.stats(), nudges=src.nudges, run_switches=src.same_run_switches,
                               idle_out_switches=src.idle_out_switches, idle_in_switches=src.idle_in_switches)
        self.stats.pending_adjustment_ns = int(getattr(src, "pending_adjustment_ns", 0))
        # Every window closed since the last drain must have records.
        expected = max(0, src.closed_window - max(closed_before, src.first_window - 1))
        self.stats.take_batch(batch, ncpu=self.ncpu, window_ns=self.window_ns, expected_windows=expected, ranges=ranges)
        self.stats.first_window_start_ns = src.first_window * self.window_ns + self._offset_ns
        self.stats.covered_ns = max(0, src.closed_window + 1 - src.first_window) * self.window_ns
