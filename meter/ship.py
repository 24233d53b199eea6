"""Shipping: a host's usage leaves it as immutable Parquet segments of exact 1 s rollups.

A *segment* is the 1 s rollup (integer sums per host, tenant, compartment
and second; see :func:`meter.sinks.store.rollup_rows`) of one run of the
store's records, seq ``first``..``last``. Its key is deterministic,
``host=H/seg-<first>-<last>-<boot id>.parquet``, and its bytes are too (rows
sorted, one writer setting), so a retried upload writes identical bytes to
the same key. The store remembers each segment *before* it is uploaded
(``shipments``): a meter killed mid-upload sends the same segment again at
its next run, never a different range, so no record is ever in two
segments and none is skipped. Object storage is anything fsspec reaches:
``file://`` (mode 0600 files, written whole and renamed) or ``s3://``
through s3fs (endpoint, credentials and region from the usual AWS
variables). See docs/architecture.md, "Fleet".
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

from .errors import MeterError
from .host import root as host_root
from .paths import private_dir, write_whole
from .sinks.parquet import record_table
from .sinks.store import ROLLUP_COLUMNS, Store, rollup_rows

__all__ = [
    "SEGMENT_COLUMNS",
    "SEGMENT_SCHEMA",
    "Shipped",
    "is_local",
    "open_url",
    "read_segment",
    "segment_bytes",
    "segment_key",
    "ship",
    "storage_error",
]

#: Bumped whenever the segment columns change; the Delta table says which it holds.
SEGMENT_SCHEMA = "meter rollup_1s segments v2"
SEGMENT_COLUMNS = ("host", "tenant", "compartment", "period_start_ns", "records", *ROLLUP_COLUMNS,
                   "first_seq", "last_seq")
#: Records in one segment at most (about 100 s of 1 ms records of 20 busy compartments).
MAX_SEGMENT_RECORDS = 2_000_000
_KEY = re.compile(r"host=(?P<host>[^/]+)/seg-(?P<first>\d{16})-(?P<last>\d{16})-(?P<boot>[0-9a-f]+)\.parquet$")
_SECOND = 1_000_000_000


def storage_error(err: BaseException, url: str, what: str) -> MeterError:
    """One sentence for a storage failure: unreachable, missing bucket, refused credentials, or else."""
    text = " ".join(str(e) for e in _chain(err))
    low = text.lower()
    if any(s in low for s in ("nosuchbucket", "bucket does not exist", "specified bucket")):
        return MeterError(f"{what}: the bucket of {url} does not exist: create it, or fix the URL")
    remote = "://" in url and not url.startswith("file://")
    if any(s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "access denied",
                              "access key id", "forbidden", "403", "credentials")) or (
            remote and isinstance(err, PermissionError)):
        return MeterError(f"{what}: {url} refused the credentials: check AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or the profile)")
    if any(s in low for s in ("connect", "unreachable", "timed out", "name or service not known", "refused")):
        return MeterError(f"{what}: cannot reach the storage endpoint of {url}: check AWS_ENDPOINT_URL and the network")
    if isinstance(err, FileNotFoundError):
        return MeterError(f"{what}: {url} does not exist: create it, or fix the URL")
    if isinstance(err, PermissionError):
        return MeterError(f"{what}: no permission to write {url}")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return MeterError(f"{what}: {url}: {first[:300]}")


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and len(out) < 8:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a plain path is ``file://``."""
    try:
        import fsspec
    except ImportError as err:
        raise MeterError("shipping needs fsspec (and s3fs for s3://): pip install -e .[fleet]") from err
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise MeterError(f"cannot use {url}: {err}") from err
    return fs, path.rstrip("/")


def is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def segment_key(host: str, first_seq: int, last_seq: int, boot: str) -> str:
    if "/" in host or not host:
        raise MeterError(f"host name {host!r} cannot name a segment")
    return f"host={host}/seg-{first_seq:016d}-{last_seq:016d}-{boot}.parquet"


def parse_key(key: str) -> tuple[str, int, int] | None:
    """(host, first seq, last seq) of a segment key (or path ending in one); None if it is not one."""
    m = _KEY.search(key)
    return (m["host"], int(m["first"]), int(m["last"])) if m else None


def segment_bytes(store: Store, host: str, first_seq: int, last_seq: int) -> tuple[bytes, int]:
    """The segment's Parquet bytes (deterministic) and its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = store.rollups_seq(host, first_seq, last_seq)
    if rows is None:  # a store written before chunks kept their rollups: from the raw records
        rows = rollup_rows(store.records_seq(host, first_seq, last_seq), _SECOND)
    cols: list[Any] = list(zip(*rows)) if rows else [() for _ in range(5 + len(ROLLUP_COLUMNS))]
    data = {name: pa.array(list(col), type=pa.string() if i < 3 else pa.int64())
            for i, (name, col) in enumerate(zip(SEGMENT_COLUMNS, cols))}
    data["first_seq"] = pa.array([first_seq] * len(rows), type=pa.int64())
    data["last_seq"] = pa.array([last_seq] * len(rows), type=pa.int64())
    buf = io.BytesIO()
    pq.write_table(pa.table(data), buf, compression="zstd", write_statistics=True)
    return buf.getvalue(), len(rows)


def _raw_bytes(store: Store, host: str, first_seq: int, last_seq: int) -> bytes:
    """The raw 1 ms records of a segment's range, as Parquet (for audit, on request)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(record_table(store.records_seq(host, first_seq, last_seq)), buf, compression="zstd")
    return buf.getvalue()


def read_segment(fs: Any, path: str) -> Any:
    """A segment as an Arrow table; a damaged one is a MeterError naming it."""
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as err:  # any reader failure names the file
        raise MeterError(f"segment {path} is damaged or unreadable ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}): re-ship it from its host "
                         "(meter ship) or remove it") from err
    if tuple(table.column_names) != SEGMENT_COLUMNS:
        raise MeterError(f"segment {path} has columns of another schema ({', '.join(table.column_names[:6])}, ...)")
    return table


def _put(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` at ``path`` whole: locally 0600 through a temporary name, else one PUT."""
    if is_local(fs):
        private_dir(Path(path).parent)
        write_whole(path, data, what="segment")
    else:
        fs.pipe_file(path, data)


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), hex only."""
    try:
        text = (host_root() / "proc/sys/kernel/random/boot_id").read_text()
    except OSError:
        return "0"
    return re.sub(r"[^0-9a-f]", "", text.lower()) or "0"


@dataclasses.dataclass
class Shipped:
    """What one :func:`ship` did."""

    segments: list[str] = dataclasses.field(default_factory=list)
    rows: int = 0
    retried: int = 0
    #: Seqs the new segments cover that the store holds no record of (expired before they were
    #: shipped, or a batch lost to a kill): that usage is in no segment, and is said.
    missing: int = 0


def ship(store: Store, url: str, *, storage_options: dict[str, Any] | None = None, raw: bool = False,
         max_records: int = MAX_SEGMENT_RECORDS) -> Shipped:
    """Ship every record of ``store`` not shipped yet, as segments under ``url``.

    First any segment meant but not confirmed (a run killed mid-upload) is
    sent again, same range, same key, same bytes; then the records after
    the last segment, up to ``max_records`` a segment. ``raw`` also sends
    each segment's raw records under ``url/raw/`` (same name).
    """
    fs, base = open_url(url, storage_options)
    # Where it goes must take a segment before any is meant: a bad URL changes nothing.
    try:
        if is_local(fs):
            private_dir(base)
        else:
            fs.ls(base.split("/", 1)[0])  # the bucket: missing, unreachable or refusing credentials
    except MeterError:
        raise
    except Exception as err:  # translated at the boundary
        raise storage_error(err, url, "cannot ship") from err
    done = Shipped()
    boot = boot_id()

    def send(host: str, first: int, last: int, key: str) -> None:
        data, n = segment_bytes(store, host, first, last)
        try:
            _put(fs, f"{base}/{key}", data)
            if raw:
                _put(fs, f"{base}/raw/{key}", _raw_bytes(store, host, first, last))
        except MeterError:
            raise
        except Exception as err:  # translated at the boundary
            raise storage_error(err, url, f"cannot ship {key}") from err
        store.shipped(host, first)
        done.segments.append(key)
        done.rows += n

    for host in store.hosts():
        shipments = store.shipments(host)
        for s in shipments:
            if not s["done"]:
                send(host, s["first_seq"], s["last_seq"], s["key"])
                done.retried += 1
        after = max((s["last_seq"] for s in shipments), default=-1)
        ranges = store.chunk_ranges(host, after)
        while ranges:
            # Segments of a host cover every seq from 0 on, gaps included (seqs of a batch lost
            # to a kill, or expired before shipping), so the committer can tell a missing one.
            first = after + 1
            last, count = ranges[0][1], ranges[0][1] - max(first, ranges[0][0]) + 1
            for a, b in ranges[1:]:
                if count + (b - a + 1) > max_records:
                    break
                last, count = b, count + (b - a + 1)
            done.missing += (last - first + 1) - count
            key = segment_key(host, first, last, boot)
            store.ship_intent(host, first, last, key)
            send(host, first, last, key)
            after = last
            ranges = [r for r in ranges if r[1] > last]
    return done
