// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * Per-packet attribution: tc clsact ingress/egress programs count packets
 * and bytes per (port, direction, window), and note each port's packets in
 * the NET softirq span in progress on this CPU (see sched.bpf.c).
 *
 * Compiled in one unit after sched.bpf.c (they share cpu_state). User
 * space loads one copy of each program per port, with the placeholder
 * immediate replaced by the port number: no lookup to find the port.
 * Only the UAPI __sk_buff context is read.
 */
#include <uapi/linux/pkt_cls.h>

BPF_HASH(net_usage, struct meter_net_key, struct meter_net_usage, METER_NET_ENTRIES);

static __always_inline void note_span(u32 port)
{
	int zero = 0;
	struct meter_cpu *st = cpu_state.lookup(&zero);
	u32 n;

	if (!st || !st->in_net_softirq)
		return;
	n = st->span_nports;
#pragma unroll
	for (int i = 0; i < METER_SPAN_PORTS; i++) {
		if (i >= n)
			break;
		if (st->span_port[i] == port) {
			st->span_pkts[i]++;
			return;
		}
	}
	if (n < METER_SPAN_PORTS) {
		st->span_port[n & (METER_SPAN_PORTS - 1)] = port;
		st->span_pkts[n & (METER_SPAN_PORTS - 1)] = 1;
		st->span_nports = n + 1;
	} else {
		st->span_other++;
	}
}

static __always_inline int count(struct __sk_buff *skb, u32 kind)
{
	/* volatile: keep the placeholder an immediate user space can patch. */
	volatile u32 placeholder = METER_PORT_PLACEHOLDER;
	u32 port = placeholder;
	struct meter_net_key key = {
		.port = port,
		.kind = kind,
		.window = bpf_ktime_get_ns() / METER_WINDOW_NS,
	};
	struct meter_net_usage zero = {};
	struct meter_net_usage *u;

	u = net_usage.lookup(&key);
	if (!u)
		u = net_usage.lookup_or_try_init(&key, &zero);
	if (u) {
		__sync_fetch_and_add(&u->packets, 1);
		__sync_fetch_and_add(&u->bytes, skb->len);
	} else {
		stat_add(METER_STAT_NET_DROP_UPDATES, 1);
	}
	note_span(port);
	/* No verdict: the packet goes on to any other filter, untouched. */
	return TC_ACT_UNSPEC;
}

int meter_tc_ingress(struct __sk_buff *skb)
{
	return count(skb, METER_NET_RX);
}

int meter_tc_egress(struct __sk_buff *skb)
{
	return count(skb, METER_NET_TX);
}
