"""Source: energy, from RAPL where the machine has it, else a power model.

Readers, best first (``pick_reader`` chooses; ``meter check`` and every
record's ``energy_source`` name the choice):

* ``rapl-perf``: the kernel's perf ``power`` PMU (energy-pkg, energy-cores,
  energy-ram, energy-psys), opened once per package on the PMU's cpumask,
  scaled by the sysfs ``.scale`` (Joules). 64-bit counts: no wrap.
* ``powercap``: ``/sys/class/powercap/intel-rapl:*`` zones and subzones,
  ``energy_uj`` wrapping at ``max_energy_range_uj``. The longest safe
  interval between reads is ``max_energy_range_uj / max power``: with the
  common 262,143,328,850 µJ range and a 200 W package, about 21 minutes;
  meter reads at every batch (2 s by default).
* ``pyrapl``: the optional ``pyRAPL`` package (``pip install meter[energy]``).
* ``model``: no RAPL (most VMs): per-socket idle and max watts from config,
  energy = sockets x (idle + (max - idle) x utilisation) x time. Flagged
  ``model``: an estimate, never passed off as measured.

Every reader returns energy per *domain* in integer µJ since its previous
read. ``package`` is what is split by cycles, ``dram`` by cache misses;
``cores``/``uncore`` are parts of the package and only reported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import host
from ..attribution import POLICIES
from ..errors import ConfigError
from ..perf import PerfEvent, count_over

__all__ = [
    "DEFAULT_IDLE_WATTS",
    "DEFAULT_MAX_WATTS",
    "EnergyReader",
    "EnergySettings",
    "ModelReader",
    "PerfPowerReader",
    "PowercapReader",
    "PyRAPLReader",
    "pick_reader",
]

log = logging.getLogger("meter.energy")

#: Power model defaults, per socket: a typical server package idles around
#: a quarter of its TDP. Override in the topology's [energy] table.
DEFAULT_IDLE_WATTS = 30.0
DEFAULT_MAX_WATTS = 120.0

_BACKENDS = ("auto", "rapl-perf", "powercap", "pyrapl", "model")
_ENERGY_KEYS = {"policy", "backend", "powercap_root", "idle_watts", "max_watts", "sockets"}


@dataclasses.dataclass(frozen=True)
class EnergySettings:
    """The [energy] table of a topology file, validated."""

    policy: str = "separate"
    backend: str = "auto"
    powercap_root: str | None = None
    idle_watts: float = DEFAULT_IDLE_WATTS
    max_watts: float = DEFAULT_MAX_WATTS
    sockets: int | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any], *, path: str | None = None) -> EnergySettings:
        def bad(key: str, message: str) -> ConfigError:
            return ConfigError(message, path=path, key=f"energy.{key}")

        for key in table:
            if key not in _ENERGY_KEYS:
                raise bad(key, f"unknown key (expected one of: {', '.join(sorted(_ENERGY_KEYS))})")
        s = cls(**{k: v for k, v in table.items()})
        if s.policy not in POLICIES:
            raise bad("policy", f"must be one of {', '.join(POLICIES)}, not {s.policy!r}")
        if s.backend not in _BACKENDS:
            raise bad("backend", f"must be one of {', '.join(_BACKENDS)}, not {s.backend!r}")
        for key in ("idle_watts", "max_watts"):
            v = getattr(s, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise bad(key, f"must be a number of watts >= 0, not {v!r}")
        if s.max_watts < s.idle_watts:
            raise bad("max_watts", f"must be at least idle_watts ({s.idle_watts}), not {s.max_watts}")
        if s.sockets is not None and (isinstance(s.sockets, bool) or not isinstance(s.sockets, int) or s.sockets < 1):
            raise bad("sockets", f"must be a whole number >= 1, not {s.sockets!r}")
        if s.powercap_root is not None and not isinstance(s.powercap_root, str):
            raise bad("powercap_root", "must be a path string")
        return s


class EnergyReader(Protocol):
    """Energy per domain (µJ) since the previous ``read()``."""

    source: str
    domains: list[str]

    def read(self) -> dict[str, int]: ...

    def close(self) -> None: ...


# -- powercap -------------------------------------------------------------------------------


def _domain(name: str) -> str:
    """powercap zone names (package-0, core, dram) and perf event suffixes (pkg, ram) to domains."""
    name = name.strip().lower()
    if name.startswith("package") or name == "pkg":
        return "package"
    if name in ("dram", "ram"):
        return "dram"
    return {"cores": "core"}.get(name, name)  # core, uncore, psys


@dataclasses.dataclass
class _Zone:
    path: Path
    domain: str
    max_range: int
    last: int


class PowercapReader:
    """RAPL through powercap sysfs, with wrap-around and vanishing zones handled."""

    source = "powercap"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.zones: list[_Zone] = []
        for zone in sorted(self.root.glob("intel-rapl:*")):
            try:
                name = (zone / "name").read_text()
                max_range = int((zone / "max_energy_range_uj").read_text())
                last = int((zone / "energy_uj").read_text())
            except (OSError, ValueError):
                continue
            self.zones.append(_Zone(zone, _domain(name), max_range, last))
        self.domains = sorted({z.domain for z in self.zones})
        self.wraps = 0

    def __bool__(self) -> bool:
        return bool(self.zones)

    def read(self) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(self.domains, 0)
        for zone in list(self.zones):
            try:
                now = int((zone.path / "energy_uj").read_text())
            except (OSError, ValueError) as err:
                log.warning("powercap zone %s vanished (%s): its energy is no longer measured", zone.path.name, err)
                self.zones.remove(zone)
                continue
            delta = now - zone.last
            if delta < 0:  # wrapped at max_energy_range_uj
                delta += zone.max_range + 1
                self.wraps += 1
            zone.last = now
            out[zone.domain] = out.get(zone.domain, 0) + delta
        return out

    def close(self) -> None:
        self.zones = []


# -- perf power PMU -----------------------------------------------------------------------


class PerfPowerReader:
    """RAPL through the kernel's perf ``power`` PMU (64-bit counts, no wrap)."""

    source = "rapl-perf"

    def __init__(self, root: str | Path | None = None) -> None:
        self.pmu = host.path("sys/bus/event_source/devices/power", root)
        self._fds: list[tuple[int, str, float]] = []  # fd, domain, µJ per count
        self._last: dict[int, int] = {}
        self.events = self.parse_events(self.pmu)
        self.domains = sorted({_domain(n.removeprefix("energy-")) for n in self.events})

    @staticmethod
    def parse_events(pmu: Path) -> dict[str, tuple[PerfEvent, float]]:
        """Event name -> (PerfEvent, µJ per count) from the PMU's sysfs."""
        out: dict[str, tuple[PerfEvent, float]] = {}
        try:
            ptype = int((pmu / "type").read_text())
        except (OSError, ValueError):
            return out
        for ev in sorted((pmu / "events").glob("energy-*")):
            if "." in ev.name:
                continue
            try:
                config = int(ev.read_text().strip().split("event=")[1].split(",")[0], 0)
                scale = float((pmu / "events" / f"{ev.name}.scale").read_text())
                unit = (pmu / "events" / f"{ev.name}.unit").read_text().strip()
            except (OSError, ValueError, IndexError):
                continue
            if unit.lower() != "joules":
                continue
            out[ev.name] = (PerfEvent(f"power/{ev.name}", ptype, config), scale * 1e6)
        return out

    def open(self) -> None:
        """Open each event on one CPU per package (the PMU's cpumask)."""
        from ..perf import _open

        try:
            cpus = _cpulist((self.pmu / "cpumask").read_text())
        except OSError:
            cpus = [0]
        for name, (event, uj_per_count) in self.events.items():
            for cpu in cpus:
                fd, _err = _open(event, cpu, disabled=False)
                if fd >= 0:
                    self._fds.append((fd, _domain(name.removeprefix("energy-")), uj_per_count))
                    self._last[fd] = self._count(fd)

    @staticmethod
    def _count(fd: int) -> int:
        return int(struct.unpack("=Q", os.read(fd, 8))[0])

    def __bool__(self) -> bool:
        return bool(self._fds)

    def read(self) -> dict[str, int]:
        out: dict[str, float] = dict.fromkeys(self.domains, 0.0)
        for fd, domain, uj in self._fds:
            now = self._count(fd)
            out[domain] += (now - self._last[fd]) * uj
            self._last[fd] = now
        return {d: int(round(v)) for d, v in out.items()}

    def close(self) -> None:
        for fd, _d, _u in self._fds:
            os.close(fd)
        self._fds = []


def _cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


# -- pyRAPL -------------------------------------------------------------------------------------


class PyRAPLReader:
    """The optional pyRAPL package as a backend (``pip install meter[energy]``)."""

    source = "pyrapl"

    def __init__(self) -> None:
        import pyRAPL

        pyRAPL.setup()
        self._pyrapl = pyRAPL
        self.domains = ["package", "dram"]
        self._measure = pyRAPL.Measurement("meter")
        self._measure.begin()

    def read(self) -> dict[str, int]:
        self._measure.end()
        result = self._measure.result
        out = {"package": int(sum(result.pkg or [])), "dram": int(sum(result.dram or []))}
        self._measure.begin()
        return out

    def close(self) -> None:
        pass


# -- model --------------------------------------------------------------------------------------


def count_sockets(root: str | Path | None = None) -> int:
    """Packages on this machine, from each CPU's topology/physical_package_id."""
    ids = set()
    for f in host.root(root).glob("sys/devices/system/cpu/cpu[0-9]*/topology/physical_package_id"):
        try:
            ids.add(int(f.read_text()))
        except (OSError, ValueError):
            continue
    return max(1, len(ids))


class ModelReader:
    """Energy estimated from utilisation: flagged ``model``, never measured."""

    source = "model"
    domains = ["package"]

    def __init__(self, idle_watts: float, max_watts: float, sockets: int) -> None:
        self.idle_watts = float(idle_watts)
        self.max_watts = float(max_watts)
        self.sockets = int(sockets)

    def window_energy(self, busy_ns: np.ndarray, ncpu: int, window_ns: int) -> np.ndarray:
        """Integer µJ per window for Σ busy cpu_ns per window (rounded, exact sum kept by caller)."""
        util = np.clip(busy_ns / float(ncpu * window_ns), 0.0, 1.0)
        watts = self.sockets * (self.idle_watts + (self.max_watts - self.idle_watts) * util)
        return np.rint(watts * window_ns / 1000.0).astype(np.int64)  # W x ns = nJ; /1000 = µJ

    def read(self) -> dict[str, int]:  # energy comes from window_energy instead
        return {"package": 0}

    def close(self) -> None:
        pass


def pick_reader(settings: EnergySettings, *, root: str | Path | None = None) -> Any:
    """The best available reader for ``settings.backend`` (``auto``: best first)."""
    backend = settings.backend
    pc_root = settings.powercap_root or str(host.path("sys/class/powercap", root))
    tried = []
    if backend in ("auto", "rapl-perf"):
        perf = PerfPowerReader(root)
        events = perf.events
        # A virtualised PMU may open but never count: probe before trusting it.
        if events and any(count_over(ev, 0.05) for ev, _ in events.values()):
            perf.open()
            if perf:
                return perf
        tried.append("perf power PMU: none counting")
    if backend in ("auto", "powercap"):
        pc = PowercapReader(pc_root)
        if pc:
            return pc
        tried.append(f"powercap: no zones in {pc_root}")
    if backend in ("auto", "pyrapl"):
        try:
            return PyRAPLReader()
        except Exception as err:  # noqa: BLE001  (pyRAPL raises many kinds)
            tried.append(f"pyRAPL: {err}")
    if backend != "model" and backend != "auto":
        raise ConfigError(f"energy backend {backend!r} is not available here ({'; '.join(tried)})", key="energy.backend")
    return ModelReader(settings.idle_watts, settings.max_watts, settings.sockets or count_sockets(root))
