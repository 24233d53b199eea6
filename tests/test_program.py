"""The BPF sources ship in the package and load for real."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from meter import program


def test_sources_are_package_resources():
    src = program.bpf_source_dir()
    assert (src / "sched.bpf.c").is_file()
    assert (src / "meter.h").is_file()
    text = (src / "sched.bpf.c").read_text()
    assert text.startswith("// SPDX-License-Identifier:")


def test_a_second_checkout_compiles_its_own_programs(tmp_path):
    """meter imported from another source tree (a git worktree, for an A/B
    benchmark) takes that tree's bpf/, not the installed one's: else the
    other tree's Python would load this tree's kernel programs."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(program.__file__).resolve().parent.parent
    for part in ("meter", "bpf"):
        shutil.copytree(root / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import meter.program as p; print(p.__file__); print(p.bpf_source_dir())"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(tmp_path / "meter" / "program.py"), str(tmp_path / "bpf")]


def test_unseen_slices_are_recovered_only_where_task_storage_exists():
    """Task storage and bpf_get_current_task_btf came in Linux 5.11; on older
    kernels the program is compiled without recover_unseen()."""
    from meter.sources.sched import task_storage

    assert not task_storage("5.10.209-1-amd64")
    assert task_storage("5.11.0") and task_storage("6.18.44-fc-v1147") and task_storage("10.0")
    assert not task_storage("unknown")


def _loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out)}


def _prog_id(fd: int) -> int:
    """The kernel's id of the BPF program behind one of this process's fds."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("prog_id:"))


@pytest.mark.bpf
def test_sched_program_loads_attaches_and_leaves_nothing():
    """Only this program's own id is looked at: other meters may run on the host."""
    bpf = program.load("sched", {"METER_NR_COUNTERS": 0, "METER_WINDOW_NS": "1000000ULL"})
    try:
        bpf.attach_raw_tracepoint(tp=b"sched_switch", fn_name=b"meter_switch")
        assert b"sched_switch" in bpf.raw_tracepoint_fds
        ours = _prog_id(bpf.funcs[b"meter_switch"].fd)
        assert ours in _loaded_prog_ids()
    finally:
        bpf.cleanup()
    # Programs are freed after an RCU grace period: give it a moment.
    for _ in range(100):
        if ours not in _loaded_prog_ids():
            break
        time.sleep(0.02)
    assert ours not in _loaded_prog_ids()


def test_without_privileges_is_one_clear_error(monkeypatch, tmp_path):
    from meter import privileges
    from meter.errors import PrivilegeError

    (tmp_path / "proc/self").mkdir(parents=True)
    status = tmp_path / "proc/self/status"
    monkeypatch.setattr(privileges.os, "geteuid", lambda: 1000)
    status.write_text("Name:\tmeter\nCapEff:\t0000000000000000\n")
    with pytest.raises(PrivilegeError, match="CAP_BPF") as info:
        privileges.require_bpf(tmp_path)
    assert info.value.capability == "CAP_BPF"
    assert privileges.missing_capabilities(tmp_path) == ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
    # CAP_BPF (39) and CAP_PERFMON (38) but no CAP_NET_ADMIN (12).
    status.write_text(f"CapEff:\t{(1 << 39) | (1 << 38):016x}\n")
    privileges.require_bpf(tmp_path)
    assert privileges.missing_capabilities(tmp_path) == ["CAP_NET_ADMIN"]


@pytest.mark.bpf
def test_the_longest_allowed_charge_split_passes_the_verifier():
    """The engine lets a drain interval need MAX_SPAN_LIMIT windows per charge:
    the program must load with that, with every counter and with ports."""
    from bcc import BPF

    from meter.bpfabi import MAX_COUNTERS
    from meter.engine import MAX_SPAN_LIMIT
    from meter.perf import parse_event
    from meter.sources.sched import SchedSource

    src = SchedSource(1_000_000, [parse_event("sw:cpu-clock")] * MAX_COUNTERS, max_span=MAX_SPAN_LIMIT,
                      net=True, max_ports=4)
    bpf = program.load(*src.defines())
    assert src.same_run, "this kernel's BTF has task_struct.cgroups: switches inside one css_set join runs"
    try:
        for fn, kind in ((b"meter_switch", BPF.RAW_TRACEPOINT), (b"meter_charge", BPF.RAW_TRACEPOINT),
                         (b"meter_settle", BPF.RAW_TRACEPOINT), (b"meter_tick", BPF.PERF_EVENT),
                         (b"meter_softirq_exit", BPF.RAW_TRACEPOINT)):
            bpf.load_func(fn, kind)
    finally:
        bpf.cleanup()


def test_a_drain_interval_beyond_twice_the_split_limit_is_refused():
    """Beyond the split's limit a take interval gets a close between takes (idle
    CPUs nudged in between, so no charge spans more than the limit); beyond
    twice the limit it is refused."""
    from meter import Topology
    from meter.engine import Meter
    from meter.errors import ConfigError

    assert Meter(Topology((), Path("/")), drain_interval=0.25).closes_per_take == 1
    assert Meter(Topology((), Path("/")), drain_interval=0.5).closes_per_take == 2
    with pytest.raises(ConfigError, match="too long for 1 ms windows"):
        Meter(Topology((), Path("/")), drain_interval=1.0)
