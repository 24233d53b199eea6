"""The ``meter`` command: a thin shell over the library (click + rich).

Errors are one line on stderr (``meter: error: ...``) with exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from . import __version__, daemon, shell
from .errors import MeterError
from .page import STEPS


@click.group(cls=shell.MeterGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
        from . import report

        report.findings_table(findings, ok, reason, shell.console(120))
    sys.exit(0 if ok else 1)


# -- record ----------------------------------------------------------------------


@main.command()
@shell.topology_options
@click.option("--window-ms", type=int, default=None, help="Record width in ms (default: config, else 1).")
@click.option("--duration", type=shell.SECONDS, default=None, help="Stop after S seconds.")
@click.option("--output", "-o", default=None, help="Write a file (or - for stdout) instead of the store.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="Format of --output.")
@click.option("--store", "store_path", type=click.Path(), default=None,
              help="Record store (default: /var/lib/meter/records.db as root, or $METER_STORE).")
@click.option("--retention", type=shell.SECONDS, default=None,
              help="Keep the store's raw records S seconds (default: 7 days); the rollups that bills read "
                   "are kept longer (--rollup-retention).")
@click.option("--rollup-retention", type=shell.SECONDS, default=None,
              help="Keep the store's 1 s rollups S seconds (default: 90 days); the 1 h rollups are kept "
                   "for good.")
@shell.counters_option
@click.option("--print-bpf", is_flag=True, help="Print the kernel program and its -D settings, then exit.")
def record(config: str | None, cgroup_root: str | None, window_ms: int | None, duration: float | None,
           output: str | None, fmt: str, store_path: str | None, retention: float | None,
           rollup_retention: float | None, counters: str | None, print_bpf: bool) -> None:
    """Write billable records (one per compartment per window) until stopped.

    By default into the record store (SQLite, crash-safe; a restart
    continues the sequence). Ctrl-C or SIGTERM flushes everything measured
    up to the last complete window and exits 0.
    """
    import socket

    from .engine import Meter
    from .sinks import Sink
    from .sinks.files import FileSink
    from .sinks.store import DEFAULT_RETENTION_S, DEFAULT_ROLLUP_RETENTION_S, Store

    for name, given in (("--retention", retention), ("--rollup-retention", rollup_retention)):
        if given is not None and output is not None:
            raise click.UsageError(f"{name} is for the record store: a file written with --output keeps "
                                   "every record")
    with shell.errors():
        topo = shell.load_topology(config, cgroup_root)
        if print_bpf:
            click.echo(Meter(topo, window_ms, counters=shell.counters(counters)).program_listing())
            return
        meter = Meter(topo, window_ms, counters=shell.counters(counters))  # every setting checked; nothing loaded
        if output is not None:
            sink: Sink = FileSink(output, fmt)
        else:
            sink = Store(store_path, retention_s=retention if retention is not None else DEFAULT_RETENTION_S,
                         rollup_retention_s=(rollup_retention if rollup_retention is not None
                                             else DEFAULT_ROLLUP_RETENTION_S))
            meter.next_seq = sink.claim(socket.gethostname())
        daemon.warn_unavailable(meter, explicit=bool(counters))

        said = daemon.LossReporter(meter)
        with daemon.signals(meter.stop) as reload_wanted:
            # At every take (0.5 s), not only at batches (2 s): a reload does not wait.
            meter.on_take(lambda: daemon.reload_if_asked(meter, reload_wanted,
                                                         lambda: shell.load_topology(config, cgroup_root)))
            try:
                with meter:
                    # In the drain's class (meter.loop), writes too; the store takes the
                    # records' columns, never laid out as records (docs/architecture.md, "Records").
                    for batch in meter.batches(duration, columns=isinstance(sink, Store)):
                        sink.write(batch)
                        said.now()
            finally:
                sink.close()
        st = meter.stats
        summary = f"meter: {sink.count} records, {st.windows} windows of {meter.window_ms} ms"
        if st.unresolved_cgroups:
            summary += f"; {st.unresolved_cgroups} cgroups gone before they could be named, billed to host"
        if st.notice_line():
            summary += f"; {st.notice_line()}"
        click.echo(summary, err=True)
        if st.loss_line():
            sys.exit(3)


# -- bill, export, economics --------------------------------------------------------


def _time_ns(text: str, option: str) -> int:
    """A billing time option (ISO 8601 or Unix seconds) -> ns, or a usage error naming the option."""
    from .bill import parse_time_ns

    try:
        return parse_time_ns(text)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=option) from None


@main.command()
@click.option("--prices", required=True, type=click.Path(), help="Price sheet (TOML).")
@click.option("--from", "start", required=True, help="Start (ISO 8601 or Unix seconds, inclusive).")
@click.option("--to", "end", required=True, help="End (exclusive).")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "focus"]), default="table", show_default=True)
@click.option("--store", "store_path", type=click.Path(), default=None, help="Record store to bill from.")
@click.option("--parquet", "parquet_dir", type=click.Path(), default=None,
              help="Bill a directory of Parquet files from many hosts instead (DuckDB).")
@click.option("--fleet", "fleet_url", default=None,
              help="Bill the fleet's Delta table at this URL (meter commit) instead.")
@click.option("--scheduler", default=None, help="With --fleet: a Dask scheduler (tcp://HOST:8786) to sum on.")
@click.option("--engine", type=click.Choice(["duckdb", "dask"]), default="duckdb", show_default=True,
              help="With --fleet and no --scheduler: DuckDB here, or a local Dask cluster.")
@click.option("--charge-period", type=click.IntRange(min=1), default=3600, show_default=True,
              help="Seconds per FOCUS charge period; divides a day, so periods start on UTC hours.")
@click.option("--billing-period", type=click.Choice(["month", "day"]), default="month", show_default=True,
              help="FOCUS billing period (UTC calendar).")
@click.option("--issue", is_flag=True,
              help="Record the invoices in the store's ledger: a period already invoiced is refused.")
def bill(prices: str, start: str, end: str, tenant: str | None, fmt: str, store_path: str | None,
         parquet_dir: str | None, fleet_url: str | None, scheduler: str | None, engine: str, charge_period: int,
         billing_period: str, issue: bool) -> None:
    """Invoices per tenant for [--from, --to): line items in decimal money."""
    from . import report
    from .bill import PriceSheet, charges, invoice_id, invoices, merge_periods, usage_from_parquet, usage_from_store
    from .sinks.store import Store

    with shell.errors():
        sheet = PriceSheet.from_file(prices)
        start_ns, end_ns = _time_ns(start, "--from"), _time_ns(end, "--to")
        if end_ns <= start_ns:  # before any file is opened
            raise click.BadParameter("the billing period is empty or reversed: --to must be after --from",
                                     param_hint="--to")
        if 86_400 % charge_period:
            raise click.BadParameter(f"{charge_period} s does not divide a day (86400 s): charge periods start "
                                     "on UTC hour boundaries (try 1, 60, 300, 900, 3600 or 86400)",
                                     param_hint="--charge-period")
        if parquet_dir and fleet_url:
            raise click.BadParameter("bill either --parquet files or a --fleet table, not both", param_hint="--fleet")
        if issue and (parquet_dir or fleet_url):
            raise click.BadParameter("the invoice ledger is in the record store: bill from --store to issue",
                                     param_hint="--issue")
        period = charge_period * 1_000_000_000
        issued: list[dict[str, Any]] = []
        if fleet_url:
            from .fleet import fleet_usage

            by_period = fleet_usage(fleet_url, start_ns, end_ns, period, engine=engine, scheduler=scheduler)
            invs = invoices(merge_periods(by_period), sheet, start_ns, end_ns, tenant=tenant)
        elif parquet_dir:
            by_period = usage_from_parquet(parquet_dir, start_ns, end_ns, period, by_resource=True)
            invs = invoices(merge_periods(by_period), sheet, start_ns, end_ns, tenant=tenant)
        else:
            with Store(store_path, must_exist=True) as store:
                by_period = usage_from_store(store, start_ns, end_ns, period, by_resource=True)
                invs = invoices(merge_periods(by_period), sheet, start_ns, end_ns, tenant=tenant)
                if issue:
                    ids = [invoice_id(i.tenant, start_ns, end_ns, sheet.digest) for i in invs]
                    store.issue([(n, i.tenant, start_ns, end_ns, i.currency, str(i.total), str(i.subtotal),
                                  sheet.digest) for n, i in zip(ids, invs)])
                    for n, i in zip(ids, invs):
                        click.echo(f"meter: issued {n} to {i.tenant}: {i.total} {i.currency}", err=True)
                issued = store.invoices_issued(start_ns, end_ns)
                # Usage that arrived after an invoice of exactly this period (a late batch) is on no
                # invoice: say so rather than let the bill and the invoice differ without a word.
                now = {(i.tenant, i.currency): i.subtotal for i in invs}
                for r in issued:
                    sub = now.get((r["tenant"], r["currency"]))
                    if (r["start_ns"], r["end_ns"]) == (start_ns, end_ns) and sub is not None and \
                            r["price_sheet"] == sheet.digest and str(sub) != r["subtotal"]:
                        click.echo(f"meter: warning: {r['tenant']}'s usage of this period changed after {r['id']} "
                                   f"was issued (subtotal {r['subtotal']}, now {sub}): the difference is on no "
                                   "invoice yet", err=True)
        if tenant is None:
            for line in sheet.unused_overrides([i.tenant for i in invs]):
                click.echo(f"meter: warning: {line}", err=True)
        if fmt == "json":
            click.echo(json.dumps([i.as_dict() for i in invs], indent=2))
        elif fmt == "csv":
            report.invoices_csv(invs, sys.stdout)
        elif fmt == "focus":
            def invoice_of(ch: Any) -> str | None:
                return next((r["id"] for r in issued if r["tenant"] == ch.tenant and r["start_ns"] <= ch.start_ns
                             and ch.end_ns <= r["end_ns"]), None)

            report.focus_csv(charges(by_period, sheet, start_ns, end_ns, period, tenant=tenant), sheet,
                             billing_period, invoice_of, sys.stdout)
        else:
            report.invoices_tables(invs, f"{start} – {end}", shell.console(120))


@main.command()
@click.option("--prices", required=True, type=click.Path(), help="Price sheet (TOML).")
@click.option("--from", "start", required=True, help="Start (ISO 8601 or Unix seconds, inclusive).")
@click.option("--to", "end", required=True, help="End (exclusive).")
@click.option("--tenant", default=None, help="Only this tenant.")
@click.option("--store", "store_path", type=click.Path(), default=None, help="Record store to report from.")
@click.option("--step", type=click.Choice([str(s) for s in STEPS]), default=None,
              help="Seconds per point (default: at most 240 points).")
@click.option("--output", "-o", required=True, type=click.Path(), help="The HTML file to write.")
def report(prices: str, start: str, end: str, tenant: str | None, store_path: str | None, step: str | None,
           output: str) -> None:
    """A self-contained HTML page: per tenant CPU, packets, energy and cost over
    time, all tenants stacked, and each tenant's invoice (as meter bill)."""
    from .bill import PriceSheet, usage_from_store
    from .page import pick_step, render
    from .paths import write_whole
    from .sinks.store import Store

    with shell.errors():
        sheet = PriceSheet.from_file(prices)
        start_ns, end_ns = _time_ns(start, "--from"), _time_ns(end, "--to")
        if end_ns <= start_ns:
            raise click.BadParameter("the period is empty or reversed: --to must be after --from", param_hint="--to")
        seconds = int(step) if step else pick_step(start_ns, end_ns)
        with Store(store_path, must_exist=True) as store:
            by_period = usage_from_store(store, start_ns, end_ns, seconds * 1_000_000_000, by_resource=True)
            where = str(store.path)
        page = render(by_period, sheet, start_ns, end_ns, seconds, tenant=tenant, source=f"the record store {where}")
        write_whole(output, page.encode(), what="report")
        click.echo(f"meter: wrote {output} ({len(page) // 1024} KiB)", err=True)


@main.command()
@click.option("--to", "url", required=True, help="Where segments go: a directory, file://PATH or s3://BUCKET/PREFIX.")
@click.option("--store", "store_path", type=click.Path(), default=None, help="Record store to ship from.")
@click.option("--raw", is_flag=True, help="Also ship each segment's raw 1 ms records (under raw/).")
def ship(url: str, store_path: str | None, raw: bool) -> None:
    """Ship the store's records not shipped yet as Parquet segments of exact 1 s rollups."""
    from .ship import ship as ship_segments
    from .sinks.store import Store

    with shell.errors():
        with Store(store_path, must_exist=True) as store:
            done = ship_segments(store, url, raw=raw)
        again = f" ({done.retried} sent again after an interrupted run)" if done.retried else ""
        click.echo(f"meter: shipped {len(done.segments)} segments, {done.rows} rows, to {url}{again}", err=True)
        if done.missing:
            click.echo(f"meter: warning: {done.missing} records the segments cover were not in the store (expired "
                       "before they were shipped, or lost to a kill): ship more often than the store's retention",
                       err=True)


@main.command("commit")
@click.option("--segments", "segments_url", required=True, help="Where hosts ship segments (meter ship --to).")
@click.option("--table", "table_url", required=True, help="The Delta table to commit them into.")
def commit_cmd(segments_url: str, table_url: str) -> None:
    """Commit shipped segments into the fleet's Delta table, each exactly once."""
    from .fleet import commit

    with shell.errors():
        done = commit(segments_url, table_url)
        click.echo(f"meter: committed {len(done.added)} segments; {len(done.already)} were in already; "
                   f"{len(done.waiting)} wait for an earlier segment of their host", err=True)


@main.command("export")
@click.option("--parquet", "parquet_dir", required=True, type=click.Path(), help="Directory to write (host=/date= partitions).")
@click.option("--store", "store_path", type=click.Path(), default=None, help="Record store to read.")
@click.option("--from", "start", default=None, help="Start (ISO 8601 or Unix seconds).")
@click.option("--to", "end", default=None, help="End (exclusive).")
def export_cmd(parquet_dir: str, store_path: str | None, start: str | None, end: str | None) -> None:
    """Export raw records from the store to Parquet, partitioned by host and date."""
    from .sinks.parquet import write_parquet
    from .sinks.store import Store

    start_ns = _time_ns(start, "--from") if start else None
    end_ns = _time_ns(end, "--to") if end else None
    if start_ns is not None and end_ns is not None and end_ns <= start_ns:
        raise click.BadParameter("the export period is empty or reversed: --to must be after --from",
                                 param_hint="--to")
    with shell.errors():
        with Store(store_path, must_exist=True) as store:
            batch = store.records(start_ns, end_ns)
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
            number = int(value) if fields[name].type in ("int", int) else Decimal(value)
        except (ValueError, InvalidOperation):
            raise click.BadParameter(f"{item!r}: {value!r} is not a number", param_hint="--set") from None
        # Counts and prices are positive; the utilisation is a share of one core.
        top = 1 if name == "vswitch_utilisation" else 10**12
        if not (isinstance(number, int) or number.is_finite()) or not 0 < number <= top:
            raise click.BadParameter(f"{item!r}: {name} must be above 0 and at most {top}", param_hint="--set")
        values[name] = number
    a = Assumptions(**values)
    outcomes, charges = model(a), tenant_charges(a)
    if as_json:
        click.echo(json.dumps({"assumptions": {k: str(v) if not isinstance(v, tuple) else [str(x) for x in v]
                                               for k, v in dataclasses.asdict(a).items()},
                               "options": [o.as_dict() for o in outcomes], "tenant_charges": charges}, indent=2))
        return
    from . import report

    report.economics_tables(outcomes, charges, shell.console(120))


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
    with shell.errors():
        mod = _demo_module()
        try:
            topo = mod.up(tenants)
        except mod.DemoError as err:
            shell.fail(str(err))
        click.echo(f"meter: {tenants} tenant vswitches up; topology {topo}", err=True)
        click.echo(f"  sudo .venv/bin/meter top --config {topo}", err=True)


@demo.command("down")
def demo_down() -> None:
    """Remove every process, namespace, veth, cgroup and file the demo made."""
    with shell.errors():
        mod = _demo_module()
        removed = mod.down()
        click.echo(f"meter: demo down ({len(removed)} things removed)", err=True)


# -- serve -------------------------------------------------------------------------


@main.command()
@shell.topology_options
@click.option("--listen", default="127.0.0.1:9464", show_default=True, help="HOST:PORT to serve /metrics on.")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --listen address.")
@click.option("--window-ms", type=int, default=None, help="Record width in ms.")
@click.option("--stale-after", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds a gone compartment's series stay before they are dropped.")
@shell.counters_option
def serve(config: str | None, cgroup_root: str | None, listen: str, allow_remote: bool, window_ms: int | None,
          stale_after: float, counters: str | None) -> None:
    """Serve Prometheus metrics (counters per tenant and compartment) until stopped.

    SIGHUP reloads the topology; SIGINT/SIGTERM stop cleanly (exit 0).
    """
    import threading

    from .engine import Meter
    from .sinks.prometheus import Exporter

    with shell.errors():
        topo = shell.load_topology(config, cgroup_root)
        meter = Meter(topo, window_ms, counters=shell.counters(counters))
        daemon.warn_unavailable(meter, explicit=bool(counters))
        exporter = Exporter(meter, listen, allow_remote=allow_remote, stale_after=stale_after)
        done = threading.Event()
        with daemon.signals(done.set) as reload_wanted:
            exporter.start()
            click.echo(f"meter: serving http://{exporter.host}:{exporter.port}/metrics", err=True)
            try:
                # This thread runs Python every 0.2 s: in the drain's class, so that it
                # never holds the interpreter's lock while the host keeps it off the CPU.
                with meter.urgent():
                    while not done.wait(0.2):
                        if meter.error is not None:
                            raise MeterError(f"metering stopped, so /metrics would no longer move: {meter.error}")
                        daemon.reload_if_asked(meter, reload_wanted, lambda: shell.load_topology(config, cgroup_root))
            finally:
                exporter.stop()


# -- top ---------------------------------------------------------------------------


@main.command()
@shell.topology_options
@click.option("--interval", type=click.FloatRange(min=0.25), default=1.0, show_default=True, help="Refresh period in seconds.")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON and exit.")
@click.option("--window-ms", type=int, default=None, help="Record width in ms.")
@shell.counters_option
def top(config: str | None, cgroup_root: str | None, interval: float, once: bool, as_json: bool,
        window_ms: int | None, counters: str | None) -> None:
    """Live view of what each tenant and compartment consumes."""
    from . import tui
    from .engine import Meter
    from .top import snapshot

    single = once or as_json or not sys.stdout.isatty() or not sys.stdin.isatty()
    # Not a terminal: rich would assume 80 columns; give the table room.
    console = shell.console(160)
    with shell.errors():
        topo = shell.load_topology(config, cgroup_root)
        # A batch every 0.1 s or faster: the screen reads keys between batches.
        tick = min(0.1, interval / 4)
        meter = Meter(topo, window_ms, counters=shell.counters(counters), drain_interval=tick, batch_interval=tick)
        daemon.warn_unavailable(meter, explicit=bool(counters))
        with meter:
            if single:
                batch = np.concatenate(list(meter.batches(interval)) or [np.zeros(0)])
                snap = snapshot(batch, meter.ncpu)
                if as_json:
                    click.echo(json.dumps(snap.as_dict(), indent=2))
                else:
                    console.print(tui.render_top(snap, expand=True, host=meter.host, lost=meter.stats.notice_line()))
                return
            tui.live(meter, console, interval)



if __name__ == "__main__":  # pragma: no cover
    main()
