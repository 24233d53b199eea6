"""The host's filesystem, in one place: one root override, small read helpers, TOML.

Every file meter reads about the host (``/proc``, ``/sys``, ``/run``,
``/lib/modules``) is found under :func:`root`: ``/`` unless
``METER_HOST_ROOT`` names another directory (a container that mounts the
host's at ``/host``, or a test's fake tree). Modules take a ``root``
argument only to override it for one call; ``None`` means this root.

Config files (topology, price sheets) are read with :func:`load_toml`:
bytes decoded as UTF-8 whatever the locale, and every failure — missing,
unreadable, not UTF-8, not TOML — a :class:`~meter.errors.ConfigError`
naming the file (and the line, when TOML knows it).
"""

from __future__ import annotations

import os
import re
import time
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["ROOT_ENV", "load_toml", "path", "read_int", "read_text", "realtime_offset_ns", "root"]

#: The environment variable naming the host's root directory.
ROOT_ENV = "METER_HOST_ROOT"


def root(override: str | Path | None = None) -> Path:
    """The host's root: ``override``, else ``$METER_HOST_ROOT``, else ``/``."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get(ROOT_ENV) or "/")


def path(rel: str, override: str | Path | None = None) -> Path:
    """``rel`` (like ``"sys/class/net"``, no leading slash) under the host's root."""
    return root(override) / rel.lstrip("/")


def read_text(p: str | Path, default: str | None = None) -> str | None:
    """A small kernel or sysfs file's text, stripped; ``default`` if it cannot be read."""
    try:
        return Path(p).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return default


def read_int(p: str | Path, default: int | None = None) -> int | None:
    """A file holding one integer (sysfs style); ``default`` if unreadable or not a number."""
    text = read_text(p)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def load_toml(p: str | Path, what: str = "file") -> tuple[dict[str, Any], str]:
    """(data, text) of a TOML ``what`` (e.g. "topology", "price sheet"), or ConfigError."""
    p = Path(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no such {what} file", path=str(p)) from None
    except IsADirectoryError:
        raise ConfigError(f"is a directory, not a {what}", path=str(p)) from None
    except OSError as err:
        raise ConfigError(f"cannot read this {what}: {err.strerror}", path=str(p)) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"this {what} is not UTF-8 text (byte {err.start})", path=str(p), line=line) from None
    try:
        return tomllib.loads(text), text
    except RecursionError:
        raise ConfigError(f"invalid TOML: this {what} is nested too deeply", path=str(p)) from None
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) or "invalid TOML"
        raise ConfigError(f"invalid TOML: {reason}", path=str(p), line=int(m.group(1)) if m else None) from None


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, read as tightly as Python allows
    (the kernel stamps windows in monotonic time; records carry wall time)."""
    best = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        r = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, r - (m0 + m1) // 2)
    assert best is not None
    return best[1]
