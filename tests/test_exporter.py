"""meter serve: exposition, loopback by default, and a real Prometheus scraping it."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

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
    meter = Meter(Topology.discover(cgroups.root), drain_interval=0.1, batch_interval=0.1)
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


# -- a bounded server: local users cannot exhaust it ------------------------------------------------

def _fake_exporter(tmp_path, **kw):
    from meter.engine import Meter
    from meter.sources.fake import FakeCPU, FakeSources

    (tmp_path / "cg" / "a").mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "topology.toml"
    cfg.write_text('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "a"\ncgroup = "a"\n')
    meter = Meter(Topology.from_file(cfg, mount=tmp_path / "cg"), sources=FakeSources(FakeCPU()),
                  drain_interval=0.05, batch_interval=0.05)
    return Exporter(meter, "127.0.0.1:0", **kw)


def _eof_times(socks: list[tuple[socket.socket, float]], limit: float) -> list[float]:
    """Seconds from just before each socket's connect until the server closed it (inf: not within ``limit``)."""
    ended = [float("inf")] * len(socks)
    left = {s.fileno(): i for i, (s, _) in enumerate(socks)}
    end = time.monotonic() + limit
    while left and time.monotonic() < end:
        ready, _, _ = select.select(list(left), [], [], 0.5)
        for fd in ready:
            i = left[fd]
            sock, started = socks[i]
            try:
                data = sock.recv(4096)
            except ConnectionError:
                data = b""
            if not data:
                ended[i] = time.monotonic() - started
                del left[fd]
    return ended


def test_exporter_bounds_idle_connections_in_number_and_time(tmp_path):
    timeout = 3.0
    exporter = _fake_exporter(tmp_path, max_connections=4, timeout=timeout)
    exporter.start()
    try:
        threads = threading.active_count()
        socks = []
        for _ in range(50):
            # The time before the connect: the server's deadline starts after it, so a
            # served connection is measured at least its deadline. (Read after the
            # connect, a client preempted meanwhile on a loaded host measured one
            # served connection closed 'before' its deadline.)
            started = time.monotonic()
            s = socket.create_connection(("127.0.0.1", exporter.port))
            socks.append((s, started))
        # While all 50 sit idle, at most 4 handler threads exist (one per served connection).
        time.sleep(0.5)
        assert threading.active_count() <= threads + 4
        # Every connection ends: 46 refused at once, the served ones at their deadline.
        ended = _eof_times(socks, timeout + 30)
        for s, _ in socks:
            s.close()
        assert max(ended) < float("inf")
        out = exporter.connections
        # A stalled test only makes a close look later, so this cannot fail spuriously:
        # no served connection was closed before its deadline.
        assert len([e for e in ended if e < timeout]) <= out["rejected"], (sorted(ended), out)
        assert out["rejected"] + out["timed_out"] == 50 and out["served"] == 0, out
        assert out["rejected"] >= 46 and exporter._server.peak <= 4, (out, exporter._server.peak)
        # With the idle ones gone, a scrape is served and counts them.
        text = _get(f"http://127.0.0.1:{exporter.port}/metrics")
        assert _value(text, "meter_exporter_connections_total", outcome="rejected") == out["rejected"]
        assert _value(text, "meter_exporter_connections_total", outcome="timed_out") == out["timed_out"]
    finally:
        exporter.stop()


def test_exporter_ends_a_connection_that_trickles_at_its_deadline(tmp_path):
    timeout = 1.0
    exporter = _fake_exporter(tmp_path, max_connections=2, timeout=timeout)
    exporter.start()
    try:
        s = socket.create_connection(("127.0.0.1", exporter.port))
        started = time.monotonic()
        s.sendall(b"GET /metrics HTTP/1.0\r\n")
        # A header line every 0.1 s: no single read waits the timeout, only the deadline ends it.
        closed = None
        while time.monotonic() - started < timeout + 30:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = time.monotonic() - started
                break
            s.settimeout(0.1)
            try:
                if s.recv(4096) == b"":
                    closed = time.monotonic() - started
                    break
            except TimeoutError:
                pass
        s.close()
        assert closed is not None and closed >= timeout, closed
        assert exporter.connections["timed_out"] == 1
    finally:
        exporter.stop()


def test_exporter_counts_a_vanished_client_without_a_traceback(tmp_path, capfd, caplog):
    exporter = _fake_exporter(tmp_path)
    exporter.start()
    try:
        server = exporter._server
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except BrokenPipeError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert exporter.connections["aborted"] == 1
        assert "Traceback" not in capfd.readouterr().err and not caplog.records
        try:
            raise ValueError("boom")
        except ValueError:
            server.handle_error(None, ("127.0.0.1", 1))
        assert "Traceback" not in capfd.readouterr().err
        assert [r.getMessage() for r in caplog.records] == [
            "meter: exporter: request from 127.0.0.1 failed: ValueError: boom"]
    finally:
        exporter.stop()


def test_exporter_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="max_connections"):
        _fake_exporter(tmp_path, max_connections=0)
    with pytest.raises(ConfigError, match="stale_after"):
        _fake_exporter(tmp_path, stale_after=-1)


# -- Prometheus practice: formats, _created, stale series ----------------------------------------

def _scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def _loaded_meter(tmp_path, names=("acme", "globex")):
    """A meter over simulated sources whose compartments have used exactly
    0.3 s and 0.1 s of CPU (integers of ns that a careless * 1e-9 prints
    with float noise)."""
    from meter.cgroup import cgroup_id
    from meter.engine import Meter
    from meter.sources.fake import FakeCPU, FakeSources

    root = tmp_path / "cg"
    for n in names:
        (root / n).mkdir(parents=True)
    cpu = FakeCPU(ncpu=2)
    meter = Meter(Topology.discover(root, mount=root), sources=FakeSources(cpu), drain_interval=0.05,
                  batch_interval=0.05)
    meter.open()
    for _ in range(100):
        cpu.charge(cpu.now, cgroup_id(root / names[0]), 900_000, (1,))
        cpu.charge(cpu.now, cgroup_id(root / names[1]), 300_000, (1,))
        cpu.advance(1)
    for _ in range(200):
        cpu.charge(cpu.now, cgroup_id(root / names[0]), 1_050_000)
        cpu.advance(1)
    meter.drain()
    return meter, root


def test_openmetrics_when_asked_text_otherwise_both_clean(tmp_path):
    """Prometheus asks for OpenMetrics first; curl gets the text format. Both
    carry each counter's _created time; the text format is promtool-clean,
    the OpenMetrics body parses with prometheus_client's OpenMetrics parser
    (strict: it refuses what the standard does not allow) and ends in # EOF."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    meter, _root = _loaded_meter(tmp_path)
    before = time.time()
    exporter = Exporter(meter, "127.0.0.1:0")
    exporter.start()
    try:
        kind, text = _scrape(exporter.port)
        om_kind, om = _scrape(exporter.port, "application/openmetrics-text;version=1.0.0,"
                                             "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    finally:
        exporter.stop()
        meter.close()
    assert kind.startswith("text/plain; version=0.0.4") and om_kind.startswith("application/openmetrics-text")
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout == lint.stderr == "", lint.stdout + lint.stderr
    assert om.endswith("# EOF\n")
    fams = {f.name: f for f in text_string_to_metric_families(om)}
    cpu = {s.labels["tenant"]: s for s in fams["meter_cpu_seconds"].samples if s.name.endswith("_total")}
    created = {s.labels["tenant"]: s.value for s in fams["meter_cpu_seconds"].samples if s.name.endswith("_created")}
    # Exact: 100 windows of 0.9 ms + 200 of 1.05 ms = 0.3 s; 100 of 0.3 ms = 0.03 s.
    assert (cpu["acme"].value, cpu["globex"].value) == (0.3, 0.03)
    assert fams["meter_cpu_seconds"].unit == "seconds"
    # The rows began counting when the meter opened, before the exporter did.
    assert set(created) == {"acme", "globex", "idle"} and all(0 < before - t < 60 for t in created.values())
    # No float noise from integers: the text carries 0.3, not 0.30000000000000004.
    assert 'meter_cpu_seconds_total{compartment="acme",tenant="acme"} 0.3\n' in text
    assert "meter_cpu_seconds_created{" in text


def test_a_gone_compartments_series_are_dropped_after_the_grace_period(tmp_path):
    """A compartment whose cgroup is removed keeps its series for stale_after
    seconds (a last scrape sees its final totals), then they are gone; the
    other compartments' stay. It is back when its cgroup is."""
    meter, root = _loaded_meter(tmp_path)
    exporter = Exporter(meter, "127.0.0.1:0", stale_after=0.5)
    exporter.start()
    try:
        assert 'tenant="globex"' in _scrape(exporter.port)[1]
        (root / "globex").rmdir()
        t0 = time.monotonic()
        text = _scrape(exporter.port)[1]
        if time.monotonic() - t0 < 0.5:  # scraped inside the grace period (measured, not assumed)
            assert 'tenant="globex"' in text
        time.sleep(0.6)
        text = _scrape(exporter.port)[1]
        assert 'tenant="globex"' not in text and 'tenant="acme"' in text and 'tenant="idle"' in text
        (root / "globex").mkdir()
        assert 'tenant="globex"' in _scrape(exporter.port)[1]
    finally:
        exporter.stop()
        meter.close()


# -- BPF program statistics: this meter's programs only ------------------------------------------

def _bpftool_runs(prog_id: int) -> int:
    out = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)],
                                    capture_output=True, text=True, check=True).stdout)
    return out.get("run_cnt", 0)


@pytest.mark.bpf
def test_bpf_stats_cover_this_meters_programs_only(cgroups):
    from meter.bpfsys import PROG_RAW_TRACEPOINT, Bpf
    from meter.engine import Meter

    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = stats.read_text().strip()
    cgroups.make("a")
    meter = Meter(Topology.discover(cgroups.root), drain_interval=0.1, batch_interval=0.1)
    exporter = Exporter(meter, "127.0.0.1:0")
    bpf = Bpf()
    stats.write_text("0")
    exporter.start()
    fds = []
    try:
        text = _get(f"http://127.0.0.1:{exporter.port}/metrics")
        # Stats off since the meter loaded: its programs never ran measured, so no series.
        assert _value(text, "meter_bpf_runs_total", program="meter_switch") is None
        # Another program on the host with meter's name, and one with meter's prefix,
        # both on the same tracepoint: the old bpftool sum counted them as meter's.
        for name in (b"meter_switch", b"meter_foreign"):
            fd, err = bpf.load(PROG_RAW_TRACEPOINT, name)
            assert fd >= 0, err
            link, err = bpf.raw_tracepoint("sched_switch", fd)
            assert link >= 0, err
            fds += [fd, link]
        stats.write_text("1")
        ours = bpf.prog_info(meter.program_fds()["meter_switch"][0])
        foreign = bpf.prog_info(fds[0])
        assert ours.id != foreign.id and foreign.name == "meter_switch"
        time.sleep(1.5)  # both run on every switch; the cache (1 s) has expired
        before = _bpftool_runs(ours.id)
        text = _get(f"http://127.0.0.1:{exporter.port}/metrics")
        after = _bpftool_runs(ours.id)
        runs = _value(text, "meter_bpf_runs_total", program="meter_switch")
        # Read between two readings of meter's own program; the foreign one's
        # runs over 1.5 s (all switches, like meter's) would lift it past `after`.
        assert runs is not None and before <= runs <= after, (before, runs, after, _bpftool_runs(foreign.id))
        assert _value(text, "meter_bpf_runs_total", program="meter_tick") > 0
        assert 'program="meter_foreign"' not in text
    finally:
        stats.write_text(old)
        for fd in fds:
            os.close(fd)
        exporter.stop()


# -- the Grafana dashboard in examples/, against a real Prometheus --------------------------------

DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana-dashboard.json"


def _promql(expr: str) -> str:
    """A panel's query as Grafana sends it: every tenant, a rate window that
    holds several of the test's 1 s scrapes."""
    return expr.replace("$tenant", ".+").replace("$__rate_interval", "10s")


@pytest.mark.bpf
def test_every_dashboard_panel_returns_data_from_meter_serve(tmp_path, cgroups, cgroup_mount, net):
    """A compartment with a busy task and a port with traffic, meter serve's
    exporter, a real Prometheus scraping it (it asks for OpenMetrics): every
    panel's PromQL and the tenant variable's query return data."""
    from meter.engine import Meter

    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) == sum(len(p["targets"]) for p in dash["panels"]) >= 8
    ns = net.ns("a")
    host_end = net.name("a0")
    net.veth(host_end, "eth0", b_ns=ns)
    net.ip(None, "addr", "add", "10.77.9.1/24", "dev", host_end)
    net.ip(ns, "addr", "add", "10.77.9.2/24", "dev", "eth0")
    cg = cgroups.make("acme")
    cfg = tmp_path / "topology.toml"
    cfg.write_text(f'[[tenant]]\nname = "acme"\n[[tenant.compartment]]\nname = "vswitch"\n'
                   f'cgroup = "{cg}"\ninterfaces = ["{host_end}"]\n')
    meter = Meter(Topology.from_file(cfg, mount=cgroup_mount), drain_interval=0.1, batch_interval=0.1)
    port, prom_port = _free_port(), _free_port()
    exporter = Exporter(meter, f"127.0.0.1:{port}")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        f"scrape_configs:\n  - job_name: meter\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    pace = ("import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "while True:\n    for _ in range(50): s.sendto(b'x' * 200, ('10.77.9.1', 9999))\n    time.sleep(0.01)\n")
    prom = sender = None
    exporter.start()
    try:
        busy = cgroups.burner(cg, 0.3, 120)
        sender = subprocess.Popen(["ip", "netns", "exec", ns, "python3", "-S", "-c", pace])
        prom = subprocess.Popen([shutil.which("prometheus") or "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        api = f"http://127.0.0.1:{prom_port}/api/v1"
        empty = set(exprs)
        deadline = time.monotonic() + 90
        while empty and time.monotonic() < deadline:
            time.sleep(1)
            for expr in sorted(empty):
                try:
                    got = json.loads(_get(f"{api}/query?" + urllib.parse.urlencode({"query": _promql(expr)})))
                except OSError:
                    break  # Prometheus not up yet
                assert got["status"] == "success", (expr, got)
                if got["data"]["result"]:
                    empty.discard(expr)
        assert not empty, f"panels without data: {sorted(empty)}"
        var = dash["templating"]["list"][1]["definition"]
        metric = var.removeprefix("label_values(").split(",")[0]
        tenants = json.loads(_get(f"{api}/label/tenant/values?" + urllib.parse.urlencode({"match[]": metric})))["data"]
        assert "acme" in tenants
        # Prometheus took the OpenMetrics body (it asks for it first) and kept every scrape.
        up = json.loads(_get(f"{api}/query?query=up"))["data"]["result"]
        assert up[0]["value"][1] == "1"
        assert exporter.formats["openmetrics"] >= 1 and exporter.formats["text"] == 0
        busy.kill()
    finally:
        for p in (prom, sender):
            if p is not None:
                p.terminate()
                p.wait(10)
        exporter.stop()
