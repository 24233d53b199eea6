// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * Per-schedule CPU attribution.
 *
 * On every context switch (raw tracepoint sched_switch) and on a per-CPU
 * tick at the window period (a cpu-clock perf event), the time and the
 * configured perf counters that elapsed on this CPU since its previous
 * charge are charged to the cgroup of the task that was running then:
 * `current`, which at sched_switch is still the outgoing task. The idle
 * task (pid 0) is charged to METER_IDLE_CGID.
 *
 * What a task is charged is what the kernel charged it (with
 * METER_KERNEL_CHARGE): at each switch the outgoing task's
 * se.sum_exec_runtime (updated by the scheduler just before) says how much
 * the kernel added to the task -- and to its cgroup's cpu.stat -- since
 * the task came in. The clock only places that time into windows. Clock
 * time the kernel charged to no task goes to the SCHED and STEAL rows;
 * kernel time beyond the clock's (a task woken onto an idle CPU is charged
 * from the wakeup, before the switch) is placed out of the CPU's next idle
 * or scheduler time. Ticks in a long slice charge the clock provisionally;
 * the switch settles it. See docs/architecture.md, "CPU time".
 *
 * Charges accumulate in per-CPU slots for the CPU's current window, then
 * in a fixed ring of windows per row (cgroup); user space drains closed
 * windows in bulk.
 * Nothing is sent per event.
 *
 * Kernel structs are never dereferenced through the (maybe fallback)
 * headers: the few fields read come as byte offsets taken from the running
 * kernel's BTF (-D METER_*_OFF) and are read with bpf_probe_read_kernel
 * (current's through its BTF pointer, prev_sum()).
 */
#include <uapi/linux/bpf_perf_event.h>
#include "meter.h"
#include "counters.h"

#ifdef METER_TASK_SUM_OFF
#define METER_KERNEL_CHARGE 1
#else
#define METER_KERNEL_CHARGE 0
#endif
#if METER_KERNEL_CHARGE && defined(METER_TASK_CFS_RQ_OFF) && defined(METER_CFS_RQ_RQ_OFF) && \
	defined(METER_RQ_CLOCK_OFF) && defined(METER_RQ_CLOCK_TASK_OFF) && defined(METER_RQ_CPU_OFF)
#define METER_STEAL 1
#else
#define METER_STEAL 0
#endif
/* Switches inside one css_set skip the clock (same_run()). */
#if METER_KERNEL_CHARGE && defined(METER_TASK_CGROUPS_OFF)
#define METER_SAME_RUN 1
#else
#define METER_SAME_RUN 0
#endif

/* Shared by all CPUs: written only when a CPU's slots are flushed or
 * evicted (about once per cgroup per window per CPU), with atomic adds, so
 * memory does not grow with the number of CPUs. The ring is cell
 * row * METER_RING + window % METER_RING; user space maps it (mmap), reads
 * the cells of closed windows and zeroes them (see METER_CTL_TAKEN). */
BPF_F_TABLE("array", u32, u64, ring, METER_MAX_ROWS * METER_RING, BPF_F_MMAPABLE);
#if METER_NR_COUNTERS > 0
BPF_F_TABLE("array", u32, struct meter_counts, ring_counts, METER_MAX_ROWS * METER_RING, BPF_F_MMAPABLE);
#endif
/* Per row, cumulative: what came for a cell that was not open. */
BPF_F_TABLE("array", u32, struct meter_usage, late, METER_MAX_ROWS, BPF_F_MMAPABLE);
/* Per row, cumulative: kernel/clock differences no per-CPU entry could hold
 * (> 0: the kernel charged the row more than was placed; < 0: less). */
BPF_F_TABLE("array", u32, s64, spill, METER_MAX_ROWS, BPF_F_MMAPABLE);
/* The row of each cgroup (or pseudo-cgroup) charged so far. */
BPF_HASH(rows, u64, u32, METER_MAX_ROWS);
BPF_PERCPU_ARRAY(cpu_state, struct meter_cpu, 1);
BPF_PERCPU_ARRAY(stats, u64, METER_NR_STATS);
/* enum meter_control, written (and NEXT_ROW read) by user space in place:
 * mapped into its memory like the ring, so a drain's watermark and taken
 * window cost a store, not a syscall each. */
BPF_F_TABLE("array", u32, u64, control, METER_NR_CONTROLS, BPF_F_MMAPABLE);
/* Compartment cgroup ids (value unused), written by user space. */
BPF_HASH(compartments, u64, u64, METER_MAX_COMPARTMENTS);


static __always_inline void stat_add(int idx, u64 n)
{
	u64 *v = stats.lookup(&idx);

	if (v)
		*v += n;
}

/*
 * Delta of counter i since this CPU's previous read, scaled by
 * enabled/running when the PMU multiplexed it (running < enabled).
 */
static __always_inline u64 counter_delta(struct meter_cpu *st, int i,
					 struct bpf_perf_event_value *v)
{
	u64 d = v->counter - st->value[i];
	u64 de = v->enabled - st->enabled[i];
	u64 dr = v->running - st->running[i];

	st->value[i] = v->counter;
	st->enabled[i] = v->enabled;
	st->running[i] = v->running;
	if (dr && dr < de)
		d = d * de / dr;
	return d;
}

static __always_inline void read_counters(struct meter_cpu *st, u64 *delta)
{
	struct bpf_perf_event_value v;

	/* One block per counter: bcc rewrites map methods only when the map
	 * name is spelled out, so this cannot be a loop over maps. */
#if METER_NR_COUNTERS > 0
	if (counter0.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		delta[0] = counter_delta(st, 0, &v);
	else
		stat_add(METER_STAT_COUNTER_ERRORS, 1);
#endif
#if METER_NR_COUNTERS > 1
	if (counter1.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		delta[1] = counter_delta(st, 1, &v);
	else
		stat_add(METER_STAT_COUNTER_ERRORS, 1);
#endif
#if METER_NR_COUNTERS > 2
	if (counter2.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		delta[2] = counter_delta(st, 2, &v);
	else
		stat_add(METER_STAT_COUNTER_ERRORS, 1);
#endif
#if METER_NR_COUNTERS > 3
	if (counter3.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		delta[3] = counter_delta(st, 3, &v);
	else
		stat_add(METER_STAT_COUNTER_ERRORS, 1);
#endif
}

/*
 * The ring row of cgid: its own, taken on its first charge (an atomic add
 * on METER_CTL_NEXT_ROW, then an insert that another CPU may have won, in
 * which case its row is used and the one taken stays empty); with every
 * row taken, METER_UNATTRIBUTED_ROW.
 */
static __always_inline u32 row_of(u64 cgid)
{
	int k = METER_CTL_NEXT_ROW;
	u32 *r = rows.lookup(&cgid);
	u64 *next;
	u32 row;

	if (r)
		return *r;
	next = control.lookup(&k);
	if (!next)
		return METER_UNATTRIBUTED_ROW;
	row = __sync_fetch_and_add(next, 1);
	if (row >= METER_MAX_ROWS)
		return METER_UNATTRIBUTED_ROW;
	rows.insert(&cgid, &row);
	r = rows.lookup(&cgid);
	return r ? *r : METER_UNATTRIBUTED_ROW;
}

/* Add to row's late total: ns (and counter deltas) whose cell was not open. */
static __always_inline void late_add(u32 row, u64 ns, u64 *delta)
{
	struct meter_usage *l = late.lookup(&row);

	stat_add(METER_STAT_LATE_NS, ns);
	if (!l)
		return;
	__sync_fetch_and_add(&l->ns, ns);
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		__sync_fetch_and_add(&l->count[i], delta[i]);
}

/*
 * Add ns and counter deltas to (row, window). Open cells are those of
 * windows after the watermark (not closed) and at most METER_RING after
 * the last window user space took (their cell was zeroed for them); the
 * rest is late.
 */
static __always_inline void store_row(u32 row, u64 window, u64 ns, u64 *delta, u64 watermark, u64 taken)
{
	u32 i;
	u64 *c;

	if (window <= watermark || window > taken + METER_RING) {
		late_add(row, ns, delta);
		return;
	}
	i = row * METER_RING + (u32)(window % METER_RING);
	c = ring.lookup(&i);
	if (!c)
		return;   /* not reached: row < METER_MAX_ROWS */
	__sync_fetch_and_add(c, ns);
#if METER_NR_COUNTERS > 0
	{
		struct meter_counts *cc = ring_counts.lookup(&i);

		if (cc) {
#pragma unroll
			for (int j = 0; j < METER_NR_COUNTERS; j++)
				__sync_fetch_and_add(&cc->count[j], delta[j]);
		}
	}
#endif
}

static __always_inline u64 control_get(int idx)
{
	u64 *v = control.lookup(&idx);

	return v ? *v : 0;
}

/*
 * The cgroup to charge for `current`: the deepest compartment among its
 * cgroup and that cgroup's ancestors, decided now (so usage in a child
 * cgroup that is gone by the next drain is still its compartment's). When
 * the deepest listed ancestor is a discovery root (METER_ROOT_BIT), its
 * descendant at the rule's depth (a compartment user space names at the
 * next drain), or the task's own cgroup when that is shallower. Else
 * METER_CTL_OTHER (the host), or its own cgroup when that is 0 (user space
 * names it). The idle task (pid 0) is METER_IDLE_CGID. The last answer is
 * kept per CPU until the leaf or the compartments change.
 */
static __always_inline u64 current_cgid(struct meter_cpu *st)
{
	u64 leaf, levels, gen, id, *v;

	if (!(u32)bpf_get_current_pid_tgid())
		return METER_IDLE_CGID;
	leaf = bpf_get_current_cgroup_id();
	/* Generation 0: nothing listed. A hit costs this one lookup. */
	gen = control_get(METER_CTL_GEN);
	if (!gen)
		return leaf;
	if (st && st->res_leaf == leaf && st->res_gen == gen)
		return st->res_id;
	levels = control_get(METER_CTL_LEVELS);
	id = 0;
#pragma unroll
	for (int l = METER_MAX_LEVEL - 1; l >= 0; l--) {
		u64 a;

		if (!(levels & (1ULL << l)))
			continue;
		a = bpf_get_current_ancestor_cgroup_id(l);
		if (a && compartments.lookup(&a)) {
			id = a;
			break;
		}
	}
	/* A discovery root (its value: the level of the cgroups its rules
	 * name): charge the task's ancestor at that level, or its own cgroup
	 * when that is shallower. Looked up again rather than carried out of
	 * the loop: the verifier then walks the loop as for compartments. */
	if (id) {
		v = compartments.lookup(&id);
		if (v && *v > METER_ROOT_BIT) {
			id = bpf_get_current_ancestor_cgroup_id((int)(*v - METER_ROOT_BIT));
			if (!id)
				id = leaf;
		}
	}
	if (!id)
		id = control_get(METER_CTL_OTHER);
	if (!id)
		id = leaf;
	if (!st)
		return id;
	st->res_leaf = leaf;
	st->res_id = id;
	st->res_gen = gen;
	/* Read back: every path above leaves the same unknown value here, so the
	 * verifier walks the charge-split loop after it once, not once per path. */
	return *(volatile u64 *)&st->res_id;
}

/*
 * Store a charge for a window that is not this CPU's current one:
 * windows before the first metered one are start-up (discarded); the
 * rest goes to the ring, or to the row's late total (store_row()).
 */
static __always_inline void put(u64 cgid, u64 window, u64 ns, u64 *delta,
				u64 watermark, u64 first)
{
	if (window < first)
		return;
	store_row(row_of(cgid), window, ns, delta, watermark, control_get(METER_CTL_TAKEN));
}

/* 1 when v is not 0, else 0, for every u64 (v or -v has bit 63 set). */
static __always_inline u64 nonzero(u64 v)
{
	return (v | (0 - v)) >> 63;
}

/*
 * This CPU's slot for cgid. idle and sched, charged at nearly every switch
 * through idle, have slots of their own, 0 and 1; every other cgroup hashes
 * onto the other six (Fibonacci hashing: cgroup ids are inode numbers, often
 * close; onto six by a multiply and a shift, not a division). Sharing idle's
 * or sched's slot, a compartment whose id hashed there (one in four) had
 * every switch through idle evict one of them: 50-120 ns a switch more for
 * that compartment's tasks (docs/architecture.md, "Switches through idle").
 * Branch-free, so the verifier walks each caller once, not once per case.
 */
static __always_inline u32 slot_of(u64 cgid)
{
	u64 h = (((cgid * 0x9E3779B97F4A7C15ULL) >> 32) * (METER_CACHE_SLOTS - 2)) >> 32;

	return (u32)(nonzero(cgid) * (1 + nonzero(cgid ^ METER_SCHED_CGID) * (1 + h))) & (METER_CACHE_SLOTS - 1);
}

/* Move every slot of this CPU's current window into the usage map. */
static __always_inline void flush(struct meter_cpu *st, u64 watermark, u64 first)
{
#pragma unroll
	for (int i = 0; i < METER_CACHE_SLOTS; i++) {
		struct meter_slot *s = &st->slot[i];

		if (!s->usage.ns)
			continue;
		put(s->cgid, st->window, s->usage.ns, s->usage.count, watermark, first);
		__builtin_memset(&s->usage, 0, sizeof(s->usage));
	}
}

/* Add to this CPU's slot for cgid in its current window, evicting another cgroup's. */
static __always_inline void accumulate(struct meter_cpu *st, u64 cgid, u64 ns, u64 *delta)
{
	struct meter_slot *s = &st->slot[slot_of(cgid)];

	if (s->usage.ns && s->cgid != cgid) {
		put(s->cgid, st->window, s->usage.ns, s->usage.count,
		    control_get(METER_CTL_WATERMARK), control_get(METER_CTL_FIRST));
		__builtin_memset(&s->usage, 0, sizeof(s->usage));
	}
	s->cgid = cgid;
	s->usage.ns += ns;
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		s->usage.count[i] += delta[i];
}

/*
 * Rare path: [last, now) leaves the CPU's current window (the tick arrives
 * at an arbitrary phase, an idle CPU wakes). Flush the slots, then split
 * the time exactly at window boundaries and the counter deltas in
 * proportion to time; the new current window takes the rounding remainder,
 * into the slots, so counter totals stay exact.
 */
static __always_inline void cross(struct meter_cpu *st, u64 cgid, u64 last, u64 now, u64 *delta)
{
	u64 watermark = control_get(METER_CTL_WATERMARK);
	u64 first = control_get(METER_CTL_FIRST);
	u64 taken = control_get(METER_CTL_TAKEN);
	u64 total = now - last;
	u64 final = now / METER_WINDOW_NS;
	u64 w = last / METER_WINDOW_NS;
	u64 part[METER_MAX_COUNTERS] = {};
	u64 left[METER_MAX_COUNTERS] = {};
	u64 zero[METER_MAX_COUNTERS] = {};
	u32 row;

	flush(st, watermark, first);
	row = row_of(cgid);
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		left[i] = delta[i];
	if (final - w >= METER_MAX_SPAN) {
		u64 start = (final - METER_MAX_SPAN + 1) * METER_WINDOW_NS;

		/* Older than one charge may split over (a paused VM): late, kept. */
		if (final - METER_MAX_SPAN + 1 > first)
			late_add(row, start - last, zero);
		w = final - METER_MAX_SPAN + 1;
		last = start;
	}
	for (int s = 0; s < METER_MAX_SPAN && w < final; s++, w++) {
		u64 end = (w + 1) * METER_WINDOW_NS;
		u64 ns = end - last;

#pragma unroll
		for (int i = 0; i < METER_NR_COUNTERS; i++) {
			part[i] = delta[i] * ns / total;
			left[i] -= part[i];
		}
		if (w >= first)
			store_row(row, w, ns, part, watermark, taken);
		last = end;
	}
	st->window = final;
	st->window_end = (final + 1) * METER_WINDOW_NS;
	if (now > last)
		accumulate(st, cgid, now - last, left);
}

#if METER_NET
/*
 * Packet counting state shared with net.bpf.c (the tc programs count, a
 * context switch here flushes a CPU's stale counts). It lives in this file
 * because bcc rewrites map calls only in the main source.
 *
 * Why per-CPU slots: a packet then costs a few adds in memory only this
 * CPU writes, not a hash lookup and atomics. The slots of a CPU hold one
 * window at a time; they move to net_usage when that CPU counts a packet in
 * a later window or switches tasks. Both happen in contexts that cannot
 * interrupt each other (softirq or bh-off process context, and the
 * scheduler with interrupts off); the tick never touches them.
 */
BPF_F_TABLE("array", u32, struct meter_net_cell, net_ring, METER_MAX_PORTS * 2 * METER_RING, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct meter_net_cell, net_late, METER_MAX_PORTS * 2, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(net_slot, struct meter_net_slot, METER_MAX_PORTS);

/* Add packets to (port, kind, window) in the net ring, or to the late total
 * when that cell is not open (as store_row() does for CPU time). */
static __always_inline void net_store(u32 port, u32 kind, u64 window, u64 packets, u64 bytes,
				      u64 wire_packets, u64 wire_bytes)
{
	u32 row = port * 2 + kind, i;
	u64 watermark, taken;
	struct meter_net_cell *c;

	if (!packets || port >= METER_MAX_PORTS || kind > METER_NET_TX)
		return;
	watermark = control_get(METER_CTL_WATERMARK);
	taken = control_get(METER_CTL_NET_TAKEN);
	if (window < control_get(METER_CTL_FIRST))
		return;
	if (window <= watermark || window > taken + METER_RING) {
		c = net_late.lookup(&row);
		stat_add(METER_STAT_NET_LATE_PACKETS, packets);
	} else {
		i = row * METER_RING + (u32)(window % METER_RING);
		c = net_ring.lookup(&i);
	}
	if (!c)
		return;
	__sync_fetch_and_add(&c->packets, packets);
	__sync_fetch_and_add(&c->bytes, bytes);
	__sync_fetch_and_add(&c->wire_packets, wire_packets);
	__sync_fetch_and_add(&c->wire_bytes, wire_bytes);
}

/* Move this CPU's dirty port slots (of window st->net_window) to the net ring. */
static __always_inline void net_flush(struct meter_cpu *st)
{
	u32 n = st->net_ndirty;

	for (int i = 0; i < METER_NET_DIRTY; i++) {
		if (i >= n)
			break;
		u32 port = st->net_dirty[i & (METER_NET_DIRTY - 1)];
		struct meter_net_slot *s = net_slot.lookup(&port);

		if (!s)
			continue;
		net_store(port, METER_NET_RX, st->net_window, s->rx_packets, s->rx_bytes,
			  s->rx_wire_packets, s->rx_wire_bytes);
		net_store(port, METER_NET_TX, st->net_window, s->tx_packets, s->tx_bytes,
			  s->tx_wire_packets, s->tx_wire_bytes);
		__builtin_memset(s, 0, sizeof(*s));
	}
	st->net_ndirty = 0;
}

#endif /* METER_NET */

static __always_inline u64 kread(u64 addr)
{
	u64 v = 0;

	if (addr)
		bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
	return v;
}

#if METER_KERNEL_CHARGE
#if METER_TASK_STORAGE
/* A u64 field of current (at sched_switch: prev) at byte offset off, through
 * BTF's pointer to current (Linux 5.11+, as task storage): a plain load the
 * verifier checks against the kernel's own layout, instead of a helper call. */
static __always_inline u64 current_u64(u32 off)
{
	return *(u64 *)((char *)bpf_get_current_task_btf() + off);
}
#endif

/* se.sum_exec_runtime of prev, the outgoing task of a switch (so current). */
static __always_inline u64 prev_sum(u64 prev)
{
#if METER_TASK_STORAGE
	return current_u64(METER_TASK_SUM_OFF);
#else
	return kread(prev + METER_TASK_SUM_OFF);
#endif
}
#endif

#if METER_TASK_STORAGE
/* Per task: its se.sum_exec_runtime at the end of the last slice charged. */
struct meter_task_seen {
	u64 sum;
};
BPF_TASK_STORAGE(task_seen, struct meter_task_seen);
#endif

#if METER_KERNEL_CHARGE && METER_TASK_STORAGE && defined(METER_TASK_PREV_SUM_OFF) && defined(METER_TASK_POLICY_OFF)
/*
 * Where current's slice began, as a value of its se.sum_exec_runtime, when
 * no switch in was seen to read it there (idle_out() skips the read; a
 * task that came in unseen is followed, follow()). For a task of the fair
 * class (policies SCHED_NORMAL, SCHED_BATCH, SCHED_IDLE) that is its
 * se.prev_sum_exec_runtime, which CFS sets when it picks the task: a plain
 * load through BTF's pointer to current. The kernel moves that mark
 * mid-slice only when a running task's class, nice, priority, affinity or
 * cgroup changes; the part before it is then charged by the unseen-slice
 * check (recover_unseen(): a start later than the end of the last slice
 * charged), to the same cgroup.
 *
 * No other class sets that mark (Linux 6.18: a real-time task's is where
 * CFS last picked it, or 0 since fork), so a real-time task woken from
 * idle was charged its whole real-time life at each wake (26x its
 * cpu.stat; docs/architecture.md, "Switches through idle"). Its sum does not move while
 * it is off every CPU, so its slice began where its last slice charged
 * ended: its task storage (task_seen). Without that (its first slice seen
 * since meter started), by the clock since its switch in (counted:
 * METER_STAT_CLOCKED).
 */
#define METER_SLICE_MARK 1
#define METER_SUM_AT_PICK (~0ULL)

static __always_inline u64 slice_start(struct meter_cpu *st)
{
	struct task_struct *t = bpf_get_current_task_btf();
	u32 policy = *(u32 *)((char *)t + METER_TASK_POLICY_OFF);
	struct meter_task_seen *seen;
	u64 sum, now, clock;

	/* SCHED_NORMAL 0, SCHED_BATCH 3, SCHED_IDLE 5 */
	if (policy == 0 || policy == 3 || policy == 5)
		return current_u64(METER_TASK_PREV_SUM_OFF);
	sum = current_u64(METER_TASK_SUM_OFF);
	seen = task_seen.task_storage_get(t, 0, 0);
	if (seen && seen->sum && seen->sum <= sum)
		return seen->sum;
	stat_add(METER_STAT_CLOCKED, 1);
	now = bpf_ktime_get_ns();
	clock = (now > st->last_ns ? now - st->last_ns : 0) + st->ahead;
	return sum > clock ? sum - clock : 0;
}

/* st->sum not read at a switch away from idle (idle_out()): read where
 * the slice began (slice_start()) at that task's switch out. */
static __always_inline void sum_at_pick(struct meter_cpu *st, u64 prev)
{
	if (st->sum == METER_SUM_AT_PICK)
		st->sum = prev == st->task ? slice_start(st) : 0;
}
#endif

/* Add v to cgid's pending adjustment (see struct meter_cpu). */
static __always_inline void adj_add(struct meter_cpu *st, u64 cgid, s64 v)
{
	int free = -1;

	if (!v)
		return;
#pragma unroll
	for (int i = 0; i < METER_ADJ; i++) {
		if (st->adj_ns[i] && st->adj_cgid[i] == cgid) {
			st->adj_ns[i] += v;
			return;
		}
		if (!st->adj_ns[i] && free < 0)
			free = i;
	}
	if (free < 0) {
		/* No entry free (many cgroups owe or are owed on this CPU): to the
		 * row's spill total, which user space settles in the records. */
		u32 row = row_of(cgid);
		s64 *sp = spill.lookup(&row);

		stat_add(METER_STAT_UNPLACED_NS, v < 0 ? -v : v);
		if (sp)
			__sync_fetch_and_add(sp, v);
		return;
	}
	st->adj_cgid[free & (METER_ADJ - 1)] = cgid;
	st->adj_ns[free & (METER_ADJ - 1)] = v;
}

#if METER_SAME_RUN
/* A run's finished slices (same_run()) when the run ended unseen, or its
 * last task moved to another cgroup: owed to the run's cgroup, as its
 * switches would have charged them.
 * Rare (a switch no program saw), so to the row's spill total, which user
 * space settles in the records (docs/architecture.md, "The ring"), rather
 * than a per-CPU entry: that search here would cost the verifier more than
 * meter_switch has left. */
static __always_inline void owe_carry(struct meter_cpu *st, s64 owed)
{
	u32 row = row_of(st->run_cgid);
	s64 *sp = spill.lookup(&row);

	stat_add(METER_STAT_UNPLACED_NS, owed < 0 ? -owed : owed);
	if (sp)
		__sync_fetch_and_add(sp, owed);
	st->carry = 0;
	st->run_owed = 0;
}
#endif

/* Take cgid's pending adjustment (with only_negative: only what it owes back). */
static __always_inline s64 adj_take(struct meter_cpu *st, u64 cgid, int only_negative)
{
	s64 v = 0;

#pragma unroll
	for (int i = 0; i < METER_ADJ; i++) {
		if (st->adj_ns[i] && st->adj_cgid[i] == cgid && (!only_negative || st->adj_ns[i] < 0)) {
			v += st->adj_ns[i];
			st->adj_ns[i] = 0;
		}
	}
	return v;
}

/*
 * Place up to `gap` ns, from st->last_ns on and inside the current window,
 * for what waits for this CPU's time: kernel charges not placed yet, then
 * steal. Returns what was placed.
 */
static __always_inline u64 pay(struct meter_cpu *st, u64 gap)
{
	u64 zero[METER_MAX_COUNTERS] = {};
	u64 room = st->window_end - st->last_ns;
	u64 used = 0, p;

	if (gap > room)
		gap = room;
#pragma unroll
	for (int i = 0; i < METER_ADJ; i++) {
		s64 owed = st->adj_ns[i];

		if (owed > 0 && used < gap) {
			p = (u64)owed < gap - used ? (u64)owed : gap - used;
			accumulate(st, st->adj_cgid[i], p, zero);
			st->adj_ns[i] = owed - (s64)p;
			used += p;
		}
	}
#if METER_STEAL
	if (st->steal && used < gap) {
		p = st->steal < gap - used ? st->steal : gap - used;
		accumulate(st, METER_STEAL_CGID, p, zero);
		st->steal -= p;
		used += p;
	}
#endif
	st->last_ns += used;
	return used;
}

/* Move up to ns of `from`'s time in the current window to `to`; returns what was moved. */
static __always_inline u64 move(struct meter_cpu *st, u64 from, u64 to, u64 ns)
{
	u64 zero[METER_MAX_COUNTERS] = {};
	struct meter_slot *s = &st->slot[slot_of(from)];
	u64 t;

	/* Keep 1 ns: an empty slot would hand its counter deltas to another cgroup. */
	if (!ns || s->cgid != from || s->usage.ns <= 1)
		return 0;
	t = ns < s->usage.ns - 1 ? ns : s->usage.ns - 1;
	s->usage.ns -= t;
	accumulate(st, to, t, zero);
	return t;
}

/* Charge [st->last_ns, now) to cgid: in the current window, or split over windows. */
static __always_inline void advance(struct meter_cpu *st, u64 cgid, u64 now, u64 *delta)
{
	u64 last = st->last_ns;

	st->last_ns = now;
	if (now < st->window_end) {
		if (now > last)
			accumulate(st, cgid, now - last, delta);
		return;
	}
	cross(st, cgid, last, now, delta);
}

/* Place ns of SCHED from st->last_ns on (the caller checked the room). */
static __always_inline void fill_sched(struct meter_cpu *st, u64 ns)
{
	u64 zero[METER_MAX_COUNTERS] = {};

	if (!ns)
		return;
	accumulate(st, METER_SCHED_CGID, ns, zero);
	st->last_ns += ns;
}

/*
 * Charge this CPU's time since its previous charge, [last, now). `cgid`
 * ran (current). Time for others (kernel charges owed, steal, scheduler
 * time) is placed first, from `last` on and only inside the current
 * window (what does not fit waits for the next charge); the owner gets
 * the rest, split over windows if it crosses them.
 *
 * With a `task`, `sum` is its se.sum_exec_runtime as the scheduler just
 * left it (a switch): the task gets what the kernel charged it since the
 * last settle. Else (a tick, task 0) it gets the clock's time,
 * provisionally, less what it was given beyond the
 * kernel before, and less the steal this tick's look found
 * (`fresh_steal`; a constant 0 at switches, so that the switch program
 * carries none of that code).
 *
 * (Inlined: bcc loads each program's section alone, so no BPF-to-BPF calls.)
 */
static __always_inline void charge_until(struct meter_cpu *st, u64 now, u64 cgid,
					 u64 task, u64 sum, u64 fresh_steal)
{
	u64 delta[METER_MAX_COUNTERS] = {};
	u64 last = st->last_ns, span, cap, gap, g, placed, tail = 0;
	int cut = 0;
	s64 want;

	read_counters(st, delta);
	if (!last) {
		/* The first event on a CPU only starts its clock. */
		st->last_ns = now;
		st->window = now / METER_WINDOW_NS;
		st->window_end = (st->window + 1) * METER_WINDOW_NS;
		return;
	}
	if (now <= last)
		return;
	span = now - last;
	cap = st->window_end - last;
	if (cap > span)
		cap = span;
	if (cgid == METER_IDLE_CGID) {
		/* Idle has no kernel charge: it keeps what nothing else waits for. */
		pay(st, cap);
		advance(st, cgid, now, delta);
		return;
	}
#if METER_KERNEL_CHARGE
	if (task && task == st->task) {
		want = (s64)(sum - st->sum) - (s64)st->ahead + adj_take(st, cgid, 0);
		st->sum = sum;
		st->ahead = 0;
		if (want >= (s64)span) {
			/* The kernel charged more than the clock saw since the switch
			 * (a wakeup is charged from before it): take that from idle's
			 * or the scheduler's time in this window, else owe it. */
			u64 more = (u64)want - span;

			more -= move(st, METER_IDLE_CGID, cgid, more);
			more -= move(st, METER_SCHED_CGID, cgid, more);
			adj_add(st, cgid, (s64)more);
		} else {
			if (want < 0) {
				/* The clock gave cgid more than the kernel did: take it
				 * back from its time in this window, else its next time. */
				adj_add(st, cgid, want + (s64)move(st, cgid, METER_SCHED_CGID, (u64)-want));
				want = 0;
			}
			gap = span - (u64)want;
			g = gap < cap ? gap : cap;
			placed = pay(st, g);
			fill_sched(st, g - placed);
			gap -= g;
			if (gap) {
				/* [last, now) crosses windows: the rest goes at its end,
				 * inside now's window, after cgid's part. */
				tail = now % METER_WINDOW_NS;
				if (tail > gap)
					tail = gap;
				/* What still does not fit: cgid runs on it now and gives it back later. */
				if (gap > tail)
					adj_add(st, cgid, -(s64)(gap - tail));
			}
		}
	} else {
		/* Provisional: the clock's time, less what cgid was given beyond
		 * the kernel before. Steal is not cut here: the kernel may charge
		 * some of it after all, and owed time would then land windows
		 * later; the switch settles it, and its gap holds the steal. */
		u64 credit = (u64)-adj_take(st, cgid, 1), c, rest, s, lead;

		st->ahead += span;
		c = credit < cap ? credit : cap;
		fill_sched(st, c);
		if (credit > c)
			adj_add(st, cgid, -(s64)(credit - c));
#if METER_STEAL
		/* A pause of the VM, seen as steal at this tick, is no task's, and
		 * the kernel will not charge it: when the owner's part of the span
		 * fits in its window, it gets that, first, and the steal the rest,
		 * over as many windows as it lasted. Given to the owner instead, it
		 * would be a debt taken back windows later, from other windows'
		 * bills (docs/architecture.md, "CPU time"). */
		rest = now - st->last_ns;
		s = fresh_steal < st->steal ? fresh_steal : st->steal;
		s = s < rest ? s : rest;
		lead = rest - s;
		if (s && lead <= st->window_end - st->last_ns) {
			accumulate(st, cgid, lead, delta);
			st->last_ns += lead;
			st->steal -= s;
			st->ahead -= s;
			cut = 1;
		}
#endif
	}
#endif
	if (fresh_steal && cut) {
		u64 zero[METER_MAX_COUNTERS] = {};

		advance(st, METER_STEAL_CGID, now, zero);
		return;
	}
	/* One advance only: each copy of its window loop costs the verifier dearly. */
	advance(st, cgid, now - tail, delta);
	if (tail) {
		placed = pay(st, tail);
		fill_sched(st, tail - placed);
	}
}

#if METER_STEAL
#if defined(METER_PCPU_RUNQUEUES_OFF) && defined(METER_PCPU_CPU_NUMBER_OFF) && \
	defined(METER_PCPU_STEAL_TIME_OFF) && defined(METER_KVM_STEAL_OFF)
#define METER_KVM_STEAL 1
#else
#define METER_KVM_STEAL 0
#endif

static __always_inline u32 kread32(u64 addr)
{
	u32 v = ~0U;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
	return v;
}

#if METER_KVM_STEAL
/*
 * The hypervisor's steal counter for this CPU (-1: not read): one aligned 8-byte load. The
 * host adds to it in a single store, and only while this vCPU is out of the
 * guest (KVM's record_steal_time(), before it enters), so a read here sees
 * the old value or the new one whole, never a torn one. The version seqlock
 * around it, which the guest kernel's own reader uses, is not needed for
 * that: reading it took two more helper calls a tick (tick 368-418 ->
 * 290-415 ns, alternating runs; docs/architecture.md, "CPU time").
 */
static __always_inline u64 kvm_steal(struct meter_cpu *st)
{
	u64 v;

	if (bpf_probe_read_kernel(&v, sizeof(v), (void *)(st->kvm + METER_KVM_STEAL_OFF)))
		return ~0ULL;   /* not read: no look */
	return v;
}
#endif

/*
 * Note the steal time this CPU has seen since the last look: the
 * hypervisor's own counter (KVM guests; any time), else the run queue's
 * rq->clock - rq->clock_task (only `locked`: under the run queue's lock,
 * which a switch holds; elsewhere a remote CPU may be updating them).
 */
static __always_inline void look_steal(struct meter_cpu *st, u64 task, int locked)
{
	u64 s;

	if (!st->rq) {
		/* First look: find this CPU's run queue through a task, check it. */
		u64 rq = task ? kread(kread(task + METER_TASK_CFS_RQ_OFF) + METER_CFS_RQ_RQ_OFF) : 0;

		if (!rq || kread32(rq + METER_RQ_CPU_OFF) != bpf_get_smp_processor_id() || !locked)
			return;
		st->rq = rq;
		st->stolen = kread(rq + METER_RQ_CLOCK_OFF) - kread(rq + METER_RQ_CLOCK_TASK_OFF);
#if METER_KVM_STEAL
		{
			/* The per-CPU base is the run queue's address less its offset. */
			u64 base = rq - METER_PCPU_RUNQUEUES_OFF;

			if (kread32(base + METER_PCPU_CPU_NUMBER_OFF) == bpf_get_smp_processor_id()) {
				st->kvm = base + METER_PCPU_STEAL_TIME_OFF;
				st->kvm_seen = kvm_steal(st);
				if (st->kvm_seen == ~0ULL)
					st->kvm = st->rq = 0;   /* try again at the next first look */
			}
		}
#endif
		return;
	}
#if METER_KVM_STEAL
	if (st->kvm) {
		s = kvm_steal(st);
		if (s == ~0ULL)
			return;
		if (s > st->kvm_seen)
			st->steal += s - st->kvm_seen;
		st->kvm_seen = s;
		return;
	}
#endif
	if (!locked)
		return;
	s = kread(st->rq + METER_RQ_CLOCK_OFF) - kread(st->rq + METER_RQ_CLOCK_TASK_OFF);
	if (s > st->stolen)
		st->steal += s - st->stolen;
	st->stolen = s;
}
#endif

#if METER_KERNEL_CHARGE
/*
 * Follow `task`, which runs on this CPU although no switch to it was seen
 * (it happens: a thread of this VM's init agent comes and goes unseen about
 * once a second). Its slice started where slice_start() says (a fair
 * task: the scheduler's own mark, se.prev_sum_exec_runtime, which CFS sets
 * when it picks a task); what ticks gave provisionally since the last
 * switch seen stays with its owners.
 */
static __always_inline void follow(struct meter_cpu *st, u64 task)
{
	stat_add(METER_STAT_UNSETTLED, 1);
	st->task = task;
	st->ahead = 0;
#ifdef METER_SLICE_MARK
	st->sum = slice_start(st);   /* task is current */
#elif defined(METER_TASK_PREV_SUM_OFF)
	st->sum = kread(task + METER_TASK_PREV_SUM_OFF);   /* a fair task's mark */
#else
	st->sum = kread(task + METER_TASK_SUM_OFF);
#endif
}
#endif

/* Common start of every charging program: this CPU's state, or NULL to leave it alone. */
static __always_inline struct meter_cpu *charging_state(int switching)
{
	int zero = 0;
	struct meter_cpu *st = cpu_state.lookup(&zero);

	if (!st)
		return 0;
#if METER_NET
	/* The tick interrupted a NET softirq span (or its entry or exit, which
	 * write this CPU's slots themselves): leave it to them. A switch never
	 * runs inside a softirq: a span still open then is stale, and ends. */
	if (*(volatile u32 *)&st->in_net_softirq) {
		if (!switching) {
#if METER_PACKET_TIME_CHARGE
			/* It charges nothing; but packets dated by the CPU's last
			 * times are dated no earlier than it (net.bpf.c, packet_time()). */
			st->seen_ns = bpf_ktime_get_ns();
#endif
			return 0;
		}
		*(volatile u32 *)&st->in_net_softirq = 0;
	}
#endif
	return st;
}

#if METER_NET
/*
 * NET_RX / NET_TX softirq time belongs to the compartments whose packets it
 * processed, not to whichever task it interrupted. Entry only notes the
 * time; the tc programs note each port's packets in the span; at exit, if
 * any were metered, the task's time up to the span is charged, then the
 * span goes to the ports (pseudo-cgroups METER_PORT_CGID(port)) in
 * proportion to packets, and what no listed port claims to the task. A
 * span with no metered packets costs nothing more: its time simply stays
 * with the task. A span that crosses a window boundary is left to the task
 * (counted): spans last microseconds.
 */
#define NET_TX_SOFTIRQ 2
#define NET_RX_SOFTIRQ 3

static __always_inline int is_net_softirq(struct bpf_raw_tracepoint_args *ctx)
{
	u64 vec = ctx->args[0];

	return vec == NET_TX_SOFTIRQ || vec == NET_RX_SOFTIRQ;
}

int meter_softirq_entry(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0;
	struct meter_cpu *st;

	if (!is_net_softirq(ctx))
		return 0;
	st = cpu_state.lookup(&zero);
	if (!st)
		return 0;
	st->span_nports = 0;
	st->span_other = 0;
	st->span_start = bpf_ktime_get_ns();
	/* From here the tick leaves this CPU alone until softirq exit. */
	*(volatile u32 *)&st->in_net_softirq = 1;
	return 0;
}

/*
 * Split the span [span_start, now) over its ports by packets: each port's
 * owner is charged its share as softirq_ns, and the compartment whose time
 * the span ran in gives as much (softirq_given_ns). Its cpu_ns stays what
 * the kernel charged it; per window, cpu + softirq - given = the clock.
 */
static __always_inline void charge_span(struct meter_cpu *st)
{
	u64 zero[METER_MAX_COUNTERS] = {};
	u64 now, start, span, total, used = 0;
	u32 n = st->span_nports;

	total = st->span_other;
#pragma unroll
	for (int i = 0; i < METER_SPAN_PORTS; i++)
		if (i < n)
			total += st->span_pkts[i];
	if (!total)
		return;   /* no metered packets: the time stays with the task */
	now = bpf_ktime_get_ns();
	start = st->span_start;
	if (!st->last_ns || now <= start)
		return;
	span = now - start;
	for (int i = 0; i < METER_SPAN_PORTS; i++) {
		if (i >= n)
			break;
		u64 ns = span * st->span_pkts[i] / total;

		if (ns)
			accumulate(st, METER_PORT_CGID(st->span_port[i]), ns, zero);
		used += ns;
	}
	if (used)
		accumulate(st, METER_GIVEN_BIT | current_cgid(st), used, zero);
	if (st->span_other)
		stat_add(METER_STAT_SPAN_UNATTRIBUTED_NS, span * st->span_other / total);
}

int meter_softirq_exit(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0;
	struct meter_cpu *st;

	if (!is_net_softirq(ctx))
		return 0;
	st = cpu_state.lookup(&zero);
	if (!st || !st->in_net_softirq)
		return 0;
	charge_span(st);
	/* Cleared last: a tick landing while this runs must not charge too. */
	*(volatile u32 *)&st->in_net_softirq = 0;
	return 0;
}
#endif /* METER_NET */

#if METER_TASK_STORAGE
/*
 * Time the kernel charged a task in slices no switch event showed. On some
 * hosts a few switches never reach sched_switch programs (on this VM, every
 * switch away from the init agent's threads: the next switch seen then has a
 * prev that no switch brought in). The tasks that ran unseen in between
 * lose nothing: the kernel's sum for each task runs on, so at its next
 * switch seen, what it gained between the end of its last charged slice and
 * the start of this one was charged by the kernel and by nobody here. That
 * is owed to its cgroup (an adj entry: paid out of the clock's time nobody
 * claimed, which `sched` holds meanwhile) and counted (METER_STAT_UNSEEN_NS).
 * current is prev here: the task whose storage this is.
 */
static __always_inline int recover_unseen(struct meter_cpu *st)
{
	struct meter_task_seen *seen;
	u64 start = st->out_start;
	int owed = 0;

	if (!start)
		return 0;
	st->out_start = 0;
	seen = task_seen.task_storage_get(bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!seen)
		return 0;
	if (seen->sum && start > seen->sum) {
		adj_add(st, st->out_cgid, (s64)(start - seen->sum));
		stat_add(METER_STAT_UNSEEN_NS, start - seen->sum);
		owed = 1;
	}
	seen->sum = st->out_sum;
	return owed;
}
#endif

#if METER_KERNEL_CHARGE
/* meter_settle (below), tail-called by meter_switch when there is something
 * to settle: user space puts it in slot 0. */
BPF_PROG_ARRAY(settle_call, 1);

/* Something for meter_settle: an adjustment pending, and no walk yet in this window. */
/* Whether this CPU holds an adjustment: a kernel charge owed, or a debt. */
static __always_inline int adj_pending(struct meter_cpu *st)
{
	s64 any = 0;

#pragma unroll
	for (int a = 0; a < METER_ADJ; a++)
		any |= st->adj_ns[a];
	return any != 0;
}

static __always_inline int settle_due(struct meter_cpu *st)
{
	if (!st->last_ns || st->settled_window == st->window)
		return 0;
	return adj_pending(st);
}
#endif

/* Packet counts this CPU holds for its packet window, waiting for a switch to flush them. */
static __always_inline u32 net_pending(struct meter_cpu *st)
{
#if METER_NET
	return st->net_ndirty;
#else
	return 0;
#endif
}

#if METER_SAME_RUN
/*
 * A switch between two tasks of one css_set (so of one cgroup on every
 * hierarchy: one compartment) has nothing to place. What the kernel charged
 * prev's slice joins the run's carry, and the next switch that charges (the
 * first out of the run, or after a tick) places it with one clock read, as one slice: the
 * span it places holds the run's slices and the scheduler's time between
 * them, which goes to `sched` as for any slice (docs/architecture.md, "Runs
 * of one cgroup"). No clock read and no map write here. Not taken when the
 * switch has more to do: prev came in unseen or its run is owed, prev or
 * next is the idle task (the root's css_set is also idle's), an adjustment
 * waits for its settle walk, packet counts wait for their flush, the run
 * queue is not found yet, user space is nudging, or a tick charged the
 * slice a run would begin on.
 */
static __always_inline int same_run(struct meter_cpu *st, u64 prev, u64 next)
{
	u64 cset, sum, start, nudge;

	/* This CPU's idle task (pid 0): its css_set is the root's. Learnt
	 * once: from the run queue (a CPU that never idles has runs too), else
	 * at a switch away from it. */
	if (!st->idle_task) {
#if METER_STEAL && defined(METER_RQ_IDLE_OFF)
		if (st->rq)
			st->idle_task = kread(st->rq + METER_RQ_IDLE_OFF);
#endif
		if (!st->idle_task && !(u32)bpf_get_current_pid_tgid())
			st->idle_task = prev;
	}
	if (prev != st->task || st->run_owed || !st->idle_task || prev == st->idle_task || next == st->idle_task || !st->last_ns)
		return 0;
	if (net_pending(st))
		return 0;
#if METER_STEAL
	if (!st->rq)
		return 0;
#endif
	if (settle_due(st))
		return 0;
	/* User space is nudging CPUs so that they charge up to now: this
	 * switch must charge. */
	nudge = control_get(METER_CTL_NUDGE);
	if (st->nudge_seen != nudge) {
		st->nudge_seen = nudge;
		return 0;
	}
	cset = kread(prev + METER_TASK_CGROUPS_OFF);
	if (!cset)
		return 0;
	if (!st->carry) {
		/* A run begins only on a slice no tick has charged provisionally:
		 * then a carry never overlaps a tick's provisional time. */
		if (st->ahead)
			return 0;
		st->run_cset = cset;
		st->run_window = st->window;
	} else if (cset != st->run_cset || st->window != st->run_window) {
		/* prev moved to another cgroup while it ran; or a tick has begun
		 * another window since the run began: this switch places the
		 * run, so that each window gets its slices (a run lasts at most
		 * about a window). */
		return 0;
	}
	if (kread(next + METER_TASK_CGROUPS_OFF) != cset)
		return 0;
	if (!st->carry)
		st->run_cgid = current_cgid(st);
	/* st->sum is the running task's sum at its switch in, less the carry:
	 * so the charge that places the run (charge_until()) takes its whole
	 * kernel charge as one task's. */
	start = st->sum + st->carry;
	sum = prev_sum(prev);
	st->carry += sum - start;
	st->runs++;
#if METER_TASK_STORAGE
	st->out_start = start;
	st->out_sum = sum;
	st->out_cgid = st->run_cgid;
	recover_unseen(st);
#endif
	st->task = next;
	st->sum = kread(next + METER_TASK_SUM_OFF) - st->carry;
	return 1;
}
#endif

/*
 * A switch's charge: the time since this CPU's last charge, to prev's
 * cgroup (meter_charge, or meter_switch without same_run()).
 */
static __always_inline int switch_charge(struct bpf_raw_tracepoint_args *ctx)
{
	struct meter_cpu *st = charging_state(1);
	u64 now, cgid;

	if (!st)
		return 0;
	now = bpf_ktime_get_ns();
#if METER_NET
	/* Packet counts of a window this CPU has left (see net_flush); only
	 * at a switch, which no tc program can be interrupted by. */
	if (st->net_ndirty && now >= st->net_window_end)
		net_flush(st);
#endif
	cgid = current_cgid(st);
#if METER_KERNEL_CHARGE
	{
		u64 prev = ctx->args[1], next = ctx->args[2];

#if METER_STEAL
		/* With the hypervisor's counter the tick looks (cheaper per switch);
		 * the run queue's clocks can only be read here, under its lock. */
		if (!METER_KVM_STEAL || !st->rq)
			look_steal(st, cgid == METER_IDLE_CGID ? next : prev, 1);
#endif
#ifdef METER_TASK_PREV_SUM_OFF
		/* prev came in unseen (rare; counted): follow it from here. */
		if (cgid != METER_IDLE_CGID && prev != st->task)
			follow(st, prev);
#endif
		{
			u64 sum = cgid == METER_IDLE_CGID ? 0 : prev_sum(prev);

			/* For recover_unseen(): the slice charged here, [st->sum, sum)
			 * (st->sum less a run's carry, same_run()). */
			st->out_start = cgid != METER_IDLE_CGID && prev == st->task ? st->sum + st->carry : 0;
			st->out_sum = sum;
			st->out_cgid = cgid;
			charge_until(st, now, cgid, prev, sum, 0);
		}
		st->task = next;
#if METER_SAME_RUN
		/* Nothing reads the idle task's sum (it has no kernel charge). */
		st->sum = kread(next == st->idle_task ? 0 : next + METER_TASK_SUM_OFF);
#else
		st->sum = kread(next + METER_TASK_SUM_OFF);
#endif
		st->ahead = 0;
#if METER_SAME_RUN
		st->carry = 0;   /* placed by this charge (or owed by meter_switch) */
#endif
#if METER_TASK_STORAGE
		recover_unseen(st);
#endif
		if (settle_due(st))
			settle_call.call(ctx, 0);   /* does not return (unless the slot is empty) */
	}
#else
	charge_until(st, now, cgid, 0, 0, 0);
#endif
	return 0;
}

#if METER_SAME_RUN
/* meter_charge (below), tail-called by meter_switch for a switch that is
 * not inside a run: user space puts it in slot 0 before attaching. */
BPF_PROG_ARRAY(charge_call, 1);

/*
 * Whether nothing but a switch's own slice waits for this CPU's time: its
 * clock has started, and no run's carry, packet counts, adjustment (a
 * kernel charge owed or a debt) or steal waits; steal is looked at by the
 * tick (the hypervisor's counter), not at switches. idle_out() and
 * idle_in() charge only then.
 */
static __always_inline int nothing_waits(struct meter_cpu *st)
{
	if (!st->last_ns || st->carry || net_pending(st) || adj_pending(st))
		return 0;
#if METER_STEAL
	if (!METER_KVM_STEAL || !st->rq || st->steal)
		return 0;
#endif
	return 1;
}

/*
 * A switch away from the idle task whose charge has only idle's time to
 * place: [last, now) to idle's slot, inside the current window, and next
 * followed, here, without the tail call into meter_charge and its general
 * path. That is what meter_charge does for it then (idle has no kernel
 * charge, no unseen slice, no steal look at switches when the tick reads
 * the hypervisor's counter), so the books are the same; it is half of the
 * switches on a host whose CPUs go idle between wakeups
 * (docs/architecture.md, "Switches through idle"). Declined, before the
 * clock is read, when anything else waits for this CPU's time (a kernel
 * charge owed or a debt, steal, a run's carry, packet counts) and, after,
 * when [last, now) leaves the window: meter_charge then reads the clock
 * again and does it all.
 */
static __always_inline int idle_out(struct meter_cpu *st, u64 prev, u64 next)
{
	u64 delta[METER_MAX_COUNTERS] = {};
	u64 now, last = st->last_ns;

	if (prev != st->idle_task || !nothing_waits(st))
		return 0;
	now = bpf_ktime_get_ns();
	if (now >= st->window_end)
		return 0;
	read_counters(st, delta);
	if (now > last) {
		accumulate(st, METER_IDLE_CGID, now - last, delta);
		st->last_ns = now;
	}
	st->task = next;
#ifdef METER_SUM_AT_PICK
	st->sum = METER_SUM_AT_PICK;   /* read at next's switch out (sum_at_pick()) */
#else
	st->sum = kread(next + METER_TASK_SUM_OFF);
#endif
	st->ahead = 0;
	st->idle_outs++;
	return 1;
}

/*
 * A switch into the idle task whose charge is prev's slice alone: the
 * clock, what the kernel charged prev since its switch in (to prev's
 * cgroup) and the rest of [last, now) (the scheduler's time, to sched),
 * inside the current window, here, without the tail call into
 * meter_charge. That is what meter_charge does for it then (prev followed
 * since its switch in, so no unseen start; no adjustment, steal, run's
 * carry or tick's provisional time to place first), so the books are the
 * same; it is the other half of the switches through idle
 * (docs/architecture.md, "Switches through idle"). Declined as idle_out()
 * is, and also after the clock and prev's sum are read when the kernel
 * charged prev more than the clock saw and idle's time in this window
 * cannot cover it (meter_charge then takes it from sched's time too, or
 * owes it). The counters are read only once it is taken: a read that
 * meter_charge repeated would lose what the first one took.
 */
static __always_inline int idle_in(struct meter_cpu *st, u64 prev, u64 next)
{
	u64 delta[METER_MAX_COUNTERS] = {};
	struct meter_slot *idle = &st->slot[0];
	u64 now, last = st->last_ns, cgid, sum, span, want;
	int owed = 0;

	/* next is the idle task, so prev (current) is not: its cgid is a cgroup's. */
	if (next != st->idle_task || prev != st->task || st->ahead || st->run_owed || !nothing_waits(st))
		return 0;
	now = bpf_ktime_get_ns();
	if (now >= st->window_end || now <= last)
		return 0;
	cgid = current_cgid(st);
	sum = prev_sum(prev);
	span = now - last;
	want = sum - st->sum;
	if ((s64)want < 0)
		return 0;
	/* The kernel charged more than the clock saw (it dates a wakeup's
	 * slice from before the switch): the more comes out of idle's time in
	 * this window, by move(), as in charge_until(); taken here only when
	 * idle's slot (0) holds it all (move() leaves a slot 1 ns), so that
	 * nothing is owed. */
	if (want >= span && (idle->cgid != METER_IDLE_CGID || idle->usage.ns <= want - span))
		return 0;
	read_counters(st, delta);
	if (want >= span)
		move(st, METER_IDLE_CGID, cgid, want - span);
	else
		fill_sched(st, span - want);
	/* charge_until()'s advance(), inside the window: its window loop would
	 * cost meter_switch's verifier budget for a case declined above. */
	if (now > st->last_ns)
		accumulate(st, cgid, now - st->last_ns, delta);
	st->last_ns = now;
#if METER_TASK_STORAGE
	st->out_start = st->sum;
	st->out_sum = sum;
	st->out_cgid = cgid;
	owed = recover_unseen(st);
#endif
	st->task = next;
	st->sum = 0;   /* the idle task's: nothing reads it */
	st->idle_ins++;
	return 1 + owed;
}

/* Tail-called by meter_switch: a program of its own, so that the
 * verifier walks the charge's paths once, not once per way same_run() can
 * decline (the charge already takes most of its instruction budget). */
int meter_charge(struct bpf_raw_tracepoint_args *ctx)
{
	return switch_charge(ctx);
}

/* Attached by user space to the raw tracepoint sched_switch(preempt, prev, next). */
int meter_switch(struct bpf_raw_tracepoint_args *ctx)
{
	struct meter_cpu *st = charging_state(1);
	int taken;

	if (!st)
		return 0;
#ifdef METER_SUM_AT_PICK
	sum_at_pick(st, ctx->args[1]);
#endif
	if (same_run(st, ctx->args[1], ctx->args[2]))
		return 0;
	/* The run ended unseen (prev is not its task, or a tick found another
	 * task), or its task moved to another cgroup: its carry is the run's
	 * cgroup's, owed to it, less what a tick gave that cgroup provisionally
	 * during the run (a run begins with none: same_run()). The task's own
	 * slice is then charged alone, from its true start. */
	if (st->carry) {
		u64 prev = ctx->args[1];

		if (prev != st->task || st->run_owed || kread(prev + METER_TASK_CGROUPS_OFF) != st->run_cset) {
			s64 owed = (s64)st->carry;

			if (prev == st->task && !st->run_owed)
				st->sum += st->carry;
			if (st->ahead && st->ahead_cgid == st->run_cgid) {
				owed -= (s64)st->ahead;
				st->ahead = 0;
			}
			owe_carry(st, owed);
		}
	}
	if (idle_out(st, ctx->args[1], ctx->args[2]))
		return 0;
	taken = idle_in(st, ctx->args[1], ctx->args[2]);
	if (taken) {
		/* The unseen-slice check found prev owed (2): settled now, as
		 * after meter_charge's charge. */
		if (taken > 1 && settle_due(st))
			settle_call.call(ctx, 0);
		return 0;
	}
	charge_call.call(ctx, 0);   /* does not return (unless the slot is empty) */
	return 0;
}
#else
/* Attached by user space to the raw tracepoint sched_switch(preempt, prev, next). */
int meter_switch(struct bpf_raw_tracepoint_args *ctx)
{
	return switch_charge(ctx);
}
#endif

#if METER_KERNEL_CHARGE
/*
 * Settle this CPU's adjustments in the windows they came from, as long as
 * user space has not closed them: a debt (the clock gave a cgroup more than
 * the kernel charged it, and its time in the window of the switch could not
 * cover that) is taken back from the cgroup's time in earlier windows and
 * given to `sched`; an owed charge (the kernel charged more than the clock
 * gave) is given to the cgroup out of `idle`'s, else `sched`'s, time in
 * earlier windows. Each window still adds up. Left to the cgroup's next
 * time on this CPU (or the next idle time), an adjustment of a compartment
 * whose tasks never run here again (the last one exited) would stay on or
 * off its bill for good. At most one walk per window per CPU, so what a
 * later switch in the same window adds waits for the next window's walk;
 * what lies more than METER_SETTLE_WINDOWS back (a CPU idle that long
 * since) is not reached and waits for the cgroup's next time here.
 *
 * Its own program, tail-called by meter_switch when settle_due() (about
 * once per window on a CPU that owes or is owed): inside meter_switch the
 * verifier would walk it once per path of the charge.
 */
static __always_inline u64 take_from(u64 cgid, u64 window, u64 ns, u64 taken)
{
	u32 *r = rows.lookup(&cgid);
	u32 i;
	u64 *u, have, t;

	/* Only open cells (the walk stops at the watermark). */
	if (!r || window > taken + METER_RING)
		return 0;
	i = *r * METER_RING + (u32)(window % METER_RING);
	u = ring.lookup(&i);
	if (!u)
		return 0;
	have = *u;
	/* Keep 1 ns, as move() does. Another CPU may add to it or settle
	 * from it meanwhile: a lost race takes nothing (the next walk will). */
	if (have <= 1)
		return 0;
	t = ns < have - 1 ? ns : have - 1;
	if (__sync_val_compare_and_swap(u, have, have - t) != have)
		return 0;
	return t;
}

int meter_settle(struct bpf_raw_tracepoint_args *ctx)
{
	u64 zero[METER_MAX_COUNTERS] = {};
	int k = 0;
	struct meter_cpu *st = cpu_state.lookup(&k);
	u64 watermark, taken, w, t;

	if (!st)
		return 0;
	if (!settle_due(st))
		return 0;
	st->settled_window = st->window;
	watermark = control_get(METER_CTL_WATERMARK);
	taken = control_get(METER_CTL_TAKEN);
	for (int i = 1; i <= METER_SETTLE_WINDOWS; i++) {
		w = st->window - i;
		if (w <= watermark)
			break;
#pragma unroll
		for (int a = 0; a < METER_ADJ; a++) {
			s64 v = st->adj_ns[a];
			u64 cgid = st->adj_cgid[a];

			if (v < 0) {
				t = take_from(cgid, w, (u64)-v, taken);
				if (t) {
					store_row(row_of(METER_SCHED_CGID), w, t, zero, watermark, taken);
					st->adj_ns[a] = v + (s64)t;
				}
			} else if (v > 0) {
				t = take_from(METER_IDLE_CGID, w, (u64)v, taken);
				if (t < (u64)v)
					t += take_from(METER_SCHED_CGID, w, (u64)v - t, taken);
				if (t) {
					store_row(row_of(cgid), w, t, zero, watermark, taken);
					st->adj_ns[a] = v - (s64)t;
				}
			}
		}
	}
	/* A debt the walk could not take back needs the cgroup's own time,
	 * which may never come to this CPU again (its last task exited): user
	 * space takes it from the cgroup's time on any CPU (the row's spill).
	 * What is owed waits here: the next idle time on this CPU pays it. */
#pragma unroll
	for (int a = 0; a < METER_ADJ; a++) {
		s64 v = st->adj_ns[a];

		if (v < 0) {
			u32 row = row_of(st->adj_cgid[a]);
			s64 *sp = spill.lookup(&row);

			if (sp) {
				__sync_fetch_and_add(sp, v);
				st->adj_ns[a] = 0;
			}
		}
	}
	return 0;
}
#endif

/* The window tick: closes a long-running slice at least once per window. */
int meter_tick(struct bpf_perf_event_data *ctx)
{
	struct meter_cpu *st = charging_state(0);
	u64 cgid, fresh = 0;

	if (!st)
		return 0;
	cgid = current_cgid(st);
#if METER_STEAL
	/* Steal first: after a pause of the VM the clock's whole gap is no task's. */
	fresh = st->steal;
	look_steal(st, 0, 0);
	fresh = st->steal - fresh;
#endif
#if METER_KERNEL_CHARGE
	{
		u64 task = bpf_get_current_task();

#if METER_SAME_RUN
		/* The run ended unseen: its carry is owed, at the next switch. */
		if (st->carry && task != st->task)
			st->run_owed = 1;
		/* Whose the provisional time below is (see meter_switch). */
		st->ahead_cgid = cgid;
#endif
		if (cgid != METER_IDLE_CGID && task != st->task)
			follow(st, task);
	}
#endif
	charge_until(st, bpf_ktime_get_ns(), cgid, 0, 0, fresh);
	return 0;
}
