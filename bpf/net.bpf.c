// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/*
 * Per-packet attribution: tc clsact ingress/egress programs count packets
 * and bytes per (port, direction, window) in the net ring, and note each port's packets in
 * the NET softirq span in progress on this CPU (see sched.bpf.c).
 *
 * Compiled in one unit after sched.bpf.c (they share cpu_state, net_slot
 * and the net ring, defined there). User space loads one copy of each program per port, with
 * the placeholder immediate replaced by the port number: no lookup to find
 * the port. A packet is counted in this CPU's slot for the port (see sched.bpf.c).
 * Only the UAPI __sk_buff context is read.
 */
#include <uapi/linux/pkt_cls.h>

static __always_inline void note_span(struct meter_cpu *st, u32 port)
{
	u32 n;

	if (!st->in_net_softirq)
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
	int zero = 0;
	struct meter_cpu *st = cpu_state.lookup(&zero);
	struct meter_net_slot *s;
	u64 now;

	if (!st)
		return TC_ACT_UNSPEC;
	/* Inside a NET softirq span the span's start (microseconds ago)
	 * dates the packet: no clock read. */
	now = st->in_net_softirq ? st->span_start : bpf_ktime_get_ns();
	if (now >= st->net_window_end) {
		/* This CPU's first packet in a new window. */
		if (st->net_ndirty)
			net_flush(st);
		st->net_window = now / METER_WINDOW_NS;
		st->net_window_end = (st->net_window + 1) * METER_WINDOW_NS;
	}
	s = net_slot.lookup(&port);
	if (!s)
		return TC_ACT_UNSPEC;
	if (!s->dirty) {
		u32 n = st->net_ndirty;

		if (n >= METER_NET_DIRTY) {
			/* Too many ports at once on this CPU: straight to the map. */
			net_store(port, kind, st->net_window, 1, skb->len);
			note_span(st, port);
			return TC_ACT_UNSPEC;
		}
		st->net_dirty[n & (METER_NET_DIRTY - 1)] = port;
		st->net_ndirty = n + 1;
		s->dirty = 1;
	}
	if (kind == METER_NET_RX) {
		s->rx_packets++;
		s->rx_bytes += skb->len;
	} else {
		s->tx_packets++;
		s->tx_bytes += skb->len;
	}
	note_span(st, port);
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
