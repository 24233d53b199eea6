"""meter: millisecond-granularity billable records for tenant compartments.

Kernel programs (``bpf/``) attribute CPU time, perf counters, packets and
kernel packet-processing time to cgroups; sources drain them in bulk; the
engine resolves cgroups to tenants and compartments and hands numpy record
batches to sinks. See docs/architecture.md for the flow and the record model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    BPFError,
    CgroupError,
    ConfigError,
    HeadersError,
    MeterError,
    PerfEventError,
    PrivilegeError,
    SinkError,
)
from .records import FIELDS, NAMES, NULL, RECORD_DTYPE, code, text
from .topology import Compartment, Topology

if TYPE_CHECKING:  # the engine pulls in the BPF machinery: imported when asked for (below)
    from .engine import Meter

__all__ = [
    "BPFError",
    "CgroupError",
    "ConfigError",
    "HeadersError",
    "PerfEventError",
    "PrivilegeError",
    "SinkError",
    "FIELDS",
    "NAMES",
    "NULL",
    "RECORD_DTYPE",
    "Compartment",
    "Meter",
    "MeterError",
    "Topology",
    "__version__",
    "code",
    "text",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The engine pulls in the BPF machinery; import it only when asked for.
    if name == "Meter":
        from .engine import Meter

        return Meter
    raise AttributeError(name)
