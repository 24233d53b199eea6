"""Sink: the embedded record store (SQLite in WAL mode).

``meter record`` writes here by default: ``/var/lib/meter/records.db`` as
root, ``$XDG_DATA_HOME/meter/records.db`` otherwise, or ``$METER_STORE``.

* **Crash-safe**: each batch is one transaction (WAL, synchronous=NORMAL):
  a ``kill -9`` loses at most the batch in flight and never corrupts.
* **Idempotent**: records are keyed by (host, seq); a batch written twice
  adds nothing, and :meth:`Store.next_seq` lets a restarted meter continue
  the sequence.
* **Rollups**: every batch also adds its integer sums into 1 s and 1 h
  rollups in the same transaction, so rollups always equal the sum of the
  raw records they cover, also after raw records pass their retention
  (default 7 days) and are deleted.

Raw records are stored as one *chunk* per batch (the batch's columns as
compact binary, no pickle: each number column as its least value and the
offsets from it in the narrowest width that holds them, a column with one
value as that value alone; text as the chunk's own string table and
indexes into it), 18 bytes a record for the 1 ms records of a host with
1,000 compartments (248 in memory);
rollups are ordinary SQL tables, computed from the columns in one grouped
pass for 1 s and from those groups for 1 h.

The file is created mode 0600: it holds billing data. One process writes
a store at a time (:meth:`Store.claim`, an advisory lock on
``<store>.lock``): a second writer would read the same next seq and have
every one of its records taken for a duplicate. Retention counts from the
current time, never from a batch's own dates (a clock that jumped ahead
must not expire the store).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SinkError
from ..paths import meter_path, open_private, private_dir
from ..records import (
    COLUMN,
    COUNTER_COLUMNS,
    ESTIMATE_COLUMNS,
    FIELDS,
    NAMES,
    NULL,
    TEXT_FIELDS,
    build,
    estimate_counts,
    factorize,
    from_matrix,
    group_sums,
    matrix,
    unique_ints,
)

__all__ = ["ROLLUPS", "ROLLUP_COLUMNS", "Store", "default_path", "rollup_rows"]

#: Rollup tables and their period in ns.
ROLLUPS = {"rollup_1s": 1_000_000_000, "rollup_1h": 3_600_000_000_000}
#: What a rollup sums: every counter, and how many records had each estimated figure.
ROLLUP_COLUMNS = COUNTER_COLUMNS + ESTIMATE_COLUMNS
DEFAULT_RETENTION_S = 7 * 24 * 3600
#: A batch dated further ahead of the clock than this is stored, and said.
FUTURE_SLACK_NS = 3600 * 1_000_000_000

log = logging.getLogger("meter")

def default_path() -> Path:
    """Where ``meter record`` stores records unless told otherwise."""
    return meter_path("METER_STORE", "/var/lib/meter/records.db", "XDG_DATA_HOME", ".local/share", "records.db")


class Store:
    """Append record batches; read them back; roll them up exactly."""

    def __init__(self, path: str | Path | None = None, *, retention_s: int = DEFAULT_RETENTION_S,
                 must_exist: bool = False, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._clock = clock
        self._lock_fd: int | None = None
        #: Records this store object has newly stored (the Sink protocol).
        self.count = 0
        self.retention_ns = int(retention_s) * 1_000_000_000
        if must_exist and not self.path.is_file():
            raise SinkError(f"no record store at {self.path}: run meter record first, or name the store",
                            target=str(self.path), setting="store")
        if not must_exist:  # a writer: its own private file (readers only read)
            private_dir(self.path.parent)
            os.close(open_private(self.path, os.O_WRONLY, what="record store"))
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._schema()
        except sqlite3.DatabaseError as err:
            raise SinkError(f"{self.path} is not a usable meter store: {err}", target=str(self.path)) from err
        except OSError as err:
            raise SinkError(f"cannot open the record store {self.path}: {err.strerror}", target=str(self.path)) from err

    def _schema(self) -> None:
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS chunks (host TEXT, first_seq INTEGER, last_seq INTEGER, start_ns INTEGER, "
            "end_ns INTEGER, n INTEGER, data BLOB, PRIMARY KEY (host, first_seq))"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS chunks_time ON chunks (end_ns, start_ns)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        # Each chunk's own 1 s rollup rows (JSON), so shipping never re-reads raw records.
        self.db.execute("CREATE TABLE IF NOT EXISTS chunk_rollups (host TEXT, first_seq INTEGER, end_ns INTEGER, "
                        "data TEXT, PRIMARY KEY (host, first_seq))")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS shipments (host TEXT, first_seq INTEGER, last_seq INTEGER, key TEXT, "
            "done INTEGER, PRIMARY KEY (host, first_seq))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS invoices (id TEXT PRIMARY KEY, tenant TEXT, start_ns INTEGER, end_ns INTEGER, "
            "currency TEXT, total TEXT, subtotal TEXT, price_sheet TEXT, issued_ns INTEGER)"
        )
        sums = ", ".join(f"{name} INTEGER" for name in ROLLUP_COLUMNS)
        for table in ROLLUPS:
            self.db.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (host TEXT, tenant TEXT, compartment TEXT, period_start_ns INTEGER, "
                f"records INTEGER, {sums}, PRIMARY KEY (host, tenant, compartment, period_start_ns)) WITHOUT ROWID"
            )
            # A store written before a counter column existed gets it (NULL: not measured then).
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for name in ROLLUP_COLUMNS:
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} INTEGER")

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the writer's lock
            self._lock_fd = None

    def claim(self, host: str) -> int:
        """Become this store's one writer and return ``host``'s next seq.

        Raises SinkError naming the other writer's pid if one holds the store.
        :meth:`write` claims it too; call this first to fail before metering.
        """
        if self._lock_fd is None:
            lock = self.path.with_name(self.path.name + ".lock")
            fd = open_private(lock, os.O_RDWR, what="store's lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise SinkError(f"the record store {self.path} is being written by another meter (pid {other}): "
                                "stop it, or give this one its own store", target=str(self.path),
                                setting="store") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._lock_fd = fd
        return self.next_seq(host)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------

    def next_seq(self, host: str) -> int:
        """The sequence number a restarted meter on ``host`` continues from."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"last_seq:{host}",)).fetchone()
        return 0 if row is None else int(row[0]) + 1

    def write(self, batch: np.ndarray) -> int:
        """Append a batch in one transaction; returns records newly stored."""
        if len(batch) == 0:
            return 0
        if self._lock_fd is None:
            self.claim(NAMES.text(int(batch["host"][0])))
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                new = self._new_only(batch)
                if len(new):
                    cols = _Columns(new)
                    periods = _rollups(cols, tuple(ROLLUPS.values()))
                    self._insert(new, cols, periods[ROLLUPS["rollup_1s"]])
                    self._rollup(periods)
                    self._expire(int(cols.hi[COLUMN["window_start_ns"]]))
                self.db.execute("COMMIT")
                self.count += len(new)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            raise SinkError(f"cannot write records to {self.path}: {err}; nothing of this batch was stored",
                            target=str(self.path)) from err
        return len(new)

    @staticmethod
    def _by_host(batch: np.ndarray) -> list[tuple[str, np.ndarray]]:
        hosts, code = factorize(batch["host"])
        if len(hosts) == 1:  # the usual case: no copy
            return [(hosts[0], batch)]
        return [(h, batch[code == i]) for i, h in enumerate(hosts)]

    def _new_only(self, batch: np.ndarray) -> np.ndarray:
        """Rows not stored yet: per host, seq above the highest stored."""
        parts = []
        for host, part in self._by_host(batch):
            seq, first = part["seq"], self.next_seq(host)
            parts.append(part if int(seq.min()) >= first else part[seq >= first])  # the usual case: no copy
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _insert(self, batch: np.ndarray, cols: _Columns, seconds: list[tuple[Any, ...]]) -> None:
        import json

        rows, rollups = [], []
        for host, part in self._by_host(batch):
            end = part["window_start_ns"] + part["window_ms"].astype(np.int64) * 1_000_000
            rows.append((host, int(part["seq"].min()), int(part["seq"].max()), int(part["window_start_ns"].min()),
                         int(end.max()), len(part), _encode(part, cols if part is batch else _Columns(part))))
            rollups.append((host, rows[-1][1], rows[-1][4],
                            json.dumps([r for r in seconds if r[0] == host], separators=(",", ":"))))
            self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                            (f"last_seq:{host}", int(part["seq"].max())))
        self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.db.executemany("INSERT OR IGNORE INTO chunk_rollups VALUES (?, ?, ?, ?)", rollups)

    def _rollup(self, periods: dict[int, list[tuple[Any, ...]]]) -> None:
        """Add the batch's integer sums (its rollup rows per period) into every rollup
        (same transaction as the insert)."""
        cols = ", ".join(ROLLUP_COLUMNS)
        marks = ", ".join("?" * (5 + len(ROLLUP_COLUMNS)))
        # NULL + n stays n; n + NULL stays n: a family measured anywhere in a period is summed.
        updates = ", ".join(f"{c} = CASE WHEN excluded.{c} IS NULL THEN {c} ELSE coalesce({c}, 0) + excluded.{c} END"
                            for c in ROLLUP_COLUMNS)
        for table, period in ROLLUPS.items():
            self.db.executemany(
                f"INSERT INTO {table} (host, tenant, compartment, period_start_ns, records, {cols}) VALUES ({marks}) "
                f"ON CONFLICT (host, tenant, compartment, period_start_ns) DO UPDATE SET "
                f"records = records + excluded.records, {updates}",
                periods[period],
            )

    def _expire(self, newest_ns: int) -> None:
        now = self._clock()
        if newest_ns > now + FUTURE_SLACK_NS:
            log.warning("meter: stored records dated %.0f s ahead of this host's clock (a clock jump?); "
                        "retention counts from the clock, not from them", (newest_ns - now) / 1e9)
        if self.retention_ns > 0:
            self.db.execute("DELETE FROM chunks WHERE end_ns <= ?", (now - self.retention_ns,))
            self.db.execute("DELETE FROM chunk_rollups WHERE end_ns <= ?", (now - self.retention_ns,))

    # -- reading -----------------------------------------------------------------------------------

    def records(self, start_ns: int | None = None, end_ns: int | None = None, *, tenant: str | None = None) -> np.ndarray:
        """Raw records with window_start_ns in [start_ns, end_ns), as RECORD_DTYPE."""
        clauses, args = [], []
        if start_ns is not None:
            clauses.append("end_ns > ?")
            args.append(start_ns)
        if end_ns is not None:
            clauses.append("start_ns < ?")
            args.append(end_ns)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        parts = [_decode(blob, f"{host} seq {seq}") for host, seq, blob in
                 self.db.execute(f"SELECT host, first_seq, data FROM chunks{where} ORDER BY host, first_seq", args)]
        if not parts:
            return build(0)
        out = np.concatenate(parts)
        keep = np.ones(len(out), bool)
        if start_ns is not None:
            keep &= out["window_start_ns"] >= start_ns
        if end_ns is not None:
            keep &= out["window_start_ns"] < end_ns
        if tenant is not None:
            known = NAMES.find(tenant)  # a name never met is in no record (and is not added)
            keep &= out["tenant"] == (known if known is not None else -1)
        return out[keep]

    def chunk_ranges(self, host: str, after_seq: int) -> list[tuple[int, int]]:
        """(first_seq, last_seq) of ``host``'s stored chunks past ``after_seq``, in order."""
        cur = self.db.execute("SELECT first_seq, last_seq FROM chunks WHERE host = ? AND last_seq > ? ORDER BY first_seq",
                              (host, after_seq))
        return [(int(a), int(b)) for a, b in cur.fetchall()]

    def records_seq(self, host: str, first_seq: int, last_seq: int) -> np.ndarray:
        """``host``'s raw records with seq in [first_seq, last_seq]."""
        cur = self.db.execute("SELECT first_seq, data FROM chunks WHERE host = ? AND last_seq >= ? AND first_seq <= ? "
                              "ORDER BY first_seq", (host, first_seq, last_seq))
        parts = [_decode(blob, f"{host} seq {seq}") for seq, blob in cur.fetchall()]
        if not parts:
            return build(0)
        out = np.concatenate(parts)
        return out[(out["seq"] >= first_seq) & (out["seq"] <= last_seq)]

    def rollups_seq(self, host: str, first_seq: int, last_seq: int) -> list[tuple[Any, ...]] | None:
        """The 1 s rollup rows of ``host``'s chunks with seq in [first_seq, last_seq], as
        :func:`rollup_rows` gives them for those records (summed, sorted); None when a chunk
        there has none kept (written before they were)."""
        import json

        chunks = self.db.execute("SELECT c.first_seq, r.data FROM chunks c LEFT JOIN chunk_rollups r "
                                 "ON r.host = c.host AND r.first_seq = c.first_seq WHERE c.host = ? "
                                 "AND c.first_seq >= ? AND c.last_seq <= ? ORDER BY c.first_seq",
                                 (host, first_seq, last_seq)).fetchall()
        if any(data is None for _, data in chunks):
            return None
        rows = [row for _, data in chunks for row in json.loads(data)]
        if any(len(row) != 5 + len(ROLLUP_COLUMNS) for row in rows):
            return None  # kept by a meter with other columns: the raw records say it again
        return merge_rollup_rows(rows)

    def shipments(self, host: str) -> list[dict[str, Any]]:
        """``host``'s shipments (segments meant or sent), oldest first."""
        cur = self.db.execute("SELECT * FROM shipments WHERE host = ? ORDER BY first_seq", (host,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def ship_intent(self, host: str, first_seq: int, last_seq: int, key: str) -> None:
        """Remember a segment before it is uploaded: a retry sends the same one."""
        self.db.execute("INSERT INTO shipments VALUES (?, ?, ?, ?, 0)", (host, first_seq, last_seq, key))

    def shipped(self, host: str, first_seq: int) -> None:
        """The segment starting at ``first_seq`` is in object storage."""
        self.db.execute("UPDATE shipments SET done = 1 WHERE host = ? AND first_seq = ?", (host, first_seq))

    def hosts(self) -> list[str]:
        """Hosts with records in this store."""
        return [h for (h,) in self.db.execute("SELECT DISTINCT host FROM chunks ORDER BY host")]

    def issue(self, invoices: list[tuple[str, str, int, int, str, str, str, str]]) -> None:
        """Record issued invoices (id, tenant, start_ns, end_ns, currency, total, subtotal, price sheet hash)
        in the ledger, all or none: a tenant's period that overlaps an invoice already issued is refused
        with a SinkError naming that invoice (an invoiced period is never invoiced twice)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")  # no other biller between the check and the insert
            for _id, tenant, start, end, *_ in invoices:
                old = self.db.execute("SELECT id, start_ns, end_ns FROM invoices WHERE tenant = ? AND start_ns < ? "
                                      "AND end_ns > ? LIMIT 1", (tenant, end, start)).fetchone()
                if old:
                    raise SinkError(f"tenant {tenant!r} was already invoiced for part of this period ({old[0]}): "
                                    "bill only time after its end, or issue a correction by hand",
                                    target=str(self.path))
            now = self._clock()
            self.db.executemany("INSERT INTO invoices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                [(*inv, now) for inv in invoices])
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def invoices_issued(self, start_ns: int | None = None, end_ns: int | None = None) -> list[dict[str, Any]]:
        """Issued invoices whose period overlaps [start_ns, end_ns), oldest first."""
        cur = self.db.execute("SELECT * FROM invoices WHERE end_ns > ? AND start_ns < ? ORDER BY start_ns, tenant",
                              (start_ns if start_ns is not None else -(2**63), end_ns if end_ns is not None else 2**63 - 1))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def rollup(self, table: str, start_ns: int | None = None, end_ns: int | None = None,
               *, tenant: str | None = None) -> list[dict[str, Any]]:
        """Rollup rows (dicts) with period_start_ns in [start_ns, end_ns)."""
        if table not in ROLLUPS:
            raise SinkError(f"no rollup {table!r}: use one of {', '.join(ROLLUPS)}")
        where, args = self._where(start_ns, end_ns, tenant, "period_start_ns")
        cur = self.db.execute(f"SELECT * FROM {table}{where} ORDER BY period_start_ns, host, tenant, compartment", args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    @staticmethod
    def _where(start: int | None, end: int | None, tenant: str | None, col: str) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if start is not None:
            clauses.append(f"{col} >= ?")
            args.append(start)
        if end is not None:
            clauses.append(f"{col} < ?")
            args.append(end)
        if tenant is not None:
            clauses.append("tenant = ?")
            args.append(tenant)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def rollup_rows(batch: np.ndarray, period: int, cols_: _Columns | None = None) -> list[tuple[Any, ...]]:
    """A batch's rollup rows for one period: (host, tenant, compartment, period start, records,
    *ROLLUP_COLUMNS with None where not measured), sorted by (period start, host, tenant, compartment).
    ``cols_`` is the batch's columns when the caller has them already."""
    if len(batch) == 0:
        return []
    return _rollups(cols_ if cols_ is not None else _Columns(batch), (period,))[period]


def _rollups(cols: _Columns, periods: tuple[int, ...]) -> dict[int, list[tuple[Any, ...]]]:
    """Rollup rows (as :func:`rollup_rows`) for each period, each a multiple of the
    first: one grouped pass over the records for the first period, and each
    other period summed from its groups (a few per compartment, not per record).

    Only columns measured somewhere in the batch are summed; a column with
    NULLs in it is summed as 0 there, and a group in which it was never
    measured gets None.
    """
    finest = periods[0]
    (hosts, h), (tenants, t), (comps, c) = (cols.strings[f] for f in ("host", "tenant", "compartment"))
    labels, who = unique_ints((h.astype(np.int64) * len(tenants) + t) * len(comps) + c)
    nlab = len(labels)
    hc, rest = np.divmod(labels, len(tenants) * len(comps))
    tc, cc = np.divmod(rest, len(comps))
    names = ([hosts[i] for i in hc.tolist()], [tenants[i] for i in tc.tolist()], [comps[i] for i in cc.tolist()])
    # Columns: the record count, each measured rollup column, then a "measured here" count
    # for each column with NULLs in it.
    parts: list[np.ndarray] = [np.ones(cols.n, np.int64)]
    summed: list[str] = []
    partial: list[str] = []
    for name in COUNTER_COLUMNS:
        state = cols.measured(name)
        if state == "none":
            continue
        col = cols.column(name)
        summed.append(name)
        if state == "some":
            present = col != NULL
            parts.append(np.where(present, col, 0))
            partial.append(name)
        else:
            parts.append(col)
    est = estimate_counts(cols.strings, cols.n)
    for i, name in enumerate(ESTIMATE_COLUMNS):
        summed.append(name)
        parts.append(est[i])
    parts += [(cols.column(name) != NULL).astype(np.int64) for name in partial]
    values = np.stack(parts, axis=1)
    p = cols.column("window_start_ns") // finest
    base = int(p.min())
    key = (p - base) * nlab + who
    first, sums = group_sums(key, values)
    g_key = key[first]
    g_who, g_p = g_key % nlab, g_key // nlab + base
    out = {finest: _rollup_tuples(names, g_who, g_p * finest, sums, summed, partial)}
    for period in periods[1:]:
        q = (g_p * finest) // period
        qbase = int(q.min())
        key = (q - qbase) * nlab + g_who
        first2, sums2 = group_sums(key, sums)
        k2 = key[first2]
        out[period] = _rollup_tuples(names, k2 % nlab, (k2 // nlab + qbase) * period, sums2, summed, partial)
    return out


def _rollup_tuples(names: tuple[list[str], list[str], list[str]], who: np.ndarray, start: np.ndarray,
                   sums: np.ndarray, summed: list[str], partial: list[str]) -> list[tuple[Any, ...]]:
    """Rollup rows from group sums (columns: records, ``summed``, then the measured
    counts of ``partial``), sorted by (period start, host, tenant, compartment)."""
    g = len(who)
    columns: list[list[Any]] = []
    for name in ROLLUP_COLUMNS:
        if name not in summed:
            columns.append([None] * g)
            continue
        v = sums[:, 1 + summed.index(name)]
        if name in partial:
            seen = sums[:, 1 + len(summed) + partial.index(name)] > 0
            columns.append([x if ok else None for x, ok in zip(v.tolist(), seen.tolist())])
        else:
            columns.append(v.tolist())
    w = who.tolist()
    rows = list(zip([names[0][i] for i in w], [names[1][i] for i in w], [names[2][i] for i in w], start.tolist(),
                    sums[:, 0].tolist(), *columns))
    rows.sort(key=lambda r: (r[3], r[0], r[1], r[2]))
    return rows


def merge_rollup_rows(rows: Any) -> list[tuple[Any, ...]]:
    """Rollup rows of the same (host, tenant, compartment, period) summed (None + n = n;
    None + None = None), sorted by (period, host, tenant, compartment) as :func:`rollup_rows`."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        key = (row[3], row[0], row[1], row[2])
        acc = out.get(key)
        if acc is None:
            out[key] = list(row)
            continue
        for i in range(4, len(row)):
            v = row[i]
            if v is not None:
                acc[i] = v if acc[i] is None else acc[i] + v
    return [tuple(out[k]) for k in sorted(out)]


_MAGIC = b"MTRC1"  # every column int64, text as table + int32 index
_MAGIC2 = b"MTRC2"  # each column as its base, step and the narrowest width that holds it
_WIDTHS = ((1 << 8, "<u1"), (1 << 16, "<u2"), (1 << 32, "<u4"))


class _Columns:
    """A batch's columns, computed once per write: its int64 matrix, each column's
    range (one pass over memory for all of them) and its text fields factorized."""

    def __init__(self, batch: np.ndarray) -> None:
        self.n = len(batch)
        self.m = matrix(batch)
        self.lo = self.m.min(axis=0)
        self.hi = self.m.max(axis=0)
        self.strings = {}
        for name in TEXT_FIELDS:
            j = COLUMN[name]
            if self.lo[j] == self.hi[j]:  # one value in the batch: no pass over it
                self.strings[name] = ([NAMES.text(int(self.lo[j]))], np.zeros(self.n, np.int32))
            else:
                self.strings[name] = factorize(np.ascontiguousarray(self.m[:, j]))

    def column(self, name: str) -> np.ndarray:
        return self.m[:, COLUMN[name]]

    def measured(self, name: str) -> str:
        """``none``, ``some`` or ``all`` of the batch's records have ``name`` measured."""
        j = COLUMN[name]
        if self.lo[j] == NULL and self.hi[j] == NULL:
            return "none"
        return "some" if self.lo[j] <= NULL <= self.hi[j] and bool((self.m[:, j] == NULL).any()) else "all"


def _width(span: int) -> str:
    return next((dt for limit, dt in _WIDTHS if span < limit), "<u8")


def _step(name: str, cols: _Columns) -> int:
    """What ``name``'s values are multiples of apart: window starts, the batch's window width."""
    j = COLUMN["window_ms"]
    if name == "window_start_ns" and cols.lo[j] == cols.hi[j] and cols.lo[j] > 0:
        return int(cols.lo[j]) * 1_000_000
    return 1


def _encode(batch: np.ndarray, cols: _Columns) -> bytes:
    """A batch as bytes: JSON header, then each column that varies as its offsets
    from its least value in the narrowest width (a constant column is its value
    alone); text as a table and indexes into it."""
    import json

    header: dict[str, Any] = {"n": cols.n, "ints": [], "strs": {}}
    body: list[bytes] = []
    texts: list[bytes] = []  # after the numbers
    for name in FIELDS:
        j = COLUMN[name]
        if name in TEXT_FIELDS:
            table, index = cols.strings[name]
            dt = None if len(table) == 1 else _width(len(table))
            header["strs"][name] = [table, dt]
            if dt is not None:
                texts.append(index.astype(dt).tobytes())
            continue
        lo, hi = int(cols.lo[j]), int(cols.hi[j])
        if lo == hi:
            header["ints"].append([name, lo, None, 1])
            continue
        delta = cols.m[:, j] - cols.lo[j]  # wrapping int64 arithmetic: exact bits for any span
        step = _step(name, cols)
        if step > 1 and bool((delta % step == 0).all()):
            delta //= step  # window starts: whole windows apart
        else:
            step = 1
        if name == "seq" and hi - lo == cols.n - 1 and np.array_equal(delta, np.arange(cols.n)):
            header["ints"].append([name, lo, "arange", 1])  # the usual batch: seq numbers in a row
            continue
        dt = _width((hi - lo) // step)
        header["ints"].append([name, lo, dt, step])
        body.append(delta.astype(dt).tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    return _MAGIC2 + len(head).to_bytes(4, "little") + head + b"".join(body + texts)


def _decode(blob: bytes, chunk: str = "") -> np.ndarray:
    """A chunk's records; ``chunk`` names it (host and first seq) in the error a damaged one gives."""
    name = f"the record store's chunk {chunk}".rstrip()
    if not blob.startswith((_MAGIC, _MAGIC2)):
        raise SinkError(f"{name} is not in meter's format")
    try:
        return _decode1(blob) if blob.startswith(_MAGIC) else _decode2(blob)
    except (ValueError, KeyError, TypeError, IndexError) as err:  # json.JSONDecodeError is a ValueError
        raise SinkError(f"{name} is damaged ({err}): restore the store from a copy") from err


def _decode2(blob: bytes) -> np.ndarray:
    import json

    hlen = int.from_bytes(blob[5:9], "little")
    header = json.loads(blob[9 : 9 + hlen])
    n = header["n"]
    m = np.empty((n, len(FIELDS)), np.int64)
    off = 9 + hlen
    for name, base, dt, step in header["ints"]:
        j = COLUMN[name]
        if dt is None:
            m[:, j] = base
            continue
        if dt == "arange":
            m[:, j] = np.arange(base, base + n, dtype=np.int64)
            continue
        v = np.frombuffer(blob, dt, count=n, offset=off)
        off += v.nbytes
        m[:, j] = (v.view(np.int64) if dt == "<u8" else v.astype(np.int64)) * np.int64(step) + np.int64(base)
    for name in TEXT_FIELDS:
        table, dt = header["strs"][name]
        codes = NAMES.codes(table)
        if dt is None:
            m[:, COLUMN[name]] = codes[0]
            continue
        index = np.frombuffer(blob, dt, count=n, offset=off)
        off += index.nbytes
        m[:, COLUMN[name]] = codes[index]
    return from_matrix(m)


def _decode1(blob: bytes) -> np.ndarray:
    """A chunk written before stop 32 (every column int64)."""
    import json

    hlen = int.from_bytes(blob[5:9], "little")
    header = json.loads(blob[9 : 9 + hlen])
    n, ints, strs = header["n"], header["ints"], header["strs"]
    off = 9 + hlen
    mat = np.frombuffer(blob, "<i8", count=n * len(ints), offset=off).reshape(len(ints), n)
    off += mat.nbytes
    data: dict[str, Any] = {name: mat[i] for i, name in enumerate(ints)}
    for name, table in strs.items():
        code = np.frombuffer(blob, "<i4", count=n, offset=off)
        off += code.nbytes
        data[name] = NAMES.codes(table)[code] if table else np.zeros(n, np.int64)
    return build(n, data)
