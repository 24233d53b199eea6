"""meter top: the table rendered to a string, and once for real in a terminal (tmux)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import numpy as np
import pytest
from rich.console import Console

from meter.records import build
from meter.top import snapshot
from meter.tui import render_top


def _records() -> np.ndarray:
    rows = []
    for _ in range(1000):  # one second of 1 ms windows
        rows += [("acme", "vswitch", 600_000, 1_200_000, 10), ("acme", "vm", 200_000, 400_000, 0),
                 ("globex", "vswitch", 100_000, 200_000, 5), ("idle", "idle", 1_100_000, -1, -1)]
    n = len(rows)
    b = build(n, {
        "window_start_ns": np.repeat(1_000_000_000 + np.arange(1000) * 1_000_000, 4),
        "window_ms": 1,
        "tenant": np.array([r[0] for r in rows], dtype=object),
        "compartment": np.array([r[1] for r in rows], dtype=object),
        "cpu_ns": np.array([r[2] for r in rows]),
        "cycles": np.array([r[3] for r in rows]),
        "rx_packets": np.array([r[4] for r in rows]),
        "rx_wire_packets": np.array([r[4] * 45 if r[4] >= 0 else r[4] for r in rows]),  # GSO skbs
        "counters_source": "cpu-clock estimate",
        "energy_source": "model",
    })
    return b


def _text(renderable) -> str:
    console = Console(width=180, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_snapshot_rates():
    snap = snapshot(_records(), ncpu=2)
    by = {r.tenant: r for r in snap.tenants}
    assert snap.seconds == pytest.approx(1.0)
    assert by["acme"].cpu_pct == pytest.approx(80.0)
    assert by["acme"].rates["cycles"] == pytest.approx(1.6e9)
    assert by["acme"].rates["rx_packets"] == pytest.approx(10_000)
    assert by["acme"].rates["rx_wire_packets"] == pytest.approx(450_000)
    assert by["idle"].rates["rx_packets"] is None  # unavailable, not 0
    assert by["acme"].ipc is None


def test_table_rows_dashes_sorting_and_expansion():
    snap = snapshot(_records(), ncpu=2)
    text = _text(render_top(snap, host="h1"))
    lines = text.splitlines()
    header = next(line for line in lines if "TENANT/COMPARTMENT" in line)
    assert "CPU% ▼" in header  # the sort column is marked
    order = [line.split()[0] for line in lines if line.split() and line.split()[0] in ("acme", "globex", "idle")]
    assert order == ["idle", "acme", "globex"]  # by CPU, descending
    assert "cycles: estimated (no PMU)" in text and "energy: model" in text
    acme = next(line for line in lines if line.startswith(" acme") or line.startswith("acme"))
    assert "80.0" in acme and "–" in acme  # IPC unavailable shows a dash
    assert "450.0k" in acme and "10.0k" not in acme  # packets on the wire, as billed, not skbs
    assert "vswitch" not in text
    expanded = _text(render_top(snap, expand=True, sort="rx_pps", reverse=False))
    assert "└ vswitch" in expanded and "└ vm" in expanded
    assert "RX pkt/s ▲" in expanded
    assert "q quit" in expanded  # key hints in the footer


@pytest.mark.bpf
def test_top_in_a_real_terminal(cgroups, meter_bin):
    tmux = shutil.which("tmux")
    assert tmux, "tmux is required (make setup installs it)"
    cgroups.make("alpha")
    session = f"metertop{uuid.uuid4().hex[:6]}"
    # Rich believes COLUMNS/LINES over the terminal: let the real 200x40 pane speak.
    cmd = " ".join(["env", "-u", "COLUMNS", "-u", "LINES", *meter_bin, "top", "--cgroup-root", str(cgroups.root),
                    "--interval", "0.5"])
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "200", "-y", "40", cmd], check=True)

    def screen() -> str:
        return subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    def wait_for(text: str, timeout: float = 30) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s = screen()
            if text in s:
                return s
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared:\n{screen()}")

    try:
        wait_for("TENANT/COMPARTMENT")
        s = wait_for(" idle ")
        assert "q quit" in s and "TENANT/COMPARTMENT" in s
        subprocess.run([tmux, "send-keys", "-t", session, ">"], check=True)
        wait_for("CYC/s ▼")
        subprocess.run([tmux, "send-keys", "-t", session, "r"], check=True)
        wait_for("CYC/s ▲")
        subprocess.run([tmux, "send-keys", "-t", session, "?"], check=True)
        wait_for("this help")
        subprocess.run([tmux, "send-keys", "-t", session, " "], check=True)
        wait_for("[paused]")
        subprocess.run([tmux, "send-keys", "-t", session, "q"], check=True)
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if subprocess.run([tmux, "has-session", "-t", session], capture_output=True).returncode != 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("meter top did not quit on q")
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True)


def test_the_header_shows_losses_in_words():
    snap = snapshot(build(0), 2)
    assert "LOST: 5 late ns" in _text(render_top(snap, lost="LOST: 5 late ns"))
    assert "LOST" not in _text(render_top(snap))
