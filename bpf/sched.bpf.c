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
 * Charges accumulate in-kernel per (cgroup, window); user space drains
 * closed windows in bulk. Nothing is sent per event.
 *
 * Only stable ABI is used: helpers and scalar context. No kernel struct is
 * dereferenced, so fallback headers are safe.
 */
#include <uapi/linux/bpf_perf_event.h>
#include "meter.h"

BPF_PERCPU_HASH(usage, struct meter_key, struct meter_usage, METER_USAGE_ENTRIES);
BPF_PERCPU_ARRAY(cpu_state, struct meter_cpu, 1);
BPF_PERCPU_ARRAY(stats, u64, METER_NR_STATS);
BPF_ARRAY(control, u64, METER_NR_CONTROLS);

#if METER_NR_COUNTERS > 0
BPF_PERF_ARRAY(counter0, METER_MAX_CPUS);
#endif
#if METER_NR_COUNTERS > 1
BPF_PERF_ARRAY(counter1, METER_MAX_CPUS);
#endif
#if METER_NR_COUNTERS > 2
BPF_PERF_ARRAY(counter2, METER_MAX_CPUS);
#endif
#if METER_NR_COUNTERS > 3
BPF_PERF_ARRAY(counter3, METER_MAX_CPUS);
#endif

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
	u->ns += ns;
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		u->count[i] += delta[i];
}

/*
 * Rare path: [last, now) crosses window boundaries (the tick arrives at an
 * arbitrary phase, or late). Split time exactly at the boundaries and the
 * counter deltas in proportion to time; the newest window takes the
 * rounding remainder so counter totals stay exact. Windows at or below the
 * drain watermark are already gone to user space: counted as late.
 */
static __always_inline void split(u64 cgid, u64 last, u64 now, u64 *delta)
{
	u64 total = now - last;
	u64 first = last / METER_WINDOW_NS;
	u64 final = now / METER_WINDOW_NS;
	u64 left[METER_MAX_COUNTERS] = {};
	u64 part[METER_MAX_COUNTERS] = {};
	u64 watermark = 0;
	int ctl = METER_CTL_WATERMARK;
	u64 *wm = control.lookup(&ctl);

	if (wm)
		watermark = *wm;
#pragma unroll
	for (int i = 0; i < METER_NR_COUNTERS; i++)
		left[i] = delta[i];

	if (final - first >= METER_MAX_SPAN) {
		u64 start = (final - METER_MAX_SPAN + 1) * METER_WINDOW_NS;

		stat_add(METER_STAT_LATE_NS, start - last);
		first = final - METER_MAX_SPAN + 1;
		last = start;
	}
	for (int s = 0; s < METER_MAX_SPAN; s++) {
		u64 w = first + s;
		u64 end = (w + 1) * METER_WINDOW_NS;
		u64 ns;

		if (w > final)
			break;
		if (end > now)
			end = now;
		ns = end - last;
#pragma unroll
		for (int i = 0; i < METER_NR_COUNTERS; i++) {
			part[i] = w == final ? left[i] : delta[i] * ns / total;
			left[i] -= part[i];
		}
		if (w <= watermark)
			stat_add(METER_STAT_LATE_NS, ns);
		else if (ns)
			store(cgid, w, ns, part);
		last = end;
	}
}

/* Charge everything since this CPU's previous charge to `current`. */
static __always_inline int charge(void)
{
	int zero = 0;
	struct meter_cpu *st = cpu_state.lookup(&zero);
	u64 delta[METER_MAX_COUNTERS] = {};
	u64 now, last, cgid;

	if (!st)
		return 0;
	now = bpf_ktime_get_ns();
	read_counters(st, delta);
	last = st->last_ns;
	st->last_ns = now;
	/* The first event on a CPU only starts its clock. */
	if (!last || now <= last)
		return 0;
	cgid = (u32)bpf_get_current_pid_tgid() ? bpf_get_current_cgroup_id() : METER_IDLE_CGID;
	if (last / METER_WINDOW_NS == now / METER_WINDOW_NS)
		store(cgid, now / METER_WINDOW_NS, now - last, delta);
	else
		split(cgid, last, now, delta);
	return 0;
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
	return charge();
}

/* The window tick: closes a long-running slice at least once per window. */
int meter_tick(struct bpf_perf_event_data *ctx)
{
	return charge();
}
