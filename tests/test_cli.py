"""The meter command: output contracts, errors, and signals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meter.cgroup import cpu_usage_usec
from meter.records import FIELDS


def run(meter_bin, *args, timeout=60):
    return subprocess.run([*meter_bin, *args], capture_output=True, text=True, timeout=timeout)


def test_bad_config_is_one_line_and_exit_1(meter_bin, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[tenant]]\nname = "a"\nnmae = "typo"\n')
    res = run(meter_bin, "record", "--config", str(cfg), "--duration", "1")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("meter: error: ") and f"{cfg}:3" in lines[0] and "nmae" in lines[0]
    assert "Traceback" not in res.stderr


def test_missing_cgroup_root_is_one_line(meter_bin):
    res = run(meter_bin, "record", "--cgroup-root", "/sys/fs/cgroup/unified/no-such-meter-cgroup", "--duration", "1")
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "does not exist" in res.stderr


def test_a_dependencys_deprecation_notice_does_not_reach_the_user():
    """What CI met when cryptography 51 came out: Debian's pyOpenSSL, imported by botocore,
    printed a CryptographyDeprecationWarning above `meter ship`'s one-line error."""
    script = """
import sys, warnings
from meter import shell
class CryptographyDeprecationWarning(UserWarning): pass
warnings.warn_explicit("DSA is deprecated", CryptographyDeprecationWarning, "/usr/lib/python3/dist-packages/OpenSSL/crypto.py", 83)
shell.quiet_dependency_notices()
warnings.warn_explicit("second DSA notice", CryptographyDeprecationWarning, "/usr/lib/python3/dist-packages/OpenSSL/crypto.py", 84)
warnings.warn_explicit("pandas inplace", FutureWarning, "/venv/pandas/frame.py", 9)
warnings.warn_explicit("meter's own notice", DeprecationWarning, shell.__file__, 1)
warnings.warn_explicit("a dependency's plain warning", UserWarning, "/venv/lib/x.py", 2)
"""
    res = subprocess.run([sys.executable, "-W", "always::DeprecationWarning",
                          "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # Before the hook the notice shows (so the check below can fail); after it, only meter's own
    # notices and warnings that are not about deprecation.
    assert "DSA is deprecated" in res.stderr
    for gone in ("second DSA notice", "pandas inplace"):
        assert gone not in res.stderr
    for kept in ("meter's own notice", "a dependency's plain warning"):
        assert kept in res.stderr


def test_config_and_root_together_is_a_usage_error(meter_bin, tmp_path):
    res = run(meter_bin, "record", "--config", "x.toml", "--cgroup-root", "/")
    assert res.returncode == 1 and res.stderr.startswith("meter: error: ") and "not both" in res.stderr
    assert res.stderr.count("\n") == 1  # one line, as every error


@pytest.mark.bpf
def test_record_jsonl_fields_and_file_mode(meter_bin, tmp_path, cgroups):
    cgroups.make("j")
    out = tmp_path / "r.jsonl"
    res = run(meter_bin, "record", "--cgroup-root", str(cgroups.root), "--duration", "0.5", "--output", str(out))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) > 400
    assert all(list(r) == list(FIELDS) for r in rows)
    # host (meter itself runs there); no idle row is promised: a host kept 100 % busy has none.
    assert "host" in {r["tenant"] for r in rows}
    assert all(r["rx_packets"] is None and r["net_source"] is None for r in rows)  # not measured: null, not 0
    assert all(r["energy_uj"] is not None and r["energy_source"] for r in rows)  # measured or modelled, and says which
    seqs = [r["seq"] for r in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert "records" in res.stderr


@pytest.mark.bpf
def test_record_csv(meter_bin, tmp_path, cgroups):
    out = tmp_path / "r.csv"
    res = run(meter_bin, "record", "--cgroup-root", str(cgroups.root), "--duration", "0.3",
              "--format", "csv", "--window-ms", "10", "-o", str(out))
    assert res.returncode == 0, res.stderr
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(FIELDS)
    assert {r["window_ms"] for r in rows} == {"10"}
    assert all(r["instructions"] in ("", None) or int(r["instructions"]) >= 0 for r in rows)


@pytest.mark.bpf
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_flushes_and_exits_0(meter_bin, tmp_path, cgroups, sig):
    out = tmp_path / "r.jsonl"
    p = subprocess.Popen([*meter_bin, "record", "--cgroup-root", str(cgroups.root), "-o", str(out)],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    time.sleep(0.3)
    stopped_at = time.time_ns()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    last_end = max(r["window_start_ns"] + r["window_ms"] * 1_000_000 for r in rows)
    # Flushed up to the last complete window before the signal (within scheduling slack).
    assert stopped_at - last_end < 50_000_000
    starts = sorted({r["window_start_ns"] for r in rows})
    assert all(b - a == 1_000_000 for a, b in zip(starts, starts[1:]))


@pytest.mark.bpf
def test_top_once_json_and_print_once_when_not_a_tty(meter_bin, cgroups):
    cgroups.make("t")
    res = run(meter_bin, "top", "--json", "--cgroup-root", str(cgroups.root), "--interval", "0.5")
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    tenants = {r["tenant"]: r for r in snap["tenants"]}
    assert sum(r["cpu_pct"] for r in tenants.values()) == pytest.approx(snap["ncpu"] * 100, rel=0.01)
    assert tenants["host"]["rx_packets_per_s"] is None  # no ports: unavailable, not 0
    res = run(meter_bin, "top", "--cgroup-root", str(cgroups.root), "--interval", "0.5")  # stdout is a pipe
    assert res.returncode == 0, res.stderr
    assert "TENANT/COMPARTMENT" in res.stdout and "host" in res.stdout and "–" in res.stdout


def _last_window_ns(path) -> int:
    """window_start_ns of the last complete record line in a jsonl file (0: none yet)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["window_start_ns"])
        except ValueError:
            continue  # a line still being written
    return 0


@pytest.mark.bpf
def test_sighup_reloads_the_topology_without_a_gap(meter_bin, tmp_path, cgroups, cgroup_mount):
    a, b = cgroups.make("a"), cgroups.make("b")

    def config(*cgs):
        return "".join(f'[[tenant]]\nname = "{cg.name}"\n[[tenant.compartment]]\nname = "c"\n'
                       f'cgroup = "{cg.relative_to(cgroup_mount)}"\n' for cg in cgs)

    cfg = tmp_path / "t.toml"
    cfg.write_text(config(a))
    out = tmp_path / "r.jsonl"
    p = subprocess.Popen([*meter_bin, "record", "--config", str(cfg), "-o", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    cgroups.burner(a, 1.0, 0.3).wait()
    used_a = cpu_usage_usec(a) * 1000
    done_ns = time.time_ns()
    # a's windows are written under the old topology before it changes.
    while time.monotonic() < deadline and _last_window_ns(out) < done_ns:
        time.sleep(0.05)
    cfg.write_text("this is = not toml [")
    p.send_signal(signal.SIGHUP)  # a bad file: keep the old topology
    time.sleep(0.5)
    cfg.write_text(config(b))  # a leaves, b joins
    p.send_signal(signal.SIGHUP)
    time.sleep(0.6)
    cgroups.burner(b, 1.0, 0.3).wait()
    used_b = cpu_usage_usec(b) * 1000
    cgroups.burner(a, 1.0, 0.3).wait()  # a's tasks now count as host
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "reload failed, keeping the previous topology" in err and "topology reloaded: 1 compartments" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tenants = {r["tenant"] for r in rows}
    assert {"a", "b", "host"} <= tenants  # (idle only if a CPU idled: not on a saturated host)
    usage = {t: sum(r["cpu_ns"] for r in rows if r["tenant"] == t) for t in ("a", "b")}
    # Each busy loop billed while its compartment was in the topology is what
    # the kernel charged its fresh cgroup: cpu.stat, to the billing target
    # (0.2 %) and cpu.stat's 1 us unit.
    for t, used in (("a", used_a), ("b", used_b)):
        assert used > 0.05e9 and abs(usage[t] - used) <= 0.002 * used + 1_000, (t, usage[t], used)
    last_a = max(r["window_start_ns"] for r in rows if r["tenant"] == "a")
    first_b = min(r["window_start_ns"] for r in rows if r["tenant"] == "b")
    assert last_a < first_b  # a's second burn went to host
    starts = sorted({r["window_start_ns"] for r in rows})
    assert all(y - x == 1_000_000 for x, y in zip(starts, starts[1:]))  # no gap at either reload
    per_window: dict[int, int] = {}
    for r in rows:
        per_window[r["window_start_ns"]] = per_window.get(r["window_start_ns"], 0) + r["cpu_ns"]
    assert len(set(per_window.values())) == 1  # every window still adds up


def test_print_bpf_shows_the_program_and_its_settings_without_loading_it(meter_bin, cgroup_mount):
    res = run(meter_bin, "record", "--cgroup-root", str(cgroup_mount), "--window-ms", "5", "--print-bpf")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "// cflag: -DMETER_WINDOW_NS=5000000ULL" in out
    assert "SEC(\"raw_tracepoint/sched_switch\")" in out or "meter_switch" in out
    # The kernel fields the program reads come from this kernel's BTF.
    if Path("/sys/kernel/btf/vmlinux").exists():
        assert "// cflag: -DMETER_TASK_SUM_OFF=" in out


@pytest.mark.parametrize("value", ["0", "-1", "60001", str(10**12)])
def test_unsupported_window_ms_is_one_line_and_exit_1(meter_bin, cgroup_mount, value):
    res = run(meter_bin, "record", "--cgroup-root", str(cgroup_mount), "--window-ms", value, "-o", "-")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "between 1 and 60000 ms" in res.stderr and "--window-ms" in res.stderr


@pytest.mark.bpf
def test_windows_longer_than_two_seconds_are_metered(meter_bin, cgroups):
    """2148 ms is past 2^31 ns, where the tick period used to wrap."""
    cgroups.make("w")
    res = run(meter_bin, "record", "--cgroup-root", str(cgroups.root), "--window-ms", "2148", "--duration", "5",
              "-o", "-")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    starts = sorted({r["window_start_ns"] for r in rows})
    assert starts and all(r["window_ms"] == 2148 for r in rows)
    assert all(b - a == 2_148_000_000 for a, b in zip(starts, starts[1:]))
    ncpu = os.cpu_count() or 1
    for s in starts:
        assert sum(r["cpu_ns"] + (r["softirq_ns"] or 0) - (r["softirq_given_ns"] or 0)
                   for r in rows if r["window_start_ns"] == s) == ncpu * 2_148_000_000


def test_losses_are_said_as_they_happen_at_most_every_interval(capsys, monkeypatch):
    from types import SimpleNamespace

    from meter import daemon
    from meter.stats import MeterStats

    meter = SimpleNamespace(stats=MeterStats())
    said = daemon.LossReporter(meter, every=60)
    said.now()
    assert capsys.readouterr().err == ""  # nothing lost: nothing said
    meter.stats.missing_windows = 7
    said.now()
    assert capsys.readouterr().err == "meter: warning: LOST: 7 missing windows\n"
    meter.stats.missing_windows = 9
    said.now()  # within the interval: quiet
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(said, "last_at", said.last_at - 61)
    meter.stats.late_ns = 5  # not lost, but said: billed in a later window
    said.now()
    assert capsys.readouterr().err == ("meter: warning: LOST: 9 missing windows; 5 ns late (billed in a later "
                                       "window: cpu_source late, and the late row)\n")


@pytest.mark.bpf
def test_record_retention_expires_raw_records_and_keeps_every_rollup(meter_bin, tmp_path, cgroups):
    from meter.sinks.store import Store

    path = tmp_path / "r.db"
    res = run(meter_bin, "record", "--cgroup-root", str(cgroups.root), "--store", str(path), "--retention", "1",
              "--duration", "6")
    assert res.returncode == 0, res.stderr
    written = int(res.stderr.split("meter: ")[-1].split(" records")[0])  # "meter: N records, ..."
    with Store(path, must_exist=True) as s:
        raw = s.records()
        seconds = s.rollup("rollup_1s")
    # Every record is in the 1 s rollups. A batch (a second's chunk) goes whole once it ended
    # over 1 s before a write and its seconds are rolled up (every ten seconds, and at close):
    # at close, 6 s in, at least the first two seconds' chunks are gone, whatever the load delayed.
    assert sum(r["records"] for r in seconds) == written
    first_second = min(r["period_start_ns"] for r in seconds)
    assert 0 < len(raw) < written and int(raw["window_start_ns"].min()) >= first_second + 2 * 10**9


@pytest.mark.bpf
def test_record_rollup_retention_deletes_old_seconds_and_keeps_every_hour(meter_bin, tmp_path, cgroups):
    from meter.errors import SinkError
    from meter.sinks.store import Store

    path = tmp_path / "r.db"
    res = run(meter_bin, "record", "--cgroup-root", str(cgroups.root), "--store", str(path),
              "--rollup-retention", "2", "--duration", "6")
    assert res.returncode == 0, res.stderr
    written = int(res.stderr.split("meter: ")[-1].split(" records")[0])  # "meter: N records, ..."
    with Store(path, must_exist=True) as s:
        raw = s.records()
        hours = s.rollup("rollup_1h")
        kept_from = s.seconds_from()
        assert kept_from is not None  # 6 s recorded, 1 s rollups kept 2 s: some were past it at close
        seconds = s.rollup("rollup_1s", kept_from)
        gone = s.db.execute("SELECT count(*) FROM rollup_1s WHERE period_start_ns < ?", (kept_from,)).fetchone()[0]
        with pytest.raises(SinkError, match="past their retention"):
            s.rollup("rollup_1s", kept_from - 10**9)
    assert sum(r["records"] for r in hours) == written == len(raw)  # every record in its hour
    assert gone == 0 and int(raw["window_start_ns"].min()) < kept_from  # recorded seconds were deleted
    assert sum(r["records"] for r in seconds) == int((raw["window_start_ns"] >= kept_from).sum())


@pytest.mark.parametrize("option", ["--retention", "--rollup-retention"])
def test_retention_is_for_the_store_not_an_output_file(meter_bin, tmp_path, option):
    res = run(meter_bin, "record", "--output", str(tmp_path / "r.jsonl"), option, "60", "--duration", "1")
    assert res.returncode == 1 and res.stderr.startswith("meter: error: ") and f"{option} is for" in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "r.jsonl").exists()


def test_a_second_record_on_one_store_refuses_at_start_naming_the_first(meter_bin, tmp_path, cgroup_mount):
    """Before any program is loaded: one line, exit 1, the first writer's records intact."""
    from meter.sinks.store import Store

    from .test_bill import records

    path = tmp_path / "r.db"
    with Store(path) as first:
        first.write(records("h", 10))
        res = run(meter_bin, "record", "--store", str(path), "--cgroup-root", str(cgroup_mount), "--duration", "1")
        assert res.returncode == 1
        assert res.stderr == (f"meter: error: the record store {path} is being written by another meter "
                              f"(pid {os.getpid()}): stop it, or give this one its own store (--store)\n")
        assert len(first.records()) == 40
