"""The meter's running books: what each row and port has used since open, and
the energy measured but not yet split over records.

Per-row state lives here in one object that grows with the rows (a reload
or discovery adds rows; every per-row array grows together, so a new row
can never index past one of them). The engine adds every batch it builds;
exporters and agents read :meth:`Books.totals`. See docs/architecture.md,
"Records".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import records
from .attribution import attribute_energy
from .bpfabi import KIND_RX
from .perf import CounterPlan
from .resolver import IDLE_ROW
from .sources.energy import EnergyReader, ModelReader
from .sources.net import NetDrain, Port

__all__ = ["ENERGY_DOMAINS", "Books", "EnergyBooks"]

#: Energy domains apportioned to records (cores/uncore are parts of the package).
ENERGY_DOMAINS = ("package", "dram")
#: The counters are adjacent in a record: a slice of the batch's matrix is a view, not a copy.
_COUNTERS = slice(records.COLUMN[records.COUNTER_COLUMNS[0]], records.COLUMN[records.COUNTER_COLUMNS[-1]] + 1)
assert _COUNTERS.stop - _COUNTERS.start == len(records.COUNTER_COLUMNS)
_PORT_FIELDS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                "rx_wire_packets", "rx_wire_bytes", "tx_wire_packets", "tx_wire_bytes")


class Books:
    """Per-row counter and energy totals, per-port packet totals."""

    def __init__(self, nports: int = 0) -> None:
        ncols = len(records.COUNTER_COLUMNS)
        self.tot = np.zeros((0, ncols), np.int64)
        self.avail = np.zeros((0, ncols), bool)
        self.energy = np.zeros((0, len(ENERGY_DOMAINS)), np.int64)
        self.ports = np.zeros((nports, len(_PORT_FIELDS)), np.int64)

    def grow(self, nrows: int) -> None:
        """Make room for rows up to ``nrows`` (all per-row arrays together)."""
        extra = nrows - len(self.tot)
        if extra > 0:
            self.tot = np.vstack([self.tot, np.zeros((extra, self.tot.shape[1]), np.int64)])
            self.avail = np.vstack([self.avail, np.zeros((extra, self.avail.shape[1]), bool)])
            self.energy = np.vstack([self.energy, np.zeros((extra, self.energy.shape[1]), np.int64)])

    def grow_ports(self, nports: int) -> None:
        """Make room for ports numbered up to ``nports``."""
        extra = nports - len(self.ports)
        if extra > 0:
            self.ports = np.vstack([self.ports, np.zeros((extra, self.ports.shape[1]), np.int64)])

    def add(self, out: np.ndarray | records.Columns, row: np.ndarray, nd: NetDrain | None,
            ranges: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Add a batch (records, or their :class:`records.Columns`, with their rows)
        and its packet drain; ``ranges``: the batch's :func:`records.column_ranges`,
        when the caller has them."""
        if len(out):
            self.grow(int(row.max()) + 1)
            # Which counters are measured, in every record or some: each column's range
            # (one pass over the batch for all of them); then each measured column
            # summed in place by row (np.add.at: exact, no sort).
            if ranges is None:
                ranges = records.ranges_of(out)
            lo, hi = (r[_COUNTERS] for r in ranges)
            for j in np.flatnonzero((lo != records.NULL) | (hi != records.NULL)).tolist():
                col = out[records.COUNTER_COLUMNS[j]]
                if lo[j] > records.NULL:  # no NULL below the least value: measured in every record
                    np.add.at(self.tot[:, j], row, col)
                    self.avail[row, j] = True
                else:
                    mine = col != records.NULL
                    np.add.at(self.tot[:, j], row[mine], col[mine])
                    self.avail[row[mine], j] = True
        if nd is not None:
            for port, kind, *figures in ((nd.port, nd.kind, nd.packets, nd.bytes, nd.wire_packets, nd.wire_bytes),
                                         (nd.late_port, nd.late_kind, nd.late_packets, nd.late_bytes,
                                          nd.late_wire_packets, nd.late_wire_bytes)):
                rx = kind == KIND_RX
                for name, values in zip(("packets", "bytes", "wire_packets", "wire_bytes"), figures, strict=True):
                    col = np.where(rx, _PORT_FIELDS.index(f"rx_{name}"), _PORT_FIELDS.index(f"tx_{name}"))
                    np.add.at(self.ports, (port, col), values)

    def add_energy(self, row: np.ndarray, domains: dict[str, np.ndarray]) -> None:
        if len(row):
            self.grow(int(row.max()) + 1)
        for i, domain in enumerate(ENERGY_DOMAINS):
            if domain in domains:
                np.add.at(self.energy[:, i], row, domains[domain])

    def copy(self) -> Books:
        c = Books()
        c.tot, c.avail, c.energy, c.ports = self.tot.copy(), self.avail.copy(), self.energy.copy(), self.ports.copy()
        return c

    def totals(self, names: list[tuple[str, str]], ports: list[Port], port_row: np.ndarray) -> list[dict[str, Any]]:
        """One dict per row: tenant, compartment, every counter field (None when
        never measured), energy per domain, and the row's ports' packet totals."""
        out = []
        for r, (tenant, name) in enumerate(names):
            d: dict[str, Any] = {"tenant": tenant, "compartment": name}
            inside = r < len(self.tot)
            for j, field in enumerate(records.COUNTER_COLUMNS):
                d[field] = int(self.tot[r, j]) if inside and self.avail[r, j] else None
            d["energy_uj_by_domain"] = (
                {dom: int(self.energy[r, i]) for i, dom in enumerate(ENERGY_DOMAINS) if self.energy[r, i]}
                if inside else {})
            d["ports"] = {p.label: dict(zip(_PORT_FIELDS, map(int, self.ports[p.index])))
                          for p in ports if port_row[p.index] == r}
            out.append(d)
        return out


class EnergyBooks:
    """Energy from a reader (or the model), split over each drain's records exactly.

    A measuring reader's energy since the last drain is split over the
    drain's records (carried over drains with none); the model's is
    computed per window from that window's utilisation.
    """

    def __init__(self, reader: EnergyReader | None, plan: CounterPlan, policy: str) -> None:
        self.reader = reader
        self.plan = plan
        self.policy = policy
        self.carry = {"package": 0, "dram": 0}
        self.measured = self.attributed = self.pending = 0

    def apportion(self, out: np.ndarray | records.Columns, window: np.ndarray, row: np.ndarray, ncpu: int,
                  window_ns: int) -> dict[str, np.ndarray]:
        """Fill ``out``'s energy_uj (and energy_source); returns the per-domain split."""
        reader = self.reader
        if reader is None:
            return {}
        idle = row == IDLE_ROW
        if isinstance(reader, ModelReader):
            # Per window: the model's energy for that window's utilisation.
            uniq, groups = records.unique_ints(window)
            busy = np.bincount(groups, weights=np.where(idle, 0, out["cpu_ns"]), minlength=len(uniq))
            package = reader.window_energy(busy, ncpu, window_ns)
            dram = None
            self.measured += int(package.sum())
        else:
            # cores/uncore are parts of the package; psys stands in for a missing package.
            got = reader.read()
            pkg, dram_uj = got.get("package", got.get("psys", 0)), got.get("dram", 0)
            self.carry["package"] += pkg
            self.carry["dram"] += dram_uj
            self.measured += pkg + dram_uj
            if len(out) == 0:
                self.pending = self.carry["package"] + self.carry["dram"]
                return {}
            groups = np.zeros(len(out), np.int64)
            package = np.array([self.carry["package"]], np.int64)
            dram = np.array([self.carry["dram"]], np.int64)
            self.carry = {"package": 0, "dram": 0}
        if len(out) == 0:
            return {}
        domains: dict[str, np.ndarray] = {}
        energy = attribute_energy(
            out, groups, package, dram, idle=idle,
            cycles_measured="cycles" in self.plan.events and "cycles" not in self.plan.estimated,
            misses_measured="cache_misses" in self.plan.events, policy=self.policy, by_domain=domains)
        out["energy_uj"] = energy
        out["energy_source"] = records.code(reader.source)
        self.attributed += int(energy.sum())
        self.pending = 0
        return domains
