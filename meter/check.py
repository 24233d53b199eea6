"""``meter check``: probe this host for everything meter needs, for real.

Each probe does the thing (loads a two-instruction BPF program, opens a raw
tracepoint and closes it, adds a clsact qdisc in a throw-away network
namespace, opens perf events) and says what meter will do about the result.
Nothing is left attached.

Every :class:`Finding` has a stable ``key`` (the JSON keys are listed in
the README), a ``status`` (``ok``, ``fallback``, ``missing`` or ``fail``),
what was found (``detail``) and what meter does about it (``action``).
``fail`` on a required probe means meter cannot run here.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import cgroup as cgroupfs
from . import host
from .bpfsys import PROG_RAW_TRACEPOINT, PROG_SCHED_CLS, PROG_SOCKET_FILTER, Bpf
from .errors import CgroupError
from .headers import find_headers
from .perf import DEFAULT_COUNTERS, cpu_hz, open_error, parse_event
from .privileges import missing_capabilities

__all__ = ["Finding", "run_checks", "verdict"]


@dataclasses.dataclass(frozen=True)
class Finding:
    """One probe's result."""

    key: str
    title: str
    status: str  # ok | fallback | missing | fail
    detail: str
    action: str
    required: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _privileges() -> Finding:
    if os.geteuid() == 0:
        return Finding("privileges", "Privileges", "ok", "running as root", "all probes and programs can load", True)
    missing = missing_capabilities()
    if missing:
        return Finding(
            "privileges", "Privileges", "fail", f"not root; missing {', '.join(missing)}",
            "run meter with sudo, or grant CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN", True,
        )
    return Finding("privileges", "Privileges", "ok", "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN", "programs can load", True)


def _strerror(err: int) -> str:
    return os.strerror(err) if err else "ok"


def run_checks() -> list[Finding]:
    """Run every probe; the list is in display order.

    (Over 60 lines on purpose: one short probe after another, in the order
    they are shown; splitting it would only scatter that order.)
    """
    out = [_privileges()]
    bpf = Bpf()

    fd, err = bpf.load(PROG_SOCKET_FILTER)
    if fd >= 0:
        os.close(fd)
        out.append(Finding("bpf", "BPF syscall", "ok", "loaded a test program", "kernel programs can load", True))
    else:
        out.append(Finding("bpf", "BPF syscall", "fail", f"BPF_PROG_LOAD: {_strerror(err)}",
                           "meter cannot measure here: run as root on a kernel with CONFIG_BPF_SYSCALL", True))

    out.append(_btf())

    hdr = find_headers()
    if hdr.kind == "running":
        out.append(Finding("headers", "Kernel headers", "ok", f"running kernel's ({hdr.detail})", "bcc compiles against them", True))
    elif hdr.kind == "fallback":
        out.append(Finding("headers", "Kernel headers", "fallback", hdr.detail,
                           f"bcc compiles against a merged tree in {hdr.path} (BCC_KERNEL_SOURCE); safe, programs use stable ABI only", True))
    else:
        out.append(Finding("headers", "Kernel headers", "fail", hdr.detail,
                           "install linux-headers-amd64 (Debian) so meter can build a fallback tree", True))

    try:
        import bcc  # noqa: F401
        out.append(Finding("bcc", "bcc", "ok", "python3-bpfcc importable", "programs are compiled at start (about 2 s)", True))
    except ImportError:
        out.append(Finding("bcc", "bcc", "fail", "cannot import bcc",
                           "install python3-bpfcc and use a venv with --system-site-packages (make setup)", True))

    prog, perr = bpf.load(PROG_RAW_TRACEPOINT)
    for tp, key, action, without in (
        ("sched_switch", "raw_tp_sched_switch", "CPU time and counters charged per schedule",
         "meter cannot charge CPU per schedule here"),
        ("softirq_entry", "raw_tp_softirq_entry", "NET_RX/NET_TX softirq time charged to packets' compartments",
         "softirq time stays with the task it interrupted"),
    ):
        required = key == "raw_tp_sched_switch"
        if prog < 0:
            out.append(Finding(key, f"Raw tracepoint {tp}", "fail",
                               f"cannot load a raw tracepoint program: {_strerror(perr)}", without, required))
            continue
        link, lerr = bpf.raw_tracepoint(tp, prog)
        if link >= 0:
            os.close(link)
            out.append(Finding(key, f"Raw tracepoint {tp}", "ok", "attached and detached", action, required))
        else:
            out.append(Finding(key, f"Raw tracepoint {tp}", "fail", _strerror(lerr), without, required))
    if prog >= 0:
        os.close(prog)

    out.append(_tc_clsact(bpf))

    try:
        mount = cgroupfs.find_mount()
        out.append(Finding("cgroup2", "cgroup v2", "ok", str(mount), "compartments are cgroup v2 subtrees under it", True))
    except CgroupError as err:
        out.append(Finding("cgroup2", "cgroup v2", "fail", str(err), "mount cgroup v2", True))

    for field, spec in DEFAULT_COUNTERS.items():
        reason = open_error(parse_event(spec))
        if reason is None:
            out.append(Finding(f"counter_{field}", f"Counter {spec}", "ok", "opens on CPU 0", "read per schedule from the PMU"))
        elif field == "cycles":
            hz = cpu_hz()
            out.append(Finding(f"counter_{field}", f"Counter {spec}", "fallback", reason,
                               f"no PMU: cycles estimated from cpu-clock at {hz / 1e9:.2f} GHz; records flagged 'cpu-clock estimate'"
                               if hz else "no PMU and no CPU frequency: cycles unavailable (null)"))
        else:
            out.append(Finding(f"counter_{field}", f"Counter {spec}", "missing", reason, f"{field} unavailable: null in records"))

    out.append(_rapl())
    out.append(_sriov())
    ovs = [b for b in ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl") if shutil.which(b) or Path("/usr/sbin", b).exists()]
    if len(ovs) == 3:
        out.append(Finding("openvswitch", "Open vSwitch", "ok", "ovsdb-server, ovs-vswitchd, ovs-vsctl", "meter demo can run tenant vswitches"))
    else:
        out.append(Finding("openvswitch", "Open vSwitch", "missing", f"found: {', '.join(ovs) or 'none'}",
                           "meter demo needs openvswitch-switch (apt-get install openvswitch-switch)"))
    return out


def _tc_clsact(bpf: Bpf) -> Finding:
    fd, err = bpf.load(PROG_SCHED_CLS)
    if fd < 0:
        return Finding("tc_clsact", "tc clsact", "fail", f"cannot load a tc program: {_strerror(err)}",
                       "packets unavailable: null in records")
    os.close(fd)
    tc = shutil.which("tc") or "/usr/sbin/tc"
    unshare = shutil.which("unshare")
    if not unshare or not Path(tc).exists():
        return Finding("tc_clsact", "tc clsact", "missing", "tc or unshare not found", "install iproute2 and util-linux")
    # A throw-away network namespace: the qdisc dies with it.
    res = subprocess.run([unshare, "-n", tc, "qdisc", "add", "dev", "lo", "clsact"], capture_output=True, text=True)
    if res.returncode == 0:
        return Finding("tc_clsact", "tc clsact", "ok", "clsact qdisc added in a scratch namespace",
                       "packets and bytes counted per interface by tc programs")
    return Finding("tc_clsact", "tc clsact", "fail", res.stderr.strip() or "tc failed", "packets unavailable: null in records")


def _btf() -> Finding:
    """Whether cpu_ns can be the kernel's own charge (task fields found in BTF)."""
    from .sources.sched import kernel_field_defines

    fields, reason = kernel_field_defines()
    if "METER_TASK_SUM_OFF" in fields:
        runs = ("; a switch between two tasks of one cgroup reads no clock"
                if "METER_TASK_CGROUPS_OFF" in fields else "")
        return Finding("btf", "BTF", "ok", f"task and run-queue fields ({sum(k.endswith('_OFF') for k in fields)} offsets)",
                       f"cpu_ns is what the kernel charged (cpu_source=kernel){runs}")
    return Finding("btf", "BTF", "missing", reason or "no kernel BTF",
                   "cpu_ns comes from the clock (cpu_source=clock): above cpu.stat by the scheduler's own time")


def _rapl(root: str | Path | None = None) -> Finding:
    """The energy reader meter would pick here (see meter.sources.energy)."""
    from .sources.energy import (
        EnergySettings,
        ModelReader,
        PerfPowerReader,
        pick_reader,
    )

    reader = pick_reader(EnergySettings(), root=root)
    try:
        if isinstance(reader, ModelReader):
            events = PerfPowerReader(root).events
            why = (f"perf power PMU ({', '.join(events)}) counts nothing (virtualised)" if events
                   else "no perf power PMU")
            return Finding("rapl", "RAPL energy", "missing", f"{why}; no powercap zones",
                           f"energy estimated from the power model ({reader.sockets} socket(s), "
                           f"{reader.idle_watts:g}-{reader.max_watts:g} W each); records flagged 'model'")
        detail = {"rapl-perf": "perf power PMU", "powercap": "powercap", "pyrapl": "pyRAPL"}[reader.source]
        return Finding("rapl", "RAPL energy", "ok", f"{detail}: {', '.join(reader.domains)}",
                       f"energy measured ({reader.source}) and split by cycles and cache misses")
    finally:
        reader.close()


def _sriov(root: str | Path | None = None) -> Finding:
    pfs = []
    for dev in sorted(host.path("sys/class/net", root).glob("*")):
        total = dev / "device/sriov_totalvfs"
        try:
            n = int(total.read_text())
            num = int((dev / "device/sriov_numvfs").read_text())
        except (OSError, ValueError):
            continue
        pfs.append(f"{dev.name} ({num}/{n} VFs)")
    if pfs:
        return Finding("sriov", "SR-IOV", "ok", ", ".join(pfs), "VF counters read through netlink")
    return Finding("sriov", "SR-IOV", "missing", "no SR-IOV physical functions", "vf_* fields null")


def verdict(findings: list[Finding]) -> tuple[bool, str]:
    """(can meter run here, the reason when not)."""
    for f in findings:
        if f.required and f.status == "fail":
            return False, f"{f.title}: {f.detail}; {f.action}"
    return True, "meter can run here"
