"""cgroup v2: where it is mounted, ids and paths, and the kernel's own usage.

The id ``bpf_get_current_cgroup_id()`` returns for a task is the inode
number of its cgroup v2 directory. Ids are not stable across a directory
being removed and recreated, so meter resolves them at run time and keeps
what it has resolved (a removed cgroup's usage still needs a name).

Readers take an overridable root so tests can point them at a fake tree.
"""

from __future__ import annotations

import fcntl
import os
import sys
import termios
from collections.abc import Iterable
from pathlib import Path

from . import host
from .errors import CgroupError

__all__ = ["CgroupIndex", "DirWatch", "cgroup_id", "cpu_usage_usec", "find_mount"]


def find_mount(root: str | Path | None = None) -> Path:
    """The cgroup v2 mount point, from /proc/self/mountinfo.

    On a hybrid host that is usually /sys/fs/cgroup/unified, on a unified
    host /sys/fs/cgroup. Raises :class:`CgroupError` when there is none.
    """
    root = host.root(root)
    try:
        text = (root / "proc/self/mountinfo").read_text()
    except OSError as err:
        raise CgroupError(f"cannot read /proc/self/mountinfo: {err.strerror}") from err
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        if fstype == "cgroup2":
            return root / fields[4].lstrip("/")
    raise CgroupError(
        "cgroup v2 is not mounted: mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) "
        "or boot with systemd.unified_cgroup_hierarchy=1"
    )


def cgroup_id(path: str | Path) -> int:
    """The cgroup id of a cgroup v2 directory (its inode number)."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError as err:
        raise CgroupError(f"cgroup {path} does not exist: create it or fix the topology", path=str(path)) from err
    except OSError as err:
        raise CgroupError(f"cannot stat cgroup {path}: {err.strerror}", path=str(path)) from err


class DirWatch:
    """Has any directory been made, removed or moved in these directories (inotify)?

    cgroupfs reports mkdir and rmdir to inotify like any filesystem, so a
    compartment whose cgroup was removed and made again (a new id) shows up
    as an event in its parent: following ids costs one non-blocking read a
    drain instead of a stat per compartment (3 % of a core for 1,000 at 4
    drains a second). ``changed()`` is True on its first call, after any
    event, while a directory could not be watched (not there yet), and if
    the kernel's event queue overflowed; so a caller that rescans on True
    misses nothing.
    """

    _MASK = 0x100 | 0x200 | 0x40 | 0x80 | 0x400 | 0x800  # CREATE, DELETE, MOVED_FROM/TO, DELETE/MOVE_SELF

    def __init__(self, dirs: Iterable[Path]) -> None:
        import ctypes

        self.dirs = frozenset(dirs)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self._blind = self._fd < 0
        self._first = True
        for d in self.dirs:
            if self._fd < 0 or self._libc.inotify_add_watch(self._fd, os.fsencode(d), self._MASK) < 0:
                self._blind = True  # not there yet (or no inotify): rescan every time

    def changed(self) -> bool:
        first, self._first = self._first, False
        seen = False
        # The bytes of events waiting (FIONREAD): none, the usual case, is one call, with
        # no read that fails (a raised BlockingIOError costs tens of microseconds after
        # the drain's sleep).
        if self._fd >= 0 and int.from_bytes(fcntl.ioctl(self._fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder):
            while True:
                try:
                    seen = bool(os.read(self._fd, 65536)) or seen
                except BlockingIOError:
                    break
        return first or seen or self._blind

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def cpu_usage_usec(path: str | Path) -> int:
    """``usage_usec`` from a cgroup's ``cpu.stat``: the kernel's own total."""
    try:
        text = (Path(path) / "cpu.stat").read_text()
    except OSError as err:
        raise CgroupError(f"cannot read {path}/cpu.stat: {err.strerror}", path=str(path)) from err
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise CgroupError(f"{path}/cpu.stat has no usage_usec", path=str(path))


class CgroupIndex:
    """Maps cgroup ids to paths below a cgroup v2 mount, and remembers them.

    ``resolve(ids)`` rescans the tree when it meets an id it has not seen,
    so cgroups created after start are picked up; ids of removed cgroups
    keep the path they had.
    """

    def __init__(self, mount: str | Path) -> None:
        self.mount = Path(mount)
        self._paths: dict[int, Path] = {}
        self.scans = 0
        self.scan()

    def scan(self) -> None:
        """Walk the whole tree once and record every directory's id."""
        self.scans += 1
        for dirpath, _dirnames, _files in os.walk(self.mount):
            try:
                self._paths[os.stat(dirpath).st_ino] = Path(dirpath)
            except FileNotFoundError:
                continue  # removed while walking

    def path(self, cgid: int) -> Path | None:
        """The path of ``cgid`` if it is known (without rescanning)."""
        return self._paths.get(cgid)

    def resolve(self, ids: list[int]) -> dict[int, Path | None]:
        """Paths for ``ids``; one rescan if any is unknown."""
        if any(i not in self._paths for i in ids):
            self.scan()
        return {i: self._paths.get(i) for i in ids}
