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
 * Only the UAPI __sk_buff context (and, for GSO/GRO skbs on ingress, the
 * packet's own IP and TCP/UDP headers) is read.
 *
 * Two figures per packet: the skb and its bytes as the kernel passed it
 * (what a veth's own counters count without GRO), and the packets it is on the
 * wire. A TCP sender hands the device one GSO skb of up to 64 KB; GRO
 * merges received segments the same way; either goes out or came in as
 * gso_segs packets, each carrying its own copy of the headers. meter bills
 * the wire figures, so a tenant's bill does not depend on offload settings.
 */
#include <uapi/linux/pkt_cls.h>

#define METER_ETH_HLEN 14
#define METER_ETH_P_IP 0x0800
#define METER_ETH_P_IPV6 0x86DD

/* Bytes before a GSO skb's payload, from the start of its Ethernet header:
 * the part each wire segment repeats (as the kernel's qdisc_pkt_len_init()
 * computes it). 0 when the headers are not IPv4/IPv6 + TCP/UDP. The
 * headers of a GSO/GRO skb are in its linear part: read in place (direct
 * packet access, no helper call). */
static __always_inline u32 gso_header_len(struct __sk_buff *skb)
{
	u8 *data = (u8 *)(long)skb->data, *end = (u8 *)(long)skb->data_end, *l3 = data + METER_ETH_HLEN, *l4;
	u32 proto;

	if (l3 + 40 > end)
		return 0;
	if (skb->protocol == bpf_htons(METER_ETH_P_IP)) {
		proto = l3[9];
		l4 = l3 + (l3[0] & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(METER_ETH_P_IPV6)) {
		proto = l3[6];
		l4 = l3 + 40;
	} else {
		return 0;
	}
	if (proto == 17)   /* UDP GSO */
		return (u32)(l4 - data) + 8;
	if (proto != 6 || l4 + 13 > end)
		return 0;
	return (u32)(l4 - data) + (l4[12] >> 4) * 4;
}

/* The packets and bytes ``skb`` is on the wire (see the top of this file). */
static __always_inline void wire(struct __sk_buff *skb, u32 kind, u64 *packets, u64 *bytes)
{
	u32 len = skb->len, size = skb->gso_size, segs, hdr;

	if (!size) {
		*packets = 1;
		*bytes = len;
		return;
	}
	segs = skb->gso_segs;
	if (kind == METER_NET_TX && segs) {
		/* The kernel's own figure: qdisc_pkt_len_init() ran before the egress hook. */
		*packets = segs;
		*bytes = skb->wire_len;
		return;
	}
	hdr = gso_header_len(skb);
	if (!segs)   /* an untrusted (SKB_GSO_DODGY) skb: the kernel counts its segments so */
		segs = len > hdr ? (len - hdr + size - 1) / size : 1;
	*packets = segs;
	*bytes = len + (u64)(segs - 1) * hdr;
}

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

/*
 * When a packet is counted: only its window matters, so no clock read
 * where a cheaper time dates it as well (docs/architecture.md, "When a
 * packet is counted"). Inside a NET softirq span, the span's start
 * (microseconds ago). A packet the host's TCP sends carries its transmit
 * time (skb->tstamp with a monotonic delivery time, set by
 * tcp_transmit_skb() just before this hook, or its later departure time
 * under pacing): taken when it falls in this CPU's current net window and
 * after the CPU's last charge (st->last_ns: a switch or a tick), so that
 * it is at most the microseconds of TCP's transmit path old,
 * never older than a preemption or a tick. Anything else reads the clock,
 * unless user space opted into the latest time the CPU's programs read (below).
 */
static __always_inline u64 packet_time(struct meter_cpu *st, struct __sk_buff *skb, u32 kind)
{
	if (st->in_net_softirq)
		return st->span_start;
#ifdef METER_SKB_TSTAMP_TYPE   /* the kernel has __sk_buff.tstamp_type (5.18+) */
	if (kind == METER_NET_TX && skb->tstamp_type == BPF_SKB_TSTAMP_DELIVERY_MONO) {
		u64 t = skb->tstamp;

		if (t < st->net_window_end && t >= st->last_ns && t + METER_WINDOW_NS >= st->net_window_end)
			return t;
	}
#endif
#if METER_PACKET_TIME_CHARGE
	/* Opted into (packet_time "charge"): instead of the clock, the latest
	 * time this CPU's programs have read: its last charge (a switch or a
	 * tick), its last NET softirq span's start, or its last tick inside a
	 * span (which charges nothing). Never late; early by at most the time
	 * since, about a tick period while the CPU runs: so a packet sent
	 * between a window's start and the CPU's first switch, tick or span in
	 * it is billed in the window before (two before if a tick due just
	 * before a window's end came late past it). A time older than the
	 * CPU's current net window counts in that window. */
	{
		u64 t = st->last_ns > st->span_start ? st->last_ns : st->span_start;

		t = t > st->seen_ns ? t : st->seen_ns;
		if (t)
			return t;
	}
#endif
	return bpf_ktime_get_ns();
}

static __always_inline int count(struct __sk_buff *skb, u32 kind)
{
	/* volatile: keep the placeholder an immediate user space can patch. */
	volatile u32 placeholder = METER_PORT_PLACEHOLDER;
	u32 port = placeholder;
	int zero = 0;
	struct meter_cpu *st = cpu_state.lookup(&zero);
	struct meter_net_slot *s;
	u64 now, wire_packets, wire_bytes;

	if (!st)
		return TC_ACT_UNSPEC;
	now = packet_time(st, skb, kind);
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
	wire(skb, kind, &wire_packets, &wire_bytes);
	if (!s->dirty) {
		u32 n = st->net_ndirty;

		if (n >= METER_NET_DIRTY) {
			/* Too many ports at once on this CPU: straight to the map. */
			net_store(port, kind, st->net_window, 1, skb->len, wire_packets, wire_bytes);
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
		s->rx_wire_packets += wire_packets;
		s->rx_wire_bytes += wire_bytes;
	} else {
		s->tx_packets++;
		s->tx_bytes += skb->len;
		s->tx_wire_packets += wire_packets;
		s->tx_wire_bytes += wire_bytes;
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
