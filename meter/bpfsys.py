"""The bpf(2) syscall through ctypes, for what bcc does not offer.

``meter check`` loads a two-instruction program and opens a raw tracepoint
with it (probes); the exporter asks the kernel about meter's own programs
by fd (``BPF_OBJ_GET_INFO_BY_FD``), so its ``meter_bpf_*`` series cover
this meter's programs only, not every ``meter_*`` program on the host.
Layouts are the kernel's uapi ``union bpf_attr`` and ``struct
bpf_prog_info`` (include/uapi/linux/bpf.h), fixed since their fields were
added (run_time_ns and run_cnt: Linux 5.1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import struct
from typing import Any

__all__ = ["PROG_RAW_TRACEPOINT", "PROG_SCHED_CLS", "PROG_SOCKET_FILTER", "Bpf", "ProgInfo", "held_prog_ids"]

_NR_BPF = {"x86_64": 321, "aarch64": 280}
_PROG_LOAD = 5
_OBJ_GET_INFO_BY_FD = 15
_RAW_TRACEPOINT_OPEN = 17
PROG_SOCKET_FILTER = 1
PROG_SCHED_CLS = 3
PROG_RAW_TRACEPOINT = 17
# r0 = 0; exit
_INSNS = bytes.fromhex("b700000000000000" "9500000000000000")
_ATTR_SIZE = 128

# struct bpf_prog_info: the fields read, by offset (uapi order, 8-byte aligned u64s).
_INFO_SIZE = 216
_INFO_ID = 4
_INFO_NAME = 64  # char name[BPF_OBJ_NAME_LEN = 16]
_INFO_RUN_TIME_NS = 192
_INFO_RUN_CNT = 200


def held_prog_ids(proc: str = "/proc") -> set[int]:
    """Ids of every BPF program some process in this pid namespace holds an fd of.

    A program attached by netlink (a tc filter) and held by no fd outlived
    the process that loaded it (killed with SIGKILL, say). Read from each
    fd's ``/proc/PID/fdinfo`` (``prog_id:``, Linux 4.13+), as bpftool's
    ``pids`` column does; processes that exit while being read are skipped.
    """
    out: set[int] = set()
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:  # exited, or a kernel thread's
            continue
        for fd in fds:
            try:
                if os.readlink(f"{proc}/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"{proc}/{pid}/fdinfo/{fd}") as f:
                    out.update(int(line.split()[1]) for line in f if line.startswith("prog_id:"))
            except (OSError, ValueError, IndexError):
                continue
    return out


@dataclasses.dataclass(frozen=True)
class ProgInfo:
    """What the kernel reports of one loaded program."""

    id: int
    #: The kernel's name: at most 15 characters (longer names are cut).
    name: str
    #: Totals while ``kernel.bpf_stats_enabled`` was 1 (0 otherwise).
    run_time_ns: int
    run_cnt: int


class Bpf:
    """The bpf(2) syscall: each call returns (result, errno)."""

    def __init__(self) -> None:
        self.nr = _NR_BPF.get(platform.machine())
        self.libc = ctypes.CDLL(None, use_errno=True)
        self._keep: list[Any] = []

    def call(self, cmd: int, attr: bytes) -> tuple[int, int]:
        if self.nr is None:
            return -1, 38  # ENOSYS
        buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
        fd = self.libc.syscall(self.nr, cmd, buf, _ATTR_SIZE)
        return fd, ctypes.get_errno() if fd < 0 else 0

    def load(self, prog_type: int, name: bytes = b"meter_check") -> tuple[int, int]:
        """Load ``r0 = 0; exit`` as ``prog_type``: (fd, errno)."""
        insns = ctypes.create_string_buffer(_INSNS, len(_INSNS))
        lic = ctypes.create_string_buffer(b"GPL")
        self._keep += [insns, lic]
        attr = struct.pack(
            "=IIQQIIQII16s",
            prog_type,
            len(_INSNS) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(lic),
            0,
            0,
            0,
            0,
            0,
            name,
        )
        return self.call(_PROG_LOAD, attr)

    def raw_tracepoint(self, name: str, prog_fd: int) -> tuple[int, int]:
        """Attach ``prog_fd`` to a raw tracepoint: (link fd, errno)."""
        cname = ctypes.create_string_buffer(name.encode())
        self._keep.append(cname)
        return self.call(_RAW_TRACEPOINT_OPEN, struct.pack("=QI", ctypes.addressof(cname), prog_fd))

    def prog_info(self, prog_fd: int) -> ProgInfo:
        """The kernel's id, name and run statistics of the program behind ``prog_fd``.

        Raises OSError when the fd is not a loaded program.
        """
        info = ctypes.create_string_buffer(_INFO_SIZE)
        res, err = self.call(_OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", prog_fd, _INFO_SIZE, ctypes.addressof(info)))
        if res < 0:
            raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD on fd {prog_fd}: {os.strerror(err)}")
        raw = info.raw
        (pid,) = struct.unpack_from("=I", raw, _INFO_ID)
        name = raw[_INFO_NAME : _INFO_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
        run_time_ns, run_cnt = struct.unpack_from("=QQ", raw, _INFO_RUN_TIME_NS)
        return ProgInfo(pid, name, run_time_ns, run_cnt)
