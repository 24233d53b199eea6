"""The OVSDB client against a real ovsdb-server (Debian's openvswitch-switch):
the monitor's first state, live updates, the server's echo probes, and a
server that goes away and comes back."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from meter.sources.ovsdb import OvsdbPorts

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")


class Server:
    def __init__(self, root: Path) -> None:
        assert shutil.which("ovsdb-server"), "Debian's openvswitch-switch is required (make setup installs it)"
        self.root, self.db, self.sock = root, root / "conf.db", root / "db.sock"
        subprocess.run(["ovsdb-tool", "create", str(self.db), str(SCHEMA)], check=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()
        self.vsctl("init")

    def start(self) -> None:
        self.proc = subprocess.Popen(["ovsdb-server", str(self.db), f"--remote=punix:{self.sock}",
                                      f"--unixctl={self.root / 'ctl'}", "--no-chdir"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert time.monotonic() < deadline and self.proc.poll() is None, "ovsdb-server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
        self.sock.unlink(missing_ok=True)

    def vsctl(self, *args: str) -> None:
        subprocess.run(["ovs-vsctl", f"--db=unix:{self.sock}", "--no-wait", "--timeout=10", *args], check=True,
                       capture_output=True)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def _until(ports: OvsdbPorts, names: set[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ports.names != names:
        assert time.monotonic() < deadline, (ports.names, names)
        ports.poll()
        time.sleep(0.01)


def test_the_bridges_kernel_interfaces_followed_live(server):
    server.vsctl("add-br", "br0", "--", "add-port", "br0", "p1", "--", "add-port", "br0", "p2")
    ports = OvsdbPorts(f"unix:{server.sock}")
    ports.connect()
    try:
        # The bridge's own internal port is not a tenant's port.
        assert ports.names == {"p1", "p2"} and any(kind == "internal" for _, kind in ports.interfaces.values())
        assert not ports.poll()  # nothing new: a non-blocking read
        server.vsctl("add-port", "br0", "p3", "--", "del-port", "br0", "p1")
        _until(ports, {"p2", "p3"})
        server.vsctl("add-br", "br1", "--", "add-port", "br1", "q1", "--", "set", "interface", "q1", "type=internal")
        server.vsctl("add-port", "br1", "q2", "--", "set", "interface", "q2", "type=dpdk")
        server.vsctl("add-port", "br1", "q3", "--", "set", "interface", "q3", "type=system")
        _until(ports, {"p2", "p3", "q3"})
    finally:
        ports.close()


def test_a_database_that_goes_away_keeps_its_ports_until_it_is_back(server):
    server.vsctl("add-br", "br0", "--", "add-port", "br0", "p1")
    ports = OvsdbPorts(f"unix:{server.sock}")
    ports.connect()
    try:
        server.stop()
        deadline = time.monotonic() + 10
        while ports.connected:  # the loss is seen by a poll
            assert time.monotonic() < deadline
            assert not ports.poll()
            time.sleep(0.01)
        assert ports.names == {"p1"}  # kept while it is away
        server.start()
        server.vsctl("add-port", "br0", "p2")
        _until(ports, {"p1", "p2"})
        assert ports.reconnects == 1
    finally:
        ports.close()


def test_the_servers_echo_probes_are_answered_over_tcp(tmp_path):
    """Over TCP, ovsdb-server probes a client idle for 5 s with echo and drops
    it if no answer comes within 5 s more: polled as a drain does, meter's
    client answers, and stays connected through two probe periods."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Server(tmp_path)
    server.vsctl("add-br", "br0")
    server.stop()
    server.proc = subprocess.Popen(["ovsdb-server", str(server.db), f"--remote=ptcp:{port}:127.0.0.1",
                                    f"--unixctl={tmp_path / 'ctl'}", "--no-chdir"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ports = OvsdbPorts(f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 10
        while True:
            try:
                ports.connect()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        end = time.monotonic() + 12
        while time.monotonic() < end:
            assert not ports.poll()
            time.sleep(0.25)
        assert ports.echoes >= 1 and ports.reconnects == 0 and ports.connected
        ports.close()
    finally:
        server.proc.terminate()
        server.proc.wait(10)


def test_an_interface_on_one_vswitch_listed_for_another_compartment_is_said(tmp_path, server, caplog):
    """p1 is on b's bridge but listed for a: a's (the listing wins, as two
    listings of one interface are refused), and a warning says so."""
    from meter import Topology
    from meter.engine import Meter
    from meter.sources.fake import FakeCPU, FakePackets, FakeSources

    server.vsctl("add-br", "br0", "--", "add-port", "br0", "p1", "--", "add-port", "br0", "p2")
    mount = tmp_path / "cg"
    for c in ("a", "b"):
        (mount / c).mkdir(parents=True)
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "vs"\ncgroup = "a"\ninterfaces = ["p1"]\n'
                   f'[[tenant]]\nname = "b"\n[[tenant.compartment]]\nname = "vs"\ncgroup = "b"\n'
                   f'ovsdb = "unix:{server.sock}"\n')
    packets = FakePackets()
    meter = Meter(Topology.from_file(cfg, mount=mount), sources=FakeSources(FakeCPU(), packets))
    meter.open()
    try:
        owners = {p.label: meter.row_names[row] for p, row in zip(meter._ports.known, meter._ports.rows)}
        assert owners == {"p1": ("a", "vs"), "p2": ("b", "vs")}
        said = [r.message for r in caplog.records if "p1 is on b/vs's Open vSwitch" in r.message]
        assert len(said) == 1 and "belongs to a/vs" in said[0]
    finally:
        meter.close()


@pytest.mark.parametrize("junk", [b"[", b"x"], ids=["deep-nesting", "never-a-message"])
def test_a_peer_that_is_no_ovsdb_server_is_refused_not_buffered_forever(tmp_path, junk):
    import socket
    import threading

    from meter.sources.ovsdb import MAX_MESSAGE

    path = str(tmp_path / "junk.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            conn.sendall(junk * (MAX_MESSAGE + 65536))  # never a whole JSON message
        except OSError:
            pass
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(OSError, match="not an OVSDB server"):
        OvsdbPorts(f"unix:{path}").connect(timeout=20)
    srv.close()
