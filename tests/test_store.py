"""The store's rollups in memory (issue "Big hosts"): a period's rollup row is written
once, when no later batch can add to it, yet every reader sees every record
rolled up, a writer killed with rollups in memory loses none, and nothing is
counted twice by the next writer or by a store written before the boundary was kept.

The expected sums come from the records by a plain Python loop, not from the
store's own grouping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meter.errors import SinkError
from meter.records import NULL, build, text
from meter.sinks import store as store_mod
from meter.sinks.store import ROLL_EVERY_NS, ROLLUPS, Store

SECOND = ROLLUPS["rollup_1s"]
T0 = 1_800_000_000 * SECOND  # a whole second, well inside an hour
COMPS = ("vs-a", "vs-b", "vs-c")


def batch(first_window: int, windows: int, seq: int, *, host: str = "h", window_ms: int = 250) -> np.ndarray:
    """``windows`` windows of ``window_ms`` from window number ``first_window``, one record per compartment
    each, numbered from ``seq``; cpu_ns and rx_packets (measured for vs-a only) vary by record."""
    n = windows * len(COMPS)
    comp = np.tile(np.arange(len(COMPS)), windows)
    win = np.repeat(np.arange(first_window, first_window + windows), len(COMPS))
    return build(n, {
        "window_start_ns": T0 + win * window_ms * 1_000_000, "window_ms": window_ms, "host": host,
        "tenant": "acme", "compartment": np.array(COMPS, object)[comp], "seq": seq + np.arange(n),
        "cpu_ns": 1000 + win * 7 + comp, "rx_packets": np.where(comp == 0, win % 5, NULL), "cpu_source": "kernel"})


def expected(records: np.ndarray, period: int) -> dict[tuple[str, str, str, int], tuple[int, int, int | None]]:
    """(host, tenant, compartment, period start) -> (records, cpu_ns, rx_packets or None), by a loop."""
    out: dict[tuple[str, str, str, int], list] = {}
    hosts, tenants, comps = (text(records, f) for f in ("host", "tenant", "compartment"))
    for i, r in enumerate(records):
        key = (hosts[i], tenants[i], comps[i], int(r["window_start_ns"]) // period * period)
        acc = out.setdefault(key, [0, 0, None])
        acc[0] += 1
        acc[1] += int(r["cpu_ns"])
        if r["rx_packets"] != NULL:
            acc[2] = (acc[2] or 0) + int(r["rx_packets"])
    return {k: tuple(v) for k, v in out.items()}


def read(rows: list[dict]) -> dict[tuple[str, str, str, int], tuple[int, int, int | None]]:
    return {(r["host"], r["tenant"], r["compartment"], r["period_start_ns"]): (r["records"], r["cpu_ns"], r["rx_packets"])
            for r in rows}


def table(s: Store, name: str) -> dict[tuple[str, str, str, int], tuple[int, int, int | None]]:
    """The rollup table's own rows (without what the writer holds in memory)."""
    return {(h, t, c, p): (n, cpu, rx) for h, t, c, p, n, cpu, rx in s.db.execute(
        f"SELECT host, tenant, compartment, period_start_ns, records, cpu_ns, rx_packets FROM {name}")}


def test_each_compartment_second_is_written_once_and_every_reader_sees_all(tmp_path):
    written = []
    boundary = None
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        for i in range(52):  # 13 s of 4 batches of one 250 ms window
            written.append(batch(i, 1, 3 * i))
            s.write(written[-1])
            got = np.concatenate(written)
            # Every reader (this writer too) sees every record rolled up, by second and by hour...
            for name, period in ROLLUPS.items():
                assert read(s.rollup(name)) == expected(got, period)
            # ...while the tables hold only the seconds before the boundary, each written once: the
            # boundary is the first batch's second, then moves to the newest batch's second once
            # that is ROLL_EVERY_NS past it.
            newest = (T0 + i * 250_000_000) // SECOND * SECOND
            if boundary is None or newest - boundary >= ROLL_EVERY_NS:
                boundary = newest
            assert table(s, "rollup_1s") == {k: v for k, v in expected(got, SECOND).items() if k[3] < boundary}
            assert table(s, "rollup_1h") == expected(got[got["window_start_ns"] < boundary], ROLLUPS["rollup_1h"])
            assert s.db.execute("SELECT value FROM meta WHERE key = 'rolled:h'").fetchone()[0] == boundary
        assert len(table(s, "rollup_1s")) == 10 * len(COMPS)  # seconds 0-9; seconds 10-12 are in memory
        with Store(tmp_path / "r.db", must_exist=True) as other:  # another process's view: the same
            assert read(other.rollup("rollup_1s")) == expected(got, SECOND)
            assert read(other.rollup("rollup_1h", tenant="acme")) == expected(got, ROLLUPS["rollup_1h"])
            assert other.rollup("rollup_1s", tenant="nobody") == []
    with Store(tmp_path / "r.db", must_exist=True) as s:  # closed: all of it in the tables
        for name, period in ROLLUPS.items():
            assert table(s, name) == expected(got, period)


def test_a_hosts_boundary_is_written_once_a_write_that_moves_it(tmp_path):
    """The first batch of a host stores its boundary (found, or moved) in one statement; a
    batch that does not move it stores nothing."""
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        said: list[str] = []
        s.db.set_trace_callback(said.append)
        s.write(batch(0, 1, 0))
        first = [q for q in said if q.startswith("INSERT INTO meta") and "rolled:" in q]
        said.clear()
        s.write(batch(1, 1, 3))  # the same second: the boundary stays
        again = [q for q in said if q.startswith("INSERT INTO meta") and "rolled:" in q]
        s.db.set_trace_callback(None)
    assert len(first) == 1 and again == []


def test_rollups_are_written_sooner_when_memory_holds_many_groups(tmp_path, monkeypatch):
    """A big host fills memory with 1 s groups before ten seconds pass: at ROLL_MAX_GROUPS the
    boundary moves to the newest second at once (here 2 seconds in, not 10)."""
    import meter.sinks.store as store_module

    monkeypatch.setattr(store_module, "ROLL_MAX_GROUPS", 2 * len(COMPS))
    written = []
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        for i in range(8):  # 2 s of 4 batches of one 250 ms window
            written.append(batch(i, 1, 3 * i))
            s.write(written[-1])
            got = np.concatenate(written)
            assert read(s.rollup("rollup_1s")) == expected(got, SECOND)
        # Second 0 is written once second 1 began (memory was full), second 1 is held.
        assert table(s, "rollup_1s") == {k: v for k, v in expected(got, SECOND).items() if k[3] < T0 + SECOND}
        assert table(s, "rollup_1h") == expected(got[got["window_start_ns"] < T0 + SECOND], ROLLUPS["rollup_1h"])


WRITER = """
import os, sys
sys.path.insert(0, {tests!r})
from test_store import batch
from meter.sinks.store import Store
s = Store({path!r}, clock=lambda: {t0})
for i in range({first}, {last}):
    s.write(batch(i, 1, 3 * i))
os._exit(0)  # killed: no close, the rollups in memory go with the process
"""


def test_a_writer_killed_with_rollups_in_memory_loses_none_and_the_next_counts_none_twice(tmp_path):
    path = tmp_path / "r.db"
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", WRITER.format(tests=tests, path=str(path), t0=T0, first=0, last=7)],
                   check=True, env={**os.environ, "PYTHONPATH": str(Path(tests).parent)})
    first = np.concatenate([batch(i, 1, 3 * i) for i in range(7)])
    with Store(path, must_exist=True) as s:
        assert table(s, "rollup_1s") != expected(first, SECOND)  # the last second died in memory...
        assert read(s.rollup("rollup_1s")) == expected(first, SECOND)  # ...and is read from the records
    with Store(path, clock=lambda: T0) as s:  # the next writer: carries on in the same second
        for i in range(7, 10):
            s.write(batch(i, 1, 3 * i))
    both = np.concatenate([first, *(batch(i, 1, 3 * i) for i in range(7, 10))])
    with Store(path, must_exist=True) as s:
        for name, period in ROLLUPS.items():
            assert table(s, name) == expected(both, period)
            assert read(s.rollup(name)) == expected(both, period)


def test_a_store_written_before_the_boundary_was_kept_is_not_counted_twice(tmp_path):
    path = tmp_path / "r.db"
    with Store(path, clock=lambda: T0) as s:
        for i in range(3):
            s.write(batch(i, 1, 3 * i))
    with Store(path, must_exist=True) as s:  # as a meter before this one left it: every record rolled up
        s.db.execute("DELETE FROM meta WHERE key LIKE 'rolled:%'")
    got = np.concatenate([batch(0, 3, 0), batch(3, 1, 9), batch(4, 2, 12)])
    with Store(path, clock=lambda: T0) as s:
        s.write(batch(3, 1, 9))  # the same second as the records before
        assert read(s.rollup("rollup_1s")) == expected(got[:12], SECOND)
        s.write(batch(4, 2, 12))
        assert read(s.rollup("rollup_1s")) == expected(got, SECOND)
    with Store(path, must_exist=True) as s:
        for name, period in ROLLUPS.items():
            assert table(s, name) == expected(got, period)


def test_records_older_than_the_boundary_go_to_the_tables_at_once(tmp_path):
    """A batch dated before seconds already written (a clock stepped back) is added to their rows."""
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        s.write(batch(20, 1, 0))  # second 5
        s.write(batch(0, 4, 3))  # seconds 0: before the boundary
        got = np.concatenate([batch(20, 1, 0), batch(0, 4, 3)])
        assert table(s, "rollup_1s") == {k: v for k, v in expected(got, SECOND).items() if k[3] < T0 + 5 * SECOND}
        assert read(s.rollup("rollup_1s")) == expected(got, SECOND)
    with Store(tmp_path / "r.db", must_exist=True) as s:
        assert table(s, "rollup_1s") == expected(got, SECOND)


def test_hosts_in_one_store_keep_their_own_boundaries(tmp_path):
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        a, b = batch(0, 8, 0, host="a"), batch(2, 1, 0, host="b")
        s.write(np.concatenate([a, b]))
        assert set(table(s, "rollup_1s")) == {k for k in expected(a, SECOND) if k[3] == T0}  # a's second 0
        assert read(s.rollup("rollup_1s")) == {**expected(a, SECOND), **expected(b, SECOND)}
    with Store(tmp_path / "r.db", must_exist=True) as s:
        assert table(s, "rollup_1s") == {**expected(a, SECOND), **expected(b, SECOND)}


def test_one_compartment_name_under_two_tenants_keeps_two_rows(tmp_path):
    """Labels are (host, tenant, compartment): a name two tenants both use is two rows, not one."""
    n = 8
    recs = build(n, {"window_start_ns": T0 + np.arange(n) // 2 * 500_000_000, "window_ms": 500, "host": "h",
                     "tenant": np.array(["a", "b"] * (n // 2), object), "compartment": "vswitch",
                     "seq": np.arange(n), "cpu_ns": 10 + np.arange(n), "rx_packets": NULL})
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        s.write(recs)
        assert read(s.rollup("rollup_1s")) == expected(recs, SECOND)
        assert len(expected(recs, SECOND)) == 4  # 2 tenants x 2 seconds


def test_a_close_that_cannot_write_the_last_rollups_says_so_and_loses_nothing(tmp_path, monkeypatch, caplog):
    import sqlite3

    written = np.concatenate([batch(i, 1, 3 * i) for i in range(6)])
    s = Store(tmp_path / "r.db", clock=lambda: T0)
    s.write(written[:9])
    s.write(written[9:])

    def full(self, g):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Store, "_flush", full)
    s.close()
    assert "could not add the last seconds' rollups" in caplog.text and "disk is full" in caplog.text
    monkeypatch.undo()
    with Store(tmp_path / "r.db", must_exist=True) as r:
        assert table(r, "rollup_1s") != expected(written, SECOND)  # the last second is not in the table...
        assert read(r.rollup("rollup_1s")) == expected(written, SECOND)  # ...and is read from the records


def test_retention_never_deletes_records_the_rollups_do_not_hold_yet(tmp_path):
    """With a retention shorter than a second, a killed writer's last second lives only in its chunks:
    they stay until the rollup tables hold them (then retention deletes them as before)."""
    # Seconds 0, then 9-11: the second batch moves the boundary (ROLL_EVERY_NS) to second 11.
    written = np.concatenate([batch(0, 3, 0), batch(39, 6, 9)])
    s = Store(tmp_path / "r.db", retention_s=1, clock=lambda: T0 + 100 * SECOND)  # everything is past retention
    s.write(written[:9])
    s.write(written[9:])  # no close: killed with second 11 in memory
    with Store(tmp_path / "r.db", must_exist=True) as r:
        assert read(r.rollup("rollup_1s")) == expected(written, SECOND)
        assert len(r.records()) == 27 - 9  # the chunk reaching into second 11, kept whole; the one before, deleted
    s.close()


def test_one_second_rollups_past_their_retention_go_in_bounded_deletes_and_their_hours_stay(tmp_path, monkeypatch):
    """The 1 s rollups, a row per compartment and second, are kept for their own retention:
    past it they are deleted, EXPIRE_ROWS at most a write (a store not written for hours
    catches up over several writes), while the 1 h rollups keep every sum. A read of an
    expired second is one clear error naming the second they are kept from; a bill of
    whole hours still reads everything."""
    from meter.bill import usage_from_store

    hour = ROLLUPS["rollup_1h"]
    now = [T0]
    path = tmp_path / "r.db"
    written = [batch(w, 600, 3 * w, window_ms=1000) for w in range(0, 3 * 3600, 600)]  # 3 h, a record a second each
    with Store(path, clock=lambda: now[0]) as s:
        for b in written:
            now[0] = int(b["window_start_ns"].max()) + SECOND  # written as its last second ends
            s.write(b)
        assert s.seconds_from() is None  # nothing past retention
    monkeypatch.setattr(store_mod, "EXPIRE_ROWS", 5000)
    now[0] = T0 + 4 * hour
    horizon = T0 + 3 * hour  # an hour's retention: the first three hours' seconds are past it
    deleted = []
    with Store(path, rollup_retention_s=3600, clock=lambda: now[0]) as s:
        w = 3 * 3600
        while s.seconds_from() != horizon and len(deleted) < 20:
            before = s.db.execute("SELECT count(*) FROM rollup_1s").fetchone()[0]
            written.append(batch(w, 1, 3 * w, window_ms=1000))
            s.write(written[-1])
            deleted.append(before - s.db.execute("SELECT count(*) FROM rollup_1s").fetchone()[0])
            w += 1
        assert s.db.execute("SELECT count(*) FROM rollup_1s WHERE period_start_ns < ?", (horizon,)).fetchone()[0] == 0
    # 32,400 rows past retention, in deletes of at most 5,000 (whole seconds: 4,998 or fewer).
    assert sum(deleted) == 3 * 3600 * len(COMPS) and len(deleted) == 7 and max(deleted) <= 5000
    got = np.concatenate(written)
    with Store(path, must_exist=True) as r:
        assert r.seconds_from() == horizon
        assert table(r, "rollup_1h") == expected(got, hour)  # every hour's sums kept
        kept = got[got["window_start_ns"] >= horizon]
        assert read(r.rollup("rollup_1s", horizon)) == expected(kept, SECOND)
        with pytest.raises(SinkError, match=r"1 s rollups of .* before 2027-01-15T11:00:00Z are past their "
                                            r"retention and deleted: read whole hours there"):
            r.rollup("rollup_1s", T0 + 1800 * SECOND, T0 + 1860 * SECOND)
        # A bill of whole hours reads the hours; one from mid-hour needs seconds that are gone.
        usage = usage_from_store(r, T0, T0 + 3 * hour, hour)
        billed = sum(u["cpu_ns"] for period in usage.values() for u in period.values())
        assert billed == int(got["cpu_ns"][got["window_start_ns"] < horizon].sum())
        with pytest.raises(SinkError, match="past their retention"):
            usage_from_store(r, T0 + 1800 * SECOND, T0 + 3 * hour, hour)


def test_retention_finds_the_chunks_by_index_not_by_a_scan_of_every_chunk_kept(tmp_path):
    """Retention's deletes run at every write: through an index on end_ns in both chunk
    tables, not a scan of every chunk kept (with a day of 1 s chunks a scan took 42 ms a
    write). A store from before chunk_rollups had one gets it from its next writer, not
    from a reader."""
    path = tmp_path / "r.db"

    def plans(s: Store) -> list[str]:
        said: list[str] = []
        s.db.set_trace_callback(said.append)
        s.write(batch(s.next_seq("h") // 3, 1, s.next_seq("h")))
        s.db.set_trace_callback(None)
        deletes = [q for q in said if q.startswith("DELETE")]
        assert len(deletes) == 2  # chunks and chunk_rollups
        return [row[3] for q in deletes for row in s.db.execute("EXPLAIN QUERY PLAN " + q)]

    with Store(path, clock=lambda: T0) as s:
        assert not [p for p in plans(s) if p.startswith("SCAN")]
        s.db.execute("DROP INDEX chunk_rollups_end")  # as a store before stop 43
    with Store(path, must_exist=True) as r:
        assert r.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunk_rollups_end'").fetchone() is None
    with Store(path, clock=lambda: T0) as s:
        assert not [p for p in plans(s) if p.startswith("SCAN")]


def test_a_chunks_own_rollups_are_kept_in_binary_and_read_back_as_rows(tmp_path):
    """Each chunk keeps its own 1 s rollup rows (for shipping segments) in binary
    (MTRG1): read back, they are the rows the records give, measured and NULL
    columns alike, per host when a batch has two."""
    from meter.sinks.store import _SECOND, rollup_rows

    two = np.concatenate([batch(0, 12, 0), batch(0, 12, 0, host="g")])
    with Store(tmp_path / "r.db") as s:
        s.write(two)
        kept = s.db.execute("SELECT data FROM chunk_rollups").fetchall()
        assert len(kept) == 2 and all(bytes(d[:5]) == b"MTRG1" for (d,) in kept)
        for host in ("h", "g"):
            mine = two[text(two, "host") == host]
            got = s.rollups_seq(host, 0, 10**6)
            assert got == rollup_rows(mine, _SECOND)
            # The loop's sums, rx_packets None where no record of the group measured it.
            assert {(r[0], r[1], r[2], r[3]): (r[4], r[5], r[12]) for r in got} == expected(mine, SECOND)
            assert any(r[12] is None for r in got) and any(r[12] is not None for r in got)


def test_damaged_chunk_rollups_are_one_clear_error_naming_the_chunk(tmp_path):
    """A chunk's kept rollups cut short (a damaged store) end in one sentence that names
    the chunk and what to do, not a traceback from the decoder."""
    import pytest

    from meter.errors import SinkError

    with Store(tmp_path / "r.db") as s:
        s.write(batch(0, 12, 0))
        (data,) = s.db.execute("SELECT data FROM chunk_rollups").fetchone()
        s.db.execute("UPDATE chunk_rollups SET data = ?", (bytes(data)[:-40],))
        with pytest.raises(SinkError, match=r"chunk h seq 0 are damaged .*restore the store from a copy"):
            s.rollups_seq("h", 0, 10**6)


def test_a_family_no_record_of_a_second_measured_keeps_its_hour_sum(tmp_path):
    """The rollup rows name only the columns measured somewhere in them: a second in which
    no record measured rx_packets leaves the hour's rx_packets as the seconds before made it
    (not NULL), and its own 1 s rows have rx_packets NULL."""
    def second(s: int, seq: int, measured: bool) -> np.ndarray:
        b = batch(4 * s, 4, seq)
        if not measured:
            b["rx_packets"] = NULL
        return b

    got = [second(0, 0, True), second(1, 12, False), second(2, 24, False)]
    with Store(tmp_path / "r.db", clock=lambda: T0) as s:
        for b in got:
            s.write(b)
    every = np.concatenate(got)
    with Store(tmp_path / "r.db", must_exist=True) as s:
        for name, period in ROLLUPS.items():
            assert table(s, name) == expected(every, period)
        assert all(rx is None for (*_, p), (_, _, rx) in table(s, "rollup_1s").items() if p >= T0 + SECOND)
        assert {rx for (_, _, rx) in table(s, "rollup_1h").values()} == {sum(w % 5 for w in range(4)), None}


def test_a_store_keyed_compartment_first_is_rekeyed_by_its_next_writer(tmp_path):
    """Stores before stop 42 keyed rollups by (host, tenant, compartment, period): every
    second's rows then dirtied a page per compartment. The next writer rebuilds each table
    keyed by period first, rows unchanged, and carries on; a reader leaves the file alone."""
    path = tmp_path / "r.db"
    first = [batch(i, 1, 3 * i) for i in range(9)]
    with Store(path, clock=lambda: T0) as s:
        for b in first:
            s.write(b)
    with Store(path, must_exist=True) as s:  # as a meter before stop 42 left it
        for name in ROLLUPS:
            cols = [r[1] for r in s.db.execute(f"PRAGMA table_info({name})")]
            s.db.execute(f"ALTER TABLE {name} RENAME TO old")
            s.db.execute(f"CREATE TABLE {name} ({', '.join(cols)}, PRIMARY KEY (host, tenant, compartment, "
                         "period_start_ns)) WITHOUT ROWID")
            s.db.execute(f"INSERT INTO {name} SELECT * FROM old")
            s.db.execute("DROP TABLE old")

    def key(s: Store, name: str) -> str:
        sql = s.db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        return sql[sql.index("PRIMARY KEY"):]

    with Store(path, must_exist=True) as s:
        assert key(s, "rollup_1s").startswith("PRIMARY KEY (host, tenant")
        assert read(s.rollup("rollup_1s")) == expected(np.concatenate(first), SECOND)
    with Store(path, clock=lambda: T0) as s:
        s.claim("h")  # the writer rebuilds when it claims the store, before any record
        for name in ROLLUPS:
            assert key(s, name).startswith("PRIMARY KEY (period_start_ns, host")
        later = [batch(i, 1, 3 * i) for i in range(9, 14)]
        for b in later:
            s.write(b)
    every = np.concatenate(first + later)
    with Store(path, must_exist=True) as s:
        for name, period in ROLLUPS.items():
            assert table(s, name) == expected(every, period)
            assert read(s.rollup(name)) == expected(every, period)


def test_only_the_stores_writer_rekeys_it_and_a_failed_rebuild_is_one_sentence(tmp_path):
    """A second meter refused the store (another one writes it) leaves its tables as they
    are; a rebuild that fails says which table and that nothing changed, and releases the
    store for the next writer."""
    import fcntl

    import pytest

    from meter.errors import SinkError

    path = tmp_path / "r.db"
    with Store(path, clock=lambda: T0) as s:
        s.write(batch(0, 4, 0))
    with Store(path, must_exist=True) as s:  # keyed as before stop 42
        for name in ROLLUPS:
            s.db.execute(f"ALTER TABLE {name} RENAME TO old")
            s.db.execute(f"CREATE TABLE {name} AS SELECT * FROM old")  # (no key at all: not period first)
            s.db.execute("DROP TABLE old")

    def rekeyed(name: str) -> bool:
        with Store(path, must_exist=True) as r:
            return "PRIMARY KEY (period_start_ns" in r.db.execute(
                "SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]

    with Store(path, clock=lambda: T0) as writer:
        writer.claim("h")
        assert rekeyed("rollup_1s")
    with Store(path, must_exist=True) as s:  # old again, and another meter writing it
        s.db.execute("ALTER TABLE rollup_1s RENAME TO old")
        s.db.execute("CREATE TABLE rollup_1s AS SELECT * FROM old")
        s.db.execute("DROP TABLE old")
    older = os.open(path.with_name(path.name + ".lock"), os.O_RDWR)  # a meter before stop 42 writing it
    fcntl.flock(older, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with Store(path, clock=lambda: T0) as second:
        with pytest.raises(SinkError, match="being written by another meter"):
            second.claim("h")
    assert not rekeyed("rollup_1s")  # the refused meter changed nothing
    os.close(older)
    with Store(path, must_exist=True) as s:  # a leftover object of the rebuild's name: it cannot run
        s.db.execute("CREATE VIEW rollup_1s_rekeyed AS SELECT 1")
    with Store(path, clock=lambda: T0) as s:
        with pytest.raises(SinkError, match=r"cannot rebuild the rollup table rollup_1s of .*nothing in it was changed"):
            s.claim("h")
    assert not rekeyed("rollup_1s")
    with Store(path, must_exist=True) as s:
        s.db.execute("DROP VIEW rollup_1s_rekeyed")
    with Store(path, clock=lambda: T0) as s:  # released: the next writer claims and rebuilds it
        s.claim("h")
    assert rekeyed("rollup_1s")
