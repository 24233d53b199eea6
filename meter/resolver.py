"""Resolving cgroup ids to record rows: ``host``, ``idle``, then compartments.

Row 0 is ``host`` (tasks in no compartment), row 1 is ``idle`` (the idle
task), row 2 ``sched`` (clock time the kernel charged to no task), row 3
``steal`` (time the hypervisor took), row 4 ``unattributed`` (usage of
cgroups the kernel's ring had no row left for), row 5 ``late`` (a window's
time that arrived too late for it, billed in a later window), rows 6.. are
compartments. A cgroup id is resolved once and
remembered, so a compartment whose cgroup is removed while metering keeps
its usage. Under discovery (``--cgroup-root`` or ``[[discover]]`` rules), an
unknown id makes the resolver look again (``Topology.refresh``), and new
compartments are appended as new rows (docs/architecture.md, "Discovery").
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .bpfabi import IDLE_CGID, SCHED_CGID, STEAL_CGID, UNATTRIBUTED_CGID
from .cgroup import CgroupIndex, DirWatch, cgroup_id
from .errors import CgroupError
from .records import NAMES, distinct
from .sources.base import KernelCompartments
from .topology import HOST, IDLE, LATE, SCHED, STEAL, UNATTRIBUTED, Compartment, Topology

__all__ = ["HOST_ROW", "IDLE_ROW", "LATE_ROW", "PSEUDO_ROWS", "Resolver", "SCHED_ROW", "STEAL_ROW",
           "UNATTRIBUTED_ROW"]

HOST_ROW = 0
IDLE_ROW = 1
SCHED_ROW = 2
STEAL_ROW = 3
UNATTRIBUTED_ROW = 4
LATE_ROW = 5
#: Rows that are meter's own, not compartments.
PSEUDO_ROWS = 6
#: The late row's cgroup id in records: none (no cgroup's, nor a kernel pseudo-id).
_NO_CGID = 0
_PSEUDO = {IDLE_CGID: IDLE_ROW, SCHED_CGID: SCHED_ROW, STEAL_CGID: STEAL_ROW, UNATTRIBUTED_CGID: UNATTRIBUTED_ROW}


class Resolver:
    """Vectorised cgroup id -> row mapping for a topology that may grow."""

    def __init__(self, topology: Topology, index: CgroupIndex | None = None) -> None:
        self.topology = topology
        self.index = index if index is not None else CgroupIndex(topology.mount)
        self.tenants: list[str] = [HOST, IDLE, SCHED, STEAL, UNATTRIBUTED, LATE]
        self.names: list[str] = [HOST, IDLE, SCHED, STEAL, UNATTRIBUTED, LATE]
        self.cgroup_ids: list[int] = [cgroup_id(topology.mount), IDLE_CGID, SCHED_CGID, STEAL_CGID,
                                      UNATTRIBUTED_CGID, _NO_CGID]
        self.compartments: list[Compartment | None] = [None] * PSEUDO_ROWS
        #: Wall-clock time (s) each row was made: its counters count from then.
        self.created: list[float] = [time.time()] * PSEUDO_ROWS
        self._rows: dict[int, int] = dict(_PSEUDO)
        self._table: _IdTable | None = None
        self._watch: DirWatch | None = None
        self._parents: tuple[Topology | None, frozenset[Path]] = (None, frozenset())
        self.unresolved = 0  # ids no scan could name (charged to host)
        #: Bumped whenever the compartments (and so their cgroup ids) change.
        self.generation = 0
        self._columns: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._add(topology.compartments)

    def row_of(self, tenant: str, name: str) -> int | None:
        """The row of compartment tenant/name, if it has one."""
        for i, c in enumerate(self.compartments):
            if c is not None and (c.tenant, c.name) == (tenant, name):
                return i
        return None

    def owned_interfaces(self) -> list[tuple[int, str]]:
        """(row, interface spec) of every interface a compartment owns, in topology order."""
        rows = self._compartment_rows()
        return [(rows[(c.tenant, c.name)], spec) for c in self.topology.compartments for spec in c.interfaces]

    def owned_vfs(self) -> list[tuple[int, str, int]]:
        """(row, pf, vf) of every VF a compartment owns."""
        rows = self._compartment_rows()
        return [(rows[(c.tenant, c.name)], v.pf, v.vf) for c in self.topology.compartments for v in c.vfs]

    def _compartment_rows(self) -> dict[tuple[str, str], int]:
        return {(c.tenant, c.name): i for i, c in enumerate(self.compartments) if c is not None}

    def update(self, topology: Topology) -> None:
        """Follow a new topology: rows of kept compartments stay, new ones are
        appended, removed ones keep their row but receive nothing more."""
        self.topology = topology
        self._rows = dict(_PSEUDO)
        self._add(topology.compartments)

    def _add(self, compartments: tuple[Compartment, ...]) -> None:
        rows = self._compartment_rows()
        owners = []
        for c in compartments:
            row = rows.get((c.tenant, c.name))
            if row is None:
                row = len(self.compartments)
                self.compartments.append(c)
                self.created.append(time.time())
                self.tenants.append(c.tenant)
                self.names.append(c.name)
                try:
                    self.cgroup_ids.append(cgroup_id(c.cgroup))
                except CgroupError:
                    self.cgroup_ids.append(0)  # checked by Topology.require_cgroups
            owners.append((row, str(c.cgroup).rstrip("/") + "/"))
        # Discovery only ever grows: keep owning what was found before.
        owners += [(i, str(c.cgroup).rstrip("/") + "/") for i, c in enumerate(self.compartments)
                   if c is not None and c.discovered and (i, str(c.cgroup).rstrip("/") + "/") not in owners]
        # Deepest first: a nested compartment owns its subtree.
        self._owners = sorted(owners, key=lambda item: len(item[1]), reverse=True)
        # A compartment's own cgroup id is its row (the kernel charges
        # compartments by that id), even once the directory is gone.
        for row, _prefix in owners:
            if self.cgroup_ids[row]:
                self._rows[self.cgroup_ids[row]] = row
        # What the kernel charges tasks below no compartment to (kernel_compartments).
        self._rows.setdefault(self.cgroup_ids[HOST_ROW], HOST_ROW)
        self.generation += 1

    def present(self) -> list[bool]:
        """Per row: whether it can still receive usage (meter's own rows, and
        compartments of the current topology whose cgroup exists)."""
        # The current topology's cgroup: a restarted VM's row is its new scope's.
        current = {(c.tenant, c.name): c.cgroup for c in self.topology.compartments}
        return [c is None or ((c.tenant, c.name) in current and current[(c.tenant, c.name)].is_dir())
                for c in self.compartments]

    def close(self) -> None:
        """Stop watching the compartments' directories (open again by the next refresh_ids)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def refresh_ids(self) -> None:
        """Follow compartments whose cgroup was removed and made again under the
        same path (a restarted systemd service or container): a new id. The
        kernel charges a task below no listed id to the host, so a stale id
        would bill the compartment's new cgroup to the host without a word.
        The old id keeps its row (usage charged to it is still the
        compartment's)."""
        if self._parents[0] is not self.topology:  # the directories to watch: once per topology
            self._parents = (self.topology, frozenset(c.cgroup.parent for c in self.topology.compartments))
        parents = self._parents[1]
        if self._watch is not None and self._watch.dirs == parents and not self._watch.changed():
            return  # no directory made or removed beside any compartment's since the last look
        # Watch afresh first (a removed directory's watch is gone with it), then look.
        self.close()
        self._watch = DirWatch(parents)
        self._watch.changed()
        rows = self._compartment_rows()
        changed = False
        for c in self.topology.compartments:
            row = rows[(c.tenant, c.name)]
            try:
                cgid = cgroup_id(c.cgroup)
            except CgroupError:
                continue  # gone for now: its old id keeps its row
            if cgid != self.cgroup_ids[row]:
                self.cgroup_ids[row] = cgid
                self._rows[cgid] = row
                changed = True
        if changed:
            self.generation += 1

    def kernel_compartments(self) -> KernelCompartments:
        """What the kernel should charge usage to: every compartment (the current
        topology's, and under discovery every one found so far) by cgroup level;
        below a discovery root the cgroup a rule would name; else the host."""
        mount = self.topology.mount
        levels = {}
        complete = True
        for row, prefix in self._owners:
            cgid = self.cgroup_ids[row]
            try:
                levels[cgid] = len(Path(prefix).relative_to(mount).parts)
            except ValueError:
                complete = False  # outside the mount: only user space can name it
        levels.pop(0, None)
        roots: dict[int, tuple[int, int]] = {}
        for base, depth in self.topology.discovery_roots():
            try:
                cgid, level = cgroup_id(base), len(base.relative_to(mount).parts)
            except (CgroupError, ValueError):
                complete = False  # gone since: user space names what it held
                continue
            roots[cgid] = (level, max(depth, roots.get(cgid, (0, 0))[1]))
        return KernelCompartments(levels, other=self.cgroup_ids[HOST_ROW] if complete else 0, roots=roots)

    @property
    def nrows(self) -> int:
        return len(self.names)

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: its tenant's and its name's codes (``records.NAMES``) and
        its cgroup id, as arrays for the records (made again only when the
        rows change: a drain's records gather from them)."""
        key = (len(self.names), self.generation)
        if self._columns is None or self._columns[0] != key:
            self._columns = key, (NAMES.codes(self.tenants), NAMES.codes(self.names),
                                  np.asarray(self.cgroup_ids, np.uint64))
        return self._columns[1]

    def _owner(self, path: Path) -> int:
        text = str(path).rstrip("/") + "/"
        for row, prefix in self._owners:
            if text.startswith(prefix):
                return row
        return HOST_ROW

    def rows(self, cgids: np.ndarray) -> np.ndarray:
        """Row of each cgroup id in ``cgids`` (a hash lookup per id, numpy-wide;
        an id met for the first time is resolved by path once)."""
        cgids = np.asarray(cgids, np.uint64)
        if self._table is None or self._table.source != self._rows:
            self._table = _IdTable(self._rows)
        out = self._table.lookup(cgids)
        new = out < 0
        if not new.any():
            return out
        unknown = distinct(cgids[new]).tolist()
        if self.topology.discovers:
            fresh = self.topology.refresh()
            if fresh.compartments != self.topology.compartments:
                # Only then: a new generation makes every CPU resolve again in the kernel.
                self.topology = fresh
                self._add(fresh.compartments)
        for cgid, path in self.index.resolve([c for c in unknown if c not in self._rows]).items():
            if path is None:
                self.unresolved += 1
                self._rows[cgid] = HOST_ROW
            else:
                self._rows[cgid] = self._owner(path)
        self._table = _IdTable(self._rows)
        out[new] = self._table.lookup(cgids[new])
        return out


class _IdTable:
    """cgroup id -> row of the ids in ``source``: an open-addressing hash table
    (Fibonacci hashing, linear probing, at most half full) looked up for a
    whole array at once.

    A drain holds one entry per (CPU, window, cgroup): sorting them to find
    each id's row cost ~60 ns an entry; this costs ~15.
    """

    EMPTY = np.uint64(2**64 - 1)  # not a cgroup id (those are inode numbers)
    _GOLDEN = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, source: dict[int, int]) -> None:
        self.source = dict(source)
        bits = 6
        while (1 << bits) < 2 * len(source):
            bits += 1
        self.shift = np.uint64(64 - bits)
        self.mask = np.uint64((1 << bits) - 1)
        self.ids = np.full(1 << bits, self.EMPTY, np.uint64)
        self.row = np.full(1 << bits, -1, np.int64)
        keys = np.fromiter(source, np.uint64, len(source))
        for cgid, slot, row in zip(keys.tolist(), self._slots(keys).tolist(), source.values(), strict=True):
            while self.ids[slot] != self.EMPTY:
                slot = (slot + 1) & int(self.mask)
            self.ids[slot], self.row[slot] = cgid, row

    def _slots(self, cgids: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (cgids * self._GOLDEN) >> self.shift

    def lookup(self, cgids: np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the table does not hold it."""
        out = np.full(len(cgids), -1, np.int64)
        slot = self._slots(cgids)
        got = self.ids[slot]
        hit = got == cgids
        out[hit] = self.row[slot[hit]]
        pending = np.flatnonzero(~hit & (got != self.EMPTY))
        while len(pending):  # probing on: rare at half full
            slot[pending] = (slot[pending] + np.uint64(1)) & self.mask
            at = slot[pending]
            got = self.ids[at]
            hit = got == cgids[pending]
            out[pending[hit]] = self.row[at[hit]]
            pending = pending[~hit & (got != self.EMPTY)]
        return out
