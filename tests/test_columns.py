"""Columnar records (issue "Big hosts"): codes, dense grouping, the id table, narrowed chunks.

Each fast path is checked against the plain numpy it replaces, on generated
inputs that reach both of its branches (dense and sorted keys, colliding and
unknown ids, columns at int64's extremes), so a fast path that drifts from
the exact answer fails here, not in a bill.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.records import (
    COUNTER_COLUMNS,
    FIELDS,
    NAMES,
    NULL,
    RECORD_DTYPE,
    TEXT_FIELDS,
    Columns,
    build,
    code,
    column_ranges,
    distinct,
    factorize,
    from_matrix,
    group_sums,
    matrix,
    nonzero_cells,
    text,
    to_dicts,
    unique_ints,
)
from meter.resolver import _IdTable
from meter.sinks import store as store_mod
from meter.sinks.store import ROLLUPS, Store, rollup_rows

KEYS = st.one_of(
    # dense: a drain's (window, row) keys
    st.lists(st.integers(0, 300), min_size=1, max_size=400),
    # sparse: wall-clock starts, far apart
    st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=60),
    # ascending, with repeats: a batch's windows (dense) or window starts (sparse)
    st.lists(st.integers(0, 300), min_size=1, max_size=400).map(sorted),
    st.lists(st.sampled_from([-(2**62), -5, 0, 7, 10**12, 2**62]), min_size=1, max_size=60).map(sorted),
)


def _reference(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, first = np.unique(key, return_index=True)
    return first, np.array([values[key == k].sum(axis=0) for k in uniq])


@settings(max_examples=200, deadline=None)
@given(keys=KEYS, data=st.data())
def test_group_sums_is_exact_on_both_paths(keys, data):
    key = np.array(keys, np.int64)
    values = np.array(data.draw(st.lists(st.lists(st.integers(-(2**40), 2**40), min_size=3, max_size=3),
                                         min_size=len(key), max_size=len(key))), np.int64)
    first, sums = group_sums(key, values)
    ref_first, ref_sums = _reference(key, values)
    assert np.array_equal(first, ref_first) and np.array_equal(sums, ref_sums)
    # 1-D values give 1-D sums
    first1, sums1 = group_sums(key, values[:, 0])
    assert np.array_equal(first1, ref_first) and np.array_equal(sums1, ref_sums[:, 0])


@settings(max_examples=200, deadline=None)
@given(keys=KEYS)
def test_unique_ints_is_np_unique(keys):
    key = np.array(keys, np.int64)
    uniq, index = unique_ints(key)
    ref_uniq, ref_index = np.unique(key, return_inverse=True)
    assert np.array_equal(uniq, ref_uniq) and np.array_equal(index, ref_index.reshape(-1))


@settings(max_examples=100, deadline=None)
@given(keys=KEYS)
def test_distinct_is_np_unique(keys):
    key = np.array(keys, np.int64)
    assert np.array_equal(distinct(key), np.unique(key))
    assert np.array_equal(distinct(key[::-1]), np.unique(key))  # descending: sorted, not taken as runs


@pytest.mark.parametrize("n", [0, 1, 2047, 2048, 2049, 6000])
def test_build_writes_every_field_as_a_per_field_assignment_would(n):
    # Filled a block at a time: every record across the blocks' edges, uint64 bits, text as codes.
    rng = np.random.default_rng(n)
    columns = {
        "window_start_ns": rng.integers(0, 2**62, n), "window_ms": 1, "host": "h",
        "tenant": np.array(["a", "b", "c"])[rng.integers(0, 3, n)], "compartment": code("vs"),
        "cgroup_id": rng.integers(0, 2**63, n).astype(np.uint64) * np.uint64(2) + np.uint64(1),
        "cpu_ns": rng.integers(0, 10**9, n).astype(np.int32), "cycles": rng.integers(-1, 10**12, n),
        "energy_uj": np.ones(n, bool), "seq": np.arange(n),
    }
    want = np.zeros(n, RECORD_DTYPE)  # the defaults: counters NULL, the rest 0 (text: code 0, "") ...
    for name in COUNTER_COLUMNS:
        want[name] = NULL
    for name, value in columns.items():  # ... then each given field written whole
        if isinstance(value, str):
            value = code(value)
        elif not isinstance(value, int) and value.dtype.kind == "U":
            value = np.array([code(v) for v in value.tolist()])
        want[name] = value
    got = build(n, columns)
    assert got.dtype == RECORD_DTYPE and got.tobytes() == want.tobytes()
    assert np.array_equal(got["cgroup_id"], columns["cgroup_id"])
    assert text(got, "tenant").tolist() == columns["tenant"].tolist()


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(0, 40), width=st.integers(0, 30), ring=st.integers(30, 64), start=st.integers(0, 63),
       density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_nonzero_cells_is_np_nonzero_on_a_rings_strided_view(rows, width, ring, start, density, seed):
    # A ring's closed windows: rows of `ring` cells, `width` of them from `start`, a strided view.
    cells = np.zeros((rows, ring), np.uint64)
    filled = np.random.default_rng(seed).random(cells.shape) < density
    cells[filled] = np.arange(1, int(filled.sum()) + 1, dtype=np.uint64)
    view = cells[:, start % ring:][:, :width]
    r, j = nonzero_cells(view)
    ref_r, ref_j = np.nonzero(view)
    assert np.array_equal(r, ref_r) and np.array_equal(j, ref_j)
    assert np.array_equal(view[r, j], view[ref_r, ref_j])


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1), given_=st.sets(st.sampled_from(FIELDS), max_size=12))
def test_columns_are_the_records_they_make_ranges_masks_and_fields(n, seed, given_):
    # What the engine reads from a batch's columns (energy, ranges, totals, checks) is
    # what it would read from the records they make.
    rng = np.random.default_rng(seed)
    cols = {}
    for k, name in enumerate(sorted(given_)):
        if k % 3 == 0:  # one value for every record
            cols[name] = "x" if name in TEXT_FIELDS else int(rng.integers(-1, 2**40))
        elif name == "cgroup_id":
            cols[name] = rng.integers(0, 2**64 - 1, n, dtype=np.uint64)
        elif name in TEXT_FIELDS:
            cols[name] = rng.integers(0, 3, n)
        else:
            cols[name] = rng.integers(-(2**62), 2**62, n)
    c = Columns(n, cols)
    out = c.records()
    assert out.tobytes() == build(n, cols).tobytes() and len(c) == n
    lo, hi = c.ranges()
    if n:
        want_lo, want_hi = column_ranges(matrix(out))
        assert np.array_equal(lo, want_lo) and np.array_equal(hi, want_hi)
    for name in FIELDS:
        assert np.array_equal(c[name], out[name])
    keep = rng.random(n) < 0.5
    assert c[keep].records().tobytes() == out[keep].tobytes()
    c["energy_uj"] = np.arange(n)
    assert np.array_equal(c.records()["energy_uj"], np.arange(n))


def test_rows_of_a_drain_in_runs_are_each_ids_row(tmp_path):
    # Ids in long runs, in none and mixed: each id's row, whatever the order.
    from meter.cgroup import cgroup_id
    from meter.resolver import Resolver
    from meter.topology import Topology

    for t in ("a", "b"):
        (tmp_path / t / "vs").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    cfg = tmp_path / "topology.toml"
    cfg.write_text("".join(f'[[tenant]]\nname = "{t}"\n[[tenant.compartment]]\nname = "vs"\ncgroup = "{t}/vs"\n'
                           for t in ("a", "b")))
    res = Resolver(Topology.from_file(cfg, mount=tmp_path))
    ids = [cgroup_id(tmp_path / p) for p in ("a/vs", "b/vs", "other")]
    one = {c: int(res.rows(np.array([c], np.uint64))[0]) for c in ids}
    assert one[ids[0]] != one[ids[1]]
    rng = np.random.default_rng(0)
    for runs in ([400, 1, 1, 300], [1] * 200, [70, 3, 900, 2, 2, 50]):  # long runs, none, mixed
        drain = np.concatenate([np.full(k, ids[i % 3], np.uint64) for i, k in enumerate(runs)])
        if runs[0] == 1:
            rng.shuffle(drain)
        assert res.rows(drain).tolist() == [one[c] for c in drain.tolist()]


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 2**64 - 2), min_size=1, max_size=300, unique=True),
       stride=st.sampled_from([1, 2, 4096, 2**32]), data=st.data())
def test_the_id_table_finds_every_known_id_and_no_other(ids, stride, data):
    # Inode-like ids on a stride (low bits alike: a plain modulo hash would pile them up).
    ids = [(i * stride) % (2**64 - 1) for i in ids]
    ids = list(dict.fromkeys(ids))
    known = {cgid: row for row, cgid in enumerate(ids[: max(1, len(ids) // 2)])}
    table = _IdTable(known)
    asked = np.array(data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=500)), np.uint64)
    got = table.lookup(asked)
    want = np.array([known.get(int(c), -1) for c in asked.tolist()], np.int64)
    assert np.array_equal(got, want)


def test_names_are_codes_for_life_and_text_comes_back():
    a, b = code("tenant-columns-a"), code("tenant-columns-b")
    assert a != b and code("tenant-columns-a") == a and code("") == 0
    batch = build(3, {"tenant": np.array(["tenant-columns-b", "tenant-columns-a", "tenant-columns-b"], object),
                      "compartment": "vs", "cpu_ns": 5})
    assert batch.dtype == RECORD_DTYPE and batch["tenant"].dtype == np.int64
    assert list(text(batch, "tenant")) == ["tenant-columns-b", "tenant-columns-a", "tenant-columns-b"]
    assert [r["compartment"] for r in to_dicts(batch)] == ["vs"] * 3
    # The batch's own table is sorted by name, whatever order the codes were made in.
    table, index = factorize(batch["tenant"])
    assert table == ["tenant-columns-a", "tenant-columns-b"] and list(index) == [1, 0, 1]
    with pytest.raises(ValueError):
        batch["tenant"] = "a string is not a code"  # loud, not a silent all-False comparison later
    with pytest.raises(KeyError):
        text(batch, "cpu_ns")
    # A batch is an int64 matrix and back, bit for bit.
    assert np.array_equal(from_matrix(matrix(batch)), batch)
    assert len(NAMES) >= 3


EXTREMES = [0, 1, -1, 2**63 - 1, -(2**63), 255, 256, 65535, 65536, 2**32 - 1, 2**32]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), data=st.data())
def test_a_chunk_holds_every_field_bit_for_bit(tmp_path, n, data):
    """Narrowed columns (constant, u1..u8, wrapping spans) and text tables decode to the batch written."""
    cols = {}
    for name in FIELDS:
        kind = data.draw(st.sampled_from(["const", "small", "extreme"]))
        if name in ("host", "tenant", "compartment", "cpu_source", "counters_source", "energy_source",
                    "net_source", "vf_source"):
            pool = data.draw(st.lists(st.text("abc", max_size=3), min_size=1, max_size=3))
            cols[name] = np.array(data.draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n)), object)
            continue
        if kind == "const":
            v = np.full(n, data.draw(st.sampled_from(EXTREMES)), np.int64)
        elif kind == "small":
            v = np.array(data.draw(st.lists(st.integers(-1, 70000), min_size=n, max_size=n)), np.int64)
        else:
            v = np.array(data.draw(st.lists(st.sampled_from(EXTREMES), min_size=n, max_size=n)), np.int64)
        cols[name] = v.view(np.uint64) if name == "cgroup_id" else v
    batch = build(n, cols)
    blob = store_mod._encode(store_mod._Columns(batch))
    assert np.array_equal(store_mod._decode(blob).view(np.int64), batch.view(np.int64))


def test_chunks_of_the_previous_format_still_read(tmp_path):
    """Stores written before chunks were narrowed (MTRC1: every column int64) read as before."""
    import json

    batch = build(4, {"tenant": np.array(["a", "b", "a", "b"], object), "compartment": "vs", "host": "h",
                      "cpu_ns": np.array([1, 2, 3, 2**40]), "seq": np.arange(4), "window_ms": 1})
    ints = [f for f in FIELDS if f not in store_mod.TEXT_FIELDS]
    strs = {f: factorize(batch[f]) for f in store_mod.TEXT_FIELDS}
    header = json.dumps({"n": 4, "ints": ints, "strs": {f: t for f, (t, _) in strs.items()}}).encode()
    body = b"".join(np.asarray(batch[f]).astype("<i8").tobytes() for f in ints)
    body += b"".join(i.astype("<i4").tobytes() for _, i in strs.values())
    old = store_mod._MAGIC + len(header).to_bytes(4, "little") + header + body
    assert np.array_equal(store_mod._decode(old).view(np.int64), batch.view(np.int64))


def test_a_busy_hosts_chunks_are_a_few_bytes_a_record_and_hours_sum_the_seconds(tmp_path):
    """1 ms records of 200 compartments over 3 s: the store's chunk is narrowed well below the
    record's 248 bytes, and every 1 h rollup row equals the sum of its 1 s rows (summed from the
    1 s groups, not from the records) and of the records themselves."""
    rng = np.random.default_rng(7)
    windows, comps = 3000, 200
    n = windows * comps
    t0 = (1_700_000_000 // 3600 + 1) * 3600 * 10**9 - 1_500_000_000  # spans an hour boundary
    comp = np.tile(np.arange(comps), windows)
    batch = build(n, {
        "window_start_ns": t0 + np.repeat(np.arange(windows), comps) * 1_000_000, "window_ms": 1, "host": "h",
        "tenant": np.array([f"t{c % 50}" for c in range(comps)], object)[comp],
        "compartment": np.array([f"c{c}" for c in range(comps)], object)[comp],
        "cgroup_id": (1000 + comp).astype(np.uint64), "cpu_ns": rng.integers(0, 1_000_000, n),
        "cycles": rng.integers(0, 3_000_000, n), "energy_uj": rng.integers(0, 50, n),
        "rx_packets": np.where(comp % 3 == 0, rng.integers(0, 9, n), NULL), "seq": np.arange(n),
        "cpu_source": "kernel", "counters_source": "cpu-clock estimate", "energy_source": "model"})
    with Store(tmp_path / "r.db", clock=lambda: t0) as s:
        assert s.write(batch) == n
        (blob_len,) = s.db.execute("SELECT length(data) FROM chunks").fetchone()
        # 248 bytes a record before narrowing; now the width each varying column needs:
        # cpu_ns, cycles 4 bytes; window start 2 (3,000 windows, in whole windows); cgroup,
        # energy, rx_packets, tenant, compartment 1 byte; seq (numbers in a row) and every
        # constant column nothing (plus the header).
        assert blob_len <= 15 * n + 4096, blob_len / n
        assert np.array_equal(s.records().view(np.int64), batch.view(np.int64))
        secs, hours = s.rollup("rollup_1s"), s.rollup("rollup_1h")
    assert len(hours) == 2 * comps  # the batch crosses an hour
    by_hour: dict[tuple[str, str, int], dict[str, int]] = {}
    for r in secs:
        acc = by_hour.setdefault((r["tenant"], r["compartment"], r["period_start_ns"] // ROLLUPS["rollup_1h"]), {})
        for k in ("records", "cpu_ns", "cycles", "energy_uj", "estimated_cycles", "estimated_energy"):
            acc[k] = acc.get(k, 0) + r[k]
        if r["rx_packets"] is not None:
            acc["rx_packets"] = acc.get("rx_packets", 0) + r["rx_packets"]
    for r in hours:
        acc = by_hour[(r["tenant"], r["compartment"], r["period_start_ns"] // ROLLUPS["rollup_1h"])]
        assert {k: r[k] for k in acc} == acc
        assert (r["rx_packets"] is None) == ("rx_packets" not in acc)
    # And straight from the records, by the reference grouping.
    direct = rollup_rows(batch, ROLLUPS["rollup_1h"])
    assert [tuple(r.values())[:len(direct[0])] for r in hours] == [
        tuple(d) for d in sorted(direct, key=lambda d: (d[3], d[0], d[1], d[2]))]
    cpu = sum(r["cpu_ns"] for r in hours)
    assert cpu == int(batch["cpu_ns"].sum())


def test_a_damaged_chunk_is_one_error_naming_it_not_a_traceback(tmp_path):
    batch = build(50, {"host": "h", "tenant": "t", "compartment": "c", "cpu_ns": np.arange(50), "seq": np.arange(50),
                       "window_ms": 1, "window_start_ns": 10**18 + np.arange(50) * 10**6})
    with Store(tmp_path / "r.db", clock=lambda: 10**18) as s:
        s.write(batch)
        s.db.execute("UPDATE chunks SET data = substr(data, 1, length(data) - 40)")  # cut short
        from meter.errors import SinkError

        with pytest.raises(SinkError, match=r"chunk h seq 0 is damaged .*restore the store"):
            s.records()
        with pytest.raises(SinkError, match=r"chunk h seq 0 is damaged"):
            s.records_seq("h", 0, 49)
        # A query for a tenant never met adds no name and finds nothing.
        size = len(NAMES)
        s.db.execute("DELETE FROM chunks")
        s.write(build(0))
        assert len(s.records(tenant="a-tenant-nobody-has")) == 0 and len(NAMES) == size


def test_windows_of_two_runs_a_fraction_of_a_window_apart_are_not_merged():
    """Two runs of a meter on one host have clock offsets that differ by less than a window:
    their windows must stay apart in window_sums, not share a window number."""
    from meter.records import window_sums

    starts = np.array([0, 1_000_000, 400_000, 1_400_000], np.int64) + 10**18
    batch = build(4, {"window_start_ns": starts, "window_ms": 1, "cpu_ns": np.array([1, 2, 4, 8])})
    got_starts, sums = window_sums(batch, "cpu_ns")
    assert list(got_starts - 10**18) == [0, 400_000, 1_000_000, 1_400_000] and list(sums) == [1, 4, 2, 8]


def test_a_window_too_wide_for_ns_in_int64_still_encodes(tmp_path):
    """Window starts are stored in whole windows only when the width in ns fits int64
    (hypothesis found a window_ms of 2**63 - 1 overflowing the step)."""
    batch = build(6, {"window_ms": 2**63 - 1, "window_start_ns": [0, 0, 0, 0, 0, 1], "seq": np.arange(6)})
    blob = store_mod._encode(store_mod._Columns(batch))
    assert np.array_equal(store_mod._decode(blob).view(np.int64), batch.view(np.int64))


def test_a_field_with_one_value_per_compartment_is_kept_once_per_compartment():
    """Tenant and cgroup id are a list by compartment name when each name has one (MTRC3: 12 bytes a record
    here, not 18); a name with two cgroup ids (a cgroup made again) keeps the column, and a chunk
    written before (MTRC2, no such list) still reads."""
    import json

    comps = np.array([f"vs{i}" for i in range(300)], object)
    n = 3000
    c = np.arange(n) % 300
    base = {"compartment": comps[c], "tenant": np.array([f"t{i % 7}" for i in range(300)], object)[c],
            "host": "h", "window_ms": 1, "window_start_ns": 10**18 + np.arange(n) // 300 * 10**6, "seq": np.arange(n),
            "cpu_ns": 1000 + np.arange(n) % 977}
    one = build(n, {**base, "cgroup_id": (5000 + c * 11).astype(np.uint64)})
    cols = store_mod._Columns(one)
    assert set(cols.by_comp) == {"tenant", "cgroup_id"}
    blob = store_mod._encode(cols)
    assert np.array_equal(store_mod._decode(blob).view(np.int64), one.view(np.int64))
    body = len(blob) - 9 - int.from_bytes(blob[5:9], "little")
    assert body == 5 * n  # compartment u2, window u1, cpu_ns u2: no tenant, no cgroup id column
    again = build(n, {**base, "cgroup_id": (5000 + c * 11 + (np.arange(n) > n // 2)).astype(np.uint64)})
    cols = store_mod._Columns(again)
    assert set(cols.by_comp) == {"tenant"}
    assert np.array_equal(store_mod._decode(store_mod._encode(cols)).view(np.int64), again.view(np.int64))
    # The format before: no per-compartment lists.
    single = build(5, {"compartment": "vs", "tenant": "t", "host": "h", "cgroup_id": np.arange(5).astype(np.uint64),
                       "seq": np.arange(5), "cpu_ns": np.arange(5)})
    blob = bytes(store_mod._encode(store_mod._Columns(single)))
    hlen = int.from_bytes(blob[5:9], "little")
    header = json.loads(blob[9:9 + hlen])
    assert header.pop("by_compartment") == {}
    head = json.dumps(header).encode()
    old = b"MTRC2" + len(head).to_bytes(4, "little") + head + blob[9 + hlen:]
    assert np.array_equal(store_mod._decode(old).view(np.int64), single.view(np.int64))


def _random_columns(rng: np.random.Generator, n: int, seq0: int) -> Columns:
    """A batch's columns as the engine makes them, some fields one value for every record:
    one or two hosts, windows of one width, counters measured in some records only."""
    comp = rng.integers(0, 5, n)
    cols: dict = {
        "window_start_ns": T_STORE + rng.integers(0, 3000, n) * 1_000_000, "window_ms": 1,
        "host": "h" if rng.random() < 0.7 else np.array(["h", "g"], object)[rng.integers(0, 2, n)],
        "tenant": np.array(["t0", "t1", "t0", "t2", "t1"], object)[comp],
        "compartment": np.array([f"vs{i}" for i in range(5)], object)[comp],
        "cgroup_id": (1000 + comp).astype(np.uint64), "seq": seq0 + np.arange(n),
        "cpu_ns": rng.integers(0, 10**6, n), "cpu_source": "kernel",
        "rx_packets": np.where(rng.random(n) < 0.5, rng.integers(0, 99, n), NULL),
    }
    if rng.random() < 0.5:
        cols["energy_uj"] = int(rng.integers(0, 50))  # one value for every record
    return Columns(n, cols)


T_STORE = 1_800_000_000 * 10**9


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 400), min_size=1, max_size=4))
def test_the_store_keeps_a_batch_given_as_columns_as_it_keeps_its_records(tmp_path_factory, seed, sizes):
    """``meter record`` hands the store each batch's columns (never laid out as records):
    the chunks, their rollups and both rollup tables are those the same records give,
    a batch written again (its seq numbers stored) adds nothing either way, and
    Columns.concat is the records' concatenation."""
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("cols")
    batches, seq = [], 0
    for n in sizes:
        batches.append(_random_columns(rng, n, seq))
        seq += n
    both = Columns.concat(batches)
    assert both.records().tobytes() == np.concatenate([b.records() for b in batches]).tobytes()
    stores = {kind: Store(tmp / f"{kind}.db", clock=lambda: T_STORE) for kind in ("records", "columns")}
    for b in batches + batches[-1:]:  # the last one twice
        # Fresh Columns each time: the records laid out for one store are not the other's input.
        again = Columns(len(b), {name: b.given(name) for name in b._columns})
        stores["records"].write(again.records())
        stores["columns"].write(Columns(len(b), {name: b.given(name) for name in b._columns}))
    got = {}
    for kind, s in stores.items():
        s.close()
        s = Store(tmp / f"{kind}.db", must_exist=True)
        got[kind] = (s.records().tobytes(), [s.rollup(t) for t in ROLLUPS],
                     [s.rollups_seq(h, 0, 10**6) for h in ("h", "g")])
        s.close()
    assert got["columns"] == got["records"]
    assert len(got["columns"][0]) == both.n * RECORD_DTYPE.itemsize
