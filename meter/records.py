"""The billable record: one compartment x one window.

Records travel as numpy structured arrays of :data:`RECORD_DTYPE`, numbers
only: the text fields (host, tenant, compartment, provenance) hold int32
codes into :data:`NAMES`, the process's one dictionary of record strings,
so no stage between the kernel and the store makes a Python object per
record. Text is for people and foreign formats: :func:`text` gives a text
field's strings, :func:`to_dicts` whole rows (docs/architecture.md,
"Records"). Field meanings (all counters are integers so any rollup is an
exact sum):

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

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = [
    "COUNTER_COLUMNS",
    "ESTIMATE_COLUMNS",
    "FIELDS",
    "NAMES",
    "NULL",
    "TEXT_FIELDS",
    "Names",
    "PROVENANCE_FIELDS",
    "RECORD_DTYPE",
    "build",
    "code",
    "empty",
    "estimate_counts",
    "estimate_sql",
    "factorize",
    "group_sums",
    "null_sums",
    "text",
    "to_dicts",
    "window_sums",
    "zeroed",
    "window_totals",
]

#: The array value of an unavailable number.
NULL = -1


class Names:
    """Record strings <-> int32 codes: append-only for the process's life, code 0 is ``""``.

    A code never changes meaning, so a batch's codes stay readable after
    any later batch; the table grows with the distinct names ever met
    (hosts, tenants, compartments, provenance texts), not with records.
    Thread-safe (the drain thread and readers intern alike).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text: list[str] = [""]
        self._code: dict[str, int] = {"": 0}
        self._table = np.array([""], dtype=object)

    def __len__(self) -> int:
        return len(self._text)

    def code(self, text: str) -> int:
        """The code of ``text`` (given one the first time it is met)."""
        got = self._code.get(text)
        if got is not None:
            return got
        if not isinstance(text, str):
            raise TypeError(f"record names are strings, not {type(text).__name__}")
        with self._lock:
            got = self._code.get(text)
            if got is None:
                got = self._code[text] = len(self._text)
                self._text.append(text)
        return got

    def codes(self, texts: Iterable[str]) -> np.ndarray:
        """int32 codes of many strings (each distinct one looked up once)."""
        texts = list(texts)
        uniq = {t: self.code(t) for t in set(texts)}
        return np.fromiter((uniq[t] for t in texts), np.int32, len(texts))

    def text(self, code: int) -> str:
        return self._text[code]

    def table(self) -> np.ndarray:
        """Every string by its code, as an object array (``table()[codes]`` decodes)."""
        if len(self._table) != len(self._text):
            with self._lock:
                self._table = np.array(self._text, dtype=object)
        return self._table


#: The one dictionary of record strings.
NAMES = Names()

# A text field is an int32 code into NAMES (4 bytes, no object per record).
_NAME = np.int32
_SRC = np.int32

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

_NULLABLE = set(COUNTER_COLUMNS)


#: Fields whose numbers are :data:`NAMES` codes.
TEXT_FIELDS: tuple[str, ...] = ("host", "tenant", "compartment", *PROVENANCE_FIELDS)


def code(text: str) -> int:
    """The code of a record string (``batch["tenant"] == code("t0")`` selects a tenant's records)."""
    return NAMES.code(text)


def text(batch: np.ndarray, field: str) -> np.ndarray:
    """A text field's strings (an object array): for people and foreign formats, not the hot path."""
    if field not in TEXT_FIELDS:
        raise KeyError(f"{field} is not a text field of the records")
    return NAMES.table()[batch[field]]


def _as_codes(value: Any) -> Any:
    """A text column given as strings (or already as codes) as codes."""
    if isinstance(value, str):
        return NAMES.code(value)
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS":
        return NAMES.codes(arr.astype(str).tolist() if arr.dtype.kind != "O" else arr.tolist())
    return arr


def build(n: int, columns: dict[str, Any] | None = None) -> np.ndarray:
    """``n`` records, each field from ``columns`` (an array or a scalar) or its default.

    Defaults: counters NULL, strings empty, other numbers 0. A text field
    may be given as strings or as :data:`NAMES` codes. Every field is
    written exactly once (this is on the drain path).
    """
    columns = columns or {}
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise KeyError(f"not record fields: {', '.join(sorted(unknown))}")
    out = np.empty(n, dtype=RECORD_DTYPE)
    for name in FIELDS:
        if name in columns:
            out[name] = _as_codes(columns[name]) if name in TEXT_FIELDS else columns[name]
        elif name in _NULLABLE:
            out[name] = NULL
        else:
            out[name] = 0  # numbers 0, text "" (code 0)
    return out


def factorize(col: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(distinct strings, sorted; int32 index into them per element) of a text
    column (codes): a batch's own small table, in the order people sort names.

    The common case, one value in the whole column (host, provenance), costs
    one vectorised comparison.
    """
    if len(col) == 0:
        return [], np.zeros(0, np.int32)
    first = col[0]
    if bool((col == first).all()):
        return [NAMES.text(int(first))], np.zeros(len(col), np.int32)
    uniq, index = np.unique(col, return_inverse=True)
    texts = [NAMES.text(c) for c in uniq.tolist()]
    order = sorted(range(len(texts)), key=texts.__getitem__)
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return [texts[i] for i in order], rank[index]


def empty(n: int) -> np.ndarray:
    """``n`` records with every counter NULL and every string empty."""
    return build(n)


def to_dicts(batch: np.ndarray) -> Iterator[dict[str, Any]]:
    """Plain-Python dicts (NULL -> None, text fields as strings, empty provenance -> None), for output."""
    columns = {name: (text(batch, name) if name in TEXT_FIELDS else batch[name]).tolist() for name in FIELDS}
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
    late = batch["cpu_source"] == NAMES.code("late")
    own = batch[~late] if np.any(late) else batch
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
