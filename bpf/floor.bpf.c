// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * The floor for sched.bpf.c's cost, for benchmarks only: reads the same
 * inputs on every context switch (clock, pid, cgroup id, the configured
 * counters) and writes them to one per-CPU slot. Whatever sched.bpf.c
 * costs beyond this is the price of attribution.
 */
#include <uapi/linux/bpf_perf_event.h>
#include "meter.h"
#include "counters.h"

BPF_PERCPU_ARRAY(floor_slot, struct meter_cpu, 1);


int floor_switch(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0;
	struct meter_cpu *st = floor_slot.lookup(&zero);
	struct bpf_perf_event_value v;

	if (!st)
		return 0;
	st->last_ns = bpf_ktime_get_ns();
	st->value[0] = (u32)bpf_get_current_pid_tgid() ? bpf_get_current_cgroup_id() : 0;
#if METER_NR_COUNTERS > 0
	if (counter0.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		st->value[0] += v.counter;
#endif
#if METER_NR_COUNTERS > 1
	if (counter1.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		st->value[1] = v.counter;
#endif
#if METER_NR_COUNTERS > 2
	if (counter2.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		st->value[2] = v.counter;
#endif
#if METER_NR_COUNTERS > 3
	if (counter3.perf_counter_value(BPF_F_CURRENT_CPU, &v, sizeof(v)) == 0)
		st->value[3] = v.counter;
#endif
	return 0;
}

/* The floor for net.bpf.c: a tc program that does nothing and gives no verdict
 * (two names, so bpf_stats tells an ingress copy from an egress one). */
int floor_tc(struct __sk_buff *skb)
{
	return -1;  /* TC_ACT_UNSPEC */
}

int floor_tc_egress(struct __sk_buff *skb)
{
	return -1;
}
