"""The engine against simulated sources: records, rows, conservation, reloads,
network, VF and energy fields, totals and sinks — no root, no kernel.

The cgroup tree is plain directories (a cgroup id is a directory's inode), so
everything here runs as any user in well under a second per test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from meter import NULL, Topology, build, records
from meter import resolver as resolver_mod
from meter.bpfabi import GIVEN_BIT, IDLE_CGID, KIND_RX, KIND_TX, PORT_CGID_BIT, SCHED_CGID, STEAL_CGID
from meter.cgroup import cgroup_id
from meter.engine import Meter, window_totals
from meter.errors import ConfigError, MeterError
from meter.loop import DrainLoop
from meter.perf import CounterPlan
from meter.records import NAMES, Columns, code, text
from meter.resolver import PSEUDO_ROWS
from meter.sources.fake import FakeCPU, FakeEnergy, FakePackets, FakeSources, FakeVFs, steady_load
from meter.sources.sched import SchedDrain

W = 1_000_000


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    for rel in ("acme/vswitch", "acme/vswitch/pmd", "globex/vswitch", "other"):
        (root / rel).mkdir(parents=True)
    return root


def _topology(tree: Path, extra: str = "", names: tuple[str, ...] = ("acme", "globex")) -> Topology:
    text = "".join(f'[[tenant]]\nname = "{n}"\n[[tenant.compartment]]\nname = "vswitch"\ncgroup = "{n}/vswitch"\n'
                   + (extra if n == "acme" else "") for n in names)
    cfg = tree.parent / "topology.toml"
    cfg.write_text(text)
    return Topology.from_file(cfg, mount=tree)


def _id(tree: Path, rel: str) -> int:
    return cgroup_id(tree / rel)


def _rows(batch: np.ndarray, tenant: str) -> np.ndarray:
    return batch[batch["tenant"] == code(tenant)]


def _open(topo: Topology, cpu: FakeCPU | None = None, **kw) -> tuple[Meter, FakeSources]:
    src = FakeSources(cpu or FakeCPU(ncpu=2), kw.pop("packets", None), kw.pop("vfs", None), kw.pop("energy", None))
    meter = Meter(topo, sources=src, **kw)
    meter.open()
    return meter, src


# -- records and rows ---------------------------------------------------------------------

def test_one_record_per_window_and_row_and_idle_takes_the_rest(tree):
    meter, src = _open(_topology(tree))
    cpu = src.cpu_source
    w = cpu.now
    cpu.charge(w, _id(tree, "acme/vswitch"), 300_000)
    cpu.charge(w, _id(tree, "acme/vswitch"), 200_000)  # two CPUs' charges: one record
    cpu.charge(w, _id(tree, "globex/vswitch"), 700_000)
    cpu.advance(1)
    batch = meter.drain()
    assert [(NAMES.text(r["tenant"]), r["cpu_ns"]) for r in batch] == [("idle", 800_000), ("acme", 500_000), ("globex", 700_000)]
    assert np.all(batch["window_start_ns"] == batch["window_start_ns"][0])
    assert set(text(batch, "compartment")) == {"idle", "vswitch"}
    meter.close()


def test_a_nested_cgroup_is_billed_to_its_compartment(tree):
    meter, src = _open(_topology(tree))
    src.cpu_source.charge(src.cpu_source.now, _id(tree, "acme/vswitch/pmd"), 400_000)
    src.cpu_source.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "acme")["cpu_ns"].sum()) == 400_000
    assert meter.stats.unresolved_cgroups == 0


def test_tasks_in_no_compartment_are_host_and_unknown_ids_are_counted(tree):
    meter, src = _open(_topology(tree))
    cpu = src.cpu_source
    cpu.charge(cpu.now, _id(tree, "other"), 100_000)  # a cgroup, but no compartment's
    cpu.charge(cpu.now, 987_654_321_123, 50_000)  # no such cgroup at all
    cpu.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "host")["cpu_ns"].sum()) == 150_000
    assert meter.stats.unresolved_cgroups == 1


def test_pseudo_rows_hold_scheduler_and_steal_time_as_clock_time(tree):
    meter, src = _open(_topology(tree))
    cpu = src.cpu_source
    cpu.charge(cpu.now, SCHED_CGID, 3_000)
    cpu.charge(cpu.now, STEAL_CGID, 40_000)
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 10_000)
    cpu.advance(1)
    batch = meter.drain()
    by = {NAMES.text(r["tenant"]): r for r in batch}
    assert by["sched"]["cpu_ns"] == 3_000 and by["steal"]["cpu_ns"] == 40_000
    assert {by[t]["cpu_source"] for t in ("idle", "sched", "steal")} == {code("clock")}
    assert by["acme"]["cpu_source"] == code("kernel")


def test_cpu_source_says_clock_without_the_kernels_charge(tree):
    meter, src = _open(_topology(tree), FakeCPU(kernel_charge=False))
    src.cpu_source.charge(src.cpu_source.now, _id(tree, "acme/vswitch"), 10_000)
    src.cpu_source.advance(1)
    assert set(text(meter.drain(), "cpu_source")) == {"clock"}


def test_start_up_windows_are_skipped_and_counted(tree):
    cpu = FakeCPU(first_window=50)
    meter, _ = _open(_topology(tree), cpu)
    cpu.charge(48, _id(tree, "acme/vswitch"), 1)
    cpu.charge(49, _id(tree, "acme/vswitch"), 1)
    cpu.advance(1)
    batch = meter.drain()
    assert np.all(batch["window_start_ns"] >= 50 * W + meter.offset_ns) and len(_rows(batch, "acme")) == 0
    assert meter.stats.warmup_windows_skipped == 2


def test_sequence_numbers_run_on_across_drains_from_first_seq(tree):
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu, first_seq=1000)
    seqs = []
    for _ in range(3):
        cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 5)
        cpu.advance(2)
        seqs += list(meter.drain()["seq"])
    assert seqs == list(range(1000, 1000 + len(seqs))) and len(seqs) == 9  # acme + idle, idle


def test_window_starts_are_wall_clock_and_windows_can_be_wider(tree):
    cpu = FakeCPU(window_ns=5 * W, first_window=10)
    meter, _ = _open(_topology(tree), cpu, window_ms=5)
    cpu.advance(3)
    batch = meter.drain()
    assert list(batch["window_start_ns"] - meter.offset_ns) == [50 * W, 55 * W, 60 * W]
    assert set(batch["window_ms"]) == {5} and set(batch["cpu_ns"]) == {2 * 5 * W}


def test_a_fake_of_another_window_width_is_refused(tree):
    meter = Meter(_topology(tree), window_ms=2, sources=FakeSources(FakeCPU(window_ns=W)))
    with pytest.raises(ValueError, match="windows"):
        meter.open()


# -- conservation -------------------------------------------------------------------------

def test_every_window_adds_up_to_cpus_times_w(tree):
    cpu = FakeCPU(ncpu=4)
    ids = [_id(tree, "acme/vswitch"), _id(tree, "globex/vswitch"), _id(tree, "other")]
    cpu.load = steady_load(ids, 4, W, busy=0.7, per_cpu=3, seed=1)
    meter, _ = _open(_topology(tree), cpu)
    cpu.advance(200)
    batch = meter.drain()
    starts, total = window_totals(batch)
    assert len(starts) == 200 and np.all(total == 4 * W)
    assert meter.stats.conservation_violations == 0 and meter.stats.windows == 200


def test_a_window_that_does_not_add_up_is_a_violation(tree):
    cpu = FakeCPU(fill_idle=False)
    meter, _ = _open(_topology(tree), cpu)
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 2 * W)  # full
    cpu.charge(cpu.now + 1, _id(tree, "acme/vswitch"), W)  # half a window missing
    cpu.advance(2)
    meter.drain()
    assert meter.stats.conservation_violations == 1


def test_given_softirq_and_port_softirq_balance_in_the_window(tree):
    packets = FakePackets()
    topo = _topology(tree, 'interfaces = ["veth-a"]\n')
    meter, src = _open(topo, packets=packets)
    cpu = src.cpu_source
    globex = _id(tree, "globex/vswitch")
    cpu.charge(cpu.now, globex, 900_000)  # globex ran 0.9 ms, 0.2 ms of it for acme's port
    cpu.charge(cpu.now, GIVEN_BIT | globex, 200_000)
    cpu.charge(cpu.now, PORT_CGID_BIT | 0, 200_000)
    cpu.advance(1)
    batch = meter.drain()
    acme, glob = _rows(batch, "acme")[0], _rows(batch, "globex")[0]
    assert acme["softirq_ns"] == 200_000 and acme["cpu_ns"] == 0
    assert glob["cpu_ns"] == 900_000 and glob["softirq_given_ns"] == 200_000
    _, total = window_totals(batch)
    assert list(total) == [2 * W] and meter.stats.conservation_violations == 0


# -- network, VFs -------------------------------------------------------------------------

def test_late_packets_are_billed_to_the_port_owner_as_late(tree):
    """Packets whose window's cell was not open (a stalled drain) go to the port
    owner's late record in the newest window closed, and into its totals."""
    packets = FakePackets()
    meter, src = _open(_topology(tree, 'interfaces = ["veth-a"]\n'), packets=packets)
    w = src.cpu_source.now
    packets.count(0, KIND_RX, w, 10, 1000)
    packets.count_late(0, KIND_TX, 4, 400, wire_packets=90, wire_bytes=400 + 86 * 66)  # GSO skbs
    src.cpu_source.advance(2)
    batch = meter.drain()
    acme = _rows(batch, "acme")
    late = acme[acme["cpu_source"] == code("late")]
    assert len(late) == 1 and (late["tx_packets"][0], late["tx_bytes"][0], late["cpu_ns"][0]) == (4, 400, 0)
    assert (late["tx_wire_packets"][0], late["tx_wire_bytes"][0]) == (90, 400 + 86 * 66)
    assert int(late["window_start_ns"][0]) == int(batch["window_start_ns"].max())
    assert int(acme["rx_packets"].clip(0).sum()) == 10
    ports = next(t for t in meter.totals() if t["tenant"] == "acme")["ports"]
    assert ports["veth-a"]["tx_packets"] == 4 and ports["veth-a"]["rx_packets"] == 10
    assert ports["veth-a"]["tx_wire_packets"] == 90 and ports["veth-a"]["rx_wire_packets"] == 10
    assert np.all(window_totals(batch)[1] == 2 * W)


def test_a_reload_attaches_added_interfaces_and_detaches_removed_ones_keeping_counts(tree):
    """SIGHUP with interfaces added and removed: the new one is counted from the
    drain after, under a new port number; the removed one is no longer counted,
    and its totals stay; one that comes back gets its old number again."""
    packets = FakePackets()
    meter, src = _open(_topology(tree, 'interfaces = ["veth-a"]\n'), packets=packets)
    cpu = src.cpu_source
    packets.count(0, KIND_RX, cpu.now, 10, 1000)
    cpu.advance(1)
    meter.drain()
    meter.set_topology(_topology(tree, 'interfaces = ["ns1:eth0", "veth-b"]\n'))
    assert [(p.index, p.label) for p in packets.ports] == [(1, "ns1:eth0"), (2, "veth-b")]
    packets.count(1, KIND_TX, cpu.now, 7, 700)
    packets.count(2, KIND_RX, cpu.now, 2, 200)
    cpu.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "acme")["tx_packets"].clip(0).sum()) == 7
    ports = next(t for t in meter.totals() if t["tenant"] == "acme")["ports"]
    assert {k: v["rx_packets"] + v["tx_packets"] for k, v in ports.items()} == {"veth-a": 10, "ns1:eth0": 7, "veth-b": 2}
    meter.set_topology(_topology(tree, 'interfaces = ["veth-a"]\n'))
    assert [(p.index, p.label) for p in packets.ports] == [(0, "veth-a")]
    assert np.all(window_totals(batch)[1] == 2 * W)
    meter.close()


def test_ports_beyond_the_capacity_set_at_open_are_refused_with_a_warning(tree, caplog):
    from meter.ports import PORT_ROOM

    packets = FakePackets()
    meter, _ = _open(_topology(tree, 'interfaces = ["veth-a"]\n'), packets=packets)
    many = ", ".join(f'"v{i}"' for i in range(PORT_ROOM + 3))
    meter.set_topology(_topology(tree, f"interfaces = [{many}]\n"))
    assert len(packets.ports) == PORT_ROOM  # veth-a keeps its number: 64 left for the 67
    assert sum("restart meter to meter it" in r.message for r in caplog.records) == 3
    meter.close()


def test_an_unreachable_vswitch_database_at_open_is_one_error_naming_it(tree):
    with pytest.raises(MeterError, match=r"cannot read the Open vSwitch database unix:/nonexistent/db.sock .*"
                                         r"start its ovsdb-server") as err:
        _open(_topology(tree, 'ovsdb = "unix:/nonexistent/db.sock"\n'))
    assert "\n" not in str(err.value)


def test_packets_land_on_the_port_owner_and_portless_rows_are_null(tree):
    packets = FakePackets()
    meter, src = _open(_topology(tree, 'interfaces = ["veth-a", "ns1:eth0"]\n'), packets=packets)
    assert packets.attached and [p.label for p in packets.ports] == ["veth-a", "ns1:eth0"]
    w = src.cpu_source.now
    packets.count(0, KIND_RX, w, 10, 1000)
    packets.count(1, KIND_TX, w, 3, 300, wire_packets=120, wire_bytes=300 + 117 * 54)
    packets.count(1, KIND_RX, w + 5, 1, 1)  # a window not closed yet: next drain
    src.cpu_source.advance(1)
    batch = meter.drain()
    acme = _rows(batch, "acme")[0]
    assert (acme["rx_packets"], acme["rx_bytes"], acme["tx_packets"], acme["tx_bytes"]) == (10, 1000, 3, 300)
    assert (acme["rx_wire_packets"], acme["rx_wire_bytes"], acme["tx_wire_packets"], acme["tx_wire_bytes"]) == (
        10, 1000, 120, 300 + 117 * 54)
    assert acme["net_source"] == code("tc")
    for t in ("globex", "idle"):
        if len(_rows(batch, t)):
            assert _rows(batch, t)[0]["rx_packets"] == NULL and _rows(batch, t)[0]["net_source"] == code("")
    assert packets.refreshes == 1
    src.cpu_source.advance(5)
    assert int(meter.drain()["rx_packets"].clip(0).sum()) == 1
    meter.close()
    assert not packets.attached


def test_vf_counters_land_in_the_newest_closed_window(tree):
    vfs = FakeVFs()
    topo = _topology(tree, 'vfs = [{ pf = "enp3s0f0", vf = 3 }]\n')
    meter, src = _open(topo, vfs=vfs)
    assert vfs.vfs == [(PSEUDO_ROWS, "enp3s0f0", 3)]  # acme, the first compartment, after meter's own rows
    vfs.add(PSEUDO_ROWS, 7, 700, 2, 200)
    src.cpu_source.advance(3)
    batch = meter.drain()
    acme = _rows(batch, "acme")
    assert len(acme) == 1 and acme[0]["window_start_ns"] == batch["window_start_ns"].max()
    assert (acme[0]["vf_rx_packets"], acme[0]["vf_tx_bytes"], acme[0]["vf_source"]) == (7, 200, code("vf"))
    assert np.all(_rows(batch, "idle")["vf_rx_packets"] == NULL)


# -- reloads ------------------------------------------------------------------------------

def test_reload_keeps_rows_and_totals_adds_new_ones(tree):
    topo = _topology(tree, names=("acme",))
    meter, src = _open(topo)
    cpu = src.cpu_source
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 100)
    cpu.advance(1)
    meter.drain()
    meter.set_topology(_topology(tree, names=("globex", "acme")))
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 20)
    cpu.charge(cpu.now, _id(tree, "globex/vswitch"), 3)
    cpu.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "globex")["cpu_ns"].sum()) == 3
    totals = {(t["tenant"]): t["cpu_ns"] for t in meter.totals()}
    assert totals["acme"] == 120 and totals["globex"] == 3


def test_a_reload_cannot_change_packet_time_and_says_so(tree, caplog):
    """packet_time is compiled into the kernel program: a reloaded file that
    changes it gets one warning, and the meter keeps what it opened with."""
    charge = dataclasses.replace(_topology(tree), packet_time="charge")
    meter, _ = _open(charge)
    assert meter.cpu_source.spec.packet_time == "charge"
    meter.set_topology(charge)
    assert not [r for r in caplog.records if "packet_time" in r.message]
    meter.set_topology(_topology(tree))  # the key removed: the default, clock
    warned = [r.message for r in caplog.records if "packet_time" in r.message]
    assert warned == ["meter: packet_time clock in the new topology takes effect at the next restart (still charge)"]
    assert meter.packet_time == "charge"
    meter.close()


def test_a_reload_that_changes_drain_priority_says_when_it_takes_effect(tree, caplog):
    normal = dataclasses.replace(_topology(tree), drain_priority="normal")
    meter, _ = _open(normal)
    assert meter.drain_priority == "normal"
    meter.set_topology(normal)
    assert not [r for r in caplog.records if "drain_priority" in r.message]
    meter.set_topology(_topology(tree))  # the key removed: the default, realtime
    warned = [r.message for r in caplog.records if "drain_priority" in r.message]
    assert warned == ["meter: drain_priority realtime in the new topology takes effect at the next restart "
                      "(still normal)"]
    assert meter.drain_priority == "normal"
    meter.close()


def test_a_removed_compartments_tasks_count_as_host_after_a_reload(tree):
    meter, src = _open(_topology(tree))
    meter.set_topology(_topology(tree, names=("globex",)))
    src.cpu_source.charge(src.cpu_source.now, _id(tree, "acme/vswitch"), 77)
    src.cpu_source.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "host")["cpu_ns"].sum()) == 77 and len(_rows(batch, "acme")) == 0


def test_usage_taken_before_a_reload_stays_with_the_compartment_it_removes(tree):
    """Taken while acme was a compartment, built after the reload that removes
    it: still acme's (the reload builds what was taken, under the old rows)."""
    meter, src = _open(_topology(tree))
    cpu = src.cpu_source
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 77)
    cpu.advance(1)
    meter._take()
    meter.set_topology(_topology(tree, names=("globex",)))
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 5)  # after it: the host's
    cpu.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "acme")["cpu_ns"].sum()) == 77 and int(_rows(batch, "host")["cpu_ns"].sum()) == 5
    assert np.all(np.diff(batch["seq"]) == 1) and meter.stats.conservation_violations == 0
    assert np.all(np.diff(batch["window_start_ns"]) >= 0)


def test_rows_added_after_open_get_null_port_fields_not_an_index_error(tree):
    packets = FakePackets()
    topo = Topology.discover(tree, mount=tree)
    meter, src = _open(_topology(tree, 'interfaces = ["veth-a"]\n'), packets=packets)
    (tree / "newcomer").mkdir()
    meter.set_topology(topo.refresh())
    src.cpu_source.charge(src.cpu_source.now, _id(tree, "newcomer"), 10)
    src.cpu_source.advance(1)
    batch = meter.drain()
    new = _rows(batch, "newcomer")
    assert len(new) == 1 and new[0]["cpu_ns"] == 10 and new[0]["rx_packets"] == NULL


# -- totals, energy -----------------------------------------------------------------------

def test_totals_sum_every_drain_and_say_none_when_never_measured(tree):
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    for _ in range(5):
        cpu.charge(cpu.now, _id(tree, "globex/vswitch"), 1_000)
        cpu.advance(1)
        meter.drain()
    t = {r["tenant"]: r for r in meter.totals()}
    assert t["globex"]["cpu_ns"] == 5_000 and t["acme"]["cpu_ns"] is None
    assert t["globex"]["instructions"] is None  # never measured: None, not 0
    assert t["idle"]["cpu_ns"] == 5 * 2 * W - 5_000


def test_measured_energy_is_split_exactly_and_carried_over_empty_drains(tree):
    energy = FakeEnergy()
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu, energy=energy)
    assert meter.energy_source == "fake"
    energy.add(package=1_000_003, dram=50_001)
    meter.drain()  # nothing closed: nothing to split, the energy waits
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 600_000)
    cpu.charge(cpu.now, _id(tree, "globex/vswitch"), 300_000)
    cpu.advance(1)
    energy.add(package=7)
    batch = meter.drain()
    assert int(batch["energy_uj"].sum()) == 1_000_003 + 50_001 + 7
    assert set(text(batch, "energy_source")) == {"fake"}
    st = meter.stats
    assert st.energy_measured_uj == st.energy_attributed_uj == 1_050_011 and st.energy_pending_uj == 0
    meter.close()
    assert energy.closed


def test_kernel_side_losses_are_reported_in_stats(tree):
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    cpu.kernel_stats.update(late_ns=5, net_late_packets=2, unplaced_ns=9)
    cpu.advance(4)
    meter.drain()
    assert (meter.stats.late_ns, meter.stats.net_late_packets, meter.stats.unplaced_ns) == (5, 2, 9)
    assert meter.stats.covered_ns == 4 * W


# -- callbacks and sinks ------------------------------------------------------------------

def test_close_flushes_the_last_windows_to_callbacks(tree):
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    got = []
    meter.on_batch(got.append)
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 42)
    cpu.advance(1)
    meter.close()
    assert sum(int(b["cpu_ns"][b["tenant"] == code("acme")].sum()) for b in got) == 42
    assert not meter.is_open and not cpu.is_open


def test_the_exporter_serves_a_fake_meters_totals(tree):
    from meter.sinks.prometheus import Exporter

    cpu = FakeCPU()
    meter = Meter(_topology(tree), sources=FakeSources(cpu), drain_interval=0.05, batch_interval=0.05)
    exporter = Exporter(meter, "127.0.0.1:0")
    exporter.start()
    try:
        assert meter.running
        cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 250_000_000)
        cpu.advance(1)
        port = exporter.port
        for _ in range(100):
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if 'meter_cpu_seconds_total{compartment="vswitch",tenant="acme"} 0.25' in text:
                break
        assert 'meter_cpu_seconds_total{compartment="vswitch",tenant="acme"} 0.25' in text
    finally:
        exporter.stop()
    assert not meter.is_open


# -- the pure builder ---------------------------------------------------------------------

class _Rows:
    def __init__(self, ids: dict[int, int]):
        self.tenants = ["host", "idle", "sched", "steal", "t"]
        self.names = ["host", "idle", "sched", "steal", "c"]
        self.cgroup_ids = [1, 0, SCHED_CGID, STEAL_CGID, 99]
        self.unresolved = 0
        self._ids = ids

    @property
    def nrows(self) -> int:
        return 5

    def columns(self):
        return NAMES.codes(self.tenants), NAMES.codes(self.names), np.asarray(self.cgroup_ids, np.uint64)

    def rows(self, cgids):
        return np.array([self._ids.get(int(c), 0) for c in cgids], np.int64)


def _ctx(**kw) -> build.Context:
    plan = kw.pop("plan", CounterPlan({}, (), {}, None, ""))
    return build.Context(window_ns=W, host="h", plan=plan, offset_ns=0, first_window=0, closed_window=10,
                         kernel_charge=True, first_seq=0, **kw)


def test_build_estimates_cycles_from_cpu_and_softirq_time_and_nulls_idle():
    plan = CounterPlan({}, ("cycles",), {}, 2_000_000_000, "cpu-clock estimate")
    d = SchedDrain(cgid=np.array([99, IDLE_CGID, GIVEN_BIT | 99], np.uint64), window=np.array([3, 3, 3]),
                   ns=np.array([1_000, 5_000, 400]), counts=np.zeros((3, 0), np.int64))
    out = build.build(d, None, None, _Rows({99: 4, 0: 1}), _ctx(plan=plan)).columns.records()
    t = out[out["tenant"] == code("t")][0]
    assert t["cycles"] == (1_000 - 400) * 2 and out[out["tenant"] == code("idle")][0]["cycles"] == NULL
    assert t["counters_source"] == code("cpu-clock estimate")


def test_build_copies_measured_counters_per_field():
    from meter.perf import parse_event

    plan = CounterPlan({"instructions": parse_event("sw:cpu-clock")}, (), {}, None, "perf:instructions=sw:cpu-clock")
    d = SchedDrain(cgid=np.array([99, 99], np.uint64), window=np.array([1, 2]), ns=np.array([10, 20]),
                   counts=np.array([[7], [8]], np.int64))
    out = build.build(d, None, None, _Rows({99: 4}), _ctx(plan=plan)).columns.records()
    assert list(out["instructions"]) == [7, 8] and np.all(out["cache_misses"] == NULL)


def test_the_ids_a_take_must_name_are_its_cgroups_once_without_ports_and_given_bits():
    ids = np.array([7, 7, 9, 9, 7, PORT_CGID_BIT | 2, GIVEN_BIT | 11], np.uint64)
    d = SchedDrain(cgid=ids, window=np.zeros(7, np.int64), ns=np.ones(7, np.int64), counts=np.zeros((7, 0), np.int64),
                   late_cgid=np.array([5], np.uint64), late_ns=np.array([1]), late_counts=np.zeros((1, 0), np.int64))
    assert build.cgroup_ids(d).tolist() == [7, 9, 7, 11, 5]  # repeats in a row only: the first is kept
    # A source that says which cgroups it met for the first time: only those.
    d.met_cgid = np.array([9, GIVEN_BIT | 12], np.uint64)
    assert build.cgroup_ids(d).tolist() == [9, 12]
    d.met_cgid = np.zeros(0, np.uint64)
    assert build.cgroup_ids(d).tolist() == []


def test_build_of_nothing_is_an_empty_batch_of_the_record_dtype():
    d = SchedDrain(cgid=np.zeros(0, np.uint64), window=np.zeros(0, np.int64), ns=np.zeros(0, np.int64),
                   counts=np.zeros((0, 0), np.int64))
    built = build.build(d, None, {}, _Rows({}), _ctx())
    out = built.columns.records()
    assert len(out) == 0 and out.dtype == records.RECORD_DTYPE


def test_group_sums_are_exact_for_big_integers():
    key = np.array([3, 1, 3, 2, 1])
    vals = np.array([[2**62], [1], [2**61], [5], [2]], np.int64)
    first, sums = records.group_sums(key, vals)
    assert list(first) == [1, 3, 0] and list(key[first]) == [1, 2, 3]
    assert list(sums[:, 0]) == [3, 5, 2**62 + 2**61]


def test_null_sums_keep_not_measured_apart_from_zero():
    key = np.array([0, 0, 1, 1])
    vals = np.array([[NULL, 5], [NULL, 0], [2, NULL], [NULL, NULL]], np.int64)
    first, sums, seen = records.null_sums(key, vals)
    assert sums.tolist() == [[0, 5], [2, 0]] and seen.tolist() == [[False, True], [True, False]]


# -- steady_load, the scale benchmark's generator -----------------------------------------

def test_steady_load_fills_each_cpu_to_its_busy_share():
    ids = list(range(100, 200))
    load = steady_load(ids, 8, W, busy=0.5, per_cpu=4, seed=3)
    window, cgid, ns = load(np.arange(10, 20))
    assert len(window) == 10 * 8 * 4 and set(np.unique(window)) == set(range(10, 20))
    per_window = np.bincount(window - 10, weights=ns).astype(np.int64)
    assert np.all(per_window == 8 * W // 2) and set(np.unique(cgid)) <= set(ids)


def test_meter_settings_are_checked_before_anything_opens(tree):
    with pytest.raises(ConfigError, match="window_ms"):
        Meter(_topology(tree), window_ms=0, sources=FakeSources(FakeCPU()))
    with pytest.raises(ConfigError, match="drain_interval"):
        Meter(_topology(tree), drain_interval=0, sources=FakeSources(FakeCPU()))
    for bad in (0, -1, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match="batch_interval must be a positive number of seconds"):
            Meter(_topology(tree), batch_interval=bad, sources=FakeSources(FakeCPU()))


def test_batches_may_be_long_while_takes_stay_within_the_kernels_split(tree):
    # 2 s between batches at 1 ms windows: takes every 0.5 s, each with a close between
    # (one charge spans at most two close intervals: 2 x 250 + 16 windows fit the split).
    meter = Meter(_topology(tree), window_ms=1, batch_interval=2.0, sources=FakeSources(FakeCPU()))
    assert (meter.drain_interval, meter.takes_per_batch, meter.closes_per_take) == (0.5, 4, 2)
    # The default: a batch every 2 s, four takes a batch (BATCH_INTERVAL, DRAIN_INTERVAL).
    meter = Meter(_topology(tree), window_ms=1, sources=FakeSources(FakeCPU()))
    assert (meter.drain_interval, meter.takes_per_batch, meter.batch_interval) == (0.5, 4, 2.0)
    # Never further apart than asked, and a whole number of takes per batch; a take
    # interval the split covers alone needs no close between takes.
    meter = Meter(_topology(tree), window_ms=1, drain_interval=0.3, batch_interval=1.0, sources=FakeSources(FakeCPU()))
    assert (meter.drain_interval, meter.takes_per_batch, meter.batch_interval, meter.closes_per_take) == (0.25, 4, 1.0, 1)
    # 0.3 s rounds to 2/7 s with the default 2 s batch: past what one take covers, so a close between.
    meter = Meter(_topology(tree), window_ms=1, drain_interval=0.3, sources=FakeSources(FakeCPU()))
    assert (meter.takes_per_batch, meter.closes_per_take) == (7, 2)
    # Longer windows: one close a take covers more.
    meter = Meter(_topology(tree), window_ms=10, sources=FakeSources(FakeCPU()))
    assert (meter.drain_interval, meter.closes_per_take) == (0.5, 1)
    # Past twice the split's bound: refused, naming what was asked.
    with pytest.raises(ConfigError, match=r"a drain interval of 1 s is too long for 1 ms windows \(at most 0\.544 s\)"):
        Meter(_topology(tree), window_ms=1, drain_interval=1.0, sources=FakeSources(FakeCPU()))
    with pytest.raises(ConfigError, match="too long for 1 ms windows"):
        Meter(_topology(tree), window_ms=1, drain_interval=2.0, batch_interval=2.0, sources=FakeSources(FakeCPU()))


def test_the_loop_closes_windows_between_takes_where_the_split_needs_it(tree):
    """At 1 ms windows a take every 0.5 s leaves idle CPUs closed too rarely for the
    kernel's split (2 x 500 + 16 windows > MAX_SPAN_LIMIT): the loop closes once
    between takes (idle CPUs nudged, the watermark published, nothing taken)."""
    cpu = FakeCPU()
    meter = Meter(_topology(tree), window_ms=1, drain_interval=0.5, batch_interval=0.5, sources=FakeSources(cpu))
    assert meter.closes_per_take == 2
    events: list[str] = []
    publish = cpu.publish
    cpu.publish = lambda: (events.append("close"), publish())[1]  # type: ignore[method-assign]
    meter.on_take(lambda: events.append("take"))
    with meter:
        list(meter.batches(1.9))
    # close (0.25 s), take (0.5 s), close, take, close, take (1.5 s), close (1.75 s). A take
    # more than an eighth of a second late is followed by none (the next comes soon enough):
    # so the first is a close, and no two closes come in a row.
    assert events[0] == "close" and "take" in events, events
    assert not any(a == b == "close" for a, b in zip(events, events[1:])), events
    assert meter.stats.closes == cpu.publishes == events.count("close") >= 2
    assert meter.stats.takes == events.count("take") + 1  # and the final flush's


def _script(cpu: FakeCPU, tree: Path, step: int) -> None:
    """Two windows of charges, different at each step (a nested cgroup, the host, counters of ns)."""
    ids = [_id(tree, "acme/vswitch"), _id(tree, "acme/vswitch/pmd"), _id(tree, "globex/vswitch"), _id(tree, ".")]
    for k in range(2):
        for i, cgid in enumerate(ids):
            if (step + k + i) % 3:
                cpu.charge(cpu.now + k, cgid, 1000 * (step + 1) + 10 * k + i)
    cpu.advance(2)


def test_takes_between_batches_give_the_records_a_batch_per_take_would(tree):
    ports = 'interfaces = ["veth-a"]\n'
    one, one_packets = FakeCPU(ncpu=2), FakePackets()
    batched, _ = _open(_topology(tree, ports), one, packets=one_packets)
    other, other_packets = FakeCPU(ncpu=2), FakePackets()
    each, _ = _open(_topology(tree, ports), other, packets=other_packets)
    parts = []
    for step in range(4):
        for cpu, packets in ((one, one_packets), (other, other_packets)):
            packets.count(0, KIND_RX, cpu.now, 10 + step, 1000 * (step + 1), wire_packets=20 + step)
            packets.count(0, KIND_TX, cpu.now + 1, 3, 300)
            _script(cpu, tree, step)
        if step < 3:
            batched._take()
        parts.append(each.drain())
    batch, ref = batched.drain(), np.concatenate(parts)
    # Each meter dates windows with its own wall-clock offset, read at open.
    assert np.array_equal(batch["window_start_ns"] - batched.offset_ns, ref["window_start_ns"] - each.offset_ns)
    batch["window_start_ns"] = ref["window_start_ns"]
    assert len(batch) > 20 and np.array_equal(batch, ref)  # seq numbers included
    assert int(batch["rx_wire_packets"].clip(0).sum()) == 20 + 21 + 22 + 23
    assert (batched.stats.takes, batched.stats.drains, each.stats.drains) == (4, 1, 4)
    assert batched.stats.conservation_violations == 0 and batched.stats.windows == each.stats.windows


def test_takes_holding_enough_entries_make_a_batch_due_early(tree, monkeypatch):
    """Batches much bigger than BATCH_ENTRIES cost more a record: a take says
    when the takes since the last batch hold that many, and the loop builds."""
    import meter.engine as engine_mod

    monkeypatch.setattr(engine_mod, "BATCH_ENTRIES", 12)
    meter, src = _open(_topology(tree))
    cpu = src.cpu_source
    _script(cpu, tree, 0)
    assert meter._take() < 1
    _script(cpu, tree, 1)
    assert meter._take() >= 1
    batch = meter._batch()
    assert meter.stats.drains == 1 and len(batch) == 13
    _script(cpu, tree, 2)
    assert meter._take() < 1  # counted afresh after the batch
    # Takes that would each hold more than a batch come sooner, down to an eighth of the interval.
    assert meter.next_interval(0.5, 0.0) == meter.next_interval(0.5, 0.5) == meter.drain_interval == 0.5
    assert meter.next_interval(0.5, 2.0) == 0.25 and meter.next_interval(0.5, 100.0) == 0.5 / 8


def test_a_cgroup_met_at_a_take_is_named_then_though_gone_by_the_batch(tmp_path):
    """A short-lived discovered compartment: its cgroup is gone before the batch
    is built, but it was named while it existed (at the take), so its usage is
    its own, not the host's."""
    root = tmp_path / "cg"
    root.mkdir()
    meter, src = _open(Topology.discover(root, mount=root))
    (root / "brief").mkdir()  # made after the meter opened
    cpu = src.cpu_source
    cpu.charge(cpu.now, cgroup_id(root / "brief"), 321)
    cpu.advance(1)
    meter._take()
    (root / "brief").rmdir()
    cpu.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "brief")["cpu_ns"].sum()) == 321
    assert len(_rows(batch, "host")) == 0 and meter.stats.unresolved_cgroups == 0


def test_a_cgroup_met_at_a_close_is_named_then_though_gone_by_the_take(tmp_path):
    """A close between takes names the cgroups the kernel met since the last
    take or close (SchedSource.publish: rows it took), as a take does: one
    living less than a take interval is its own, not the host's."""
    root = tmp_path / "cg"
    root.mkdir()
    meter, src = _open(Topology.discover(root, mount=root))
    (root / "brief").mkdir()  # made after the meter opened
    cpu = src.cpu_source
    brief = cgroup_id(root / "brief")
    cpu.publish = lambda: np.array([brief], np.uint64)  # type: ignore[method-assign]  # the kernel took its row
    cpu.charge(cpu.now, brief, 321)
    cpu.advance(1)
    meter._close()
    (root / "brief").rmdir()  # gone before the take
    batch = meter.drain()
    assert int(_rows(batch, "brief")["cpu_ns"].sum()) == 321
    assert len(_rows(batch, "host")) == 0 and meter.stats.unresolved_cgroups == 0
    assert meter.stats.closes == 1


def test_the_loop_takes_every_drain_interval_and_builds_every_batch_interval(tree):
    meter = Meter(_topology(tree), drain_interval=0.02, batch_interval=0.08, sources=FakeSources(FakeCPU()))
    assert meter.takes_per_batch == 4
    woke = []
    meter.on_take(lambda: woke.append(meter.stats.takes))
    with meter:
        list(meter.batches(0.5))
    # Each wake takes; every 4th also builds; the final flush does both once more.
    st = meter.stats
    assert st.drains >= 3 and (st.takes - 1) // 4 == st.drains - 1, (st.takes, st.drains)
    # on_take callbacks run after every wake's take (not after the final flush).
    assert woke == list(range(1, st.takes))


def _ticking(tree: Path, **kw) -> Meter:
    """A meter on simulated CPUs under a steady load whose windows move on 5 at each take."""
    cpu = FakeCPU(ncpu=2)
    cpu.load = steady_load([_id(tree, "acme/vswitch"), _id(tree, "other")], 2, W, seed=4)
    meter = Meter(_topology(tree), drain_interval=0.02, batch_interval=0.04, sources=FakeSources(cpu), **kw)
    meter.on_take(lambda: cpu.advance(5))
    return meter


def _policy_in(meter: Meter, name: str, seen: list[int]) -> None:
    """Note this thread's scheduling class each time ``meter.name`` runs."""
    inner = getattr(meter, name)

    def noted(*a, **k):
        seen.append(os.sched_getscheduler(0))
        return inner(*a, **k)

    setattr(meter, name, noted)


@pytest.mark.skipif(os.geteuid() != 0, reason="the real-time class needs root (CAP_SYS_NICE); CI runs as root")
def test_the_loop_runs_in_the_real_time_class_and_gives_the_thread_its_own_back_at_the_end(tree):
    meter = _ticking(tree)
    takes, builds, handed, after_take, later = [], [], [], [], []
    _policy_in(meter, "_take_locked", takes)
    _policy_in(meter, "_batch_locked", builds)
    meter.on_take(lambda: after_take.append(os.sched_getscheduler(0)))
    before = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    with meter:
        for _ in meter.batches(0.3):
            handed.append(os.sched_getscheduler(0))
        assert os.sched_getscheduler(0) == before[0]  # the loop has ended
        _policy_in(meter, "_take_locked", later)
        meter.drain()  # a library's own drain
        meter.set_topology(meter.topology)  # a reload takes and builds too
    assert takes and builds and handed and after_take and len(later) == 2
    assert set(takes) == set(builds) == set(later) == {os.SCHED_FIFO}
    # The whole loop, the caller's body and callbacks included: a thread given back its
    # own class at each batch can be preempted right there (meter.loop).
    assert set(handed) == set(after_take) == {os.SCHED_FIFO}
    # Once the loop ends (and after drain() and a reload), the thread's own class and nice.
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == before
    assert meter.realtime_refused == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="the real-time class needs root (CAP_SYS_NICE); CI runs as root")
def test_abatches_drains_in_one_real_time_thread(tree):
    import asyncio
    import threading

    meter = _ticking(tree)
    seen: list[tuple[int, int]] = []
    meter.on_take(lambda: seen.append((threading.get_native_id(), os.sched_getscheduler(0))))

    async def consume() -> int:
        return len([b async for b in meter.abatches(0.3)])

    with meter:
        assert asyncio.run(consume()) > 1
    # Every take in one thread, real-time throughout; the caller's (event loop's) thread untouched.
    assert len({t for t, _ in seen}) == 1 and {p for _, p in seen} == {os.SCHED_FIFO}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@pytest.mark.skipif(os.geteuid() != 0, reason="the real-time class needs root (CAP_SYS_NICE); CI runs as root")
def test_the_exporters_thread_and_the_drains_run_in_the_real_time_class(tree):
    """A thread of the process preempted while it holds the interpreter's lock holds
    the drain back too (with scrapes every 0.5 s under saturation: 33 % of CPU time late)."""
    from meter.sinks.prometheus import Exporter

    meter = _ticking(tree)
    exporter = Exporter(meter, "127.0.0.1:0")
    exporter.start()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).read()
        assert exporter._thread is not None and meter._thread is not None
        for thread in (exporter._thread, meter._thread):
            assert os.sched_getscheduler(thread.native_id) == os.SCHED_FIFO, thread.name
    finally:
        exporter.stop()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def _mapping(address: int) -> dict[str, str]:
    """The fields /proc/self/smaps gives the mapping that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            if inside:
                break
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    assert fields, f"no mapping holds {address:#x}"
    return fields


@pytest.mark.skipif(os.geteuid() != 0, reason="the real-time class needs root (CAP_SYS_NICE); CI runs as root")
def test_a_real_time_loop_keeps_the_huge_page_collapser_out_of_the_process(tree):
    """khugepaged, a nice-19 kernel thread, holds a process's memory-map lock while it
    scans it; starved by the tenants' tasks it held the real-time drain's next brk()
    or madvise() for 1.5-4.2 s (500 compartments, meter.loop). Once a loop has run in
    the real-time class, the kernel says no mapping of the process is one it may
    collapse (THPeligible), even one asked for huge pages, and numpy asks for none (an
    array's mapping may still say "hg": glibc reuses heap its earlier arrays were advised in)."""
    import ctypes
    import mmap

    with _ticking(tree) as meter:
        assert list(meter.batches(0.1))
    assert "THP_enabled:\t0" in Path("/proc/self/status").read_text()
    asked = mmap.mmap(-1, 8 << 20)
    asked.madvise(mmap.MADV_HUGEPAGE)
    asked.write(b"x" * len(asked))
    first = ctypes.c_char.from_buffer(asked)
    eligible = _mapping(ctypes.addressof(first))["THPeligible"]
    del first  # the buffer's export: the mapping can be closed
    asked.close()
    assert eligible == "0"
    big = np.ones(1 << 20)  # 8 MB: numpy madvises huge pages for arrays this big, unless told not to
    assert _mapping(big.ctypes.data)["THPeligible"] == "0"
    core = getattr(np, "_core", None) or np.core  # numpy 2, or 1
    assert not core.multiarray._get_madvise_hugepage()


#: The syscalls that change a process's memory map, so take its lock to write.
_MAP_CALLS = ("brk", "mmap", "munmap", "mprotect", "madvise", "mremap")


def _map_call_counter(tid: int):
    """A tracepoint program counting ``tid``'s calls of each of _MAP_CALLS (the kernel's
    count); returns a function that reads the counts."""
    from bcc import BPF

    from meter import program

    program.use_kernel_headers()
    text = f"BPF_ARRAY(calls, u64, {len(_MAP_CALLS)});\n" + "".join(
        f"TRACEPOINT_PROBE(syscalls, sys_enter_{name}) {{\n"
        f"    if ((u32)bpf_get_current_pid_tgid() == {tid}) calls.atomic_increment({i});\n"
        "    return 0;\n}\n" for i, name in enumerate(_MAP_CALLS))
    table = BPF(text=text.encode())[b"calls"]  # the table holds its BPF: attached while it lives

    def counts() -> dict[str, int]:
        return {name: int(table[table.Key(i)].value) for i, name in enumerate(_MAP_CALLS)}

    return counts


@pytest.mark.bpf
def test_a_real_time_loop_leaves_the_memory_map_still(tmp_path):
    """A nice-19 process reading /proc/<pid>/smaps holds the memory-map lock as
    khugepaged does; starved by the tenants' tasks it held the real-time drain's
    next brk(), mmap() or munmap() for 0.6-2.7 s (500 compartments waking every 1
    ms, stress-ng beside them: 0.08-13 s of usage billed late in each of the four
    runs whose late time was read). Once a loop runs in the real-time class, its thread changes the map no
    more after its first batches: the kernel's own count of its calls that do,
    on a simulated host of 64 CPUs and 1,000 compartments, 250 windows a take
    (before: 3, 5 and 8 brk() in three runs of this test, glibc giving its heap's
    top back and growing it again; alone, 8 s, 27 and a munmap())."""
    n = 1000
    root = tmp_path / "cgroup"
    for i in range(n):
        (root / f"t{i}" / "c").mkdir(parents=True)
    cfg = tmp_path / "topology.toml"
    cfg.write_text("".join(f'[[tenant]]\nname = "t{i}"\n[[tenant.compartment]]\nname = "c"\ncgroup = "t{i}/c"\n'
                           for i in range(n)))
    cpu = FakeCPU(ncpu=64)
    cpu.load = steady_load([_id(root, f"t{i}/c") for i in range(n)], 64, W, seed=4)
    meter = Meter(Topology.from_file(cfg, mount=root), drain_interval=0.02, batch_interval=0.08,
                  sources=FakeSources(cpu))
    meter.on_take(lambda: cpu.advance(250))
    counts = _map_call_counter(threading.get_native_id())
    batches, before = 0, None
    with meter:
        for _ in meter.batches(5.0, columns=True):
            batches += 1
            if batches == 3:  # the first batches grow the heap to what the loop needs
                before = counts()
        after = counts()
    assert meter.realtime_refused == "" and before is not None and batches > 20
    assert {name: after[name] - before[name] for name in _MAP_CALLS} == dict.fromkeys(_MAP_CALLS, 0)


def test_a_refused_real_time_class_is_said_once_and_the_loop_goes_on(tree, monkeypatch, caplog):
    def refuse(*a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    meter = _ticking(tree)
    with meter, caplog.at_level("WARNING", logger="meter"):
        batches = list(meter.batches(0.2))
    assert batches and meter.stats.takes > 2
    assert meter.realtime_refused == "Operation not permitted"
    said = [r.getMessage() for r in caplog.records if "real-time scheduling refused" in r.getMessage()]
    assert len(said) == 1 and 'drain_priority = "normal"' in said[0]


def test_normal_drain_priority_leaves_the_thread_alone_and_a_bad_one_is_refused(tree, monkeypatch):
    asked = []
    monkeypatch.setattr(os, "sched_setscheduler", lambda *a: asked.append(a))
    meter = _ticking(tree, drain_priority="normal")
    with meter:
        assert list(meter.batches(0.1))
    assert asked == [] and meter.realtime_refused == ""
    with pytest.raises(ConfigError, match="drain_priority must be one of realtime, normal, not 'fast'"):
        Meter(_topology(tree), sources=FakeSources(FakeCPU()), drain_priority="fast")


class _Busy(DrainLoop):
    """A drain loop whose every take works ``work`` s of CPU: more than its interval."""

    drain_interval = 0.005

    def __init__(self, work: float, priority: str) -> None:
        super().__init__()
        self.work, self.drain_priority, self.took = work, priority, 0

    def open(self) -> None:
        pass

    def _take(self) -> float:
        end = time.thread_time() + self.work
        while time.thread_time() < end:
            pass
        self.took += 1
        return 0.0

    def _batch(self) -> Columns:
        return Columns(0, {})

    def _drain(self, *, final: bool) -> Columns:
        return Columns(0, {})


@pytest.mark.skipif(os.geteuid() != 0, reason="the real-time class needs root (CAP_SYS_NICE); CI runs as root")
def test_a_real_time_loop_that_cannot_keep_up_works_at_most_half_the_time_and_says_so(caplog):
    """Takes of 20 ms of CPU every 5 ms: in the real-time class the loop would take a
    whole CPU from the host's tenants; it waits as long as it works instead."""
    loop = _Busy(0.02, "realtime")
    wall0, cpu0 = time.monotonic(), time.thread_time()
    with caplog.at_level("WARNING", logger="meter"):
        assert list(loop.batches(0.6)) == []
    wall, cpu = time.monotonic() - wall0, time.thread_time() - cpu0
    # Each take's work w is followed by a wait of at least w, but the last one's: so
    # cpu <= (wall + w) / 2, whatever else runs on the host (wall only grows with it).
    assert loop.took >= 3 and cpu <= (wall + loop.work) / 2, (cpu, wall, loop.took)
    assert loop.duty_waits >= loop.took - 2
    said = [r.getMessage() for r in caplog.records if "more than 50 %" in r.getMessage()]
    assert len(said) == 1 and "later windows" in said[0]


def test_a_normal_priority_loop_is_not_held_to_the_real_time_share():
    loop = _Busy(0.02, "normal")
    assert list(loop.batches(0.2)) == []
    assert loop.took >= 2 and loop.duty_waits == 0


def test_records_become_json_ready_dicts_with_null_as_none(tree):
    meter, src = _open(_topology(tree))
    src.cpu_source.charge(src.cpu_source.now, _id(tree, "acme/vswitch"), 1)
    src.cpu_source.advance(1)
    rows = json.loads(json.dumps(list(records.to_dicts(meter.drain()))))
    acme = next(r for r in rows if r["tenant"] == "acme")
    assert acme["cpu_ns"] == 1 and acme["instructions"] is None and acme["host"] == meter.host


def test_a_discovered_cgroup_with_an_odd_name_is_billed_to_it_not_to_host(tmp_path):
    root = tmp_path / "cg"
    (root / "bad name").mkdir(parents=True)
    meter, src = _open(Topology.discover(root, mount=root))
    src.cpu_source.charge(src.cpu_source.now, cgroup_id(root / "bad name"), 123)
    src.cpu_source.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "bad_x20name")["cpu_ns"].sum()) == 123 and len(_rows(batch, "host")) == 0


@pytest.mark.parametrize("window_ms", [0, -1, 60_001, 10**12, 1.5])
def test_unsupported_window_sizes_are_refused_in_one_line(tree, window_ms):
    with pytest.raises(ConfigError, match="window_ms must be") as err:
        Meter(_topology(tree), window_ms=window_ms, sources=FakeSources(FakeCPU()))
    assert "\n" not in str(err.value) and err.value.setting == "window_ms"


@pytest.mark.parametrize("window_ms", [2148, 60_000])
def test_long_windows_are_supported(tree, window_ms):
    cpu = FakeCPU(window_ns=window_ms * 1_000_000)
    meter, _ = _open(_topology(tree), cpu, window_ms=window_ms)
    cpu.advance(2)
    batch = meter.drain()
    assert set(batch["window_ms"]) == {window_ms} and set(batch["cpu_ns"]) == {2 * window_ms * 1_000_000}


def test_a_closed_window_with_no_record_at_all_is_missing_and_a_violation(tree):
    cpu = FakeCPU(fill_idle=False)
    meter, _ = _open(_topology(tree), cpu)
    cpu.charge(cpu.now, _id(tree, "acme/vswitch"), 2 * W)
    cpu.charge(cpu.now + 2, _id(tree, "acme/vswitch"), 2 * W)  # the window between: nothing
    cpu.advance(3)
    meter.drain()
    st = meter.stats
    assert (st.windows, st.missing_windows, st.conservation_violations) == (2, 1, 1)
    assert st.loss_line() == "LOST: 1 missing windows, 1 conservation violations"


def test_no_loss_means_an_empty_loss_line(tree):
    meter, src = _open(_topology(tree))
    src.cpu_source.advance(5)
    meter.drain()
    assert meter.stats.loss_line() == "" and not any(meter.stats.losses().values())


def test_losses_and_the_switch_paths_are_exported(tree):
    from meter.sinks.prometheus import Exporter

    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    cpu.kernel_stats.update(late_ns=2_000_000_000, unseen_ns=45_000)
    cpu.same_run_switches, cpu.idle_out_switches, cpu.idle_in_switches = 3, 7, 5
    meter_without_paths = Exporter(meter, "127.0.0.1:0").render()
    cpu.same_run = True  # as the kernel program with BTF: runs and idle paths
    acme = _id(tree, "acme/vswitch")
    # Owed 3 ms with no idle time to settle it from yet: unsettled, and said, until it is.
    cpu.spill(acme, 3 * W)
    cpu.charge(1000, acme, 2 * W)
    cpu.advance(1)
    meter.drain()
    text = Exporter(meter, "127.0.0.1:0").render()
    assert "meter_unsettled_seconds 0.003" in text
    assert 'meter_lost_seconds_total{reason="missing_windows"} 0.0' in text
    # Late time is billed (in a later window), not lost.
    assert "meter_late_seconds_total 2.0" in text and 'reason="late"' not in text
    assert "meter_missing_windows_total 0.0" in text
    # Time of slices no switch event showed is given back to its cgroups, and said.
    assert "meter_unseen_seconds_total 4.5e-05" in text
    # How the switch program charged: runs of one cgroup, and its idle paths.
    assert "meter_run_switches_total 3.0" in text
    assert "meter_idle_out_switches_total 7.0" in text and "meter_idle_in_switches_total 5.0" in text
    # A program without them measures none of the three: absent, not 0.
    assert "switches_total" not in meter_without_paths


def test_late_time_is_billed_to_its_row_and_named_in_the_window_it_left(tree):
    """A stalled drain: 300 us of acme's time in window 1001 had no open cell. It is
    billed to acme in the newest window of the next drain, as a record of its own
    (cpu_source late); window 1001, short by as much, gets a late row for it. Every
    window adds up, and acme's bill has all of its time."""
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    acme = _id(tree, "acme/vswitch")
    cpu.charge(1000, acme, 200_000)
    cpu.charge_late(1001, acme, 300_000)
    cpu.advance(3)
    batch = meter.drain()
    late = batch[batch["cpu_source"] == code("late")]
    assert list(text(late, "tenant")) == ["acme"] and int(late["cpu_ns"][0]) == 300_000
    assert int(late["window_start_ns"][0]) == int(batch["window_start_ns"].max())  # the newest window
    named = batch[batch["tenant"] == code("late")]
    assert len(named) == 1 and int(named["cpu_ns"][0]) == 300_000
    assert int(named["window_start_ns"][0]) == int(batch["window_start_ns"].min()) + W  # window 1001
    starts, total = window_totals(batch)
    assert len(starts) == 3 and np.all(total == 2 * W)
    assert int(_rows(batch, "acme")["cpu_ns"].sum()) == 500_000
    assert meter.stats.conservation_violations == 0 and meter.stats.loss_line() == ""


def test_differences_the_kernel_had_no_entry_for_are_settled_in_the_records(tree):
    """Owed time (the kernel charged acme more than the clock placed) comes out of
    idle's time; a debt goes from the row's own time to sched; what cannot be
    settled yet waits for later windows. Every window still adds up."""
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    acme, globex = _id(tree, "acme/vswitch"), _id(tree, "globex/vswitch")
    cpu.charge(1000, acme, 500_000)
    cpu.charge(1001, globex, 1_500_000)
    cpu.spill(acme, 800_000)      # owed: from idle (1.5 ms in 1000, 0.5 ms in 1001)
    cpu.spill(globex, -400_000)   # owes: from its own 1.5 ms, to sched
    cpu.advance(2)
    batch = meter.drain()
    assert int(_rows(batch, "acme")["cpu_ns"].sum()) == 1_300_000
    assert int(_rows(batch, "globex")["cpu_ns"].sum()) == 1_100_000
    assert int(_rows(batch, "sched")["cpu_ns"].sum()) == 400_000
    assert np.all(window_totals(batch)[1] == 2 * W) and np.all(batch["cpu_ns"] >= 0)
    assert meter.stats.unsettled_ns == 0
    cpu.spill(acme, 5 * W)        # more than this drain's idle time: the rest waits
    cpu.charge(1002, globex, 2 * W)
    cpu.advance(1)
    meter.drain()
    assert meter.stats.unsettled_ns == 5 * W and f"{5 * W} ns of kernel/clock differences" in meter.stats.notice_line()
    cpu.advance(3)
    meter.drain()
    assert meter.stats.unsettled_ns == 0 and meter.stats.notice_line() == ""


def test_rows_owed_at_once_share_idle_time_in_row_order_and_the_rest_waits(tree):
    """Two rows owed more than the drain's idle time holds: they are paid out of
    it in row order, newest window first, none of it twice; what idle could not
    pay waits (unsettled) and is paid in the next drain. Every window adds up."""
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    acme, globex = _id(tree, "acme/vswitch"), _id(tree, "globex/vswitch")
    cpu.charge(1000, acme, 500_000)     # idle: 1.5 ms in 1000
    cpu.charge(1001, globex, 200_000)   # idle: 1.8 ms in 1001
    cpu.spill(acme, 2_500_000)
    cpu.spill(globex, 1_000_000)        # 3.5 ms owed, 3.3 ms of idle
    cpu.advance(2)
    batch = meter.drain()
    assert int(_rows(batch, "acme")["cpu_ns"].sum()) == 3_000_000
    assert int(_rows(batch, "globex")["cpu_ns"].sum()) == 1_000_000  # 0.2 + 0.8 of its 1.0 ms
    # acme, the first row, took the newest window's idle time first: all 1.8 ms of 1001.
    acme_1001 = _rows(batch, "acme")[batch["window_start_ns"][batch["tenant"] == code("acme")]
                                     == int(batch["window_start_ns"].max())]
    assert int(acme_1001["cpu_ns"].sum()) == 1_800_000
    assert int(_rows(batch, "idle")["cpu_ns"].sum()) == 0
    assert np.all(window_totals(batch)[1] == 2 * W) and np.all(batch["cpu_ns"] >= 0)
    assert meter.stats.unsettled_ns == 200_000
    cpu.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "globex")["cpu_ns"].sum()) == 200_000
    assert meter.stats.unsettled_ns == 0 and np.all(window_totals(batch)[1] == 2 * W)


def test_late_time_no_window_is_short_of_is_kept_for_the_next_ones(tree):
    """Late time can arrive before the window it left closes (a ring full of
    undrained windows takes charges of the newest ones): the late row waits for it."""
    cpu = FakeCPU()
    meter, _ = _open(_topology(tree), cpu)
    acme = _id(tree, "acme/vswitch")
    cpu.charge_late(1002, acme, 100_000)
    cpu.advance(2)  # windows 1000, 1001 close: neither is short
    first = meter.drain()
    assert not np.any(first["tenant"] == code("late")) and int(first["cpu_ns"][first["cpu_source"] == code("late")].sum()) == 100_000
    cpu.advance(1)  # 1002 closes, short by 100 us
    second = meter.drain()
    assert int(second["cpu_ns"][second["tenant"] == code("late")].sum()) == 100_000
    for b in (first, second):
        assert np.all(window_totals(b)[1] == 2 * W)


def test_the_kernel_is_told_every_compartment_and_its_level(tree):
    meter, src = _open(_topology(tree))
    told = src.cpu_source.compartments
    assert told.levels == {_id(tree, "acme/vswitch"): 2, _id(tree, "globex/vswitch"): 2}
    # A task below no compartment is the host's: the kernel says so itself, so a
    # cgroup of another tool that comes and goes between drains is never unresolved.
    assert (told.other, told.roots) == (_id(tree, "."), {})
    meter.set_topology(_topology(tree, names=("globex",)))
    assert src.cpu_source.compartments.levels == {_id(tree, "globex/vswitch"): 2}


def test_under_discovery_the_kernel_charges_the_roots_children(tree):
    (tree / "tenants/a").mkdir(parents=True)
    meter, src = _open(Topology.discover(tree / "tenants", mount=tree))
    told = src.cpu_source.compartments
    assert told.levels == {_id(tree, "tenants/a"): 2}
    assert (told.roots, told.other) == ({_id(tree, "tenants"): (1, 1)}, _id(tree, "."))


def test_the_host_id_the_kernel_charges_is_the_host_row(tree):
    meter, src = _open(_topology(tree))
    src.cpu_source.charge(src.cpu_source.now, _id(tree, "."), 77)
    src.cpu_source.advance(1)
    batch = meter.drain()
    assert int(_rows(batch, "host")["cpu_ns"].sum()) == 77 and meter.stats.unresolved_cgroups == 0


def test_a_compartment_charged_by_its_own_id_keeps_it_after_its_cgroup_is_gone(tree):
    meter, src = _open(_topology(tree))
    acme = _id(tree, "acme/vswitch")
    (tree / "acme/vswitch/pmd").rmdir()
    (tree / "acme/vswitch").rmdir()
    src.cpu_source.charge(src.cpu_source.now, acme, 55)
    src.cpu_source.advance(1)
    assert int(_rows(meter.drain(), "acme")["cpu_ns"].sum()) == 55 and meter.stats.unresolved_cgroups == 0


def test_a_failing_drain_thread_stops_and_the_exporter_says_so(tree):
    """A drain that raises in the background thread used to end it silently while
    /metrics kept serving totals that no longer moved."""
    import time
    import urllib.error
    import urllib.request

    from meter.sinks.prometheus import Exporter

    cpu = FakeCPU(ncpu=2)
    meter = Meter(_topology(tree), sources=FakeSources(cpu), drain_interval=0.01, batch_interval=0.01)
    real = cpu.drain

    def failing(**kw):
        if meter.stats.drains >= 2:
            raise OSError("the usage map vanished")
        return real(**kw)

    cpu.drain = failing
    exporter = Exporter(meter, "127.0.0.1:0")
    exporter.start()
    try:
        deadline = time.monotonic() + 10
        while meter.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not meter.running and "the usage map vanished" in str(meter.error)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5)
        assert info.value.code == 503
    finally:
        exporter.stop()


def test_a_compartment_cgroup_made_again_under_its_path_is_followed(tree):
    """A restarted service gets a new cgroup (a new id) at the same path: the kernel
    must be told the new id, or it would charge the compartment's tasks to the host."""
    meter, src = _open(_topology(tree))
    old = _id(tree, "globex/vswitch")
    # Moved aside, not removed: a removed directory's inode number (its id here)
    # may be given to the next directory made (ext4, tmpfs), this path's again.
    (tree / "globex/vswitch").rename(tree / "globex/gone")
    (tree / "globex/vswitch").mkdir()
    new = _id(tree, "globex/vswitch")
    assert new != old
    src.cpu_source.charge(src.cpu_source.now, old, 11)  # before the restart: still globex's
    src.cpu_source.advance(1)
    meter.drain()
    assert new in src.cpu_source.compartments.levels and old not in src.cpu_source.compartments.levels
    src.cpu_source.charge(src.cpu_source.now, new, 22)
    src.cpu_source.advance(1)
    assert int(_rows(meter.drain(), "globex")["cpu_ns"].sum()) == 22 and meter.stats.unresolved_cgroups == 0
    # Quiet drains look at no cgroup (the directory watch saw nothing) ...
    looked = []
    real = resolver_mod.cgroup_id
    resolver_mod.cgroup_id = lambda path: looked.append(path) or real(path)
    try:
        src.cpu_source.advance(1)
        meter.drain()
        assert looked == []
        # ... and a second restart, after the watch was set, is followed all the same.
        (tree / "globex/vswitch").rename(tree / "globex/gone-2")
        (tree / "globex/vswitch").mkdir()
        newer = _id(tree, "globex/vswitch")
        src.cpu_source.advance(1)
        meter.drain()
        assert looked and newer in src.cpu_source.compartments.levels
    finally:
        resolver_mod.cgroup_id = real
    src.cpu_source.charge(src.cpu_source.now, newer, 33)
    src.cpu_source.advance(1)
    assert int(_rows(meter.drain(), "globex")["cpu_ns"].sum()) == 33


def test_drains_import_no_module(tree):
    """What a drain calls lazily imports nothing: numpy 2's ``np.unique`` imports
    ``numpy.ma`` at its first call (~50 ms of CPU), which landed in whichever
    drain first settled a difference or met an unknown cgroup, a spike in the
    agent's steady cost. Run in a fresh interpreter, where nothing else has
    imported it: drains that settle owed and owing rows, meet a cgroup of no
    compartment and drop warm-up windows must leave the modules as they were."""
    import subprocess
    import sys

    _topology(tree)
    script = f"""
import sys
from pathlib import Path
from meter import Topology
from meter.cgroup import cgroup_id
from meter.engine import Meter
from meter.sources.fake import FakeCPU, FakeSources
tree = Path({str(tree)!r})
cpu = FakeCPU(first_window=1002)
meter = Meter(Topology.from_file(tree.parent / "topology.toml", mount=tree), sources=FakeSources(cpu))
meter.open()
acme, globex = cgroup_id(tree / "acme/vswitch"), cgroup_id(tree / "globex/vswitch")
before = set(sys.modules)
cpu.charge(1000, acme, 100_000)                      # a warm-up window, dropped
cpu.charge(1002, acme, 500_000)
cpu.charge(1003, globex, 1_500_000)
cpu.charge(1003, cgroup_id(tree / "other"), 200_000)  # no compartment's
cpu.spill(acme, 800_000)
cpu.spill(globex, -400_000)
cpu.advance(3)
batch = meter.drain()
assert len(batch) and meter.stats.unsettled_ns == 0, meter.stats.notice_line()
print(sorted(set(sys.modules) - before))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
