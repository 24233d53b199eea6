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
from pathlib import Path
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
@click.option("--output", "-o", default=None, help="Write a file (or - for stdout) instead of the store.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="Format of --output.")
@click.option("--store", "store_path", type=click.Path(), default=None,
              help="Record store (default: /var/lib/meter/records.db as root, or $METER_STORE).")
@counters_option
@click.option("--print-bpf", is_flag=True, help="Print the kernel program and its -D settings, then exit.")
def record(config: str | None, cgroup_root: str | None, window_ms: int | None, duration: float | None,
           output: str | None, fmt: str, store_path: str | None, counters: str | None, print_bpf: bool) -> None:
    """Write billable records (one per compartment per window) until stopped.

    By default into the record store (SQLite, crash-safe; a restart
    continues the sequence). Ctrl-C or SIGTERM flushes everything measured
    up to the last complete window and exits 0.
    """
    import socket

    from .engine import Meter
    from .sinks import Sink
    from .sinks.files import FileSink
    from .sinks.store import Store

    with _errors():
        topo = _topology(config, cgroup_root)
        if print_bpf:
            click.echo(Meter(topo, window_ms, counters=_counters(counters)).program_listing())
            return
        first_seq = 0
        if output is not None:
            sink: Sink = FileSink(output, fmt)
        else:
            sink = Store(store_path)
            first_seq = sink.next_seq(socket.gethostname())
        meter = Meter(topo, window_ms, counters=_counters(counters), first_seq=first_seq)
        _warn_unavailable(meter, explicit=bool(counters))

        with _daemon_signals(meter.stop) as reload_wanted:
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
        if st.dropped_updates or st.late_ns or st.unplaced_ns:
            summary += (f"; LOST {st.dropped_ns} ns in {st.dropped_updates} dropped updates, {st.late_ns} ns late, "
                        f"{st.unplaced_ns} ns the kernel side could not carry")
        click.echo(summary, err=True)


@contextlib.contextmanager
def _daemon_signals(on_stop: Callable[[], None]) -> Iterator[Any]:
    """SIGINT/SIGTERM: call ``on_stop``; SIGHUP: ask for a topology reload (an Event)."""
    import threading

    reload_wanted = threading.Event()

    def stop(signum: int, frame: object) -> None:
        on_stop()

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


# -- bill, export, economics --------------------------------------------------------


def _time_ns(text: str, option: str) -> int:
    """ISO 8601 (UTC if no zone) or Unix seconds -> ns; whole seconds only."""
    import datetime
    from decimal import Decimal, InvalidOperation

    try:
        secs = Decimal(text)
    except InvalidOperation:
        try:
            dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a time (ISO 8601 like 2026-11-26T14:00:00Z, or Unix seconds)",
                                     param_hint=option) from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.timezone.utc)
        if dt.microsecond:
            raise click.BadParameter("billing times are whole seconds", param_hint=option) from None
        return int(dt.timestamp()) * 1_000_000_000
    if secs != secs.to_integral_value():
        raise click.BadParameter("billing times are whole seconds", param_hint=option)
    return int(secs) * 1_000_000_000


@main.command()
@click.option("--prices", required=True, type=click.Path(), help="Price sheet (TOML).")
@click.option("--from", "start", required=True, help="Start (ISO 8601 or Unix seconds, inclusive).")
@click.option("--to", "end", required=True, help="End (exclusive).")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "focus"]), default="table", show_default=True)
@click.option("--store", "store_path", type=click.Path(), default=None, help="Record store to bill from.")
@click.option("--parquet", "parquet_dir", type=click.Path(), default=None,
              help="Bill a directory of Parquet files from many hosts instead (DuckDB).")
@click.option("--charge-period", type=click.IntRange(min=1), default=3600, show_default=True,
              help="Seconds per FOCUS charge period.")
def bill(prices: str, start: str, end: str, tenant: str | None, fmt: str, store_path: str | None,
         parquet_dir: str | None, charge_period: int) -> None:
    """Invoices per tenant for [--from, --to): line items in decimal money."""
    import csv

    from .bill import (
        PriceSheet,
        invoices,
        merge_periods,
        usage_from_parquet,
        usage_from_store,
    )
    from .focus import FOCUS_COLUMNS, focus_rows
    from .sinks.store import Store

    with _errors():
        sheet = PriceSheet.from_file(prices)
        start_ns, end_ns = _time_ns(start, "--from"), _time_ns(end, "--to")
        period = charge_period * 1_000_000_000 if fmt == "focus" else max(end_ns - start_ns, 1)
        if parquet_dir:
            by_period = usage_from_parquet(parquet_dir, start_ns, end_ns, period)
            hosts = ",".join(sorted(p.name.removeprefix("host=") for p in Path(parquet_dir).glob("host=*")))
        else:
            with Store(store_path, must_exist=True) as store:
                by_period = usage_from_store(store, start_ns, end_ns, period)
            hosts = ""
        invs = invoices(merge_periods(by_period), sheet, start_ns, end_ns, tenant=tenant)
        if fmt == "json":
            click.echo(json.dumps([i.as_dict() for i in invs], indent=2))
        elif fmt == "csv":
            w = csv.writer(sys.stdout, lineterminator="\n")
            w.writerow(["tenant", "meter", "quantity", "unit", "unit_price", "cost", "currency"])
            for inv in invs:
                for line in inv.lines:
                    w.writerow([inv.tenant, line.meter, line.quantity, line.unit, line.unit_price, line.cost, inv.currency])
                w.writerow([inv.tenant, "TOTAL", "", "", "", inv.total, inv.currency])
        elif fmt == "focus":
            periods = []
            for p, usage in by_period.items():
                ps = start_ns + p * period
                periods.append(invoices(usage, sheet, ps, min(ps + period, end_ns), tenant=tenant)
                               if tenant is None or tenant in usage else [])
            fw = csv.DictWriter(sys.stdout, fieldnames=list(FOCUS_COLUMNS), lineterminator="\n")
            fw.writeheader()
            fw.writerows(focus_rows(periods, start_ns, end_ns, hosts=hosts))
        else:
            from rich.console import Console
            from rich.table import Table

            console = Console() if sys.stdout.isatty() else Console(width=120)
            for inv in invs:
                t = Table(title=f"{inv.tenant}: {start} – {end}", show_footer=True)
                t.add_column("meter", footer="total")
                t.add_column("quantity", justify="right")
                t.add_column("unit")
                t.add_column("unit price", justify="right")
                t.add_column(f"cost ({inv.currency})", justify="right", footer=str(inv.total))
                for line in inv.lines:
                    t.add_row(line.meter, f"{line.quantity:.6f}", line.unit, str(line.unit_price), str(line.cost))
                console.print(t)


@main.command("export")
@click.option("--parquet", "parquet_dir", required=True, type=click.Path(), help="Directory to write (host=/date= partitions).")
@click.option("--store", "store_path", type=click.Path(), default=None, help="Record store to read.")
@click.option("--from", "start", default=None, help="Start (ISO 8601 or Unix seconds).")
@click.option("--to", "end", default=None, help="End (exclusive).")
def export_cmd(parquet_dir: str, store_path: str | None, start: str | None, end: str | None) -> None:
    """Export raw records from the store to Parquet, partitioned by host and date."""
    from .sinks.parquet import write_parquet
    from .sinks.store import Store

    with _errors():
        with Store(store_path, must_exist=True) as store:
            batch = store.records(_time_ns(start, "--from") if start else None, _time_ns(end, "--to") if end else None)
        files = write_parquet(batch, parquet_dir)
        click.echo(f"meter: {len(batch)} records in {len(files)} files under {parquet_dir}", err=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the model as JSON.")
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Change an assumption, e.g. --set servers=200 --set vswitch_utilisation=0.3.")
def economics(as_json: bool, overrides: tuple[str, ...]) -> None:
    """The paper's cost model (section 2.1): options 1-3 against the state of the art."""
    import dataclasses
    from decimal import Decimal, InvalidOperation

    from .economics import Assumptions, model, tenant_charges

    fields = {f.name: f for f in dataclasses.fields(Assumptions)}
    values: dict[str, Any] = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or name not in fields or name == "vswitch_usage":
            raise click.BadParameter(f"{item!r}: use NAME=VALUE with NAME one of "
                                     f"{', '.join(n for n in fields if n != 'vswitch_usage')}", param_hint="--set")
        try:
            values[name] = int(value) if fields[name].type in ("int", int) else Decimal(value)
        except (ValueError, InvalidOperation):
            raise click.BadParameter(f"{item!r}: {value!r} is not a number", param_hint="--set") from None
    a = Assumptions(**values)
    outcomes, charges = model(a), tenant_charges(a)
    if as_json:
        click.echo(json.dumps({"assumptions": {k: str(v) if not isinstance(v, tuple) else [str(x) for x in v]
                                               for k, v in dataclasses.asdict(a).items()},
                               "options": [o.as_dict() for o in outcomes], "tenant_charges": charges}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Operator, dollars per year")
    for col in ("option", "income", "spend", "net revenue", "vs state of the art", "new servers", "capital"):
        t.add_column(col, justify="left" if col == "option" else "right")
    for o in outcomes:
        t.add_row(o.option, f"{o.income:,.2f}", f"{o.spend:,.2f}", f"{o.net_revenue:,.2f}",
                  f"{o.change_vs_state_of_the_art * 100:+.2f} %", str(o.new_servers), f"{o.capital_dollars:,.0f}")
    c = Table(title="Tenant vswitch charges, dollars per year")
    for col in ("vswitch usage", "state of the art", "option 1", "option 2 (cycles)", "option 3"):
        c.add_column(col, justify="right")
    for row in charges:
        c.add_row(f"{Decimal(row['usage']) * 100:.0f} %", row["state_of_the_art"], row["option_1"], row["option_2"],
                  row["option_3"])
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(t)
    console.print(c)


# -- demo --------------------------------------------------------------------------


def _demo_module() -> Any:
    """examples/tenant-vswitches/demo.py of this checkout (the demo is an example, not the library)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "tenant-vswitches" / "demo.py"
    if not path.exists():
        raise MeterError(f"the demo lives in a source checkout ({path} is missing): run meter from the repository")
    spec = importlib.util.spec_from_file_location("meter_demo", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@main.group()
def demo() -> None:
    """Tenant-specific Open vSwitch instances on this host, metered (examples/tenant-vswitches)."""


@demo.command("up")
@click.option("--tenants", type=click.IntRange(min=1, max=200), default=3, show_default=True)
def demo_up(tenants: int) -> None:
    """Start N tenants, each with its own OVS in its own compartment and namespace, and traffic."""
    with _errors():
        mod = _demo_module()
        try:
            topo = mod.up(tenants)
        except mod.DemoError as err:
            _fail(str(err))
        click.echo(f"meter: {tenants} tenant vswitches up; topology {topo}", err=True)
        click.echo(f"  sudo .venv/bin/meter top --config {topo}", err=True)


@demo.command("down")
def demo_down() -> None:
    """Remove every process, namespace, veth, cgroup and file the demo made."""
    with _errors():
        mod = _demo_module()
        removed = mod.down()
        click.echo(f"meter: demo down ({len(removed)} things removed)", err=True)


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
        with _daemon_signals(done.set) as reload_wanted:
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
