"""What the engine needs from each kind of source, and who builds them.

The engine (``meter/engine.py``) only talks to these protocols, so any
source can be swapped: :class:`KernelSources` builds the real ones (BPF
programs, tc filters, netlink, RAPL), ``meter.sources.fake.FakeSources``
builds simulated ones for tests and benchmarks that run without root or
without the hardware. See docs/architecture.md, "Sources".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    from ..perf import PerfEvent
    from .energy import EnergyReader, EnergySettings
    from .net import NetDrain, Port
    from .sched import SchedDrain

__all__ = ["PACKET_TIMES", "CPUSource", "CPUSpec", "KernelCompartments", "KernelSources", "PacketSource", "SourceFactory",
           "VFPoller", "concat", "packet_time_problem"]

_Drain = TypeVar("_Drain")


@dataclasses.dataclass(frozen=True)
class KernelCompartments:
    """What the kernel charges a task's usage to, decided at charge time
    (docs/architecture.md, "Compartments in the kernel")."""

    #: {cgroup id: cgroup level} of every compartment: a task below one is charged to the deepest.
    levels: dict[int, int] = dataclasses.field(default_factory=dict)
    #: The cgroup id charged for a task below no compartment (the host's); 0: its own id.
    other: int = 0
    #: Discovery roots, {cgroup id: (cgroup level, depth)}: a task below a root
    #: (and below no deeper compartment) is charged to its ancestor ``depth``
    #: levels below the root, the cgroup a discovery rule names.
    roots: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)


def concat(parts: list[_Drain]) -> _Drain:
    """One drain out of a source's drains in order (``SchedDrain``, ``NetDrain``:
    dataclasses of parallel arrays): every array joined (None where a part has None)."""
    if len(parts) == 1:
        return parts[0]
    joined: dict[str, Any] = {}
    for field in dataclasses.fields(parts[0]):  # type: ignore[arg-type]
        arrays = [getattr(p, field.name) for p in parts]
        if any(a is None for a in arrays):  # not known for one of them: for none
            joined[field.name] = None
            continue
        # An empty default may lack the counters' columns: leave it out.
        joined[field.name] = np.concatenate([a for a in arrays if len(a)] or arrays[:1])
    return dataclasses.replace(parts[0], **joined)  # type: ignore[type-var]


class CPUSource(Protocol):
    """CPU time and counters per (cgroup id, window), drained once windows close.

    ``drain()`` returns every window at or below the watermark published the
    time before (by a drain, or by a ``publish()`` between drains); after
    it, ``closed_window`` is the newest window taken.
    """

    ncpu: int
    #: cpu_ns is the kernel's own charge (else the clock's): the records' cpu_source.
    kernel_charge: bool
    closed_window: int
    #: Times idle CPUs were made to switch so that their windows close.
    nudges: int
    #: The switch program has runs of one cgroup and its idle paths (bpf/sched.bpf.c,
    #: METER_SAME_RUN): else the three counts below are not measured (and stay 0).
    same_run: bool
    @property
    def same_run_switches(self) -> int:
        """Switches inside one cgroup charged with the run they joined (0: none, or no runs)."""

    @property
    def idle_out_switches(self) -> int:
        """Switches away from idle charged in the switch program itself (no tail call; 0: none)."""

    @property
    def idle_in_switches(self) -> int:
        """Switches into idle charged in the switch program itself (no tail call; 0: none)."""

    @property
    def first_window(self) -> int: ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def drain(self, *, final: bool = False) -> SchedDrain: ...

    def publish(self) -> np.ndarray:
        """Close the CPUs' windows without taking them: idle CPUs made to charge,
        and the newest window every CPU has passed published; the next
        ``drain()`` takes up to it. Returns the charge ids met for the first
        time since the last drain or publish (may be none, as ``met_cgid``)."""
        ...

    def stats(self) -> dict[str, int]:
        """Kernel-side counts named as in :data:`meter.bpfabi.STATS`."""
        ...

    def set_compartments(self, compartments: KernelCompartments) -> None:
        """Charge usage to compartments' cgroup ids at charge time, whatever
        cgroup below them it ran in."""
        ...

    def program_fds(self) -> dict[str, list[int]]:
        """This source's loaded kernel programs: {program name: [fd, ...]}."""
        ...


class PacketSource(Protocol):
    """Packets, bytes and softirq time per (port, kind, window)."""

    ports: list[Port]
    #: Times one of its filters was found removed by someone else and attached again.
    reattachments: int

    def attach(self) -> None: ...

    def add(self, port: Port) -> None:
        """Count a port added while metering."""
        ...

    def remove(self, port: Port) -> None:
        """Stop counting a port; what it counted so far is still drained."""
        ...

    def refresh(self) -> None:
        """Follow interfaces that appeared or vanished."""
        ...

    def drain(self, closable: int) -> NetDrain: ...

    def program_fds(self) -> dict[str, list[int]]:
        """This source's loaded kernel programs: {program name: [fd, ...]} (one per port)."""
        ...

    def close(self) -> None: ...


class VFPoller(Protocol):
    """SR-IOV VF counter deltas per compartment row since the last poll."""

    source: str

    def poll(self) -> dict[int, tuple[int, int, int, int]]: ...

    def close(self) -> None: ...


#: How a packet that nothing cheaper dates is dated: a clock read (exact), or
#: the CPU's last charge (no clock read; up to a tick early). See
#: docs/architecture.md, "When a packet is counted".
PACKET_TIMES = ("clock", "charge")


def packet_time_problem(value: object) -> str | None:
    """Why ``value`` is not a packet_time setting, or None."""
    if value not in PACKET_TIMES:
        return f"must be one of {', '.join(repr(t) for t in PACKET_TIMES)}, not {value!r}"
    return None


@dataclasses.dataclass(frozen=True)
class CPUSpec:
    """What the engine asks of a CPU source."""

    window_ns: int
    events: list[PerfEvent]
    #: The most windows one charge may be split over.
    max_span: int
    #: The ports packets are counted for (their number sizes the net maps).
    nports: int
    #: Cgroups the CPU ring holds, and its windows (SchedSource's max_rows, ring_windows).
    max_rows: int = 256
    ring_windows: int | None = None
    #: How packets outside softirq spans are dated (PACKET_TIMES).
    packet_time: str = "clock"


class SourceFactory(Protocol):
    """Builds a meter's sources when it opens."""

    def cpu(self, spec: CPUSpec) -> CPUSource: ...

    def packets(self, cpu: CPUSource, ports: list[Port]) -> PacketSource: ...

    def vfs(self, vfs: list[tuple[int, str, int]]) -> VFPoller: ...

    def energy(self, settings: EnergySettings) -> EnergyReader: ...


class KernelSources:
    """The real sources: BPF programs on this kernel, tc, netlink, RAPL.

    ``vf_links(pf)`` replaces the netlink query for a PF's VF counters
    (for agents that have them already, and for tests).
    """

    def __init__(self, vf_links: Callable[[str], list[Any]] | None = None) -> None:
        self.vf_links = vf_links

    def cpu(self, spec: CPUSpec) -> CPUSource:
        from .sched import SchedSource

        return SchedSource(
            spec.window_ns, spec.events, max_rows=spec.max_rows, max_span=spec.max_span, ring_windows=spec.ring_windows,
            net=bool(spec.nports), max_ports=spec.nports, packet_time=spec.packet_time,
        )

    def packets(self, cpu: CPUSource, ports: list[Port]) -> PacketSource:
        from .net import NetSource

        # The tc programs share the sched program's maps (one compiled unit).
        return NetSource(cpu.bpf, ports, ring_windows=cpu.ring_windows,  # type: ignore[attr-defined]
                         max_ports=cpu.max_ports)  # type: ignore[attr-defined]

    def vfs(self, vfs: list[tuple[int, str, int]]) -> VFPoller:
        from .sriov import VFSource

        return VFSource(vfs, get_links=self.vf_links)

    def energy(self, settings: EnergySettings) -> EnergyReader:
        from .energy import pick_reader

        return pick_reader(settings)
