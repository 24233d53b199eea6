"""Kernel headers for bcc: the running kernel's, or a merged fallback tree.

bcc compiles BPF C at run time against kernel headers. Many cloud kernels
(this project's VMs among them) ship none. Debian splits its headers into an
arch tree (``linux-headers-X-amd64``: generated headers, .config) and a
common tree (``linux-headers-X-common``); bcc wants one tree. meter builds a
merged tree of symlinks in its own cache directory, never under
``/lib/modules``, and points bcc at it with ``BCC_KERNEL_SOURCE``.

This is safe only because meter's BPF C uses stable ABI (UAPI contexts,
helpers, scalar tracepoint arguments) and never dereferences a kernel
struct whose layout could differ between these headers and the running
kernel.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
from pathlib import Path

from . import host
from .errors import HeadersError
from .paths import meter_path

__all__ = ["Headers", "cache_dir", "find_headers", "prepare_headers"]

_MARKER = ".meter-complete"


@dataclasses.dataclass(frozen=True)
class Headers:
    """Where bcc finds kernel headers.

    ``kind`` is ``"running"`` (the running kernel's own headers under
    /lib/modules), ``"fallback"`` (a merged distribution tree) or
    ``"missing"``. ``path`` is the tree to hand to ``BCC_KERNEL_SOURCE``
    (None for running headers, which bcc finds itself).
    """

    kind: str
    path: Path | None
    version: str | None = None
    detail: str = ""


def cache_dir() -> Path:
    """meter's cache directory: ``$METER_CACHE_DIR``, /var/cache/meter as root,
    else ``$XDG_CACHE_HOME/meter``."""
    return meter_path("METER_CACHE_DIR", "/var/cache/meter", "XDG_CACHE_HOME", ".cache")


def _running_headers(root: Path, release: str) -> Path | None:
    build = root / "lib/modules" / release / "build"
    if (build / "include").is_dir():
        return build
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def _distribution_pairs(src: Path) -> list[tuple[str, Path, Path]]:
    """(version, arch tree, common tree) for each Debian headers pair, newest first."""
    pairs = []
    for common in src.glob("linux-headers-*-common"):
        version = common.name[len("linux-headers-") : -len("-common")]
        for arch in sorted(src.glob(f"linux-headers-{version}-*")):
            if arch == common or not (arch / "include").is_dir():
                continue
            if (arch / ".config").exists() or (arch / "include/generated").is_dir():
                pairs.append((version, arch, common))
                break
    pairs.sort(key=lambda p: _version_key(p[0]), reverse=True)
    return pairs


def find_headers(root: str | Path | None = None) -> Headers:
    """Say which headers bcc would use here, without preparing anything."""
    root = host.root(root)
    release = platform.release()
    running = _running_headers(root, release)
    if running is not None:
        return Headers("running", None, release, str(running))
    pairs = _distribution_pairs(root / "usr/src")
    if pairs:
        version, arch, _common = pairs[0]
        return Headers(
            "fallback",
            cache_dir() / "kernel-headers" / arch.name,
            version,
            f"{arch.name} (+common) for running {release}",
        )
    return Headers("missing", None, None, f"no headers for {release} and none in /usr/src")


def _link_tree(source: Path, dest: Path) -> None:
    """Mirror ``source`` into ``dest`` as symlinks, replacing links already there."""
    for dirpath, _dirnames, filenames in os.walk(source, followlinks=True):
        rel = Path(dirpath).relative_to(source)
        target_dir = dest / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            link = target_dir / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(dirpath) / name)


def prepare_headers(root: str | Path | None = None) -> Headers:
    """Return usable headers, building the merged fallback tree if needed.

    Idempotent: a complete tree (marked by a marker file) is reused.
    Raises :class:`HeadersError` when there is nothing to build from.
    """
    found = find_headers(root)
    if found.kind != "fallback":
        if found.kind == "missing":
            raise HeadersError(
                f"no kernel headers for {platform.release()}: install your "
                "distribution's headers package (Debian: apt-get install "
                "linux-headers-amd64) so meter can build a fallback tree"
            )
        return found
    assert found.path is not None
    if (found.path / _MARKER).exists():
        return found
    pairs = _distribution_pairs(host.root(root) / "usr/src")
    _version, arch, common = pairs[0]
    tmp = found.path.with_name(found.path.name + f".tmp{os.getpid()}")
    try:
        # Common first, then the arch tree over it: its generated headers and
        # .config win where both have a file.
        _link_tree(common, tmp)
        _link_tree(arch, tmp)
        (tmp / _MARKER).write_text(f"{common}\n{arch}\n")
        if found.path.exists():
            shutil.rmtree(found.path)
        tmp.rename(found.path)
    except OSError as err:
        raise HeadersError(
            f"cannot build the fallback kernel header tree in {found.path}: "
            f"{err.strerror or err}; set METER_CACHE_DIR to a writable directory"
        ) from err
    return found
