"""MeterStats: what the engine and its sources did, for self-metrics and reports.

Kernel-side counts (named as in :data:`meter.bpfabi.STATS`) are copied at
every drain; per-batch figures (windows, records, conservation) are
checked here. See docs/architecture.md, "Conservation".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .records import COLUMN, Columns, code, ranges_of, window_totals, zeroed
from .topology import UNATTRIBUTED

__all__ = ["MeterStats"]

#: MeterStats field for each kernel-side count.
_KERNEL = {"late_ns": "late_ns", "counter_errors": "counter_errors", "net_late_packets": "net_late_packets",
           "span_unattributed_ns": "softirq_unattributed_ns", "unplaced_ns": "unplaced_ns", "unsettled": "unsettled",
           "unseen_ns": "unseen_ns", "clocked": "clocked_slices"}


@dataclasses.dataclass
class MeterStats:
    """What the engine and its sources did, for self-metrics and reports."""

    windows: int = 0
    records: int = 0
    drains: int = 0  # batches built
    takes: int = 0  # the sources' rings taken into this process (one or more per batch)
    closes: int = 0  # closes between takes: idle CPUs nudged and the watermark published, nothing taken
    drain_seconds: float = 0.0  # spent taking and building
    late_ns: int = 0  # billed in a later window than its own (named: cpu_source late, and the late row)
    late_unmatched_ns: int = 0  # of late_ns, what no window closed so far was short of (no late row for it yet)
    unattributed_ns: int = 0  # usage of cgroups beyond the kernel ring's rows (the unattributed row)
    counter_errors: int = 0
    net_late_packets: int = 0  # packets billed in a later window than their own (late records)
    softirq_unattributed_ns: int = 0  # NET softirq time left with the interrupted task
    unplaced_ns: int = 0  # kernel/clock differences the kernel side had no entry for (settled in the records)
    unsettled_ns: int = 0  # of those, not settled yet: the row's bill is off cpu.stat by this until it is
    pending_adjustment_ns: int = 0  # kernel/clock differences the CPUs hold, to settle in coming windows
    unsettled: int = 0  # slices whose start was not seen (followed from the scheduler's own mark)
    unseen_ns: int = 0  # kernel time of slices no switch event showed, given back to their cgroups
    clocked_slices: int = 0  # slices of real-time (not CFS) tasks whose start was not seen: charged by the clock
    warmup_windows_skipped: int = 0
    conservation_violations: int = 0
    unresolved_cgroups: int = 0
    nudges: int = 0
    run_switches: int = 0  # switches inside one cgroup's run, charged with the run (no clock read)
    idle_out_switches: int = 0  # switches away from idle charged without the charge's tail call
    idle_in_switches: int = 0  # switches into idle charged without the charge's tail call
    energy_measured_uj: int = 0  # what the reader (or model) reported
    energy_attributed_uj: int = 0  # what went into records (idle row included)
    energy_pending_uj: int = 0  # measured, waiting for the next records
    last_window_end_ns: int = 0  # wall clock end of the newest window emitted
    first_window_start_ns: int = 0  # wall clock start of the first whole window
    covered_ns: int = 0  # wall time from the first window to the last one closed
    missing_windows: int = 0  # closed windows with no record at all (each also a conservation violation)
    filter_reattachments: int = 0  # meter's tc filters found removed by someone else, attached again

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def take_kernel(self, counts: dict[str, int], *, nudges: int, run_switches: int = 0,
                    idle_out_switches: int = 0, idle_in_switches: int = 0) -> None:
        """Copy the CPU source's kernel-side counts (cumulative since open)."""
        for name, field in _KERNEL.items():
            setattr(self, field, int(counts.get(name, 0)))
        self.nudges = nudges
        self.run_switches = run_switches
        self.idle_out_switches = idle_out_switches
        self.idle_in_switches = idle_in_switches

    def take_batch(self, batch: np.ndarray | Columns, *, ncpu: int, window_ns: int, expected_windows: int | None = None,
                   ranges: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Count a batch's records and windows, and check each window adds up to ncpu x W.

        ``expected_windows``: how many windows the drain closed; each one
        without any record is a violation too (and a missing window).
        ``ranges``: the batch's :func:`records.column_ranges`, when the caller has them.
        """
        self.records += len(batch)
        starts = np.zeros(0, np.int64)
        if len(batch):
            if ranges is None:
                ranges = ranges_of(batch)  # one pass: which columns need one
            unattributed, j = code(UNATTRIBUTED), COLUMN["tenant"]
            if ranges[0][j] <= unattributed <= ranges[1][j]:
                self.unattributed_ns += int(zeroed(batch["cpu_ns"][batch["tenant"] == unattributed]).sum())
            # Every CPU-ns of a window is some row's cpu_ns, or softirq_ns given by another row.
            starts, sums = window_totals(batch, ranges)
            self.windows += len(starts)
            self.conservation_violations += int(np.count_nonzero(sums != ncpu * window_ns))
            self.last_window_end_ns = int(starts[-1]) + window_ns
        if expected_windows is not None and expected_windows > len(starts):
            missing = expected_windows - len(starts)
            self.missing_windows += missing
            self.conservation_violations += missing

    def losses(self) -> dict[str, int]:
        """What did not reach the records, by reason (ns of CPU time; counts for the rest).

        Any non-zero value means a bill from these records is short:
        ``meter record`` says so and exits non-zero. Late and unattributed
        time are not lost (they are in the records, named), nor are adjustments
        not settled yet (CPU time between a row and idle or sched: every window
        still adds up): see :meth:`notice_line`.
        """
        return {"missing_windows": self.missing_windows, "conservation_violations": self.conservation_violations}

    def loss_line(self) -> str:
        """One sentence naming every loss so far ("" when there is none)."""
        parts = [f"{v} {k.replace('_ns', ' ns').replace('_', ' ')}" for k, v in self.losses().items() if v]
        return "LOST: " + ", ".join(parts) if parts else ""

    def notice_line(self) -> str:
        """The losses, then usage billed other than in its own window or row ("" when none)."""
        parts = [self.loss_line()] if self.loss_line() else []
        if self.late_ns:
            parts.append(f"{self.late_ns} ns late (billed in a later window: cpu_source late, and the late row)")
        if self.net_late_packets:
            parts.append(f"{self.net_late_packets} packets late (billed in a later window: cpu_source late)")
        if self.unsettled_ns:
            parts.append(f"{self.unsettled_ns} ns of kernel/clock differences not settled yet (those rows' bills "
                         "differ from cpu.stat by as much)")
        if self.unattributed_ns:
            parts.append(f"{self.unattributed_ns} ns of cgroups beyond the kernel's rows (the unattributed row)")
        return "; ".join(parts)
