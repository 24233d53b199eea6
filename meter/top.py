"""The model behind ``meter top``: rates per tenant and compartment.

Pure numpy and plain data, no rich: the CLI renders :class:`TopRow` lists;
anything else (a web page, a test) can use the same numbers. Rates are
computed over the windows seen in the last interval, so a row's CPU % is
cpu_ns / (windows x W) x 100 (100 = one core busy).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .records import NAMES, distinct, factorize, null_sums

__all__ = ["TopRow", "TopSnapshot", "snapshot"]

_RATE_FIELDS = ("cycles", "instructions", "cache_misses", "energy_uj", "rx_packets", "tx_packets",
                "rx_bytes", "tx_bytes", "rx_wire_packets", "tx_wire_packets", "rx_wire_bytes", "tx_wire_bytes",
                "softirq_ns", "vf_rx_packets", "vf_tx_packets")


@dataclasses.dataclass(frozen=True)
class TopRow:
    """One tenant (``compartment`` None) or one compartment over an interval."""

    tenant: str
    compartment: str | None
    cpu_pct: float
    rates: dict[str, float | None]  # per second; None when unavailable

    @property
    def ipc(self) -> float | None:
        c, i = self.rates.get("cycles"), self.rates.get("instructions")
        return i / c if c and i is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "compartment": self.compartment, "cpu_pct": self.cpu_pct,
                "ipc": self.ipc, **{f"{k}_per_s": v for k, v in self.rates.items()}}


@dataclasses.dataclass(frozen=True)
class TopSnapshot:
    """Every tenant and compartment row over ``seconds`` of windows."""

    seconds: float
    ncpu: int
    tenants: list[TopRow]
    compartments: list[TopRow]
    provenance: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "ncpu": self.ncpu, "provenance": self.provenance,
                "tenants": [r.as_dict() for r in self.tenants],
                "compartments": [r.as_dict() for r in self.compartments]}


def _rows(batch: np.ndarray, keys: list[str], seconds: float) -> list[TopRow]:
    """One row per distinct value of ``keys``: sort once, sum runs (NULL stays unavailable)."""
    if len(batch) == 0:
        return []
    tables, codes = zip(*(factorize(batch[k]) for k in keys))
    key = np.zeros(len(batch), np.int64)
    for table, code in zip(tables, codes):
        key = key * len(table) + code
    fields = ("cpu_ns", *_RATE_FIELDS)
    first, sums, seen = null_sums(key, np.stack([batch[f] for f in fields], axis=1))
    out = []
    for g, start in enumerate(first.tolist()):
        names = [str(table[code[start]]) for table, code in zip(tables, codes)]
        rates = {f: float(sums[g, j + 1]) / seconds if seen[g, j + 1] else None for j, f in enumerate(_RATE_FIELDS)}
        cpu_pct = float(sums[g, 0]) / (seconds * 1e9) * 100
        out.append(TopRow(names[0], names[1] if len(names) > 1 else None, cpu_pct, rates))
    return out


def snapshot(batch: np.ndarray, ncpu: int) -> TopSnapshot:
    """Aggregate the records of an interval into tenant and compartment rows."""
    if len(batch) == 0:
        return TopSnapshot(0.0, ncpu, [], [], {})
    windows = distinct(batch["window_start_ns"]).size
    seconds = windows * int(batch["window_ms"][0]) / 1000
    prov = {}
    for f in ("cpu_source", "counters_source", "energy_source", "net_source", "vf_source"):
        vals = [NAMES.text(v) for v in distinct(batch[f]).tolist() if v]
        if vals:
            prov[f.removesuffix("_source")] = ", ".join(vals)
    return TopSnapshot(seconds, ncpu, _rows(batch, ["tenant"], seconds), _rows(batch, ["tenant", "compartment"], seconds), prov)
