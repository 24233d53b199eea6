"""Field offsets of the running kernel's structs, read from its BTF.

meter's BPF programs are compiled against headers that may belong to
another kernel (a fallback tree), so they never dereference a kernel
struct through those headers. Where a kernel field is needed (a task's
``se.sum_exec_runtime``, a run queue's clocks), its byte offset is taken
from the running kernel's own type information, ``/sys/kernel/btf/vmlinux``,
and handed to the program as a ``-D`` setting (see docs/architecture.md,
"Kernel fields").

Only what meter needs is decoded: struct/union members, through typedefs,
qualifiers and anonymous members. The format is the kernel's
``include/uapi/linux/btf.h``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from . import host
from .errors import MeterError

__all__ = ["BTF", "BTF_PATH", "BTFError", "kernel_btf"]

BTF_PATH = "sys/kernel/btf/vmlinux"  # under the host root (meter.host)

_MAGIC = 0xEB9F
# Kinds (BTF_KIND_*) and the size of what follows each type record.
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT = range(1, 12)
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(12, 20)
_QUALIFIERS = {_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG}


class BTFError(MeterError):
    """The kernel's BTF is missing, unreadable, or lacks a field meter needs."""


class BTF:
    """A decoded BTF blob: named structs and their members."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF data is truncated")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise BTFError("not BTF data (bad magic)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        # Where each type record starts (ids start at 1); members are decoded
        # only for the types a lookup walks through.
        self._pos: list[int] = [0]
        self._structs: dict[str, int] = {}
        self._datasecs: dict[str, int] = {}
        trailing = {_INT: 4, _VAR: 4, _DECL_TAG: 4, _ARRAY: 12}
        per_member = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, _DATASEC: 12, _ENUM64: 12}
        unpack = struct.Struct("<III").unpack_from
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, _size_type = unpack(data, pos)
            self._pos.append(pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind == _STRUCT and vlen and name_off:
                self._structs.setdefault(self._str(name_off), len(self._pos) - 1)
            elif kind == _DATASEC:
                self._datasecs[self._str(name_off)] = len(self._pos) - 1
            pos += 12 + trailing.get(kind, 0) + per_member.get(kind, 0) * vlen

    def _type(self, type_id: int) -> tuple[int, int, list[tuple[str, int, int]]]:
        """(kind, size_or_type, members) of a type."""
        _name_off, info, size_type = struct.unpack_from("<III", self._data, self._pos[type_id])
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        members: list[tuple[str, int, int]] = []
        if kind in (_STRUCT, _UNION):
            pos = self._pos[type_id] + 12
            for _ in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", self._data, pos)
                pos += 12
                members.append((self._str(m_name), m_type, m_off & 0xFFFFFF if kflag else m_off))
        return kind, size_type, members

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("ascii", "replace")

    def _resolve(self, type_id: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(64):
            kind, size_type, _members = self._type(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = size_type
        raise BTFError(f"BTF type {type_id} is a qualifier loop")

    def _member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(byte offset, type id) of member ``name``, looking into anonymous members."""
        kind, _s, members = self._type(self._resolve(type_id))
        if kind not in (_STRUCT, _UNION):
            return None
        for m_name, m_type, bit_off in members:
            if m_name == name:
                if bit_off % 8:
                    raise BTFError(f"member {name} is a bit field")
                return bit_off // 8, m_type
            if not m_name:
                inner = self._member(m_type, name)
                if inner is not None:
                    return bit_off // 8 + inner[0], inner[1]
        return None

    def offset(self, path: str) -> int:
        """Byte offset of ``"struct.member.member..."`` from the struct's start.

        >>> kernel_btf().offset("task_struct.se.sum_exec_runtime")  # doctest: +SKIP
        232
        """
        struct_name, *members = path.split(".")
        type_id = self._structs.get(struct_name)
        if type_id is None:
            raise BTFError(f"the kernel's BTF has no struct {struct_name}")
        total = 0
        for name in members:
            found = self._member(type_id, name)
            if found is None:
                raise BTFError(f"the kernel's struct {struct_name} has no field {path.split('.', 1)[1]}")
            off, type_id = found
            total += off
        return total


    def percpu_offset(self, var: str) -> int:
        """Offset of per-CPU variable ``var`` in the kernel's per-CPU section.

        A CPU's copy is at (that CPU's per-CPU base) + this offset; the base
        is any per-CPU object's address minus its own offset (for example a
        run queue's, ``runqueues``).
        """
        sec = self._datasecs.get(".data..percpu")
        if sec is None:
            raise BTFError("the kernel's BTF has no per-CPU section")
        _name_off, info, _size = struct.unpack_from("<III", self._data, self._pos[sec])
        pos = self._pos[sec] + 12
        for _ in range(info & 0xFFFF):
            var_id, off, _sz = struct.unpack_from("<III", self._data, pos)
            pos += 12
            name_off = struct.unpack_from("<I", self._data, self._pos[var_id])[0]
            if self._str(name_off) == var:
                return off
        raise BTFError(f"the kernel has no per-CPU variable {var}")


def kernel_btf(path: str | Path | None = None) -> BTF:
    """The running kernel's BTF (``/sys/kernel/btf/vmlinux`` under the host root)."""
    path = path if path is not None else host.path(BTF_PATH)
    try:
        return BTF(Path(path).read_bytes())
    except OSError as err:
        raise BTFError(f"cannot read the kernel's BTF at {path}: {err.strerror}") from err
