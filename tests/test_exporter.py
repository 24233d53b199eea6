"""meter serve: exposition, loopback by default, and a real Prometheus scraping it."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from meter import Topology
from meter.cgroup import cpu_usage_usec
from meter.errors import ConfigError
from meter.sinks.prometheus import Exporter, parse_listen


def test_listen_is_loopback_unless_allowed():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9") == ("::1", 9)
    assert parse_listen("localhost:80") == ("localhost", 80)
    with pytest.raises(ConfigError, match="not a loopback address") as err:
        parse_listen("0.0.0.0:9464")
    assert err.value.setting == "allow_remote"  # the CLI names its flag for it
    assert parse_listen("0.0.0.0:9464", allow_remote=True) == ("0.0.0.0", 9464)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen("9464")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _value(text: str, metric: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.bpf
def test_prometheus_scrapes_meter_and_promql_matches(tmp_path, cgroups):
    from meter.engine import Meter

    prometheus = shutil.which("prometheus")
    assert prometheus, "Debian's prometheus package is required (make setup installs it)"
    cg = cgroups.make("busy")
    cgroups.make("quiet")
    meter = Meter(Topology.discover(cgroups.root), drain_interval=0.1)
    port, prom_port = _free_port(), _free_port()
    exporter = Exporter(meter, f"127.0.0.1:{port}")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        f"scrape_configs:\n  - job_name: meter\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    prom = None
    exporter.start()
    try:
        cgroups.burner(cg, 1.0, 0.5).wait()
        time.sleep(0.5)  # the burner's windows are drained
        text = _get(f"http://127.0.0.1:{port}/metrics")
        ours = _value(text, "meter_cpu_seconds_total", tenant="busy", compartment="busy")
        # The burner's whole life ran in its fresh cgroup: meter's counter is
        # the kernel's cpu.stat to the billing target (0.2 %) and its 1 us unit.
        used = cpu_usage_usec(cg) / 1e6
        assert ours is not None and used > 0.05 and abs(ours - used) <= 0.002 * used + 1e-6, (ours, used)
        assert 'meter_build_info{' in text and "meter_energy_joules_total{" in text
        assert _value(text, "meter_instructions_total", tenant="busy") is None  # unavailable: absent, not 0
        prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        query = urllib.parse.urlencode({"query": 'meter_cpu_seconds_total{tenant="busy"}'})
        result = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                result = json.loads(_get(f"http://127.0.0.1:{prom_port}/api/v1/query?{query}"))["data"]["result"]
            except OSError:
                continue
        assert result, "Prometheus never scraped meter"
        # The busy compartment is quiet now: its counter no longer moves.
        assert float(result[0]["value"][1]) == ours
        up = json.loads(_get(f"http://127.0.0.1:{prom_port}/api/v1/query?query=up"))["data"]["result"]
        assert up[0]["value"][1] == "1"
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(10)
        exporter.stop()
    # The exporter started the meter, so it stopped and closed it too.
    assert not meter.is_open


@pytest.mark.bpf
def test_serve_cli_refuses_remote_and_stops_on_sigterm(meter_bin, cgroups):
    res = subprocess.run([*meter_bin, "serve", "--listen", "0.0.0.0:9464"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "--allow-remote" in res.stderr
    port = _free_port()
    p = subprocess.Popen([*meter_bin, "serve", "--cgroup-root", str(cgroups.root), "--listen", f"127.0.0.1:{port}"],
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                text = _get(f"http://127.0.0.1:{port}/metrics")
                break
            except OSError:
                time.sleep(0.2)
        assert "meter_cpu_seconds_total" in text
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
