"""Kernel headers: running, fallback (merged tree in meter's cache), missing."""

from __future__ import annotations

import platform

import pytest

from meter.errors import HeadersError
from meter.headers import find_headers, prepare_headers


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _debian_headers(root, version="6.1.0-9"):
    common = root / f"usr/src/linux-headers-{version}-common"
    arch = root / f"usr/src/linux-headers-{version}-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/sched.h").write_text("/* common */")
    (common / "arch/x86/include/asm").mkdir(parents=True)
    (common / "arch/x86/include/asm/ptrace.h").write_text("/* ptrace */")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "include/generated/autoconf.h").write_text("/* generated */")
    (arch / "include/linux").mkdir(parents=True)
    (arch / "include/linux/sched.h").write_text("/* arch wins */")
    (arch / ".config").write_text("CONFIG_BPF=y\n")
    return common, arch


def test_running_headers_win(tmp_path, cache):
    (tmp_path / "lib/modules" / platform.release() / "build/include").mkdir(parents=True)
    _debian_headers(tmp_path)
    h = find_headers(tmp_path)
    assert h.kind == "running" and h.path is None


def test_fallback_tree_is_merged_in_the_cache(tmp_path, cache):
    _debian_headers(tmp_path, "6.1.0-9")
    _debian_headers(tmp_path, "6.1.0-12")  # newest wins
    h = prepare_headers(tmp_path)
    assert h.kind == "fallback" and h.version == "6.1.0-12"
    assert h.path is not None and cache in h.path.parents
    assert (h.path / "include/generated/autoconf.h").read_text() == "/* generated */"
    assert (h.path / "arch/x86/include/asm/ptrace.h").exists()
    assert (h.path / "include/linux/sched.h").read_text() == "/* arch wins */"
    assert (h.path / ".config").exists()
    assert not (tmp_path / "lib/modules").exists()  # nothing written there
    # Idempotent: a second call reuses the tree.
    mtime = (h.path / ".meter-complete").stat().st_mtime_ns
    assert prepare_headers(tmp_path).path == h.path
    assert (h.path / ".meter-complete").stat().st_mtime_ns == mtime


def test_missing_headers_say_what_to_install(tmp_path, cache):
    (tmp_path / "usr/src").mkdir(parents=True)
    assert find_headers(tmp_path).kind == "missing"
    with pytest.raises(HeadersError, match="linux-headers"):
        prepare_headers(tmp_path)
