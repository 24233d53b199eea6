"""Energy: readers (fake powercap tree, the real perf power PMU path), exact apportioning, the model."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from meter.attribution import apportion, attribute_energy
from meter.errors import ConfigError
from meter.records import NULL, empty
from meter.sources.energy import (
    EnergySettings,
    ModelReader,
    PerfPowerReader,
    PowercapReader,
    count_sockets,
    pick_reader,
)

MAX = 262_143_328_850


class FakePowercap:
    """A powercap tree the test advances: package-0 with core and dram subzones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.zones = {
            "intel-rapl:0": ("package-0", MAX),
            "intel-rapl:0:0": ("core", MAX),
            "intel-rapl:0:1": ("dram", 65_712_999_613),
        }
        for zone, (name, rng) in self.zones.items():
            d = root / zone
            d.mkdir(parents=True)
            (d / "name").write_text(name + "\n")
            (d / "max_energy_range_uj").write_text(f"{rng}\n")
            (d / "energy_uj").write_text("1000\n")

    def set(self, zone: str, value: int) -> None:
        (self.root / zone / "energy_uj").write_text(f"{value}\n")

    def get(self, zone: str) -> int:
        return int((self.root / zone / "energy_uj").read_text())

    def advance(self, zone: str, uj: int) -> None:
        rng = self.zones[zone][1]
        self.set(zone, (self.get(zone) + uj) % (rng + 1))


@pytest.fixture
def powercap(tmp_path):
    return FakePowercap(tmp_path / "powercap")


def test_powercap_reads_deltas_per_domain(powercap):
    r = PowercapReader(powercap.root)
    assert r.domains == ["core", "dram", "package"]
    powercap.advance("intel-rapl:0", 5_000_000)
    powercap.advance("intel-rapl:0:0", 3_000_000)
    powercap.advance("intel-rapl:0:1", 700_000)
    assert r.read() == {"package": 5_000_000, "core": 3_000_000, "dram": 700_000}
    assert r.read() == {"package": 0, "core": 0, "dram": 0}  # a stalled counter is 0, not an error


def test_powercap_wraps_at_max_energy_range(powercap):
    powercap.set("intel-rapl:0", MAX - 1000)
    r = PowercapReader(powercap.root)
    powercap.advance("intel-rapl:0", 4000)  # passes MAX and wraps to 2999
    assert powercap.get("intel-rapl:0") == 2999
    assert r.read()["package"] == 4000
    assert r.wraps == 1


def test_powercap_zone_that_vanishes(powercap, caplog):
    r = PowercapReader(powercap.root)
    powercap.advance("intel-rapl:0", 10)
    (powercap.root / "intel-rapl:0:1" / "energy_uj").unlink()
    (powercap.root / "intel-rapl:0:1").rename(powercap.root / "gone")
    out = r.read()
    assert out["package"] == 10 and out["dram"] == 0
    assert "vanished" in caplog.text
    powercap.advance("intel-rapl:0", 7)
    assert r.read()["package"] == 7


def test_settings_validation():
    assert EnergySettings.from_table({}).policy == "separate"
    for table, key in (({"policy": "even"}, "energy.policy"), ({"backend": "gpu"}, "energy.backend"),
                       ({"idle_watts": -1}, "energy.idle_watts"), ({"idle_watts": 50, "max_watts": 40}, "energy.max_watts"),
                       ({"sockets": 0}, "energy.sockets"), ({"watts": 1}, "energy.watts")):
        with pytest.raises(ConfigError) as info:
            EnergySettings.from_table(table, path="t.toml")
        assert info.value.key == key


def test_bad_energy_table_in_a_topology_names_file_and_key(tmp_path):
    from meter import Topology

    cfg = tmp_path / "t.toml"
    cfg.write_text('[energy]\npolicy = "even"\n')
    with pytest.raises(ConfigError) as info:
        Topology.from_file(cfg, mount=tmp_path)
    assert info.value.key == "energy.policy" and info.value.line == 2 and str(cfg) in str(info.value)


def test_pick_reader_prefers_powercap_over_model(powercap, tmp_path, monkeypatch):
    (tmp_path / "sys/class").mkdir(parents=True)
    (tmp_path / "sys/class/powercap").symlink_to(powercap.root)
    assert pick_reader(EnergySettings(), root=tmp_path).source == "powercap"
    assert pick_reader(EnergySettings(powercap_root=str(powercap.root)), root="/nonexistent").source == "powercap"
    (tmp_path / "sys/class/powercap").unlink()
    model = pick_reader(EnergySettings(), root=tmp_path)
    assert model.source == "model"
    with pytest.raises(ConfigError, match="not available"):
        pick_reader(EnergySettings(backend="powercap"), root=tmp_path)


def test_perf_power_events_parsed_from_sysfs(tmp_path):
    pmu = tmp_path / "sys/bus/event_source/devices/power"
    (pmu / "events").mkdir(parents=True)
    (pmu / "type").write_text("23\n")
    (pmu / "cpumask").write_text("0,4-5\n")
    for name, cfg in (("energy-pkg", "0x02"), ("energy-ram", "0x03")):
        (pmu / "events" / name).write_text(f"event={cfg}\n")
        (pmu / "events" / f"{name}.scale").write_text("2.3283064365386962890625e-10\n")
        (pmu / "events" / f"{name}.unit").write_text("Joules\n")
    r = PerfPowerReader(tmp_path)
    assert r.domains == ["dram", "package"]
    ev, uj = r.events["energy-pkg"]
    assert (ev.type, ev.config) == (23, 2)
    assert uj == pytest.approx(2.3283064365386962890625e-4)


def test_perf_power_reader_on_this_kernel():
    """The real-hardware path: open and read whatever power PMU this kernel has.

    Without one (this project's VMs today) the reader must say so, and the
    automatic choice must not pick it: energy then comes from another
    backend, named in the records.
    """
    r = PerfPowerReader()
    if not r.events:
        assert r.domains == []
        picked = pick_reader(EnergySettings())
        try:
            assert picked.source != "rapl-perf"
        finally:
            picked.close()
        return
    r.open()
    try:
        assert r  # opened at least one event
        time.sleep(0.05)
        out = r.read()
        assert set(out) == set(r.domains) and all(v >= 0 for v in out.values())
    finally:
        r.close()


def test_apportion_is_exact_per_group_and_fair():
    rng = np.random.default_rng(1)
    n, g = 20_000, 37
    groups = rng.integers(0, g, n)
    weights = rng.integers(0, 10**7, n)
    totals = rng.integers(0, 10**8, g)
    shares = apportion(groups, totals, weights)
    assert np.array_equal(np.bincount(groups, weights=shares, minlength=g).astype(np.int64), totals)
    exact = totals[groups] * weights / np.bincount(groups, weights=weights, minlength=g)[groups]
    assert np.all(np.abs(shares - exact) < 1.0 + 1e-6)


def _largest_remainder(groups, totals, weights):
    """The textbook method, a group at a time in Python: floors, then one more
    unit to the largest remainders, the earlier item first among equal ones."""
    out = np.zeros(len(groups), np.int64)
    for g, total in enumerate(totals.tolist()):
        items = np.flatnonzero(groups == g).tolist()
        w = [int(weights[i]) for i in items]
        if not items:
            continue
        if sum(w) == 0:
            w = [1] * len(items)
        floors = [total * x // sum(w) for x in w]
        rems = [total * x % sum(w) for x in w]
        for k in sorted(range(len(items)), key=lambda k: -rems[k])[: total - sum(floors)]:
            floors[k] += 1
        out[items] = floors
    return out


def test_apportion_is_the_largest_remainder_method_ties_to_the_earlier_item():
    # Groups in runs (a batch's windows) and interleaved; ties from equal and zero weights.
    rng = np.random.default_rng(3)
    for trial in range(400):
        g, n = int(rng.integers(2, 12)), int(rng.integers(1, 60))
        groups = rng.integers(0, g, n)
        if trial % 2:
            groups = np.sort(groups)
        weights = rng.integers(0, (3, 1000, 10**6)[trial % 3], n)
        if trial % 5 == 0:
            weights[rng.random(n) < 0.5] = 7
        totals = rng.integers(0, (5, 10**4, 10**9)[trial % 3], g)
        assert np.array_equal(apportion(groups, totals, weights), _largest_remainder(groups, totals, weights))


def test_apportion_one_group_is_exact_and_fair():
    """A measuring reader's drain is one group (its own path: scalar divisor, linear-time remainders)."""
    rng = np.random.default_rng(2)
    for n, top, total in ((1, 5, 7), (50_000, 10**6, 10**9 + 7), (1000, 2**40, 2**20 + 1), (7, 3, 0)):
        weights = rng.integers(0, top, n)
        shares = apportion(np.zeros(n, np.int64), np.array([total]), weights)
        assert int(shares.sum()) == total and shares.min() >= 0
        exact = total * weights / max(weights.sum(), 1) if weights.sum() else np.full(n, total / n)
        assert np.all(np.abs(shares - exact) < 1.0 + 1e-6)


def test_apportion_zero_weights_split_equally_and_huge_values_stay_exact():
    assert apportion(np.zeros(3, np.int64), np.array([10]), np.zeros(3, np.int64)).tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    groups = np.array([0, 0, 1])
    shares = apportion(groups, np.array([2**40 + 3, 5]), np.array([2**50, 2**50 + 1, 0]))
    assert shares[0] + shares[1] == 2**40 + 3 and shares[2] == 5


def _batch(cpu, cycles=None, idle_last=True):
    b = empty(len(cpu))
    b["cpu_ns"] = cpu
    if cycles is not None:
        b["cycles"] = cycles
    idle = np.zeros(len(cpu), bool)
    idle[-1] = idle_last
    return b, idle


def test_energy_split_by_cycles_or_cpu_ns_and_policies():
    b, idle = _batch([600, 300, 100], cycles=[10, 30, NULL])
    g = np.zeros(3, np.int64)
    # Cycles measured: split by cycles (idle has none).
    e = attribute_energy(b, g, np.array([1000]), idle=idle, cycles_measured=True, misses_measured=False)
    assert e.tolist() == [250, 750, 0]
    # Cycles estimated: split by cpu_ns; idle keeps its part (separate) ...
    e = attribute_energy(b, g, np.array([1000]), idle=idle, cycles_measured=False, misses_measured=False)
    assert e.tolist() == [600, 300, 100]
    # ... or spreads it over the others (proportional).
    e = attribute_energy(b, g, np.array([1000]), idle=idle, cycles_measured=False, misses_measured=False,
                         policy="proportional")
    assert e.tolist() == [667, 333, 0] and e.sum() == 1000
    # DRAM by cpu_ns when cache misses are absent, added to package.
    e = attribute_energy(b, g, np.array([1000]), np.array([10]), idle=idle, cycles_measured=False,
                         misses_measured=False)
    assert e.sum() == 1010


def test_model_energy():
    m = ModelReader(30, 120, 2)
    e = m.window_energy(np.array([0, 1_000_000, 2_000_000]), 2, 1_000_000)
    # 2 sockets x (30 + 90 x util) W over 1 ms, in µJ
    assert e.tolist() == [60_000, 150_000, 240_000]


def test_count_sockets(tmp_path):
    for cpu, pkg in ((0, 0), (1, 0), (2, 1)):
        d = tmp_path / f"sys/devices/system/cpu/cpu{cpu}/topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
    assert count_sockets(tmp_path) == 2
    assert count_sockets(tmp_path / "none") == 1


@pytest.mark.bpf
def test_meter_books_balance_with_a_fake_powercap(powercap, monkeypatch, cgroups):
    """Every drain: Σ energy over the records == what powercap measured, to the µJ."""
    from meter import Topology
    from meter.engine import Meter

    cg = cgroups.make("e")
    meter = Meter(Topology.discover(cgroups.root), drain_interval=0.1, batch_interval=0.1,
                  energy=EnergySettings(powercap_root=str(powercap.root)))
    per_drain = []
    with meter:
        assert meter.energy_source == "powercap"
        p = cgroups.burner(cg, 0.6, 0.6)
        for i in range(8):
            powercap.advance("intel-rapl:0", 1_000_003 + i)
            powercap.advance("intel-rapl:0:1", 200_001)
            powercap.advance("intel-rapl:0:0", 999)  # part of the package: not added
            batch = meter.drain()
            per_drain.append((int(batch["energy_uj"].sum()), len(batch)))
            time.sleep(0.1)
        p.wait()
    carried = 0
    for i, (uj, n) in enumerate(per_drain):
        carried += 1_000_003 + i + 200_001
        if n:  # a drain with records takes everything measured since the last one
            assert uj == carried
            carried = 0
    assert meter.stats.energy_attributed_uj + meter.stats.energy_pending_uj == meter.stats.energy_measured_uj
    assert meter.stats.energy_measured_uj == sum(1_000_003 + i + 200_001 for i in range(8))


@pytest.mark.bpf
def test_record_without_rapl_flags_model(meter_bin, cgroups, monkeypatch, tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[energy]\nidle_watts = 10\nmax_watts = 50\nsockets = 1\npowercap_root = "{tmp_path / "none"}"\n')
    res = subprocess.run([*meter_bin, "record", "--config", str(cfg), "--duration", "0.5", "-o", "-"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert {r["energy_source"] for r in rows} == {"model"}
    per_window: dict[int, int] = {}
    for r in rows:
        per_window[r["window_start_ns"]] = per_window.get(r["window_start_ns"], 0) + r["energy_uj"]
    # 1 socket between 10 and 50 W over 1 ms: 10,000..50,000 µJ a window.
    assert all(10_000 <= v <= 50_000 for v in per_window.values())
