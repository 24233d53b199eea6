"""The topology and price-sheet parsers, fuzzed: any file gives a result or
meter's own one-line error, never another exception (any user, no kernel)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter import Topology
from meter.bill import PriceSheet
from meter.errors import MeterError

# Pieces of the two formats, so that most cases get past TOML into the checks.
_KEYS = st.sampled_from(["name", "cgroup", "interfaces", "vfs", "window_ms", "energy", "pf", "vf", "currency",
                         "cpu_second", "gb", "kwh", "million_packets", "compartment", "tenant", "prices", "x"])
_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.text(max_size=20), st.sampled_from(['"1e30"', '"-0"', '"0.00002"', '"EUR"', '"../../etc"',
                                                         '["veth0", "ns:eth0"]', '[{ pf = "p", vf = 1 }]', "[]", "{}"]),
)


def _assign(key: str, value: object) -> str:
    literal = value if isinstance(value, str) and value[:1] in ('"', "[", "{") else repr(value).lower()
    return f"{key} = {literal}"


_LINE = st.one_of(
    st.builds(_assign, _KEYS, _VALUES),
    st.sampled_from(["[[tenant]]", "[[tenant.compartment]]", "[prices]", "[tenant.acme]", "[energy]", "", "# x"]),
    st.text(max_size=30),
)
_FILE = st.one_of(st.lists(_LINE, max_size=25).map("\n".join).map(str.encode), st.binary(max_size=200))

# 1,000 files per parser: 2,000 cases in all.
_SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def mount(tmp_path):
    m = tmp_path / "cgroup"
    (m / "c").mkdir(parents=True)
    return m


@_SETTINGS
@given(content=_FILE)
def test_any_topology_file_is_a_topology_or_meters_error(tmp_path, mount, content):
    path = tmp_path / "t.toml"
    path.write_bytes(content)
    try:
        Topology.from_file(path, mount=mount)
    except MeterError as err:
        assert str(err) and "\n" not in str(err)


@_SETTINGS
@given(content=_FILE)
def test_any_price_sheet_is_a_price_sheet_or_meters_error(tmp_path, content):
    path = tmp_path / "p.toml"
    path.write_bytes(content)
    try:
        PriceSheet.from_file(path)
    except MeterError as err:
        assert str(err) and "\n" not in str(err)
