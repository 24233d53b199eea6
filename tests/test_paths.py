"""Files meter writes: never through a planted link, always 0600 (any user)."""

from __future__ import annotations

import os

import pytest

from meter.errors import SinkError
from meter.sinks.files import FileSink
from meter.sinks.store import Store

from .test_bill import records


@pytest.fixture
def victim(tmp_path):
    """A file outside that a planted link points at; it must never change."""
    v = tmp_path / "victim"
    v.write_text("precious\n")
    v.chmod(0o644)
    return v


def _untouched(v) -> bool:
    return v.read_text() == "precious\n" and v.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("make", ["symlink", "hardlink"])
def test_a_link_planted_where_meter_writes_is_refused_and_its_target_untouched(tmp_path, victim, make):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("r.jsonl", "r.db", "r.db.lock"):
        (os.symlink if make == "symlink" else os.link)(victim, out / name)
    with pytest.raises(SinkError, match="symbolic link" if make == "symlink" else "hard links"):
        FileSink(str(out / "r.jsonl"), "jsonl", append=True)
    with pytest.raises(SinkError, match=str(out / "r.db")):
        Store(out / "r.db")
    assert _untouched(victim)


def test_the_store_lock_is_never_followed(tmp_path, victim):
    os.symlink(victim, tmp_path / "r.db.lock")
    with Store(tmp_path / "r.db") as s, pytest.raises(SinkError, match="symbolic link"):
        s.claim("h")
    assert _untouched(victim)


def test_files_meter_writes_are_0600_also_when_they_existed(tmp_path):
    for name in ("r.jsonl", "r.db"):
        (tmp_path / name).write_text("")
        (tmp_path / name).chmod(0o644)
    sink = FileSink(str(tmp_path / "r.jsonl"), "jsonl", append=True)
    sink.write(records("h", 1))
    sink.close()
    with Store(tmp_path / "r.db") as s:
        s.write(records("h", 1))
    for name in ("r.jsonl", "r.db", "r.db.lock"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    with Store(tmp_path / "new" / "deeper" / "r.db"):
        pass
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "deeper").stat().st_mode & 0o777 == 0o700


def test_parquet_parts_are_written_whole_then_renamed_over_any_link(tmp_path, victim):
    pytest.importorskip("pyarrow")
    from meter.sinks.parquet import write_parquet

    batch = records("h", 10)
    (first,) = write_parquet(batch, tmp_path / "x")
    first.unlink()
    os.symlink(victim, first)  # planted at the name the next export writes
    (again,) = write_parquet(batch, tmp_path / "x")
    assert again == first and not again.is_symlink() and again.stat().st_mode & 0o777 == 0o600
    assert _untouched(victim)
    assert [p.name for p in again.parent.iterdir()] == [again.name]  # no temporary left behind
