"""The drain loop: when a meter drains and who is handed the batches.

:class:`DrainLoop` is the half of :class:`meter.engine.Meter` that is about
time and delivery, not about what a drain is: ``batches()`` takes what the
sources hold every ``drain_interval`` seconds (more often when takes that
far apart would each hold more than a batch), closes the CPUs' windows
``closes_per_take`` times a take (once at the take; between takes too when
the kernel's window split needs idle CPUs closed more often) and, every
``takes_per_batch``-th time (or sooner, when a take says the takes hold
a batch's worth), builds the records of every take since the last batch
(as :class:`meter.records.Columns`; laid out as records only for a caller
that wants them: ``batches()`` does, ``batches(columns=True)`` and a
thread without callbacks do not), until a duration or :meth:`stop`, then once
more with ``final=True`` (the flush up to the last complete window, see
docs/architecture.md, "Closing windows" and "Takes and batches");
``abatches()`` does the same for asyncio; ``start()`` runs it in a thread
feeding ``on_batch`` callbacks. A subclass provides ``open()``,
``_take()``, ``_close()``, ``_batch()``, ``_drain(final=...)``,
``drain_interval``, ``closes_per_take`` and ``takes_per_batch``.

The thread that runs ``batches()`` is in the real-time class
(``SCHED_FIFO``, the lowest priority; ``drain_priority``, default
``"realtime"``) from its start to its end, and a subclass takes and
builds in it wherever they are called from (``urgent()``;
``Meter._working``): a host saturated by its tenants' tasks otherwise
keeps it off the CPU for seconds, the rings' open windows run out, and
the time is billed in later windows than its own (docs/architecture.md,
"Takes and batches").
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any, Literal, overload

import numpy as np

from .records import Columns

__all__ = ["DRAIN_PRIORITIES", "BatchCallback", "DrainLoop"]

#: How the drain loop's thread is scheduled while it waits for a take, takes and builds.
DRAIN_PRIORITIES = ("realtime", "normal")

#: The most of its time the drain loop's thread works while it is real-time: after
#: working w s of CPU (a take, maybe a build, the caller's loop body), it waits at
#: least w * (1 - REALTIME_DUTY) / REALTIME_DUTY s before its next take, whatever its
#: schedule. A loop that cannot keep up then bills late (named in the records) instead
#: of taking a CPU from the host's tenants.
REALTIME_DUTY = 0.5

BatchCallback = Callable[[np.ndarray], None]

log = logging.getLogger("meter")


#: prctl(2) option: no transparent huge pages for this process (linux/prctl.h).
_PR_SET_THP_DISABLE = 41
#: mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
#: What _keep_memory_map_still sets them to, the usual set-up of a real-time
#: process: glibc never gives the heap's free top back (brk), grows the heap
#: 64 MiB at a time, and maps no block of its own (mmap, munmap): every block
#: comes from the heap.
_MALLOC_SETTINGS = ((_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20), (_M_MMAP_MAX, 0))
#: Heap grown at once, so that the first batches do not grow it (address space:
#: a page of it is memory only once written).
_HEAP_RESERVE = 128 << 20

_memory_map_kept = False


def _keep_memory_map_still() -> None:
    """Keep the real-time drain from waiting on this process's memory-map lock, once
    (docs/architecture.md, "Takes and batches"). Whoever reads or scans the map holds
    that lock: khugepaged (the kernel's huge-page collapser, a nice-19 thread) while it
    scans the process, and any process reading ``/proc/<pid>/smaps`` (monitoring
    agents; ``cmdline``, as ``ps`` reads it, holds it too, briefly). On a host its
    tenants saturate, such a reader is preempted there for seconds, while the drain thread waits on the lock in
    its next brk(), mmap(), munmap() or madvise(), which change the map (measured:
    takes held back 1.5-4.2 s by khugepaged and 0.6-2.7 s by a nice-19 reader of
    smaps, 500 compartments waking every 1 ms, and seconds of usage billed late).

    So the process gives up transparent huge pages (prctl PR_SET_THP_DISABLE:
    khugepaged drops it) and numpy stops asking for them (madvise); and glibc's
    allocator stops changing the map at every numpy temporary: it keeps the heap
    it has grown instead of giving its top back, and takes every block from the
    heap instead of mapping big ones on their own (mallopt). From then on the map is
    still; the lock is then only ever read here, which a reader does not block. The
    heap's size is then the process's peak use, as address space grown at once by
    _HEAP_RESERVE, and as memory by what was written."""
    global _memory_map_kept
    if _memory_map_kept:
        return
    _memory_map_kept = True
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError as err:
        log.debug("meter: the C library is not at hand: %s", err)
        return
    try:
        if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            log.debug("meter: prctl(PR_SET_THP_DISABLE) failed: %s", os.strerror(ctypes.get_errno()))
    except AttributeError as err:  # not Linux
        log.debug("meter: prctl(PR_SET_THP_DISABLE) unavailable: %s", err)
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    madvise = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if madvise is not None:
        madvise(False)
    mallopt = getattr(libc, "mallopt", None)  # glibc's (musl has none, and maps as it likes)
    if mallopt is None:
        return
    if not all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS):
        log.debug("meter: mallopt refused a setting: the heap may still shrink and grow")
        return
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, (ctypes.c_void_p,)
    block = libc.malloc(_HEAP_RESERVE)
    libc.free(block)  # back to the heap's top, which stays


def _realtime() -> bool:
    """Whether this thread is in a real-time class."""
    try:
        return os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR)
    except (OSError, AttributeError):
        return False


class DrainLoop:
    """Drain on a period; hand batches to the caller and to callbacks."""

    drain_interval: float
    takes_per_batch: int = 1
    #: Closes a take interval (the take's own, and closes_per_take - 1 between takes).
    closes_per_take: int = 1
    drain_priority: str = "realtime"

    def __init__(self) -> None:
        #: Why the drain could not run in the real-time class ("" when it could, or was not asked to).
        self.realtime_refused = ""
        #: Takes put off by REALTIME_DUTY: the real-time loop had worked more than its share.
        self.duty_waits = 0
        self._callbacks: list[BatchCallback] = []
        self._take_callbacks: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Why the background drain thread stopped, if a drain failed (None: it did not).
        self.error: BaseException | None = None

    def open(self) -> None:
        """Open the sources; must be a no-op when they are open."""
        raise NotImplementedError

    def _take(self) -> float:
        """Take; returns how full the takes since the last batch are (1.0: a batch's
        worth: build now, before its time)."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close the CPUs' windows between takes (idle CPUs made to charge, the
        newest window every CPU has passed published), taking nothing."""
        raise NotImplementedError

    def batch_due(self, takes: int, full: float) -> bool:
        """Whether the loop builds a batch after the ``takes``-th take since the last
        one, the takes ``full`` of a batch's worth (what ``_take`` returned)."""
        return takes >= self.takes_per_batch or full >= 1.0

    def next_interval(self, elapsed: float, took: float) -> float:
        """Seconds to the next take, after a take ``elapsed`` s after the one before
        that filled ``took`` of a batch: the drain interval, or less when takes that
        far apart would each hold more than a batch (a big host: a batch that big
        costs more a record), down to an eighth of it."""
        if took <= 0 or elapsed <= 0:
            return self.drain_interval
        return min(self.drain_interval, max(self.drain_interval / 8, elapsed / took))

    def _batch(self) -> Columns:
        """The records of the takes since the last batch."""
        raise NotImplementedError

    def _drain(self, *, final: bool) -> Columns:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the background drain thread (:meth:`start`) runs."""
        return self._thread is not None and self._thread.is_alive()

    @overload
    def batches(self, duration: float | None = None, *, columns: Literal[False] = False
                ) -> Generator[np.ndarray, None, None]: ...

    @overload
    def batches(self, duration: float | None = None, *, columns: Literal[True]) -> Generator[Columns, None, None]: ...

    @overload
    def batches(self, duration: float | None = None, *, columns: bool) -> Generator[Any, None, None]: ...

    def batches(self, duration: float | None = None, *, columns: bool = False
                ) -> Generator[Any, None, None]:
        """Yield record batches every batch interval until ``duration`` or :meth:`stop`.

        The last batch is a final flush up to the last complete window.
        Empty batches are not yielded. With ``columns``, each batch is its
        :class:`meter.records.Columns`, not laid out as records (what the
        record store takes: docs/architecture.md, "Records").
        """
        self.open()  # a no-op when open
        with self.urgent():
            for batch in self._batches(duration):
                yield batch if columns else batch.records()

    def _batches(self, duration: float | None) -> Iterator[Columns]:
        deadline = None if duration is None else time.monotonic() + duration
        last = time.monotonic()
        next_at = last + self.drain_interval
        # Closes between takes (closes_per_take > 1): evenly, from the last take on;
        # none when the next take comes as soon (a big host's takes, next_interval).
        close_every = self.drain_interval / self.closes_per_take
        close_at = last + close_every
        takes, before = 0, 0.0
        # Real-time (urgent(), or the caller's own choice): at most REALTIME_DUTY of the time busy.
        realtime = _realtime()
        worked_from = time.thread_time()
        while not self._stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            closing = close_at < next_at - close_every / 2
            wake = close_at if closing else next_at
            if realtime:
                rest = (time.thread_time() - worked_from) * (1 - REALTIME_DUTY) / REALTIME_DUTY
                if now + rest > wake:
                    wake = now + rest
                    self._duty_wait(rest)
            if deadline is not None:
                wake = min(wake, deadline)
            if self._stop.wait(max(0.0, wake - now)):
                break
            worked_from = time.thread_time()
            if deadline is not None and time.monotonic() >= deadline:
                break
            if closing:
                self._close()
                close_at += close_every
                continue
            takes += 1
            full = self._take()
            self._after_take()
            now = time.monotonic()
            next_at += self.next_interval(now - last, full - before)
            close_at = now + close_every
            last = now
            if not self.batch_due(takes, full):
                before = full
                continue
            batch = self._batch()
            takes, before = 0, 0.0
            if len(batch):
                self._dispatch(batch)
                yield batch
        batch = self._drain(final=True)
        if len(batch):
            self._dispatch(batch)
            yield batch

    def _duty_wait(self, rest: float) -> None:
        if not self.duty_waits:
            log.warning("meter: the drain loop worked more than %d %% of its time in the real-time class (it "
                        "waits %.0f ms now): it waits as long as it works, so that it never takes a CPU from "
                        "the host's tenants, and time it cannot take in time is billed in later windows "
                        "(named late in the records); longer windows (window_ms) make it less work",
                        REALTIME_DUTY * 100, rest * 1000)
        self.duty_waits += 1

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """Run the enclosed code in the real-time class (SCHED_FIFO, priority 1),
        then put this thread back in its own class (and nice); a no-op in a
        thread that is real-time already, and with ``drain_priority`` "normal".

        Measured on this project's 2-CPU VM (benchmarks/no_loss.py): 1,000
        compartments waking every 1 ms kept a normal-priority take runnable but
        off the CPU for 5-7 s, even at nice -20, and 36-64 % of the host's CPU
        time was billed late (six runs; 72 % at 500); in the real-time class the
        longest take was 90 ms and nothing was late. The class is held for a
        whole ``batches()``, the caller's loop body included: a thread handed
        back its own class at each batch was preempted right there, at the
        switch, and waited seconds again (a store written between batches:
        57 % late). Any thread of the process that runs Python (the exporter's)
        needs it too: preempted while it holds the interpreter's lock, it
        holds the drain back with it. Where it is refused (no CAP_SYS_NICE, a
        CPU cgroup with no real-time runtime), meter goes on at normal priority
        and says why once (``realtime_refused``, and a warning). The first time,
        the process keeps its memory map still (``_keep_memory_map_still``): no
        transparent huge pages, and a heap that glibc does not give back."""
        restore = None
        if self.drain_priority == "realtime" and not self.realtime_refused:
            try:
                policy = os.sched_getscheduler(0)
                if policy not in (os.SCHED_FIFO, os.SCHED_RR):  # already real-time: the caller's choice, kept
                    param = os.sched_getparam(0)
                    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
                    # By thread id: a generator may be closed from another thread.
                    restore = threading.get_native_id(), policy, param
            except (OSError, AttributeError) as err:
                self.realtime_refused = getattr(err, "strerror", None) or str(err)
                log.warning("meter: the drain runs at normal priority (real-time scheduling refused: %s); on a "
                            "host its tenants saturate, takes can come late and time is then billed in later "
                            "windows: give meter CAP_SYS_NICE (or real-time runtime in its CPU cgroup), or "
                            "set drain_priority = \"normal\" (topology) to choose this", self.realtime_refused)
            else:
                # Not in the try: what fails here is no refusal of the class (it logs and goes on).
                _keep_memory_map_still()
        try:
            yield
        finally:
            if restore is not None:
                with contextlib.suppress(ProcessLookupError):  # the thread has ended
                    os.sched_setscheduler(*restore)

    async def abatches(self, duration: float | None = None) -> AsyncIterator[np.ndarray]:
        """``batches()`` for asyncio: the drain runs in a thread of its own (one, so
        that it keeps its real-time class from batch to batch), the loop stays free.

        >>> async for batch in meter.abatches(10):   # doctest: +SKIP
        ...     await sink.write(batch)
        """
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        gen = self.batches(duration)
        done = object()
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="meter-drain") as thread:
            try:
                while True:
                    batch = await loop.run_in_executor(thread, next, gen, done)
                    if batch is done:
                        return
                    yield batch  # type: ignore[misc]
            finally:
                await loop.run_in_executor(thread, gen.close)

    # -- embedding ------------------------------------------------------------------

    def on_batch(self, fn: BatchCallback) -> BatchCallback:
        """Call ``fn(batch)`` for every batch produced; usable as a decorator."""
        self._callbacks.append(fn)
        return fn

    def on_take(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn()`` in the loop after every take (every drain interval, batches
        included): for what should not wait a whole batch interval, e.g. a
        reload (``meter record`` on SIGHUP). Usable as a decorator."""
        self._take_callbacks.append(fn)
        return fn

    def _after_take(self) -> None:
        for fn in list(self._take_callbacks):
            fn()

    def _dispatch(self, batch: Columns) -> None:
        callbacks = list(self._callbacks)
        if callbacks:  # laid out only for them (once: batches() yields the same records)
            records = batch.records()
            for fn in callbacks:
                fn(records)

    def start(self) -> None:
        """Run the drain loop in a background thread, feeding callbacks.

        If a drain fails, the thread stops, :attr:`running` turns False and
        :attr:`error` says why: an embedding agent (and ``meter serve``) must
        check it rather than serve totals that no longer move.
        """
        self.open()
        if self._thread is not None and self._thread.is_alive():
            return
        self.error = None

        def run() -> None:
            try:
                for _ in self.batches(columns=True):  # records laid out for callbacks only
                    pass
            except Exception as err:  # noqa: BLE001 - kept for the owner to see, and logged
                self.error = err
                log.error("meter: metering stopped: %s", err)

        self._thread = threading.Thread(target=run, name="meter-drain", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Make :meth:`batches` (or the background thread) flush and finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

