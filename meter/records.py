"""The billable record: one compartment x one window.

Records travel as numpy structured arrays of :data:`RECORD_DTYPE`, numbers
only: the text fields (host, tenant, compartment, provenance) hold
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

import datetime
import threading
from collections.abc import Iterable, Iterator, Sequence
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
    "COLUMN",
    "Columns",
    "build",
    "code",
    "empty",
    "estimate_counts",
    "estimate_sql",
    "column_ranges",
    "distinct",
    "factorize",
    "from_matrix",
    "group_sums",
    "matrix",
    "nonzero_cells",
    "ranges_of",
    "null_sums",
    "text",
    "to_dicts",
    "unique_ints",
    "utc_text",
    "window_sums",
    "zeroed",
    "window_totals",
]

#: The array value of an unavailable number.
NULL = -1


class Names:
    """Record strings <-> integer codes: append-only for the process's life, code 0 is ``""``.

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

    def find(self, text: str) -> int | None:
        """The code of ``text`` if it was ever met, else None (nothing is added: for queries)."""
        return self._code.get(text)

    def table(self) -> np.ndarray:
        """Every string by its code, as an object array (``table()[codes]`` decodes)."""
        if len(self._table) != len(self._text):
            with self._lock:
                self._table = np.array(self._text, dtype=object)
        return self._table


#: The one dictionary of record strings.
NAMES = Names()

# A text field is a code into NAMES (no object per record). Every field is 8
# bytes, so a batch is also an (n, fields) int64 matrix (matrix()): one pass
# over memory reads every column, where a record-at-a-time layout made each
# column a pass of its own.
_NAME = np.int64
_SRC = np.int64

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
        ("window_ms", np.int64),
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
assert RECORD_DTYPE.itemsize == 8 * len(FIELDS)
#: Each field's column in :func:`matrix`.
COLUMN = {name: i for i, name in enumerate(FIELDS)}


def matrix(batch: np.ndarray) -> np.ndarray:
    """A batch as an (n, len(FIELDS)) int64 matrix (a view when the batch is
    contiguous); ``cgroup_id`` is its uint64 bits, text fields their codes."""
    return np.ascontiguousarray(batch).view(np.int64).reshape(len(batch), len(FIELDS))


def from_matrix(m: np.ndarray) -> np.ndarray:
    """The batch an (n, len(FIELDS)) int64 matrix holds (:func:`matrix` undone)."""
    return np.ascontiguousarray(m, np.int64).view(RECORD_DTYPE).reshape(len(m))

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


def utc_text(ns: int) -> str:
    """A record time (ns since the epoch) as people and foreign formats read it, to
    the second in UTC: ``2027-01-15T11:00:00Z`` (the fraction of a second dropped)."""
    return datetime.datetime.fromtimestamp(ns // 1_000_000_000, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _as_codes(value: Any) -> Any:
    """A text column given as strings (or already as codes) as codes."""
    if isinstance(value, str):
        return NAMES.code(value)
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS":
        return NAMES.codes(arr.astype(str).tolist() if arr.dtype.kind != "O" else arr.tolist())
    return arr


def _defaults() -> np.ndarray:
    """One record of defaults: counters NULL, other numbers 0, text "" (code 0)."""
    one = np.zeros(1, RECORD_DTYPE)
    for name in COUNTER_COLUMNS:
        one[name] = NULL
    return one


_DEFAULT_ROW = _defaults().view(np.int64)
#: Records :func:`build` fills at a time: 2,048 x 248 bytes, within a core's L2 cache.
_BLOCK = 2048


def build(n: int, columns: dict[str, Any] | None = None) -> np.ndarray:
    """``n`` records, each field from ``columns`` (an array or a scalar) or its default.

    Defaults: counters NULL, strings empty, other numbers 0. A text field
    may be given as strings or as :data:`NAMES` codes. Made a block of
    records at a time (this is on the drain path): the block's records of
    defaults, then each given column, while the block is in the CPU's
    cache. A record is 248 bytes, so writing one field is a cache line a
    record: column by column over a whole batch, each pass went out to
    memory (a fifth more time for a drain's 12,000 records, in the loop).
    """
    columns = columns or {}
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise KeyError(f"not record fields: {', '.join(sorted(unknown))}")
    out = np.empty(n, RECORD_DTYPE)
    m = out.view(np.int64).reshape(n, len(FIELDS))
    given = []
    for name, value in columns.items():
        v = _as_codes(value) if name in TEXT_FIELDS else value
        if RECORD_DTYPE[name] == np.uint64:  # its bits, as matrix() holds them
            v = np.asarray(v).astype(np.uint64, copy=False).view(np.int64)
        given.append((COLUMN[name], v, np.ndim(v) > 0))
    for start in range(0, n, _BLOCK):
        block = m[start:start + _BLOCK]
        block[:] = _DEFAULT_ROW
        for j, v, is_array in given:
            block[:, j] = v[start:start + _BLOCK] if is_array else v
    return out


class Columns:
    """A batch's fields as separate arrays (or one value for every record),
    before :meth:`records` lays them out as records: what a drain's own
    passes read (energy, column ranges, totals, checks), a field at a time
    from contiguous memory instead of a field every 248 bytes.

    Indexed like a batch: by field name (an array of ``n``: a field not
    given is its default), or by a boolean mask (a Columns of the records
    it keeps); a name can be set. Text fields hold :data:`NAMES` codes,
    ``cgroup_id`` its uint64 values.
    """

    def __init__(self, n: int, columns: dict[str, Any]) -> None:
        unknown = set(columns) - set(FIELDS)
        if unknown:
            raise KeyError(f"not record fields: {', '.join(sorted(unknown))}")
        self.n = int(n)
        self._columns: dict[str, Any] = {}
        self._laid: np.ndarray | None = None
        for name, value in columns.items():
            self[name] = value

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Columns:
        """The records of ``parts`` in order, as one Columns (a field with one value
        in every part stays that value)."""
        if len(parts) == 1:
            return parts[0]
        cols: dict[str, Any] = {}
        for name in dict.fromkeys(k for p in parts for k in p._columns):
            values = [p._columns.get(name, _DEFAULT_ROW[COLUMN[name]]) for p in parts]
            if all(np.ndim(v) == 0 and v == values[0] for v in values):
                cols[name] = values[0]
            else:
                cols[name] = np.concatenate([v if np.ndim(v) else np.full(p.n, v, RECORD_DTYPE[name])
                                             for v, p in zip(values, parts)])
        return Columns(sum(p.n for p in parts), cols)

    def __len__(self) -> int:
        return self.n

    def __setitem__(self, name: str, value: Any) -> None:
        if name not in COLUMN:
            raise KeyError(f"not a record field: {name}")
        value = _as_codes(value) if name in TEXT_FIELDS else value
        self._columns[name] = np.asarray(value, RECORD_DTYPE[name]) if np.ndim(value) else value
        self._laid = None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            value = self._columns.get(key, _DEFAULT_ROW[COLUMN[key]])
            return value if np.ndim(value) else np.full(self.n, value, RECORD_DTYPE[key])
        keep = np.asarray(key, bool)
        return Columns(int(np.count_nonzero(keep)),
                       {k: v[keep] if np.ndim(v) else v for k, v in self._columns.items()})

    def ranges(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`column_ranges` of the records these make (``cgroup_id`` as its
        int64 bits, as in :func:`matrix`), a pass over each given array only."""
        lo, hi = _DEFAULT_ROW.copy(), _DEFAULT_ROW.copy()
        if self.n == 0:
            return lo, hi
        for name, value in self._columns.items():
            j = COLUMN[name]
            if np.ndim(value):
                v = value.view(np.int64) if value.dtype == np.uint64 else value
                lo[j], hi[j] = v.min(), v.max()
            else:
                lo[j] = hi[j] = np.asarray(value, RECORD_DTYPE[name]).astype(np.int64)
        return lo, hi

    def given(self, name: str) -> Any:
        """``name``'s array, or its one value when every record has it (no array made)."""
        value = self._columns.get(name, _DEFAULT_ROW[COLUMN[name]])
        return value if np.ndim(value) else RECORD_DTYPE[name].type(value)

    def records(self) -> np.ndarray:
        """The records: :func:`build` of these columns (laid out once, at the first call)."""
        if self._laid is None:
            self._laid = build(self.n, self._columns)
        return self._laid


def ranges_of(batch: np.ndarray | Columns) -> tuple[np.ndarray, np.ndarray]:
    """:func:`column_ranges` of a batch, given as records or as :class:`Columns`."""
    return batch.ranges() if isinstance(batch, Columns) else column_ranges(matrix(batch))


def column_ranges(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(least, greatest) of each column of a 2-D array: ``m.min(axis=0), m.max(axis=0)``,
    a third of the time for narrow rows (a block of rows is one call of numpy's
    inner loop, not one call a row)."""
    n, w = m.shape
    if n == 0 or not m.flags.c_contiguous:  # (none: numpy's error; a view: blocks would copy it)
        return m.min(axis=0), m.max(axis=0)
    rows = max(1, 2048 // max(w, 1))
    q = n // rows * rows
    out = []
    for reduce in (np.minimum.reduce, np.maximum.reduce):
        parts = [reduce(m[q:], axis=0)] if q < n else []
        if q:
            parts.append(reduce(reduce(m[:q].reshape(q // rows, rows * w), axis=0).reshape(rows, w), axis=0))
        out.append(parts[0] if len(parts) == 1 else reduce(np.stack(parts), axis=0))
    return out[0], out[1]


def unique_ints(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys ascending, index of each key among them) of an integer array:
    ``np.unique(keys, return_inverse=True)``, without a sort when the keys lie in
    a range not much wider than their count (codes, rows, windows) or are
    ascending."""
    n = len(keys)
    if n == 0:
        return keys[:0], np.zeros(0, np.int64)
    lo = int(keys.min())
    span = int(keys.max()) - lo + 1
    if span > max(8 * n, 1 << 20):
        if (starts := _run_starts(keys)) is not None:  # ascending (a batch's window starts): no sort either
            return keys[starts], _run_index(starts, n)
        order = np.argsort(keys, kind="stable")  # merges ascending runs (np.unique's sort does not)
        ranked = keys[order]
        starts = _starts_of_sorted(ranked)
        index = np.empty(n, np.int64)
        index[order] = _run_index(starts, n)
        return ranked[starts], index
    at = (keys - lo).astype(np.int64)
    seen = np.zeros(span, bool)
    seen[at] = True
    present = np.flatnonzero(seen)
    # Read only where written (every key is present): not zeroed, so a span of
    # a drain's (window, row) keys, ~200,000, is not written whole each batch.
    rank = np.empty(span, np.int64)
    rank[present] = np.arange(len(present))
    return (present + lo).astype(keys.dtype), rank[at]


def _run_starts(keys: np.ndarray) -> np.ndarray | None:
    """Where each run of equal keys starts, when ``keys`` (1-D) is ascending
    (a batch's windows, records sorted by window); else None. Two passes
    over the keys, cheaper than any grouping of unordered keys."""
    if len(keys) < 2:
        return np.zeros(len(keys), np.intp)
    if np.less(keys[1:], keys[:-1]).any():
        return None
    return _starts_of_sorted(keys)


def _run_index(starts: np.ndarray, n: int) -> np.ndarray:
    """Each of ``n`` elements' run number, the runs starting at ``starts`` (the first at 0)."""
    index = np.zeros(n, np.int64)
    index[starts[1:]] = 1
    return np.cumsum(index, out=index)


def _starts_of_sorted(keys: np.ndarray) -> np.ndarray:
    """Where each run of equal keys starts in ascending ``keys`` (at least one)."""
    new = np.empty(len(keys), bool)
    new[0] = True
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    return np.flatnonzero(new)


def nonzero_cells(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every nonzero entry of a 2-D array, in row-major order:
    ``np.nonzero(m)`` in half its time for a strided view such as a
    ring's closed windows (one flat scan of a contiguous mask, then a divmod)."""
    flat = np.flatnonzero(np.not_equal(m, 0))
    r, j = np.divmod(flat, max(m.shape[1], 1))
    return r, j


def distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, ascending: ``np.unique(keys)``
    without its check for masked arrays, which in numpy 2 imports ``numpy.ma``
    at the first call (~50 ms of CPU, once, in whichever drain gets there
    first: on this VM, half a percent of a core over a 10 s run). Wide,
    unordered keys are sorted (numpy's vectorised sort) and deduplicated,
    with no index of each key to make."""
    keys = np.asarray(keys)
    if (starts := _run_starts(keys)) is not None:
        return keys[starts]
    if int(keys.max()) - int(keys.min()) <= max(8 * len(keys), 1 << 20):
        return unique_ints(keys)[0]
    keys = np.sort(keys, kind="stable")  # merges runs already ascending
    return keys[_starts_of_sorted(keys)]


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
    uniq, index = unique_ints(col)
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

    Exact integer sums, no Python loop. The indices are into the original
    arrays (``key[first]`` is each group's key), so any other column can be
    read per group with them. Ascending keys (a batch's windows) are summed
    a run at a time; keys dense in their range (codes, rows, windows) are
    grouped by :func:`unique_ints` with no sort, each column summed in place
    by group (``np.add.at``, ~2 ns an entry a column); sparse ones are sorted
    (stably: the first element of a group is the earliest).
    """
    n = len(key)
    if n == 0:
        return np.zeros(0, np.int64), values[:0]
    if (starts := _run_starts(key)) is not None:
        # Ascending keys (a batch's windows): each group is one run, summed in one call.
        return starts.astype(np.int64), np.add.reduceat(values, starts, axis=0)
    if int(key.max()) - int(key.min()) > 4 * n:
        # Sparse in their range (a drain's (window, row) keys: windows x rows, a
        # tenth of them charged): sorted (a stable sort, so a group's first
        # element is the first of its run), then a run a group. numpy's stable
        # sort merges runs already ascending: a batch's entries come by window
        # (meter.sources.sched) with a few settled and late ones after them,
        # sorted in ~20 µs for 13,000 where an unstable sort took ~650.
        order = np.argsort(key, kind="stable")
        starts = _starts_of_sorted(key[order])
        return order[starts].astype(np.int64), np.add.reduceat(values[order], starts, axis=0)
    _, group = unique_ints(key)
    ngroups = int(group.max()) + 1
    first = np.full(ngroups, n, np.int64)
    np.minimum.at(first, group, np.arange(n))
    cols = values.reshape(n, -1)
    out = np.zeros((ngroups, cols.shape[1]), values.dtype)
    for j in range(cols.shape[1]):
        np.add.at(out[:, j], group, cols[:, j])
    return first, out.reshape((ngroups, *values.shape[1:]))


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


def _window_key(batch: np.ndarray | Columns, ranges: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """A key per record that orders and groups its windows: the window's number
    when the batch has one window width (keys as dense as windows), else its start.
    ``ranges``: the batch's :func:`column_ranges`, when the caller has them."""
    starts = batch["window_start_ns"]
    widths = batch["window_ms"]
    j = COLUMN["window_ms"]
    one_width = bool(ranges[0][j] == ranges[1][j]) if ranges is not None else bool((widths == widths[0]).all())
    if len(batch) and one_width and widths[0] > 0:
        apart, step = starts - starts.min(), int(widths[0]) * 1_000_000
        if not bool((apart % step).any()):  # one run's windows (another run's clock offset differs)
            return apart // step
    return starts


def window_sums(batch: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, Σ field) per window of a batch, windows ascending; NULL counts 0."""
    first, sums = group_sums(_window_key(batch), zeroed(batch[field]))
    return batch["window_start_ns"][first], sums


def window_totals(batch: np.ndarray | Columns, ranges: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(window starts, the CPU time each window's records account for).

    cpu_ns + softirq_ns - softirq_given_ns over every row of a window: with
    every CPU metered, ncpu x W. Records of late time (``cpu_source`` late:
    another window's, billed in this one) are not this window's time; the
    window they came from has a ``late`` row for them. ``ranges``: the
    batch's :func:`column_ranges`, when the caller has them (a column that
    is NULL throughout, or never, then costs no pass).
    """
    lo, hi = ranges if ranges is not None else ranges_of(batch)
    late, j = NAMES.code("late"), COLUMN["cpu_source"]
    own = batch
    if lo[j] <= late <= hi[j]:
        is_late = batch["cpu_source"] == late
        if is_late.any():
            own, ranges = batch[~is_late], None
    time: np.ndarray | None = None
    for name, sign in (("cpu_ns", 1), ("softirq_ns", 1), ("softirq_given_ns", -1)):
        c = COLUMN[name]
        if lo[c] == NULL and hi[c] == NULL:  # NULL in every record (of the batch, so of own)
            continue
        v = own[name] if lo[c] > NULL else zeroed(own[name])
        time = (v if sign > 0 else -v) if time is None else (time + v if sign > 0 else time - v)
    if time is None:
        time = np.zeros(len(own), np.int64)
    first, sums = group_sums(_window_key(own, ranges), time)
    return own["window_start_ns"][first], sums


def estimate_counts(strings: dict[str, tuple[list[str], np.ndarray]], n: int) -> np.ndarray:
    """Per record, 1 where its figure of each :data:`ESTIMATE_COLUMNS` was estimated
    (int64, one row per column), from the batch's :func:`factorize`-d provenance columns."""
    out = np.zeros((len(ESTIMATE_COLUMNS), n), np.int64)
    for i, (field, text) in enumerate(ESTIMATES.values()):
        table, codes = strings[field]
        hit = np.array([text in str(v) for v in table], bool)
        if len(table) == 1:  # one value in the batch (the usual): no pass over its codes
            out[i] = int(hit[0])
        elif hit.any():
            out[i] = hit[codes]
    return out


def estimate_sql(column: str) -> str:
    """The SQL expression of one record's count for an estimate column (for Parquet billing)."""
    field, text = ESTIMATES[column]
    return f"CASE WHEN {field} LIKE '%{text}%' THEN 1 ELSE 0 END"
