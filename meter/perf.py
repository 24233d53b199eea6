"""Perf events: naming them, probing whether they open, and the no-PMU fallback.

A counter is named by a spec string: ``hw:cycles``, ``hw:instructions``,
``hw:cache-misses`` (``PERF_TYPE_HARDWARE``), ``sw:cpu-clock`` and other
software events (``PERF_TYPE_SOFTWARE``), or ``TYPE:CONFIG`` with numbers
(any perf type, e.g. a PMU's dynamic type from
``/sys/bus/event_source/devices/*/type``). Whether an event exists is
found by opening it (``perf_event_open``), never by reading versions.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import platform
import struct
import time
from pathlib import Path

from . import host
from .errors import ConfigError, PerfEventError

__all__ = [
    "COUNTER_FIELDS",
    "CounterPlan",
    "DEFAULT_COUNTERS",
    "PerfEvent",
    "count_over",
    "cpu_hz",
    "open_error",
    "plan_counters",
    "parse_event",
]

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1

_HARDWARE = {
    "cycles": 0,
    "cpu-cycles": 0,
    "instructions": 1,
    "cache-references": 2,
    "cache-misses": 3,
    "branch-instructions": 4,
    "branches": 4,
    "branch-misses": 5,
    "bus-cycles": 6,
    "ref-cycles": 9,
}
_SOFTWARE = {
    "cpu-clock": 0,
    "task-clock": 1,
    "page-faults": 2,
    "context-switches": 3,
    "cpu-migrations": 4,
    "minor-faults": 5,
    "major-faults": 6,
    "alignment-faults": 7,
    "emulation-faults": 8,
    "dummy": 9,
    "cgroup-switches": 11,
}

#: Record fields a perf counter can fill, in record order.
COUNTER_FIELDS = ("cycles", "instructions", "cache_misses")

#: The counters meter asks for unless told otherwise.
DEFAULT_COUNTERS = {
    "cycles": "hw:cycles",
    "instructions": "hw:instructions",
    "cache_misses": "hw:cache-misses",
}


@dataclasses.dataclass(frozen=True)
class PerfEvent:
    """One perf event: its spec string, perf type and config."""

    spec: str
    type: int
    config: int

    @property
    def is_hardware(self) -> bool:
        return self.type == PERF_TYPE_HARDWARE


def parse_event(spec: str) -> PerfEvent:
    """Parse a counter spec; raises :class:`PerfEventError` naming it."""
    text = spec.strip()
    kind, sep, name = text.partition(":")
    if not sep:
        kind, name = ("hw", text) if text in _HARDWARE else ("sw", text)
    try:
        if kind == "hw":
            return PerfEvent(text, PERF_TYPE_HARDWARE, _HARDWARE[name])
        if kind == "sw":
            return PerfEvent(text, PERF_TYPE_SOFTWARE, _SOFTWARE[name])
        return PerfEvent(text, int(kind, 0), int(name, 0))
    except (KeyError, ValueError):
        raise PerfEventError(
            f"unknown perf event {spec!r}: use hw:NAME ({', '.join(sorted(_HARDWARE))}), "
            f"sw:NAME ({', '.join(sorted(_SOFTWARE))}) or TYPE:CONFIG",
            event=spec,
        ) from None


_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
_ATTR_SIZE = 128
_DISABLED = 1 << 0


def _open(event: PerfEvent, cpu: int, disabled: bool) -> tuple[int, int]:
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    attr = bytearray(_ATTR_SIZE)
    # type, size, config, sample_period, sample_type, read_format, flags
    flags = _DISABLED if disabled else 0
    struct.pack_into("=IIQQQQQ", attr, 0, event.type, _ATTR_SIZE, event.config, 0, 0, 0, flags)
    libc = ctypes.CDLL(None, use_errno=True)
    buf = (ctypes.c_char * _ATTR_SIZE).from_buffer(attr)
    fd = libc.syscall(nr, buf, -1, cpu, -1, 0)
    return fd, (ctypes.get_errno() if fd < 0 else 0)


def count_over(event: PerfEvent, seconds: float, cpu: int = 0) -> int | None:
    """Count ``event`` on ``cpu`` for ``seconds``; None when it does not open.

    Tells an event that opens but never counts (a virtualised RAPL PMU that
    reads 0) from one that works.
    """
    fd, _err = _open(event, cpu, disabled=False)
    if fd < 0:
        return None
    try:
        first = struct.unpack("=Q", os.read(fd, 8))[0]
        time.sleep(seconds)
        return int(struct.unpack("=Q", os.read(fd, 8))[0] - first)
    finally:
        os.close(fd)


def open_error(event: PerfEvent, cpu: int = 0) -> str | None:
    """Open ``event`` system-wide on ``cpu`` and close it again.

    Returns None when it opens, else a short reason ("not supported by this
    machine" for a missing PMU, or the OS error).
    """
    if platform.machine() not in _NR_PERF_EVENT_OPEN:
        return f"perf_event_open is not known on {platform.machine()}"
    fd, err = _open(event, cpu, disabled=True)
    if fd >= 0:
        os.close(fd)
        return None
    if err in (errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV, errno.EINVAL):
        return "not supported by this machine"
    if err in (errno.EACCES, errno.EPERM):
        return "permission denied (needs root or CAP_PERFMON)"
    return os.strerror(err)


def cpu_hz(root: str | Path | None = None) -> int | None:
    """Nominal CPU frequency in Hz, for estimating cycles from cpu-clock.

    cpufreq's ``cpuinfo_max_freq`` when present, else the first ``cpu MHz``
    in /proc/cpuinfo; None when neither says.
    """
    khz = host.read_int(host.path("sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq", root))
    if khz is not None:
        return khz * 1000
    for line in (host.read_text(host.path("proc/cpuinfo", root)) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1_000_000)
            except ValueError:
                return None
    return None


@dataclasses.dataclass(frozen=True)
class CounterPlan:
    """Which record fields come from which perf event, and what is estimated.

    ``events`` maps record field -> event read per schedule. ``estimated``
    names fields computed from cpu_ns (cycles at ``hz``) because their event
    could not be opened; other unopened fields are NULL. ``source`` is the
    records' ``counters_source``.
    """

    events: dict[str, PerfEvent]
    estimated: tuple[str, ...]
    unavailable: dict[str, str]
    hz: int | None
    source: str


def plan_counters(requested: dict[str, str] | None = None, *, probe: bool = True) -> CounterPlan:
    """Decide the counter set: open what opens, estimate cycles, null the rest.

    ``requested`` maps record fields (cycles, instructions, cache_misses) to
    perf event specs; default :data:`meter.perf.DEFAULT_COUNTERS`.
    """
    requested = dict(DEFAULT_COUNTERS if requested is None else requested)
    events: dict[str, PerfEvent] = {}
    unavailable: dict[str, str] = {}
    for field, spec in requested.items():
        if field not in COUNTER_FIELDS:
            raise ConfigError(f"counter field {field!r} is not a record field (one of {', '.join(COUNTER_FIELDS)})")
        ev = parse_event(spec)
        reason = open_error(ev) if probe else None
        if reason is None:
            events[field] = ev
        else:
            unavailable[field] = f"{spec}: {reason}"
    hz = None
    estimated: tuple[str, ...] = ()
    if "cycles" not in events:
        hz = cpu_hz()
        if hz:
            estimated = ("cycles",)
    if events and all(ev.is_hardware for ev in events.values()) and set(events) == set(requested):
        source = "pmu"
    elif events:
        source = "perf:" + ",".join(f"{f}={ev.spec}" for f, ev in events.items())
        if estimated:
            source += "; cycles: cpu-clock estimate"
    else:
        source = "cpu-clock estimate" if estimated else ""
    return CounterPlan(events, estimated, unavailable, hz, source)
