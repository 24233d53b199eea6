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
 * Charges accumulate in per-CPU slots for the CPU's current window, then
 * in a hash per (cgroup, window); user space drains closed windows in bulk.
 * Nothing is sent per event.
 *
 * Only stable ABI is used: helpers and scalar context. No kernel struct is
 * dereferenced, so fallback headers are safe.
 */
#include <uapi/linux/bpf_perf_event.h>
#include "meter.h"
#include "counters.h"

/* Shared by all CPUs: written only when a CPU's slots are flushed or
 * evicted (about once per cgroup per window per CPU), with atomic adds, so
 * memory and the user-space copy do not grow with the number of CPUs. */
BPF_HASH(usage, struct meter_key, struct meter_usage, METER_USAGE_ENTRIES);
BPF_PERCPU_ARRAY(cpu_state, struct meter_cpu, 1);
BPF_PERCPU_ARRAY(stats, u64, METER_NR_STATS);
BPF_ARRAY(control, u64, METER_NR_CONTROLS);


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

/* Add ns and counter deltas to (cgid, window); a full map is a counted drop. */
static __always_inline void store(u64 cgid, u64 window, u64 ns, u64 *delta)
{
	struct meter_key key = { .cgid = cgid, .window = window };
	struct meter_usage zero = {};
	struct meter_usage *u;

	u = usage.lookup(&key);
	if (!u) {
		u = usage.lookup_or_try_init(&key, &zero);
		if (!u) {
			stat_add(METER_STAT_DROP_NS, ns);
			stat_add(METER_STAT_DROP_UPDATES, 1);
			return;
		}
	}
	__sync_fetch_and_add(&u->ns, ns);
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		__sync_fetch_and_add(&u->count[i], delta[i]);
}

/* The cgroup to charge for `current`; the idle task (pid 0) is METER_IDLE_CGID. */
static __always_inline u64 current_cgid(void)
{
	return (u32)bpf_get_current_pid_tgid() ? bpf_get_current_cgroup_id() : METER_IDLE_CGID;
}

static __always_inline u64 control_get(int idx)
{
	u64 *v = control.lookup(&idx);

	return v ? *v : 0;
}

/*
 * Store a charge for a window that is not this CPU's current one:
 * windows before the first metered one are start-up (discarded), windows
 * user space has closed count as late.
 */
static __always_inline void put(u64 cgid, u64 window, u64 ns, u64 *delta,
				u64 watermark, u64 first)
{
	if (window < first)
		return;
	if (window <= watermark) {
		stat_add(METER_STAT_LATE_NS, ns);
		return;
	}
	store(cgid, window, ns, delta);
}

static __always_inline u32 slot_of(u64 cgid)
{
	/* Fibonacci hashing: cgroup ids are inode numbers, often close. */
	return (cgid * 0x9E3779B97F4A7C15ULL) >> (64 - 3) & (METER_CACHE_SLOTS - 1);
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
	u64 total = now - last;
	u64 final = now / METER_WINDOW_NS;
	u64 w = last / METER_WINDOW_NS;
	u64 part[METER_MAX_COUNTERS] = {};
	u64 left[METER_MAX_COUNTERS] = {};

	flush(st, watermark, first);
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		left[i] = delta[i];
	if (final - w >= METER_MAX_SPAN) {
		u64 start = (final - METER_MAX_SPAN + 1) * METER_WINDOW_NS;

		if (final - METER_MAX_SPAN + 1 > first)
			stat_add(METER_STAT_LATE_NS, start - last);
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
		put(cgid, w, ns, part, watermark, first);
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
BPF_HASH(net_usage, struct meter_net_key, struct meter_net_usage, METER_NET_ENTRIES);
BPF_PERCPU_ARRAY(net_slot, struct meter_net_slot, METER_MAX_PORTS);

static __always_inline void net_store(u32 port, u32 kind, u64 window, u64 packets, u64 bytes)
{
	struct meter_net_key key = { .port = port, .kind = kind, .window = window };
	struct meter_net_usage zero = {};
	struct meter_net_usage *u;

	if (!packets)
		return;
	u = net_usage.lookup(&key);
	if (!u)
		u = net_usage.lookup_or_try_init(&key, &zero);
	if (!u) {
		stat_add(METER_STAT_NET_DROP_UPDATES, 1);
		return;
	}
	__sync_fetch_and_add(&u->packets, packets);
	__sync_fetch_and_add(&u->bytes, bytes);
}

/* Move this CPU's dirty port slots (of window st->net_window) to net_usage. */
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
		net_store(port, METER_NET_RX, st->net_window, s->rx_packets, s->rx_bytes);
		net_store(port, METER_NET_TX, st->net_window, s->tx_packets, s->tx_bytes);
		__builtin_memset(s, 0, sizeof(*s));
	}
	st->net_ndirty = 0;
}

#endif /* METER_NET */

/* Charge everything from this CPU's previous charge up to `now` to `current`. */
static __always_inline void charge_until(struct meter_cpu *st, u64 now)
{
	u64 delta[METER_MAX_COUNTERS] = {};
	u64 last, cgid;

	read_counters(st, delta);
	last = st->last_ns;
	st->last_ns = now;
	cgid = current_cgid();
	/* The hot path: still in the CPU's current window. */
	if (now < st->window_end && now > last) {
		accumulate(st, cgid, now - last, delta);
		return;
	}
	if (!last || now <= last) {
		/* The first event on a CPU only starts its clock. */
		st->window = now / METER_WINDOW_NS;
		st->window_end = (st->window + 1) * METER_WINDOW_NS;
		return;
	}
	cross(st, cgid, last, now, delta);
}

static __always_inline int charge(int switching)
{
	int zero = 0;
	struct meter_cpu *st = cpu_state.lookup(&zero);
	u64 now;

	if (!st)
		return 0;
#if METER_NET
	/* The tick interrupted a NET softirq span (or its entry or exit, which
	 * charge this CPU themselves): leave it to them. */
	if (*(volatile u32 *)&st->in_net_softirq)
		return 0;
#endif
	now = bpf_ktime_get_ns();
#if METER_NET
	/* Packet counts of a window this CPU has left (see net_flush); only
	 * at a switch, which no tc program can be interrupted by. */
	if (switching && st->net_ndirty && now >= st->net_window_end)
		net_flush(st);
#endif
	charge_until(st, now);
	return 0;
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
 * Split the span [span_start, now) over its ports by packets; what no port
 * claims, and the time before the span, go to the task. Only when all of
 * [last_ns, now) lies in the CPU's current window (nearly always): else the
 * whole interval is left to the next charge, i.e. to the task (counted).
 */
static __always_inline void charge_span(struct meter_cpu *st)
{
	u64 delta[METER_MAX_COUNTERS] = {};
	u64 part[METER_MAX_COUNTERS] = {};
	u64 left[METER_MAX_COUNTERS] = {};
	u64 now, last, start, all, span, total, used = 0, cgid;
	u32 n = st->span_nports;

	total = st->span_other;
#pragma unroll
	for (int i = 0; i < METER_SPAN_PORTS; i++)
		if (i < n)
			total += st->span_pkts[i];
	if (!total)
		return;   /* no metered packets: the time stays with the task */
	now = bpf_ktime_get_ns();
	last = st->last_ns;
	start = st->span_start;
	if (!last || start < last || now <= start || now >= st->window_end) {
		stat_add(METER_STAT_SPAN_UNATTRIBUTED_NS, now > start ? now - start : 0);
		return;
	}
	read_counters(st, delta);
	all = now - last;
	span = now - start;
#pragma unroll
	for (int c = 0; c < METER_NR_COUNTERS; c++)
		left[c] = delta[c];
	for (int i = 0; i < METER_SPAN_PORTS; i++) {
		if (i >= n)
			break;
		u64 ns = span * st->span_pkts[i] / total;
#pragma unroll
		for (int c = 0; c < METER_NR_COUNTERS; c++) {
			part[c] = delta[c] * ns / all;
			left[c] -= part[c];
		}
		if (ns)
			accumulate(st, METER_PORT_CGID(st->span_port[i]), ns, part);
		used += ns;
	}
	if (st->span_other)
		stat_add(METER_STAT_SPAN_UNATTRIBUTED_NS, span * st->span_other / total);
	cgid = current_cgid();
	if (all > used)
		accumulate(st, cgid, all - used, left);
	st->last_ns = now;
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

/* Attached by user space to the raw tracepoint sched_switch. */
int meter_switch(struct bpf_raw_tracepoint_args *ctx)
{
	return charge(1);
}

/* The window tick: closes a long-running slice at least once per window. */
int meter_tick(struct bpf_perf_event_data *ctx)
{
	return charge(0);
}
