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

from .records import NULL

__all__ = ["TopRow", "TopSnapshot", "snapshot"]

_RATE_FIELDS = ("cycles", "instructions", "cache_misses", "energy_uj", "rx_packets", "tx_packets",
                "rx_bytes", "tx_bytes", "softirq_ns", "vf_rx_packets", "vf_tx_packets")


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
    groups: dict[tuple[str, ...], np.ndarray] = {}
    keycols = np.rec.fromarrays([batch[k] for k in keys]) if len(batch) else None
    if keycols is None:
        return []
    uniq, inverse = np.unique(keycols, return_inverse=True)
    for gi, key in enumerate(uniq):
        groups[tuple(key)] = np.flatnonzero(inverse == gi)
    out = []
    for key, idx in groups.items():
        sub = batch[idx]
        rates: dict[str, float | None] = {}
        for f in _RATE_FIELDS:
            col = sub[f]
            rates[f] = None if np.all(col == NULL) else float(col[col != NULL].sum()) / seconds
        cpu_pct = float(sub["cpu_ns"][sub["cpu_ns"] != NULL].sum()) / (seconds * 1e9) * 100
        out.append(TopRow(str(key[0]), str(key[1]) if len(key) > 1 else None, cpu_pct, rates))
    return out


def snapshot(batch: np.ndarray, ncpu: int) -> TopSnapshot:
    """Aggregate the records of an interval into tenant and compartment rows."""
    if len(batch) == 0:
        return TopSnapshot(0.0, ncpu, [], [], {})
    windows = np.unique(batch["window_start_ns"]).size
    seconds = windows * int(batch["window_ms"][0]) / 1000
    prov = {}
    for f in ("cpu_source", "counters_source", "energy_source", "net_source", "vf_source"):
        vals = [v for v in np.unique(batch[f]).tolist() if v]
        if vals:
            prov[f.removesuffix("_source")] = ", ".join(vals)
    return TopSnapshot(seconds, ncpu, _rows(batch, ["tenant"], seconds), _rows(batch, ["tenant", "compartment"], seconds), prov)
