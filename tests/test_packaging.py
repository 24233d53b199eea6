"""Running as a service: the systemd units in packaging/ verify clean, and the
command lines they run work with the packaged /etc/meter/topology.toml."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

PACKAGING = Path(__file__).parent.parent / "packaging"
UNITS = ("meter-record.service", "meter-serve.service")
INSTALLED = "/opt/meter/bin/meter"


def _unit(name: str) -> dict[str, list[str]]:
    """The [Service] settings of a unit, {key: [value, ...]}."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (PACKAGING / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _command(name: str, meter_bin: list[str], tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart with this checkout's meter for /opt/meter/bin/meter,
    and its Environment with METER_CONFIG a copy of the packaged topology."""
    unit = _unit(name)
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED
    env = dict(os.environ)
    for item in unit.get("Environment", []):
        key, _, value = item.partition("=")
        env[key] = value
    assert env["METER_CONFIG"] == "/etc/meter/topology.toml"
    config = tmp_path / "topology.toml"
    config.write_text((PACKAGING / "topology.toml").read_text())
    env["METER_CONFIG"] = str(config)
    return meter_bin + argv[1:], env


@pytest.mark.parametrize("name", UNITS)
def test_the_units_verify_clean(tmp_path, meter_bin, name):
    """systemd-analyze verify: no unknown key, no bad value, an executable
    ExecStart (this checkout's meter stands in for the installed one)."""
    text = (PACKAGING / name).read_text()
    assert INSTALLED in text
    unit = tmp_path / name
    unit.write_text(text.replace(INSTALLED, " ".join(meter_bin)))
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr
    # A mistake is caught: verify is not silent about everything.
    bad = tmp_path / f"bad-{name}"
    bad.write_text(unit.read_text().replace("[Service]", "[Service]\nRestrat=always"))
    assert "Unknown key" in subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)],
                                           capture_output=True, text=True).stderr


@pytest.mark.bpf
def test_the_record_unit_stores_records_with_the_packaged_config(tmp_path, meter_bin):
    argv, env = _command("meter-record.service", meter_bin, tmp_path)
    store = tmp_path / "records.db"
    argv[argv.index("--store") + 1] = str(store)
    res = subprocess.run([*argv, "--duration", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    from meter.sinks.store import Store

    with Store(store) as s:
        assert s.next_seq(socket.gethostname()) > 100


@pytest.mark.bpf
def test_the_serve_unit_serves_reloads_and_stops_cleanly(tmp_path, meter_bin):
    argv, env = _command("meter-serve.service", meter_bin, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv[argv.index("--listen") + 1] = f"127.0.0.1:{port}"
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline and proc.poll() is None and "meter_cpu_seconds_total" not in body:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        assert "meter_cpu_seconds_total" in body
        proc.send_signal(signal.SIGHUP)  # the unit's ExecReload
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)  # its KillSignal
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "topology reloaded" in err
