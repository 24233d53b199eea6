"""Network namespaces: netlink sockets inside named ones.

Named namespaces are the files under ``/run/netns`` (``ip netns add``).
``iproute(name)`` returns a pyroute2 ``IPRoute`` whose socket lives in that
namespace, and never creates a namespace that is not there.
"""

from __future__ import annotations

from typing import Any

from . import host
from .errors import MeterError

__all__ = ["NETNS_DIR", "NetnsError", "iproute"]

NETNS_DIR = host.path("run/netns")  # where `ip netns` keeps named namespaces


class NetnsError(MeterError):
    """A named network namespace is missing or cannot be entered."""

    def __init__(self, message: str, *, netns: str) -> None:
        self.netns = netns
        super().__init__(message)


def iproute(name: str | None) -> Any:
    """A pyroute2 IPRoute in network namespace ``name`` (None: meter's own)."""
    from pyroute2 import IPRoute

    if name is None:
        return IPRoute()
    if not (NETNS_DIR / name).exists():
        raise NetnsError(f"network namespace {name!r} does not exist (no {NETNS_DIR / name})", netns=name)
    try:
        return IPRoute(netns=name, flags=0)  # flags=0: never create it
    except OSError as err:
        raise NetnsError(f"cannot enter network namespace {name!r}: {err}", netns=name) from err
