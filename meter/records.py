"""The billable record: one compartment x one window.

Records travel as numpy structured arrays of :data:`RECORD_DTYPE`; the
string fields (host, tenant, compartment, provenance) are ``str`` objects.
Field meanings (all counters are integers so any rollup is an exact sum):

==================  ===========================================================
window_start_ns     window start, wall-clock UTC ns (monotonic start + offset)
window_ms           window width W in ms; window k covers [k*W, (k+1)*W) monotonic
host                host name the record was measured on
tenant              tenant name; ``host``/``idle`` for the pseudo-compartments
compartment         compartment name; ``host``/``idle`` for the pseudo-compartments
cgroup_id           the compartment's cgroup id (0 for idle)
cpu_ns              CPU time the kernel charged the compartment's tasks, placed in windows, ns
cycles              CPU cycles (measured, or estimated: see counters_source)
instructions        instructions retired
cache_misses        last-level cache misses
softirq_ns          kernel packet-processing time for the compartment's ports, ns
softirq_given_ns    of its cpu_ns, packet processing it ran for other rows' ports, ns
energy_uj           energy attributed to the compartment, microjoules
rx_packets ...      skbs/bytes across the compartment's interfaces, as tc sees
                    them (a GSO/GRO skb is one)
rx_wire_packets ... packets/bytes those were on the wire: a GSO/GRO skb is
                    gso_segs packets with a copy of its headers each (billed)
vf_* ...            SR-IOV VF counters of the compartment's VFs
seq                 per-host sequence number (idempotent storage key with host)
cpu_source          where cpu_ns came from: ``kernel`` (the scheduler's own charge,
                    placed by the clock), ``clock`` (time between switches: no
                    BTF) or ``cpu.stat``
counters_source     ``pmu``, ``cpu-clock estimate`` or ``perf:<spec,...>``
energy_source       ``rapl-perf``, ``powercap``, ``pyrapl`` or ``model``
net_source          ``tc``
vf_source           ``vf`` or ``representor``
==================  ===========================================================

A number that is unavailable is :data:`NULL` (-1) in the array and
None/null in every output, never 0; a provenance string is empty when the
family is not measured.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = [
    "COUNTER_COLUMNS",
    "ESTIMATE_COLUMNS",
    "FIELDS",
    "NULL",
    "PROVENANCE_FIELDS",
    "RECORD_DTYPE",
    "build",
    "empty",
    "estimate_counts",
    "estimate_sql",
    "factorize",
    "group_sums",
    "null_sums",
    "to_dicts",
    "window_sums",
    "zeroed",
    "window_totals",
]

#: The array value of an unavailable number.
NULL = -1

# Strings are Python objects shared by every record of a compartment (8
# bytes a field): fixed-width unicode would cost 256 bytes a field.
_NAME = object
_SRC = object

#: Integer counter columns, in record order.
COUNTER_COLUMNS = (
    "cpu_ns",
    "cycles",
    "instructions",
    "cache_misses",
    "softirq_ns",
    "softirq_given_ns",
    "energy_uj",
    "rx_packets",
    "rx_bytes",
    "tx_packets",
    "tx_bytes",
    "rx_wire_packets",
    "rx_wire_bytes",
    "tx_wire_packets",
    "tx_wire_bytes",
    "vf_rx_packets",
    "vf_rx_bytes",
    "vf_tx_packets",
    "vf_tx_bytes",
)

#: Rollup columns counting the records whose figure was estimated, and how
#: a record's provenance says so: (provenance field, text it contains).
ESTIMATES = {
    "estimated_cycles": ("counters_source", "cpu-clock estimate"),
    "estimated_energy": ("energy_source", "model"),
}
ESTIMATE_COLUMNS = tuple(ESTIMATES)

PROVENANCE_FIELDS = ("cpu_source", "counters_source", "energy_source", "net_source", "vf_source")

RECORD_DTYPE = np.dtype(
    [
        ("window_start_ns", np.int64),
        ("window_ms", np.int32),
        ("host", _NAME),
        ("tenant", _NAME),
        ("compartment", _NAME),
        ("cgroup_id", np.uint64),
        *[(name, np.int64) for name in COUNTER_COLUMNS],
        ("seq", np.int64),
        *[(name, _SRC) for name in PROVENANCE_FIELDS],
    ]
)

#: Field names in record order (the keys of ``meter record --format jsonl``).
FIELDS: tuple[str, ...] = tuple(RECORD_DTYPE.names or ())

_INT_FIELDS = {name for name in FIELDS if RECORD_DTYPE[name].kind in "iu"}
_NULLABLE = set(COUNTER_COLUMNS)


_STRING_FIELDS = tuple(name for name in FIELDS if RECORD_DTYPE[name].kind == "O")


def build(n: int, columns: dict[str, Any] | None = None) -> np.ndarray:
    """``n`` records, each field from ``columns`` (an array or a scalar) or its default.

    Defaults: counters NULL, strings empty, other numbers 0. Every field is
    written exactly once (this is on the drain path).
    """
    columns = columns or {}
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise KeyError(f"not record fields: {', '.join(sorted(unknown))}")
    # np.zeros, not np.empty: empty initialises object fields one by one (~10x slower).
    out = np.zeros(n, dtype=RECORD_DTYPE)
    for name in FIELDS:
        if name in columns:
            out[name] = columns[name]
        elif name in _NULLABLE:
            out[name] = NULL
        elif name in _STRING_FIELDS:
            out[name] = ""
    return out


def factorize(col: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(distinct strings, int32 code per element) of a string (object) column.

    The common case, one value in the whole column (host, provenance), costs
    one vectorised comparison.
    """
    if len(col) == 0:
        return [], np.zeros(0, np.int32)
    first = col[0]
    if bool((col == first).all()):
        return [first], np.zeros(len(col), np.int32)
    uniq, code = np.unique(col.astype(str), return_inverse=True)
    return uniq.tolist(), code.astype(np.int32)


def empty(n: int) -> np.ndarray:
    """``n`` records with every counter NULL and every string empty."""
    return build(n)


def to_dicts(batch: np.ndarray) -> Iterator[dict[str, Any]]:
    """Plain-Python dicts (NULL -> None, empty provenance -> None), for output."""
    columns = {name: batch[name].tolist() for name in FIELDS}
    for i in range(len(batch)):
        row: dict[str, Any] = {}
        for name in FIELDS:
            v = columns[name][i]
            if name in _NULLABLE and v == NULL:
                v = None
            elif name in PROVENANCE_FIELDS and v == "":
                v = None
            row[name] = v
        yield row


def group_sums(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each group's first element, Σ values per group) of ``key``, groups by ascending key.

    One stable sort, one ``reduceat``: exact integer sums, no Python loop.
    The indices are into the original arrays (``key[first]`` is each
    group's key), so any other column can be read per group with them.
    """
    order = np.argsort(key, kind="stable")
    k = key[order]
    if len(k) == 0:
        return np.zeros(0, np.int64), values[:0]
    first = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    return order[first], np.add.reduceat(values[order], first, axis=0)


def null_sums(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`group_sums` of record columns where NULL means "not measured":
    (first, sums with NULL as 0, whether each column was measured in the group)."""
    present = values != NULL
    first, s = group_sums(key, np.concatenate([np.where(present, values, 0), present.astype(np.int64)], axis=1))
    n = values.shape[1]
    return first, s[:, :n], s[:, n:] > 0


def zeroed(col: np.ndarray) -> np.ndarray:
    """A record column with NULL (not measured) as 0, for sums."""
    return np.where(col == NULL, 0, col)


def window_sums(batch: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, Σ field) per window of a batch, windows ascending; NULL counts 0."""
    starts = batch["window_start_ns"]
    first, sums = group_sums(starts, zeroed(batch[field]))
    return starts[first], sums


def window_totals(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, the CPU time each window's records account for).

    cpu_ns + softirq_ns - softirq_given_ns over every row of a window: with
    every CPU metered, ncpu x W. Records of late time (``cpu_source`` late:
    another window's, billed in this one) are not this window's time; the
    window they came from has a ``late`` row for them.
    """
    own = batch[batch["cpu_source"] != "late"] if np.any(batch["cpu_source"] == "late") else batch
    starts, cpu = window_sums(own, "cpu_ns")
    _, softirq = window_sums(own, "softirq_ns")
    _, given = window_sums(own, "softirq_given_ns")
    return starts, cpu + softirq - given


def estimate_counts(strings: dict[str, tuple[list[str], np.ndarray]], n: int) -> np.ndarray:
    """Per record, 1 where its figure of each :data:`ESTIMATE_COLUMNS` was estimated
    (int64, one row per column), from the batch's :func:`factorize`-d provenance columns."""
    out = np.zeros((len(ESTIMATE_COLUMNS), n), np.int64)
    for i, (field, text) in enumerate(ESTIMATES.values()):
        table, codes = strings[field]
        hit = np.array([text in str(v) for v in table], bool)
        if hit.any():
            out[i] = hit[codes]
    return out


def estimate_sql(column: str) -> str:
    """The SQL expression of one record's count for an estimate column (for Parquet billing)."""
    field, text = ESTIMATES[column]
    return f"CASE WHEN {field} LIKE '%{text}%' THEN 1 ELSE 0 END"
