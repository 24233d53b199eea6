"""Ports: which interfaces a meter counts, each one's number and owner, as they come and go.

A port is an interface a compartment owns: listed in the topology
(``interfaces``), or on the bridges of its Open vSwitch (``ovsdb``,
followed live by :class:`~meter.sources.ovsdb.OvsdbPorts`). Each port gets
a number once, for the meter's life: the kernel counts its packets under
that number, the books total them under it, and a port that is removed
keeps its number and its counts (one added again by the same owner gets
its old number back). Numbers are bounded by the capacity the kernel's
maps were sized for at open (docs/architecture.md, "Ports that come and go").
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .errors import MeterError
from .sources.net import Port, parse_port
from .sources.ovsdb import OvsdbPorts, vswitchd_netns
from .topology import Compartment

__all__ = ["PORT_ROOM", "Ports"]

log = logging.getLogger("meter")

#: Port numbers kept free at open for ports added while metering (a reload,
#: a vswitch's new port), when the meter counts packets at all.
PORT_ROOM = 64


class _Watch:
    """One compartment's Open vSwitch database and the namespace of its interfaces."""

    def __init__(self, comp: Compartment) -> None:
        assert comp.ovsdb is not None
        self.address = comp.ovsdb
        self.ports = OvsdbPorts(comp.ovsdb)
        self.netns = comp.ovsdb_netns
        self.named = comp.ovsdb_netns is not None
        self.cgroup = comp.cgroup

    def connect(self) -> None:
        try:
            self.ports.connect()
        except OSError as err:
            raise MeterError(f"cannot read the Open vSwitch database {self.address} ({err.strerror or err}): "
                             "start its ovsdb-server, or fix ovsdb in the topology") from None

    def specs(self) -> list[str]:
        """The bridges' kernel interfaces as port specs. Unless named, their
        namespace is looked up again each time (only when ports may have
        changed): an ovs-vswitchd started after meter, or restarted
        elsewhere, is followed."""
        if not self.named:
            self.netns = vswitchd_netns(self.cgroup)
        return [f"{self.netns}:{name}" if self.netns else name for name in sorted(self.ports.names)]


class Ports:
    """Every port a meter has numbered, the ones counted now, and the databases followed."""

    def __init__(self) -> None:
        self.capacity = 0
        #: Every port numbered so far, in number order.
        self.known: list[Port] = []
        #: Each port's owner row, by number.
        self.rows: list[int] = []
        self._number: dict[tuple[int, str], int] = {}
        self.active: set[int] = set()
        self._watches: dict[tuple[str, str], _Watch] = {}
        self._full_said: set[tuple[int, str]] = set()
        self._overlap_said: set[tuple[str, int]] = set()

    # -- Open vSwitch databases --------------------------------------------------------------

    def follow(self, compartments: tuple[Compartment, ...], *, strict: bool) -> None:
        """Follow the databases of ``compartments`` that name one (and drop the
        others'). A database that cannot be read is an error (``strict``:
        at open), else a warning (a reload keeps the rest)."""
        want = {(c.tenant, c.name): c for c in compartments if c.ovsdb}
        for key in list(self._watches):
            if key not in want or want[key].ovsdb != self._watches[key].address:
                self._watches.pop(key).ports.close()
        for key, comp in want.items():
            if key in self._watches:
                continue
            watch = _Watch(comp)
            try:
                watch.connect()
            except MeterError as err:
                if strict:
                    self.close()
                    raise
                log.warning("meter: %s; compartment %s/%s keeps its other ports", err, *key)
                continue
            self._watches[key] = watch

    def poll(self) -> bool:
        """Read what the databases sent (never blocks): True when a bridge's ports changed."""
        changed = False
        for watch in self._watches.values():
            changed |= watch.ports.poll()
        return changed

    def close(self) -> None:
        for watch in self._watches.values():
            watch.ports.close()
        self._watches.clear()

    # -- which ports ------------------------------------------------------------------------

    def wanted(self, resolver: Any) -> list[tuple[int, str]]:
        """(row, spec) of every port the compartments own now: listed ones,
        then each database's kernel interfaces (an interface both listed and
        on a bridge counts once, for the listing)."""
        out = list(resolver.owned_interfaces())
        taken = dict((spec, row) for row, spec in out)
        for (tenant, name), watch in self._watches.items():
            row = resolver.row_of(tenant, name)
            if row is None:
                continue
            for spec in watch.specs():
                if spec not in taken:
                    taken[spec] = row
                    out.append((row, spec))
                elif taken[spec] != row and (spec, row) not in self._overlap_said:
                    self._overlap_said.add((spec, row))
                    log.warning("meter: interface %s is on %s/%s's Open vSwitch but belongs to %s/%s (listed, or "
                                "on another's bridge first): billed to the latter", spec, tenant, name,
                                resolver.tenants[taken[spec]], resolver.names[taken[spec]])
        return out

    def plan(self, wanted: list[tuple[int, str]]) -> tuple[list[Port], list[Port]]:
        """Number the new ports among ``wanted`` (within the capacity: the rest
        are warned about once) and make them the active set: (added, removed)."""
        now: set[int] = set()
        added = []
        for row, spec in wanted:
            key = (row, spec)
            number = self._number.get(key)
            if number is None:
                if len(self.known) >= self.capacity:
                    if key not in self._full_said:
                        self._full_said.add(key)
                        log.warning("meter: interface %s not metered: the %d port numbers this meter was started "
                                    "with are taken; restart meter to meter it", spec, self.capacity)
                    continue
                number = len(self.known)
                self._number[key] = number
                self.known.append(parse_port(number, spec))
                self.rows.append(row)
            now.add(number)
            if number not in self.active:
                added.append(self.known[number])
        removed = [self.known[n] for n in sorted(self.active - now)]
        self.active = now
        return added, removed

    def port_row(self) -> np.ndarray:
        """Each numbered port's owner row."""
        return np.asarray(self.rows, np.int64)
