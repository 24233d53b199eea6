"""A meter run as a long-lived process (``meter record``, ``serve``, ``top``).

What such a process says and does beside metering: it stops cleanly on
SIGINT/SIGTERM, reloads its topology on SIGHUP (a bad file keeps the old
one), and reports on stderr, as it happens, counters it cannot have and
usage it lost. The library itself stays silent; this is the shell's voice.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from .errors import MeterError
from .topology import Topology


class LossReporter:
    """Says on stderr, as it happens and at most every ``every`` seconds, what was lost
    (and what was billed late or as unattributed)."""

    def __init__(self, meter: Any, every: float = 10.0) -> None:
        self.meter, self.every = meter, every
        self.last_line, self.last_at = "", 0.0

    def now(self) -> None:
        line = self.meter.stats.notice_line()
        if line and line != self.last_line and time.monotonic() - self.last_at >= self.every:
            click.echo(f"meter: warning: {line}", err=True)
            self.last_line, self.last_at = line, time.monotonic()


@contextlib.contextmanager
def signals(on_stop: Callable[[], None]) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM: call ``on_stop``; SIGHUP: ask for a topology reload (the Event)."""
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


def reload_if_asked(meter: Any, reload_wanted: threading.Event, load: Callable[[], Topology]) -> None:
    """If SIGHUP came, re-read the topology; a bad file keeps the old one and says why."""
    if not reload_wanted.is_set():
        return
    reload_wanted.clear()
    try:
        meter.set_topology(load())
        click.echo(f"meter: topology reloaded: {len(meter.topology.compartments)} compartments", err=True)
    except MeterError as err:
        click.echo(f"meter: reload failed, keeping the previous topology: {err}", err=True)


def warn_unavailable(meter: Any, *, explicit: bool) -> None:
    """Say on stderr which counters the user asked for and cannot have."""
    if explicit:
        for field, why in meter.plan.unavailable.items():
            fallback = "estimated from cpu-clock" if field in meter.plan.estimated else "null in records"
            click.echo(f"meter: warning: {field} ({why}): {fallback}", err=True)
