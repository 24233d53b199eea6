/* SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause */
/*
 * The per-CPU perf event arrays for the configured counters, one map per
 * counter (user space opens event i on every CPU into counter<i>). Shared
 * by sched.bpf.c and its benchmark floor so both read the same events.
 */
#ifndef METER_COUNTERS_H
#define METER_COUNTERS_H

#include "meter.h"

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

#endif /* METER_COUNTERS_H */
