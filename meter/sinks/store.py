"""Sink: the embedded record store (SQLite in WAL mode).

``meter record`` writes here by default: ``/var/lib/meter/records.db`` as
root, ``$XDG_DATA_HOME/meter/records.db`` otherwise, or ``$METER_STORE``.

* **Crash-safe**: each batch is one transaction (WAL, synchronous=NORMAL):
  a ``kill -9`` loses at most the batch in flight and never corrupts.
* **Idempotent**: records are keyed by (host, seq); a batch written twice
  adds nothing, and :meth:`Store.next_seq` lets a restarted meter continue
  the sequence.
* **Rollups**: integer sums by 1 s and 1 h, equal to the sum of the raw
  records they cover, also after raw records pass their retention (default
  7 days) and are deleted. A second's rows are written once, when a later
  second begins; until then the writer holds them in memory and readers
  roll those records up from the chunks (docs/architecture.md, "The store").
  The 1 h rollups are kept for good; the 1 s rollups for their own
  retention (default 90 days), and a read of seconds past it is an error
  naming the second from which they are kept, never a silent zero.

Raw records are stored as one *chunk* per batch (the batch's columns as
compact binary, no pickle: each number column as its least value and the
offsets from it in the narrowest width that holds them, a column with one
value as that value alone; text as the chunk's own string table and
indexes into it; a field with one value per compartment name, as a tenant
and a cgroup id have, as that list), 12 bytes a record for the 1 ms
records of a host with 1,000 compartments (248 in memory);
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
    ESTIMATES,
    FIELDS,
    NAMES,
    NULL,
    TEXT_FIELDS,
    Columns,
    build,
    column_ranges,
    estimate_counts,
    factorize,
    from_matrix,
    group_sums,
    matrix,
    unique_ints,
    utc_text,
)

__all__ = ["ROLLUPS", "ROLLUP_COLUMNS", "Store", "default_path", "rollup_rows"]

#: Rollup tables and their period in ns.
ROLLUPS = {"rollup_1s": 1_000_000_000, "rollup_1h": 3_600_000_000_000}
#: What a rollup sums: every counter, and how many records had each estimated figure.
ROLLUP_COLUMNS = COUNTER_COLUMNS + ESTIMATE_COLUMNS
_SECOND = ROLLUPS["rollup_1s"]
_NEVER = -(2**63)  # a host's boundary before any: every record of it is in the tables
#: How far a host's boundary moves at least: its rollups are written every ten seconds, not
#: every batch (docs/architecture.md, "The store").
ROLL_EVERY_NS = 10 * _SECOND
#: ...or sooner, once memory holds this many 1 s groups as the batches brought them (not yet
#: summed), so what is held and written at once stays a few MB. A host of 1,000 compartments
#: batching at every take brings ~1,000 a batch, four a second: it writes about every second
#: (estimated from those rates, not measured), as before stop 43.
ROLL_MAX_GROUPS = 4096
_MAX_PARTS = 16  # batches' groups held apart at most, before they are summed in memory
#: No groups: (who, start, sums, seen).
_NO_GROUPS = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 1 + len(ROLLUP_COLUMNS)), np.int64),
              np.zeros((0, len(ROLLUP_COLUMNS)), np.int64))
DEFAULT_RETENTION_S = 7 * 24 * 3600
#: The 1 s rollups kept (the 1 h rollups are kept for good): a row per compartment and
#: second, ~8.6 M rows a day for 100 busy compartments, which would otherwise only grow.
DEFAULT_ROLLUP_RETENTION_S = 90 * 24 * 3600
#: The most 1 s rollup rows one write deletes (a whole second's at least): a store not
#: written for weeks catches up over many writes, never in one that holds the drain back.
EXPIRE_ROWS = 10_000
#: meta key: every 1 s rollup row before this second is deleted (past retention).
_SECONDS_FROM = "rollup_1s_from"
#: A batch dated further ahead of the clock than this is stored, and said.
FUTURE_SLACK_NS = 3600 * 1_000_000_000

log = logging.getLogger("meter")

#: What the store takes: records, or their columns (``Meter.batches(columns=True)``).
Batch = np.ndarray | Columns


def _first(batch: Batch, name: str) -> int:
    """The first record's ``name`` (an int: a text field's code)."""
    value = batch.given(name) if isinstance(batch, Columns) else batch[name]
    return int(value if np.ndim(value) == 0 else value[0])


#: A rollup table's key: the period first, so a second's rows (and an hour's upserts) are a
#: few pages at the end of the table, not a page per compartment all over it.
_ROLLUP_KEY = "period_start_ns, host, tenant, compartment"


def _rollup_table_sql(table: str) -> str:
    sums = ", ".join(f"{name} INTEGER" for name in ROLLUP_COLUMNS)
    return (f"CREATE TABLE IF NOT EXISTS {table} (host TEXT, tenant TEXT, compartment TEXT, period_start_ns INTEGER, "
            f"records INTEGER, {sums}, PRIMARY KEY ({_ROLLUP_KEY})) WITHOUT ROWID")


def default_path() -> Path:
    """Where ``meter record`` stores records unless told otherwise."""
    return meter_path("METER_STORE", "/var/lib/meter/records.db", "XDG_DATA_HOME", ".local/share", "records.db")


class Store:
    """Append record batches; read them back; roll them up exactly."""

    def __init__(self, path: str | Path | None = None, *, retention_s: float = DEFAULT_RETENTION_S,
                 rollup_retention_s: float = DEFAULT_ROLLUP_RETENTION_S,
                 must_exist: bool = False, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._clock = clock
        self._lock_fd: int | None = None
        #: Records this store object has newly stored (the Sink protocol).
        self.count = 0
        self.retention_ns = round(retention_s * 1_000_000_000)
        #: The 1 s rollups' retention (0: kept for good).
        self.rollup_retention_ns = round(rollup_retention_s * 1_000_000_000)
        self._oldest_second: int | None = None  # no 1 s rollup row is older, as this writer last saw
        # The writer's rollups of its latest second(s), not in the rollup tables yet, and
        # each host's boundary: its records before it are in the tables, from it on not.
        self._label: dict[tuple[str, str, str], int] = {}
        self._names: list[tuple[str, str, str]] = []
        self._pending: list[_Groups] = []  # the batches' groups as they came, grouped when written
        self._rolled: dict[str, int] = {}
        if must_exist and not self.path.is_file():
            raise SinkError(f"no record store at {self.path}: run meter record first, or name the store",
                            target=str(self.path), setting="store")
        if not must_exist:  # a writer: its own private file (readers only read)
            private_dir(self.path.parent)
            os.close(open_private(self.path, os.O_WRONLY, what="record store"))
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            # 16 KiB pages (a new store; SQLite keeps an old one's): a batch's chunk is a chain
            # of a quarter as many overflow pages, each framed and checksummed in the WAL
            # (on a big host's 1.8 MB chunks, 20-50 ns a record less: benchmarks/scale.py).
            # The WAL is checkpointed every 4 MiB as with SQLite's default 4 KiB pages.
            self.db.execute("PRAGMA page_size=16384")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA wal_autocheckpoint=256")
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
        for table in ROLLUPS:
            self.db.execute(_rollup_table_sql(table))
            # A store written before a counter column existed gets it (NULL: not measured then).
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for name in ROLLUP_COLUMNS:
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} INTEGER")

    def _rekey(self, table: str) -> None:
        """A rollup table keyed by (host, tenant, compartment, period), as stores before
        stop 42 were, rebuilt keyed by period first (once, by the writer that claimed the
        store; docs/architecture.md, "The store"). A failure leaves the table as it was."""
        def old() -> bool:
            row = self.db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
            return row is not None and _ROLLUP_KEY not in row[0]

        if not old():
            return
        # Measured: ~3 s a million rows (10 s for an hour of 1,000 compartments' seconds).
        log.warning("meter: rebuilding %s of %s keyed by period first, once (about 3 s a million rows; nothing "
                    "is metered until it is done)", table, self.path)
        t0 = time.monotonic()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if old():
                    names = ", ".join(("host", "tenant", "compartment", "period_start_ns", "records",
                                       *ROLLUP_COLUMNS))
                    self.db.execute(f"DROP TABLE IF EXISTS {table}_rekeyed")
                    self.db.execute(_rollup_table_sql(f"{table}_rekeyed"))
                    self.db.execute(f"INSERT INTO {table}_rekeyed ({names}) SELECT {names} FROM {table} "
                                    f"ORDER BY {_ROLLUP_KEY}")
                    self.db.execute(f"DROP TABLE {table}")
                    self.db.execute(f"ALTER TABLE {table}_rekeyed RENAME TO {table}")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise SinkError(f"cannot rebuild the rollup table {table} of {self.path} ({err}); nothing in it was "
                            "changed: mend that, then start meter again", target=str(self.path)) from err
        log.warning("meter: %s of %s rebuilt in %.1f s", table, self.path, time.monotonic() - t0)

    def close(self) -> None:
        if self._lock_fd is not None:
            self._flush_all()
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the writer's lock
            self._lock_fd = None

    def claim(self, host: str) -> int:
        """Become this store's one writer and return ``host``'s next seq.

        Raises SinkError naming the other writer's pid if one holds the store.
        A store whose rollup tables are keyed the old way is rebuilt here, by its
        one writer only (:meth:`_rekey`). :meth:`write` claims it too; call this
        first to fail, and rebuild, before metering.
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
            try:
                for table in ROLLUPS:
                    self._rekey(table)
                self._index_expiry()
            except SinkError:
                os.close(fd)  # not this store's writer after all
                raise
            self._lock_fd = fd
        return self.next_seq(host)

    def _index_expiry(self) -> None:
        """Index chunk_rollups by end_ns, which retention's delete reads at every write.
        Stores before stop 43 have no such index: each write scanned the whole table
        (42 ms a write with a day of 1 s chunks kept, 0.01 ms indexed). Built once, by
        the writer that claimed the store."""
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'chunk_rollups_end'"
                           ).fetchone():
            return
        kept = self.db.execute("SELECT count(*) FROM (SELECT 1 FROM chunks LIMIT 100000)").fetchone()[0]
        if kept >= 100000:
            log.warning("meter: indexing the chunk rollups of %s (once, before metering)", self.path)
        try:
            self.db.execute("CREATE INDEX IF NOT EXISTS chunk_rollups_end ON chunk_rollups (end_ns)")
        except sqlite3.Error as err:
            raise SinkError(f"cannot index the chunk rollups of {self.path} ({err}); nothing was changed: "
                            "mend that, then start meter again", target=str(self.path)) from err

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------

    def next_seq(self, host: str) -> int:
        """The sequence number a restarted meter on ``host`` continues from."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"last_seq:{host}",)).fetchone()
        return 0 if row is None else int(row[0]) + 1

    def write(self, batch: np.ndarray | Columns) -> int:
        """Append a batch (records, or their :class:`meter.records.Columns` as
        ``Meter.batches(columns=True)`` yields them: no record laid out) in one
        transaction; returns records newly stored."""
        if len(batch) == 0:
            return 0
        if self._lock_fd is None:
            self.claim(NAMES.text(int(_first(batch, "host"))))
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                new = self._new_only(batch)
                rolled = None
                if len(new):
                    cols = _Columns(new)
                    seconds = _seconds(cols)
                    rolled = self._roll(seconds, cols)  # first: a host's first batch reads the records before it
                    self._insert(new, cols, seconds)
                    self._expire(int(cols.hi[COLUMN["window_start_ns"]]))
                self.db.execute("COMMIT")
                if rolled is not None:  # the rollups in memory follow the transaction, not the attempt
                    self._pending, self._rolled = rolled
                self.count += len(new)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            raise SinkError(f"cannot write records to {self.path}: {err}; nothing of this batch was stored",
                            target=str(self.path)) from err
        return len(new)

    @staticmethod
    def _by_host(batch: Batch) -> list[tuple[str, Batch]]:
        if isinstance(batch, Columns) and np.ndim(one := batch.given("host")) == 0:
            return [(NAMES.text(int(one)), batch)]  # one host: no pass over a column
        hosts, code = factorize(batch["host"])
        if len(hosts) == 1:  # the usual case: no copy
            return [(hosts[0], batch)]
        return [(h, batch[code == i]) for i, h in enumerate(hosts)]

    def _new_only(self, batch: Batch) -> Batch:
        """Rows not stored yet: per host, seq above the highest stored."""
        parts = []
        for host, part in self._by_host(batch):
            seq, first = part["seq"], self.next_seq(host)
            parts.append(part if int(seq.min()) >= first else part[seq >= first])  # the usual case: no copy
        if len(parts) == 1:
            return parts[0]
        if isinstance(batch, Columns):
            return Columns.concat([p for p in parts if isinstance(p, Columns)])
        return np.concatenate([p for p in parts if isinstance(p, np.ndarray)])

    def _insert(self, batch: Batch, cols: _Columns, seconds: _Groups) -> None:
        rows, rollups = [], []
        hosts = [name[0] for name in seconds.names]
        start, width, seq = (COLUMN[f] for f in ("window_start_ns", "window_ms", "seq"))
        for host, part in self._by_host(batch):
            mine = cols if part is batch else _Columns(part)
            if mine.lo[width] == mine.hi[width]:  # one window width (always, from one meter): no pass
                end = int(mine.hi[start]) + int(mine.hi[width]) * 1_000_000
            else:
                end = int((mine.column("window_start_ns") + mine.column("window_ms") * 1_000_000).max())
            rows.append((host, int(mine.lo[seq]), int(mine.hi[seq]), int(mine.lo[start]), end, len(part),
                         _encode(mine)))
            groups = seconds if part is batch else seconds.select(np.array([h == host for h in hosts])[seconds.who])
            rollups.append((host, rows[-1][1], rows[-1][4], _encode_groups(groups)))
            self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                            (f"last_seq:{host}", int(mine.hi[seq])))
        self.db.executemany("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.db.executemany("INSERT OR IGNORE INTO chunk_rollups VALUES (?, ?, ?, ?)", rollups)

    def _roll(self, seconds: _Groups, cols: _Columns) -> tuple[list[_Groups], dict[str, int]]:
        """Add a batch's 1 s groups to the rollups in memory, and write to the rollup
        tables the periods no later batch will add to (docs/architecture.md, "The
        store"): a host's boundary moves to its newest second once that is
        ROLL_EVERY_NS past it, or once memory holds ROLL_MAX_GROUPS groups, and the
        seconds before it are written. Returns the rollups left in memory and each
        host's boundary (kept once committed)."""
        rolled = dict(self._rolled)
        parts = list(self._pending)
        hosts, index = cols.strings["host"]
        starts = cols.column("window_start_ns")
        newest: dict[str, int] = {}
        found = set()  # first batch of a host: a store before the boundary was kept gets it now
        for i, host in enumerate(hosts):
            if host not in rolled:  # what a meter before this one left in memory
                tail, rolled[host] = self._tail(host)
                parts.append(self._relabel(tail))
                found.add(host)
            at = int(cols.hi[COLUMN["window_start_ns"]]) if len(hosts) == 1 else int(starts[index == i].max())
            newest[host] = at // _SECOND * _SECOND
        new = self._relabel(seconds)
        parts.append(new)
        full = sum(len(p) for p in parts) >= ROLL_MAX_GROUPS
        moved = {host for host, second in newest.items()
                 if second > rolled[host] and (full or second - rolled[host] >= ROLL_EVERY_NS)}
        for host in moved:
            rolled[host] = newest[host]
        for host in found | moved:  # each boundary written once
            self._set_boundary(host, rolled[host])
        cut = np.array([rolled.get(host, _NEVER) for host, _, _ in self._names], np.int64)
        if not moved and not (new.start < cut[new.who]).any():
            # Nothing to write (a clock stepped back writes at once): kept as the batches' parts,
            # summed in memory when they are many (batches faster than seconds pass).
            return (parts if len(parts) < _MAX_PARTS else [_Groups.concat(self._names, parts).regroup(_SECOND)]), rolled
        merged = _Groups.concat(self._names, parts).regroup(_SECOND)
        done = merged.start < cut[merged.who]
        self._flush(merged.select(done))
        return [merged.select(~done)], rolled

    def _set_boundary(self, host: str, since: int) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (f"rolled:{host}", since))

    def _relabel(self, g: _Groups) -> _Groups:
        """``g`` with its labels as this store's (one label list for every group it keeps)."""
        ids = np.array([self._label.setdefault(name, len(self._label)) for name in g.names], np.int64)
        self._names.extend(list(self._label)[len(self._names):])
        return _Groups(self._names, ids[g.who] if len(g) else g.who, g.start, g.sums, g.seen)

    def _flush(self, g: _Groups) -> None:
        """Add groups (1 s) into both rollup tables (in the caller's transaction)."""
        if len(g) == 0:
            return
        # Only the columns measured somewhere in the groups: one not named stays NULL in a new
        # row and as it was in an old one, as a NULL given would (and binding a NULL costs
        # sqlite3 ~0.2 µs, most of a row's time when most families are not measured).
        present = g.measured()
        names = [ROLLUP_COLUMNS[j] for j in present]
        cols = "".join(f", {c}" for c in names)
        marks = ", ".join("?" * (5 + len(names)))
        # NULL + n stays n; n + NULL stays n: a family measured anywhere in a period is summed.
        updates = "".join(f", {c} = CASE WHEN excluded.{c} IS NULL THEN {c} ELSE coalesce({c}, 0) + excluded.{c} END"
                          for c in names)
        for table, period in ROLLUPS.items():
            self.db.executemany(
                f"INSERT INTO {table} (host, tenant, compartment, period_start_ns, records{cols}) VALUES ({marks}) "
                f"ON CONFLICT ({_ROLLUP_KEY}) DO UPDATE SET records = records + excluded.records{updates}",
                (g if period == _SECOND else g.regroup(period)).tuples(present),
            )

    def _tail(self, host: str) -> tuple[_Groups, int]:
        """(1 s groups of ``host``'s stored records not in the rollup tables yet, the
        boundary they start at): records from the boundary on (none for a store
        written before the boundary was kept: every record there is rolled up)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (f"rolled:{host}",)).fetchone()
        if row is None:  # a store written before the boundary was kept: all of its records are in the tables
            end = self.db.execute("SELECT max(end_ns) FROM chunks WHERE host = ?", (host,)).fetchone()[0]
            return _Groups([], *_NO_GROUPS), _NEVER if end is None else -(-int(end) // _SECOND) * _SECOND
        since = int(row[0])
        parts = [_decode(blob, f"{host} seq {seq}") for seq, blob in self.db.execute(
            "SELECT first_seq, data FROM chunks WHERE host = ? AND end_ns > ? ORDER BY first_seq", (host, since))]
        recs = np.concatenate(parts) if parts else build(0)
        recs = recs[recs["window_start_ns"] >= since]
        return (_seconds(_Columns(recs)) if len(recs) else _Groups([], *_NO_GROUPS)), since

    def _flush_all(self) -> None:
        """Write every rollup still in memory (closing): each host's boundary moves past them."""
        g = _Groups.concat(self._names, self._pending).regroup(_SECOND)
        if len(g) == 0:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self._flush(g)
            for host, since in self._rolled.items():
                mine = np.array([n[0] == host for n in self._names], bool)[g.who]
                if mine.any():
                    since = max(since, int(g.start[mine].max()) + _SECOND)
                    self._set_boundary(host, since)
                    self._rolled[host] = since
            self._expire_old(self._clock())  # what retention held back for the tables only
            self.db.execute("COMMIT")
            self._pending = []
        except sqlite3.Error as err:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            # Nothing is lost: the records are stored, and the rollups read them until a writer adds them.
            log.warning("meter: could not add the last seconds' rollups to %s (%s); they are read from its "
                        "records until the next meter writes it", self.path, err)

    def _expire(self, newest_ns: int) -> None:
        now = self._clock()
        if newest_ns > now + FUTURE_SLACK_NS:
            log.warning("meter: stored records dated %.0f s ahead of this host's clock (a clock jump?); "
                        "retention counts from the clock, not from them", (newest_ns - now) / 1e9)
        self._expire_old(now)

    def _expire_old(self, now: int) -> None:
        self._expire_chunks(now)
        self._expire_seconds(now)

    def _expire_chunks(self, now: int) -> None:
        """Delete the chunks past retention whose records the rollup tables hold."""
        if self.retention_ns > 0:
            # Never a chunk with records from its host's boundary on: the rollup tables do
            # not hold those yet (they are read from the chunk; a store before the
            # boundary was kept has no boundary, and every record rolled up).
            for table in ("chunks", "chunk_rollups"):
                self.db.execute(f"DELETE FROM {table} WHERE end_ns <= ? AND end_ns <= coalesce("
                                f"(SELECT value FROM meta WHERE key = 'rolled:' || {table}.host), end_ns)",
                                (now - self.retention_ns,))

    def _expire_seconds(self, now: int) -> None:
        """Delete the 1 s rollup rows past their retention, EXPIRE_ROWS at most (the
        oldest second's rows at least), and note the second from which they are kept.
        The 1 h rollups keep their sums."""
        if self.rollup_retention_ns <= 0:
            return
        horizon = (now - self.rollup_retention_ns) // _SECOND * _SECOND
        if self._oldest_second is not None and horizon <= self._oldest_second:
            return  # nothing past retention yet
        first = self.db.execute("SELECT min(period_start_ns) FROM rollup_1s").fetchone()[0]
        if first is None or first >= horizon:
            self._oldest_second = None if first is None else int(first)
            return
        # The period of the EXPIRE_ROWS-th row past retention, if there are that many: the
        # delete stops there (the key is the period first: a walk of that many entries).
        nth = self.db.execute("SELECT period_start_ns FROM rollup_1s WHERE period_start_ns < ? "
                              "ORDER BY period_start_ns LIMIT 1 OFFSET ?", (horizon, EXPIRE_ROWS)).fetchone()
        upto = horizon if nth is None else max(int(nth[0]), int(first) + _SECOND)
        self.db.execute("DELETE FROM rollup_1s WHERE period_start_ns < ?", (upto,))
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                        "max(value, excluded.value)", (_SECONDS_FROM, upto))
        self._oldest_second = upto  # a rolled-back write leaves rows before it: the next delete takes them

    def seconds_from(self) -> int | None:
        """The second from which the 1 s rollups are kept (None: none was ever past
        retention): the seconds before it are deleted, their hours' sums kept in 1 h."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (_SECONDS_FROM,)).fetchone()
        return None if row is None else int(row[0])

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
        rows = []
        for seq, data in chunks:
            if isinstance(data, str):  # rows as JSON (a meter before MTRG1)
                rows += json.loads(data)
                continue
            groups = _decode_groups(data, f"{host} seq {seq}")
            if groups is None:
                return None
            rows += groups.tuples()
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
        """Rollup rows (dicts) with period_start_ns in [start_ns, end_ns): the rollup
        table's rows plus what its writer holds in memory still (read from the
        records; docs/architecture.md, "The store")."""
        if table not in ROLLUPS:
            raise SinkError(f"no rollup {table!r}: use one of {', '.join(ROLLUPS)}")
        kept_from = self.seconds_from() if table == "rollup_1s" else None
        if kept_from is not None and start_ns is not None and start_ns < kept_from:
            raise SinkError(f"the 1 s rollups of {self.path} before {utc_text(kept_from)} are past their retention and deleted: "
                            "read whole hours there (their 1 h rollups are kept; a bill of whole hours "
                            "reads those), or keep 1 s rollups longer (meter record --rollup-retention)",
                            target=str(self.path))
        where, args = self._where(start_ns, end_ns, tenant, "period_start_ns")
        names = ["host", "tenant", "compartment", "period_start_ns", "records", *ROLLUP_COLUMNS]
        rows = self.db.execute(f"SELECT {', '.join(names)} FROM {table}{where} "
                               "ORDER BY period_start_ns, host, tenant, compartment", args).fetchall()
        tail = [r for host in self._rolled_hosts() for r in self._tail_rows(host, ROLLUPS[table])
                if (start_ns is None or r[3] >= start_ns) and (end_ns is None or r[3] < end_ns)
                and (tenant is None or r[1] == tenant)]
        if tail:
            rows = merge_rollup_rows(rows + tail)
        return [dict(zip(names, row)) for row in rows]

    def _rolled_hosts(self) -> list[str]:
        return [key.split(":", 1)[1] for (key,) in self.db.execute("SELECT key FROM meta WHERE key LIKE 'rolled:%'")]

    def _tail_rows(self, host: str, period: int) -> list[tuple[Any, ...]]:
        g, _ = self._tail(host)
        return (g if period == _SECOND else g.regroup(period)).tuples()

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
    g = _seconds(cols_ if cols_ is not None else _Columns(batch))
    return (g if period == _SECOND else g.regroup(period)).tuples()


class _Groups:
    """Rollup groups: each group's labels (``who``: an index into ``names``, the
    (host, tenant, compartment) triples), period start, sums (records, then every
    ROLLUP_COLUMN, 0 where not measured) and measured counts (per ROLLUP_COLUMN:
    how many of its records had it measured; 0 makes the rollup's value None)."""

    __slots__ = ("names", "who", "start", "sums", "seen")

    def __init__(self, names: list[tuple[str, str, str]], who: np.ndarray, start: np.ndarray, sums: np.ndarray,
                 seen: np.ndarray) -> None:
        self.names, self.who, self.start, self.sums, self.seen = names, who, start, sums, seen

    def __len__(self) -> int:
        return len(self.who)

    @staticmethod
    def concat(names: list[tuple[str, str, str]], parts: list[_Groups]) -> _Groups:
        """Groups labelled alike (by ``names``), one after another (not summed: see :meth:`regroup`)."""
        if not parts:
            return _Groups(names, *_NO_GROUPS)
        return _Groups(names, *(np.concatenate(x) for x in zip(*((g.who, g.start, g.sums, g.seen) for g in parts))))

    def regroup(self, period: int) -> _Groups:
        """The same sums by a period that is a multiple of this one's (a few groups
        per label, not a pass over records)."""
        if len(self) == 0:
            return self
        q = self.start // period
        base, nlab = int(q.min()), len(self.names)
        key = (q - base) * nlab + self.who
        first, both = group_sums(key, np.concatenate([self.sums, self.seen], axis=1))
        k = key[first]
        w = self.sums.shape[1]
        return _Groups(self.names, k % nlab, (k // nlab + base) * period, both[:, :w], both[:, w:])

    def select(self, keep: np.ndarray) -> _Groups:
        return _Groups(self.names, self.who[keep], self.start[keep], self.sums[keep], self.seen[keep])

    def measured(self) -> np.ndarray:
        """Indexes into ROLLUP_COLUMNS of the columns measured in some group."""
        return np.flatnonzero(self.seen.any(axis=0)) if len(self) else np.zeros(0, np.int64)

    def tuples(self, present: np.ndarray | None = None) -> list[tuple[Any, ...]]:
        """Rollup rows (as :func:`rollup_rows`), sorted by (period start, host, tenant, compartment);
        with ``present``, only those of the ROLLUP_COLUMNS (by index), in that order."""
        columns: list[list[Any]] = []
        for j in range(len(ROLLUP_COLUMNS)) if present is None else present.tolist():
            v, seen = self.sums[:, 1 + j], self.seen[:, j]
            if not seen.any():
                columns.append([None] * len(self))
            elif seen.all():
                columns.append(v.tolist())
            else:
                columns.append([x if ok else None for x, ok in zip(v.tolist(), seen.tolist())])
        labels = [self.names[i] for i in self.who.tolist()]
        rows = [(*lab, *rest) for lab, rest in zip(labels, zip(self.start.tolist(), self.sums[:, 0].tolist(),
                                                                   *columns))]
        rows.sort(key=lambda r: (r[3], r[0], r[1], r[2]))
        return rows


def _labels(cols: _Columns) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """(a label per record, each label's (host, tenant, compartment)): labels 0..L-1 for
    the batch's L distinct triples. A compartment's name is one tenant's in the usual
    batch: its name's index is then the label, with no pass over a product of the three."""
    (hosts, h), (comps, c) = (cols.strings[f] for f in ("host", "compartment"))
    if len(hosts) == 1:
        if "tenant" in cols.by_comp:  # every name present (factorized), each of one tenant
            return c, [(hosts[0], NAMES.text(code), name) for code, name in zip(cols.by_comp["tenant"].tolist(), comps)]
        if len(cols.strings["tenant"][0]) == 1:
            return c, [(hosts[0], cols.strings["tenant"][0][0], name) for name in comps]
    tenants, t = cols.strings["tenant"] if "tenant" in cols.strings else factorize(cols.column("tenant").copy())
    present, label = unique_ints((h.astype(np.int64) * len(tenants) + t) * len(comps) + c)
    hc, rest = np.divmod(present, len(tenants) * len(comps))
    tc, cc = np.divmod(rest, len(comps))
    return label, list(zip([hosts[i] for i in hc.tolist()], [tenants[i] for i in tc.tolist()],
                           [comps[i] for i in cc.tolist()]))


def _seconds(cols: _Columns) -> _Groups:
    """A batch's 1 s rollup groups: one grouped pass over its records.

    Only columns measured somewhere in the batch are summed; a column with
    NULLs in it is summed as 0 there, with a count of where it was measured.
    """
    label, triples = _labels(cols)
    nlab = len(triples)
    # Summed: the record count, each column measured anywhere, then a "measured
    # here" count for each column with NULLs in it. A part is a column, or one
    # value every record has (an estimate flag mostly is): its sum is count x value.
    parts: list[np.ndarray | int] = [1]
    summed: list[int] = []  # index into ROLLUP_COLUMNS of each summed column
    partial: list[int] = []
    for j, name in enumerate(COUNTER_COLUMNS):
        state = cols.measured(name)
        if state == "none":
            continue
        col = cols.column(name)
        summed.append(j)
        if state == "some":
            parts.append(np.where(col != NULL, col, 0))
            partial.append(j)
        else:
            parts.append(col)
    est = estimate_counts(cols.strings, cols.n)
    for i, (field, _) in enumerate(ESTIMATES.values()):
        summed.append(len(COUNTER_COLUMNS) + i)
        parts.append(int(est[i][0]) if len(cols.strings[field][0]) == 1 else est[i])
    parts += [(cols.column(COUNTER_COLUMNS[j]) != NULL).astype(np.int64) for j in partial]
    p = cols.column("window_start_ns") // _SECOND
    base = int(p.min())
    key = (p - base) * nlab + label
    space = (int(p.max()) - base + 1) * nlab
    if space <= max(8 * cols.n, 1 << 20):
        # Dense (a batch's few seconds x its labels): a slot for every pair, kept if it has records.
        count = np.bincount(key, minlength=space)
        k = np.flatnonzero(count)
        got = np.empty((len(k), len(parts)), np.int64)
        for i, part in enumerate(parts):
            if isinstance(part, int):
                got[:, i] = count[k] * part
            else:
                acc = np.zeros(space, np.int64)
                np.add.at(acc, key, part)
                got[:, i] = acc[k]
    else:
        first, got = group_sums(key, np.stack([np.full(cols.n, v, np.int64) if isinstance(v, int) else v
                                               for v in parts], axis=1))
        k = key[first]
    names, who = triples, k % nlab
    sums = np.zeros((len(k), 1 + len(ROLLUP_COLUMNS)), np.int64)
    seen = np.zeros((len(k), len(ROLLUP_COLUMNS)), np.int64)
    sums[:, 0] = got[:, 0]
    for i, j in enumerate(summed):
        sums[:, 1 + j] = got[:, 1 + i]
        seen[:, j] = got[:, 0]
    for i, j in enumerate(partial):
        seen[:, j] = got[:, 1 + len(summed) + i]
    return _Groups(names, who, (k // nlab + base) * _SECOND, sums, seen)


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


_GROUPS_MAGIC = b"MTRG1"  # a chunk's 1 s rollup groups: a JSON header, then who, start, sums, measured bits


def _encode_groups(g: _Groups) -> bytes:
    """A chunk's own 1 s rollup groups (``chunk_rollups.data``), in binary: the
    header names the labels and the columns measured somewhere in them; then
    per group its label (int32), period start and record count (int64), those
    columns' sums (int64) and a bit each for whether it was measured there.
    About 0.1 µs a group to write, where JSON rows took ~3 µs."""
    import json

    present = g.measured()
    head = json.dumps({"columns": [ROLLUP_COLUMNS[j] for j in present.tolist()], "names": g.names, "n": len(g)},
                      separators=(",", ":")).encode()
    return b"".join((_GROUPS_MAGIC, len(head).to_bytes(4, "little"), head, g.who.astype("<i4").tobytes(),
                     g.start.astype("<i8").tobytes(), g.sums[:, np.concatenate(([0], 1 + present))].astype("<i8").tobytes(),
                     np.packbits(g.seen[:, present] != 0, axis=None).tobytes()))


def _decode_groups(blob: bytes, chunk: str = "") -> _Groups | None:
    """What :func:`_encode_groups` wrote; None for a column this meter does not roll up.
    ``chunk`` names it (host and first seq) in the error a damaged one gives."""
    name = f"the rollups of the record store's chunk {chunk}".rstrip()
    blob = bytes(blob)
    if blob[:5] != _GROUPS_MAGIC:
        raise SinkError(f"{name} are not in meter's format (written by a newer meter?)")
    try:
        return _decode_groups1(blob)
    except (ValueError, KeyError, TypeError, IndexError) as err:  # json.JSONDecodeError is a ValueError
        raise SinkError(f"{name} are damaged ({err}): restore the store from a copy") from err


def _decode_groups1(blob: bytes) -> _Groups | None:
    import json

    size = int.from_bytes(blob[5:9], "little")
    head = json.loads(blob[9:9 + size])
    if any(c not in ROLLUP_COLUMNS for c in head["columns"]):
        return None
    n, present = head["n"], [ROLLUP_COLUMNS.index(c) for c in head["columns"]]
    at = 9 + size
    who = np.frombuffer(blob, "<i4", n, at).astype(np.int64)
    start = np.frombuffer(blob, "<i8", n, at + 4 * n).astype(np.int64)
    at += 12 * n
    got = np.frombuffer(blob, "<i8", n * (1 + len(present)), at).reshape(n, 1 + len(present))
    bits = np.unpackbits(np.frombuffer(blob, np.uint8, offset=at + got.nbytes), count=n * len(present))
    sums = np.zeros((n, 1 + len(ROLLUP_COLUMNS)), np.int64)
    seen = np.zeros((n, len(ROLLUP_COLUMNS)), np.int64)
    sums[:, np.concatenate(([0], 1 + np.array(present, np.int64)))] = got
    seen[:, present] = bits.reshape(n, len(present))
    return _Groups([tuple(name) for name in head["names"]], who, start, sums, seen)


_MAGIC = b"MTRC1"  # every column int64, text as table + int32 index
_MAGIC2 = b"MTRC2"  # each column as its base, step and the narrowest width that holds it
_MAGIC3 = b"MTRC3"  # MTRC2, and fields with one value per compartment name as that list
#: Fields a chunk may keep as one value per compartment name.
_BY_COMPARTMENT = ("tenant", "cgroup_id")
_WIDTHS = ((1 << 8, "<u1"), (1 << 16, "<u2"), (1 << 32, "<u4"))


class _Columns:
    """A batch's columns, computed once per write: each column (a view of the records'
    int64 matrix, or the :class:`meter.records.Columns` array as it is), each
    column's range (one pass over memory for all of them; the Columns' own, per
    array) and its text fields factorized."""

    def __init__(self, batch: Batch) -> None:
        self.n = len(batch)
        if isinstance(batch, Columns):
            self._given: Columns | None = batch
            self.m = None
            self.lo, self.hi = batch.ranges()
        else:
            self._given = None
            self.m = matrix(batch)
            self.lo, self.hi = column_ranges(self.m)
        #: Fields (of :data:`_BY_COMPARTMENT`) with one value per compartment name in this
        #: batch, as each name's value (int64, by the name's index): a tenant's code,
        #: a cgroup id. The usual batch: a compartment is one tenant's and one cgroup.
        self.by_comp: dict[str, np.ndarray] = {}
        self.strings: dict[str, tuple[list[str], np.ndarray]] = {}
        for name in ("compartment", *TEXT_FIELDS):
            if name in self.strings:
                continue
            j = COLUMN[name]
            if self.lo[j] == self.hi[j]:  # one value in the batch: no pass over it
                self.strings[name] = ([NAMES.text(int(self.lo[j]))], np.zeros(self.n, np.int32))
            elif not (name in _BY_COMPARTMENT and self._one_per_compartment(name)):
                self.strings[name] = factorize(np.ascontiguousarray(self.column(name)))
        j = COLUMN["cgroup_id"]
        if self.lo[j] != self.hi[j]:
            self._one_per_compartment("cgroup_id")

    def _one_per_compartment(self, name: str) -> bool:
        """Whether ``name`` has one value per compartment name (kept in :attr:`by_comp`)."""
        comps, c = self.strings["compartment"]
        if len(comps) == 1:
            return False  # one column of values is as cheap as it gets
        col = self.column(name)
        # Some record's value per name (whichever the scatter kept), then every record
        # checked against its name's: equal throughout only if each name has one value.
        value = np.empty(len(comps), np.int64)
        value[c] = col
        if not np.array_equal(value[c], col):
            return False
        self.by_comp[name] = value
        return True

    def column(self, name: str) -> np.ndarray:
        """``name``'s values (int64; ``cgroup_id`` its bits, text fields their codes)."""
        if self.m is not None:
            return self.m[:, COLUMN[name]]
        assert self._given is not None
        value = self._given.given(name)
        if np.ndim(value) == 0:
            return np.full(self.n, int(np.asarray(value).view(np.int64)), np.int64)
        return value.view(np.int64) if value.dtype == np.uint64 else value

    def measured(self, name: str) -> str:
        """``none``, ``some`` or ``all`` of the batch's records have ``name`` measured."""
        j = COLUMN[name]
        if self.lo[j] == NULL and self.hi[j] == NULL:
            return "none"
        return "some" if self.lo[j] <= NULL <= self.hi[j] and bool((self.column(name) == NULL).any()) else "all"


def _width(span: int) -> str:
    return next((dt for limit, dt in _WIDTHS if span < limit), "<u8")


_MAX_WINDOW_MS = (2**63 - 1) // 1_000_000  # a width in ns that int64 holds


def _step(name: str, cols: _Columns) -> int:
    """What ``name``'s values are multiples of apart: window starts, the batch's window width."""
    j = COLUMN["window_ms"]
    if name == "window_start_ns" and cols.lo[j] == cols.hi[j] and 0 < cols.lo[j] <= _MAX_WINDOW_MS:
        return int(cols.lo[j]) * 1_000_000
    return 1


def _encode(cols: _Columns) -> bytearray:
    """A batch as bytes: JSON header, then each column that varies as its offsets
    from its least value in the narrowest width (a constant column is its value
    alone); text as a table and indexes into it. Each column is written straight
    into the chunk's buffer (one pass, no copy of its own)."""
    import json

    n = cols.n
    # A field with one value per compartment name is that list (by the name's index), not a column.
    header: dict[str, Any] = {"n": n, "ints": [], "strs": {}, "by_compartment": {
        name: [NAMES.text(v) for v in values.tolist()] if name in TEXT_FIELDS else values.tolist()
        for name, values in cols.by_comp.items()}}
    # (width, source, least value or None for values already offsets) of each stored column, in order.
    plan: list[tuple[str, np.ndarray, int | None]] = []
    texts: list[tuple[str, np.ndarray, int | None]] = []  # after the numbers
    for name in FIELDS:
        j = COLUMN[name]
        if name in cols.by_comp:
            continue
        if name in TEXT_FIELDS:
            table, index = cols.strings[name]
            dt = None if len(table) == 1 else _width(len(table))
            header["strs"][name] = [table, dt]
            if dt is not None:
                texts.append((dt, index, None))
            continue
        lo, hi = int(cols.lo[j]), int(cols.hi[j])
        if lo == hi:
            header["ints"].append([name, lo, None, 1])
            continue
        col = cols.column(name)
        step = _step(name, cols)
        if step > 1:
            delta = col - cols.lo[j]
            if bool((delta % step == 0).all()):  # window starts: whole windows apart
                header["ints"].append([name, lo, _width((hi - lo) // step), step])
                plan.append((header["ints"][-1][2], delta // step, None))
                continue
        if name == "seq" and hi - lo == n - 1 and np.array_equal(col, np.arange(lo, lo + n)):
            header["ints"].append([name, lo, "arange", 1])  # the usual batch: seq numbers in a row
            continue
        dt = _width(hi - lo)
        header["ints"].append([name, lo, dt, 1])
        plan.append((dt, col, lo))
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = _MAGIC3 + len(head).to_bytes(4, "little") + head
    parts = plan + texts
    out = bytearray(len(prefix) + n * sum(np.dtype(dt).itemsize for dt, *_ in parts))
    out[:len(prefix)] = prefix
    off = len(prefix)
    for dt, src, lo_ in parts:
        view = np.frombuffer(out, dt, count=n, offset=off)
        if lo_ is None:
            view[:] = src  # an index, or whole windows: already offsets
        else:
            # Offsets from the least value in wrapping int64 arithmetic (exact bits for any
            # span), cast into the width on the way out.
            np.subtract(src, np.int64(lo_), out=view, casting="unsafe")
        off += view.nbytes
    return out  # (sqlite3 stores a bytearray as the blob it is: no copy)


def _decode(blob: bytes, chunk: str = "") -> np.ndarray:
    """A chunk's records; ``chunk`` names it (host and first seq) in the error a damaged one gives."""
    name = f"the record store's chunk {chunk}".rstrip()
    if not blob.startswith((_MAGIC, _MAGIC2, _MAGIC3)):
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
    comp: np.ndarray | int = 0  # each record's compartment name's index
    for name in TEXT_FIELDS:
        if name not in header["strs"]:
            continue  # one per compartment: below
        table, dt = header["strs"][name]
        codes = NAMES.codes(table)
        if dt is None:
            m[:, COLUMN[name]] = codes[0]
            continue
        index = np.frombuffer(blob, dt, count=n, offset=off)
        off += index.nbytes
        m[:, COLUMN[name]] = codes[index]
        if name == "compartment":
            comp = index
    for name, values in header.get("by_compartment", {}).items():  # (MTRC3)
        m[:, COLUMN[name]] = (NAMES.codes(values) if name in TEXT_FIELDS else np.array(values, np.int64))[comp]
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
