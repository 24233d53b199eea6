"""The ABI shared with the kernel programs: every layout and constant of ``bpf/meter.h``.

User space reads the programs' maps as raw bytes into numpy arrays, so a
struct whose layout drifted from the header would be read silently wrong,
and a bill with it. This module is the one Python copy of that header:

* the map key/value structs as numpy dtypes;
* the pseudo-cgroup ids, bits and enums;
* :func:`check_table`, run when a program is loaded, compares each dtype
  with the layout the compiler gave the struct (bcc exposes it as ctypes
  types) and raises :class:`~meter.errors.BPFError` naming the field;
* :func:`header_constants` / :func:`header_structs` read the header's
  ``#define``, ``enum`` and ``struct`` text, so a test checks this module
  against it without a kernel (``tests/test_bpfabi.py``).

See docs/architecture.md, "Kernel/user ABI".
"""

from __future__ import annotations

import ctypes
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BPFError

__all__ = [
    "COUNTS_DTYPE", "CPU_STATE_FIELDS", "CTL_FIRST", "CTL_GEN", "CTL_NET_TAKEN", "CTL_NEXT_ROW", "CTL_NUDGE",
    "CTL_OTHER", "CTL_LEVELS", "CTL_TAKEN", "CTL_WATERMARK", "GIVEN_BIT", "IDLE_CGID", "KIND_RX",
    "KIND_SOFTIRQ", "KIND_TX", "MAX_COMPARTMENTS", "MAX_COUNTERS", "MAX_CPUS", "MAX_LEVEL", "ROOT_BIT", "NET_CELL_DTYPE",
    "PORT_CGID_BIT", "PORT_PLACEHOLDER", "SCHED_CGID", "STATS", "STEAL_CGID", "UNATTRIBUTED_CGID", "UNATTRIBUTED_ROW",
    "USAGE_DTYPE", "check_table", "cpu_state_dtype",
    "dtype_layout", "header_constants", "header_path", "header_structs",
]

def header_path() -> Path:
    """The installed ``meter.h`` this module mirrors (package ``meter.bpf``)."""
    return Path(str(resources.files("meter.bpf"))) / "meter.h"

#: METER_MAX_COUNTERS: perf counters read per schedule, at most.
MAX_COUNTERS = 4
#: METER_MAX_CPUS: CPUs the per-CPU perf arrays hold (CPU numbers 0 .. MAX_CPUS - 1).
MAX_CPUS = 1024

#: struct meter_usage: a row's late total (the late map's value).
USAGE_DTYPE = np.dtype([("ns", np.uint64), ("count", np.uint64, (MAX_COUNTERS,))])
#: struct meter_counts: the counter deltas of one ring cell (ring_counts' value).
COUNTS_DTYPE = np.dtype([("count", np.uint64, (MAX_COUNTERS,))])
#: struct meter_net_cell: one (port, kind, window) of the net ring, or a (port, kind)'s late total.
NET_CELL_DTYPE = np.dtype([("packets", np.uint64), ("bytes", np.uint64), ("wire_packets", np.uint64),
                           ("wire_bytes", np.uint64)])

#: METER_IDLE_CGID: the idle task (bpf_get_current_cgroup_id() is never 0).
IDLE_CGID = 0
#: METER_SCHED_CGID, METER_STEAL_CGID: clock time the kernel charged to no task.
SCHED_CGID = (1 << 61) | 1
STEAL_CGID = (1 << 61) | 2
#: METER_UNATTRIBUTED_CGID: usage of cgroups that found no free ring row; always row
#: METER_UNATTRIBUTED_ROW.
UNATTRIBUTED_CGID = (1 << 61) | 3
UNATTRIBUTED_ROW = 0
#: METER_GIVEN_BIT | c: NET softirq time given away by cgroup c.
GIVEN_BIT = 1 << 62
#: METER_PORT_CGID(p) = PORT_CGID_BIT | p: softirq time of port p.
PORT_CGID_BIT = 1 << 63
#: METER_PORT_PLACEHOLDER: the immediate replaced by the port number in tc programs.
PORT_PLACEHOLDER = 0x4D455452

#: enum meter_net_kind.
KIND_RX, KIND_TX, KIND_SOFTIRQ = 0, 1, 2
#: enum meter_control.
(CTL_WATERMARK, CTL_FIRST, CTL_LEVELS, CTL_GEN, CTL_OTHER, CTL_TAKEN, CTL_NEXT_ROW, CTL_NET_TAKEN,
 CTL_NUDGE, NR_CONTROLS) = range(10)
#: METER_MAX_COMPARTMENTS, METER_MAX_LEVEL: compartments the kernel resolves, deepest cgroup level.
MAX_COMPARTMENTS = 4096
MAX_LEVEL = 16
#: METER_ROOT_BIT: a compartments map value for a discovery root is this + the level its rules name.
ROOT_BIT = 1 << 32
#: enum meter_stat, in order (lower case, without METER_STAT_).
STATS = ("late_ns", "counter_errors", "net_late_packets", "span_unattributed_ns", "unplaced_ns", "unsettled",
         "unseen_ns", "clocked")

_C_TYPES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__s32": 4, "__s64": 8}


def check_table(table: Any, key: np.dtype, value: np.dtype, what: str) -> None:
    """Raise BPFError unless bcc's compiled key/value types of ``table`` match the dtypes."""
    for role, ctype, dtype in (("key", table.Key, key), ("value", table.Leaf, value)):
        problem = _layout_difference(ctype, dtype)
        if problem:
            raise BPFError(
                f"the compiled {what} map's {role} does not match meter/bpfabi.py ({problem}): "
                "bpf/meter.h and meter/bpfabi.py must change together; reinstall meter",
                program=what,
            )


#: The fields of struct meter_cpu user space reads (the rest are the kernel's alone).
CPU_STATE_FIELDS = ("window", "net_window", "net_ndirty", "adj_cgid", "adj_ns", "runs", "idle_outs",
                    "idle_ins")


def cpu_state_dtype(leaf: Any) -> np.dtype:
    """numpy's view of one CPU's struct meter_cpu as compiled (bcc's ctypes ``leaf``),
    narrowed to :data:`CPU_STATE_FIELDS` at their offsets: a per-CPU lookup's
    values are an array of these, read without Python per CPU."""
    full = np.dtype(leaf)
    fields = full.fields or {}
    missing = [f for f in CPU_STATE_FIELDS if f not in fields]
    if missing:
        raise BPFError(f"the compiled cpu_state map has no {', '.join(missing)}: bpf/meter.h and meter/bpfabi.py "
                       "must change together; reinstall meter", program="cpu_state")
    return np.dtype({"names": list(CPU_STATE_FIELDS), "formats": [fields[f][0] for f in CPU_STATE_FIELDS],
                     "offsets": [fields[f][1] for f in CPU_STATE_FIELDS], "itemsize": full.itemsize})


def _layout_difference(ctype: Any, dtype: np.dtype) -> str | None:
    if ctypes.sizeof(ctype) != dtype.itemsize:
        return f"{ctypes.sizeof(ctype)} bytes in the kernel, {dtype.itemsize} here"
    if not hasattr(ctype, "_fields_"):
        # A scalar (an array map's key): its size is its layout.
        return None if dtype.names is None else f"a scalar in the kernel, fields {list(dtype.names)} here"
    names = [f[0] for f in ctype._fields_]
    if names != list(dtype.names or ()):
        return f"fields {names} in the kernel, {list(dtype.names or ())} here"
    for name in names:
        field = getattr(ctype, name)
        sub, offset = dtype.fields[name][:2]  # type: ignore[index]
        if field.offset != offset or field.size != sub.itemsize:
            return f"{name} at {field.offset} ({field.size} bytes) in the kernel, at {offset} ({sub.itemsize}) here"
    return None


# -- reading the header (for tests and `meter check`) --------------------------------

def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", " ", text, flags=re.S)


def header_constants(path: Path | None = None) -> dict[str, int]:
    """Integer ``#define``s (defaults included) and enum members of the header."""
    path = path or header_path()
    text = _strip_comments(path.read_text(encoding="utf-8"))
    out: dict[str, int] = {}
    for name, expr in re.findall(r"^\s*#define\s+(METER_\w+)\s+(.+?)\s*$", text, flags=re.M):
        value = _eval(expr, out)
        if value is not None:
            out[name] = value
    for body in re.findall(r"enum\s+\w+\s*\{(.*?)\}", text, flags=re.S):
        nxt = 0
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            name, _, expr = (p.strip() for p in item.partition("="))
            if expr:
                nxt = _eval(expr, out) or 0
            out[name] = nxt
            nxt += 1
    return out


def _eval(expr: str, known: dict[str, int]) -> int | None:
    """Value of a constant C expression of integers, names already known, shifts and ors."""
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)(?:ULL|UL|U|LL)?\b", r"\1", expr)
    expr = re.sub(r"\(__u64\)", "", expr)
    if not re.fullmatch(r"[\w\s()<>|+*-]+", expr):
        return None
    names = set(re.findall(r"\b[A-Za-z_]\w*\b", expr))
    if not names <= set(known):
        return None
    try:
        return int(eval(expr, {"__builtins__": {}}, dict(known)))  # noqa: S307  (checked: ints, names, operators)
    except (SyntaxError, TypeError, ValueError):
        return None


def header_structs(path: Path | None = None) -> dict[str, list[tuple[str, int, int]]]:
    """Each scalar-only struct of the header as [(field, offset, size)] and its size, laid out as C does."""
    path = path or header_path()
    text = _strip_comments(path.read_text(encoding="utf-8"))
    consts = header_constants(path)
    out: dict[str, list[tuple[str, int, int]]] = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
        fields: list[tuple[str, int, int]] = []
        offset = align = 0
        for decl in (d.strip() for d in body.split(";")):
            m = re.fullmatch(r"(__[us]\d+)\s+(\w+)(?:\s*\[\s*(\w+)\s*\])?", decl)
            if not decl:
                continue
            if m is None:
                break  # a nested struct: not a map type
            size = _C_TYPES[m.group(1)]
            count = int(m.group(3)) if m.group(3) and m.group(3).isdigit() else consts.get(m.group(3) or "", 1)
            offset = -(-offset // size) * size
            fields.append((m.group(2), offset, size * count))
            offset += size * count
            align = max(align, size)
        else:
            out[name] = fields + [("", -(-offset // max(align, 1)) * max(align, 1), 0)]
    return out


def dtype_layout(dtype: np.dtype) -> list[tuple[str, int, int]]:
    """A dtype as [(field, offset, size)] plus its total size, like :func:`header_structs`."""
    names = dtype.names or ()
    return [(n, dtype.fields[n][1], dtype.fields[n][0].itemsize) for n in names] + [  # type: ignore[index]
        ("", dtype.itemsize, 0)]
