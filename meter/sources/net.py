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
nothing until it returns; what it counted stays. :meth:`NetSource.close`
removes exactly the filters, and the clsact qdiscs, meter added.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
from typing import Any

import numpy as np

from .. import program
from ..bpfabi import NET_KEY_DTYPE, NET_USAGE_DTYPE, PORT_PLACEHOLDER, check_table
from ..errors import BPFError
from ..netns import NETNS_DIR, NetnsError, iproute

__all__ = ["NetDrain", "NetSource", "Port", "parse_port"]

log = logging.getLogger("meter.net")

_INGRESS, _EGRESS = "ffff:fff2", "ffff:fff3"
#: tc filter priority meter uses: ahead of most hand-made filters.
PRIORITY = 1
FILTER_NAME = "meter"


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
    """Closed windows' packet counts: parallel arrays, one entry per (port, kind, window)."""

    port: np.ndarray
    kind: np.ndarray
    window: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray

    def __len__(self) -> int:
        return len(self.port)


@dataclasses.dataclass
class _Attachment:
    ifindex: int
    added_qdisc: bool


class NetSource:
    """tc programs on every port, their attachment, and their drain."""

    def __init__(self, bpf: Any, ports: list[Port], *, map_entries: int) -> None:
        self.bpf = bpf
        self.ports = ports
        self.map_entries = map_entries
        self._ipr: dict[str | None, Any] = {}
        self._attached: dict[int, _Attachment] = {}
        self._missing_logged: set[int] = set()
        self._added_qdisc: dict[int, bool] = {}
        self._prog_fds: dict[tuple[int, str], int] = {}
        check_table(bpf[b"net_usage"], NET_KEY_DTYPE, NET_USAGE_DTYPE, "net_usage")
        self._fd = program.map_fd(bpf, b"net_usage")
        self._keys = np.zeros(map_entries, NET_KEY_DTYPE)
        self._vals = np.zeros(map_entries, NET_USAGE_DTYPE)
        self.events: list[str] = []  # one line per attachment change, for logs and tests

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
        """Attach every port whose interface exists now; note the others once."""
        for port in self.ports:
            self._attach_port(port)

    def _attach_port(self, port: Port) -> None:
        ifindex = self._ifindex(port)
        current = self._attached.get(port.index)
        if current is not None and current.ifindex == ifindex:
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
        added = self._added_qdisc.get(port.index, False)
        try:
            ipr.tc("add", "clsact", ifindex)
            added = True
        except Exception as err:  # noqa: BLE001  (pyroute2 NetlinkError)
            if getattr(err, "code", None) != errno.EEXIST:
                self._note(f"meter: cannot add a clsact qdisc on {port.label}: {err}")
                return
        # Renamed away and back, the interface still carries meter's filters.
        self._remove_filters(ipr, ifindex)
        try:
            for parent, fn in ((_INGRESS, b"meter_tc_ingress"), (_EGRESS, b"meter_tc_egress")):
                ipr.tc("add-filter", "bpf", ifindex, ":1", fd=self.program_fd(port, fn), name=FILTER_NAME,
                       parent=parent, classid=1, direct_action=True, prio=PRIORITY)
        except Exception as err:  # noqa: BLE001  (pyroute2 NetlinkError)
            self._remove_filters(ipr, ifindex)
            self._note(f"meter: cannot attach to {port.label}: {err}")
            return
        self._added_qdisc[port.index] = added
        self._attached[port.index] = _Attachment(ifindex, added)
        if port.index in self._missing_logged:
            self._note(f"meter: interface {port.label} appeared; metering it")
            self._missing_logged.discard(port.index)

    @staticmethod
    def _remove_filters(ipr: Any, ifindex: int) -> None:
        """Delete the tc filters meter put on an interface (named FILTER_NAME), and no others."""
        for parent in (_INGRESS, _EGRESS):
            try:
                filters = list(ipr.get_filters(ifindex, parent=parent))
            except Exception:  # noqa: BLE001  (no clsact qdisc: nothing of ours)
                continue
            for f in filters:
                opts = f.get_attr("TCA_OPTIONS")
                if f.get_attr("TCA_KIND") != "bpf" or opts is None or opts.get_attr("TCA_BPF_NAME") != FILTER_NAME:
                    continue
                try:
                    ipr.tc("del-filter", "bpf", ifindex, f["handle"], parent=parent, prio=f["info"] >> 16)
                except Exception:  # noqa: BLE001  (deleted already, with its chain)
                    pass

    def refresh(self) -> None:
        """Follow interfaces that appeared, vanished or were recreated."""
        self.attach()

    def program_fds(self) -> dict[str, list[int]]:
        """The per-port copies of the tc programs, by program name."""
        out: dict[str, list[int]] = {}
        for (_, fn), fd in self._prog_fds.items():
            out.setdefault(fn, []).append(fd)
        return out

    def close(self) -> None:
        """Remove exactly what meter added: its filters, and the qdiscs it created."""
        for port in self.ports:
            att = self._attached.pop(port.index, None)
            if att is None:
                continue
            try:
                ipr = self._iproute(port.netns)
                if att.added_qdisc:
                    ipr.tc("del", "clsact", att.ifindex)
                else:
                    self._remove_filters(ipr, att.ifindex)
            except Exception as err:  # noqa: BLE001  (interface or namespace already gone)
                log.info("meter: %s already gone at exit (%s)", port.label, err)
        for netns in list(self._ipr):
            self._forget_netns(netns)
        import os

        for fd in self._prog_fds.values():
            os.close(fd)
        self._prog_fds.clear()

    @property
    def attached(self) -> list[Port]:
        return [p for p in self.ports if p.index in self._attached]

    # -- draining -------------------------------------------------------------------------

    def drain(self, closable: int) -> NetDrain:
        """Take every (port, kind, window) entry with window <= ``closable``."""
        n = program.lookup_batch(self._fd, self._keys, self._vals)
        keys = self._keys[:n]
        done = np.flatnonzero(keys["window"] <= np.uint64(closable))
        taken = keys[done]
        vals = self._vals[done]
        program.delete_batch(self._fd, taken)
        return NetDrain(
            port=taken["port"].astype(np.int64),
            kind=taken["kind"].astype(np.int64),
            window=taken["window"].astype(np.int64),
            packets=vals["packets"].astype(np.int64),
            bytes=vals["bytes"].astype(np.int64),
        )
