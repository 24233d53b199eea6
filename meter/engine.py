"""The engine: sources in, resolved and checked record batches out.

``Meter`` owns the sources, drains them on a period, merges their arrays
per window, resolves cgroup ids to tenant/compartment rows (with ``host``
and ``idle``), estimates what must be estimated (and says so), checks
per-window CPU conservation, and hands numpy batches of
:data:`meter.records.RECORD_DTYPE` to the caller (``batches()``) or to
callbacks (``on_batch``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from . import build, records
from .attribution import attribute_energy
from .errors import ConfigError, MeterError
from .perf import CounterPlan, plan_counters
from .bpfabi import KIND_RX
from .resolver import IDLE_ROW, Resolver
from .sources.base import CPUSource, CPUSpec, KernelSources, PacketSource, SourceFactory, VFPoller
from .sources.energy import EnergyReader, EnergySettings, ModelReader
from .sources.net import NetDrain, Port, parse_port
from .sources.sched import SchedDrain
from .topology import Topology

__all__ = ["ENERGY_DOMAINS", "CounterPlan", "Meter", "MeterStats", "plan_counters", "window_sums", "window_totals"]

log = logging.getLogger("meter")

#: Energy domains apportioned to records (cores/uncore are parts of the package).
ENERGY_DOMAINS = ("package", "dram")

BatchCallback = Callable[[np.ndarray], None]

#: The most windows one kernel charge may be split over; the verifier walks
#: the split loop once per window, and rejects much longer loops.
MAX_SPAN_LIMIT = 1024


@dataclasses.dataclass
class MeterStats:
    """What the engine and its sources did, for self-metrics and reports."""

    windows: int = 0
    records: int = 0
    drains: int = 0
    drain_seconds: float = 0.0
    late_ns: int = 0
    dropped_ns: int = 0
    dropped_updates: int = 0
    counter_errors: int = 0
    net_dropped_updates: int = 0  # packet updates not stored: net map full
    softirq_unattributed_ns: int = 0  # NET softirq time left with the interrupted task
    unplaced_ns: int = 0  # kernel/clock differences the kernel side had no room to carry
    unsettled: int = 0  # slices whose start was not seen (followed from the scheduler's own mark)
    warmup_windows_skipped: int = 0
    conservation_violations: int = 0
    unresolved_cgroups: int = 0
    nudges: int = 0
    energy_measured_uj: int = 0  # what the reader (or model) reported
    energy_attributed_uj: int = 0  # what went into records (idle row included)
    energy_pending_uj: int = 0  # measured, waiting for the next records
    last_window_end_ns: int = 0  # wall clock end of the newest window emitted
    first_window_start_ns: int = 0  # wall clock start of the first whole window
    covered_ns: int = 0  # wall time from the first window to the last one closed

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Meter:
    """Meter a topology's compartments; a context manager.

    >>> with Meter(Topology.discover()) as m:        # doctest: +SKIP
    ...     for batch in m.batches(duration=5):
    ...         print(batch["compartment"], batch["cpu_ns"])

    ``window_ms`` (default: the topology's, else 1) is the record width.
    ``counters`` maps record fields to perf event specs (see
    :func:`plan_counters`). Batches come every ``drain_interval`` seconds.
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
        drain_interval: float = 0.25,
        host: str | None = None,
        first_seq: int = 0,
        map_entries: int = 65536,
        energy: EnergySettings | None = None,
        vf_links: Callable[[str], list[Any]] | None = None,
        sources: SourceFactory | None = None,
    ) -> None:
        window_ms = window_ms if window_ms is not None else (topology.window_ms or 1)
        if not isinstance(window_ms, int) or window_ms < 1:
            raise ConfigError(f"window_ms must be a whole number of milliseconds >= 1, not {window_ms!r}")
        if drain_interval <= 0:
            raise ConfigError(f"drain_interval must be positive, not {drain_interval!r}")
        if 2 * drain_interval * 1000 / window_ms + 16 > MAX_SPAN_LIMIT:
            raise ConfigError(
                f"a drain interval of {drain_interval} s is too long for {window_ms} ms windows "
                f"(at most {(MAX_SPAN_LIMIT - 16) * window_ms / 2000:g} s): idle CPUs are closed only at drains"
            )
        self.topology = topology
        self.window_ms = window_ms
        self.window_ns = window_ms * 1_000_000
        self.drain_interval = float(drain_interval)
        self.host = host or socket.gethostname()
        self.plan = plan_counters(counters)
        src = str(topology.source) if topology.source else None
        self.energy = energy if energy is not None else EnergySettings.from_table(topology.energy, path=src)
        self._sources: SourceFactory = sources if sources is not None else KernelSources(vf_links)
        self._reader: EnergyReader | None = None
        self._energy_carry = {"package": 0, "dram": 0}
        self.stats = MeterStats()
        self._seq = int(first_seq)
        self._callbacks: list[BatchCallback] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._map_entries = map_entries
        self._sched: CPUSource | None = None
        self._net: PacketSource | None = None
        self._vf: VFPoller | None = None
        self._row_has_vfs = np.zeros(0, bool)
        ncols = len(records.COUNTER_COLUMNS)
        self._tot = np.zeros((0, ncols), np.int64)
        self._avail = np.zeros((0, ncols), bool)
        self._energy_tot = np.zeros((0, len(ENERGY_DOMAINS)), np.int64)
        self._port_tot = np.zeros((0, 4), np.int64)
        self._ports_list: list[Port] = []
        self._port_row = np.zeros(0, np.int64)
        self._row_has_ports = np.zeros(0, bool)
        self._resolver: Resolver | None = None
        self._offset_ns = 0
        self._flushed = False

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
        ports, port_rows = self._ports()
        sched = self._sources.cpu(self._cpu_spec(len(ports)))
        sched.open()
        self._sched = sched
        try:
            vfs = self._vfs()
            if vfs:
                self._row_has_vfs = np.zeros(self._resolver.nrows, bool)
                self._row_has_vfs[[row for row, _pf, _vf in vfs]] = True
                self._vf = self._sources.vfs(vfs)
            self._ports_list = ports
            self._port_tot = np.zeros((len(ports), 4), np.int64)
            if ports:
                self._port_row = np.asarray(port_rows, np.int64)
                self._row_has_ports = np.zeros(self._resolver.nrows, bool)
                self._row_has_ports[self._port_row] = True
                self._net = self._sources.packets(sched, ports, self._map_entries)
                self._net.attach()
            self._reader = self._sources.energy(self.energy)
        except Exception:
            self._close_sources()
            raise
        self._offset_ns = _realtime_offset_ns()
        # _stop is not cleared here: a stop asked for while opening (SIGTERM
        # during start-up) must still stop the meter. close() clears it.
        self._flushed = False

    def _cpu_spec(self, nports: int) -> CPUSpec:
        # An idle CPU is nudged only at drains: one charge may span two intervals.
        span = int(2 * self.drain_interval * 1e9 // self.window_ns) + 16
        return CPUSpec(self.window_ns, list(self.plan.events.values()), self._map_entries,
                       min(span, MAX_SPAN_LIMIT), nports)

    def program_listing(self) -> str:
        """The kernel program this meter would load, with its ``-D`` settings
        (``meter record --print-bpf``); nothing is loaded."""
        nports = sum(len(c.interfaces) for c in self.topology.compartments)
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

    def _vfs(self) -> list[tuple[int, str, int]]:
        """(row, pf, vf) for every VF a compartment owns."""
        assert self._resolver is not None
        rows = {(c.tenant, c.name): i for i, c in enumerate(self._resolver.compartments) if c is not None}
        return [(rows[(c.tenant, c.name)], v.pf, v.vf) for c in self.topology.compartments for v in c.vfs]

    def _ports(self) -> tuple[list[Port], list[int]]:
        """Every interface a compartment owns, numbered, with its compartment's row."""
        assert self._resolver is not None
        rows = {(c.tenant, c.name): i for i, c in enumerate(self._resolver.compartments) if c is not None}
        ports: list[Port] = []
        port_rows: list[int] = []
        for c in self.topology.compartments:
            for spec in c.interfaces:
                ports.append(parse_port(len(ports), spec))
                port_rows.append(rows[(c.tenant, c.name)])
        return ports, port_rows

    @property
    def running(self) -> bool:
        """Whether the background drain thread (:meth:`start`) runs."""
        return self._thread is not None

    @property
    def is_open(self) -> bool:
        """Whether the sources are open (between :meth:`open` and :meth:`close`)."""
        return self._sched is not None

    @property
    def energy_source(self) -> str:
        """The records' energy_source: the energy reader in use ("" before open)."""
        return self._reader.source if self._reader is not None else ""

    @property
    def ncpu(self) -> int:
        return self._sched.ncpu if self._sched is not None else os.cpu_count() or 1

    # -- topology ---------------------------------------------------------------------

    def set_topology(self, topology: Topology) -> None:
        """Switch to a new topology between drains (SIGHUP); no count is lost.

        Kept compartments keep their running totals; added ones start; removed
        ones stop receiving (their tasks count as host from the next drain).
        Interfaces and VFs are fixed at open: changing them needs a restart,
        and is logged.
        """
        topology.require_cgroups()
        with self._lock:
            old = self.topology
            self.topology = topology
            if self._resolver is None:
                return
            self._resolver.update(topology)
            self._grow_totals(self._resolver.nrows)
            before = {(c.tenant, c.name, i) for c in old.compartments for i in c.interfaces}
            after = {(c.tenant, c.name, i) for c in topology.compartments for i in c.interfaces}
            if before != after or {(c.tenant, c.name, v) for c in old.compartments for v in c.vfs} != {
                    (c.tenant, c.name, v) for c in topology.compartments for v in c.vfs}:
                log.warning("meter: interface or VF changes in the new topology take effect at the next restart")

    # -- producing batches ---------------------------------------------------------

    def drain(self, *, final: bool = False) -> np.ndarray:
        """Drain the sources once and return the closed windows' records."""
        return self._drain(final=final)

    def _drain(self, *, final: bool) -> np.ndarray:
        if self._sched is None:
            raise MeterError("the meter is not open: use it as a context manager or call open()")
        t0 = time.perf_counter()
        with self._lock:
            drained = self._sched.drain(final=final)
            net = None
            if self._net is not None:
                self._net.refresh()
                net = self._net.drain(self._sched.closed_window)
            vf = self._vf.poll() if self._vf is not None else None
            self._flushed = self._flushed or final
            batch = self._build(drained, net, vf)
            self._account(batch)
        self.stats.drains += 1
        self.stats.drain_seconds += time.perf_counter() - t0
        return batch

    def _build(self, d: SchedDrain, nd: NetDrain | None = None,
               vf: dict[int, tuple[int, int, int, int]] | None = None) -> np.ndarray:
        """Merge one drain of every source into records (``meter.build``), then
        apportion energy and add them to the running totals."""
        assert self._sched is not None and self._resolver is not None
        ctx = build.Context(
            window_ns=self.window_ns, host=self.host, plan=self.plan, offset_ns=self._offset_ns,
            first_window=self._sched.first_window, closed_window=self._sched.closed_window,
            kernel_charge=self._sched.kernel_charge, first_seq=self._seq,
            port_row=self._port_row if self._net is not None else None,
            row_has_ports=self._row_has_ports if self._net is not None else None,
            row_has_vfs=self._row_has_vfs if self._vf is not None else None,
            vf_source=self._vf.source if self._vf is not None else "",
        )
        built = build.build(d, nd, vf, self._resolver, ctx)
        self.stats.warmup_windows_skipped += built.warmup_windows
        out = built.records
        if len(out):
            self._attribute_energy(out, built.window, built.row)
            self._accumulate(out, built.row, nd)
            self._seq += len(out)
        self.stats.unresolved_cgroups = self._resolver.unresolved
        return out

    # -- cumulative totals (for exporters and embedding agents) --------------------------

    def _grow_totals(self, nrows: int) -> None:
        if len(self._tot) < nrows:
            extra = nrows - len(self._tot)
            self._tot = np.vstack([self._tot, np.zeros((extra, len(records.COUNTER_COLUMNS)), np.int64)])
            self._avail = np.vstack([self._avail, np.zeros((extra, len(records.COUNTER_COLUMNS)), bool)])
            self._energy_tot = np.vstack([self._energy_tot, np.zeros((extra, len(ENERGY_DOMAINS)), np.int64)])

    def _accumulate(self, out: np.ndarray, row: np.ndarray, nd: NetDrain | None) -> None:
        """Add a batch to the per-row running totals (and per-port ones)."""
        if len(out):
            self._grow_totals(int(row.max()) + 1)
            values = np.stack([out[name] for name in records.COUNTER_COLUMNS], axis=1)
            order = np.argsort(row, kind="stable")
            r = row[order]
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            present = values[order] != records.NULL
            rows = r[starts]
            self._tot[rows] += np.add.reduceat(np.where(present, values[order], 0), starts, axis=0)
            self._avail[rows] |= np.logical_or.reduceat(present, starts, axis=0)
        if nd is not None and len(nd):
            rx = nd.kind == KIND_RX
            np.add.at(self._port_tot, (nd.port, np.where(rx, 0, 2)), nd.packets)
            np.add.at(self._port_tot, (nd.port, np.where(rx, 1, 3)), nd.bytes)

    def totals(self) -> list[dict[str, Any]]:
        """Running totals since open, one dict per row (tenant, compartment, then
        every counter field; None when never measured), plus per-domain energy
        (``energy_uj_by_domain``) and per-port network totals (``ports``).

        Thread-safe: a consistent copy, taken between drains.
        """
        with self._lock:
            res = self._resolver
            if res is None:
                return []
            tot, avail, energy = self._tot.copy(), self._avail.copy(), self._energy_tot.copy()
            port_tot = self._port_tot.copy()
            ports = list(self._net.ports) if self._net is not None else list(self._ports_list)
            port_row = self._port_row.copy()
            names = list(zip(res.tenants, res.names))
        out = []
        for r, (tenant, name) in enumerate(names):
            d: dict[str, Any] = {"tenant": tenant, "compartment": name}
            for j, field in enumerate(records.COUNTER_COLUMNS):
                d[field] = int(tot[r, j]) if r < len(tot) and avail[r, j] else None
            d["energy_uj_by_domain"] = (
                {dom: int(energy[r, i]) for i, dom in enumerate(ENERGY_DOMAINS) if energy[r, i]} if r < len(energy) else {}
            )
            d["ports"] = {
                p.label: dict(zip(("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"), map(int, port_tot[p.index])))
                for p in ports if port_row[p.index] == r
            }
            out.append(d)
        return out

    def _attribute_energy(self, out: np.ndarray, window: np.ndarray, row: np.ndarray) -> None:
        """Fill energy_uj: the energy measured since the last drain (or modelled per window), split exactly."""
        reader = self._reader
        if reader is None:
            return
        idle = row == IDLE_ROW
        cycles_measured = "cycles" in self.plan.events and "cycles" not in self.plan.estimated
        misses_measured = "cache_misses" in self.plan.events
        if isinstance(reader, ModelReader):
            # Per window: the model's energy for that window's utilisation.
            uniq, groups = np.unique(window, return_inverse=True)
            busy = np.bincount(groups, weights=np.where(idle, 0, out["cpu_ns"]), minlength=len(uniq))
            package = reader.window_energy(busy, self.ncpu, self.window_ns)
            dram = None
        else:
            # cores/uncore are parts of the package; psys stands in for a missing package.
            measured = reader.read()
            pkg, dram_uj = measured.get("package", measured.get("psys", 0)), measured.get("dram", 0)
            carry = self._energy_carry
            carry["package"] += pkg
            carry["dram"] += dram_uj
            self.stats.energy_measured_uj += pkg + dram_uj
            if len(out) == 0:
                self.stats.energy_pending_uj = carry["package"] + carry["dram"]
                return
            groups = np.zeros(len(out), np.int64)
            package = np.array([carry["package"]], np.int64)
            dram = np.array([carry["dram"]], np.int64)
            carry["package"] = carry["dram"] = 0
        if len(out) == 0:
            return
        domains: dict[str, np.ndarray] = {}
        energy = attribute_energy(out, groups, package, dram, idle=idle, cycles_measured=cycles_measured,
                                  misses_measured=misses_measured, policy=self.energy.policy, by_domain=domains)
        for i, domain in enumerate(ENERGY_DOMAINS):
            if domain in domains:
                self._grow_totals(int(row.max()) + 1)
                np.add.at(self._energy_tot[:, i], row, domains[domain])
        if isinstance(reader, ModelReader):
            self.stats.energy_measured_uj += int(package.sum())
        out["energy_uj"] = energy
        out["energy_source"] = reader.source
        self.stats.energy_attributed_uj += int(energy.sum())
        self.stats.energy_pending_uj = 0

    def _account(self, batch: np.ndarray) -> None:
        assert self._sched is not None
        k = self._sched.stats()
        self.stats.late_ns = k["late_ns"]
        self.stats.dropped_ns = k["drop_ns"]
        self.stats.dropped_updates = k["drop_updates"]
        self.stats.counter_errors = k["counter_errors"]
        self.stats.net_dropped_updates = k["net_drop_updates"]
        self.stats.softirq_unattributed_ns = k["span_unattributed_ns"]
        self.stats.unplaced_ns = k["unplaced_ns"]
        self.stats.unsettled = k["unsettled"]
        self.stats.nudges = self._sched.nudges
        first = self._sched.first_window
        self.stats.first_window_start_ns = first * self.window_ns + self._offset_ns
        self.stats.covered_ns = max(0, self._sched.closed_window + 1 - first) * self.window_ns
        self.stats.records += len(batch)
        if len(batch):
            # Every CPU-ns of a window is some row's cpu_ns, or softirq_ns given by another row.
            starts, sums = window_totals(batch)
            self.stats.windows += len(starts)
            expected = self.ncpu * self.window_ns
            self.stats.conservation_violations += int(np.count_nonzero(sums != expected))
            self.stats.last_window_end_ns = int(starts[-1]) + self.window_ns

    def batches(self, duration: float | None = None) -> Iterator[np.ndarray]:
        """Yield record batches every drain interval until ``duration`` or :meth:`stop`.

        The last batch is a final flush up to the last complete window.
        Empty batches are not yielded.
        """
        if self._sched is None:
            self.open()
        deadline = None if duration is None else time.monotonic() + duration
        next_at = time.monotonic() + self.drain_interval
        while not self._stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            wake = next_at if deadline is None else min(next_at, deadline)
            if self._stop.wait(max(0.0, wake - now)):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            next_at += self.drain_interval
            batch = self._drain(final=False)
            if len(batch):
                self._dispatch(batch)
                yield batch
        batch = self._drain(final=True)
        if len(batch):
            self._dispatch(batch)
            yield batch

    async def abatches(self, duration: float | None = None) -> AsyncIterator[np.ndarray]:
        """``batches()`` for asyncio: each drain runs in a worker thread, the loop stays free.

        >>> async for batch in meter.abatches(10):   # doctest: +SKIP
        ...     await sink.write(batch)
        """
        import asyncio  # noqa: PLC0415

        gen = self.batches(duration)
        done = object()
        while True:
            batch = await asyncio.to_thread(next, gen, done)
            if batch is done:
                return
            yield batch  # type: ignore[misc]

    # -- embedding ------------------------------------------------------------------

    def on_batch(self, fn: BatchCallback) -> BatchCallback:
        """Call ``fn(batch)`` for every batch produced; usable as a decorator."""
        self._callbacks.append(fn)
        return fn

    def _dispatch(self, batch: np.ndarray) -> None:
        for fn in list(self._callbacks):
            fn(batch)

    def start(self) -> None:
        """Run the drain loop in a background thread, feeding callbacks."""
        self.open()
        if self._thread is not None:
            return

        def run() -> None:
            for _ in self.batches():
                pass

        self._thread = threading.Thread(target=run, name="meter-drain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Make :meth:`batches` (or the background thread) flush and finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def window_sums(batch: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, Σ field) per window of a batch, windows ascending; NULL counts 0."""
    starts = batch["window_start_ns"]
    values = np.where(batch[field] == records.NULL, 0, batch[field])
    if len(starts) > 1 and np.any(starts[1:] < starts[:-1]):
        order = np.argsort(starts, kind="stable")
        starts, values = starts[order], values[order]
    if len(starts) == 0:
        return starts, values
    first = np.flatnonzero(np.r_[True, starts[1:] != starts[:-1]])
    return starts[first], np.add.reduceat(values, first)


def window_totals(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, the CPU time each window's records account for).

    cpu_ns + softirq_ns - softirq_given_ns over every row of a window: with
    every CPU metered, ncpu x W.
    """
    starts, cpu = window_sums(batch, "cpu_ns")
    _, softirq = window_sums(batch, "softirq_ns")
    _, given = window_sums(batch, "softirq_given_ns")
    return starts, cpu + softirq - given


def _realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, read as tightly as Python allows."""
    best = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        r = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, r - (m0 + m1) // 2)
    assert best is not None
    return best[1]
