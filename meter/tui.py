"""The terminal UI of ``meter top``: rich rendering and the live key loop.

The numbers come from :mod:`meter.top` (pure); this module only draws them
and reads keys. The CLI (``meter/cli.py``) opens the meter and calls
:func:`live` or :func:`render_top`.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .top import snapshot

__all__ = ["CPU_HOT_PCT", "CPU_WARN_PCT", "live", "render_top"]

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
        # Packets and bits on the wire: what the bill counts (a GSO/GRO skb is many packets).
        "rx_pps": rates.get("rx_wire_packets"),
        "tx_pps": rates.get("tx_wire_packets"),
        "rx_bps": None if rates.get("rx_wire_bytes") is None else rates["rx_wire_bytes"] * 8,
        "tx_bps": None if rates.get("tx_wire_bytes") is None else rates["tx_wire_bytes"] * 8,
        "softirq": None if rates.get("softirq_ns") is None else rates["softirq_ns"] / 1e7,
        "vf_pps": pk("vf_rx_packets", "vf_tx_packets"),
    }


def render_top(snap: Any, *, sort: str = "cpu", reverse: bool = True, expand: bool = False,
               paused: bool = False, host: str = "", lost: str = "") -> Any:
    """The ``meter top`` screen as a rich renderable (used live and print-once)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    prov = snap.provenance
    counters = prov.get("counters", "")
    head = Text()
    # Busy: not idle, and not the late row (its time is in the late records too).
    total_cpu = sum(r.cpu_pct for r in snap.tenants if r.tenant not in ("idle", "late"))
    head.append(f"meter top  {host}  {snap.ncpu} CPUs  busy {total_cpu:.0f}% of {snap.ncpu * 100}%  ")
    head.append(f"over {snap.seconds:.2f}s", style="dim")
    if paused:
        head.append("  [paused]", style="bold yellow")
    if lost:
        head.append(f"  {lost}", style="bold red")
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



def _on_key(state: dict[str, Any], k: str) -> None:
    """Apply one key to the screen's state (sort column, direction, expansion, pause, help)."""
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


def live(meter: Any, console: Any, interval: float) -> None:
    """Draw the live screen from ``meter``'s batches until q / Esc (or the meter stops)."""
    from rich.live import Live

    state = {"sort": "cpu", "reverse": True, "expand": False, "paused": False, "help": False}
    parts: list[np.ndarray] = []
    snap = snapshot(np.zeros(0), meter.ncpu)
    last = time.monotonic()
    with _raw_keys() as key, Live(console=console, auto_refresh=False, screen=False) as screen:
        screen.update(render_top(snap, host=meter.host), refresh=True)
        for batch in meter.batches():
            parts.append(batch)
            k = key()
            if k in ("q", "\x1b"):
                break
            if k:
                _on_key(state, k)
            if time.monotonic() - last >= interval:
                if not state["paused"]:
                    snap = snapshot(np.concatenate(parts), meter.ncpu)
                parts, last = [], time.monotonic()
            view = render_top(snap, sort=str(state["sort"]), reverse=bool(state["reverse"]),
                              expand=bool(state["expand"]), paused=bool(state["paused"]), host=meter.host,
                              lost=meter.stats.notice_line())
            if state["help"]:
                from rich.console import Group
                from rich.text import Text

                view = Group(view, Text(_TOP_HELP))
            screen.update(view, refresh=True)
        meter.stop()


_TOP_HELP = """
q / Esc  quit            < >  sort by the previous / next column (marked ▼ ▲)
r        reverse sort    t    show compartments under each tenant
space    pause           ?    this help
CPU% is of one core (100 = one core busy). – means unavailable here, not zero."""
