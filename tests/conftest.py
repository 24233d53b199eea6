"""Shared fixtures: real cgroups, processes placed in them, and the CI rule.

Kernel tests carry the ``bpf`` marker. They skip cleanly without root (a
laptop), but with ``CI=true`` a skipped ``bpf`` test is turned into a
failure, so the kernel suite can never silently stop running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _kernel_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root to load BPF programs"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (install python3-bpfcc, use make setup)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _kernel_ready()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("bpf"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and item.get_closest_marker("bpf"):
        report.outcome = "failed"
        report.longrepr = f"bpf test skipped in CI (CI=true): {report.longrepr}"


@pytest.fixture(scope="session")
def cgroup_mount() -> Path:
    from meter.cgroup import find_mount

    return find_mount()


class Cgroups:
    """Creates cgroups under a private parent; cleans up processes and dirs."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.root = mount / f"meter-test-{uuid.uuid4().hex[:8]}"
        self.root.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []

    def make(self, rel: str) -> Path:
        path = self.root / rel
        path.mkdir(parents=True, exist_ok=True)
        return path

    def spawn(self, cgroup: Path, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` already inside ``cgroup`` (it moves itself in, then execs)."""
        p = subprocess.Popen(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv],
            stdout=subprocess.DEVNULL,
        )
        self.procs.append(p)
        return p

    def spawn_stopped(self, cgroup: Path, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` stopped (SIGSTOP, before it execs), then move it into ``cgroup``.

        It is moved from outside once it is off its CPU, so every nanosecond
        of it the kernel charges to ``cgroup`` runs after the caller's SIGCONT,
        and none of it ran in ``cgroup`` before: a fresh cgroup's cpu.stat is
        then exactly the process's usage. (A process that moves itself has a
        slice that began in the cgroup it came from.)
        """
        p = subprocess.Popen(["sh", "-c", 'kill -STOP $$ && exec "$@"', "sh", *argv], stdout=subprocess.DEVNULL)
        self.procs.append(p)
        deadline = time.monotonic() + 30
        while not _stopped_off_cpu(p.pid):
            assert time.monotonic() < deadline and p.poll() is None, f"{argv[0]} did not start"
            time.sleep(0.002)
        (cgroup / "cgroup.procs").write_text(str(p.pid))
        return p

    def burner_code(self, duty: float, seconds: float) -> list[str]:
        """argv of a process busy ``duty`` of every 10 ms for ``seconds``."""
        code = (
            "import time\n"
            f"end = time.monotonic() + {seconds}\n"
            "while (now := time.monotonic()) < end:\n"
            f"    busy_until = now + {0.01 * duty}\n"
            "    while time.monotonic() < busy_until: pass\n"
            f"    time.sleep({0.01 * (1 - duty)})\n"
        )
        return [sys.executable, "-S", "-c", code]

    def burner(self, cgroup: Path, duty: float, seconds: float) -> subprocess.Popen[bytes]:
        """A process busy ``duty`` of every 10 ms for ``seconds``, running in
        ``cgroup`` from its first nanosecond (see :meth:`spawn_stopped`)."""
        p = self.spawn_stopped(cgroup, self.burner_code(duty, seconds))
        os.kill(p.pid, signal.SIGCONT)
        return p

    def remove(self, path: Path) -> None:
        for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            self._rmdir(child)
        self._rmdir(path)

    def _rmdir(self, path: Path) -> None:
        for _ in range(100):
            try:
                pids = (path / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                path.rmdir()
                return
            except OSError:
                time.sleep(0.02)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.remove(self.root)


@pytest.fixture
def cgroups(cgroup_mount: Path) -> Iterator[Cgroups]:
    cg = Cgroups(cgroup_mount)
    try:
        yield cg
    finally:
        cg.cleanup()


@pytest.fixture(scope="session")
def meter_bin() -> list[str]:
    exe = shutil.which("meter", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "meter.cli"]


def wait_for_records(store: Path, proc: subprocess.Popen[Any], more_than: int = 0, timeout: float = 60) -> None:
    """Wait until ``meter record`` (``proc``) has stored more than ``more_than`` records of this
    host in ``store``: start-up compiles the programs, seconds on a busy host."""
    import socket

    from meter.sinks.store import Store

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if store.exists():
            with Store(store) as s:
                if s.next_seq(socket.gethostname()) > more_than:
                    return


def sh(*cmd: str) -> str:
    """Run a command, fail loudly with its stderr."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res.stdout


def iface_counters(ns: str | None, dev: str) -> dict[str, int]:
    """The interface's own packet and byte counters (ns None: this namespace)."""
    pre = ["ip", "netns", "exec", ns] if ns else []
    return {key: int(sh(*pre, "cat", f"/sys/class/net/{dev}/statistics/{key}"))
            for key in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes")}


class Net:
    """Network namespaces and veth pairs made for one test, all removed after it."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.namespaces: list[str] = []
        self.links: list[str] = []

    def ns(self, name: str) -> str:
        full = f"mt{self.tag}{name}"
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        sh("ip", "netns", "exec", full, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def name(self, short: str) -> str:
        return f"m{self.tag}{short}"[:15]

    def veth(self, a: str, b: str, *, a_ns: str | None = None, b_ns: str | None = None) -> None:
        """A veth pair a <-> b, each end in a namespace (None: this one), up, IPv6 off."""
        cmd = ["ip", "link", "add", a]
        if a_ns:
            cmd += ["netns", a_ns]
        cmd += ["type", "veth", "peer", "name", b]
        if b_ns:
            cmd += ["netns", b_ns]
        sh(*cmd)
        if a_ns is None:
            self.links.append(a)
        for dev, ns in ((a, a_ns), (b, b_ns)):
            pre = ["ip", "netns", "exec", ns] if ns else []
            subprocess.run([*pre, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"], capture_output=True)
            sh(*(["ip", "-n", ns] if ns else ["ip"]), "link", "set", dev, "up")

    def ip(self, ns: str | None, *args: str) -> str:
        return sh(*(["ip", "-n", ns] if ns else ["ip"]), *args)

    def counters(self, ns: str | None, dev: str) -> dict[str, int]:
        return iface_counters(ns, dev)

    def udp(self, ns: str, dst: str, count: int, size: int = 100) -> list[str]:
        code = (f"import socket\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for i in range({count}): s.sendto(b'x'*{size}, ('{dst}', 9999))\n")
        return ["ip", "netns", "exec", ns, sys.executable, "-S", "-c", code]

    def cleanup(self) -> None:
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        n.cleanup()


@pytest.fixture(autouse=True)
def _private_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never let a test write to the real /var/lib/meter store."""
    monkeypatch.setenv("METER_STORE", str(tmp_path_factory.mktemp("store") / "records.db"))


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def _stopped_off_cpu(pid: int) -> bool:
    """Stopped and no longer running: "T" shows as soon as a task starts to
    stop; its run time (which /proc brings up to date for a running task)
    stands still once it is off its CPU."""
    if not _stopped(pid):
        return False
    try:
        first = Path(f"/proc/{pid}/schedstat").read_text().split()[0]
        time.sleep(0.002)
        return Path(f"/proc/{pid}/schedstat").read_text().split()[0] == first
    except FileNotFoundError:
        return False


def steal_ns() -> int:
    """Hypervisor steal time of all CPUs so far (/proc/stat, USER_HZ ticks).

    meter charges by the clock, so time the hypervisor stole from a running
    task is charged to it; the kernel's paravirt accounting leaves it out
    of cpu.stat. Tests comparing the two allow for the steal they saw.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) * 10**9 // os.sysconf("SC_CLK_TCK")
