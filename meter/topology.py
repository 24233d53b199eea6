"""Topology: which cgroups are compartments, and which tenant owns each.

Two ways in (README, "Topology"):

* a TOML file (``--config``)::

      window_ms = 1

      [[tenant]]
      name = "acme"

      [[tenant.compartment]]
      name = "vswitch"
      cgroup = "tenants/acme/vswitch"   # relative to the cgroup v2 mount, or absolute
      interfaces = ["veth-acme0", "acme-vm1:eth0"]
      vfs = [{ pf = "enp3s0f0", vf = 3 }]
      ovsdb = "unix:/run/acme/db.sock"  # and the ports on its Open vSwitch's bridges

* discovery (``--cgroup-root PATH``): each child cgroup of PATH is a
  compartment named after its directory, in a tenant of the same name;

* discovery rules in the file (``[[discover]]``, :mod:`meter.discovery`):
  the cgroups a manager (libvirt, systemd, Kubernetes, a container runtime)
  creates, named after what they hold.

Errors name the file, the line where it can be found, the key, and what is
wrong. A compartment owns its cgroup's whole subtree: a task in
``vswitch/threads`` is charged to ``vswitch``; the deepest compartment wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from . import cgroup as cgroupfs
from .discovery import RULE_KEYS, Rule
from .errors import CgroupError, ConfigError
from .host import load_toml
from .loop import DRAIN_PRIORITIES
from .sources.base import packet_time_problem
from .sources.ovsdb import address_problem

__all__ = [
    "discovered_name",
    "HOST",
    "IDLE",
    "LATE",
    "RESERVED",
    "SCHED",
    "STEAL",
    "UNATTRIBUTED",
    "NAME_MAX",
    "Compartment",
    "Topology",
    "VirtualFunction",
]

#: Pseudo-compartment for tasks in no configured compartment.
HOST = "host"
#: Pseudo-compartment for the idle task.
IDLE = "idle"
#: Pseudo-compartment for CPU time the kernel charged to no task (scheduler work).
SCHED = "sched"
#: Pseudo-compartment for time the hypervisor took from this host's CPUs.
STEAL = "steal"
#: Pseudo-compartment for usage of cgroups beyond what the kernel's ring holds.
UNATTRIBUTED = "unattributed"
#: Pseudo-compartment for a window's time that was billed in a later window (late).
LATE = "late"
#: Names of meter's own rows, which no tenant or compartment may take.
RESERVED = (HOST, IDLE, SCHED, STEAL, UNATTRIBUTED, LATE)
#: Longest tenant or compartment name (records store names at fixed width).
NAME_MAX = 64

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@+-]+$")
_TOP_KEYS = {"window_ms", "packet_time", "drain_priority", "tenant", "energy", "discover"}
log = logging.getLogger("meter")

#: Supported record widths, in ms (README, "Records"): 1 ms to one minute.
WINDOW_MS_MIN, WINDOW_MS_MAX = 1, 60_000


#: Discovered cgroups already warned about (a refresh re-reads the root).
_RENAMED: set[Path] = set()


def discovered_name(dirname: str, taken: Collection[str] = ()) -> str:
    """The compartment (and tenant) name of a discovered cgroup directory.

    A valid name is kept. Otherwise every byte outside ``[A-Za-z0-9_.:@+-]``
    becomes ``_xHH`` (its UTF-8 byte in hex, as systemd escapes unit names),
    a reserved name gets a ``cg_`` prefix, a name longer than NAME_MAX keeps
    its first 54 characters and a hash of the whole, and a name already
    ``taken`` gets the hash too: every directory gets a name, and only one.
    """
    name = dirname
    if not _NAME_RE.match(name):
        name = "".join(ch if _NAME_RE.match(ch) else "".join(f"_x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
                       for ch in name) or "_x"
    if name in RESERVED:
        name = "cg_" + name
    if len(name) > NAME_MAX or name in taken:
        digest = hashlib.sha1(dirname.encode("utf-8", "surrogateescape")).hexdigest()[:9]
        name = f"{name[:NAME_MAX - 10]}-{digest}"
    return name


def window_ms_problem(value: object) -> str | None:
    """Why ``value`` is not a supported window width (None: it is)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return f"must be a whole number of milliseconds, not {value!r}"
    if not WINDOW_MS_MIN <= value <= WINDOW_MS_MAX:
        return f"must be between {WINDOW_MS_MIN} and {WINDOW_MS_MAX} ms (one minute), not {value}"
    return None

_TENANT_KEYS = {"name", "compartment"}
_COMPARTMENT_KEYS = {"name", "cgroup", "interfaces", "vfs", "ovsdb", "ovsdb_netns"}
_VF_KEYS = {"pf", "vf"}


@dataclasses.dataclass(frozen=True)
class VirtualFunction:
    """An SR-IOV VF: physical function netdev and VF number."""

    pf: str
    vf: int


@dataclasses.dataclass(frozen=True)
class Compartment:
    """One metered compartment: a cgroup v2 subtree owned by a tenant."""

    tenant: str
    name: str
    cgroup: Path
    interfaces: tuple[str, ...] = ()
    vfs: tuple[VirtualFunction, ...] = ()
    #: Found by discovery (``--cgroup-root`` or a ``[[discover]]`` rule), not listed.
    discovered: bool = False
    #: The compartment's Open vSwitch database ("unix:PATH", "tcp:HOST:PORT"):
    #: the kernel interfaces on its bridges are its ports too, followed live.
    ovsdb: str | None = None
    #: The network namespace of those interfaces (None: its ovs-vswitchd's).
    ovsdb_netns: str | None = None


@dataclasses.dataclass(frozen=True)
class Topology:
    """The compartments to meter, and where they came from.

    ``source`` is the config file, or None for discovery; ``cgroup_root`` is
    the discovered parent, ``rules`` the file's discovery rules (discovery
    is redone by :meth:`refresh`).
    """

    compartments: tuple[Compartment, ...]
    mount: Path
    window_ms: int | None = None
    source: Path | None = None
    cgroup_root: Path | None = None
    energy: dict[str, Any] = dataclasses.field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    #: How packets sent outside a NET softirq are dated ("clock", "charge"; None: the default, "clock").
    packet_time: str | None = None
    #: How the drain loop's thread is scheduled (meter.loop: "realtime", "normal"; None: the default, "realtime").
    drain_priority: str | None = None

    # -- construction -------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, *, mount: str | Path | None = None) -> Topology:
        """Load a TOML topology; raises :class:`ConfigError` naming the problem."""
        path = Path(path)
        data, text = load_toml(path, "topology")
        mnt = Path(mount) if mount is not None else cgroupfs.find_mount()
        return _Parser(path, text, mnt).topology(data)

    @classmethod
    def discover(cls, root: str | Path | None = None, *, mount: str | Path | None = None) -> Topology:
        """Each child cgroup of ``root`` (default: the mount) is a compartment."""
        mnt = Path(mount) if mount is not None else cgroupfs.find_mount()
        base = _under_mount(mnt, root if root is not None else mnt)
        if not _below(mnt, base):
            raise CgroupError(f"cgroup root {root} is not below the cgroup v2 mount {mnt}: choose a cgroup there",
                              path=str(base))
        if not base.is_dir():
            raise CgroupError(f"cgroup root {base} does not exist: create it or choose another cgroup root",
                              path=str(base))
        comps = []
        children = sorted(p for p in base.iterdir() if p.is_dir())
        # Valid names are kept; escaped ones give way to them.
        taken = {c.name for c in children if discovered_name(c.name) == c.name}
        for child in children:
            name = child.name if child.name in taken else discovered_name(child.name, taken)
            taken.add(name)
            if name != child.name and child not in _RENAMED:
                _RENAMED.add(child)
                log.warning("meter: cgroup %s is compartment %r in records (its directory name is not a valid "
                            "compartment name)", child, name)
            comps.append(Compartment(tenant=name, name=name, cgroup=child, discovered=True))
        return cls(tuple(comps), mnt, cgroup_root=base)

    @property
    def discovers(self) -> bool:
        """Whether compartments may appear while metering (discovery or rules)."""
        return self.cgroup_root is not None or bool(self.rules)

    def discovery_roots(self) -> list[tuple[Path, int]]:
        """(root cgroup, depth) pairs: below each root, the cgroups ``depth``
        levels down are the ones discovery may name (``--cgroup-root``: its
        children; a rule's glob: the part before its first wildcard is the
        root, the rest the depth). A root not made yet stands as its nearest
        existing ancestor, deeper by as many levels."""
        pairs = [(self.cgroup_root, 1)] if self.cgroup_root is not None else []
        for rule in self.rules:
            for glob in rule.globs:
                parts = Path(glob).parts
                fixed = next((i for i, part in enumerate(parts) if any(ch in part for ch in "*?[")), len(parts))
                base, depth = rule.root.joinpath(*parts[:fixed]), len(parts) - fixed
                while base != self.mount and not base.is_dir() and _below(self.mount, base):
                    base, depth = base.parent, depth + 1
                pairs.append((base, depth))
        return [(base, depth) for base, depth in pairs if depth > 0]

    def refresh(self) -> Topology:
        """Discovery topologies re-read their root, rules their globs (a
        cgroup found before keeps its names); listed compartments are fixed."""
        if self.cgroup_root is not None:
            fresh = Topology.discover(self.cgroup_root, mount=self.mount)
            return dataclasses.replace(fresh, window_ms=self.window_ms, energy=self.energy, packet_time=self.packet_time,
                                       drain_priority=self.drain_priority)
        if not self.rules:
            return self
        listed = tuple(c for c in self.compartments if not c.discovered)
        found = _discover(self.rules, listed, self.compartments)
        return dataclasses.replace(self, compartments=listed + found)

    # -- queries ---------------------------------------------------------------

    @property
    def tenants(self) -> list[str]:
        """Tenant names in first-seen order."""
        return list(dict.fromkeys(c.tenant for c in self.compartments))

    def missing_cgroups(self) -> list[Compartment]:
        """Compartments whose cgroup directory does not exist now."""
        return [c for c in self.compartments if not c.cgroup.is_dir()]

    def require_cgroups(self) -> None:
        """Raise :class:`CgroupError` naming the first missing cgroup."""
        missing = self.missing_cgroups()
        if missing:
            c = missing[0]
            where = f" (from {self.source})" if self.source else ""
            raise CgroupError(
                f"cgroup {c.cgroup} of compartment {c.tenant}/{c.name}{where} does not exist: "
                "create it or fix the topology",
                path=str(c.cgroup),
            )

    def owner(self, path: Path) -> int | None:
        """Index of the compartment owning cgroup ``path`` (deepest wins)."""
        best, depth = None, -1
        for i, c in enumerate(self.compartments):
            if path == c.cgroup or c.cgroup in path.parents:
                d = len(c.cgroup.parts)
                if d > depth:
                    best, depth = i, d
        return best


def _discover(rules: tuple[Rule, ...], listed: tuple[Compartment, ...],
              before: tuple[Compartment, ...] = ()) -> tuple[Compartment, ...]:
    """The compartments ``rules`` find now. A cgroup already listed, or found
    by an earlier rule, is skipped; one found before keeps its names; names
    are made valid as for ``--cgroup-root`` (:func:`discovered_name`), and a
    (tenant, compartment) pair already taken gets a hash of the path."""
    taken = {c.cgroup for c in listed}
    known = {c.cgroup: c for c in before if c.discovered}
    pairs = {(c.tenant, c.name) for c in listed}
    out = []
    for rule in rules:
        for path in rule.cgroups():
            if path in taken:
                continue
            taken.add(path)
            comp = known.get(path)
            if comp is None:
                got = rule.names(path)
                if got is None:
                    continue
                tenant, name = discovered_name(got[0]), discovered_name(got[1])
                if (tenant, name) in pairs:
                    digest = hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:9]
                    name = f"{name[:NAME_MAX - 10]}-{digest}"
                comp = Compartment(tenant, name, path, discovered=True)
            pairs.add((comp.tenant, comp.name))
            out.append(comp)
    return tuple(out)


def _under_mount(mount: Path, value: str | Path) -> Path:
    """``value`` (relative to the mount, or absolute) with every ``..`` applied:
    what the below-the-mount checks see is where the path really leads."""
    p = Path(value)
    return Path(os.path.normpath(p if p.is_absolute() else mount / p))


def _below(mount: Path, path: Path) -> bool:
    return path == mount or mount in path.parents


#: A Linux interface name: 1-15 bytes, no '/', ':' or white space (dev_valid_name).
_IFNAME_RE = re.compile(r"[^/:\s]{1,15}")


def interface_problem(spec: str) -> str | None:
    """Why ``spec`` ("IFNAME" or "NETNS:IFNAME") names no interface (None: it may)."""
    netns, _, ifname = spec.rpartition(":")
    if not _IFNAME_RE.fullmatch(ifname) or ifname in (".", ".."):
        return f"{ifname!r} is not an interface name (1-15 characters, no '/', ':' or spaces)"
    if netns and ("/" in netns or netns in (".", "..") or "\0" in netns):
        return f"{netns!r} is not a network namespace name (a file name under /run/netns)"
    return None


class _Parser:
    """Validates the TOML data, naming the key and line of each problem."""

    def __init__(self, path: Path, text: str, mount: Path) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.mount = mount

    def fail(self, key: str, message: str, value: Any = None, *, last: bool = False) -> ConfigError:
        """A ConfigError for dotted ``key``, with the line where ``key = value`` stands."""
        return ConfigError(message, path=str(self.path), line=self._line(key, value, last), key=key)

    def fail_at(self, key: str, text: str, message: str) -> ConfigError:
        """A ConfigError for ``key`` at the last line (comments aside) holding ``text``."""
        hits = [i + 1 for i, line in enumerate(self.lines) if text in line.split("#", 1)[0]]
        return ConfigError(message, path=str(self.path), line=hits[-1] if hits else None, key=key)

    def _line(self, key: str, value: Any, last: bool) -> int | None:
        name = re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[-1])
        pattern = rf"(^|[\s{{,]){re.escape(name)}\s*="
        if isinstance(value, str):
            pattern += r"\s*" + re.escape(f'"{value}"')
        elif isinstance(value, int):
            pattern += rf"\s*{value}\b"
        pat = re.compile(pattern)
        hits = [i + 1 for i, line in enumerate(self.lines) if pat.search(line.split("#", 1)[0])]
        if not hits:
            return None
        if last:
            return hits[-1]
        return hits[0] if len(hits) == 1 else None

    def _keys(self, table: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                full = f"{where}.{key}" if where else key
                raise self.fail(full, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def _name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        if not _NAME_RE.match(value) or len(value) > NAME_MAX:
            raise self.fail(key, f"{value!r} must be at most {NAME_MAX} letters, digits or _.:@+-", value)
        if value in RESERVED:
            raise self.fail(key, f"{value!r} is reserved for meter's own {value} row", value)
        return value

    def topology(self, data: dict[str, Any]) -> Topology:
        # Over 60 lines on purpose: one pass down the file's structure, so that
        # every check sits where its key is and each error names key and line.
        self._keys(data, _TOP_KEYS, "")
        window_ms = data.get("window_ms")
        if window_ms is not None and (problem := window_ms_problem(window_ms)):
            raise self.fail("window_ms", problem)
        packet_time = data.get("packet_time")
        if packet_time is not None and (problem := packet_time_problem(packet_time)):
            raise self.fail("packet_time", problem, packet_time)
        drain_priority = data.get("drain_priority")
        if drain_priority is not None and drain_priority not in DRAIN_PRIORITIES:
            raise self.fail("drain_priority", f"must be one of {', '.join(DRAIN_PRIORITIES)}", drain_priority)
        energy = data.get("energy", {})
        if not isinstance(energy, dict):
            raise self.fail("energy", "must be a table")
        from .sources.energy import EnergySettings

        try:
            EnergySettings.from_table(energy, path=str(self.path))
        except ConfigError as err:
            raise self.fail(err.key or "energy", err.reason, energy.get((err.key or "").removeprefix("energy."))) from None
        except TypeError as err:
            raise self.fail("energy", str(err)) from None
        tenants = data.get("tenant", [])
        if not isinstance(tenants, list):
            raise self.fail("tenant", "must be an array of tables ([[tenant]])")
        comps: list[Compartment] = []
        seen_tenants: set[str] = set()
        seen_cgroups: dict[Path, str] = {}
        seen_ports: dict[tuple[str, str], str] = {}  # (netns, ifname) or ("vf:PF", "N") -> its owner
        for ti, tenant in enumerate(tenants):
            tkey = f"tenant[{ti}]"
            if not isinstance(tenant, dict):
                raise self.fail(tkey, "must be a table")
            self._keys(tenant, _TENANT_KEYS, tkey)
            if "name" not in tenant:
                raise self.fail(f"{tkey}.name", "is missing")
            tname = self._name(tenant["name"], f"{tkey}.name")
            if tname in seen_tenants:
                raise self.fail(f"{tkey}.name", f"tenant {tname!r} is defined twice", tname, last=True)
            seen_tenants.add(tname)
            seen_comps: set[str] = set()
            comps_raw = tenant.get("compartment", [])
            if not isinstance(comps_raw, list):
                raise self.fail(f"{tkey}.compartment", "must be [[tenant.compartment]] tables")
            for ci, comp in enumerate(comps_raw):
                ckey = f"{tkey}.compartment[{ci}]"
                if not isinstance(comp, dict):
                    raise self.fail(ckey, "must be a table")
                self._keys(comp, _COMPARTMENT_KEYS, ckey)
                for required in ("name", "cgroup"):
                    if required not in comp:
                        raise self.fail(f"{ckey}.{required}", "is missing")
                cname = self._name(comp["name"], f"{ckey}.name")
                if cname in seen_comps:
                    raise self.fail(f"{ckey}.name", f"compartment {cname!r} is defined twice in tenant {tname!r}", cname, last=True)
                seen_comps.add(cname)
                cg = comp["cgroup"]
                if not isinstance(cg, str) or not cg:
                    raise self.fail(f"{ckey}.cgroup", "must be a non-empty path string")
                cpath = _under_mount(self.mount, cg)
                if not _below(self.mount, cpath):
                    raise self.fail(f"{ckey}.cgroup", f"{cg!r} is not below the cgroup v2 mount {self.mount}", cg)
                if cpath in seen_cgroups:
                    raise self.fail(f"{ckey}.cgroup", f"{cg!r} is already compartment {seen_cgroups[cpath]}", cg, last=True)
                seen_cgroups[cpath] = f"{tname}/{cname}"
                ifaces = comp.get("interfaces", [])
                if not isinstance(ifaces, list) or not all(isinstance(i, str) and i for i in ifaces):
                    raise self.fail(f"{ckey}.interfaces", 'must be a list of interface names ("IFNAME" or "NETNS:IFNAME")')
                for spec in ifaces:
                    if problem := interface_problem(spec):
                        raise self.fail_at(f"{ckey}.interfaces", f'"{spec}"', problem)
                    # One interface, one owner: a second tc filter would take every packet from the first.
                    where = spec.rpartition(":")
                    owner = seen_ports.setdefault((where[0], where[2]), f"{tname}/{cname}")
                    if owner != f"{tname}/{cname}" or ifaces.count(spec) > 1:
                        raise self.fail_at(f"{ckey}.interfaces", f'"{spec}"',
                                           f"interface {spec!r} is already compartment {owner}'s")
                vfs = []
                raw_vfs = comp.get("vfs", [])
                if not isinstance(raw_vfs, list):
                    raise self.fail(f"{ckey}.vfs", "must be a list of { pf = NAME, vf = N } tables")
                for vi, vf in enumerate(raw_vfs):
                    vkey = f"{ckey}.vfs[{vi}]"
                    if not isinstance(vf, dict):
                        raise self.fail(vkey, "must be a table { pf = NAME, vf = N }")
                    self._keys(vf, _VF_KEYS, vkey)
                    pf, num = vf.get("pf"), vf.get("vf")
                    if not isinstance(pf, str) or not pf:
                        raise self.fail(f"{vkey}.pf", "must be the physical function's interface name", pf)
                    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
                        raise self.fail(f"{vkey}.vf", "must be a VF number >= 0", num)
                    vf_owner = seen_ports.setdefault((f"vf:{pf}", str(num)), f"{tname}/{cname}")
                    if vf_owner != f"{tname}/{cname}" or VirtualFunction(pf, num) in vfs:
                        raise self.fail(f"{vkey}.vf", f"VF {num} of {pf!r} is already compartment {vf_owner}'s", num,
                                        last=True)
                    vfs.append(VirtualFunction(pf, num))
                ovsdb, ovsdb_netns = comp.get("ovsdb"), comp.get("ovsdb_netns")
                if ovsdb is not None and (problem := address_problem(ovsdb) if isinstance(ovsdb, str) else
                                          'must be an OVSDB address ("unix:PATH" or "tcp:HOST:PORT")'):
                    raise self.fail(f"{ckey}.ovsdb", problem, ovsdb)
                if ovsdb_netns is not None and (ovsdb is None or not isinstance(ovsdb_netns, str)
                                                or interface_problem(f"{ovsdb_netns}:lo")):
                    raise self.fail(f"{ckey}.ovsdb_netns", "must be a network namespace name (under /run/netns), "
                                    "beside ovsdb", ovsdb_netns)
                comps.append(Compartment(tname, cname, cpath, tuple(ifaces), tuple(vfs), ovsdb=ovsdb,
                                         ovsdb_netns=ovsdb_netns))
        rules = self.rules(data.get("discover", []))
        found = _discover(rules, tuple(comps))
        return Topology(tuple(comps) + found, self.mount, window_ms, self.path, None, dict(energy), rules, packet_time,
                        drain_priority)

    def rules(self, raw: Any) -> tuple[Rule, ...]:
        if not isinstance(raw, list):
            raise self.fail("discover", "must be an array of tables ([[discover]])")
        out = []
        for i, table in enumerate(raw):
            key = f"discover[{i}]"
            if not isinstance(table, dict):
                raise self.fail(key, "must be a table")
            self._keys(table, RULE_KEYS, key)
            root_text = table.get("root", "")
            if not isinstance(root_text, str):
                raise self.fail(f"{key}.root", "must be a cgroup path (relative to the mount, or absolute)")
            root = _under_mount(self.mount, root_text or self.mount)
            if not _below(self.mount, root):
                raise self.fail(f"{key}.root", f"{root_text!r} is not below the cgroup v2 mount {self.mount}", root_text)
            try:
                out.append(Rule.from_table(table, root))
            except ConfigError as err:
                sub, value = f"{key}.{err.key}", table.get(err.key or "")
                if isinstance(value, str) and value:
                    raise self.fail_at(sub, value, err.reason) from None
                raise self.fail(sub, err.reason, value) from None
        return tuple(out)
