"""Perf event specs and probing."""

from __future__ import annotations

import pytest

from meter.errors import PerfEventError
from meter.perf import (
    PERF_TYPE_HARDWARE,
    PERF_TYPE_SOFTWARE,
    count_over,
    cpu_hz,
    open_error,
    parse_event,
)


def test_parse_specs():
    assert (parse_event("cycles").type, parse_event("cycles").config) == (PERF_TYPE_HARDWARE, 0)
    e = parse_event("hw:cache-misses")
    assert (e.type, e.config, e.is_hardware) == (PERF_TYPE_HARDWARE, 3, True)
    e = parse_event("sw:cpu-clock")
    assert (e.type, e.config, e.is_hardware) == (PERF_TYPE_SOFTWARE, 0, False)
    e = parse_event("8:0x1c2")
    assert (e.type, e.config) == (8, 0x1C2)


@pytest.mark.parametrize("spec", ["hw:bogus", "xx:1", "sw:", "cyclez"])
def test_bad_specs_are_named(spec):
    with pytest.raises(PerfEventError, match="unknown perf event"):
        parse_event(spec)


def test_cpu_hz_from_fake_tree(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\ncpu MHz\t\t: 2100.000\n")
    assert cpu_hz(tmp_path) == 2_100_000_000
    freq = tmp_path / "sys/devices/system/cpu/cpu0/cpufreq"
    freq.mkdir(parents=True)
    (freq / "cpuinfo_max_freq").write_text("3500000\n")
    assert cpu_hz(tmp_path) == 3_500_000_000


@pytest.mark.bpf
def test_software_event_opens_and_counts():
    ev = parse_event("sw:cpu-clock")
    assert open_error(ev) is None
    assert count_over(ev, 0.05) > 10_000_000  # ns of cpu-clock on CPU 0


@pytest.mark.bpf
def test_missing_event_gives_a_reason():
    # A PMU type number no kernel hands out.
    assert open_error(parse_event("4095:0")) is not None
