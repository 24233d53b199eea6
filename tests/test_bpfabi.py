"""meter/bpfabi.py is bpf/meter.h, in Python: checked against the header's text, and
against the compiled program's own layout at load."""

from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from meter import bpfabi
from meter.errors import BPFError


def test_every_constant_matches_the_header():
    c = bpfabi.header_constants()
    assert c["METER_MAX_COUNTERS"] == bpfabi.MAX_COUNTERS
    assert c["METER_MAX_CPUS"] == bpfabi.MAX_CPUS
    assert c["METER_IDLE_CGID"] == bpfabi.IDLE_CGID
    assert c["METER_SCHED_CGID"] == bpfabi.SCHED_CGID
    assert c["METER_STEAL_CGID"] == bpfabi.STEAL_CGID
    assert c["METER_UNATTRIBUTED_CGID"] == bpfabi.UNATTRIBUTED_CGID
    assert c["METER_UNATTRIBUTED_ROW"] == bpfabi.UNATTRIBUTED_ROW
    assert c["METER_GIVEN_BIT"] == bpfabi.GIVEN_BIT
    assert c["METER_PORT_PLACEHOLDER"] == bpfabi.PORT_PLACEHOLDER
    assert (c["METER_NET_RX"], c["METER_NET_TX"], c["METER_NET_SOFTIRQ"]) == (
        bpfabi.KIND_RX, bpfabi.KIND_TX, bpfabi.KIND_SOFTIRQ)
    names = ("WATERMARK", "FIRST", "LEVELS", "GEN", "OTHER", "TAKEN", "NEXT_ROW",
             "NET_TAKEN", "NUDGE")
    assert [c[f"METER_CTL_{n}"] for n in names] == [getattr(bpfabi, f"CTL_{n}") for n in names]
    assert c["METER_NR_CONTROLS"] == bpfabi.NR_CONTROLS
    assert (c["METER_MAX_COMPARTMENTS"], c["METER_MAX_LEVEL"]) == (bpfabi.MAX_COMPARTMENTS, bpfabi.MAX_LEVEL)
    # The port pseudo-cgroup is a macro with an argument: its bit, from the text.
    text = bpfabi.header_path().read_text()
    assert re.search(r"#define METER_PORT_CGID\(port\) \(\(1ULL << (\d+)\)", text).group(1) == str(
        bpfabi.PORT_CGID_BIT.bit_length() - 1)


def test_stats_are_the_header_enum_in_order():
    c = bpfabi.header_constants()
    names = sorted((v, k) for k, v in c.items() if k.startswith("METER_STAT_"))
    assert [k.removeprefix("METER_STAT_").lower() for _, k in names] == list(bpfabi.STATS)
    assert c["METER_NR_STATS"] == len(bpfabi.STATS)


@pytest.mark.parametrize(("struct", "dtype"), [
    ("meter_usage", bpfabi.USAGE_DTYPE), ("meter_counts", bpfabi.COUNTS_DTYPE),
    ("meter_net_cell", bpfabi.NET_CELL_DTYPE),
])
def test_map_structs_are_laid_out_like_the_dtypes(struct, dtype):
    assert bpfabi.header_structs()[struct] == bpfabi.dtype_layout(dtype)


def test_pseudo_cgroup_ids_never_collide_with_real_ones():
    # Real ids are kernfs ids: generation << 32 | inode, far below bit 61.
    pseudo = [bpfabi.SCHED_CGID, bpfabi.STEAL_CGID, bpfabi.UNATTRIBUTED_CGID]
    assert all(p < bpfabi.GIVEN_BIT and p >= 1 << 61 for p in pseudo)
    assert bpfabi.GIVEN_BIT < bpfabi.PORT_CGID_BIT
    assert bpfabi.SCHED_CGID & bpfabi.GIVEN_BIT == 0


class _Table:
    """What bcc hands back for a map: ctypes Key and Leaf types, laid out by the compiler."""

    def __init__(self, key, leaf):
        self.Key, self.Leaf = key, leaf


def _struct(*fields):
    return type("S", (ctypes.Structure,), {"_fields_": list(fields)})


def test_check_table_accepts_the_compiled_layout():
    leaf = _struct(("ns", ctypes.c_uint64), ("count", ctypes.c_uint64 * bpfabi.MAX_COUNTERS))
    bpfabi.check_table(_Table(ctypes.c_uint32, leaf), np.dtype(np.uint32), bpfabi.USAGE_DTYPE, "late")


@pytest.mark.parametrize(("leaf", "says"), [
    (_struct(("ns", ctypes.c_uint64), ("count", ctypes.c_uint64 * 3)), "32 bytes in the kernel, 40 here"),
    (_struct(("count", ctypes.c_uint64 * 4), ("ns", ctypes.c_uint64)), "fields ['count', 'ns']"),
    (_struct(("ns", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("count", ctypes.c_uint64 * 4)), "fields"),
])
def test_check_table_names_the_drift(leaf, says):
    with pytest.raises(BPFError, match=re.escape(says)) as err:
        bpfabi.check_table(_Table(ctypes.c_uint32, leaf), np.dtype(np.uint32), bpfabi.USAGE_DTYPE, "late")
    assert "late map's value" in str(err.value) and "\n" not in str(err.value)


def test_check_table_sees_a_struct_where_a_scalar_is_expected():
    leaf = _struct(("ns", ctypes.c_uint64), ("count", ctypes.c_uint64 * bpfabi.MAX_COUNTERS))
    with pytest.raises(BPFError, match="a scalar in the kernel"):
        bpfabi.check_table(_Table(ctypes.c_uint32, ctypes.c_uint64), np.dtype(np.uint32),
                           np.dtype([("ns", np.uint64)]), "late")
    bpfabi.check_table(_Table(ctypes.c_uint32, leaf), np.dtype(np.uint32), bpfabi.USAGE_DTYPE, "late")


def test_check_table_sees_a_moved_field_of_the_same_size():
    cell = _struct(("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))
    moved = np.dtype({"names": ["packets", "bytes"], "formats": [np.uint64, np.uint64],
                      "offsets": [8, 0], "itemsize": 16})
    with pytest.raises(BPFError, match="packets at 0 .* at 8"):
        bpfabi.check_table(_Table(ctypes.c_uint32, cell), np.dtype(np.uint32), moved, "net_ring")


def test_cpu_state_dtype_reads_each_cpus_fields_where_the_compiler_put_them():
    # A per-CPU lookup's values: one struct per CPU, fields user space does not read around them.
    cpu = _struct(("pad0", ctypes.c_uint32), ("window", ctypes.c_uint64), ("net_window", ctypes.c_uint64),
                  ("pad1", ctypes.c_uint8 * 3), ("net_ndirty", ctypes.c_uint32), ("adj_cgid", ctypes.c_uint64 * 4),
                  ("adj_ns", ctypes.c_int64 * 4), ("runs", ctypes.c_uint64), ("pad2", ctypes.c_uint32),
                  ("idle_outs", ctypes.c_uint64), ("pad3", ctypes.c_uint8),
                  ("idle_ins", ctypes.c_uint64), ("tail", ctypes.c_uint16))
    values = (cpu * 3)()
    for c in range(3):
        values[c].window, values[c].net_window, values[c].net_ndirty, values[c].runs = 100 + c, 90 + c, c, 7 * c
        values[c].idle_outs, values[c].idle_ins = 5 * c + 1, 4 * c + 3
        for i in range(4):
            values[c].adj_cgid[i], values[c].adj_ns[i] = 1000 * c + i, -(10 * c + i)
    states = np.frombuffer(values, bpfabi.cpu_state_dtype(cpu))
    assert states.dtype.itemsize == ctypes.sizeof(cpu) and len(states) == 3
    assert states["window"].tolist() == [100, 101, 102] and states["net_window"].tolist() == [90, 91, 92]
    assert states["net_ndirty"].tolist() == [0, 1, 2] and states["runs"].tolist() == [0, 7, 14]
    assert states["idle_outs"].tolist() == [1, 6, 11] and states["idle_ins"].tolist() == [3, 7, 11]
    assert states["adj_ns"].tolist() == [[-(10 * c + i) for i in range(4)] for c in range(3)]
    assert states["adj_cgid"][2].tolist() == [2000, 2001, 2002, 2003]
    with pytest.raises(BPFError, match="no runs"):
        bpfabi.cpu_state_dtype(_struct(*[f for f in cpu._fields_ if f[0] != "runs"]))


@pytest.mark.bpf
def test_the_compiled_program_matches_the_abi():
    from meter import program

    bpf = program.load(["sched", "net"], {"METER_NET": 1, "METER_NR_COUNTERS": 1})
    try:
        bpfabi.check_table(bpf[b"late"], np.dtype(np.uint32), bpfabi.USAGE_DTYPE, "late")
        bpfabi.check_table(bpf[b"ring_counts"], np.dtype(np.uint32), bpfabi.COUNTS_DTYPE, "ring_counts")
        bpfabi.check_table(bpf[b"ring"], np.dtype(np.uint32), np.dtype(np.uint64), "ring")
        bpfabi.check_table(bpf[b"net_ring"], np.dtype(np.uint32), bpfabi.NET_CELL_DTYPE, "net_ring")
        # Every CPU's state as the drain reads it (numpy, one lookup) is what bcc reads field by field.
        table = bpf[b"cpu_state"]
        values = table.Leaf()
        for c in range(len(values)):
            values[c].window, values[c].net_window, values[c].net_ndirty, values[c].runs = 500 + c, 400 + c, c % 2, c + 1
            values[c].idle_outs, values[c].idle_ins = 3 * c + 2, 2 * c + 5
            for i in range(len(values[c].adj_ns)):
                values[c].adj_cgid[i], values[c].adj_ns[i] = 77 + i, -(c + i)
        table[table.Key(0)] = values
        got = table[table.Key(0)]
        states = np.frombuffer(got, bpfabi.cpu_state_dtype(table.sLeaf))
        assert states["window"].tolist() == [int(v.window) for v in got] == [500 + c for c in range(len(got))]
        assert states["net_window"].tolist() == [int(v.net_window) for v in got]
        assert states["net_ndirty"].tolist() == [int(v.net_ndirty) for v in got]
        assert states["runs"].tolist() == [int(v.runs) for v in got]
        assert states["idle_outs"].tolist() == [int(v.idle_outs) for v in got]
        assert states["idle_ins"].tolist() == [int(v.idle_ins) for v in got]
        assert states["adj_ns"].tolist() == [list(v.adj_ns) for v in got]
        assert states["adj_cgid"].tolist() == [list(v.adj_cgid) for v in got]
        # What a drain makes of them: a CPU with packet counts held holds back its oldest window.
        from meter.sources.sched import SchedSource

        src = SchedSource(1_000_000, [])
        n = len(got)
        src.bpf, src._cpus, src._cpu_dtype = bpf, list(range(n)), bpfabi.cpu_state_dtype(table.sLeaf)
        try:
            assert src._cpu_windows() == [400 + c if c % 2 else 500 + c for c in range(n)]
            assert src.same_run_switches == sum(c + 1 for c in range(n))
            assert src.idle_out_switches == sum(3 * c + 2 for c in range(n))
            assert src.idle_in_switches == sum(2 * c + 5 for c in range(n))
            nadj = len(got[0].adj_ns)
            assert src.pending_adjustment_ns == sum(c + i for c in range(n) for i in range(nadj))
            cgid, ns = src._pending_adjustments()
            assert ns.tolist() == [-(c + i) for c in range(n) for i in range(nadj) if c + i]
            assert cgid.tolist() == [77 + i for c in range(n) for i in range(nadj) if c + i]
        finally:
            src.bpf = None
    finally:
        bpf.cleanup()
