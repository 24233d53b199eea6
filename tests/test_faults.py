"""Faults: a full disk, no privileges, SIGKILL with tc filters attached, and the store's integrity."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from meter.errors import SinkError
from meter.sinks.store import Store

from .test_bill import T0, records

pytestmark = pytest.mark.bpf


def test_disk_full_is_a_clear_error_and_corrupts_nothing(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        with Store(mnt / "r.db") as s:
            stored = 0
            with pytest.raises(SinkError) as info:
                for i in range(1000):
                    stored += s.write(records("h", 1000, seq0=i * 4000, t0=T0 + i * 10**9))
            assert "nothing of this batch was stored" in str(info.value) and str(mnt) in str(info.value)
            assert stored > 0
            assert s.next_seq("h") == stored  # the failed batch left no trace
        db = sqlite3.connect(mnt / "r.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with Store(mnt / "r.db") as s:
            assert len(s.records()) == stored
            assert sum(r["records"] for r in s.rollup("rollup_1s")) == stored
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_unprivileged_run_names_the_missing_capability(meter_bin, tmp_path):
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                          *meter_bin, "record", "--duration", "1", "-o", "-"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, METER_CACHE_DIR=str(tmp_path), HOME=str(tmp_path)))
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert "CAP_BPF" in res.stderr and "sudo" in res.stderr


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


def _stop(p: subprocess.Popen[str], timeout: float) -> str:
    """SIGTERM, wait up to ``timeout`` s for the exit and return stderr; never leave it running."""
    try:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        return p.communicate(timeout=timeout)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _meter_filter_ids(dev: str) -> list[int]:
    """Program ids of meter's ingress filters on dev."""
    out = subprocess.run(["tc", "-j", "filter", "show", "dev", dev, "ingress"], capture_output=True, text=True).stdout
    return sorted(f["options"].get("prog", {}).get("id", -1) for f in json.loads(out or "[]")
                  if "meter" in json.dumps(f) and "options" in f)


def _meter_filters(dev: str) -> int:
    out = subprocess.run(["tc", "-j", "filter", "show", "dev", dev, "ingress"], capture_output=True, text=True).stdout
    return sum(1 for f in json.loads(out or "[]") if "meter" in json.dumps(f))


_HOLD = """
import os, sys, time
from meter.bpfsys import PROG_SOCKET_FILTER, Bpf
b = Bpf()
fd, err = b.load(PROG_SOCKET_FILTER, b"meter_held")
print(b.prog_info(fd).id, flush=True)
time.sleep(600)
"""


def test_held_prog_ids_sees_other_processes_programs_until_they_exit():
    from meter.bpfsys import held_prog_ids

    p = subprocess.Popen([sys.executable, "-c", _HOLD], stdout=subprocess.PIPE, text=True)
    try:
        prog_id = int(p.stdout.readline())
        assert prog_id in held_prog_ids()
    finally:
        p.kill()
        p.wait()
    assert prog_id not in held_prog_ids()


def test_sigkill_then_restart_cleans_stale_attachments(tmp_path, cgroups, cgroup_mount, net, meter_bin):
    dev = net.name("k0")
    net.veth(dev, net.name("k1"))
    cg = cgroups.make("k")
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[tenant]]\nname = "k"\n[[tenant.compartment]]\nname = "vs"\n'
                   f'cgroup = "{cg.relative_to(cgroup_mount)}"\ninterfaces = ["{dev}"]\n')
    out = tmp_path / "r.jsonl"
    p = subprocess.Popen([*meter_bin, "record", "--config", str(cfg), "-o", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _meter_filters(dev) == 0:
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # A killed meter cannot clean up: its tc filter (and program) outlive it.
    assert _meter_filters(dev) >= 1
    stale = _meter_filter_ids(dev)
    p = subprocess.Popen([*meter_bin, "record", "--config", str(cfg), "-o", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        # Start-up takes seconds on a busy host: wait for the new meter's filter.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _meter_filter_ids(dev) in ([], stale):
            time.sleep(0.1)
        time.sleep(0.5)
        # The stale one (a meter filter whose program no process holds) was removed, not doubled.
        assert _meter_filters(dev) == 1
        ours = _meter_filter_ids(dev)
        assert ours != stale
    finally:
        err = _stop(p, 30)
    assert p.returncode == 0, err
    assert f"removed a meter filter on {dev} (ingress) that no running process holds" in err, err
    assert _meter_filters(dev) == 0
    # Both meters' tc programs are gone (only these ids: other meters may run on the host).
    progs = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True).stdout
    assert not {x["id"] for x in json.loads(progs)} & set(stale + ours)


@pytest.mark.bpf
def test_sigterm_during_start_up_stops_the_meter(tmp_path, cgroups, meter_bin):
    """A stop asked for while the programs compile is kept, not lost when open() finishes."""
    cgroups.make("s")
    p = subprocess.Popen([*meter_bin, "record", "--cgroup-root", str(cgroups.root), "-o", str(tmp_path / "r.jsonl")],
                         stderr=subprocess.PIPE, text=True)
    # meter installs its SIGTERM handler just before it loads the programs (bcc
    # compiles for seconds on any host): signal as soon as it is there. A fixed
    # sleep was sometimes shorter than Python's start-up on a loaded host, and
    # the default action killed it (-15).
    deadline = time.monotonic() + 60
    while not _catches(p.pid, signal.SIGTERM):
        assert time.monotonic() < deadline and p.poll() is None, "meter never installed its SIGTERM handler"
        time.sleep(0.005)
    err = _stop(p, 60)
    assert p.returncode == 0, err
