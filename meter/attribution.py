"""Attribution: splitting a measured whole over records, exactly, in integers.

:func:`apportion` splits integer totals over groups of records by integer
weights with largest-remainder rounding, vectorised: within every group the
shares add up to the group's total to the unit, and no share is more than
one unit away from its exact real value.

:func:`attribute_energy` applies it to energy: package energy by cycles
(cpu_ns where cycles are estimated), DRAM energy by cache misses (cpu_ns
where absent), and the idle row's part by policy: ``separate`` keeps it on
the ``idle`` row, ``proportional`` spreads it over the other rows.
"""

from __future__ import annotations

import numpy as np

from .records import Columns, zeroed

__all__ = ["POLICIES", "apportion", "attribute_energy"]

POLICIES = ("separate", "proportional")


def apportion(groups: np.ndarray, totals: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Split ``totals[g]`` over the items of each group ``g`` by ``weights``.

    ``groups`` (int, 0..G-1) and ``weights`` (int >= 0) have one entry per
    item; ``totals`` (int >= 0) one per group. Returns int64 shares with
    Σ shares over group g == totals[g] exactly. A group whose weights are
    all zero is split equally (largest remainder again).
    """
    groups = np.asarray(groups, np.int64)
    totals = np.asarray(totals, np.int64)
    weights = np.asarray(weights, np.int64)
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int64)
    if int(weights.min()) < 0 or int(totals.min(initial=0)) < 0:
        raise ValueError("apportion needs totals and weights >= 0")
    ngroups = len(totals)
    if ngroups == 1:
        return _apportion_one(int(totals[0]), weights)
    wsum = np.bincount(groups, weights=weights, minlength=ngroups)
    # Zero-weight groups: split equally.
    empty = wsum[groups] == 0
    if np.any(empty):
        weights = np.where(empty, 1, weights)
        wsum = np.bincount(groups, weights=weights, minlength=ngroups)
    # Keep total x weight within int64: drop low weight bits if needed (a
    # share's exactness is set by the rounding below, not by these bits).
    bits = int(max(totals.max(initial=0), 1)).bit_length() + int(max(weights.max(initial=0), 1)).bit_length()
    if bits > 62 or wsum.max(initial=0) >= 2**53:
        shift = max(bits - 62, int(wsum.max()).bit_length() - 52, 0)
        weights = weights >> shift
        zero = np.bincount(groups, weights=weights, minlength=ngroups)[groups] == 0
        weights = np.where(zero, 1, weights)
        wsum = np.bincount(groups, weights=weights, minlength=ngroups)
    wsum_i = wsum.astype(np.int64)
    t = totals[groups]
    num = t * weights
    den = wsum_i[groups]
    share = num // den
    rem = num - share * den
    left = totals - np.bincount(groups, weights=share, minlength=ngroups).astype(np.int64)
    return share + _largest_remainders(groups, (1.0 - rem / den) * 0.5, left, ngroups)


def _largest_remainders(groups: np.ndarray, frac: np.ndarray, left: np.ndarray, ngroups: int) -> np.ndarray:
    """1 for the ``left[g]`` items of each group ``g`` with the largest
    remainders (``frac``: (1 - remainder / divisor) / 2, smallest first), 0
    for the rest; among equal keys, the earlier items.

    One sort of the keys group + frac (the values only: numpy's vectorised
    sort, no permutation), which puts each group's items in a run, largest
    remainder first; the key at a group's ``left``-th place is its
    threshold: items below it get one, and items equal to it (ties) in
    item order until the group has its ``left``. Near-ties may be ordered
    either way; any order keeps every group's sum exact and every share
    within one unit.
    """
    key = groups + frac
    # A stable sort (the same values as any sort) merges runs already ascending: a
    # batch's records come by window, so its keys are runs of a few (~60 µs for
    # 13,000, where numpy's default sort took ~350 on this VM).
    ranked = np.sort(key, kind="stable")
    count = np.bincount(groups, minlength=ngroups)
    start = np.cumsum(count) - count
    left = np.minimum(left, count)
    giving = left > 0
    thr = np.full(ngroups, -np.inf)
    at = start[giving] + left[giving] - 1
    thr[giving] = ranked[at]
    t = thr[groups]
    after = at[at + 1 < len(key)]
    if not np.any(ranked[after + 1] == ranked[after]):
        # No key after a threshold equals it (the usual: distinct remainders), so
        # each group has exactly its ``left`` keys at or below its threshold.
        return (key <= t).astype(np.int64)
    bonus = (key < t).astype(np.int64)
    tie = np.flatnonzero(key == t)
    if len(tie):
        below = np.searchsorted(ranked, thr, side="left") - start  # items under each threshold
        g = groups[tie]
        order = np.argsort(g, kind="stable")  # ties by group, in item order
        g_sorted = g[order]
        rank = np.arange(len(tie)) - np.searchsorted(g_sorted, g_sorted, side="left")
        bonus[tie[order]] = rank < (left - below)[g_sorted]
    return bonus


def _apportion_one(total: int, weights: np.ndarray) -> np.ndarray:
    """:func:`apportion` for one group (a measuring reader's drain): integer sums
    and a scalar divisor, no per-item gathers, and the largest remainders
    found in linear time."""
    n = len(weights)
    top = int(weights.max())
    if top == 0:
        weights, top = np.ones(n, np.int64), 1
    # total x weight, and the weights' sum, within int64 (drop low weight bits if not).
    shift = max(max(total, 1).bit_length() + top.bit_length() - 62, top.bit_length() + n.bit_length() - 62, 0)
    if shift:
        weights = weights >> shift
        if not weights.any():
            weights = np.ones(n, np.int64)
    den = int(weights.sum())
    num = weights * total
    share = num // den
    k = total - int(share.sum())
    if k:
        share[np.argpartition(share * den - num, k - 1)[:k]] += 1  # -remainder: largest first
    return share


def _weights(batch: np.ndarray | Columns, measured_field: str, measured: bool) -> np.ndarray:
    if measured:
        col = batch[measured_field]
        return zeroed(col)
    return zeroed(batch["cpu_ns"])


def attribute_energy(
    batch: np.ndarray | Columns,
    groups: np.ndarray,
    package_uj: np.ndarray,
    dram_uj: np.ndarray | None = None,
    *,
    idle: np.ndarray,
    cycles_measured: bool,
    misses_measured: bool,
    policy: str = "separate",
    by_domain: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Energy (µJ) per record: Σ over each group == package + dram of that group.

    ``groups`` maps each record to an interval (or window) whose measured
    energy is ``package_uj[g]`` (+ ``dram_uj[g]``). ``idle`` marks the idle
    rows. ``by_domain``, when given, receives each domain's shares.
    """
    if policy not in POLICIES:
        raise ValueError(f"energy policy must be one of {', '.join(POLICIES)}, not {policy!r}")
    out = np.zeros(len(batch), np.int64)
    for domain, totals, field, measured in (
        ("package", package_uj, "cycles", cycles_measured),
        ("dram", dram_uj, "cache_misses", misses_measured),
    ):
        if totals is None:
            continue
        w = _weights(batch, field, measured)
        if policy == "proportional":
            # The idle row's share goes to everyone else, by their weights;
            # a group with nothing but idle keeps it on idle.
            busy = np.bincount(groups, weights=np.where(idle, 0, w), minlength=len(totals))
            w = np.where(idle & (busy[groups] > 0), 0, w)
        shares = apportion(groups, totals, w)
        if by_domain is not None:
            by_domain[domain] = shares
        out += shares
    return out
