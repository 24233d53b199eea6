"""Source: SR-IOV VF counters, polled through netlink (and representors).

A compartment owns VFs as ``{pf, vf}``. At every drain the source asks the
kernel for each PF with ``RTM_GETLINK`` and ``IFLA_EXT_MASK =
RTEXT_FILTER_VF`` (pyroute2 ``get_links(..., ext_mask=1)``) and reads
``IFLA_VFINFO_LIST`` -> ``IFLA_VF_INFO`` -> ``IFLA_VF_STATS`` (packets,
bytes, drops). In switchdev mode a VF's traffic is also seen on its
*representor* netdev (``phys_port_name`` ``pfNvfM`` under the PF's switch),
whose interface counters are read when the PF reports no VF stats.

Counts are cumulative in the kernel; the source returns deltas since its
previous poll, so they have the polling resolution (the drain interval),
not the window's. A counter that goes backwards (VF reset) starts over
from its new value; a VF that vanishes is logged once and counts nothing
until it returns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import host

__all__ = ["VF_FIELDS", "VFCounters", "VFSource", "parse_vf_stats"]

log = logging.getLogger("meter.sriov")

RTEXT_FILTER_VF = 1
#: Record fields filled by this source, in VFCounters order.
VF_FIELDS = ("vf_rx_packets", "vf_rx_bytes", "vf_tx_packets", "vf_tx_bytes")


@dataclasses.dataclass(frozen=True)
class VFCounters:
    """One VF's cumulative counters as the kernel reports them."""

    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    rx_dropped: int = 0
    tx_dropped: int = 0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.rx_packets, self.rx_bytes, self.tx_packets, self.tx_bytes)


def parse_vf_stats(msg: Any) -> dict[int, VFCounters]:
    """VF number -> counters from one RTM_NEWLINK message of a PF."""
    out: dict[int, VFCounters] = {}
    vflist = msg.get_attr("IFLA_VFINFO_LIST")
    if vflist is None:
        return out
    for info in vflist.get_attrs("IFLA_VF_INFO"):
        mac = info.get_attr("IFLA_VF_MAC")
        stats = info.get_attr("IFLA_VF_STATS")
        if mac is None or stats is None:
            continue

        def get(name: str, stats: Any = stats) -> int:
            return int(stats.get_attr(f"IFLA_VF_STATS_{name}") or 0)

        out[int(mac["vf"])] = VFCounters(get("RX_PACKETS"), get("RX_BYTES"), get("TX_PACKETS"), get("TX_BYTES"),
                                         get("RX_DROPPED"), get("TX_DROPPED"))
    return out


def _representor_counters(sysfs: Path, pf: str, vf: int) -> VFCounters | None:
    """Counters of the switchdev representor of ``pf``'s VF ``vf``, if there is one.

    A representor's rx is what the VF sent (the eswitch received it from
    the VF), so rx/tx swap to give the VF's own view.
    """
    try:
        switch = (sysfs / pf / "phys_switch_id").read_text().strip()
    except OSError:
        return None
    for dev in sysfs.iterdir():
        try:
            if (dev / "phys_switch_id").read_text().strip() != switch:
                continue
            port = (dev / "phys_port_name").read_text().strip()
        except OSError:
            continue
        if port.endswith(f"vf{vf}") and port.startswith("pf"):
            st = dev / "statistics"
            try:
                val = {k: int((st / k).read_text()) for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")}
            except (OSError, ValueError):
                return None
            return VFCounters(val["tx_packets"], val["tx_bytes"], val["rx_packets"], val["rx_bytes"])
    return None


class VFSource:
    """Polls the VFs of a topology; returns per-VF deltas since the last poll.

    ``vfs`` is a list of (key, pf, vf) where key is what the caller uses to
    find the compartment. ``get_links(pf)`` returns the RTM_NEWLINK
    messages for a PF name (the live default asks the kernel); tests pass
    messages encoded with pyroute2 through the same parsing.
    """

    def __init__(
        self,
        vfs: list[tuple[int, str, int]],
        *,
        get_links: Callable[[str], list[Any]] | None = None,
        sysfs: str | Path | None = None,
    ) -> None:
        self.vfs = vfs
        self._get_links = get_links or self._live_links
        self.sysfs = Path(sysfs) if sysfs is not None else host.path("sys/class/net")
        self._ipr: Any = None
        self._last: dict[tuple[str, int], tuple[int, int, int, int]] = {}
        self._missing: set[tuple[str, int]] = set()
        self.resets = 0
        self.source = "vf"
        self.poll()  # the baseline: counts before meter started are not billed

    def _live_links(self, pf: str) -> list[Any]:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        found = self._ipr.link_lookup(ifname=pf)
        if not found:
            return []
        return list(self._ipr.get_links(found[0], ext_mask=RTEXT_FILTER_VF))

    def _read(self) -> tuple[dict[tuple[str, int], VFCounters], str]:
        current: dict[tuple[str, int], VFCounters] = {}
        source = "vf"
        for pf in sorted({pf for _k, pf, _v in self.vfs}):
            try:
                msgs = self._get_links(pf)
            except Exception as err:  # noqa: BLE001  (netlink errors of a vanished PF)
                log.warning("meter: cannot read VF counters of %s: %s", pf, err)
                msgs = []
            stats: dict[int, VFCounters] = {}
            for msg in msgs:
                stats.update(parse_vf_stats(msg))
            for _key, vpf, vf in self.vfs:
                if vpf != pf:
                    continue
                counters = stats.get(vf)
                if counters is None:
                    counters = _representor_counters(self.sysfs, pf, vf)
                    if counters is not None:
                        source = "representor"
                if counters is not None:
                    current[(pf, vf)] = counters
        return current, source

    def poll(self) -> dict[int, tuple[int, int, int, int]]:
        """Deltas (rx_packets, rx_bytes, tx_packets, tx_bytes) per caller key since the last poll."""
        current, self.source = self._read()
        out: dict[int, tuple[int, int, int, int]] = {}
        for key, pf, vf in self.vfs:
            now = current.get((pf, vf))
            if now is None:
                if (pf, vf) not in self._missing:
                    log.warning("meter: VF %d of %s is not there; it counts nothing until it returns", vf, pf)
                    self._missing.add((pf, vf))
                self._last.pop((pf, vf), None)
                continue
            self._missing.discard((pf, vf))
            values = now.as_tuple()
            prev = self._last.get((pf, vf))
            self._last[(pf, vf)] = values
            if prev is None:
                continue  # first sight (start, or back after vanishing): a baseline
            if any(n < p for n, p in zip(values, prev)):
                self.resets += 1  # the VF was reset: count from zero
                prev = (0, 0, 0, 0)
            a = out.get(key, (0, 0, 0, 0))
            out[key] = (a[0] + values[0] - prev[0], a[1] + values[1] - prev[1],
                        a[2] + values[2] - prev[2], a[3] + values[3] - prev[3])
        return out

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
