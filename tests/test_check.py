"""meter check: real probes on this host, fake trees for hardware it lacks."""

from __future__ import annotations

import json
import subprocess

import pytest

from meter.check import Finding, _rapl, _sriov, run_checks, verdict

KEYS = {
    "privileges", "bpf", "btf", "headers", "bcc", "raw_tp_sched_switch", "raw_tp_softirq_entry", "tc_clsact",
    "cgroup2", "counter_cycles", "counter_instructions", "counter_cache_misses", "rapl", "sriov", "openvswitch",
}


@pytest.mark.bpf
def test_check_runs_for_real_here():
    findings = run_checks()
    by = {f.key: f for f in findings}
    assert set(by) == KEYS
    for key in ("privileges", "bpf", "raw_tp_sched_switch", "raw_tp_softirq_entry", "tc_clsact", "cgroup2", "bcc"):
        assert by[key].status == "ok", by[key]
    assert by["headers"].status in ("ok", "fallback")
    ok, reason = verdict(findings)
    assert ok, reason
    # Each line says what meter will do.
    assert all(f.action for f in findings)


@pytest.mark.bpf
def test_check_json_cli(meter_bin):
    res = subprocess.run([*meter_bin, "check", "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] is True
    assert set(data["checks"]) == KEYS
    for f in data["checks"].values():
        assert set(f) == {"key", "title", "status", "detail", "action", "required"}


def test_verdict_names_the_failing_probe():
    fs = [Finding("bpf", "BPF syscall", "fail", "EPERM", "run as root", True),
          Finding("rapl", "RAPL", "missing", "none", "model", False)]
    ok, reason = verdict(fs)
    assert not ok and reason.startswith("BPF syscall: EPERM")
    assert verdict(fs[1:]) == (True, "meter can run here")


def test_rapl_from_a_fake_powercap_tree(tmp_path, monkeypatch):
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("123\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    f = _rapl(tmp_path)
    assert f.status == "ok" and f.detail == "powercap: package"


def test_no_rapl_means_model(tmp_path, monkeypatch):
    f = _rapl(tmp_path)
    assert f.status == "missing" and "model" in f.action


def test_sriov_lists_pfs_from_a_fake_sysfs(tmp_path):
    dev = tmp_path / "sys/class/net/enp3s0f0/device"
    dev.mkdir(parents=True)
    (dev / "sriov_totalvfs").write_text("8\n")
    (dev / "sriov_numvfs").write_text("4\n")
    (tmp_path / "sys/class/net/lo").mkdir()
    f = _sriov(tmp_path)
    assert f.status == "ok" and f.detail == "enp3s0f0 (4/8 VFs)"
    assert _sriov(tmp_path / "none").status == "missing"
