"""cgroup v2 helpers: the mount, ids, the kernel's own usage, and the id index."""

from __future__ import annotations

import os

import pytest

from meter.cgroup import CgroupIndex, cgroup_id, cpu_usage_usec, find_mount
from meter.errors import CgroupError

MOUNTINFO = """\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
41 30 0:37 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
42 30 0:38 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
"""


def test_find_mount_hybrid(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(MOUNTINFO)
    assert find_mount(tmp_path) == tmp_path / "sys/fs/cgroup/unified"


def test_find_mount_none(tmp_path):
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(MOUNTINFO.replace("cgroup2 cgroup2", "ext4 /dev/x"))
    with pytest.raises(CgroupError, match="cgroup v2 is not mounted"):
        find_mount(tmp_path)


def test_cpu_usage_usec_parses_cpu_stat(tmp_path):
    (tmp_path / "cpu.stat").write_text("usage_usec 12345\nuser_usec 10000\nsystem_usec 2345\n")
    assert cpu_usage_usec(tmp_path) == 12345
    with pytest.raises(CgroupError, match="cpu.stat"):
        cpu_usage_usec(tmp_path / "gone")


def test_index_picks_up_new_dirs_and_remembers_removed(tmp_path):
    (tmp_path / "a").mkdir()
    index = CgroupIndex(tmp_path)
    a = cgroup_id(tmp_path / "a")
    assert index.path(a) == tmp_path / "a"
    (tmp_path / "b/c").mkdir(parents=True)
    c = cgroup_id(tmp_path / "b/c")
    assert index.path(c) is None
    assert index.resolve([c, a]) == {c: tmp_path / "b/c", a: tmp_path / "a"}
    os.rmdir(tmp_path / "a")
    assert index.resolve([a])[a] == tmp_path / "a"  # removed, still named
    assert index.resolve([999_999_999])[999_999_999] is None


def test_cgroup_id_is_the_inode_and_missing_is_clear(tmp_path):
    assert cgroup_id(tmp_path) == os.stat(tmp_path).st_ino
    with pytest.raises(CgroupError, match="does not exist"):
        cgroup_id(tmp_path / "nope")


@pytest.mark.bpf
def test_cgroup_id_matches_what_bpf_sees(cgroups):
    """The inode number is the id bpf_get_current_cgroup_id() returns."""
    from meter import program

    cg = cgroups.make("id")
    bpf = program.load("sched", {"METER_NR_COUNTERS": 0})
    try:
        bpf.attach_raw_tracepoint(tp=b"sched_switch", fn_name=b"meter_switch")
        bpf[b"control"][bpf[b"control"].Key(0)] = bpf[b"control"].Leaf(0)
        p = cgroups.burner(cg, 1.0, 0.2)
        p.wait()
        table = bpf[b"rows"]  # every cgroup charged has its row in the ring
        seen = {int(k.value) for k in table.keys()}
    finally:
        bpf.cleanup()
    assert cgroup_id(cg) in seen


@pytest.mark.bpf
def test_a_dir_watch_sees_cgroups_made_and_removed_on_the_real_cgroupfs(cgroups):
    """Following compartments' ids rests on this: cgroupfs reports mkdir/rmdir to inotify."""
    from meter.cgroup import DirWatch

    parent = cgroups.make("tenant")
    watch = DirWatch([parent])
    try:
        assert watch.changed()  # the first look is always a full one
        assert not watch.changed()
        cgroups.make("tenant/vswitch")
        assert watch.changed() and not watch.changed()
        (parent / "vswitch").rmdir()
        assert watch.changed() and not watch.changed()
    finally:
        watch.close()
    blind = DirWatch([parent, cgroups.root / "not-made-yet"])
    try:  # a directory that cannot be watched yet: every look is a full one
        assert blind.changed() and blind.changed()
    finally:
        blind.close()
