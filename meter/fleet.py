"""The fleet: segments committed exactly once into a Delta Lake table, and billed from it.

:func:`commit` adds each host's segments (see :mod:`meter.ship`) to a
Delta table in seq order, one Delta commit per segment carrying the
idempotent application transaction (app id = host, version = the
segment's last seq). A segment whose last seq is at or below the host's
committed version is already in (a re-sent or replayed segment, or a
commit whose answer was lost) and is skipped; a segment that does not
start right after it waits for the missing one, so nothing is committed
out of order and nothing is skipped (a host's segments cover its seqs from 0 on, without gaps). A late segment for an hour already
billed is a plain later commit. One committer per table: run
``meter commit`` as one central job (docs/architecture.md, "Fleet").

:func:`fleet_usage` reads the files the Delta log lists (never a
directory listing, so an uncommitted or orphaned file is never billed)
and sums them per charge period and resource with DuckDB (the
single-machine default) or Dask distributed (``scheduler`` = a real
cluster's address, or a local cluster), into the same usage
:mod:`meter.bill` prices for one host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from .errors import MeterError
from .ship import SEGMENT_COLUMNS, SEGMENT_SCHEMA, is_local, open_url, parse_key, read_segment, storage_error

__all__ = ["Committed", "commit", "fleet_usage", "table_files"]

_SUMS = tuple(SEGMENT_COLUMNS[5:-2])  # the rollup columns: counters and estimate counts
#: A local cluster's workers are processes (METER_DASK_PROCESSES=0: threads of this one).
_PROCESSES = os.environ.get("METER_DASK_PROCESSES", "1") != "0"


def _delta_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    opts = {k: str(v) for k, v in (storage_options or {}).items()}
    if url.startswith(("s3://", "s3a://")):
        # One committer per table (the module's rule) makes S3's rename safe.
        opts.setdefault("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    return opts


def _table(url: str, options: dict[str, str], *, must_exist: bool) -> Any:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        dt = DeltaTable(url, storage_options=options)
    except TableNotFoundError:
        if must_exist:
            raise MeterError(f"no Delta table at {url}: run meter commit first, or fix the URL") from None
        return None
    except Exception as err:  # translated at the boundary
        raise storage_error(err, url, "cannot open the Delta table") from err
    desc = dt.metadata().description
    if desc != SEGMENT_SCHEMA:
        raise MeterError(f"the Delta table at {url} was written by another schema version ({desc!r}, this meter "
                         f"writes {SEGMENT_SCHEMA!r}): give this meter a table of its own")
    return dt


@dataclasses.dataclass
class Committed:
    """What one :func:`commit` did: segments added, already in, and waiting for an earlier one."""

    added: list[str] = dataclasses.field(default_factory=list)
    already: list[str] = dataclasses.field(default_factory=list)
    waiting: list[str] = dataclasses.field(default_factory=list)


def commit(segments_url: str, table_url: str, *, storage_options: dict[str, Any] | None = None) -> Committed:
    """Commit every segment under ``segments_url`` not in the table at ``table_url`` yet."""
    try:
        from deltalake import CommitProperties, Transaction, write_deltalake
    except ImportError as err:
        raise MeterError("committing needs deltalake: pip install -e .[fleet]") from err
    fs, base = open_url(segments_url, storage_options)
    options = _delta_options(table_url, storage_options)
    if is_local(fs) and not fs.exists(base):
        raise MeterError(f"no segments at {segments_url}: it does not exist (meter ship --to writes there)")
    try:
        paths = fs.glob(f"{base}/host=*/seg-*.parquet")
    except Exception as err:  # translated at the boundary
        raise storage_error(err, segments_url, "cannot list the segments") from err
    by_host: dict[str, list[tuple[int, int, str]]] = {}
    for p in paths:
        parsed = parse_key(p)
        if parsed:
            by_host.setdefault(parsed[0], []).append((parsed[1], parsed[2], p))
    dt = _table(table_url, options, must_exist=False)
    out = Committed()
    for host in sorted(by_host):
        version = dt.transaction_version(host) if dt is not None else None
        for first, last, path in sorted(by_host[host]):
            name = path.rsplit("/", 1)[-1]
            if version is not None and last <= version:
                out.already.append(name)
                continue
            if first != (version + 1 if version is not None else 0):
                if version is not None and first <= version:
                    raise MeterError(f"segment {path} overlaps what {host} has committed (up to seq {version}): "
                                     "segments of one host never overlap; remove the stray one")
                out.waiting.append(name)  # an earlier segment of this host is not there yet
                continue
            table = read_segment(fs, path)
            try:
                write_deltalake(table_url, table, mode="append", storage_options=options,
                                description=SEGMENT_SCHEMA if dt is None else None,
                                commit_properties=CommitProperties(
                                    app_transactions=[Transaction(app_id=host, version=last)]))
            except Exception as err:  # translated at the boundary
                raise storage_error(err, table_url, f"cannot commit {name}") from err
            if dt is None:
                dt = _table(table_url, options, must_exist=True)
            else:
                dt.update_incremental()
            version = last
            out.added.append(name)
    return out


def table_files(table_url: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The data files the Delta log lists now (what a bill reads)."""
    dt = _table(table_url, _delta_options(table_url, storage_options), must_exist=True)
    return list(dt.file_uris())


def fleet_usage(table_url: str, start_ns: int, end_ns: int, period_ns: int, *, engine: str = "duckdb",
                scheduler: str | None = None, storage_options: dict[str, Any] | None = None,
                ) -> dict[int, dict[Any, dict[str, int | None]]]:
    """Usage per charge period and resource (tenant, host, compartment) from the committed
    files, as :func:`meter.bill.usage_from_store` gives it with ``by_resource=True``."""
    from .bill import usage_from_rollups

    files = table_files(table_url, storage_options=storage_options)
    if not files:
        return {}
    if engine == "dask" or scheduler:
        rows = _dask_sums(files, start_ns, end_ns, period_ns, scheduler, storage_options)
    elif engine == "duckdb":
        rows = _duckdb_sums(files, start_ns, end_ns, period_ns, storage_options)
    else:
        raise MeterError(f"unknown engine {engine!r}: use duckdb or dask")
    out: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(int(row.pop("p")), []).append(row)
    return {k: usage_from_rollups(v, by_resource=True) for k, v in sorted(out.items())}


def _duckdb_sums(files: list[str], start_ns: int, end_ns: int, period_ns: int,
                 storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    try:
        import duckdb
    except ImportError as err:
        raise MeterError("billing the fleet needs DuckDB: pip install -e .[fleet]") from err
    con = duckdb.connect()
    try:
        local = all(f.startswith(("file://", "/")) for f in files)
        if local:
            files = [f.removeprefix("file://") for f in files]
        else:  # object storage through fsspec: no DuckDB extension to download
            fs, _ = open_url(files[0], storage_options)
            con.register_filesystem(fs)
        sums = ", ".join(f"sum({c}) AS {c}" for c in _SUMS)
        sql = (f"SELECT period_start_ns // $period AS p, tenant, host, compartment, {sums} "
               f"FROM read_parquet($files) WHERE period_start_ns >= $start AND period_start_ns < $end "
               f"GROUP BY p, tenant, host, compartment ORDER BY p, tenant, host, compartment")
        cur = con.execute(sql, {"files": files, "start": start_ns, "end": end_ns, "period": period_ns})
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    except duckdb.Error as err:
        raise storage_error(err, files[0], "cannot bill the committed files") from err
    finally:
        con.close()


def _dask_sums(files: list[str], start_ns: int, end_ns: int, period_ns: int, scheduler: str | None,
               storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    try:
        import dask.dataframe as dd
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise MeterError("billing with Dask needs dask[dataframe] and distributed: pip install -e .[fleet]") from err
    cluster = None
    try:
        if scheduler:
            client = Client(scheduler, timeout="30s")
        else:
            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=_PROCESSES, host="127.0.0.1",
                                   dashboard_address=None, silence_logs=logging.ERROR)
            client = Client(cluster)
    except (OSError, ValueError, TimeoutError) as err:
        raise MeterError(f"cannot reach the Dask scheduler at {scheduler}: {str(err).splitlines()[0][:200]}: "
                         "give its address as tcp://HOST:8786") from err
    try:
        df = dd.read_parquet(files, columns=["host", "tenant", "compartment", "period_start_ns", *_SUMS],
                             storage_options=storage_options or None, dtype_backend="numpy_nullable")
        df = df[(df["period_start_ns"] >= start_ns) & (df["period_start_ns"] < end_ns)]
        df["p"] = df["period_start_ns"] // period_ns
        result = df.groupby(["p", "tenant", "host", "compartment"])[list(_SUMS)].sum(min_count=1, split_out=1)
        frame = client.compute(result).result().reset_index()
    except MeterError:
        raise
    except Exception as err:  # translated at the boundary
        raise storage_error(err, files[0], "cannot bill the committed files with Dask") from err
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    rows = []
    for rec in frame.to_dict("records"):
        rows.append({k: (None if _isna(v) else (int(v) if k not in ("tenant", "host", "compartment") else v))
                     for k, v in rec.items()})
    return rows


def _isna(v: Any) -> bool:
    import pandas as pd

    return bool(pd.isna(v))
