"""The ``meter`` command: a thin shell over the library (click + rich).

Errors are one line on stderr (``meter: error: ...``) with exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
import numpy as np

from . import __version__
from .errors import MeterError
from .topology import Topology

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str) -> None:
    click.echo(f"meter: error: {message}", err=True)
    sys.exit(1)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn meter's errors into one line and exit 1; Ctrl-C is not an error."""
    try:
        yield
    except MeterError as err:
        _fail(str(err))


def topology_options(fn: F) -> F:
    fn = click.option("--cgroup-root", type=click.Path(), default=None,
                      help="Each child cgroup of PATH is a compartment (default: the cgroup v2 mount).")(fn)
    fn = click.option("--config", "config", type=click.Path(), default=None,
                      help="Topology TOML file (tenants, compartments, cgroups, interfaces).")(fn)
    return fn


def _topology(config: str | None, cgroup_root: str | None) -> Topology:
    if config and cgroup_root:
        raise click.UsageError("give --config or --cgroup-root, not both")
    if config:
        return Topology.from_file(config)
    return Topology.discover(cgroup_root)


def _counters(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        field, sep, event = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not FIELD=EVENT (e.g. cycles=sw:cpu-clock)", param_hint="--counters")
        out[field.strip()] = event.strip()
    return out


counters_option = click.option(
    "--counters", default=None, metavar="FIELD=EVENT,...",
    help="Perf events per record field, e.g. cycles=hw:cycles,cache_misses=hw:cache-misses "
         "(default: hardware cycles, instructions, cache-misses; cycles estimated without a PMU).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meter")
def main() -> None:
    """Meter tenant compartments with eBPF and bill them by the millisecond."""


# -- check -----------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check(as_json: bool) -> None:
    """Probe this host: what meter can measure here, and what it will do about the rest."""
    from .check import run_checks, verdict

    findings = run_checks()
    ok, reason = verdict(findings)
    if as_json:
        click.echo(json.dumps({"ok": ok, "reason": reason, "checks": {f.key: f.as_dict() for f in findings}}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        style = {"ok": "green", "fallback": "yellow", "missing": "yellow", "fail": "red"}
        table = Table(title="meter check", show_lines=False)
        for col in ("", "what", "found", "meter will"):
            table.add_column(col)
        for f in findings:
            table.add_row(f"[{style[f.status]}]{f.status}[/]", f.title, f.detail, f.action)
        console = Console()
        console.print(table)
        console.print(f"[{'green' if ok else 'red'}]{reason}[/]")
    sys.exit(0 if ok else 1)


# -- record ----------------------------------------------------------------------


@main.command()
@topology_options
@click.option("--window-ms", type=click.IntRange(min=1), default=None, help="Record width in ms (default: config, else 1).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, help="Stop after S seconds.")
@click.option("--output", "-o", default="-", show_default=True, help="File to write, or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@counters_option
def record(config: str | None, cgroup_root: str | None, window_ms: int | None, duration: float | None,
           output: str, fmt: str, counters: str | None) -> None:
    """Write billable records (one per compartment per window) until stopped.

    Ctrl-C or SIGTERM flushes everything measured up to the last complete
    window and exits 0.
    """
    from .engine import Meter
    from .sinks.files import FileSink

    with _errors():
        topo = _topology(config, cgroup_root)
        sink = FileSink(output, fmt)
        meter = Meter(topo, window_ms, counters=_counters(counters))
        _warn_unavailable(meter, explicit=bool(counters))

        with _daemon_signals(meter) as reload_wanted:
            try:
                with meter:
                    for batch in meter.batches(duration):
                        sink.write(batch)
                        if reload_wanted.is_set():
                            reload_wanted.clear()
                            _reload(meter, config, cgroup_root)
            finally:
                sink.close()
        st = meter.stats
        summary = f"meter: {sink.count} records, {st.windows} windows of {meter.window_ms} ms"
        if st.dropped_updates or st.late_ns:
            summary += f"; LOST {st.dropped_ns} ns in {st.dropped_updates} dropped updates, {st.late_ns} ns late"
        click.echo(summary, err=True)


@contextlib.contextmanager
def _daemon_signals(meter: Any) -> Iterator[Any]:
    """SIGINT/SIGTERM: flush and stop; SIGHUP: ask for a topology reload (an Event)."""
    import threading

    reload_wanted = threading.Event()

    def stop(signum: int, frame: object) -> None:
        meter.stop()

    def hup(signum: int, frame: object) -> None:
        reload_wanted.set()

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, hup)
    try:
        yield reload_wanted
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _reload(meter: Any, config: str | None, cgroup_root: str | None) -> None:
    """Re-read the topology; a bad file keeps the old one and says why."""
    try:
        meter.set_topology(_topology(config, cgroup_root))
        click.echo(f"meter: topology reloaded: {len(meter.topology.compartments)} compartments", err=True)
    except MeterError as err:
        click.echo(f"meter: reload failed, keeping the previous topology: {err}", err=True)


def _warn_unavailable(meter: Any, *, explicit: bool) -> None:
    """Say on stderr which counters the user asked for and cannot have."""
    if explicit:
        for field, why in meter.plan.unavailable.items():
            fallback = "estimated from cpu-clock" if field in meter.plan.estimated else "null in records"
            click.echo(f"meter: warning: {field} ({why}): {fallback}", err=True)


# -- serve -------------------------------------------------------------------------


@main.command()
@topology_options
@click.option("--listen", default="127.0.0.1:9464", show_default=True, help="HOST:PORT to serve /metrics on.")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --listen address.")
@click.option("--window-ms", type=click.IntRange(min=1), default=None, help="Record width in ms.")
@counters_option
def serve(config: str | None, cgroup_root: str | None, listen: str, allow_remote: bool, window_ms: int | None,
          counters: str | None) -> None:
    """Serve Prometheus metrics (counters per tenant and compartment) until stopped.

    SIGHUP reloads the topology; SIGINT/SIGTERM stop cleanly (exit 0).
    """
    import threading

    from .engine import Meter
    from .sinks.prometheus import Exporter

    with _errors():
        topo = _topology(config, cgroup_root)
        meter = Meter(topo, window_ms, counters=_counters(counters))
        _warn_unavailable(meter, explicit=bool(counters))
        exporter = Exporter(meter, listen, allow_remote=allow_remote)
        done = threading.Event()
        with _daemon_signals(meter) as reload_wanted:
            signal.signal(signal.SIGINT, lambda *a: done.set())
            signal.signal(signal.SIGTERM, lambda *a: done.set())
            exporter.start()
            click.echo(f"meter: serving http://{exporter.host}:{exporter.port}/metrics", err=True)
            try:
                while not done.wait(0.2):
                    if reload_wanted.is_set():
                        reload_wanted.clear()
                        _reload(meter, config, cgroup_root)
            finally:
                exporter.stop()


# -- top ---------------------------------------------------------------------------

_SORT_KEYS = ["name", "cpu", "cycles", "ipc", "cache_misses", "watts", "rx_pps", "tx_pps", "rx_bps", "tx_bps", "softirq", "vf_pps"]
#: CPU % at or above these turns the cell yellow / red.
CPU_WARN_PCT = 50.0
CPU_HOT_PCT = 90.0


def _fmt_rate(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f}{suffix}{unit}"
    return f"{v:.0f}{unit}"


def _row_cells(r: Any) -> dict[str, Any]:
    rates = r.rates
    pk = lambda a, b: None if rates.get(a) is None and rates.get(b) is None else (rates.get(a) or 0) + (rates.get(b) or 0)  # noqa: E731
    return {
        "name": r.compartment if r.compartment is not None else r.tenant,
        "cpu": r.cpu_pct,
        "cycles": rates.get("cycles"),
        "ipc": r.ipc,
        "cache_misses": rates.get("cache_misses"),
        "watts": None if rates.get("energy_uj") is None else rates["energy_uj"] / 1e6,
        "rx_pps": rates.get("rx_packets"),
        "tx_pps": rates.get("tx_packets"),
        "rx_bps": None if rates.get("rx_bytes") is None else rates["rx_bytes"] * 8,
        "tx_bps": None if rates.get("tx_bytes") is None else rates["tx_bytes"] * 8,
        "softirq": None if rates.get("softirq_ns") is None else rates["softirq_ns"] / 1e7,
        "vf_pps": pk("vf_rx_packets", "vf_tx_packets"),
    }


def render_top(snap: Any, *, sort: str = "cpu", reverse: bool = True, expand: bool = False,
               paused: bool = False, host: str = "") -> Any:
    """The ``meter top`` screen as a rich renderable (used live and print-once)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    prov = snap.provenance
    counters = prov.get("counters", "")
    head = Text()
    total_cpu = sum(r.cpu_pct for r in snap.tenants if r.tenant != "idle")
    head.append(f"meter top  {host}  {snap.ncpu} CPUs  busy {total_cpu:.0f}% of {snap.ncpu * 100}%  ")
    head.append(f"over {snap.seconds:.2f}s", style="dim")
    if paused:
        head.append("  [paused]", style="bold yellow")
    head.append("\n")
    if "estimate" in counters:
        head.append("cycles: estimated (no PMU)  ", style="yellow")
    elif counters:
        head.append(f"counters: {counters}  ", style="dim")
    head.append(f"energy: {prov.get('energy', 'unavailable')}  net: {prov.get('net', 'unavailable')}", style="dim")

    cols = [("name", "TENANT/COMPARTMENT", "left"), ("cpu", "CPU%", "right"), ("cycles", "CYC/s", "right"),
            ("ipc", "IPC", "right"), ("cache_misses", "MISS/s", "right"), ("watts", "W", "right"),
            ("rx_pps", "RX pkt/s", "right"), ("tx_pps", "TX pkt/s", "right"), ("rx_bps", "RX b/s", "right"),
            ("tx_bps", "TX b/s", "right"), ("softirq", "SIRQ%", "right"), ("vf_pps", "VF pkt/s", "right")]
    table = Table(expand=True, box=None, header_style="bold reverse")
    for key, title, just in cols:
        mark = (" ▼" if reverse else " ▲") if key == sort else ""
        table.add_column(title + mark, justify="left" if just == "left" else "right", no_wrap=True)

    def sort_key(row: Any) -> Any:
        v = _row_cells(row)[sort]
        return (v is not None, v if v is not None else 0) if sort != "name" else v

    for t in sorted(snap.tenants, key=sort_key, reverse=reverse):
        _add(table, t, indent=False)
        if expand:
            comps = [c for c in snap.compartments if c.tenant == t.tenant and t.tenant not in ("host", "idle")]
            for c in sorted(comps, key=sort_key, reverse=reverse):
                _add(table, c, indent=True)
    hints = Text("q quit  < > sort  r reverse  t compartments  space pause  ? help", style="dim")
    return Group(head, table, hints)


def _add(table: Any, row: Any, *, indent: bool) -> None:
    c = _row_cells(row)
    cpu = c["cpu"]
    style = "red" if cpu >= CPU_HOT_PCT else "yellow" if cpu >= CPU_WARN_PCT else ""
    table.add_row(
        ("  └ " if indent else "") + c["name"],
        f"[{style}]{cpu:.1f}[/]" if style else f"{cpu:.1f}",
        _fmt_rate(c["cycles"]), "–" if c["ipc"] is None else f"{c['ipc']:.2f}", _fmt_rate(c["cache_misses"]),
        "–" if c["watts"] is None else f"{c['watts']:.1f}", _fmt_rate(c["rx_pps"]), _fmt_rate(c["tx_pps"]),
        _fmt_rate(c["rx_bps"]), _fmt_rate(c["tx_bps"]), "–" if c["softirq"] is None else f"{c['softirq']:.1f}",
        _fmt_rate(c["vf_pps"]),
    )


@contextlib.contextmanager
def _raw_keys() -> Iterator[Callable[[], str | None]]:
    """Non-blocking single keys from a terminal stdin."""
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def key() -> str | None:
        if select.select([fd], [], [], 0)[0]:
            return os.read(fd, 8).decode(errors="ignore")
        return None

    try:
        yield key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


@main.command()
@topology_options
@click.option("--interval", type=click.FloatRange(min=0.25), default=1.0, show_default=True, help="Refresh period in seconds.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON and exit.")
@click.option("--window-ms", type=click.IntRange(min=1), default=None, help="Record width in ms.")
@counters_option
def top(config: str | None, cgroup_root: str | None, interval: float, once: bool, as_json: bool,
        window_ms: int | None, counters: str | None) -> None:
    """Live view of what each tenant and compartment consumes."""
    from rich.console import Console
    from rich.live import Live

    from .engine import Meter
    from .top import snapshot

    single = once or as_json or not sys.stdout.isatty() or not sys.stdin.isatty()
    # Not a terminal: rich would assume 80 columns; give the table room.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    with _errors():
        topo = _topology(config, cgroup_root)
        meter = Meter(topo, window_ms, counters=_counters(counters), drain_interval=min(0.1, interval / 4))
        _warn_unavailable(meter, explicit=bool(counters))
        with meter:
            if single:
                batch = np.concatenate(list(meter.batches(interval)) or [np.zeros(0)])
                snap = snapshot(batch, meter.ncpu)
                if as_json:
                    click.echo(json.dumps(snap.as_dict(), indent=2))
                else:
                    console.print(render_top(snap, expand=True, host=meter.host))
                return
            state = {"sort": "cpu", "reverse": True, "expand": False, "paused": False, "help": False}
            parts: list[np.ndarray] = []
            snap = snapshot(np.zeros(0), meter.ncpu)
            last = time.monotonic()
            with _raw_keys() as key, Live(console=console, auto_refresh=False, screen=False) as live:
                live.update(render_top(snap, host=meter.host), refresh=True)
                for batch in meter.batches():
                    parts.append(batch)
                    k = key()
                    if k:
                        if k in ("q", "\x1b"):
                            break
                        if k == " ":
                            state["paused"] = not state["paused"]
                        elif k == "r":
                            state["reverse"] = not state["reverse"]
                        elif k == "t":
                            state["expand"] = not state["expand"]
                        elif k in ("<", ">"):
                            i = _SORT_KEYS.index(str(state["sort"])) + (1 if k == ">" else -1)
                            state["sort"] = _SORT_KEYS[i % len(_SORT_KEYS)]
                        elif k == "?":
                            state["help"] = not state["help"]
                    if time.monotonic() - last >= interval:
                        if not state["paused"]:
                            snap = snapshot(np.concatenate(parts), meter.ncpu)
                        parts, last = [], time.monotonic()
                    view = render_top(snap, sort=str(state["sort"]), reverse=bool(state["reverse"]),
                                      expand=bool(state["expand"]), paused=bool(state["paused"]), host=meter.host)
                    if state["help"]:
                        from rich.console import Group
                        from rich.text import Text

                        view = Group(view, Text(_TOP_HELP))
                    live.update(view, refresh=True)
                meter.stop()


_TOP_HELP = """
q / Esc  quit            < >  sort by the previous / next column (marked ▼ ▲)
r        reverse sort    t    show compartments under each tenant
space    pause           ?    this help
CPU% is of one core (100 = one core busy). – means unavailable here, not zero."""


if __name__ == "__main__":  # pragma: no cover
    main()
