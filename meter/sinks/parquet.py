"""Sink: Parquet files partitioned by host and date, for fleet-wide billing.

``root/host=H/date=YYYY-MM-DD/part-<first seq>.parquet``; columns are the
record fields (``host`` lives in the partition path), unavailable numbers
are Parquet nulls. Many hosts' trees can be merged into one directory and
billed with :func:`meter.bill.usage_from_parquet` (DuckDB) or any engine
that reads hive-partitioned Parquet.
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MeterError
from ..paths import private_dir, write_whole
from ..records import COUNTER_COLUMNS, FIELDS, NULL, TEXT_FIELDS, distinct, factorize

__all__ = ["record_table", "write_parquet"]


def record_table(batch: np.ndarray, *, skip: tuple[str, ...] = ()) -> Any:
    """A batch as an Arrow table: record columns (but ``skip``), NULL counters as Parquet nulls."""
    try:
        import pyarrow as pa
    except ImportError as err:
        raise MeterError("Parquet needs pyarrow: pip install -e .[parquet]") from err
    cols = {}
    for name in FIELDS:
        if name in skip:
            continue
        col = batch[name]
        if name in COUNTER_COLUMNS:
            cols[name] = pa.array(col, mask=col == NULL, type=pa.int64())
        elif name in TEXT_FIELDS:
            # A dictionary-encoded column written as plain strings ("" as null).
            table, index = factorize(col)
            strings = pa.array([v if v else None for v in table], type=pa.string())
            cols[name] = pa.DictionaryArray.from_arrays(pa.array(index, pa.int32()), strings).cast(pa.string())
        else:
            cols[name] = pa.array(col)
    return pa.table(cols)


def write_parquet(batch: np.ndarray, root: str | Path) -> list[Path]:
    """Write a batch under ``root``; returns the files written (mode 0600)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MeterError("Parquet export needs pyarrow: pip install -e .[parquet]") from err
    root = Path(root)
    written: list[Path] = []
    if len(batch) == 0:
        return written
    days = (batch["window_start_ns"] // 86_400_000_000_000).astype(np.int64)
    hosts, index = factorize(batch["host"])  # sorted by name
    for h, host in enumerate(hosts):
        for day in distinct(days[index == h]).tolist():
            part = batch[(index == h) & (days == day)]
            date = datetime.date(1970, 1, 1) + datetime.timedelta(days=int(day))
            directory = private_dir(root / f"host={host}" / f"date={date.isoformat()}")
            path = directory / f"part-{int(part['seq'].min()):012d}.parquet"
            buf = io.BytesIO()
            pq.write_table(record_table(part, skip=("host",)), buf)
            write_whole(path, buf.getvalue(), what="export")
            written.append(path)
    return written
