"""Sinks: where record batches go (files, store, exporter, top).

Every sink that takes batches one by one (the files, the store) is a
:class:`Sink`; ``meter record`` writes to whichever it was given.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["Sink"]


class Sink(Protocol):
    """Takes record batches in order; ``count`` is how many records it has stored."""

    count: int

    def write(self, batch: np.ndarray) -> object: ...

    def close(self) -> None: ...
