/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fibsync fast path ABI: the structs, constants and reason codes shared by the
 * XDP program (fibsync.c) and user space (fibsync/fastpath/abi.py).
 *
 * tests/unit/test_abi.py parses this file and fails when abi.py disagrees, so
 * keep the syntax plain: one field per line, sizes as literal numbers or the
 * FS_* macros below. Structs only grow at the end: pinned maps outlive the
 * daemon that wrote them, and a restarted daemon adopts them when their
 * key/value sizes still match.
 */
#ifndef FIBSYNC_H
#define FIBSYNC_H

/* Map sizes; the build may override each with -D. */
#ifndef FS_MAX_ROUTES_V4
#define FS_MAX_ROUTES_V4 2097152
#endif
#ifndef FS_MAX_ROUTES_V6
#define FS_MAX_ROUTES_V6 524288
#endif
#ifndef FS_MAX_NEXTHOPS
#define FS_MAX_NEXTHOPS 65536
#endif
#ifndef FS_MAX_GROUPS
#define FS_MAX_GROUPS 16384
#endif
#ifndef FS_MAX_NEIGH
#define FS_MAX_NEIGH 65536
#endif
#ifndef FS_MAX_TX_PORTS
#define FS_MAX_TX_PORTS 1024
#endif
/* tx_direct: the redirect targets with an ifindex below this, by index */
#define FS_TX_DIRECT 4096
/* DIR-24-8 IPv4 table: tbl8 groups (256 entries each) and route slots */
#ifndef FS_MAX_TBL8_GROUPS
#define FS_MAX_TBL8_GROUPS 16384
#endif
#ifndef FS_MAX_SLOTS
#define FS_MAX_SLOTS 65536
#endif

/*
 * Not overridable: it fixes the layout of struct fs_group, which user space
 * mirrors. A power of two so that a bucket index can be bounded by a mask.
 */
#define FS_GROUP_BUCKETS 128

/*
 * Members of a group with their kernel weights, kept for user space only
 * (`fibsync routes` shows the weights exactly; buckets only approximate them).
 * The XDP program never reads them.
 */
#define FS_GROUP_MEMBERS 64

/*
 * DIR-24-8 (DPDK rte_lpm style), selected by fs_config.v4_table. Three
 * BPF_F_MMAPABLE arrays that fastpath/dir24.py writes through mmap:
 *
 *   v4_tbl24  2^24 entries, indexed by the top 24 bits of the destination
 *   v4_tbl8   FS_MAX_TBL8_GROUPS groups of 256 entries, by the low 8 bits
 *   v4_slots  struct fs_route by slot number (0 is never used)
 *   v4_nh     struct fs_nexthop, two copies per slot number (2 * n + 0 or 1)
 *
 * Array values sit at an 8-byte stride, so both tables pack two 4-byte
 * entries per element (struct fs_dir_pair): entry i is element i / 2, half
 * i % 2. An entry is 0 (no route: ask bpf_fib_lookup) or
 *
 *   bit 31      FS_DIR_EXT: tbl24 only, bits 0-23 name a tbl8 group
 *   bits 24-29  depth: the prefix length of the route the entry holds
 *   bits 0-23   slot number (or tbl8 group with FS_DIR_EXT)
 *
 * The program only reads bit 31 and bits 0-23; the depth is user space's
 * bookkeeping (which route an entry belongs to), kept in the entry so that
 * user space needs no copy of the table. FS_DIR_PINNED is a depth no route
 * has: such an entry (a /24 whose tbl8 group could not be allocated) is
 * never overwritten by a route and points to a slot that asks bpf_fib_lookup.
 *
 * A slot of a FORWARD route to one nexthop carries FS_ROUTE_NH_COPY: its
 * nh_id is then the index in v4_nh of a copy of that nexthop (an array read
 * instead of a hash lookup). When the nexthop changes, user space writes a
 * copy no reader can hold and switches nh_id with one 4-byte store: the
 * slot's other copy, or, before an RCU grace period has passed since its last
 * switch, a copy of a slot number it borrows until its next switch.
 */
#define FS_DIR24_ENTRIES 16777216
#define FS_TBL8_ENTRIES 256
#define FS_DIR_EXT 0x80000000
#define FS_DIR_INDEX 0xffffff
#define FS_DIR_DEPTH_SHIFT 24
#define FS_DIR_DEPTH_MASK 0x3f
#define FS_DIR_PINNED 63

/* fs_config.v4_table */
#define FS_V4_LPM 0
#define FS_V4_DIR24 1

/*
 * The IPv6 hash table, selected by fs_config.v6_table: a hash per prefix
 * length over the lengths in use (Waldvogel's first step, without markers),
 * probed longest first, as fastpath/v6hash.py writes it:
 *
 *   v6_hash     every prefix, keyed as in routes_v6 (struct fs_v6_key, the
 *               address masked to the prefix length): struct fs_route
 *   v6_lengths  which lengths to probe: FS_V6_SLOTS slots indexed by
 *               fs_v6_slot(top 32 bits of the address), each the lengths
 *               33-128 of the prefixes in the /32s that hash to it, then one
 *               more (index FS_V6_SLOTS) with the lengths 0-32 in use
 *
 * A slot is a struct fs_v6_lengths: bit i of the 192-bit field lengths[]
 * (lengths[i / 64] bit i % 64) stands for prefix length 128 - i, so the
 * lowest bit set is the longest length to probe. The first probe that hits
 * is the longest prefix that matches: a prefix longer than /32 lies in the
 * destination's own /32, whose slot names its length; a shorter one is in
 * the last slot. Bits are a superset of the lengths in use (a length may
 * stay set after its last prefix goes, until the table is rebuilt, and /32s
 * share slots): an extra bit costs a probe that misses, never an answer.
 */
#define FS_V6_SLOT_BITS 18
#define FS_V6_SLOTS 262144 /* 2^FS_V6_SLOT_BITS */
#define FS_V6_SLOT_HASH 0x9e3779b1 /* Fibonacci hashing, as local_v4 */
#define FS_V6_LENGTH_WORDS 3

/* fs_config.v6_table */
#define FS_V6_LPM 0
#define FS_V6_HASH 1

/* fs_route.action */
#define FS_ACT_FORWARD 0
#define FS_ACT_DROP 1
#define FS_ACT_KERNEL 2
#define FS_ACT_FIB 3

/* fs_route.flags */
#define FS_ROUTE_GROUP 0x1
#define FS_ROUTE_NH_COPY 0x2 /* v4_slots only: nh_id indexes v4_nh */

/* fs_nexthop.flags */
#define FS_NH_RESOLVED 0x1
#define FS_NH_CONNECTED 0x2

/*
 * `local_v4`, a bitmap over this host's IPv4 addresses: bit fs_local_v4_bit(a)
 * is set when a route of type local, broadcast or anycast (a PASS_LOCAL
 * entry) overlaps the /24 that holds a. A clear bit proves the source is
 * none of ours without the table walk; a set one (ours, or a neighbour in the
 * hash) sends the packet through the walk. 2^FS_LOCAL_V4_BITS bits: 32 KiB,
 * which stays in the cache when the route tables do not.
 */
#define FS_LOCAL_V4_BITS 18
#define FS_LOCAL_V4_WORDS 4096 /* 2^FS_LOCAL_V4_BITS bits in __u64 words */
#define FS_LOCAL_V4_HASH 0x9e3779b1 /* Fibonacci hashing: the top bits of a * 2^32/phi */

/* fs_config.hash_policy_v4 / hash_policy_v6, as net.ipv4.fib_multipath_hash_policy */
#define FS_HASH_L3 0
#define FS_HASH_L4 1

/* fs_config.flags */
#define FS_CFG_PASS_FRAGMENTS 0x1

/*
 * `ifaces`, an array indexed by ifindex: what the fast path may do with a
 * packet arriving on an interface, and with one routed out of it. The daemon
 * folds the conditions that hold for every interface (netfilter, IPsec,
 * policy rules) into each entry, so that a packet reads one entry where it
 * comes in and one where it goes out. An all-zero entry: no condition.
 */
#ifndef FS_MAX_IFACES
#define FS_MAX_IFACES 65536
#endif

/* fs_iface.flags */
#define FS_IF_RPF_LOOSE 0x1  /* IPv4 rp_filter 2: the source needs a unicast route */
#define FS_IF_RPF_STRICT 0x2 /* rp_filter 1: ... one whose nexthop is this interface */
#define FS_IF_CHECKSUM 0x4   /* TCP/UDP arriving here may carry partial checksums */
#define FS_IF_RULES_V4 0x8   /* policy rules: IPv4 by bpf_fib_lookup, source by it too */
#define FS_IF_RULES_V6 0x10  /* policy rules: IPv6 by bpf_fib_lookup */

/*
 * Why a packet left the fast path the way it did: the index into `counters`.
 * Codes are stable (a restarted daemon adopts the pinned counters), so new
 * reasons are appended before FS_REASON_MAX, never inserted.
 */
#define FS_REASONS(X)                                                                \
	X(FWD_FAST, 0, "forwarded by a hit in the fast path's own tables")          \
	X(FWD_FIB, 1, "forwarded using bpf_fib_lookup")                             \
	X(PASS_NOT_IP, 2, "not IPv4 or IPv6 (ARP, LLDP, ...)")                       \
	X(PASS_TTL, 3, "TTL or hop limit would expire: the kernel sends time exceeded") \
	X(PASS_IP_OPTIONS, 4, "IPv4 options or an IPv6 hop-by-hop header")          \
	X(PASS_FRAGMENT, 5, "IP fragment, handed to the kernel by configuration")   \
	X(PASS_MTU, 6, "larger than the egress MTU: the kernel fragments or sends PTB") \
	X(PASS_LOCAL, 7, "for this host, or link-local")                            \
	X(PASS_MULTICAST, 8, "multicast or broadcast")                              \
	X(PASS_UNREACHABLE, 9, "unreachable or prohibit route: the kernel answers ICMP") \
	X(PASS_NO_ROUTE, 10, "no route, or the FIB does not forward it")            \
	X(PASS_NO_NEIGH, 11, "next hop's neighbour unresolved: the kernel resolves it") \
	X(PASS_EGRESS, 12, "egress interface is not one the fast path may redirect to") \
	X(PASS_VLAN, 13, "VLAN-tagged frame")                                       \
	X(PASS_FIB_OTHER, 14, "bpf_fib_lookup gave another answer (forwarding disabled, ...)") \
	X(PASS_MALFORMED, 15, "truncated or invalid header, or martian address")    \
	X(DROP_BLACKHOLE, 16, "dropped by a blackhole route")                       \
	X(PASS_KERNEL_ROUTE, 17, "route says: kernel, with an unknown reason code")  \
	X(FWD_STALE, 18, "forwarded using bpf_fib_lookup alone: the daemon's tables are stale") \
	X(PASS_FORWARDING_OFF, 19, "forwarding is off (IPv4: the ingress interface's; IPv6: all)") \
	X(PASS_RULES, 20, "policy rules the fast path cannot evaluate (fwmark, uid, ports, l3mdev, action)") \
	X(FWD_RULES, 21, "forwarded using bpf_fib_lookup, which applies the policy rules in place") \
	X(PASS_VRF, 22, "ingress interface is enslaved to a VRF (l3mdev)")                    \
	X(PASS_RP_FILTER, 23, "rp_filter or a custom rule set: the kernel validates the source") \
	X(PASS_NETFILTER, 24, "netfilter rules may act on this family's forwarded traffic")   \
	X(PASS_XFRM, 25, "IPsec (XFRM) policies may cover this family's forwarded traffic")   \
	X(PASS_TC_INGRESS, 26, "tc or tcx ingress on the ingress interface: it runs before routing") \
	X(PASS_EGRESS_QDISC, 27, "egress interface has its own qdisc or tc/tcx egress")       \
	X(PASS_CHECKSUM, 28, "TCP/UDP from a veth whose peer leaves checksums to offload")    \
	X(PASS_HAIRPIN, 29, "egress is the ingress interface: the kernel may send a redirect") \
	X(PASS_MARTIAN_SOURCE, 30, "source is an address of this host: the kernel drops it") \
	X(PASS_IFACE_UNKNOWN, 31, "interface without fast path state (ifindex beyond FS_MAX_IFACES)") \
	X(PASS_OTHERHOST, 32, "frame not addressed to the ingress interface's MAC: the kernel drops it") \
	X(PASS_NO_DAEMON, 33, "no daemon follows the kernel (its heartbeat ran out): the kernel forwards")

#define FS_REASON_ENUM(name, value, desc) FS_REASON_##name = value,
enum fs_reason {
	FS_REASONS(FS_REASON_ENUM)
	FS_REASON_MAX = 34
};
#undef FS_REASON_ENUM

/* LPM keys: prefixlen first, as BPF_MAP_TYPE_LPM_TRIE requires. */
struct fs_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct fs_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct fs_route {
	__u32 nh_id;
	__u8 action;
	__u8 flags;
	__u8 reason;
	__u8 plen; /* routes_v4/v6: the key's prefix length, for user space; 0 in v4_slots */
};

/* Two DIR-24-8 entries: the value of v4_tbl24 and v4_tbl8. */
struct fs_dir_pair {
	__u32 entry[2];
};

/* A slot of v6_lengths: bit i stands for prefix length 128 - i. */
struct fs_v6_lengths {
	__u64 lengths[FS_V6_LENGTH_WORDS];
};

struct fs_nexthop {
	__u32 ifindex;
	__u16 mtu;
	__u8 flags;
	__u8 family;
	__u8 smac[6];
	__u8 dmac[6];
	__u8 gateway[16];
};

/* ECMP: weights are expressed by repeating a nexthop id in buckets[]. */
struct fs_group {
	__u32 nbuckets;
	__u32 buckets[FS_GROUP_BUCKETS];
	__u32 nmembers;
	__u32 member_ids[FS_GROUP_MEMBERS];
	__u32 member_weights[FS_GROUP_MEMBERS];
};

struct fs_neigh_key {
	__u32 ifindex;
	__u32 family;
	__u8 addr[16];
};

struct fs_neigh {
	__u8 mac[6];
	__u16 pad;
};

struct fs_counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * Ingress and egress conditions of one interface; reasons are enum fs_reason, 0
 * none. ``mac``: the interface's address; a unicast frame to another goes to
 * the kernel (which drops it as PACKET_OTHERHOST, or hands it to a macvlan).
 * An entry the daemon never wrote has no MAC: nothing arriving there is
 * forwarded by the fast path.
 */
struct fs_iface {
	__u8 pass_v4; /* hand every IPv4 packet arriving here to the kernel, counted so */
	__u8 pass_v6;
	__u8 flags;   /* FS_IF_* */
	__u8 egress;  /* hand every packet routed out of here to the kernel, counted so */
	__u8 mac[6];
	__u16 pad;
};

struct fs_config {
	__u32 hash_policy_v4;
	__u32 hash_policy_v6;
	__u32 flags;
	__u32 v4_table; /* FS_V4_LPM or FS_V4_DIR24 */
	__u32 v6_table; /* FS_V6_LPM or FS_V6_HASH */
};

/*
 * The daemon's two promises, each renewed as now + stale_after
 * (CLOCK_MONOTONIC_COARSE, the clock of bpf_ktime_get_coarse_ns); 0: no
 * promise needed (stale_after = 0).
 *
 * watched_until: the daemon is alive and follows the kernel's conditions
 * (`ifaces`: rules, sysctls, netfilter, IPsec, qdiscs...). Renewed each
 * second whatever its tables' state. Past it nothing the program knows can be
 * trusted, the conditions included: every packet goes to the kernel
 * (PASS_NO_DAEMON), so a stopped, crashed or frozen daemon leaves plain Linux.
 *
 * fresh_until: its tables follow the kernel's too: renewed only once every
 * change the kernel announced is applied, withdrawn (1: in the past) when
 * announcements were lost. Past it, while watched, the program forwards by
 * bpf_fib_lookup alone (FWD_STALE), which is exact whatever the tables hold.
 */
struct fs_heartbeat {
	__u64 fresh_until;
	__u64 watched_until;
};

/*
 * The program's own memo, one per CPU (`trust_memo`, never written by user
 * space): fs_trust's answer for one jiffy and one fs_heartbeat. The coarse
 * clock the promises are written in moves only at the timer ticks that move
 * jiffies, so within a jiffy the answer for the same heartbeat stands, and
 * reading jiffies is a load where reading the clock is a helper call (13 ns a
 * packet on the benchmark VM). A promise runs out at most one tick late: the
 * kernel moves jiffies just before the coarse clock.
 */
struct fs_trust_memo {
	__u64 jiffies;
	__u64 fresh_until;
	__u64 watched_until;
	__u64 trust; /* enum fs_trust */
};

#endif /* FIBSYNC_H */
