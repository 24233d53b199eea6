"""Sink: a Prometheus exporter over a running Meter.

Counters in base units with ``tenant`` and ``compartment`` labels, from the
meter's running totals (:meth:`meter.engine.Meter.totals`), so a scrape
costs nothing on the drain path:

==================================  ===========================================
meter_cpu_seconds_total             cpu_ns / 1e9
meter_cpu_cycles_total              cycles (estimated where counters say so)
meter_instructions_total            instructions
meter_cache_misses_total            cache misses
meter_energy_joules_total           {domain}: package, dram
meter_network_packets_total         {direction, interface}: per port
meter_network_bytes_total           {direction, interface}
meter_softirq_seconds_total         NET softirq time charged to the compartment
meter_vf_packets_total              {direction}: SR-IOV VF counters
meter_vf_bytes_total                {direction}
meter_build_info                    {version, window_ms, counters, energy}
==================================  ===========================================

and self-metrics: ``meter_bpf_run_seconds_total{program}`` and
``meter_bpf_runs_total{program}`` (kernel bpf_stats, when
``kernel.bpf_stats_enabled`` is 1), ``meter_dropped_updates_total{map}``,
``meter_late_seconds_total``, ``meter_records_total``,
``meter_conservation_violations_total`` and the gauge
``meter_drain_lag_seconds`` (now minus the end of the newest record).
A series that was never measured is absent, not 0.

The HTTP server binds loopback unless ``allow_remote`` is given.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import __version__
from ..errors import ConfigError, SinkError

__all__ = ["DEFAULT_LISTEN", "Exporter", "parse_listen"]

DEFAULT_LISTEN = "127.0.0.1:9464"

_SIMPLE = (
    ("meter_cpu_seconds_total", "cpu_ns", 1e-9, "CPU time of the compartment's tasks."),
    ("meter_cpu_cycles_total", "cycles", 1, "CPU cycles (see meter_build_info counters for provenance)."),
    ("meter_instructions_total", "instructions", 1, "Instructions retired."),
    ("meter_cache_misses_total", "cache_misses", 1, "Last-level cache misses."),
    ("meter_softirq_seconds_total", "softirq_ns", 1e-9, "NET softirq time spent on the compartment's packets."),
    ("meter_softirq_given_seconds_total", "softirq_given_ns", 1e-9,
     "NET softirq time run inside the compartment's CPU time for other compartments' packets."),
)


def parse_listen(listen: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); a non-loopback host needs ``allow_remote``."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
        if not sep or not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})", setting="listen") from None
    try:
        loopback = ipaddress.ip_address(host or "0.0.0.0").is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise ConfigError(
            f"listen address {listen!r} is not a loopback address: meter serves loopback only unless remote "
            "access is allowed", setting="allow_remote")
    return host, port


class Exporter:
    """Serves ``/metrics`` for a Meter; ``start()``/``stop()`` as often as you like."""

    def __init__(self, meter: Any, listen: str = DEFAULT_LISTEN, *, allow_remote: bool = False) -> None:
        self.meter = meter
        self.host, self.port = parse_listen(listen, allow_remote=allow_remote)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._own_meter = False

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the meter (if it is not running) and the HTTP server."""
        if self._server is not None:
            return
        if not self.meter.running:
            self.meter.start()
            self._own_meter = True
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                if exporter.meter.error is not None:
                    # Totals that stopped moving must not pass for current ones.
                    self.send_error(503, f"metering stopped: {exporter.meter.error}")
                    return
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        try:
            self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as err:
            self.stop()
            raise SinkError(f"cannot listen on {self.host}:{self.port}: {err.strerror}", target=f"{self.host}:{self.port}") from err
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="meter-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; stop and close the meter if this exporter started it."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._own_meter:
            self.meter.stop()
            self.meter.close()
            self._own_meter = False

    def __enter__(self) -> Exporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- exposition ---------------------------------------------------------------------------------

    def render(self) -> str:
        """The exposition text (Prometheus text format 0.0.4)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry).decode()

    def families(self) -> Iterator[Any]:
        # Over 60 lines on purpose: one metric family after another, in
        # exposition order, each a few lines; the list is the documentation.
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        meter = self.meter
        rows = meter.totals()
        labels = ["tenant", "compartment"]
        for name, field, scale, doc in _SIMPLE:
            fam = CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels)
            for r in rows:
                if r[field] is not None:
                    fam.add_metric([r["tenant"], r["compartment"]], r[field] * scale)
            yield fam
        fam = CounterMetricFamily("meter_energy_joules", "Energy attributed to the compartment.", labels=[*labels, "domain"])
        for r in rows:
            for domain, uj in r["energy_uj_by_domain"].items():
                fam.add_metric([r["tenant"], r["compartment"], domain], uj / 1e6)
        yield fam
        for unit in ("packets", "bytes"):
            fam = CounterMetricFamily(f"meter_network_{unit}", f"Network {unit} on the compartment's interfaces.",
                                      labels=[*labels, "direction", "interface"])
            for r in rows:
                for iface, v in r["ports"].items():
                    for direction in ("rx", "tx"):
                        fam.add_metric([r["tenant"], r["compartment"], direction, iface], v[f"{direction}_{unit}"])
            yield fam
            fam = CounterMetricFamily(f"meter_vf_{unit}", f"SR-IOV VF {unit} of the compartment's VFs.",
                                      labels=[*labels, "direction"])
            for r in rows:
                for direction in ("rx", "tx"):
                    v = r[f"vf_{direction}_{unit}"]
                    if v is not None:
                        fam.add_metric([r["tenant"], r["compartment"], direction], v)
            yield fam
        yield InfoMetricFamily("meter_build", "meter's version and settings.", value={
            "version": __version__, "window_ms": str(meter.window_ms), "counters": meter.plan.source or "none",
            "energy": meter.energy_source or "none"})
        # Self-metrics.
        st = meter.stats
        for name, value, doc in (
            ("meter_records", st.records, "Records produced."),
            ("meter_late_seconds", st.late_ns / 1e9, "CPU time that arrived for a closed window (lost)."),
            ("meter_conservation_violations", st.conservation_violations, "Windows whose CPU time did not add up."),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        lost = CounterMetricFamily("meter_lost_seconds", "CPU time that did not reach any record, by reason.",
                                   labels=["reason"])
        for reason, ns in (("dropped", st.dropped_ns), ("late", st.late_ns), ("unplaced", st.unplaced_ns)):
            lost.add_metric([reason], ns / 1e9)
        yield lost
        for name, value, doc in (
            ("meter_missing_windows", st.missing_windows, "Closed windows with no record at all."),
            ("meter_unresolved_cgroups", st.unresolved_cgroups, "Cgroups gone before they could be named (billed to host)."),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        fam = CounterMetricFamily("meter_dropped_updates", "Kernel map updates dropped (map full).", labels=["map"])
        fam.add_metric(["usage"], st.dropped_updates)
        fam.add_metric(["net_usage"], st.net_dropped_updates)
        yield fam
        lag = GaugeMetricFamily("meter_drain_lag_seconds", "Now minus the end of the newest record.")
        if st.last_window_end_ns:
            lag.add_metric([], max(0.0, (time.time_ns() - st.last_window_end_ns) / 1e9))
        yield lag
        run_s = CounterMetricFamily("meter_bpf_run_seconds", "Time in meter's BPF programs (bpf_stats).", labels=["program"])
        runs = CounterMetricFamily("meter_bpf_runs", "Runs of meter's BPF programs (bpf_stats).", labels=["program"])
        for prog, (ns, cnt) in bpf_program_stats().items():
            run_s.add_metric([prog], ns / 1e9)
            runs.add_metric([prog], cnt)
        yield run_s
        yield runs


class _Collector:
    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        return self.exporter.families()


def bpf_program_stats() -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) summed per meter_* program name, from bpftool; {} without it."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    try:
        out = subprocess.run([bpftool, "-j", "prog", "show"], capture_output=True, text=True, timeout=5).stdout
        progs = json.loads(out or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
    totals: dict[str, tuple[int, int]] = {}
    for p in progs:
        name = p.get("name", "")
        if name.startswith("meter_") and "run_cnt" in p:
            ns, cnt = totals.get(name, (0, 0))
            totals[name] = (ns + p.get("run_time_ns", 0), cnt + p["run_cnt"])
    return totals
