"""File sink: records as JSON Lines or CSV, to a file or standard output.

Keys and columns are exactly :data:`meter.records.FIELDS`; unavailable
numbers are ``null`` (JSON) or empty (CSV), never 0. Files are created
mode 0600 (records are billing data) and flushed after every batch, so an
interrupted run keeps every batch already written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import IO

import numpy as np

from ..errors import SinkError
from ..paths import open_private
from ..records import FIELDS, to_dicts
from ..report import csv_cells

__all__ = ["FORMATS", "FileSink"]

FORMATS = ("jsonl", "csv")


class FileSink:
    """Write record batches to ``path`` (``-`` for stdout) in ``fmt``."""

    def __init__(self, path: str, fmt: str = "jsonl", *, append: bool = False) -> None:
        if fmt not in FORMATS:
            raise SinkError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}", target=path)
        self.path = path
        self.fmt = fmt
        self.count = 0
        self._own = path != "-"
        if self._own:
            fd = open_private(path, os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC), what="records")
            self._out: IO[str] = os.fdopen(fd, "w", newline="")
        else:
            self._out = sys.stdout
        self._csv = None
        if fmt == "csv":
            self._csv = csv.writer(self._out, lineterminator="\n")
            if not (append and self._own and os.path.getsize(path) > 0):
                self._csv.writerow(FIELDS)

    def write(self, batch: np.ndarray) -> None:
        """Append a batch and flush it."""
        try:
            if self._csv is not None:
                for row in to_dicts(batch):
                    self._csv.writerow(csv_cells("" if v is None else v for v in row.values()))
            else:
                buf = io.StringIO()
                for row in to_dicts(batch):
                    buf.write(json.dumps(row, separators=(",", ":")))
                    buf.write("\n")
                self._out.write(buf.getvalue())
            self._out.flush()
        except BrokenPipeError as err:
            raise SinkError(f"the reader of {self.path} went away", target=self.path) from err
        except OSError as err:
            raise SinkError(f"cannot write records to {self.path}: {err.strerror}", target=self.path) from err
        self.count += len(batch)

    def close(self) -> None:
        if self._own:
            self._out.close()
