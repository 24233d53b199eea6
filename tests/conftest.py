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

    def burner(self, cgroup: Path, duty: float, seconds: float) -> subprocess.Popen[bytes]:
        """A process busy ``duty`` of every 10 ms for ``seconds``."""
        code = (
            "import time\n"
            f"end = time.monotonic() + {seconds}\n"
            "while (now := time.monotonic()) < end:\n"
            f"    busy_until = now + {0.01 * duty}\n"
            "    while time.monotonic() < busy_until: pass\n"
            f"    time.sleep({0.01 * (1 - duty)})\n"
        )
        return self.spawn(cgroup, [sys.executable, "-S", "-c", code])

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
