"""Where meter keeps files, and how it creates them.

Where: an environment variable wins, then root's system directory, then the
user's XDG directory. How: every file meter writes (records, the store,
Parquet exports, locks) is opened by :func:`open_private`: never through a
symlink at its last component, never a file with other hard links (a link
planted in a world-writable directory must not make root overwrite or chmod
its target), always a regular file, and mode 0600 also when it existed
before (it holds billing data). Directories meter creates are 0700.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from .errors import SinkError

__all__ = ["meter_path", "open_private", "private_dir", "write_whole"]


def meter_path(env: str, as_root: str, xdg_env: str, xdg_default: str, *rel: str) -> Path:
    """``$env`` if set; ``as_root`` for root; else ``$xdg_env`` (or ~/``xdg_default``)/meter/``rel``."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    if os.geteuid() == 0:
        return Path(as_root)
    base = os.environ.get(xdg_env) or str(Path.home() / xdg_default)
    return Path(base, "meter", *rel)


def private_dir(path: str | Path) -> Path:
    """``path`` as a directory, creating what is missing with mode 0700."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        for d in reversed(missing):
            d.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise SinkError(f"cannot create the directory {d}: {err.strerror}", target=str(d)) from err
    if not path.is_dir():
        raise SinkError(f"{path} is not a directory", target=str(path))
    return path


def open_private(path: str | Path, flags: int = os.O_WRONLY, *, what: str = "file") -> int:
    """Open (creating it 0600) the regular file ``path`` for meter to write; a file descriptor.

    ``flags`` adds to O_CREAT | O_NOFOLLOW | O_CLOEXEC (e.g. O_APPEND, O_TRUNC, O_EXCL).
    Raises SinkError, naming the path, for a symlink, a hard-linked or
    non-regular file, or any failure to open.
    """
    path = str(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SinkError(f"{path} is a symbolic link: meter writes its {what} only to a plain file; "
                            "remove the link or choose another path", target=path) from None
        raise SinkError(f"cannot write the {what} {path}: {err.strerror}", target=path) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SinkError(f"{path} is not a regular file: choose another path for the {what}", target=path)
        if st.st_nlink > 1:
            raise SinkError(f"{path} has other hard links: meter writes its {what} only to a file of its own; "
                            "remove it or choose another path", target=path)
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except OSError as err:
        os.close(fd)
        raise SinkError(f"cannot make the {what} {path} private (mode 0600): {err.strerror}", target=path) from err
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_whole(path: str | Path, data: bytes, *, what: str = "file") -> None:
    """Write ``data`` as the 0600 file ``path``, whole: under a hidden temporary
    name, synced, then renamed over ``path``. A kill leaves no truncated file for
    a reader, and a link planted at ``path`` is replaced, never followed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC, what=what)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
