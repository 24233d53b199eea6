"""Fleet billing: hosts ship segments to S3 (moto's server on 127.0.0.1), a Delta table commits
each exactly once, and DuckDB and Dask bill it to the last decimal of the per-host bills."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("deltalake")
pytest.importorskip("s3fs")
pytest.importorskip("distributed")
pytest.importorskip("moto")

from meter import fleet, ship
from meter.bill import PriceSheet, charges, invoices, merge_periods, usage_from_store
from meter.errors import MeterError
from meter.focus import focus_rows
from meter.sinks import store as store_mod
from meter.sinks.store import Store

from .test_bill import T0, records

HOSTS = ("h1", "h2", "h3", "h4", "h5")
# Prices whose costs are exact at the bill's 10 decimals for any integer usage, so that the
# per-host bills and the fleet's must agree to the last decimal (not just within rounding).
SHEET = PriceSheet.from_dict({"currency": "EUR", "prices": {
    "cpu_second": "0.5", "gigacycle": "0.1", "kwh": "360", "gb": "0.5", "million_packets": "1"},
    "tenant": {"globex": {"cpu_second": "0.2"}}})
SPAN = (T0 - 3600 * 10**9, T0 + 3600 * 10**9)  # two hours around the records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p, url
        except OSError:
            time.sleep(0.1)
    p.kill()
    raise RuntimeError("moto's server did not start")


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A local S3 endpoint; its settings are in the environment while the module runs."""
    p, url = _moto(dict(os.environ))
    env = {"AWS_ACCESS_KEY_ID": "meter", "AWS_SECRET_ACCESS_KEY": "meter", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("fleet")
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        p.kill()
        p.wait()


def _stores(tmp_path: Path) -> dict[str, Path]:
    """Five hosts' stores, each written in several batches (several chunks, several segments)."""
    out = {}
    for i, host in enumerate(HOSTS):
        path = tmp_path / f"{host}.db"
        b = records(host, 600 + 300 * i)
        b["cpu_ns"] += i * 1000 + np.arange(len(b)) % 7  # every host different
        with Store(path) as s:
            for part in np.array_split(b, 4):
                s.write(part)
        out[host] = path
    return out


def _host_usage(stores: dict[str, Path]) -> dict[int, dict]:
    """Σ of every host's own store usage per period and resource: what the fleet must bill."""
    total: dict[int, dict] = {}
    for path in stores.values():
        with Store(path) as s:
            for k, usage in usage_from_store(s, *SPAN, 3600 * 10**9, by_resource=True).items():
                total.setdefault(k, {}).update(usage)  # resources of different hosts never collide
    return total


def _check_fleet(table: str, stores: dict[str, Path]) -> None:
    expect = _host_usage(stores)
    for engine in ("duckdb", "dask"):
        got = fleet.fleet_usage(table, *SPAN, 3600 * 10**9, engine=engine)
        assert got == expect, engine
    fleet_bill = invoices(merge_periods(expect), SHEET, *SPAN)
    per_host = {}
    for path in stores.values():
        with Store(path) as s:
            for inv in invoices(merge_periods(usage_from_store(s, *SPAN, 3600 * 10**9)), SHEET, *SPAN):
                per_host[inv.tenant] = per_host.get(inv.tenant, Decimal(0)) + inv.subtotal
    assert {i.tenant: i.subtotal for i in fleet_bill} == per_host
    # The fleet's FOCUS rows are the hosts' own rows, to the last decimal.
    rows = focus_rows(charges(expect, SHEET, *SPAN, 3600 * 10**9), SHEET)
    own = []
    for path in stores.values():
        with Store(path) as s:
            own += focus_rows(charges(usage_from_store(s, *SPAN, 3600 * 10**9, by_resource=True), SHEET, *SPAN,
                                      3600 * 10**9), SHEET)
    key = lambda r: (r["ResourceId"], r["x_Meter"], r["ChargePeriodStart"])  # noqa: E731
    assert sorted(rows, key=key) == sorted(own, key=key)


def _dying(err: BaseException, real=None, *, after: int = 0, seen=None):  # type: ignore[no-untyped-def]
    """A stand-in for ``real`` that dies with ``err``: at once (no ``real``), once ``after``
    calls went through, or (``after`` 0) right after its one call went through: the answer
    lost. ``seen`` collects the (path, data) of the calls that went through."""
    count: list[int] = []

    def fake(*args, **kwargs):  # type: ignore[no-untyped-def]
        if real is not None and (after == 0 or len(count) < after):
            real(*args, **kwargs)
            count.append(1)
            if seen is not None:
                seen.append(args[1:3])
            if after:
                return None
        raise err

    return fake


def test_five_hosts_through_faults_are_billed_exactly_once(s3, tmp_path, meter_bin, monkeypatch):
    import s3fs
    from deltalake import write_deltalake

    segs, table = "s3://fleet/segs", "s3://fleet/table"
    stores = _stores(tmp_path)
    env = {**os.environ, **s3}
    # h5's meter ship is killed (SIGKILL) somewhere in its run, then runs again.
    p = subprocess.Popen([*meter_bin, "ship", "--to", segs, "--store", str(stores["h5"])], env=env,
                         stderr=subprocess.DEVNULL)
    time.sleep(0.8)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # h3's ship dies mid-upload (before its PUT completed): the segment stays meant, and the
    # next run sends exactly it.
    with Store(stores["h3"]) as s:
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(ship, "_put", _dying(KeyboardInterrupt("killed mid-upload")))
            ship.ship(s, segs)
        meant = [m for m in s.shipments("h3") if not m["done"]]
        assert len(meant) == 1 and ship.ship(s, segs).segments == [meant[0]["key"]]
    for host in ("h1", "h2", "h4"):
        with Store(stores[host]) as s:
            ship.ship(s, segs)
    # A retried upload whose confirmation was lost (h2): the store still says "meant", and
    # the next run sends the same key with the same bytes.
    more = records("h2", 50, seq0=10_000, t0=T0 + 5 * 10**9)
    with Store(stores["h2"]) as s:
        s.write(more)
        calls: list[tuple[str, bytes]] = []
        with monkeypatch.context() as m, pytest.raises(MeterError, match="cannot reach"):
            m.setattr(ship, "_put", _dying(ConnectionError("connection reset (the answer was lost)"), ship._put,
                                           seen=calls))
            ship.ship(s, segs)
        again = ship.ship(s, segs)
        assert again.retried == 1 and [f"fleet/segs/{k}" for k in again.segments] == [calls[0][0]]
        assert s3fs.S3FileSystem().cat_file(calls[0][0]) == calls[0][1]
    # A duplicate upload of a segment (h1's, put again by hand) is the same object.
    fs = s3fs.S3FileSystem()
    first = sorted(fs.glob("fleet/segs/host=h1/*.parquet"))[0]
    fs.pipe_file(first, fs.cat_file(first))
    # h5 again, after its kill: whatever it had meant is sent, then the rest.
    res = subprocess.run([*meter_bin, "ship", "--to", segs, "--store", str(stores["h5"])], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # The committer is killed after three commits (its fourth write never happens), and a
    # killed writer left a data file that no commit names: neither is billed twice or at all.
    import deltalake

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(deltalake, "write_deltalake", _dying(KeyboardInterrupt("committer killed"), write_deltalake,
                                                       after=3))
        fleet.commit(segs, table)
    fs.pipe_file("fleet/table/part-00000-orphan-c000.snappy.parquet", fs.cat_file(first))
    done = fleet.commit(segs, table)
    assert len(done.added) > 0 and len(done.already) == 3 and not done.waiting
    assert fleet.commit(segs, table).added == []  # a replay adds nothing
    _check_fleet(table, stores)
    # A late segment for an hour already billed: h4 stores more usage of that hour.
    with Store(stores["h4"]) as s:
        s.write(records("h4", 40, seq0=50_000, t0=T0 + 2 * 10**9))
        ship.ship(s, segs)
    before = merge_periods(fleet.fleet_usage(table, *SPAN, 3600 * 10**9))
    fleet.commit(segs, table)
    after = merge_periods(fleet.fleet_usage(table, *SPAN, 3600 * 10**9))
    assert after["acme"]["cpu_ns"] - before["acme"]["cpu_ns"] == 40 * 700_000
    _check_fleet(table, stores)
    # meter bill --fleet (DuckDB here, a local Dask cluster) = the same invoices.
    prices = tmp_path / "p.toml"
    prices.write_text('currency = "EUR"\n[prices]\ncpu_second = "0.5"\ngigacycle = "0.1"\nkwh = "360"\ngb = "0.5"\n'
                      'million_packets = "1"\n[tenant.globex]\ncpu_second = "0.2"\n')
    # A running Dask cluster (its scheduler's address, as a real one is given): its workers are
    # this process's threads, reading the table from the same S3 endpoint.
    from distributed import LocalCluster

    outs = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:
        for extra in ([], ["--engine", "dask"], ["--scheduler", cluster.scheduler_address]):
            res = subprocess.run([*meter_bin, "bill", "--prices", str(prices), "--fleet", table, "--from",
                                  str(SPAN[0] // 10**9), "--to", str(SPAN[1] // 10**9), "--format", "json", *extra],
                                 env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stderr
            outs.append(res.stdout)
    assert outs[0] == outs[1] == outs[2]
    assert [i["subtotal"] for i in __import__("json").loads(outs[0])] == [
        f"{i.subtotal:.10f}" for i in invoices(merge_periods(_host_usage(stores)), SHEET, *SPAN)]


def test_storage_errors_are_one_sentence(s3, tmp_path, meter_bin):
    import s3fs
    from deltalake import write_deltalake

    stores = _stores(tmp_path)
    with Store(stores["h1"]) as s:
        # A bucket that does not exist.
        with pytest.raises(MeterError, match="bucket of s3://nobucket/segs does not exist"):
            ship.ship(s, "s3://nobucket/segs")
    # An endpoint nobody listens on.
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"}
    res = subprocess.run([*meter_bin, "ship", "--to", "s3://fleet/x", "--store", str(stores["h1"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "cannot reach" in res.stderr, res.stderr
    # Credentials the endpoint refuses (an endpoint that checks them: moto with IAM auth on).
    p, url = _moto({**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "wrong"}
        res = subprocess.run([*meter_bin, "ship", "--to", "s3://fleet/x", "--store", str(stores["h1"])], env=env,
                             capture_output=True, text=True, timeout=300)
    finally:
        p.kill()
        p.wait()
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "refused the credentials" in res.stderr
    # A damaged segment is named.
    fs = s3fs.S3FileSystem()
    bad = "fleet/dmg/" + ship.segment_key("h9", 0, 9, "ab")
    fs.pipe_file(bad, b"PAR1 not really parquet")
    with pytest.raises(MeterError, match=f"segment {bad} is damaged"):
        fleet.commit("s3://fleet/dmg", "s3://fleet/dmgtable")
    # A table written by another schema version is refused, not appended to.
    import pyarrow as pa

    write_deltalake("s3://fleet/other", pa.table({"x": [1]}), description="someone else's table",
                    storage_options={"AWS_S3_ALLOW_UNSAFE_RENAME": "true"})
    with Store(stores["h2"]) as s:
        ship.ship(s, "s3://fleet/segs2")
    with pytest.raises(MeterError, match="another schema version"):
        fleet.commit("s3://fleet/segs2", "s3://fleet/other")
    with pytest.raises(MeterError, match="no Delta table"):
        fleet.fleet_usage("s3://fleet/none", *SPAN, 3600 * 10**9)
    # A Dask scheduler nobody runs.
    fleet.commit("s3://fleet/segs2", "s3://fleet/t2")
    with pytest.raises(MeterError, match="cannot reach the Dask scheduler"):
        fleet.fleet_usage("s3://fleet/t2", *SPAN, 3600 * 10**9, scheduler=f"tcp://127.0.0.1:{_free_port()}")


def test_segments_are_deterministic_and_local_files_private(tmp_path):
    stores = _stores(tmp_path)
    out = tmp_path / "segs"
    with Store(stores["h3"]) as s:
        done = ship.ship(s, str(out), raw=True)
        again = ship.segment_bytes(s, "h3", *ship.parse_key(done.segments[0])[1:])[0]
        assert ship.ship(s, str(out)).segments == []
        # From the chunks' kept 1 s rollups (binary, MTRG1), from them as JSON rows (a store
        # written before MTRG1), or from the raw records (a store written before chunks
        # kept them): the same bytes.
        kept = s.db.execute("SELECT host, first_seq, data FROM chunk_rollups").fetchall()
        assert kept and all(bytes(data[:5]) == b"MTRG1" for _, _, data in kept)
        for host, first, data in kept:
            as_json = json.dumps(store_mod._decode_groups(data).tuples(), separators=(",", ":"))
            s.db.execute("UPDATE chunk_rollups SET data = ? WHERE host = ? AND first_seq = ?", (as_json, host, first))
        assert ship.segment_bytes(s, "h3", *ship.parse_key(done.segments[0])[1:])[0] == again
        s.db.execute("DELETE FROM chunk_rollups")
        assert ship.segment_bytes(s, "h3", *ship.parse_key(done.segments[0])[1:])[0] == again
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert files and all(p.stat().st_mode & 0o777 == 0o600 for p in files)
    assert (out / done.segments[0]).read_bytes() == again
    assert (out / "raw" / done.segments[0]).exists()
    # Every record is in exactly one segment: the segments' record counts are the store's.
    import pyarrow.parquet as pq

    n = sum(sum(pq.read_table(out / k)["records"].to_pylist()) for k in done.segments)
    with Store(stores["h3"]) as s:
        assert n == len(s.records())
    # Seqs the store no longer holds (expired before shipping, or lost to a kill) are said.
    with Store(stores["h3"]) as s:
        assert done.missing == 0
        s.write(records("h3", 5, seq0=ship.parse_key(done.segments[-1])[2] + 101))
        later = ship.ship(s, str(out))
    assert later.missing == 100 and later.rows > 0
