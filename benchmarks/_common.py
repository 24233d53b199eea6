"""Shared benchmark plumbing: one result format, bpf_stats, load generators.

Every benchmark measures its figure and a baseline in the same run (the
machine is shared and noisy) and reports the ratio against a goal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclasses.dataclass
class Result:
    """One benchmark figure with its same-run baseline and goal."""

    name: str
    value: float
    unit: str
    baseline: float | None
    baseline_label: str
    ratio: float | None
    goal: str
    met: bool
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        base = "" if self.baseline is None else f"  baseline {self.baseline:.4g} {self.unit} ({self.baseline_label})"
        ratio = "" if self.ratio is None else f"  ratio {self.ratio:.3f}"
        verdict = "info" if not self.goal else f"goal {self.goal}  {'MET' if self.met else 'NOT MET'}"
        return f"{self.name}: {self.value:.4g} {self.unit}{base}{ratio}  {verdict}"


def report(results: list[Result]) -> None:
    """Print each result; with --json also one JSON document on the last line."""
    for r in results:
        print(r.line())
    if "--json" in sys.argv:
        print(json.dumps([dataclasses.asdict(r) for r in results]))


@contextlib.contextmanager
def bpf_stats(on: bool = True) -> Iterator[None]:
    """Turn kernel.bpf_stats_enabled on for the block (run_time_ns, run_cnt), or off
    (throughput benchmarks: the stats' own clock reads would cost every program run)."""
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    path.write_text("1" if on else "0")
    try:
        yield
    finally:
        path.write_text(old)


def prog_stats(names: list[str]) -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of the newest loaded program with each name, (0, 0) for
    one not loaded. (A Meter's own programs: ``Meter.program_stats()``.)"""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    found: dict[str, tuple[int, int, int]] = {}
    for p in json.loads(out):
        name = p.get("name")
        if name in names and (name not in found or p["id"] > found[name][0]):
            found[name] = (p["id"], p.get("run_time_ns", 0), p.get("run_cnt", 0))
    return {n: (found[n][1], found[n][2]) if n in found else (0, 0) for n in names}


def per_run(ns: int, runs: int) -> float:
    """ns per run; NaN (no figure, so never a met goal) for a program that never ran."""
    return ns / runs if runs else math.nan


def switch_load(seconds: float, pin: str | None = None, started: Callable[[int], None] | None = None) -> str:
    """Generate context switches for ``seconds``: perf bench sched pipe (under
    ``taskset -c pin`` when given: then every switch is between its two
    tasks), else a Python pipe ping-pong. ``started(pid)`` is called with
    perf's pid once it runs (perf bench only)."""
    perf = shutil.which("perf")
    if perf:
        cmd = [perf, "bench", "sched", "pipe", "-l", "100000000"]
        if pin:
            cmd = ["taskset", "-c", pin, *cmd]
        # Its own process group: perf forks a worker, and killing perf alone
        # left that worker running for hours.
        proc = subprocess.Popen(cmd,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            if started is not None:
                started(proc.pid)
            time.sleep(seconds)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "perf bench sched pipe" + (f" (taskset -c {pin})" if pin else "")
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        while os.read(r1, 1):
            os.write(w2, b"x")
        os._exit(0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            os.write(w1, b"x")
            os.read(r2, 1)
    os.close(w1)
    os.waitpid(pid, 0)
    return "python pipe ping-pong"


@contextlib.contextmanager
def namespace_pair(tag: str = "mb") -> Iterator[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair (10.79.0.1 <-> 10.79.0.2).

    Yields (ns_a, ns_b, veth end in ns_a); everything is removed after.
    """
    a, b = f"{tag}a{os.getpid()}", f"{tag}b{os.getpid()}"

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        run("ip", "netns", "add", a)
        run("ip", "netns", "add", b)
        run("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, dev, addr in ((a, "va", "10.79.0.1/24"), (b, "vb", "10.79.0.2/24")):
            run("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        yield a, b, "va"
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)


def udp_flood(ns: str, dst: str, seconds: float) -> subprocess.Popen[bytes]:
    """Start sending small UDP packets from ``ns`` to ``dst`` for ``seconds``; the sender's process."""
    code = (f"import socket, time\ns=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"end=time.monotonic()+{seconds}\n"
            "while time.monotonic()<end:\n"
            "    for _ in range(1000): s.sendto(b'x'*64, ('" + dst + "', 9))\n")
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-S", "-c", code])


@contextlib.contextmanager
def tcp_stream(src_ns: str, dst_ns: str, dst: str, seconds: float) -> Iterator[subprocess.Popen[bytes]]:
    """A TCP stream from ``src_ns`` to ``dst`` (in ``dst_ns``, which reads and drops it) for
    ``seconds``; yields the sender's process."""
    sink = ("import socket\nl=socket.socket()\nl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "l.bind(('0.0.0.0', 5299))\nl.listen(1)\nprint('up', flush=True)\nc, _ = l.accept()\n"
            "while c.recv(1 << 20): pass\n")
    server = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-S", "-c", sink],
                              stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"up\n"
        code = (f"import socket, time\ns=socket.create_connection(('{dst}', 5299))\nb=b'x'*65536\n"
                f"end=time.monotonic()+{seconds}\n"
                "while time.monotonic()<end:\n"
                "    for _ in range(16): s.sendall(b)\n")
        yield subprocess.Popen(["ip", "netns", "exec", src_ns, sys.executable, "-S", "-c", code])
    finally:
        server.kill()
        server.wait()


@contextlib.contextmanager
def cgroup_tree(tag: str) -> Iterator[Path]:
    """A private cgroup under the v2 mount; on exit its tasks are killed and it is removed."""
    import signal
    import uuid

    from meter.cgroup import find_mount

    root = find_mount() / f"meter-{tag}-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    try:
        yield root
    finally:
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True) + [root]
        for d in dirs:
            for _ in range(100):
                try:
                    for pid in (d / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                    d.rmdir()
                    break
                except ProcessLookupError:
                    continue
                except OSError:
                    time.sleep(0.02)


#: A busy tenant task (``python -S -c BUSY_WORKER``): 50 us of work every 10 ms, so a
#: hundred of them keep half a core busy and wake thousands of times a second.
BUSY_WORKER = """
import time
while True:
    end = time.monotonic() + 0.00005
    while time.monotonic() < end: pass
    time.sleep(0.01)
"""


def spawn_in(cgroup: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` already inside ``cgroup`` (it moves itself in, then execs)."""
    return subprocess.Popen(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv],
                            stdout=subprocess.DEVNULL)
