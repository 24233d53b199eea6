"""Where meter keeps files: an environment variable wins, then root's
system directory, then the user's XDG directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["meter_path"]


def meter_path(env: str, as_root: str, xdg_env: str, xdg_default: str, *rel: str) -> Path:
    """``$env`` if set; ``as_root`` for root; else ``$xdg_env`` (or ~/``xdg_default``)/meter/``rel``."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    if os.geteuid() == 0:
        return Path(as_root)
    base = os.environ.get(xdg_env) or str(Path.home() / xdg_default)
    return Path(base, "meter", *rel)
