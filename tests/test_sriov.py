"""SR-IOV VF counters: netlink messages encoded with pyroute2, through the live parsing path."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from meter.records import code, text
from meter.sources.sriov import VFSource, parse_vf_stats


def link_message(pf: str, vfs: dict[int, tuple[int, int, int, int]]) -> ifinfmsg:
    """An RTM_NEWLINK for ``pf`` as the kernel sends it with RTEXT_FILTER_VF, encoded then decoded."""
    infos = []
    for vf, (rxp, rxb, txp, txb) in vfs.items():
        stats = [["IFLA_VF_STATS_RX_PACKETS", rxp], ["IFLA_VF_STATS_TX_PACKETS", txp],
                 ["IFLA_VF_STATS_RX_BYTES", rxb], ["IFLA_VF_STATS_TX_BYTES", txb],
                 ["IFLA_VF_STATS_RX_DROPPED", 3], ["IFLA_VF_STATS_TX_DROPPED", 4]]
        infos.append(["IFLA_VF_INFO", {"attrs": [["IFLA_VF_MAC", {"vf": vf, "mac": f"02:00:00:00:00:{vf:02x}"}],
                                                 ["IFLA_VF_STATS", {"attrs": stats}]]}])
    msg = ifinfmsg()
    msg["index"] = 7
    msg["attrs"] = [["IFLA_IFNAME", pf], ["IFLA_NUM_VF", len(vfs)], ["IFLA_VFINFO_LIST", {"attrs": infos}]]
    msg.encode()
    wire = ifinfmsg(bytes(msg.data))
    wire.decode()
    return wire


class FakeKernel:
    """Holds each PF's VF counters; answers get_links like the kernel would."""

    def __init__(self) -> None:
        self.pfs: dict[str, dict[int, tuple[int, int, int, int]]] = {}

    def get_links(self, pf: str) -> list[ifinfmsg]:
        return [link_message(pf, self.pfs[pf])] if pf in self.pfs else []


def test_parse_reads_every_vf_and_drops():
    stats = parse_vf_stats(link_message("enp3s0f0", {0: (1, 2, 3, 4), 3: (10, 20, 30, 40)}))
    assert stats[3].as_tuple() == (10, 20, 30, 40)
    assert (stats[0].rx_dropped, stats[0].tx_dropped) == (3, 4)


def test_deltas_resets_and_vanished_vfs(caplog):
    k = FakeKernel()
    k.pfs["pf0"] = {1: (100, 1000, 50, 500), 2: (7, 70, 7, 70)}
    src = VFSource([(10, "pf0", 1), (11, "pf0", 2)], get_links=k.get_links)
    assert src.poll() == {10: (0, 0, 0, 0), 11: (0, 0, 0, 0)}  # nothing since the baseline
    k.pfs["pf0"] = {1: (150, 1600, 60, 600), 2: (9, 90, 7, 70)}
    assert src.poll() == {10: (50, 600, 10, 100), 11: (2, 20, 0, 0)}
    # VF 1 is reset: its counters start again from zero.
    k.pfs["pf0"] = {1: (5, 50, 1, 10), 2: (9, 90, 7, 70)}
    assert src.poll()[10] == (5, 50, 1, 10)
    assert src.resets == 1
    # VF 2 vanishes: logged once, no crash, nothing counted; it comes back as a new baseline.
    k.pfs["pf0"] = {1: (6, 60, 1, 10)}
    assert 11 not in src.poll()
    assert 11 not in src.poll()
    assert caplog.text.count("VF 2 of pf0 is not there") == 1
    k.pfs["pf0"] = {1: (6, 60, 1, 10), 2: (1, 10, 1, 10)}
    assert 11 not in src.poll()  # back: a new baseline
    k.pfs["pf0"] = {1: (6, 60, 1, 10), 2: (3, 30, 1, 10)}
    assert src.poll()[11] == (2, 20, 0, 0)
    # The whole PF vanishes.
    del k.pfs["pf0"]
    assert src.poll() == {}


def test_two_vfs_of_one_compartment_add_up():
    k = FakeKernel()
    k.pfs["pf0"] = {1: (0, 0, 0, 0)}
    k.pfs["pf1"] = {4: (0, 0, 0, 0)}
    src = VFSource([(5, "pf0", 1), (5, "pf1", 4)], get_links=k.get_links)
    k.pfs["pf0"] = {1: (1, 100, 2, 200)}
    k.pfs["pf1"] = {4: (10, 1000, 20, 2000)}
    assert src.poll() == {5: (11, 1100, 22, 2200)}


def test_switchdev_representor_when_the_pf_reports_no_stats(tmp_path):
    sysfs = tmp_path / "net"
    for dev, switch, port, stats in (("pf0", "abcd", "p0", None), ("pf0vf3", "abcd", "pf0vf3", (11, 1100, 22, 2200)),
                                     ("other", "ffff", "pf0vf3", (9, 9, 9, 9))):
        d = sysfs / dev
        (d / "statistics").mkdir(parents=True)
        (d / "phys_switch_id").write_text(switch + "\n")
        (d / "phys_port_name").write_text(port + "\n")
        if stats:
            for name, v in zip(("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"), stats):
                (d / "statistics" / name).write_text(f"{v}\n")
    k = FakeKernel()
    k.pfs["pf0"] = {}
    src = VFSource([(1, "pf0", 3)], get_links=k.get_links, sysfs=sysfs)
    assert src.source == "representor"
    (sysfs / "pf0vf3/statistics/rx_packets").write_text("15\n")  # the eswitch got 4 more from the VF
    assert src.poll() == {1: (0, 0, 4, 0)}  # the VF's tx


@pytest.mark.bpf
def test_vf_counts_land_in_records(tmp_path, cgroups, cgroup_mount):
    from meter import NULL, Topology
    from meter.engine import Meter

    cg = cgroups.make("vm")
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[tenant]]\nname = "acme"\n[[tenant.compartment]]\nname = "vm"\n'
                   f'cgroup = "{cg.relative_to(cgroup_mount)}"\nvfs = [{{ pf = "pf0", vf = 3 }}]\n')
    k = FakeKernel()
    k.pfs["pf0"] = {3: (1000, 10_000, 2000, 20_000)}
    with Meter(Topology.from_file(cfg), vf_links=k.get_links, drain_interval=0.1, batch_interval=0.1) as meter:
        batches = []
        for i, batch in enumerate(meter.batches(0.6)):
            batches.append(batch)
            k.pfs["pf0"] = {3: (1000 + 10 * (i + 1), 10_000 + 100 * (i + 1), 2000, 20_000 + 7 * (i + 1))}
            time.sleep(0.01)
    batch = np.concatenate(batches)
    mine = batch[batch["tenant"] == code("acme")]
    total_rx = int(mine["vf_rx_packets"].sum())
    last_i = max(0, len(batches) - 2)
    assert total_rx in (10 * (last_i + 1), 10 * (last_i + 2))
    assert set(text(mine, "vf_source")) == {"vf"}
    assert np.all(batch["vf_rx_packets"][batch["tenant"] == code("idle")] == NULL)
