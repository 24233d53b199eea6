"""Source: packets and bytes per port (tc clsact), drained per window.

A *port* is one interface a compartment owns: ``IFNAME`` in meter's own
network namespace or ``NETNS:IFNAME`` in a named one. Each port gets a
number and its own copy of the ingress and egress programs of
``bpf/net.bpf.c`` (the port number patched into the bytecode), attached as
direct-action clsact filters that give no verdict, so existing tc
configuration keeps working.

Attachment follows the topology at run time: :meth:`NetSource.refresh`
reattaches a port whose interface came back (or was recreated), and one
that vanished (deleted, renamed, namespace gone) is logged once and counts
nothing until it returns; what it counted stays. A filter someone removed
from a port is noted, counted (``reattachments``) and attached again at
the next refresh. A refresh looks again only at the ports of namespaces
where netlink reported a link or tc change since the last one (a socket per
namespace subscribed to both): a poll per namespace when nothing changed,
instead of three netlink dumps per port at every drain.

meter finds its own filters by program id (each port's copies are this
meter's alone), never by name, so meters share an interface: each attaches
under a free handle at :data:`PRIORITY` and, its programs giving no
verdict, every filter sees every packet. :meth:`NetSource.close` removes
exactly this meter's filters, and a clsact qdisc only when this meter
created it on that very interface and no other filter is left on it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import socket
import threading
from typing import Any

import numpy as np

from .. import program, records
from ..bpfabi import CTL_NET_TAKEN, NET_CELL_DTYPE, NR_CONTROLS, PORT_PLACEHOLDER, check_table
from ..bpfsys import Bpf, held_prog_ids
from ..errors import BPFError
from ..netns import NETNS_DIR, NetnsError, iproute

__all__ = ["NetDrain", "NetSource", "Port", "parse_port"]

log = logging.getLogger("meter.net")

_INGRESS, _EGRESS = "ffff:fff2", "ffff:fff3"
_HOOKS = ((_INGRESS, b"meter_tc_ingress", "ingress"), (_EGRESS, b"meter_tc_egress", "egress"))
#: tc filter priority meter uses: ahead of most hand-made filters.
PRIORITY = 1
#: The filters' name, for people reading `tc filter show`; meter finds its own by program id.
FILTER_NAME = "meter"
_MAX_HANDLE_TRIES = 64
#: The kernel's TCA_BPF_ID (the attached program's id), which pyroute2 does not decode.
_TCA_BPF_ID = 11


@dataclasses.dataclass(frozen=True)
class Port:
    """One metered interface: ``netns`` None is meter's own namespace."""

    index: int
    netns: str | None
    ifname: str

    @property
    def label(self) -> str:
        return f"{self.netns}:{self.ifname}" if self.netns else self.ifname


def parse_port(index: int, spec: str) -> Port:
    """``"IFNAME"`` or ``"NETNS:IFNAME"`` -> Port."""
    netns, sep, ifname = spec.rpartition(":")
    return Port(index, netns if sep else None, ifname)


@dataclasses.dataclass
class NetDrain:
    """Closed windows' packet counts: parallel arrays, one entry per (port, kind, window).

    ``packets``/``bytes`` are skbs as tc sees them; ``wire_packets``/``wire_bytes`` what they were on the wire
    (a GSO/GRO skb is gso_segs packets, each with its headers: see
    bpf/net.bpf.c). ``late_*``: per (port, kind), packets since the last drain
    whose window's cell was not open (billed in the newest window closed, as
    late). Wire arrays left out are the skb figures (no offload)."""

    port: np.ndarray
    kind: np.ndarray
    window: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    late_port: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    late_kind: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    late_packets: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    late_bytes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    # None (left out): the skb figures, set by __post_init__.
    wire_packets: np.ndarray = None  # type: ignore[assignment]
    wire_bytes: np.ndarray = None  # type: ignore[assignment]
    late_wire_packets: np.ndarray = None  # type: ignore[assignment]
    late_wire_bytes: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for wire, skb in (("wire_packets", "packets"), ("wire_bytes", "bytes"),
                          ("late_wire_packets", "late_packets"), ("late_wire_bytes", "late_bytes")):
            if getattr(self, wire) is None:
                setattr(self, wire, getattr(self, skb))

    def __len__(self) -> int:
        return len(self.port)


@dataclasses.dataclass
class _Attachment:
    ifindex: int
    #: meter created the clsact qdisc (on this very interface), so it may delete it.
    added_qdisc: bool


@dataclasses.dataclass(frozen=True)
class _Filter:
    """One filter on a clsact hook, as a netlink dump shows it."""

    handle: int
    prio: int
    #: The attached BPF program's id; None: not a BPF filter.
    prog_id: int | None
    #: The BPF filter's name (TCA_BPF_NAME): meter's are :data:`FILTER_NAME`.
    name: str | None


def _bpf_filter(f: Any) -> _Filter:
    """A filter of a netlink dump, with the program id and name of a cls_bpf one."""
    handle, prio = f["handle"], f["info"] >> 16
    opts = f.get_attr("TCA_OPTIONS") if f.get_attr("TCA_KIND") == "bpf" else None
    if opts is None:
        return _Filter(handle, prio, None, None)
    name = opts.get_attr("TCA_BPF_NAME")
    named = opts.get_attr("TCA_BPF_ID")  # a pyroute2 that decodes it
    if named is not None:
        return _Filter(handle, prio, int(named), name)
    for attr in opts["attrs"]:
        nla = attr.value
        if attr.name == "UNKNOWN" and nla["header"]["type"] == _TCA_BPF_ID:
            return _Filter(handle, prio, int.from_bytes(nla.data[nla.offset + 4 : nla.offset + 8], "little"), name)
    return _Filter(handle, prio, None, name)


def _event_socket(netns: str | None) -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket in ``netns`` (None: meter's own), subscribed to
    link and tc changes (RTMGRP_LINK | RTMGRP_TC). Made in a short-lived thread that
    enters the namespace (setns), so no thread of meter's ever leaves its own."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.bind((0, _RTMGRP_LINK | _RTMGRP_TC))
        sock.setblocking(False)
        return sock

    if netns is None:
        return make()
    out: dict[str, Any] = {}

    def inside() -> None:
        try:
            with open(NETNS_DIR / netns, "rb") as f:
                if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"cannot enter network namespace {netns}")
            out["sock"] = make()
        except OSError as err:
            out["err"] = err

    t = threading.Thread(target=inside, name="meter-netns")
    t.start()
    t.join()
    if "err" in out:
        raise out["err"]
    return out["sock"]


_RTMGRP_LINK, _RTMGRP_TC, _CLONE_NEWNET = 0x1, 0x8, 0x40000000


def _netns_inode(netns: str | None) -> int | None:
    """The identity of named namespace ``netns`` (its nsfs inode; 0 for meter's own), None when
    it is not there: a namespace deleted and made again under one name is another one."""
    if netns is None:
        return 0
    try:
        return os.stat(NETNS_DIR / netns).st_ino
    except OSError:
        return None


class _Changes:
    """Netlink sockets, one per network namespace of the ports, subscribed to link and
    tc changes: whether anything that could change a port's attachment happened
    there since the last look. Looking costs a non-blocking read, not a dump."""

    def __init__(self) -> None:
        self._socks: dict[str | None, socket.socket] = {}

    def changed(self, netns: str | None) -> bool:
        """True if ``netns`` had link or tc changes since the last call (or cannot be
        watched, or is new to this watcher): then its ports need a full look."""
        sock = self._socks.get(netns)
        if sock is None:
            try:
                self._socks[netns] = _event_socket(netns)
            except OSError:  # the namespace is not there: look every time
                pass
            return True
        seen = False
        try:
            while sock.recv(1 << 16):
                seen = True
        except BlockingIOError:
            pass
        except OSError:  # ENOBUFS: events were lost, so assume the worst
            return True
        return seen

    def forget(self, netns: str | None) -> None:
        """Close ``netns``'s socket (a deleted namespace: ours alone would keep it alive)."""
        sock = self._socks.pop(netns, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for netns in list(self._socks):
            self.forget(netns)


class NetSource:
    """tc programs on every port, their attachment, and their drain."""

    def __init__(self, bpf: Any, ports: list[Port], *, ring_windows: int, max_ports: int) -> None:
        self.bpf = bpf
        self.ports = ports
        self._ipr: dict[str | None, Any] = {}
        self._attached: dict[int, _Attachment] = {}
        self._missing_logged: set[int] = set()
        self._prog_fds: dict[tuple[int, str], int] = {}
        self._prog_ids: dict[tuple[int, str], int] = {}
        #: Times a filter of this meter was found removed by someone else and attached again.
        self.reattachments = 0
        # The net ring (sched.bpf.c): row port * 2 + kind, ring_windows cells a row.
        check_table(bpf[b"net_ring"], np.dtype(np.uint32), NET_CELL_DTYPE, "net_ring")
        self.ring_windows, rows = int(ring_windows), 2 * max(1, int(max_ports))
        self._maps: list[Any] = []
        m, ring = program.map_array(bpf, b"net_ring", NET_CELL_DTYPE, rows * self.ring_windows)
        self._maps.append(m)
        self._ring: np.ndarray | None = ring.reshape(rows, self.ring_windows)
        m, self._late = program.map_array(bpf, b"net_late", NET_CELL_DTYPE, rows)
        self._maps.append(m)
        self._late_seen = np.zeros(rows, NET_CELL_DTYPE)
        m, self._ctl = program.map_array(bpf, b"control", np.dtype(np.uint64), NR_CONTROLS)
        self._maps.append(m)
        self._taken = int(self._ctl[CTL_NET_TAKEN])
        self.events: list[str] = []  # one line per attachment change, for logs and tests
        self._changes = _Changes()
        self._netns_ino: dict[str | None, int] = {}

    # -- programs -------------------------------------------------------------------

    def program_fd(self, port: Port, fn: bytes) -> int:
        """A copy of ``fn`` with this port's number patched in; loaded once per port."""
        key = (port.index, fn.decode())
        if key in self._prog_fds:
            return self._prog_fds[key]
        from bcc import BPF, libbcc

        code = bytearray(self.bpf.dump_func(fn))
        patched = 0
        for off in range(0, len(code), 8):
            if int.from_bytes(code[off + 4 : off + 8], "little") == PORT_PLACEHOLDER:
                code[off + 4 : off + 8] = port.index.to_bytes(4, "little")
                patched += 1
        if patched != 1:
            raise BPFError(f"net.bpf.c: expected one port placeholder in {fn.decode()}, found {patched}", program="net")
        buf = ctypes.create_string_buffer(bytes(code), len(code))
        lib = libbcc.lib
        fd = lib.bcc_func_load(self.bpf.module, BPF.SCHED_CLS, fn, buf, len(code), lib.bpf_module_license(self.bpf.module),
                               lib.bpf_module_kern_version(self.bpf.module), 0, None, 0, None, -1)
        if fd < 0:
            raise BPFError(f"cannot load {fn.decode()} for port {port.label}: {ctypes.get_errno()}", program="net")
        self._prog_fds[key] = fd
        self._prog_ids[key] = Bpf().prog_info(fd).id
        return fd

    # -- attachment -----------------------------------------------------------------

    def _iproute(self, netns: str | None) -> Any:
        if netns not in self._ipr:
            self._ipr[netns] = iproute(netns)
        return self._ipr[netns]

    def _forget_netns(self, netns: str | None) -> None:
        ipr = self._ipr.pop(netns, None)
        if ipr is not None:
            try:
                ipr.close()
            except Exception:  # noqa: BLE001  (closing a socket of a dead namespace)
                pass

    def _ifindex(self, port: Port) -> int | None:
        if port.netns is not None and not (NETNS_DIR / port.netns).exists():
            # Deleted with `ip netns del`: our socket alone would keep it alive.
            self._forget_netns(port.netns)
            return None
        try:
            found = self._iproute(port.netns).link_lookup(ifname=port.ifname)
        except (NetnsError, OSError):
            self._forget_netns(port.netns)  # the namespace is gone (or not there yet)
            return None
        except Exception:  # noqa: BLE001  (pyroute2 NetlinkError from a dying namespace)
            self._forget_netns(port.netns)
            return None
        return int(found[0]) if found else None

    def _note(self, line: str) -> None:
        self.events.append(line)
        log.warning("%s", line)

    def attach(self) -> None:
        """Attach every port whose interface exists now; note the others once.

        An attached port whose filter someone removed is noted, counted in
        :attr:`reattachments` and attached again.
        """
        for netns in {p.netns for p in self.ports}:
            ino = _netns_inode(netns)
            if ino is not None:
                self._netns_ino[netns] = ino
        for port in self.ports:
            self._attach_port(port)

    def add(self, port: Port) -> None:
        """Count ``port`` from now on (a port added while metering)."""
        if all(p.index != port.index for p in self.ports):
            self.ports.append(port)
        self._attach_port(port)

    def remove(self, port: Port) -> None:
        """Stop counting ``port``: its filters go, its counts so far stay
        (what the kernel counted before is drained with the rest)."""
        self.ports = [p for p in self.ports if p.index != port.index]
        self._missing_logged.discard(port.index)
        att = self._attached.pop(port.index, None)
        if att is None:
            return
        try:
            self._remove_filters(self._iproute(port.netns), att.ifindex, port)
        except Exception as err:  # noqa: BLE001  (interface or namespace already gone)
            log.info("meter: %s already gone when it was removed (%s)", port.label, err)
        self.events.append(f"meter: stopped metering {port.label}")

    def _attach_port(self, port: Port) -> None:
        ifindex = self._ifindex(port)
        current = self._attached.get(port.index)
        if current is not None and current.ifindex == ifindex:
            self._check_filters(port, current)
            return
        if current is not None:  # the interface went away, or was recreated
            self._attached.pop(port.index)
            if ifindex is None:
                self._note(f"meter: interface {port.label} vanished; its counts so far are kept")
                self._missing_logged.add(port.index)
                return
        if ifindex is None:
            if port.index not in self._missing_logged:
                self._note(f"meter: interface {port.label} does not exist; it will be metered when it appears")
                self._missing_logged.add(port.index)
            return
        ipr = self._iproute(port.netns)
        added = self._add_qdisc(ipr, ifindex, port)
        if added is None:
            return
        # Renamed away and back, the interface still carries this meter's filters.
        self._remove_filters(ipr, ifindex, port)
        self._remove_orphans(ipr, ifindex, port)
        try:
            for parent, fn, _ in _HOOKS:
                self._add_filter(ipr, ifindex, port, parent, fn)
        except Exception as err:  # noqa: BLE001  (pyroute2 NetlinkError)
            self._remove_filters(ipr, ifindex, port)
            self._note(f"meter: cannot attach to {port.label}: {err}")
            return
        self._attached[port.index] = _Attachment(ifindex, added)
        if port.index in self._missing_logged:
            self._note(f"meter: interface {port.label} appeared; metering it")
            self._missing_logged.discard(port.index)

    def _add_qdisc(self, ipr: Any, ifindex: int, port: Port) -> bool | None:
        """Add a clsact qdisc: True if meter made it, False if one was there (not meter's), None: failed."""
        try:
            ipr.tc("add", "clsact", ifindex)
            return True
        except Exception as err:  # noqa: BLE001  (pyroute2 NetlinkError)
            if getattr(err, "code", None) == errno.EEXIST:
                return False
            self._note(f"meter: cannot add a clsact qdisc on {port.label}: {err}")
            return None

    def _check_filters(self, port: Port, att: _Attachment) -> None:
        """Attach again what someone removed from an attached port (filters, or the qdisc with them)."""
        ipr = self._iproute(port.netns)
        try:
            ours = self._ours(ipr, att.ifindex, port)
        except Exception:  # noqa: BLE001  (the namespace is dying: the next refresh sees it gone)
            return
        missing = [(parent, fn, hook) for parent, fn, hook in _HOOKS if not ours[parent]]
        if not missing:
            return
        self.reattachments += 1
        self._note(f"meter: meter's tc filter on {port.label} ({', '.join(m[2] for m in missing)}) was removed "
                   "by someone else; packets meanwhile were not counted; attaching it again")
        added = self._add_qdisc(ipr, att.ifindex, port)
        if added:  # the qdisc was deleted too, and meter made the new one
            att.added_qdisc = True
        try:
            for parent, fn, _ in missing:
                self._add_filter(ipr, att.ifindex, port, parent, fn)
        except Exception as err:  # noqa: BLE001  (pyroute2 NetlinkError)
            self._note(f"meter: cannot attach to {port.label} again: {err}")

    @staticmethod
    def _filters(ipr: Any, ifindex: int, parent: str) -> list[_Filter]:
        """Every filter on a clsact hook."""
        try:
            dump = list(ipr.get_filters(ifindex, parent=parent))
        except Exception:  # noqa: BLE001  (no clsact qdisc: no filters)
            return []
        # Entries with handle 0 are a priority's own, not filters.
        return [_bpf_filter(f) for f in dump if f["handle"]]

    def _ours(self, ipr: Any, ifindex: int, port: Port) -> dict[str, list[tuple[int, int]]]:
        """{hook parent: [(handle, priority)]} of this meter's filters for ``port``.

        Identified by program id, which no other meter's filter can have, never by name.
        """
        out: dict[str, list[tuple[int, int]]] = {}
        for parent, fn, _ in _HOOKS:
            pid = self._prog_ids.get((port.index, fn.decode()))
            out[parent] = [(f.handle, f.prio) for f in self._filters(ipr, ifindex, parent)
                           if pid is not None and f.prog_id == pid]
        return out

    def _remove_orphans(self, ipr: Any, ifindex: int, port: Port) -> None:
        """Delete meter filters whose program no process holds: left by a meter killed with SIGKILL.

        A running meter holds an fd of each program it attached, from load to
        exit, so its filters are never taken for orphans; the processes read
        are this pid namespace's (see docs/architecture.md, "Sharing an interface").
        """
        found = [(parent, hook, f) for parent, _, hook in _HOOKS for f in self._filters(ipr, ifindex, parent)
                 if f.name == FILTER_NAME and f.prog_id is not None]
        if not found:
            return
        held = held_prog_ids()
        for parent, hook, f in found:
            if f.prog_id in held:
                continue
            try:
                ipr.tc("del-filter", "bpf", ifindex, f.handle, parent=parent, prio=f.prio)
            except Exception:  # noqa: BLE001  (deleted meanwhile)
                continue
            self._note(f"meter: removed a meter filter on {port.label} ({hook}) that no running process holds "
                       f"(program id {f.prog_id}): left by a meter that was killed")

    def _add_filter(self, ipr: Any, ifindex: int, port: Port, parent: str, fn: bytes) -> None:
        """Attach ``fn`` at meter's priority under the first handle free there (another meter may hold some)."""
        fd = self.program_fd(port, fn)
        used = {f.handle for f in self._filters(ipr, ifindex, parent) if f.prio == PRIORITY}
        handle = 1
        for _ in range(_MAX_HANDLE_TRIES):
            while handle in used:
                handle += 1
            try:
                ipr.tc("add-filter", "bpf", ifindex, handle, fd=fd, name=FILTER_NAME, parent=parent, classid=1,
                       direct_action=True, prio=PRIORITY)
                return
            except Exception as err:
                if getattr(err, "code", None) != errno.EEXIST:
                    raise
                used.add(handle)  # taken since the dump, by another meter starting too
        raise BPFError(f"no free tc filter handle at priority {PRIORITY} on {port.label}", program="net")

    def _remove_filters(self, ipr: Any, ifindex: int, port: Port) -> None:
        """Delete this meter's tc filters for ``port`` and no others (another meter's stay)."""
        for parent, found in self._ours(ipr, ifindex, port).items():
            for handle, prio in found:
                try:
                    ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=prio)
                except Exception:  # noqa: BLE001  (deleted already, with its chain)
                    pass

    def refresh(self) -> None:
        """Follow interfaces that appeared, vanished or were recreated, and filters someone
        removed: the ports of each namespace where netlink reported a link or tc change
        (or that cannot be watched yet) get a full look; the rest cost a poll each."""
        for netns in {p.netns for p in self.ports}:
            ino, known = _netns_inode(netns), self._netns_ino.get(netns)
            if ino is None or ino != known:
                # Gone, new here, or deleted and made again under the same name: sockets
                # kept from before would watch (and keep alive) the old namespace.
                self._changes.forget(netns)
                if known is not None:
                    self._forget_netns(netns)
                self._netns_ino.pop(netns, None)
                if ino is not None:
                    self._netns_ino[netns] = ino
                    self._changes.changed(netns)  # watch it from now on
                look = True
            else:
                look = self._changes.changed(netns)
            if look:
                for port in self.ports:
                    if port.netns == netns:
                        self._attach_port(port)

    def program_fds(self) -> dict[str, list[int]]:
        """The per-port copies of the tc programs, by program name."""
        out: dict[str, list[int]] = {}
        for (_, fn), fd in self._prog_fds.items():
            out.setdefault(fn, []).append(fd)
        return out

    def close(self) -> None:
        """Remove exactly what meter added: its filters, and a qdisc it created once nothing else is on it."""
        self._ring = None
        program.unmap(self._maps)
        for port in self.ports:
            att = self._attached.pop(port.index, None)
            if att is None:
                continue
            try:
                ipr = self._iproute(port.netns)
                self._remove_filters(ipr, att.ifindex, port)
                if att.added_qdisc:
                    if any(self._filters(ipr, att.ifindex, parent) for parent, _, _ in _HOOKS):
                        log.info("meter: kept the clsact qdisc on %s: other filters are on it", port.label)
                    else:
                        ipr.tc("del", "clsact", att.ifindex)
            except Exception as err:  # noqa: BLE001  (interface or namespace already gone)
                log.info("meter: %s already gone at exit (%s)", port.label, err)
        for netns in list(self._ipr):
            self._forget_netns(netns)
        self._changes.close()
        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds.clear()

    @property
    def attached(self) -> list[Port]:
        return [p for p in self.ports if p.index in self._attached]

    # -- draining -------------------------------------------------------------------------

    def drain(self, closable: int) -> NetDrain:
        """Take every (port, kind, window) cell with window <= ``closable`` (the CPU
        source's closed window: no program writes them any more), zero them, open
        them for the windows one ring later; and the late totals' growth."""
        if self._ring is None:
            raise BPFError("the packet source is closed", program="net")
        nw = self.ring_windows
        lo, hi = self._taken + 1, min(closable, self._taken + nw)
        wins = np.arange(lo, hi + 1, dtype=np.int64)
        a, b = lo % nw, hi % nw
        runs = [] if not len(wins) else [slice(a, b + 1)] if a <= b else [slice(a, None), slice(0, b + 1)]
        cells = np.concatenate([self._ring[:, run] for run in runs], axis=1) if runs else np.zeros(
            (len(self._ring), 0), NET_CELL_DTYPE)
        for run in runs:
            self._ring[:, run] = 0
        if closable > self._taken:
            self._taken = closable
            self._ctl[CTL_NET_TAKEN] = closable  # in place, after the zeroed cells (sched.py, _control)
        r, j = records.nonzero_cells(cells["packets"])
        late = self._late.copy()
        d = {f: late[f].astype(np.int64) - self._late_seen[f].astype(np.int64) for f in NET_CELL_DTYPE.names or ()}
        self._late_seen[:] = late
        lr = np.flatnonzero(d["packets"])
        cell = cells[r, j]
        return NetDrain(
            port=r // 2, kind=r % 2, window=wins[j],
            packets=cell["packets"].astype(np.int64), bytes=cell["bytes"].astype(np.int64),
            wire_packets=cell["wire_packets"].astype(np.int64), wire_bytes=cell["wire_bytes"].astype(np.int64),
            late_port=lr // 2, late_kind=lr % 2, late_packets=d["packets"][lr], late_bytes=d["bytes"][lr],
            late_wire_packets=d["wire_packets"][lr], late_wire_bytes=d["wire_bytes"][lr],
        )
