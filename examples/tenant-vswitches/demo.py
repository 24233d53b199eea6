"""Tenant-specific virtual switches on one host: the paper's scenario, for real.

``up(n)`` builds, for each tenant ``tK``:

* a cgroup v2 compartment ``meter-demo/tK/vswitch``;
* a network namespace ``md-tK-sw`` holding the tenant's own Open vSwitch
  (its own ovsdb-server and ovs-vswitchd, database, sockets, pid and log
  files under ``/run/meter-demo/tK``; userspace datapath
  ``datapath_type=netdev``, so no kernel module), started from a shell
  already inside the compartment so every thread is counted there;
* two workload namespaces ``md-tK-a`` and ``md-tK-b`` ("VMs", 10.90.K.1/2)
  linked to the switch by veth pairs (``pa``/``pb`` on the switch side);
* a UDP traffic generator a -> b at a tenant-specific rate;

and writes a topology (``/run/meter-demo/topology.toml``) whose compartment
for each tenant is its cgroup and its Open vSwitch database (``ovsdb``):
meter finds the switch ports on the bridge itself, and follows ports added
and removed while it runs. ``down()``
removes every process, namespace, veth, cgroup and file it made. A set-up
that fails midway removes what it made and raises DemoError saying what
failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("METER_DEMO_DIR", "/run/meter-demo"))
PREFIX = "md-"
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
#: Packets per second each tenant's generator sends: tenant K sends RATES[K % len].
RATES = (2000, 500, 1000, 250)

__all__ = ["DemoError", "down", "up"]


class DemoError(Exception):
    """The demo could not be set up (or torn down); the message says what failed."""


def _run(*cmd: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise DemoError(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def _cgroup_mount() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if " - cgroup2 " in line:
            return Path(line.split()[4])
    raise DemoError("cgroup v2 is not mounted")


def _in_cgroup(cgroup: Path, netns: str, *cmd: str, env: dict[str, str]) -> None:
    """Run ``cmd`` in ``netns`` from a shell that moved itself into ``cgroup`` first."""
    script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    _run("sh", "-c", script, str(cgroup), "ip", "netns", "exec", netns, *cmd, env=env)


def _ovs_env(rundir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OVS_RUNDIR=str(rundir), OVS_DBDIR=str(rundir), OVS_LOGDIR=str(rundir), OVS_SYSCONFDIR=str(rundir))
    return env


def _tenant_up(k: int, mount: Path, rate: int) -> dict[str, object]:
    name = f"t{k}"
    sw, a, b = f"{PREFIX}{name}-sw", f"{PREFIX}{name}-a", f"{PREFIX}{name}-b"
    rundir = STATE / name
    rundir.mkdir(parents=True, exist_ok=True)
    cgroup = mount / "meter-demo" / name / "vswitch"
    cgroup.mkdir(parents=True, exist_ok=True)
    for ns in (sw, a, b):
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        # No IPv6 chatter (router solicitations, MLD, DAD) on ports made later:
        # `all` covers the interfaces there are, `default` the ones to come.
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True)
    macs = {a: f"02:00:5a:00:{k:02x}:01", b: f"02:00:5a:00:{k:02x}:02"}
    for vm, port, ip in ((a, "pa", f"10.90.{k}.1/24"), (b, "pb", f"10.90.{k}.2/24")):
        _run("ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", vm)
        _run("ip", "-n", sw, "link", "set", port, "up")
        _run("ip", "-n", vm, "link", "set", "eth0", "address", macs[vm])
        _run("ip", "-n", vm, "addr", "add", ip, "dev", "eth0")
        _run("ip", "-n", vm, "link", "set", "eth0", "up")
    # Static neighbours: the kernel's own ARP probes (sent when an entry goes
    # stale, at random times, frozen vswitch or not) would be packets no
    # tenant sent; the only traffic on the ports is the generator's.
    for vm, peer, ip in ((a, b, f"10.90.{k}.2"), (b, a, f"10.90.{k}.1")):
        _run("ip", "-n", vm, "neigh", "replace", ip, "lladdr", macs[peer], "dev", "eth0", "nud", "permanent")
    env = _ovs_env(rundir)
    db, sock = rundir / "conf.db", rundir / "db.sock"
    _run("ovsdb-tool", "create", str(db), str(SCHEMA), env=env)
    _in_cgroup(cgroup, sw, "ovsdb-server", str(db), f"--remote=punix:{sock}", f"--pidfile={rundir}/ovsdb-server.pid",
               f"--unixctl={rundir}/ovsdb-server.ctl", f"--log-file={rundir}/ovsdb-server.log", "--detach", env=env)
    vsctl = ("ovs-vsctl", f"--db=unix:{sock}", "--timeout=10")
    _run(*vsctl, "--no-wait", "init", env=env)
    # TCP through the userspace datapath over veth needs TSO support set before vswitchd starts.
    _run(*vsctl, "--no-wait", "set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true", env=env)
    _in_cgroup(cgroup, sw, "ovs-vswitchd", f"unix:{sock}", f"--pidfile={rundir}/ovs-vswitchd.pid",
               f"--unixctl={rundir}/ovs-vswitchd.ctl", f"--log-file={rundir}/ovs-vswitchd.log", "--detach", env=env)
    _run(*vsctl, "add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev", env=env)
    for port in ("pa", "pb"):
        _run(*vsctl, "add-port", "br0", port, env=env)
    # The generator: a "VM" process, outside the vswitch compartment.
    code = (f"import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"gap = 1.0 / {rate}\nnext_t = time.monotonic()\n"
            "while True:\n"
            f"    s.sendto(b'x' * 200, ('10.90.{k}.2', 9999))\n"
            "    next_t += gap\n"
            "    d = next_t - time.monotonic()\n"
            "    if d > 0: time.sleep(d)\n")
    gen = subprocess.Popen(["ip", "netns", "exec", a, sys.executable, "-S", "-c", code], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    (rundir / "generator.pid").write_text(str(gen.pid))
    return {"tenant": name, "cgroup": str(cgroup), "namespaces": [sw, a, b], "rate": rate,
            "interfaces": [f"{sw}:pa", f"{sw}:pb"], "rundir": str(rundir)}


def up(tenants: int = 3) -> Path:
    """Build the demo for ``tenants`` tenants; returns the topology file."""
    if tenants < 1 or tenants > 200:
        raise DemoError(f"--tenants must be between 1 and 200, not {tenants}")
    for tool in ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovsdb-tool"):
        if not shutil.which(tool):
            raise DemoError(f"{tool} is not installed: apt-get install openvswitch-switch")
    if (STATE / "state.json").exists():
        raise DemoError(f"a demo is already up ({STATE}/state.json): run `meter demo down` first")
    mount = _cgroup_mount()
    made: list[dict[str, object]] = []
    try:
        STATE.mkdir(parents=True, exist_ok=True)
        for k in range(tenants):
            made.append(_tenant_up(k, mount, RATES[k % len(RATES)]))
    except OSError as err:
        down()
        raise DemoError(f"setting up tenant t{len(made)} failed ({err.strerror}: {err.filename}); run as root. "
                        "Everything made was removed") from None
    except DemoError as err:
        down()
        raise DemoError(f"setting up tenant t{len(made)} failed, everything made was removed: {err}") from None
    lines = []
    for t in made:
        lines += ["[[tenant]]", f'name = "{t["tenant"]}"', "", "[[tenant.compartment]]", 'name = "vswitch"',
                  f'cgroup = "{t["cgroup"]}"', f'ovsdb = "unix:{Path(str(t["rundir"])) / "db.sock"}"', ""]
    topo = STATE / "topology.toml"
    topo.write_text("\n".join(lines))
    (STATE / "state.json").write_text(json.dumps({"tenants": made}, indent=2))
    return topo


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig) if path.name == "generator.pid" else os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)


def down() -> list[str]:
    """Remove everything a demo made; returns what was removed."""
    removed: list[str] = []
    if STATE.exists():
        for rundir in sorted(p for p in STATE.iterdir() if p.is_dir()):
            for pidfile in ("generator.pid", "ovs-vswitchd.pid", "ovsdb-server.pid"):
                _kill_pidfile(rundir / pidfile)
            removed.append(f"processes of {rundir.name}")
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        ns = line.split()[0] if line.strip() else ""
        if ns.startswith(PREFIX):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(f"namespace {ns}")
    try:
        root = _cgroup_mount() / "meter-demo"
    except DemoError:
        root = None
    if root is not None and root.exists():
        for cg in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [root]:
            for _ in range(100):
                try:
                    for pid in (cg / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                    cg.rmdir()
                    break
                except ProcessLookupError:
                    continue
                except OSError:
                    time.sleep(0.02)
        removed.append(f"cgroups under {root}")
    if STATE.exists():
        shutil.rmtree(STATE, ignore_errors=True)
        removed.append(str(STATE))
    return removed
