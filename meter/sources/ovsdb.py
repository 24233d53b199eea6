"""Source: a vswitch's ports, from its own Open vSwitch database, followed live.

A compartment with ``ovsdb = "unix:PATH"`` (or ``"tcp:HOST:PORT"``) owns
the kernel interfaces on its Open vSwitch's bridges. :class:`OvsdbPorts`
speaks the OVSDB protocol (RFC 7047, JSON-RPC over the database's socket;
no client library): one ``monitor`` of the Interface table's name and
type, whose updates arrive on the socket as ports are added and removed.
:meth:`OvsdbPorts.poll` reads what arrived without blocking, so following
a vswitch costs a read per drain. A database that goes away (ovsdb-server
restarted) keeps its last ports until it is back (docs/architecture.md,
"Ports that come and go").

The interfaces live in the namespace of the vswitch's ``ovs-vswitchd``:
:func:`vswitchd_netns` finds it from the compartment's cgroup.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..netns import NETNS_DIR

__all__ = ["KERNEL_TYPES", "OvsdbPorts", "address_problem", "vswitchd_netns"]

log = logging.getLogger("meter")

#: Interface types that are kernel netdevs tc can attach to ("" is "system").
#: Internal ports (the bridge's own) and userspace ports (dpdk) are not.
KERNEL_TYPES = ("", "system", "tap")
#: Seconds between two attempts to reach a database that went away.
RETRY_S = 1.0
#: Bytes of one message at most (a bridge with thousands of ports is well below).
MAX_MESSAGE = 16 << 20


def address_problem(address: str) -> str | None:
    """Why ``address`` is not an OVSDB address meter can reach (None: it is)."""
    kind, _, rest = address.partition(":")
    if kind == "unix" and rest:
        return None
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return None
    return f"{address!r} is not an OVSDB address (\"unix:PATH\" or \"tcp:HOST:PORT\")"


#: Compartments whose ovs-vswitchd runs in an unnamed namespace, already said.
_UNNAMED_SAID: set[Path] = set()


def vswitchd_netns(cgroup: Path) -> str | None:
    """The named network namespace (under /run/netns) of the ``ovs-vswitchd``
    running in ``cgroup``'s subtree; None: meter's own namespace, or none found."""
    own = os.stat("/proc/self/ns/net").st_ino
    for procs in [cgroup / "cgroup.procs", *cgroup.rglob("*/cgroup.procs")]:
        try:
            pids = procs.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "ovs-vswitchd":
                    continue
                ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            except OSError:
                continue
            if ino == own:
                return None
            for entry in NETNS_DIR.iterdir() if NETNS_DIR.is_dir() else ():
                try:
                    if entry.stat().st_ino == ino:
                        return entry.name
                except OSError:
                    continue
            if cgroup not in _UNNAMED_SAID:
                _UNNAMED_SAID.add(cgroup)
                log.warning("meter: the ovs-vswitchd of %s runs in a network namespace with no name under %s: "
                            "give the compartment ovsdb_netns", cgroup, NETNS_DIR)
            return None
    return None


class OvsdbPorts:
    """The kernel interfaces on one Open vSwitch database's bridges."""

    def __init__(self, address: str) -> None:
        if problem := address_problem(address):
            raise ConfigError(problem, key="ovsdb")
        self.address = address
        self.interfaces: dict[str, tuple[str, str]] = {}  # row uuid -> (name, type)
        self._sock: socket.socket | None = None
        self._buf = b""
        self._decoder = json.JSONDecoder()
        self._next_try = 0.0
        self._lost_said = False
        #: Times the database went away and came back, and echo probes it sent that were answered.
        self.reconnects = 0
        self.echoes = 0

    @property
    def names(self) -> set[str]:
        """Names of the kernel interfaces on the bridges now."""
        return {name for name, kind in self.interfaces.values() if kind in KERNEL_TYPES and name}

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- the connection ---------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> None:
        """Connect and take the monitor's first state; raises OSError naming the database."""
        kind, _, rest = self.address.partition(":")
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = rest
        else:
            host, _, port = rest.rpartition(":")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            target = (host.strip("[]"), int(port))
        sock.settimeout(timeout)
        try:
            sock.connect(target)
            self._sock, self._buf = sock, b""
            self._send({"method": "monitor", "id": "meter",
                        "params": ["Open_vSwitch", None, {"Interface": [{"columns": ["name", "type"]}]}]})
            deadline = time.monotonic() + timeout
            while True:
                for msg in self._messages(block=True, deadline=deadline):
                    if msg.get("id") == "meter" and "result" in msg:
                        if msg.get("error"):
                            raise OSError(errno.EPROTO, f"the database refused the monitor: {msg['error']}")
                        self.interfaces = {}
                        self._apply(msg["result"])
                        sock.setblocking(False)
                        return
                    self._handle(msg)
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._sock is not None
        self._sock.sendall(json.dumps(msg).encode())

    def _messages(self, *, block: bool, deadline: float = 0.0) -> list[dict[str, Any]]:
        """Whole JSON messages received so far (at least one when ``block``)."""
        assert self._sock is not None
        out: list[dict[str, Any]] = []
        while True:
            text = self._buf.decode("utf-8", "replace").lstrip()
            while text:
                try:
                    msg, end = self._decoder.raw_decode(text)
                except ValueError:
                    break  # the rest has not arrived yet
                except RecursionError:
                    raise OSError(errno.EPROTO, "nesting no JSON-RPC message has: not an OVSDB server") from None
                out.append(msg)
                text = text[end:].lstrip()
            self._buf = text.encode()
            if len(self._buf) > MAX_MESSAGE:
                raise OSError(errno.EPROTO, f"no whole JSON message in {len(self._buf)} bytes: not an OVSDB server")
            if out or not block:
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, "no answer from the database")
            self._sock.settimeout(left)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise OSError(errno.ECONNRESET, "the database closed the connection")
            self._buf += chunk

    def _handle(self, msg: dict[str, Any]) -> bool:
        """Act on one message; True when the interfaces changed."""
        if msg.get("method") == "echo":
            self._send({"result": msg.get("params", []), "error": None, "id": msg.get("id")})
            self.echoes += 1
        elif msg.get("method") == "update" and len(msg.get("params", [])) == 2:
            return self._apply(msg["params"][1])
        return False

    def _apply(self, updates: dict[str, Any]) -> bool:
        before = self.names
        for uuid, change in (updates.get("Interface") or {}).items():
            new = change.get("new")
            if new is None:
                self.interfaces.pop(uuid, None)
            else:
                old = self.interfaces.get(uuid, ("", ""))
                name, kind = new.get("name", old[0]), new.get("type", old[1])
                self.interfaces[uuid] = (name if isinstance(name, str) else "", kind if isinstance(kind, str) else "")
        return self.names != before

    # -- following it -----------------------------------------------------------------------

    def poll(self) -> bool:
        """Read every update that arrived (never blocks); True when the
        interfaces changed. A lost database keeps its last interfaces and
        is tried again every RETRY_S seconds."""
        if self._sock is None:
            if time.monotonic() < self._next_try:
                return False
            before = self.names
            try:
                self.connect(timeout=0.5)
            except OSError as err:
                self._next_try = time.monotonic() + RETRY_S
                if not self._lost_said:
                    self._lost_said = True
                    log.warning("meter: Open vSwitch database %s unreachable (%s); its ports keep being metered "
                                "as they were until it is back", self.address, err.strerror or err)
                return False
            self.reconnects += 1
            self._lost_said = False
            log.warning("meter: Open vSwitch database %s is back", self.address)
            return self.names != before
        changed = False
        try:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    raise OSError(errno.ECONNRESET, "the database closed the connection")
                self._buf += chunk
            for msg in self._messages(block=False):
                changed |= self._handle(msg)
        except OSError as err:
            self.close()
            self._next_try = 0.0
            log.warning("meter: lost the Open vSwitch database %s (%s)", self.address, err.strerror or err)
        return changed
