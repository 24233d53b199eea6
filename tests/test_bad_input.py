"""Every bad input of every command: one line `meter: error: ...`, exit 1, no
traceback, nothing written (any user, no kernel)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .test_bill import PRICES, T0, records

FROM, TO = str(T0 // 10**9), str(T0 // 10**9 + 3)
GOOD_TOPOLOGY = '[[tenant]]\nname = "a"\n[[tenant.compartment]]\nname = "x"\ncgroup = "c"\n'

#: (name, file contents or None, argv with {f} for that file and {d} for the test's directory)
CASES = [
    # price sheets
    ("binary prices", b"\xff\xfe\x00", ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    ("deep prices", b"a = " + b"[" * 2000 + b"]" * 2000 + b"\n", ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    ("directory prices", None, ["bill", "--prices", "{d}", "--from", FROM, "--to", TO]),
    ("price 1e30", PRICES.replace('"0.02"', '"1e30"').encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    ("price 1e300", PRICES.replace('"0.02"', "1e300").encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    ("price 5000 digits", PRICES.replace('"0.02"', '"' + "9" * 5000 + '"').encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    ("price 1e999999999", PRICES.replace('"0.02"', '"1e999999999"').encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    ("negative price", PRICES.replace('"0.02"', '"-0.02"').encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    # billing times
    ("--to 1e10", PRICES.encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", "1e10"]),
    ("--to 2262", PRICES.encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", "2262-05-01"]),
    ("--from Infinity", PRICES.encode(), ["bill", "--prices", "{f}", "--from", "Infinity", "--to", TO]),
    ("--from half a second", PRICES.encode(), ["bill", "--prices", "{f}", "--from", "0.5", "--to", TO]),
    ("reversed bill", PRICES.encode(), ["bill", "--prices", "{f}", "--from", TO, "--to", FROM]),
    ("no --from", PRICES.encode(), ["bill", "--prices", "{f}", "--to", TO]),
    ("bad format", PRICES.encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", TO, "--format", "xml"]),
    ("charge period 7 s", PRICES.encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO, "--format", "focus", "--charge-period", "7"]),
    ("billing period week", PRICES.encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO, "--billing-period", "week"]),
    ("issue from parquet", PRICES.encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO, "--parquet", "{d}", "--issue"]),
    ("fleet and parquet", PRICES.encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO, "--parquet", "{d}", "--fleet", "{d}"]),
    ("fleet without a table", PRICES.encode(), ["bill", "--prices", "{f}", "--from", FROM, "--to", TO, "--fleet", "{d}"]),
    ("price 13 decimals", PRICES.replace('"0.02"', '"0.0000000000001"').encode(),
     ["bill", "--prices", "{f}", "--from", FROM, "--to", TO]),
    # ship and commit
    ("ship into /proc", None, ["ship", "--to", "/proc/meter-segments"]),
    ("ship to a bucket-less URL", None, ["ship", "--to", "nosuchproto://x/y"]),
    ("commit from nowhere", None, ["commit", "--segments", "{d}/none", "--table", "{d}/table"]),
    # export
    ("export into /proc", None, ["export", "--parquet", "/proc/x"]),
    ("reversed export", None, ["export", "--parquet", "{d}/out", "--from", TO, "--to", FROM]),
    # economics
    ("negative servers", None, ["economics", "--set", "servers=-5"]),
    ("NaN utilisation", None, ["economics", "--set", "vswitch_utilisation=NaN"]),
    ("unknown assumption", None, ["economics", "--set", "colour=5"]),
    # record: refused before anything is loaded or stored
    ("binary topology", b"\xff\xfe\x00", ["record", "--config", "{f}", "--duration", "1"]),
    ("deep topology", b"a = " + b"[" * 2000 + b"]" * 2000 + b"\n", ["record", "--config", "{f}", "--duration", "1"]),
    ("compartment = 5", b'[[tenant]]\nname = "a"\ncompartment = 5\n', ["record", "--config", "{f}", "--duration", "1"]),
    ("--duration nan", GOOD_TOPOLOGY.encode(), ["record", "--config", "{f}", "--duration", "nan"]),
    ("--duration -1", GOOD_TOPOLOGY.encode(), ["record", "--config", "{f}", "--duration", "-1"]),
    ("--window-ms 0", GOOD_TOPOLOGY.encode(), ["record", "--config", "{f}", "--window-ms", "0", "--duration", "1"]),
    ("config and root", GOOD_TOPOLOGY.encode(), ["record", "--config", "{f}", "--cgroup-root", "/", "--duration", "1"]),
    ("unknown command", None, ["frobnicate"]),
]


def _tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file with its size and mtime (directories aside: SQLite's reader
    makes and removes its -wal and -shm files beside the store)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("name", "content", "argv"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_1_and_writes_nothing(tmp_path, meter_bin, name, content, argv):
    from meter.sinks.store import Store

    store = tmp_path / "store" / "records.db"
    with Store(store) as s:
        s.write(records("h", 10))
    f = tmp_path / "input"
    if content is not None:
        f.write_bytes(content)
    before = _tree(tmp_path)
    env = dict(os.environ, METER_STORE=str(store))
    res = subprocess.run([*meter_bin, *(a.format(f=f, d=tmp_path) for a in argv)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stderr.startswith("meter: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert _tree(tmp_path) == before  # no file created or changed
