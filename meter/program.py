"""Compiling and loading meter's BPF programs with bcc.

The C sources ship inside the package (``meter.bpf``) and are found with
``importlib.resources``; settings reach them as ``-D`` cflags, never by
editing the text. Kernel headers come from :mod:`meter.headers`.
bcc is imported lazily so the rest of the library (records, topology,
bills) works on hosts without it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BPFError, PrivilegeError
from .headers import prepare_headers
from .privileges import require_bpf

__all__ = ["bpf_source_dir", "delete_batch", "libbcc", "load", "lookup_batch", "map_fd"]


def bpf_source_dir() -> Path:
    """Directory of the BPF C sources: the ``bpf/`` beside this package when
    meter is imported from a source tree, so that a second checkout (a git
    worktree, say) compiles its own programs and not the installed tree's;
    else the installed ``meter.bpf``."""
    tree = Path(__file__).resolve().parent.parent / "bpf"
    if (tree / "sched.bpf.c").is_file():
        return tree
    return Path(str(resources.files("meter.bpf")))


def load(name: str | list[str], defines: dict[str, Any] | None = None) -> Any:
    """Compile and load ``bpf/<name>.bpf.c`` with ``-D`` settings; return the bcc ``BPF``.

    A list of names is compiled as one unit, in order, so the later files
    use the earlier ones' maps (net.bpf.c after sched.bpf.c).
    Raises :class:`PrivilegeError` or :class:`BPFError` with one clear sentence.
    """
    names = [name] if isinstance(name, str) else list(name)
    name = "+".join(names)
    require_bpf()
    use_kernel_headers()
    try:
        from bcc import BPF
    except ImportError as err:
        raise BPFError(
            "bcc is not importable: install Debian's python3-bpfcc and use a virtualenv made with "
            "--system-site-packages (make setup does both)",
            program=name,
        ) from err
    src = bpf_source_dir()
    flags = cflags(defines)
    try:
        # bcc prints compiler diagnostics to stderr itself; keep ours to one line.
        if len(names) == 1:
            return BPF(src_file=str(src / f"{names[0]}.bpf.c").encode(), cflags=flags)
        return BPF(text=source_text(names).encode(), cflags=flags)
    except Exception as err:  # bcc raises bare Exception
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if "Operation not permitted" in msg or "Permission denied" in msg:
            raise PrivilegeError(f"the kernel refused to load {name}.bpf.c ({msg}): run meter as root") from err
        raise BPFError(f"cannot load BPF program {name}.bpf.c: {msg}", program=name) from err


def use_kernel_headers() -> None:
    """Point bcc at the kernel headers meter found or merged (meter.headers), for any
    program bcc compiles in this process from now on."""
    headers = prepare_headers()
    if headers.path is not None:
        os.environ["BCC_KERNEL_SOURCE"] = str(headers.path)


def cflags(defines: dict[str, Any] | None = None) -> list[str]:
    """The compiler flags a program is built with: meter.h's directory and the ``-D`` settings."""
    return [f"-I{bpf_source_dir()}", "-Wno-macro-redefined", *(f"-D{k}={v}" for k, v in (defines or {}).items())]


def source_text(names: list[str]) -> str:
    """The program text of ``names`` compiled as one unit (one text, not #includes:
    bcc only takes programs from its main file)."""
    src = bpf_source_dir()
    return "\n".join((src / f"{n}.bpf.c").read_text(encoding="utf-8") for n in names)


def listing(names: list[str], defines: dict[str, Any] | None = None) -> str:
    """What would be compiled, as bcc's tools print it with --ebpf: flags, then the text."""
    head = "".join(f"// cflag: {f}\n" for f in cflags(defines))
    return head + source_text(names)


def map_fd(bpf: Any, table: bytes) -> int:
    """The file descriptor of a bcc table, for batch syscalls."""
    return int(bpf[table].map_fd)


def map_array(bpf: Any, table: bytes, dtype: np.dtype, n: int) -> tuple[mmap.mmap, np.ndarray]:
    """A ``BPF_F_MMAPABLE`` array map's first ``n`` values as a numpy view of kernel
    memory (and the mapping, to close when done): read and written in place."""
    size = -(-n * dtype.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        m = mmap.mmap(map_fd(bpf, table), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        raise BPFError(f"cannot map the {table.decode()} map into memory: {err.strerror}") from err
    return m, np.frombuffer(m, dtype, n)


def unmap(maps: list[mmap.mmap]) -> None:
    """Close mappings from :func:`map_array` (one still viewed goes with its last view)."""
    for m in maps:
        try:
            m.close()
        except BufferError:
            pass
    maps.clear()


_LIB: Any = None


def libbcc() -> Any:
    """libbcc through ctypes, with the batch map calls typed."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL("libbcc.so.0", use_errno=True)
        u32p = ctypes.POINTER(ctypes.c_uint32)
        lib.bpf_lookup_batch.restype = ctypes.c_int
        lib.bpf_lookup_batch.argtypes = [ctypes.c_int, u32p, u32p, ctypes.c_void_p, ctypes.c_void_p, u32p]
        lib.bpf_delete_batch.restype = ctypes.c_int
        lib.bpf_delete_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, u32p]
        lib.bpf_lookup_elem.restype = ctypes.c_int
        lib.bpf_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def lookup_batch(fd: int, keys: Any, values: Any) -> int:
    """Read up to ``len(keys)`` entries of a hash map into numpy buffers.

    ``keys`` and ``values`` are writable contiguous numpy arrays sized for
    the whole map (for a per-CPU map, each value row holds every possible
    CPU's slot). Returns the number read.
    """
    lib = libbcc()
    total = 0
    token = ctypes.c_uint32(0)
    capacity = len(keys)
    kbase, vbase = keys.ctypes.data, values.ctypes.data
    kstride, vstride = keys.strides[0], values.strides[0]
    while total < capacity:
        count = ctypes.c_uint32(capacity - total)
        res = lib.bpf_lookup_batch(
            fd,
            ctypes.byref(token) if total else None,
            ctypes.byref(token),
            ctypes.c_void_p(kbase + kstride * total),
            ctypes.c_void_p(vbase + vstride * total),
            ctypes.byref(count),
        )
        err = ctypes.get_errno()
        total += count.value
        if res != 0:
            if err == errno.ENOENT:
                break
            raise BPFError(f"BPF_MAP_LOOKUP_BATCH failed: {os.strerror(err)}")
    return total


class EntryReader:
    """One u32-keyed entry of a map, read into a kept contiguous numpy buffer
    (for a per-CPU map, one value per possible CPU) by one syscall, with the
    call's arguments made once: no bcc table objects, no ctypes helpers per read."""

    def __init__(self, fd: int, key: int, values: np.ndarray) -> None:
        self.values = values
        self._key = ctypes.c_uint32(key)
        self._args = (fd, ctypes.byref(self._key), ctypes.c_void_p(values.ctypes.data))
        self._lookup = libbcc().bpf_lookup_elem

    def read(self) -> np.ndarray:
        """The entry, in :attr:`values` (overwritten at each read)."""
        if self._lookup(*self._args) != 0:
            raise BPFError(f"BPF_MAP_LOOKUP_ELEM of key {self._key.value} failed: {os.strerror(ctypes.get_errno())}")
        return self.values


def delete_batch(fd: int, keys: Any) -> None:
    """Delete the given keys (a contiguous numpy array) from a hash map."""
    if len(keys) == 0:
        return
    count = ctypes.c_uint32(len(keys))
    keys = np.ascontiguousarray(keys)
    res = libbcc().bpf_delete_batch(fd, ctypes.c_void_p(keys.ctypes.data), ctypes.byref(count))
    if res != 0:
        err = ctypes.get_errno()
        raise BPFError(f"BPF_MAP_DELETE_BATCH failed after {count.value} of {len(keys)}: {os.strerror(err)}")
