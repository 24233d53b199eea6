/* SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause */
/*
 * Structures shared by meter's BPF programs and its Python side.
 *
 * meter/bpfabi.py mirrors every struct here as a numpy dtype; change both
 * together. Only fixed-width scalar fields: the layout must not depend on
 * the kernel headers bcc compiles against (they may be a fallback tree).
 */
#ifndef METER_H
#define METER_H

/* Settings arrive as -D cflags from meter/program.py; these are defaults. */
#ifndef METER_WINDOW_NS
#define METER_WINDOW_NS 1000000ULL
#endif
#ifndef METER_NR_COUNTERS
#define METER_NR_COUNTERS 0
#endif
#ifndef METER_MAX_CPUS
#define METER_MAX_CPUS 1024
#endif
/* Usage is kept per row (a cgroup or pseudo-cgroup that was charged) in a
 * ring of METER_RING windows: fixed memory, METER_MAX_ROWS x METER_RING
 * cells, sized by user space from the compartments and the drain interval,
 * so it cannot fill. A charge whose cell is not open (its window already
 * closed, or the ring still holds undrained windows there: a stalled
 * drain) is added to the row's late total instead, never thrown away. */
#ifndef METER_MAX_ROWS
#define METER_MAX_ROWS 64
#endif
#ifndef METER_RING
#define METER_RING 600
#endif
/* The most windows one charge is split over. An idle CPU gets no tick, so
 * its next charge can span everything since user space last nudged it (one
 * drain interval); user space sizes this to cover that. Anything older
 * (a paused VM) is counted as late. */
#ifndef METER_NET
#define METER_NET 0
#endif
#ifndef METER_MAX_PORTS
#define METER_MAX_PORTS 1024
#endif
#ifndef METER_MAX_SPAN
#define METER_MAX_SPAN 512
#endif
/* Compartments resolved in the kernel (user space lists their cgroup ids),
 * and the deepest cgroup level one may sit at (the root cgroup is level 0). */
#ifndef METER_MAX_COMPARTMENTS
#define METER_MAX_COMPARTMENTS 4096
#endif
#define METER_MAX_LEVEL 16
/* A compartments map value above this is a discovery root, not a
 * compartment: a task below it is charged to its ancestor at cgroup level
 * (value - METER_ROOT_BIT), the unit a discovery rule names (or its own
 * cgroup when that is shallower). A compartment's value is 1. */
#define METER_ROOT_BIT (1ULL << 32)

#define METER_MAX_COUNTERS 4

/* bpf_get_current_cgroup_id() is never 0, so 0 marks the idle task. */
#define METER_IDLE_CGID 0ULL

/* Pseudo-cgroup ids (real ids are kernfs ids: generation << 32 | inode,
 * far below bit 61). Time the clock saw on a CPU that the kernel charged
 * to no task goes to SCHED (scheduler work between its last update of a
 * task and the switch, idle entry and exit) or STEAL (the hypervisor ran
 * something else: rq->clock - rq->clock_task). */
#define METER_SCHED_CGID ((1ULL << 61) | 1)
#define METER_STEAL_CGID ((1ULL << 61) | 2)
/* Usage of a cgroup that found no free row (more cgroups charged than
 * METER_MAX_ROWS): kept, and named, in this row, always row 0. */
#define METER_UNATTRIBUTED_CGID ((1ULL << 61) | 3)
#define METER_UNATTRIBUTED_ROW 0
/* NET softirq time run inside cgid's time for other compartments' ports
 * (given away: the ports' owners are charged it as softirq_ns). */
#define METER_GIVEN_BIT (1ULL << 62)

/* Kernel charges not yet placed in a window (or clock time placed beyond
 * the kernel's charge), per CPU, per cgroup. */
#define METER_ADJ 4
/* How many windows before its current one a CPU looks back through, while
 * they are not closed, to settle its adjustments (sched.bpf.c). */
#define METER_SETTLE_WINDOWS 64

/* CPU time and counter deltas: a per-CPU slot's, or a row's late total. */
struct meter_usage {
	__u64 ns;
	__u64 count[METER_MAX_COUNTERS];
};

/* Counter deltas of one ring cell (the ns are in a ring of their own). */
struct meter_counts {
	__u64 count[METER_MAX_COUNTERS];
};

/* Per-CPU accumulators for the CPU's current window, a few cgroups at a
 * time, so most charges touch no hash map. Power of two. */
#define METER_CACHE_SLOTS 8

struct meter_slot {
	__u64 cgid;
	struct meter_usage usage;   /* usage.ns == 0: the slot is empty */
};

/* Ports seen in one NET_RX/NET_TX softirq span, with their packets. */
#define METER_SPAN_PORTS 8
/* Ports with counts in a CPU's net slots at once (power of two); beyond
 * that, packets go straight to the shared map. */
#define METER_NET_DIRTY 16

/* Per-CPU charging state: when and what was last charged on this CPU. */
struct meter_cpu {
	__u64 last_ns;              /* time of the last charge (0: clock not started) */
	__u64 window;               /* window of last_ns: the slots' window */
	__u64 window_end;           /* (window + 1) * METER_WINDOW_NS */
	__u64 value[METER_MAX_COUNTERS];
	__u64 enabled[METER_MAX_COUNTERS];
	__u64 running[METER_MAX_COUNTERS];
	struct meter_slot slot[METER_CACHE_SLOTS];
	/* Following the kernel's charge (METER_KERNEL_CHARGE): the task that
	 * runs, its se.sum_exec_runtime at the last reconcile, and the clock
	 * time given to it since then by ticks (provisionally). */
	__u64 task;
	__u64 sum;
	__u64 ahead;
	/* The slice the last switch charged (for meter_settle): its owner's
	 * row cgroup, its start and end sums (out_start 0: none). */
	__u64 out_cgid;
	__u64 out_start;
	__u64 out_sum;
	/* adj_ns > 0: the kernel charged adj_cgid that much more than this CPU
	 * has placed (paid from the next idle or scheduler time); < 0: the
	 * clock gave it that much more (taken back from its next time). */
	__u64 adj_cgid[METER_ADJ];
	__s64 adj_ns[METER_ADJ];
	/* The window of this CPU's last settle walk (sched.bpf.c, meter_settle()). */
	__u64 settled_window;
	/* This CPU's struct rq (0 until found), rq->clock - rq->clock_task at
	 * the last look, and steal seen but not placed yet. */
	__u64 rq;
	__u64 stolen;
	__u64 steal;
	/* This CPU's KVM steal_time record (0: none) and its steal at the last look. */
	__u64 kvm;
	__u64 kvm_seen;
	/* A NET softirq span in progress (since span_start): the tc
	 * programs note which ports' packets it processed. */
	__u64 span_start;
	__u32 in_net_softirq;
	__u32 span_nports;
	__u32 span_port[METER_SPAN_PORTS];
	__u64 span_pkts[METER_SPAN_PORTS];
	__u64 span_other;           /* packets of ports beyond the list */
	/* Packet counts of this CPU's current net window sit in per-CPU
	 * port slots (net_slot) until flushed to the net ring: by the next
	 * packet in a later window, or by a context switch (user space
	 * nudges CPUs whose net window is stale). */
	__u64 net_window;
	__u64 net_window_end;
	/* The last leaf cgroup resolved on this CPU, what it resolved to, and
	 * the compartments map's generation then. */
	__u64 res_leaf;
	__u64 res_id;
	__u64 res_gen;
	__u32 net_ndirty;
	__u32 net_dirty[METER_NET_DIRTY];
	/* A run of switches between tasks of one css_set (sched.bpf.c,
	 * same_run()): what the kernel charged the run's finished slices, not
	 * placed yet (the next switch that charges places it, or owes it), the
	 * run's css_set, the cgroup it is charged to and the window it began
	 * in, and this CPU's idle task (which shares the root's css_set). */
	__u64 carry;
	__u64 run_cset;
	__u64 run_cgid;
	__u64 run_window;
	__u64 idle_task;
	__u64 runs;                 /* switches that joined a run (counted) */
	__u64 idle_outs;            /* switches away from idle charged in meter_switch (idle_out()) */
	__u64 idle_ins;             /* switches into idle charged in meter_switch (idle_in()) */
	__u64 nudge_seen;           /* METER_CTL_NUDGE at this CPU's last switch */
	__u64 run_owed;             /* the run's carry is owed (a tick found it ended) */
	__u64 ahead_cgid;           /* the cgroup the last tick gave provisional time to */
	__u64 seen_ns;              /* the last tick inside a NET softirq span (packet_time "charge") */
};

/* Per-CPU, per-port packet counts for the CPU's current net window: skbs
 * and their bytes as the kernel passed them (as tc sees them), and the
 * packets they are on the wire (a GSO/GRO skb is
 * gso_segs packets, each with its own copy of the headers). */
struct meter_net_slot {
	__u64 rx_packets;
	__u64 rx_bytes;
	__u64 tx_packets;
	__u64 tx_bytes;
	__u64 rx_wire_packets;
	__u64 rx_wire_bytes;
	__u64 tx_wire_packets;
	__u64 tx_wire_bytes;
	__u32 dirty;
	__u32 pad;
};

/* Packet kinds: a port's rx and tx each have a row in the net ring
 * (row port * 2 + kind); softirq time is CPU time (METER_PORT_CGID). */
enum meter_net_kind {
	METER_NET_RX = 0,           /* tc ingress */
	METER_NET_TX = 1,           /* tc egress */
	METER_NET_SOFTIRQ = 2,      /* NET_RX/NET_TX softirq time for the port's packets */
};

/* One cell of the net ring (one port and kind, one window), or a
 * (port, kind)'s late total: like the CPU ring (see "Usage is kept per
 * row" above), fixed memory, nothing dropped. */
struct meter_net_cell {
	__u64 packets;
	__u64 bytes;
	__u64 wire_packets;
	__u64 wire_bytes;
};

/* Softirq time for a port is charged like CPU time, to this pseudo-cgroup
 * id (real cgroup ids are inode numbers: the top bit is never set). */
#define METER_PORT_CGID(port) ((1ULL << 63) | (__u64)(port))

/* Placeholder for the port number in the tc programs: user space loads one
 * copy per port with this immediate replaced. */
#define METER_PORT_PLACEHOLDER 0x4D455452

/* Indexes into the per-CPU stats array. */
enum meter_stat {
	METER_STAT_LATE_NS = 0,     /* ns whose window's cell was not open: in the rows' late totals */
	METER_STAT_COUNTER_ERRORS,  /* failed counter reads */
	METER_STAT_NET_LATE_PACKETS, /* packets whose window's cell was not open: in the late totals */
	METER_STAT_SPAN_UNATTRIBUTED_NS, /* softirq ns of packets beyond the span list */
	METER_STAT_UNPLACED_NS,     /* kernel/clock differences with no adj entry free: in the rows' spill */
	METER_STAT_UNSETTLED,       /* switches whose task was not followed since it came in */
	METER_STAT_UNSEEN_NS,       /* kernel time of slices no switch event showed, recovered per task */
	METER_STAT_CLOCKED,         /* slices of a task outside the fair class whose start was not seen: by the clock */
	METER_NR_STATS,
};

/* Index into the control array written by user space. */
enum meter_control {
	/* Highest window user space has drained or will drain: charges for
	 * windows at or below it are counted as late instead of stored, so a
	 * drained window never changes again. */
	METER_CTL_WATERMARK = 0,
	/* First window metered: earlier charges are start-up, discarded. */
	METER_CTL_FIRST,
	/* Bit l set: some compartment's (or discovery root's) cgroup is at
	 * level l (0: resolve nothing). */
	METER_CTL_LEVELS,
	/* Bumped by user space whenever the compartments map changes; 0: none listed. */
	METER_CTL_GEN,
	/* The cgroup id charged for a task below no compartment (the host's);
	 * 0: its own cgroup id, for user space to name. */
	METER_CTL_OTHER,
	/* Every window up to this one has been read out of the ring and its
	 * cells zeroed by user space: cells of windows up to it + METER_RING
	 * are open. */
	METER_CTL_TAKEN,
	/* The next free row (rows below it are taken; kernel and user space
	 * take rows by atomic add). */
	METER_CTL_NEXT_ROW,
	/* METER_CTL_TAKEN for the net ring (its drain runs after the CPU one). */
	METER_CTL_NET_TAKEN,
	/* Bumped by user space before it nudges CPUs: each CPU's next switch
	 * charges (joins no run), so its windows close (sched.bpf.c, same_run()). */
	METER_CTL_NUDGE,
	METER_NR_CONTROLS,
};

#endif /* METER_H */
