"""One root for everything meter reads about the host: METER_HOST_ROOT."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meter import host
from meter.btf import BTFError, kernel_btf
from meter.cgroup import find_mount
from meter.check import _rapl, _sriov
from meter.perf import cpu_hz
from meter.privileges import missing_capabilities


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host tree as a container that mounts the host at /host would see it."""
    root = tmp_path / "host"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(
        "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n")
    (root / "proc/self/status").write_text("Name:\tmeter\nCapEff:\t0000000000000000\n")
    (root / "proc/cpuinfo").write_text("processor\t: 0\ncpu MHz\t\t: 2345.678\n")
    (root / "sys/class/net/enp3s0f0/device").mkdir(parents=True)
    (root / "sys/class/net/enp3s0f0/device/sriov_totalvfs").write_text("8\n")
    (root / "sys/class/net/enp3s0f0/device/sriov_numvfs").write_text("2\n")
    zone = root / "sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("1\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    monkeypatch.setenv(host.ROOT_ENV, str(root))
    return root


def test_every_reader_follows_the_host_root(fake_host):
    assert host.root() == fake_host
    assert find_mount() == fake_host / "sys/fs/cgroup"
    assert cpu_hz() == 2_345_678_000
    # Root needs no capabilities; anyone else is judged by the fake CapEff (none).
    assert missing_capabilities() == ([] if os.geteuid() == 0 else ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"])
    assert _rapl().detail == "powercap: package"
    assert "enp3s0f0" in _sriov().detail
    with pytest.raises(BTFError, match=str(fake_host / "sys/kernel/btf/vmlinux")):
        kernel_btf()


def test_an_explicit_root_wins_over_the_environment(fake_host, tmp_path):
    other = tmp_path / "other"
    (other / "proc").mkdir(parents=True)
    (other / "proc/cpuinfo").write_text("cpu MHz\t: 1000\n")
    assert cpu_hz(other) == 1_000_000_000 and cpu_hz() == 2_345_678_000
    assert host.path("/sys/class/net", other) == other / "sys/class/net"


def test_without_the_variable_the_root_is_slash(monkeypatch):
    monkeypatch.delenv(host.ROOT_ENV, raising=False)
    assert host.root() == Path("/") and host.path("proc/self/status") == Path("/proc/self/status")


def test_read_helpers_never_raise(tmp_path):
    (tmp_path / "n").write_text(" 42\n")
    (tmp_path / "x").write_text("forty-two\n")
    assert host.read_int(tmp_path / "n") == 42
    assert host.read_int(tmp_path / "x", -1) == -1
    assert host.read_text(tmp_path / "missing", "d") == "d"
