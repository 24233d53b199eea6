"""Per-schedule CPU attribution against the kernel's own books (root, real cgroups)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from meter import NULL, Topology
from meter.cgroup import cpu_usage_usec
from meter.engine import Meter, plan_counters, window_sums, window_totals
from meter.records import code, text

from .conftest import steal_ns
from .loads import CHURN, WAKERS

pytestmark = pytest.mark.bpf


def _topology(tmp_path: Path, mount: Path, comps: dict[str, Path]) -> Topology:
    lines = []
    for name, cg in comps.items():
        lines += ["[[tenant]]", f'name = "{name}"', "[[tenant.compartment]]", 'name = "vswitch"',
                  f'cgroup = "{cg.relative_to(mount)}"', ""]
    cfg = tmp_path / "topology.toml"
    cfg.write_text("\n".join(lines))
    return Topology.from_file(cfg)


def _run(meter: Meter, seconds: float) -> np.ndarray:
    parts = list(meter.batches(seconds))
    return np.concatenate(parts) if parts else np.zeros(0)


def _usage(batch: np.ndarray, tenant: str) -> int:
    return int(batch["cpu_ns"][batch["tenant"] == code(tenant)].sum())


def test_three_compartments_match_cpu_stat_and_conserve(tmp_path, cgroups, cgroup_mount):
    duties = {"acme": 0.9, "globex": 0.5, "initech": 0.2}
    cgs = {name: cgroups.make(name) for name in duties}
    topo = _topology(tmp_path, cgroup_mount, cgs)
    with Meter(topo, window_ms=1) as meter:
        time.sleep(0.02)  # past the first whole window
        before = {n: cpu_usage_usec(cg) for n, cg in cgs.items()}
        steal0 = steal_ns()
        procs = [cgroups.burner(cgs[n], d, 3.0) for n, d in duties.items()]
        batches = []
        for b in meter.batches():
            batches.append(b)
            if all(p.poll() is not None for p in procs):
                break
        after = {n: cpu_usage_usec(cg) for n, cg in cgs.items()}
        steal = steal_ns() - steal0
        batches += list(meter.batches(0.05))
    batch = np.concatenate(batches)
    for name in duties:
        kernel_ns = (after[name] - before[name]) * 1000
        metered = _usage(batch, name)
        assert kernel_ns > 0.3e9 * duties[name]
        assert abs(metered - kernel_ns) <= 0.01 * kernel_ns + steal, (name, metered, kernel_ns, steal)
    # More duty, more CPU: the bill follows the work.
    assert _usage(batch, "acme") > _usage(batch, "globex") > _usage(batch, "initech")

    starts, sums = window_sums(batch, "cpu_ns")
    expected = meter.ncpu * 1_000_000
    assert len(starts) >= 3000
    assert np.all(np.abs(sums - expected) <= 0.005 * expected), sums[np.abs(sums - expected) > 0.005 * expected][:5]
    # Windows are contiguous: no gaps.
    assert np.all(np.diff(starts) == 1_000_000)
    assert meter.stats.late_ns == 0
    # (No idle row is promised: on a host kept 100 % busy there is none; the sums above hold either way.)
    assert set(np.unique(text(batch, "tenant"))) >= {"acme", "globex", "initech", "host"}


def test_long_slice_is_split_into_one_ms_windows(tmp_path, cgroups, cgroup_mount):
    cg = cgroups.make("spin")
    topo = _topology(tmp_path, cgroup_mount, {"spin": cg})
    with Meter(topo, window_ms=1) as meter:
        steal0 = steal_ns()
        time.sleep(0.02)
        p = cgroups.burner(cg, 1.0, 0.5)
        parts = []
        for b in meter.batches():
            parts.append(b)
            if p.poll() is not None:
                break
        batch = np.concatenate([*parts, _run(meter, 0.05)])
    mine = batch[batch["tenant"] == code("spin")]
    # One thread: never more than one window's worth per window, plus what the
    # kernel charged it that meter could only place a window later: a wakeup
    # charged from before its switch (an idle exit, 1-6 us here, so 1 % of W),
    # and steal meter cut at a tick before the kernel took it out of the
    # task's runtime (at most the steal meter saw, the steal row). The windows
    # together hold what the kernel charged it (its cgroup is fresh).
    steal = max(steal_ns() - steal0 + (os.cpu_count() or 1) * 10**9 // os.sysconf("SC_CLK_TCK"),
                int(batch["cpu_ns"][batch["tenant"] == code("steal")].sum()))  # as in the test below
    assert mine["cpu_ns"].max() <= 1_010_000 + steal, (mine["cpu_ns"].max(), steal)
    used = cpu_usage_usec(cg) * 1000
    assert used > 50_000_000 and abs(int(mine["cpu_ns"].sum()) - used) <= 0.002 * used + 1_000
    assert np.all(mine["window_ms"] == 1)


def test_wider_windows(tmp_path, cgroups, cgroup_mount):
    cg = cgroups.make("w")
    topo = _topology(tmp_path, cgroup_mount, {"w": cg})
    with Meter(topo, window_ms=5) as meter:
        time.sleep(0.02)
        batch = _run(meter, 0.3)
    starts, sums = window_sums(batch, "cpu_ns")
    assert np.all(np.diff(starts) == 5_000_000)
    assert np.all(sums == meter.ncpu * 5_000_000)
    assert np.all(batch["window_start_ns"] % 1 == 0) and np.all(batch["window_ms"] == 5)


def test_short_lived_process_is_counted(tmp_path, cgroups, cgroup_mount):
    cg = cgroups.make("blip")
    topo = _topology(tmp_path, cgroup_mount, {"blip": cg})
    with Meter(topo) as meter:
        time.sleep(0.02)
        before = cpu_usage_usec(cg)
        t0 = time.monotonic()
        cgroups.spawn(cg, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64k", "count=300"]).wait()
        lived = time.monotonic() - t0
        after = cpu_usage_usec(cg)
        batch = _run(meter, 0.1)
    assert lived < 0.05
    kernel_ns = (after - before) * 1000
    metered = _usage(batch, "blip")
    assert metered > 0
    assert metered == pytest.approx(kernel_ns, rel=0.05, abs=300_000)


@pytest.mark.parametrize("nudger", ["elsewhere", "on_it", "pinned_to_it"])
def test_a_nudge_charges_a_cpu_whose_switches_join_runs(tmp_path, cgroups, cgroup_mount, nudger):
    """Two threads of this process ping-pong on one CPU: every switch there is
    between two tasks of one cgroup and joins a run, which places nothing. A
    nudge from this thread, a third of the same cgroup, must still make that
    CPU charge (CTL_NUDGE), or its windows stay open until its next tick, a
    window later (1 s here), and a final drain misses them. The nudging
    thread runs on another CPU and moves onto it (``elsewhere``); or it runs
    on it already, having come there by a switch that joined a run, and may
    move (``on_it``: it leaves the CPU) or may not (``pinned_to_it``: it
    sleeps)."""
    import threading

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for the ping-pong, one to nudge it from")
    cpu, other = cpus[-1], cpus[0]
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    stop = threading.Event()

    def ping() -> None:
        os.sched_setaffinity(0, {cpu})
        while not stop.is_set():
            os.write(w1, b"x")
            os.read(r2, 1)
        os.write(w1, b"q")

    def pong() -> None:
        os.sched_setaffinity(0, {cpu})
        while os.read(r1, 1) == b"x":
            os.write(w2, b"x")

    topo = _topology(tmp_path, cgroup_mount, {"t": cgroups.make("t")})
    threads = [threading.Thread(target=f) for f in (pong, ping)]
    original = os.sched_getaffinity(0)
    with Meter(topo, window_ms=1000) as meter:
        src = meter.cpu_source
        table = src.bpf[b"cpu_state"]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 10
            while table[table.Key(0)][cpu].runs < 1000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert table[table.Key(0)][cpu].runs >= 1000, "the ping-pong's switches did not join runs"
            os.sched_setaffinity(0, {other if nudger == "elsewhere" else cpu})
            if nudger == "on_it":
                os.sched_setaffinity(0, original)  # still on it: a new mask moves no task
            t0 = time.monotonic_ns()  # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
            src._nudge([cpu])
            charged = int(table[table.Key(0)][cpu].last_ns)
        finally:
            os.sched_setaffinity(0, original)
            stop.set()
            for t in threads:
                t.join()
    assert charged >= t0, "the nudged CPU charged nothing since the nudge"


def test_removed_compartment_keeps_its_usage(tmp_path, cgroups, cgroup_mount):
    keep, gone = cgroups.make("keep"), cgroups.make("gone")
    topo = _topology(tmp_path, cgroup_mount, {"keep": keep, "gone": gone})
    with Meter(topo) as meter:
        time.sleep(0.02)
        before = cpu_usage_usec(gone)
        cgroups.burner(gone, 1.0, 0.4).wait()
        used = (cpu_usage_usec(gone) - before) * 1000
        cgroups.remove(gone)
        assert not gone.exists()
        batch = _run(meter, 0.5)
    assert _usage(batch, "gone") == pytest.approx(used, rel=0.01)
    assert meter.stats.unresolved_cgroups == 0


def test_nested_cgroups_roll_up_to_their_compartment(cgroups, cgroup_mount):
    tenant = cgroups.make("t1")
    leaf = cgroups.make("t1/vswitch/pmd")
    topo = Topology.discover(cgroups.root)
    with Meter(topo) as meter:
        time.sleep(0.02)
        before = cpu_usage_usec(tenant)
        cgroups.burner(leaf, 1.0, 0.3).wait()
        used = (cpu_usage_usec(tenant) - before) * 1000
        batch = _run(meter, 0.1)
    assert _usage(batch, "t1") == pytest.approx(used, rel=0.01)


def test_cgroup_created_after_start_is_picked_up(cgroups):
    cgroups.make("early")
    topo = Topology.discover(cgroups.root)
    with Meter(topo) as meter:
        time.sleep(0.02)
        late = cgroups.make("newcomer")
        before = cpu_usage_usec(late)
        cgroups.burner(late, 1.0, 0.3).wait()
        used = (cpu_usage_usec(late) - before) * 1000
        batch = _run(meter, 0.1)
    assert _usage(batch, "newcomer") == pytest.approx(used, rel=0.01)


def test_a_discovered_compartments_short_lived_children_are_its_own(cgroups):
    """Under discovery a compartment that appears while metering runs its work in
    children that are gone before the next drain: the kernel charges them to
    their ancestor just below the root, which discovery then names."""
    topo = Topology.discover(cgroups.root)
    with Meter(topo) as meter:
        time.sleep(0.02)
        late = cgroups.make("newcomer")
        for i in range(20):
            child = cgroups.make(f"newcomer/run{i}")
            cgroups.burner(child, 1.0, 0.02).wait()
            cgroups.remove(child)
        used = cpu_usage_usec(late) * 1000  # the children's usage stays in it
        batch = _run(meter, 0.1)
    # The billing target, 0.2 %, and cpu.stat's 1 us unit.
    assert abs(_usage(batch, "newcomer") - used) <= 0.002 * used + 1_000, (_usage(batch, "newcomer"), used)
    assert meter.stats.unresolved_cgroups == 0


def test_perf_counter_plumbing_with_a_software_event(tmp_path, cgroups, cgroup_mount):
    """cpu-clock read per schedule through the per-CPU perf arrays tracks cpu_ns."""
    cg = cgroups.make("c")
    topo = _topology(tmp_path, cgroup_mount, {"c": cg})
    with Meter(topo, counters={"cycles": "sw:cpu-clock"}) as meter:
        steal0 = steal_ns()
        time.sleep(0.02)
        cgroups.burner(cg, 0.7, 0.5).wait()
        batch = _run(meter, 0.1)
    assert set(np.unique(text(batch, "counters_source"))) == {"perf:cycles=sw:cpu-clock"}
    mine = batch[batch["tenant"] == code("c")]
    # cpu-clock counts the clock while a task is on the CPU; cpu_ns is what the
    # kernel charged, which leaves hypervisor steal out: they differ by at most
    # the steal of the run, as the kernel counts it (/proc/stat, to its unit:
    # one tick per CPU), or as the steal row holds it.
    steal = max(steal_ns() - steal0 + (os.cpu_count() or 1) * 10**9 // os.sysconf("SC_CLK_TCK"),
                int(batch["cpu_ns"][batch["tenant"] == code("steal")].sum()))
    assert abs(int(mine["cycles"].sum()) - int(mine["cpu_ns"].sum())) <= 0.01 * mine["cpu_ns"].sum() + steal
    assert abs(int(batch["cycles"].sum()) - int(batch["cpu_ns"].sum())) <= 0.01 * batch["cpu_ns"].sum() + steal
    assert np.all(batch["instructions"] == NULL) and np.all(batch["cache_misses"] == NULL)
    assert meter.stats.counter_errors == 0


def test_default_counters_say_where_they_came_from(tmp_path, cgroups, cgroup_mount):
    plan = plan_counters()
    topo = _topology(tmp_path, cgroup_mount, {"d": cgroups.make("d")})
    with Meter(topo) as meter:
        batch = _run(meter, 0.2)
    assert set(np.unique(text(batch, "counters_source"))) == {plan.source}
    if "cycles" in plan.estimated:  # no PMU (this project's VMs)
        assert plan.source == "cpu-clock estimate"
        busy = batch[(batch["tenant"] != code("idle")) & (batch["cpu_ns"] > 0)]
        assert np.all(busy["cycles"] > 0)
        assert np.all(batch["cycles"][batch["tenant"] == code("idle")] == NULL)
        assert np.all(batch["instructions"] == NULL)


def _conserved(batch: np.ndarray, ncpu: int) -> np.ndarray:
    """Each window's own time (late records are another window's): ncpu x W."""
    starts, sums = window_totals(batch)
    assert np.all(sums == ncpu * 1_000_000), sums[sums != ncpu * 1_000_000][:5]
    return starts


def test_cgroups_beyond_the_ring_keep_their_usage_as_unattributed(cgroups):
    """More cgroups charged than the ring has rows: their usage is kept, named, in
    the unattributed row; nothing is dropped (before the ring, a full map dropped it)."""
    for i in range(12):
        cgroups.make(f"c{i}")
    topo = Topology.discover(cgroups.root)
    # 6 rows: unattributed and five more, which idle, host and the first few cgroups charged take.
    with Meter(topo, max_rows=6) as meter:
        time.sleep(0.02)
        procs = [cgroups.burner(cgroups.root / f"c{i}", 0.3, 0.3) for i in range(12)]
        batch = _run(meter, 0.5)
        for p in procs:
            p.wait()
        kernel_ns = sum(cpu_usage_usec(cgroups.root / f"c{i}") for i in range(12)) * 1000
    un = int(batch["cpu_ns"][batch["tenant"] == code("unattributed")].sum())
    rowed = int(batch["cpu_ns"][np.char.startswith(text(batch, "tenant").astype(str), "c")].sum())
    assert un > 0 and len(np.unique(batch["tenant"][batch["cpu_ns"] > 0])) <= 6
    # The burners' work is in their rows or in unattributed (0.2 %, and cpu.stat's 1 us per cgroup).
    assert rowed + un >= kernel_ns * 0.998 - 12_000, (rowed, un, kernel_ns)
    _conserved(batch, meter.ncpu)
    assert meter.stats.late_ns == 0


def test_a_stalled_drain_loses_nothing_and_names_the_late_time(cgroups):
    """The drain stops for 5 s (a stalled agent), far past what the ring holds: the
    stalled time is billed late, to its compartment, and named late in the windows
    it came from; the compartment's bill still equals its cpu.stat."""
    comp = cgroups.make("t")
    topo = Topology.discover(cgroups.root)
    with Meter(topo) as meter:
        parts = [meter.drain()]
        p = cgroups.burner(comp, 0.5, 7.0)
        time.sleep(0.5)
        parts.append(meter.drain())
        time.sleep(5.0)  # the stall: 5,000 windows of 1 ms, the ring holds about 1,500
        parts += [meter.drain() for _ in range(3)]
        p.wait()
        parts += list(meter.batches(0.6))
        kernel_ns = cpu_usage_usec(comp) * 1000
    batch = np.concatenate(parts)
    late = batch[batch["cpu_source"] == code("late")]
    t = batch["tenant"] == code("t")
    assert int(late["cpu_ns"][late["tenant"] == code("t")].sum()) > 0
    # Every late ns is named in the windows it left: the late row holds what the late records bill.
    assert int(batch["cpu_ns"][batch["tenant"] == code("late")].sum()) == int(late["cpu_ns"].sum())
    assert meter.stats.late_ns == int(late["cpu_ns"].sum())
    # The compartment was empty before: its whole life is in both (cpu.stat counts whole us).
    assert abs(int(batch["cpu_ns"][t].sum()) - kernel_ns) <= 0.002 * kernel_ns + 1_000
    _conserved(batch, meter.ncpu)
    assert meter.stats.missing_windows == 0 and meter.stats.conservation_violations == 0


def test_five_hundred_compartments_waking_every_ms_lose_nothing(cgroups):
    """500 discovered compartments, a task in each waking every 1 ms, 1 ms windows,
    20 s, meter's own loop: nothing lost or late, every window there and adding up
    to CPUs x W, each compartment's bill its cpu.stat (before the ring, 84 % of such
    usage was dropped; before the loop ran in the real-time class, a take could
    wait seconds behind the wakers and much of the time was billed late)."""
    import subprocess
    import sys

    comps = [cgroups.make(f"w{i:03d}") for i in range(500)]
    with Meter(Topology.discover(cgroups.root)) as meter:
        parts = [meter.drain()]
        wakers = subprocess.Popen([sys.executable, "-S", "-c", WAKERS, *map(str, comps), "20"])
        for batch in meter.batches():
            parts.append(batch)
            if wakers.poll() is not None:
                break
        parts += list(meter.batches(0.3))
        assert meter.realtime_refused == ""
        # The last slices' kernel/clock differences are settled out of idle time
        # in the windows that follow. On a starved VM 0.3 s was not always
        # enough (seen: 317 ms still owed at the last drain, so compartments
        # 1.4-2.4 % under cpu.stat). The wakers are gone, so nothing new is
        # owed: drain until all of it is settled (bounded), then compare.
        settle_by = time.monotonic() + 10.0
        trace = [(meter.stats.unsettled_ns, meter.stats.pending_adjustment_ns)]
        while (meter.stats.unsettled_ns or meter.stats.pending_adjustment_ns) and time.monotonic() < settle_by:
            time.sleep(meter.drain_interval)
            parts.append(meter.drain())
            trace.append((meter.stats.unsettled_ns, meter.stats.pending_adjustment_ns))
        kernel = {cg.name: cpu_usage_usec(cg) * 1000 for cg in comps}
    assert wakers.returncode == 0
    batch = np.concatenate(parts)
    st = meter.stats
    # Nothing lost, and nothing late: every ns in its own window (the loop's takes
    # run in the real-time class, so the wakers cannot hold them back past the ring).
    assert st.loss_line() == "" and st.unattributed_ns == 0, st.notice_line()
    assert st.late_ns == 0 and not np.any(batch["cpu_source"] == code("late")), st.notice_line()
    _conserved(batch, meter.ncpu)
    # Whole windows from the first to the last, none missing.
    starts = np.unique(batch["window_start_ns"])
    assert np.all(np.diff(starts) == 1_000_000)
    sums = {t: int(batch["cpu_ns"][batch["tenant"] == code(t)].sum()) for t in kernel}
    # The compartments were empty before (each task is placed while stopped):
    # their whole lives are in both. The acceptance bound, 1 %, and cpu.stat's
    # 1 us unit (measured: every compartment within that 1 us, loaded or not;
    # slices no switch event showed are in, recovered per task: unseen_ns).
    bad = {t: (sums[t], k) for t, k in kernel.items() if abs(sums[t] - k) > 0.01 * k + 1_000}
    assert not bad, (list(bad.items())[:5], st.notice_line(), trace)
    assert min(kernel.values()) > 0


def test_callbacks_and_background_thread(cgroups):
    topo = Topology.discover(cgroups.root)
    seen: list[int] = []
    meter = Meter(topo)
    meter.on_batch(lambda b: seen.append(len(b)))
    meter.start()
    time.sleep(0.5)
    meter.stop()
    meter.close()
    assert sum(seen) > 0
    assert meter.stats.records == sum(seen)


def test_short_lived_child_cgroups_are_billed_to_their_compartment(tmp_path, cgroups, cgroup_mount):
    """Container runtimes create and remove child cgroups all the time: usage in a
    child that is gone before the next drain is its compartment's (resolved in
    the kernel when it happens), never host's."""
    comp = cgroups.make("tenant")
    topo = _topology(tmp_path, cgroup_mount, {"tenant": comp})
    batches = []
    with Meter(topo) as meter:
        time.sleep(0.02)
        for i in range(150):
            child = cgroups.make(f"tenant/run{i}")
            cgroups.burner(child, 1.0, 0.02 + 0.01 * (i % 4)).wait()
            cgroups.remove(child)
            if i % 10 == 9:
                batches.append(meter.drain())
        batches += list(meter.batches(0.2))
        kernel_ns = cpu_usage_usec(comp) * 1000  # its children's usage stays in it once they are removed
    batch = np.concatenate(batches)
    billed = _usage(batch, "tenant")
    # The compartment was empty before: its whole life is in both. The billing
    # target, 0.2 %, and cpu.stat's 1 us unit.
    assert kernel_ns > 1e9 and abs(billed - kernel_ns) <= 0.002 * kernel_ns + 1_000, (billed, kernel_ns)
    assert meter.stats.unresolved_cgroups == 0
    assert meter.stats.loss_line() == ""


def test_a_thousand_churned_child_cgroups_add_no_rows_and_nothing_unresolved(cgroups):
    """1,000 child cgroups created, run in for 2 ms and removed inside a discovered
    compartment: each is its compartment's when it runs, so neither the kernel's
    ring nor the resolver grows (their rows are the agent's only per-cgroup
    memory), and nothing is left for user space to name."""
    import subprocess
    import sys

    comp = cgroups.make("t")
    with Meter(Topology.discover(cgroups.root)) as meter:
        meter.drain()
        src = meter.cpu_source
        rows_before, resolver_rows = src.rows_used(), len(meter.row_names)
        churn = subprocess.Popen([sys.executable, "-S", "-c", CHURN, str(comp), "1000"])
        parts = []
        while churn.poll() is None:
            parts.append(meter.drain())
            time.sleep(meter.drain_interval)
        assert churn.returncode == 0
        parts += list(meter.batches(0.2))
        # Rows only for what meter can charge here besides the children: its own
        # unattributed, idle, sched and steal, the host's cgroup and t; none per child.
        assert rows_before <= src.rows_used() <= 6 and len(meter.row_names) == resolver_rows
    batch = np.concatenate(parts)
    assert meter.stats.unresolved_cgroups == 0 and meter.stats.unattributed_ns == 0
    # All of it is t's (1,000 x 2 ms of work, at least): none went to host or elsewhere.
    assert _usage(batch, "t") >= 1000 * 2_000_000


def test_other_tools_short_lived_cgroups_are_the_hosts_and_never_unresolved(tmp_path, cgroups, cgroup_mount):
    """systemd scopes and other tools' cgroups outside every compartment come and go
    between drains: the kernel charges them to the host at once, so none is left
    for user space to name after it is gone (unresolved_cgroups stays 0)."""
    comp = cgroups.make("tenant")
    topo = _topology(tmp_path, cgroup_mount, {"tenant": comp})
    batches, theirs_ns = [], 0
    with Meter(topo) as meter:
        for i in range(40):
            other = cgroups.make(f"other{i}")
            cgroups.burner(other, 1.0, 0.02).wait()
            theirs_ns += cpu_usage_usec(other) * 1000
            cgroups.remove(other)
            if i % 10 == 9:
                batches.append(meter.drain())
        batches += list(meter.batches(0.2))
    batch = np.concatenate(batches)
    assert meter.stats.unresolved_cgroups == 0
    # The host row holds their usage and the rest of the host's: at least theirs,
    # less the 0.2 % billing target and cpu.stat's 1 us unit per cgroup.
    assert _usage(batch, "host") >= theirs_ns * 0.998 - 40_000, (_usage(batch, "host"), theirs_ns)
    assert _usage(batch, "tenant") == 0


def test_a_start_held_up_past_its_first_window_loses_no_window(cgroups, monkeypatch):
    """The kernel discards windows as start-up until it is told the first one;
    a meter held up between choosing it and saying so (a busy or paused host)
    lost whole windows: records of none of them, seen as missing windows."""
    from meter.bpfabi import CTL_FIRST
    from meter.sources.sched import SchedSource

    real = SchedSource._control
    held = []

    def slow(self, index, value):
        if index == CTL_FIRST and value < 2**62 and not held:
            held.append(value)
            time.sleep(0.02)  # 20 windows of 1 ms
        real(self, index, value)

    monkeypatch.setattr(SchedSource, "_control", slow)
    cgroups.make("x")
    with Meter(Topology.discover(cgroups.root)) as meter:
        batch = _run(meter, 0.3)
    assert held and meter.stats.missing_windows == 0 and meter.stats.conservation_violations == 0
    assert meter.stats.windows > 200 and len(batch)


def _old_slot(cgid: int) -> int:
    """The per-CPU slot sched.bpf.c gave a cgroup before stop 40 (Fibonacci hashing onto all eight)."""
    return ((cgid * 0x9E3779B97F4A7C15) % 2**64) >> 61


def test_idle_and_sched_keep_their_slots_whatever_a_compartments_cgroup_id(tmp_path, cgroups, cgroup_mount):
    """A compartment whose cgroup id hashed onto idle's or sched's slot (one in four)
    evicted it at every switch through idle: its tasks' switches cost 280-290 ns
    against ~160 (docs/architecture.md, "Switches through idle"). Here the cgroup is
    made until its id is such a one; it wakes from idle every 0.5 ms on this host,
    and every CPU's slots hold idle in slot 0, sched in slot 1 and it elsewhere."""
    from meter.bpfabi import SCHED_CGID
    from meter.cgroup import cgroup_id

    for i in range(64):  # each id lands on slot 0 or 1 with odds 1 in 4: 64 misses are 1e-8
        cg = cgroups.make(f"c{i}")
        if _old_slot(cgroup_id(cg)) in (0, 1):
            break
    else:
        pytest.fail("no cgroup id hashed onto slot 0 or 1 in 64")
    cgid = cgroup_id(cg)
    topo = _topology(tmp_path, cgroup_mount, {"acme": cg})
    with Meter(topo) as meter:
        p = cgroups.spawn_stopped(cg, [sys.executable, "-S", "-c",
                                       "import time\nfor _ in range(600):\n    time.sleep(0.0005)\n"])
        src = meter.cpu_source
        assert src is not None
        table = src.bpf[b"cpu_state"]
        # Read while it runs, and again after: on a loaded host another cgroup sharing its
        # slot (the host's, one in six) can take the slot back between its wakeups.
        held: set[tuple[int, int, int]] = set()
        os.kill(p.pid, signal.SIGCONT)
        while True:
            done = p.poll() is not None
            cpus = table[table.Key(0)]
            held |= {(c, i, int(cpus[c].slot[i].cgid)) for c in range(len(cpus)) for i in range(len(cpus[c].slot))
                     if cpus[c].slot[i].cgid or i == 0}
            if done:
                break
            time.sleep(0.005)
        assert p.returncode == 0
    assert {i for _, i, g in held if g == cgid} and {i for _, i, g in held if g == cgid} <= set(range(2, 8))
    assert {i for _, i, g in held if g == 0} == {0} and {i for _, i, g in held if g == SCHED_CGID} <= {1}
