"""Topology: the TOML contract, discovery, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from meter import Meter, Topology
from meter.errors import CgroupError, ConfigError
from meter.topology import VirtualFunction

GOOD = """\
window_ms = 2

[[tenant]]
name = "acme"

[[tenant.compartment]]
name = "vswitch"
cgroup = "tenants/acme/vswitch"
interfaces = ["veth-acme0", "acme-vm1:eth0"]
vfs = [{ pf = "enp3s0f0", vf = 3 }]

[[tenant.compartment]]
name = "vm1"
cgroup = "/MOUNT/tenants/acme/vm1"

[[tenant]]
name = "globex"
"""


@pytest.fixture
def mount(tmp_path: Path) -> Path:
    m = tmp_path / "cgroup"
    m.mkdir()
    return m


def write(tmp_path: Path, text: str, mount: Path) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(text.replace("/MOUNT", str(mount)))
    return p


def test_good_file(tmp_path, mount):
    topo = Topology.from_file(write(tmp_path, GOOD, mount), mount=mount)
    assert topo.window_ms == 2
    assert topo.tenants == ["acme"]
    vs, vm = topo.compartments
    assert (vs.tenant, vs.name, vs.cgroup) == ("acme", "vswitch", mount / "tenants/acme/vswitch")
    assert vs.interfaces == ("veth-acme0", "acme-vm1:eth0")
    assert vs.vfs == (VirtualFunction("enp3s0f0", 3),)
    assert vm.cgroup == mount / "tenants/acme/vm1"


def test_packet_time_is_read_and_kept_by_a_refresh(tmp_path, mount):
    """packet_time (docs/architecture.md, "When a packet is counted"): unset is
    None (the meter's default, "clock"); set, the Meter takes it, unless told
    otherwise, and a refresh keeps it."""
    assert Topology.from_file(write(tmp_path, GOOD, mount), mount=mount).packet_time is None
    topo = Topology.from_file(write(tmp_path, 'packet_time = "charge"\n' + GOOD, mount), mount=mount)
    assert topo.packet_time == "charge" and topo.refresh().packet_time == "charge"
    assert Meter(topo).packet_time == "charge" and Meter(topo, packet_time="clock").packet_time == "clock"
    with pytest.raises(ConfigError, match="packet_time must be one of 'clock', 'charge', not 'exact'"):
        Meter(topo, packet_time="exact")


def test_drain_priority_is_read_and_kept_by_a_refresh(tmp_path, mount):
    """drain_priority (meter.loop): unset is None (the meter's default, "realtime");
    set, the Meter takes it unless told otherwise, and a refresh keeps it: the way
    a CLI or systemd user chooses a normal-priority drain."""
    assert Topology.from_file(write(tmp_path, GOOD, mount), mount=mount).drain_priority is None
    assert Meter(Topology.from_file(write(tmp_path, GOOD, mount), mount=mount)).drain_priority == "realtime"
    topo = Topology.from_file(write(tmp_path, 'drain_priority = "normal"\n' + GOOD, mount), mount=mount)
    assert topo.drain_priority == "normal" and topo.refresh().drain_priority == "normal"
    assert Meter(topo).drain_priority == "normal" and Meter(topo, drain_priority="realtime").drain_priority == "realtime"


def test_owner_deepest_compartment_wins(tmp_path, mount):
    text = GOOD + '\n[[tenant.compartment]]\nname = "pmd"\ncgroup = "tenants/acme/vswitch/pmd"\n'
    topo = Topology.from_file(write(tmp_path, text, mount), mount=mount)
    names = [c.name for c in topo.compartments]
    assert names[topo.owner(mount / "tenants/acme/vswitch/x")] == "vswitch"
    assert names[topo.owner(mount / "tenants/acme/vswitch/pmd/t1")] == "pmd"
    assert topo.owner(mount / "elsewhere") is None


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        ("window_ms = 0\n", 1, "window_ms", "between 1 and 60000 ms"),
        ("window_ms = 60001\n", 1, "window_ms", "between 1 and 60000 ms"),
        ('window_ms = "1"\n', 1, "window_ms", "whole number"),
        ('packet_time = "tick"\n', 1, "packet_time", "one of 'clock', 'charge'"),
        ("packet_time = 1\n", 1, "packet_time", "one of 'clock', 'charge'"),
        ('drain_priority = "fifo"\n', 1, "drain_priority", "one of realtime, normal"),
        ("colour = 1\n", 1, "colour", "unknown key"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\n', None, "tenant[0].compartment[0].cgroup", "missing"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\nifaces = []\n', 6,
         "tenant[0].compartment[0].ifaces", "unknown key"),
        ('[[tenant]]\nname = "host"\n', 2, "tenant[0].name", "reserved"),
        ('[[tenant]]\nname = "a b"\n', 2, "tenant[0].name", "letters"),
        ('[[tenant]]\nname = "a"\n[[tenant]]\nname = "a"\n', 4, "tenant[1].name", "twice"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "/elsewhere"\n', 5,
         "tenant[0].compartment[0].cgroup", "not below"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\nvfs = [{ pf = "p", vf = -1 }]\n', 6,
         "tenant[0].compartment[0].vfs[0].vf", ">= 0"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\ninterfaces = "eth0"\n', 6,
         "tenant[0].compartment[0].interfaces", "list"),
        # Paths lead where their '..' take them; interface and netns names are names.
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "a/../../../../etc"\n', 5,
         "tenant[0].compartment[0].cgroup", "not below"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\n'
         'interfaces = ["../../proc/1/ns/net:lo"]\n', 6, "tenant[0].compartment[0].interfaces", "namespace name"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\ninterfaces = ["ns:a/b"]\n', 6,
         "tenant[0].compartment[0].interfaces", "not an interface name"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\n'
         'interfaces = ["a-name-of-16-chr"]\n', 6, "tenant[0].compartment[0].interfaces", "1-15 characters"),
        # One interface in two compartments: the second tc filter would take the first's packets.
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\ninterfaces = ["ns:eth0"]\n'
         '[[tenant]]\nname = "b"\n[[tenant.compartment]]\nname = "y"\ncgroup = "d"\ninterfaces = ["p0", "ns:eth0"]\n',
         12, "tenant[1].compartment[0].interfaces", "already compartment a/x's"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\ninterfaces = ["p0", "p0"]\n', 6,
         "tenant[0].compartment[0].interfaces", "already"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\nvfs = [{ pf = "p", vf = 1 }]\n'
         '[[tenant.compartment]]\nname = "y"\ncgroup = "d"\nvfs = [{ pf = "p", vf = 1 }]\n', 10,
         "tenant[0].compartment[1].vfs[0].vf", "VF 1 of 'p' is already compartment a/x's"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\novsdb = "/run/db.sock"\n', 6,
         "tenant[0].compartment[0].ovsdb", "not an OVSDB address"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\novsdb = "tcp:host"\n', 6,
         "tenant[0].compartment[0].ovsdb", "unix:PATH"),
        ('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\novsdb_netns = "sw"\n', 6,
         "tenant[0].compartment[0].ovsdb_netns", "beside ovsdb"),
    ],
)
def test_bad_files_name_line_key_and_reason(tmp_path, mount, text, line, key, words):
    path = write(tmp_path, text, mount)
    with pytest.raises(ConfigError) as info:
        Topology.from_file(path, mount=mount)
    err = info.value
    assert err.path == str(path)
    assert err.key == key
    if line is not None:
        assert err.line == line
    assert words in str(err)
    assert str(err).startswith(str(path))


def test_toml_syntax_error_names_the_line(tmp_path, mount):
    path = write(tmp_path, '[[tenant]]\nname = "a"\nname = \n', mount)
    with pytest.raises(ConfigError) as info:
        Topology.from_file(path, mount=mount)
    assert info.value.line == 3
    assert "invalid TOML" in str(info.value)


def test_missing_file(tmp_path, mount):
    with pytest.raises(ConfigError, match="no such topology file"):
        Topology.from_file(tmp_path / "nope.toml", mount=mount)


def test_missing_cgroup_is_a_clear_error(tmp_path, mount):
    topo = Topology.from_file(write(tmp_path, GOOD, mount), mount=mount)
    with pytest.raises(CgroupError) as info:
        topo.require_cgroups()
    assert "tenants/acme/vswitch" in str(info.value) and "does not exist" in str(info.value)
    (mount / "tenants/acme/vswitch").mkdir(parents=True)
    (mount / "tenants/acme/vm1").mkdir(parents=True)
    topo.require_cgroups()


def test_discovery_children_become_compartments(mount):
    for name in ("b", "a", "host"):
        (mount / "pool" / name).mkdir(parents=True)
    (mount / "pool" / "cpu.stat").write_text("usage_usec 0\n")
    topo = Topology.discover("pool", mount=mount)
    # "host" is a reserved row name: its directory is still a compartment, renamed.
    assert [(c.tenant, c.name) for c in topo.compartments] == [("a", "a"), ("b", "b"), ("cg_host", "cg_host")]
    (mount / "pool" / "c").mkdir()
    assert [c.name for c in topo.refresh().compartments] == ["a", "b", "c", "cg_host"]


def test_discovery_of_missing_root(mount):
    with pytest.raises(CgroupError, match="does not exist"):
        Topology.discover("nope", mount=mount)


@pytest.mark.parametrize(("content", "says", "line"), [
    (b'[[tenant]]\nname = "a\xff"\n', "not UTF-8 text", 2),
    (b"\x00\x01binary\x9c", "not UTF-8 text", 1),
    (b'[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = \n', "invalid TOML", 4),
])
def test_unreadable_config_is_one_config_error_with_its_line(tmp_path, mount, content, says, line):
    path = tmp_path / "t.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=says) as info:
        Topology.from_file(path, mount=mount)
    assert info.value.line == line and info.value.path == str(path) and "\n" not in str(info.value)


def test_a_directory_is_not_a_topology(tmp_path, mount):
    with pytest.raises(ConfigError, match="is a directory"):
        Topology.from_file(tmp_path, mount=mount)


def test_utf8_config_reads_the_same_whatever_the_locale(tmp_path, mount, monkeypatch):
    (mount / "ünï").mkdir()
    path = tmp_path / "t.toml"
    path.write_text('[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "c"\ncgroup = "ünï"\n', encoding="utf-8")
    monkeypatch.setenv("LC_ALL", "C")
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")
    assert Topology.from_file(path, mount=mount).compartments[0].cgroup == mount / "ünï"


def test_discovery_names_every_directory_and_warns_about_renames(mount, caplog):
    for name in ("plain", "bad name", "ünï", "x" * 70, "idle", "bad_x20name"):
        (mount / name).mkdir()
    with caplog.at_level("WARNING", logger="meter"):
        topo = Topology.discover(mount, mount=mount)
    by_dir = {c.cgroup.name: c.name for c in topo.compartments}
    assert len(by_dir) == 6 and len(set(by_dir.values())) == 6  # every directory, each its own name
    # A directory whose name is valid keeps it; an escaped name that collides gets a hash.
    assert by_dir["plain"] == "plain" and by_dir["bad_x20name"] == "bad_x20name"
    assert by_dir["bad name"] == "bad_x20name-" + by_dir["bad name"][-9:]
    assert by_dir["ünï"] == "_xc3_xbcn_xc3_xaf" and by_dir["idle"] == "cg_idle"
    assert len(by_dir["x" * 70]) <= 64
    warned = [r.getMessage() for r in caplog.records]
    assert sum("bad name" in m for m in warned) == 1 and len(warned) == 4  # bad name, ünï, x*70, idle
    caplog.clear()
    topo.refresh()  # the same directories again: no second warning
    assert not caplog.records


def test_discovered_names_are_valid_topology_names(mount):
    from meter.topology import NAME_MAX, discovered_name

    for raw in ("a b", "\u00e9" * 40, "host", "x" * 200, "", "/"):
        name = discovered_name(raw)
        cfg = mount.parent / "t.toml"
        cfg.write_text(f'[[tenant]]\nname = "{name}"\n[[tenant.compartment]]\nname = "c"\ncgroup = "."\n')
        assert Topology.from_file(cfg, mount=mount).compartments[0].tenant == name and len(name) <= NAME_MAX


def test_a_discovery_root_outside_the_mount_is_refused(tmp_path, mount):
    (tmp_path / "etc").mkdir()
    for root in (tmp_path / "etc", mount / ".." / "etc"):
        with pytest.raises(CgroupError, match="not below the cgroup v2 mount"):
            Topology.discover(root, mount=mount)
