"""Privileges: is this process root, or which capabilities does it hold.

Read from /proc/self/status (``CapEff``) through an overridable root, never
guessed from the user name.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import host
from .errors import PrivilegeError

__all__ = ["CAPABILITIES", "missing_capabilities", "require_bpf"]

#: The capabilities meter needs when not root, and their bit numbers.
CAPABILITIES = {"CAP_BPF": 39, "CAP_PERFMON": 38, "CAP_NET_ADMIN": 12}


def _effective(root: Path) -> int:
    try:
        for line in (root / "proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def missing_capabilities(root: str | Path | None = None, *, needed: tuple[str, ...] = tuple(CAPABILITIES)) -> list[str]:
    """Capabilities from ``needed`` this process lacks (none for root)."""
    if os.geteuid() == 0:
        return []
    eff = _effective(host.root(root))
    return [name for name in needed if not eff & (1 << CAPABILITIES[name])]


def require_bpf(root: str | Path | None = None) -> None:
    """Raise :class:`PrivilegeError` naming the first capability missing to load BPF."""
    missing = missing_capabilities(root, needed=("CAP_BPF", "CAP_PERFMON"))
    if missing:
        raise PrivilegeError(
            f"meter needs root or {missing[0]} to load BPF programs: run it with sudo, "
            "or grant CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN",
            capability=missing[0],
        )
