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
meter_network_wire_packets_total    {direction, interface}: packets on the wire (a GSO/GRO skb is many)
meter_network_wire_bytes_total      {direction, interface}
meter_softirq_seconds_total         NET softirq time charged to the compartment
meter_vf_packets_total              {direction}: SR-IOV VF counters
meter_vf_bytes_total                {direction}
meter_build_info                    {version, window_ms, counters, energy}
==================================  ===========================================

and self-metrics: ``meter_bpf_run_seconds_total{program}`` and
``meter_bpf_runs_total{program}`` (kernel bpf_stats of this meter's own
programs, read by fd and cached for a second; present once
``kernel.bpf_stats_enabled`` is 1), ``meter_late_packets_total``,
``meter_late_seconds_total``, ``meter_records_total``,
``meter_conservation_violations_total``, ``meter_run_switches_total``
(switches inside one cgroup, bpf/sched.bpf.c ``same_run()``),
``meter_idle_out_switches_total`` and ``meter_idle_in_switches_total``
(switches away from and into idle charged on the switch program's idle
paths, ``idle_out()`` and ``idle_in()``; the three only where the switch
program has them: kernel charging with BTF) and the gauge
``meter_drain_lag_seconds`` (now minus the end of the newest record).
A series that was never measured is absent, not 0.

The HTTP server binds loopback unless ``allow_remote`` is given. It is
bounded, since any local user can connect: at most ``max_connections``
connections are served at once (more are closed at once), each for at most
``timeout`` seconds, one request each; ``meter_exporter_connections_total
{outcome}`` counts them (served, rejected, timed_out, aborted). A client
that goes away mid-response is counted, not logged.

A scraper that accepts ``application/openmetrics-text`` (Prometheus asks
for it first) gets OpenMetrics 1.0, others the text format 0.0.4
(``meter_exporter_responses_total{format}``). Every counter carries its
``_created`` time: when its row began counting (the meter's open, or the
compartment's discovery). Values derived from integers are divided, never
multiplied by a fraction (0.3, not 0.30000000000000004). The series of a
compartment that is gone (out of the topology, or its cgroup removed) are
dropped ``stale_after`` seconds after a scrape first found it gone.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import __version__
from ..errors import ConfigError, SinkError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_LISTEN", "Exporter", "parse_listen"]

DEFAULT_LISTEN = "127.0.0.1:9464"
#: Connections served at once: a scrape or two, with room for a person's curl.
DEFAULT_MAX_CONNECTIONS = 8
#: Seconds one connection may take, request to response (Prometheus' default scrape timeout is 10 s).
DEFAULT_TIMEOUT = 10.0
#: Seconds the kernel's BPF program statistics are reused across scrapes.
BPF_STATS_TTL = 1.0

#: Seconds a compartment that is gone (removed from the topology, or its
#: cgroup deleted) keeps its series: then they are dropped, so churn does
#: not grow the series count (Prometheus marks them stale).
DEFAULT_STALE_AFTER = 300.0

#: (name, field, divisor, unit, help): integer totals divided, never multiplied
#: by a fraction, so 300000000 ns prints as 0.3, not 0.30000000000000004.
_SIMPLE = (
    ("meter_cpu_seconds_total", "cpu_ns", 10**9, "seconds", "CPU time of the compartment's tasks."),
    ("meter_cpu_cycles_total", "cycles", 1, "", "CPU cycles (see meter_build_info counters for provenance)."),
    ("meter_instructions_total", "instructions", 1, "", "Instructions retired."),
    ("meter_cache_misses_total", "cache_misses", 1, "", "Last-level cache misses."),
    ("meter_softirq_seconds_total", "softirq_ns", 10**9, "seconds", "NET softirq time spent on the compartment's packets."),
    ("meter_softirq_given_seconds_total", "softirq_given_ns", 10**9, "seconds",
     "NET softirq time run inside the compartment's CPU time for other compartments' packets."),
)
#: OpenMetrics' content type, and the text format's.
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _scaled(value: int, divisor: int) -> int | float:
    return value if divisor == 1 else value / divisor


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


class _Server(ThreadingHTTPServer):
    """A threading HTTP server with a bound on connections and on their time.

    The deadline is enforced by ``serve_forever``'s own loop
    (:meth:`service_actions`, every ``poll_interval``): no thread per timer.
    """

    daemon_threads = True
    request_queue_size = 128  # connections beyond the bound are refused by us, not left in SYN retries

    def __init__(self, address: tuple[str, int], handler: type, *, max_connections: int, timeout: float) -> None:
        self.timeout_s = timeout
        self.outcomes = {"served": 0, "rejected": 0, "timed_out": 0, "aborted": 0}
        #: Responses served, by exposition format.
        self.formats = {"openmetrics": 0, "text": 0}
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        #: The most connections served at once so far.
        self.peak = 0
        super().__init__(address, handler)

    def count(self, outcome: str, fmt: str | None = None) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            if fmt is not None:
                self.formats[fmt] += 1

    def timed_out(self, request: Any) -> None:
        """Count a connection's time-out once, whether its own read or the deadline ended it."""
        with self._lock:
            if self._deadlines.pop(request, None) is not None:
                self.outcomes["timed_out"] += 1

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.count("rejected")
            self.shutdown_request(request)
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.timeout_s
            self.peak = max(self.peak, len(self._deadlines))
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._lock:
            self._deadlines.pop(request, None)
        self._slots.release()

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [s for s, t in self._deadlines.items() if t <= now]
            for s in late:
                del self._deadlines[s]  # counted once; the handler's exit releases the slot
                self.outcomes["timed_out"] += 1
        for s in late:
            try:
                s.shutdown(socket.SHUT_RDWR)  # the handler's read or write returns at once
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            self.count("aborted")  # the client went away or stalled: theirs, not meter's
            return
        log.warning("meter: exporter: request from %s failed: %s: %s", client_address[0], type(err).__name__, err)


class Exporter:
    """Serves ``/metrics`` for a Meter; ``start()``/``stop()`` as often as you like."""

    def __init__(self, meter: Any, listen: str = DEFAULT_LISTEN, *, allow_remote: bool = False,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, timeout: float = DEFAULT_TIMEOUT,
                 stale_after: float = DEFAULT_STALE_AFTER) -> None:
        if max_connections < 1 or not timeout > 0:
            raise ConfigError(f"exporter needs max_connections >= 1 and timeout > 0 (got {max_connections}, {timeout})",
                              setting="exporter")
        if not stale_after >= 0:
            raise ConfigError(f"stale_after must be a number of seconds >= 0, not {stale_after!r}",
                              setting="stale_after")
        self.stale_after = stale_after
        self._gone_since: dict[tuple[str, str], float] = {}
        self._gone_lock = threading.Lock()
        self._started: float | None = None
        self.meter = meter
        self.host, self.port = parse_listen(listen, allow_remote=allow_remote)
        self.max_connections = max_connections
        self.timeout = timeout
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._own_meter = False
        self._bpf_stats: tuple[float, dict[str, tuple[int, int]]] = (-BPF_STATS_TTL, {})
        self._bpf_lock = threading.Lock()

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
            timeout = exporter.timeout  # per read and write; the server bounds the whole connection

            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                if exporter.meter.error is not None:
                    # Totals that stopped moving must not pass for current ones.
                    self.send_error(503, f"metering stopped: {exporter.meter.error}")
                    return
                openmetrics = "application/openmetrics-text" in self.headers.get("Accept", "")
                body = exporter.render(openmetrics=openmetrics).encode()
                self.send_response(200)
                self.send_header("Content-Type", OPENMETRICS if openmetrics else TEXT)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                exporter.count("served", "openmetrics" if openmetrics else "text")

            def log_error(self, format: str, *args: Any) -> None:
                if format.startswith("Request timed out"):
                    exporter._server_timed_out(self.request)

            def log_message(self, *args: Any) -> None:
                pass

        try:
            self._server = _Server((self.host, self.port), Handler, max_connections=self.max_connections,
                                   timeout=self.timeout)
        except OSError as err:
            self.stop()
            raise SinkError(f"cannot listen on {self.host}:{self.port}: {err.strerror}", target=f"{self.host}:{self.port}") from err
        self.port = self._server.server_address[1]
        self._started = time.time()
        server, urgent = self._server, self.meter.urgent

        def serve() -> None:
            # In the drain's class (meter.loop), and so each request's thread, which
            # inherits it: a thread of this process preempted by a saturated host while
            # it holds the interpreter's lock (or the meter's) holds the drain back
            # with it (measured: 33 % of CPU time late with scrapes every 0.5 s).
            with urgent():
                server.serve_forever()

        self._thread = threading.Thread(target=serve, name="meter-exporter", daemon=True)
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

    def count(self, outcome: str, fmt: str | None = None) -> None:
        if self._server is not None:
            self._server.count(outcome, fmt)

    def _server_timed_out(self, request: Any) -> None:
        if self._server is not None:
            self._server.timed_out(request)

    @property
    def formats(self) -> dict[str, int]:
        """Responses served so far by exposition format: openmetrics, text."""
        return dict(self._server.formats) if self._server is not None else {}

    @property
    def connections(self) -> dict[str, int]:
        """Connections so far by outcome: served, rejected, timed_out, aborted."""
        return dict(self._server.outcomes) if self._server is not None else {}

    def bpf_program_stats(self) -> dict[str, tuple[int, int]]:
        """The meter's :meth:`~meter.engine.Meter.program_stats` (its own programs
        only), reused for :data:`BPF_STATS_TTL` seconds."""
        with self._bpf_lock:
            taken, stats = self._bpf_stats
            if time.monotonic() - taken < BPF_STATS_TTL:
                return stats
            stats = self.meter.program_stats()
            self._bpf_stats = (time.monotonic(), stats)
            return stats

    def __enter__(self) -> Exporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- exposition ---------------------------------------------------------------------------------

    def render(self, *, openmetrics: bool = False) -> str:
        """The exposition text: Prometheus text format 0.0.4, or OpenMetrics 1.0
        (what a scraper gets that sends ``Accept: application/openmetrics-text``)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return (generate_openmetrics if openmetrics else generate_latest)(registry).decode()

    def shown(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` less those of compartments gone for ``stale_after`` seconds
        or more (counted from the first scrape that found them gone)."""
        now = time.monotonic()
        out = []
        with self._gone_lock:
            for r in rows:
                key = (r["tenant"], r["compartment"])
                if r.get("present", True):
                    self._gone_since.pop(key, None)
                elif now - self._gone_since.setdefault(key, now) >= self.stale_after:
                    continue
                out.append(r)
        return out

    def families(self) -> Iterator[Any]:
        # Over 60 lines on purpose: one metric family after another, in
        # exposition order, each a few lines; the list is the documentation.
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        meter = self.meter
        rows = self.shown(meter.totals())
        labels = ["tenant", "compartment"]
        for name, field, divisor, unit, doc in _SIMPLE:
            fam = CounterMetricFamily(name.removesuffix("_total"), doc, labels=labels, unit=unit)
            for r in rows:
                if r[field] is not None:
                    fam.add_metric([r["tenant"], r["compartment"]], _scaled(r[field], divisor), created=r["created"])
            yield fam
        fam = CounterMetricFamily("meter_energy_joules", "Energy attributed to the compartment.",
                                  labels=[*labels, "domain"], unit="joules")
        for r in rows:
            for domain, uj in r["energy_uj_by_domain"].items():
                fam.add_metric([r["tenant"], r["compartment"], domain], _scaled(uj, 10**6), created=r["created"])
        yield fam
        for unit in ("packets", "bytes"):
            for kind, what in (("", "as the kernel passed them (skbs)"), ("wire_", "on the wire")):
                fam = CounterMetricFamily(f"meter_network_{kind}{unit}",
                                          f"Network {unit} on the compartment's interfaces, {what}.",
                                          labels=[*labels, "direction", "interface"],
                                          unit="bytes" if unit == "bytes" else "")
                for r in rows:
                    for iface, v in r["ports"].items():
                        for direction in ("rx", "tx"):
                            fam.add_metric([r["tenant"], r["compartment"], direction, iface],
                                           v[f"{direction}_{kind}{unit}"], created=r["created"])
                yield fam
            fam = CounterMetricFamily(f"meter_vf_{unit}", f"SR-IOV VF {unit} of the compartment's VFs.",
                                      labels=[*labels, "direction"], unit="bytes" if unit == "bytes" else "")
            for r in rows:
                for direction in ("rx", "tx"):
                    v = r[f"vf_{direction}_{unit}"]
                    if v is not None:
                        fam.add_metric([r["tenant"], r["compartment"], direction], v, created=r["created"])
            yield fam
        yield InfoMetricFamily("meter_build", "meter's version and settings.", value={
            "version": __version__, "window_ms": str(meter.window_ms), "counters": meter.plan.source or "none",
            "energy": meter.energy_source or "none"})
        # Self-metrics, counting since the meter opened (row 0's start).
        st = meter.stats
        opened = rows[0]["created"] if rows else None
        for name, value, doc in (
            ("meter_records", st.records, "Records produced."),
            ("meter_late_seconds", st.late_ns / 1e9,
             "CPU time billed in a later window than its own (records with cpu_source late; not lost)."),
            ("meter_unattributed_seconds", st.unattributed_ns / 1e9,
             "CPU time of cgroups beyond the kernel ring's rows, billed to the unattributed row."),
            ("meter_late_unmatched_seconds", st.late_unmatched_ns / 1e9,
             "Late CPU time no closed window was short of (billed; its window of origin not named)."),
            ("meter_unseen_seconds", st.unseen_ns / 1e9,
             "Kernel-charged CPU time of slices no sched_switch event showed, given back to their cgroups."),
            ("meter_conservation_violations", st.conservation_violations, "Windows whose CPU time did not add up."),
            # Only where the switch program has runs and idle paths: elsewhere they are not measured.
            *((("meter_run_switches", st.run_switches,
                "Context switches between two tasks of one cgroup, charged with the run they joined (no clock read)."),
               ("meter_idle_out_switches", st.idle_out_switches,
                "Context switches away from the idle task charged in the switch program itself (its idle path)."),
               ("meter_idle_in_switches", st.idle_in_switches,
                "Context switches into the idle task charged in the switch program itself (its idle path)."))
              if meter.cpu_source is not None and meter.cpu_source.same_run else ()),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value, created=opened)
            yield fam
        lost = CounterMetricFamily("meter_lost_seconds", "CPU time that did not reach any record, by reason.",
                                   labels=["reason"])
        lost.add_metric(["missing_windows"], st.missing_windows * meter.ncpu * meter.window_ns / 1e9, created=opened)
        yield lost
        unsettled = GaugeMetricFamily("meter_unsettled_seconds",
                                      "Kernel/clock differences not settled in the records yet (bills off cpu.stat by this).")
        unsettled.add_metric([], st.unsettled_ns / 1e9)
        yield unsettled
        pend = GaugeMetricFamily("meter_pending_adjustment_seconds",
                                 "Kernel/clock differences the CPUs hold, to be settled in coming windows.")
        pend.add_metric([], st.pending_adjustment_ns / 1e9)
        yield pend
        for name, value, doc in (
            ("meter_missing_windows", st.missing_windows, "Closed windows with no record at all."),
            ("meter_unresolved_cgroups", st.unresolved_cgroups, "Cgroups gone before they could be named (billed to host)."),
            ("meter_filter_reattachments", st.filter_reattachments,
             "Times meter's tc filter was found removed by someone else (packets meanwhile uncounted) and attached again."),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value, created=opened)
            yield fam
        fam = CounterMetricFamily("meter_late_packets", "Packets billed in a later window than their own (not lost).")
        fam.add_metric([], st.net_late_packets, created=opened)
        yield fam
        lag = GaugeMetricFamily("meter_drain_lag_seconds", "Now minus the end of the newest record.")
        if st.last_window_end_ns:
            lag.add_metric([], max(0.0, (time.time_ns() - st.last_window_end_ns) / 1e9))
        yield lag
        run_s = CounterMetricFamily("meter_bpf_run_seconds", "Time in meter's BPF programs (bpf_stats).", labels=["program"])
        runs = CounterMetricFamily("meter_bpf_runs", "Runs of meter's BPF programs (bpf_stats).", labels=["program"])
        for prog, (ns, cnt) in sorted(self.bpf_program_stats().items()):
            run_s.add_metric([prog], ns / 1e9, created=opened)
            runs.add_metric([prog], cnt, created=opened)
        yield run_s
        yield runs
        conns = CounterMetricFamily("meter_exporter_connections", "Connections to this exporter, by outcome.",
                                    labels=["outcome"])
        for outcome, n in self.connections.items():
            conns.add_metric([outcome], n, created=self._started)
        yield conns
        scrapes = CounterMetricFamily("meter_exporter_responses", "Metrics responses served, by exposition format.",
                                      labels=["format"])
        for fmt, n in self.formats.items():
            scrapes.add_metric([fmt], n, created=self._started)
        yield scrapes


class _Collector:
    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Any]:
        return self.exporter.families()

