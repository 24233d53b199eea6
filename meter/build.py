"""Building records: one drain of every source in, one record per (window, row) out.

Pure: plain arrays in (``SchedDrain``, ``NetDrain``, VF deltas), records
of :data:`meter.records.RECORD_DTYPE` out; no kernel, no clock, no I/O
beyond the resolver's cgroup lookups. The engine calls it once per drain;
tests call it with hand-made drains. See docs/architecture.md, "Records".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from . import records
from .bpfabi import GIVEN_BIT, KIND_RX, MAX_COUNTERS, PORT_CGID_BIT
from .perf import CounterPlan
from .resolver import IDLE_ROW, LATE_ROW, PSEUDO_ROWS, SCHED_ROW
from .sources.net import NetDrain
from .sources.sched import SchedDrain
from .sources.sriov import VF_FIELDS

__all__ = ["SUMS", "Built", "Context", "Rows", "build", "cgroup_ids", "cgroups_of"]

#: Columns summed per (window, row) before records are built, then the counters.
_PACKET_SUMS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                "rx_wire_packets", "rx_wire_bytes", "tx_wire_packets", "tx_wire_bytes")
SUMS = ("cpu_ns", "softirq_ns", "softirq_given_ns", *_PACKET_SUMS,
        "vf_rx_packets", "vf_rx_bytes", "vf_tx_packets", "vf_tx_bytes")
_NET_SUMS = ("softirq_ns", *_PACKET_SUMS)
#: The counter columns' names among the sums (counter i of the plan).
_COUNT = tuple(f"count{i}" for i in range(MAX_COUNTERS))
#: One source's entries: window, row, and the columns it has (the others are 0).
_Part = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]
#: Provenance texts' codes (records.NAMES).
_LATE, _CLOCK, _KERNEL, _TC = (records.code(t) for t in ("late", "clock", "kernel", "tc"))


class Rows(Protocol):
    """Row names and the cgroup id -> row mapping (``meter.resolver.Resolver``)."""

    unresolved: int

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    @property
    def nrows(self) -> int: ...

    def rows(self, cgids: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass
class Context:
    """Everything about the meter a drain's records depend on."""

    window_ns: int
    host: str
    plan: CounterPlan
    #: CLOCK_REALTIME - CLOCK_MONOTONIC: window starts are wall-clock ns.
    offset_ns: int
    first_window: int
    #: Newest window the CPU source has closed (VF deltas land in it).
    closed_window: int
    kernel_charge: bool
    first_seq: int
    #: Row of each port; None without a packet source.
    port_row: np.ndarray | None = None
    #: Rows that own a port / a VF (their net / VF fields are measured, others NULL).
    row_has_ports: np.ndarray | None = None
    row_has_vfs: np.ndarray | None = None
    vf_source: str = ""
    #: CPUs metered, and the first window this drain closed (closed_window
    #: is the last): with late time, each of those windows short of
    #: ncpu x W gets a ``late`` row for what it is short, out of the late
    #: time billed so far and not yet matched (late_budget_ns).
    ncpu: int = 0
    taken_from: int = 0
    late_budget_ns: int = 0
    #: Per row, kernel/clock differences left to settle from earlier drains.
    spill: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Built:
    """A drain's records, as columns, with each record's window and row (for
    energy and totals): the engine apportions energy and adds the batch to its
    books from the columns; they are laid out as records only for a caller that
    wants records (``columns.records()``)."""

    columns: records.Columns
    window: np.ndarray
    row: np.ndarray
    #: Distinct windows before the first whole one (start-up), not recorded.
    warmup_windows: int
    #: Late time billed and not yet matched by a ``late`` row (Context.late_budget_ns).
    late_budget_ns: int = 0
    #: Per row, what is still to settle (Context.spill), for the next drain.
    spill: dict[int, int] = dataclasses.field(default_factory=dict)


def cgroup_ids(d: SchedDrain) -> np.ndarray:
    """The cgroup ids a CPU drain met for the first time (all it charges when
    its source does not say), a given-away entry's as its own id, a port's
    pseudo id not at all: the ids ``Rows.rows`` must learn. Repeats in a row
    are left out (a kernel drain comes grouped by cgroup)."""
    if d.met_cgid is not None:
        if not len(d.met_cgid):
            return d.met_cgid
        return cgroups_of(d.met_cgid)
    return cgroups_of(np.concatenate([d.cgid, d.late_cgid, d.spill_cgid]))


def cgroups_of(ids: np.ndarray) -> np.ndarray:
    """The cgroup ids among the kernel's charge ids (:func:`cgroup_ids`): a
    given-away entry's as its own id, a port's pseudo id not at all, repeats
    in a row left out."""
    ids = ids[ids < np.uint64(PORT_CGID_BIT)] & ~np.uint64(GIVEN_BIT)
    if len(ids) < 2:
        return ids
    first = np.empty(len(ids), bool)
    first[0] = True
    np.not_equal(ids[1:], ids[:-1], out=first[1:])
    return ids[first]


def build(d: SchedDrain, nd: NetDrain | None, vf: dict[int, tuple[int, int, int, int]] | None,
          rows: Rows, ctx: Context) -> Built:
    """Merge one drain of every source into records, sorted by (window, row)."""
    ncount = d.counts.shape[1]
    parts: list[_Part] = []

    def add(window: np.ndarray, row: np.ndarray, **cols: np.ndarray) -> None:
        if "counts" in cols:
            counts = cols.pop("counts")
            cols.update({_COUNT[i]: counts[:, i] for i in range(ncount)})
        parts.append((window, row, cols))

    def charged(window: np.ndarray, cgid: np.ndarray, ns: np.ndarray, counts: np.ndarray, off: int) -> int:
        """Add CPU-source entries (rows shifted by ``off``: late ones); returns
        what they add to their windows' ncpu x W."""
        is_port = cgid >= np.uint64(PORT_CGID_BIT)
        is_given = ~is_port & (cgid >= np.uint64(GIVEN_BIT))
        if not is_given.any() and not is_port.any():  # the usual drain: CPU time only, no copies
            if len(cgid):
                add(window, rows.rows(cgid) + off, cpu_ns=ns, counts=counts)
            return int(ns.sum())
        is_cpu = ~is_port & ~is_given
        if np.any(is_cpu):
            add(window[is_cpu], rows.rows(cgid[is_cpu]) + off, cpu_ns=ns[is_cpu], counts=counts[is_cpu])
        if np.any(is_given):
            # Softirq time run inside a row's cpu_ns for other rows' ports.
            add(window[is_given], rows.rows(cgid[is_given] & ~np.uint64(GIVEN_BIT)) + off,
                softirq_given_ns=ns[is_given], counts=counts[is_given])
        if np.any(is_port) and ctx.port_row is not None:
            port = (cgid[is_port] & np.uint64(0xFFFFFFFF)).astype(np.int64)
            add(window[is_port], ctx.port_row[port] + off, softirq_ns=ns[is_port], counts=counts[is_port])
        return int(ns[~is_given].sum() - ns[is_given].sum())

    keep = d.window >= ctx.first_window
    if keep.all():
        warmup = 0
        charged(d.window, d.cgid, d.ns, d.counts, 0)
    else:
        warmup = int(records.distinct(d.window[~keep]).size)
        charged(d.window[keep], d.cgid[keep], d.ns[keep], d.counts[keep], 0)
    budget = ctx.late_budget_ns
    if len(d.late_cgid) and ctx.closed_window >= ctx.first_window:
        # Late: billed to its row in the newest window closed, as a record of its own.
        budget += charged(np.full(len(d.late_cgid), ctx.closed_window, np.int64), d.late_cgid, d.late_ns,
                          d.late_counts, rows.nrows)
    if nd is not None and len(nd) and ctx.port_row is not None:
        k = nd.window >= ctx.first_window
        add(nd.window[k], ctx.port_row[nd.port[k]], **_directions(nd.kind[k] == KIND_RX, nd.packets[k],
            nd.bytes[k], nd.wire_packets[k], nd.wire_bytes[k]))
    if nd is not None and len(nd.late_port) and ctx.port_row is not None and ctx.closed_window >= ctx.first_window:
        # Late packets: to the port owner's late record in the newest window closed.
        add(np.full(len(nd.late_kind), ctx.closed_window, np.int64), ctx.port_row[nd.late_port] + rows.nrows,
            **_directions(nd.late_kind == KIND_RX, nd.late_packets, nd.late_bytes, nd.late_wire_packets,
                          nd.late_wire_bytes))
    if vf:
        # Polled per drain: the deltas land in the newest window closed.
        vrows = np.fromiter(vf, np.int64, len(vf))
        v = np.array(list(vf.values()), np.int64).reshape(len(vf), 4)
        add(np.full(len(vf), ctx.closed_window, np.int64), vrows, vf_rx_packets=v[:, 0], vf_rx_bytes=v[:, 1],
            vf_tx_packets=v[:, 2], vf_tx_bytes=v[:, 3])
    spill = dict(ctx.spill)
    if len(d.spill_cgid):
        for row, ns in zip(rows.rows(d.spill_cgid).tolist(), d.spill_ns.tolist(), strict=True):
            spill[row] = spill.get(row, 0) + int(ns)
    spill = _settle(parts, {r: v for r, v in spill.items() if v}, rows.nrows, ctx, add)
    if budget > 0 and ctx.ncpu:
        budget = _late_rows(parts, budget, rows.nrows, ctx, add)
    if not parts:
        empty = np.zeros(0, np.int64)
        return Built(records.Columns(0, {}), empty, empty, warmup, budget, spill)
    window = np.concatenate([p[0] for p in parts])
    row = np.concatenate([p[1] for p in parts])
    names = [name for name in (*SUMS, *_COUNT[:ncount]) if any(name in p[2] for p in parts)]
    vals = np.empty((len(window), len(names)), np.int64)
    for j, name in enumerate(names):
        vals[:, j] = np.concatenate([p[2].get(name, np.zeros(len(p[0]), np.int64)) for p in parts])
    w0 = int(window.min())
    first, g = records.group_sums((window - w0) * (2 * rows.nrows) + row, vals)
    sums = dict(zip(names, g.T))
    g_row = row[first]
    late = g_row >= rows.nrows
    g_row = g_row - np.where(late, rows.nrows, 0)
    out = _records(window[first], g_row, sums, ncount, rows, ctx, late)
    return Built(out, window[first], g_row, warmup, budget, spill)


def _directions(rx: np.ndarray, packets: np.ndarray, nbytes: np.ndarray, wire_packets: np.ndarray,
                wire_bytes: np.ndarray) -> dict[str, np.ndarray]:
    """A port drain's figures as the rx_* / tx_* sums (a cell is one direction)."""
    out = {}
    for name, v in (("packets", packets), ("bytes", nbytes), ("wire_packets", wire_packets), ("wire_bytes", wire_bytes)):
        out[f"rx_{name}"] = np.where(rx, v, 0)
        out[f"tx_{name}"] = np.where(rx, 0, v)
    return out


def _row_times(parts: list[_Part], rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """cpu_ns of each of ``rows`` (distinct) in each window lo..hi of the parts,
    one line per row, in one pass."""
    index = np.full(int(rows.max()) + 1, -1, np.int64)
    index[rows] = np.arange(len(rows))
    have = np.zeros((len(rows), hi - lo + 1), np.int64)
    for window, r, cols in parts:
        if "cpu_ns" not in cols:
            continue
        pick = np.where(r < index.size, index[np.minimum(r, index.size - 1)], -1)
        inside = (pick >= 0) & (window >= lo) & (window <= hi)
        np.add.at(have, (pick[inside], window[inside] - lo), cols["cpu_ns"][inside])
    return have


def _greedy(avail: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per line of ``avail``, take up to its ``want`` from the line's start on."""
    avail = np.maximum(avail, 0)
    before = np.cumsum(avail, axis=1) - avail
    return np.minimum(avail, np.maximum(want[:, None] - before, 0))


def _settle(parts: list[_Part], spill: dict[int, int], nrows: int,
            ctx: Context, add: Any) -> dict[int, int]:
    """Settle kernel/clock differences the kernel had no per-CPU entry for
    (docs/architecture.md, "CPU time"): a row owed time gets it out of idle's,
    else sched's, time in this drain's windows; a row that owes gives its own
    time to sched (keeping 1 ns a window, so its records stay). Newest
    windows first, a window's own records before the late records billed in
    it (moved between late records, so the late rows still name every late
    ns). Each window still adds up. Returns what is left to settle.

    Rows owed time share idle's and sched's time in row order: laid end to
    end, those donors' time is cut at the running sum of what each row is
    owed, so one pass settles them all.
    """
    lo, hi = max(ctx.taken_from, ctx.first_window), ctx.closed_window
    if not spill or hi < lo:
        return spill
    nw = hi - lo + 1
    # Each donor's time, newest window first: line k is (donor, plane) below.
    newest = np.arange(hi, lo - 1, -1, dtype=np.int64)
    keys = np.array(sorted(spill), np.int64)
    owed = np.array([spill[r] for r in keys.tolist()], np.int64)
    left: dict[int, int] = {}
    gains: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    pos = owed > 0
    donors = np.array([IDLE_ROW, SCHED_ROW], np.int64)
    lines = np.concatenate([donors, donors + nrows])  # plane 0 first, then the late plane
    owing = keys[~pos]
    owing_lines = np.concatenate([owing, owing + nrows])
    need = records.distinct(np.concatenate([lines if pos.any() else lines[:0], owing_lines]))
    have = _row_times(parts, need, lo, hi)[:, ::-1]  # newest window first
    line_of = {int(r): i for i, r in enumerate(need.tolist())}
    if pos.any():
        # The donors' time laid end to end, in the order it is taken.
        pool = np.concatenate([have[line_of[int(d)]] for d in lines.tolist()])
        end = np.cumsum(pool)
        cut = np.cumsum(owed[pos])
        # Pieces between consecutive cuts of either kind: each is one donor
        # cell's time going to one row.
        at = records.distinct(np.concatenate([[0], end, cut]))
        at = at[at <= min(int(end[-1]), int(cut[-1]))]
        size = np.diff(at)
        j = np.searchsorted(end, at[:-1], side="right")
        i = np.searchsorted(cut, at[:-1], side="right")
        line = lines[j // nw]
        plane = np.where(line >= nrows, nrows, 0)
        w = newest[j % nw]
        gains += [(w, keys[pos][i] + plane, size), (w, line, -size)]
        got = np.zeros(len(cut), np.int64)
        np.add.at(got, i, size)
        left.update({int(r): int(v) for r, v in zip(keys[pos], owed[pos] - got) if v})
    if len(owing):
        # Each owing row's own time, a window's own records then its late ones, less 1 ns a window.
        own = np.concatenate([have[[line_of[int(r)] for r in owing.tolist()]],
                              have[[line_of[int(r) + nrows] for r in owing.tolist()]]], axis=1) - 1
        take = _greedy(own, -owed[~pos])
        i, j = np.nonzero(take)
        plane = np.where(j >= nw, nrows, 0)
        w = newest[j % nw]
        gains += [(w, SCHED_ROW + plane, take[i, j]), (w, owing[i] + plane, -take[i, j])]
        got = take.sum(axis=1)
        left.update({int(r): -int(v) for r, v in zip(owing, -owed[~pos] - got) if v})
    if gains:
        add(np.concatenate([g[0] for g in gains]), np.concatenate([g[1] for g in gains]),
            cpu_ns=np.concatenate([g[2] for g in gains]))
    return left


def _late_rows(parts: list[_Part], budget: int, nrows: int, ctx: Context,
               add: Any) -> int:
    """Give each window this drain closed that is short of ncpu x W a ``late``
    row for what it is short, out of ``budget`` (late time billed in other
    windows, not yet matched), in window order; returns what is left.

    A window still short after that is a conservation violation, as before.
    """
    lo, hi = max(ctx.taken_from, ctx.first_window), ctx.closed_window
    if hi < lo:
        return budget
    have = np.zeros(hi - lo + 1, np.int64)
    for window, row, cols in parts:
        inside = (row < nrows) & (window >= lo) & (window <= hi)
        for name, sign in (("cpu_ns", 1), ("softirq_ns", 1), ("softirq_given_ns", -1)):
            if name in cols:
                np.add.at(have, window[inside] - lo, sign * cols[name][inside])
    short = np.maximum(ctx.ncpu * ctx.window_ns - have, 0)
    fill = np.minimum(short, np.maximum(budget - (np.cumsum(short) - short), 0))
    idx = np.flatnonzero(fill)
    if len(idx):
        add(idx + lo, np.full(len(idx), LATE_ROW, np.int64), cpu_ns=fill[idx])
    return budget - int(fill.sum())


def _records(g_window: np.ndarray, g_row: np.ndarray, sums: dict[str, np.ndarray], ncount: int, rows: Rows,
             ctx: Context, late: np.ndarray) -> records.Columns:
    """Records' columns from per-(window, row) sums (``sums``: the :data:`SUMS` and
    counter columns any entry had; the others are 0); ``late`` marks records
    of late time (cpu_source ``late``)."""
    n = len(g_row)
    zero = np.zeros(n, np.int64)

    def g(name: str) -> np.ndarray:
        return sums.get(name, zero)

    g_ns = g("cpu_ns")
    plan = ctx.plan
    tenants, names, cgroup_ids = rows.columns()
    cols: dict[str, Any] = {
        "window_start_ns": g_window * ctx.window_ns + ctx.offset_ns,
        "window_ms": ctx.window_ns // 1_000_000,
        "host": ctx.host,
        "tenant": tenants[g_row],
        "compartment": names[g_row],
        "cgroup_id": cgroup_ids[g_row],
        "cpu_ns": g_ns,
        "seq": np.arange(ctx.first_seq, ctx.first_seq + n),
        # host's tasks are kernel-charged like any compartment's; idle, sched, steal are clock time.
        "cpu_source": np.where(late, _LATE, np.where((g_row >= IDLE_ROW) & (g_row < PSEUDO_ROWS), _CLOCK,
                                                     _KERNEL if ctx.kernel_charge else _CLOCK)),
        "counters_source": plan.source,
    }
    for i, field in enumerate(plan.events):
        cols[field] = g(_COUNT[i])
    if "cycles" in plan.estimated and plan.hz:
        # Softirq time spent for the compartment runs cycles too (and time given away does not).
        cycles = (g_ns + g("softirq_ns") - g("softirq_given_ns")) * plan.hz // 1_000_000_000
        # Idle ran none; the late row's time is billed (with its cycles) in another window.
        cycles[(g_row == IDLE_ROW) | ((g_row == LATE_ROW) & ~late)] = records.NULL
        cols["cycles"] = cycles
    if ctx.row_has_ports is not None:
        # Net fields are measured (0 when quiet) for rows with ports, absent for the rest.
        has_ports = _flag(ctx.row_has_ports, g_row)
        for name in _NET_SUMS:
            cols[name] = np.where(has_ports, g(name), records.NULL)
        cols["net_source"] = np.where(has_ports, _TC, 0)
        # Any row's time can be interrupted by packet work for others' ports.
        cols["softirq_given_ns"] = g("softirq_given_ns")
    if ctx.row_has_vfs is not None:
        has_vfs = _flag(ctx.row_has_vfs, g_row)
        for name in VF_FIELDS:
            cols[name] = np.where(has_vfs, g(name), records.NULL)
        cols["vf_source"] = np.where(has_vfs, records.code(ctx.vf_source), 0)
    return records.Columns(n, cols)


def _flag(per_row: np.ndarray, row: np.ndarray) -> np.ndarray:
    """``per_row[row]``, False for rows added after the flags were made (a reload)."""
    out = np.zeros(len(row), bool)
    inside = row < len(per_row)
    out[inside] = per_row[row[inside]]
    return out
