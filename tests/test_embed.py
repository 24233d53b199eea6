"""Embedding: start and stop repeatedly without leaks; snapshots, callbacks, asyncio."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import numpy as np
import pytest

from meter import Topology
from meter.engine import Meter

pytestmark = pytest.mark.bpf


def _meter_programs() -> set[int]:
    """Ids of the BPF programs this process holds open (others' meters may run on the host)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                out |= {int(line.split()[1]) for line in f if line.startswith("prog_id:")}
        except OSError:
            continue  # the fd closed meanwhile
    return out


def _settle(check, timeout=2.0):
    end = time.monotonic() + timeout
    while not check() and time.monotonic() < end:
        time.sleep(0.05)
    return check()


def test_start_stop_repeatedly_leaks_nothing(tmp_path, cgroups, cgroup_mount, net):
    ns = net.ns("e")
    net.veth(net.name("e0"), "eth0", b_ns=ns)
    cg = cgroups.make("emb")
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[tenant]]\nname = "emb"\n[[tenant.compartment]]\nname = "vs"\n'
                   f'cgroup = "{cg.relative_to(cgroup_mount)}"\ninterfaces = ["{net.name("e0")}", "{ns}:eth0"]\n')
    topo = Topology.from_file(cfg)
    # Warm up once (bcc, pyroute2 and numpy open what they keep for the process).
    m = Meter(topo)
    m.start()
    m.stop()
    m.close()
    progs = _meter_programs()
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    for _ in range(3):
        m = Meter(topo)
        seen = []
        m.on_batch(seen.append)
        m.start()
        time.sleep(0.4)
        snap = m.totals()  # thread-safe while the drain thread runs
        assert {r["tenant"] for r in snap} >= {"host", "emb"}  # (idle only if a CPU idled)
        m.stop()
        m.close()
        assert seen
        assert _settle(lambda: _meter_programs() <= progs), "BPF programs left behind"
        assert threading.active_count() == threads
        assert len(os.listdir("/proc/self/fd")) == fds
        for dev, where in ((net.name("e0"), None), ("eth0", ns)):
            pre = ["ip", "netns", "exec", where] if where else []
            shown = subprocess.run([*pre, "tc", "filter", "show", "dev", dev, "ingress"], capture_output=True,
                                   text=True).stdout
            assert "meter" not in shown


def test_asyncio_iterator(cgroups):
    cgroups.make("a")

    async def main() -> list[np.ndarray]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        out = []
        with Meter(Topology.discover(cgroups.root), drain_interval=0.1, batch_interval=0.1) as m:
            async for batch in m.abatches(0.5):
                out.append(batch)
        t.cancel()
        assert ticks > 20  # the event loop kept running while meter drained
        return out

    batches = asyncio.run(main())
    assert sum(len(b) for b in batches) > 400
