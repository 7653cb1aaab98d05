/* SPDX-License-Identifier: GPL-2.0 */
/*
 * fibsync XDP fast path (bcc dialect: compiled at load time by
 * fibsync/fastpath/program.py, which defines FS_PIN_DIR).
 *
 * The fast path forwards what it is sure about and hands everything else to
 * the kernel with XDP_PASS, so the router never does worse than Linux alone:
 * the kernel answers ICMP, resolves neighbours, handles options, VLANs and
 * anything this program does not understand. The only drop is a blackhole
 * route, which the kernel would drop as well. Each packet is counted exactly
 * once, under the reason for what happened to it.
 *
 * A packet's way through, each step a named helper:
 *
 *   fs_process              Ethernet, VLAN, link-layer multicast; fs_trust (no
 *                           live daemon: everything to the kernel); the ingress
 *                           interface's conditions; fs_config_read (the config
 *                           map, read once per packet)
 *   fs_ipv4, fs_ipv6:
 *     fs_ipv{4,6}_header    header validation: version, lengths, options
 *     fs_ipv{4,6}_addresses multicast, link-local and martian addresses
 *     fs_fragment_to_kernel the fragment policy (fs_config.flags)
 *     p->trust              tables behind the kernel's (a heartbeat missed or
 *                           withdrawn): bpf_fib_lookup alone, for the source
 *                           too (FWD_STALE)
 *     fs_v{4,6}_route       the table choice: IPv4 from the LPM trie or the
 *                           DIR-24-8 table, IPv6 from the LPM trie or the
 *                           hash per prefix length
 *   the lookup, which never touches the frame:
 *     fs_route_verdict      the route's action; a FORWARD route's egress from
 *                           fs_nexthop_egress: [group, fs_hash_flow (hash.h)]
 *                           -> nexthop -> [neighbour]
 *     fs_fib_lookup (fib.h) bpf_fib_lookup, where the tables miss or cannot
 *                           say (no entry, unresolved neighbour)
 *   the redirect:
 *     fs_redirect           MTU and TTL checks, bpf_redirect_map, rewrite
 *   xdp_fibsync             fs_count under the verdict's reason
 *
 * types.h holds the verdict, packet and egress types. Helpers that use a map
 * live in this file: bcc turns map calls (``routes_v4.lookup(&key)``) into
 * BPF helper calls in the main source file only; in a header they compile to
 * an indirect call the kernel refuses ("unknown opcode 8d").
 *
 * Every helper that ends a packet's way returns a struct fs_verdict (action
 * and reason); one that may not (a check, a lookup) says so with a bool and
 * leaves the verdict or its findings in an out parameter. Everything that
 * can make us hand the packet back (MTU, TTL, egress) is decided before the
 * first byte is rewritten: the kernel must receive the frame as it arrived.
 */
#include <uapi/linux/bpf.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#include "fibsync.h"
#include "parse.h"
#include "types.h"
#include "hash.h"
#include "fib.h"

#ifndef FS_PIN_DIR
#error "FS_PIN_DIR must name the instance's pin directory (program.py defines it)"
#endif

/* ---------------------------------------------------------------- maps */

/*
 * The maps are created (or adopted) and pinned by fastpath/program.py before
 * this file is compiled; bcc opens the pinned files instead of creating its
 * own. Keys and values are the structs of fibsync.h.
 */
/* The section names follow bcc's BPF_TABLE_PINNED convention. */
#define FS_PIN(name) FS_PIN_DIR "/" #name

BPF_TABLE_PINNED("lpm_trie", struct fs_v4_key, struct fs_route, routes_v4,
		 FS_MAX_ROUTES_V4, FS_PIN(routes_v4), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct fs_v6_key, struct fs_route, routes_v6,
		 FS_MAX_ROUTES_V6, FS_PIN(routes_v6), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct fs_nexthop, nexthops, FS_MAX_NEXTHOPS,
		 FS_PIN(nexthops));
BPF_TABLE_PINNED("hash", __u32, struct fs_group, groups, FS_MAX_GROUPS, FS_PIN(groups));
BPF_TABLE_PINNED("hash", struct fs_neigh_key, struct fs_neigh, neighbours, FS_MAX_NEIGH,
		 FS_PIN(neighbours));
BPF_TABLE_PINNED("percpu_array", __u32, struct fs_counter, counters, FS_REASON_MAX,
		 FS_PIN(counters));
BPF_TABLE_PINNED("array", __u32, struct fs_config, config, 1, FS_PIN(config));
BPF_TABLE_PINNED("array", __u32, struct fs_heartbeat, heartbeat, 1, FS_PIN(heartbeat));
BPF_TABLE_PINNED("percpu_array", __u32, struct fs_trust_memo, trust_memo, 1,
		 FS_PIN(trust_memo));
BPF_TABLE_PINNED("array", __u32, struct fs_iface, ifaces, FS_MAX_IFACES, FS_PIN(ifaces));
BPF_TABLE_PINNED("array", __u32, __u64, local_v4, FS_LOCAL_V4_WORDS, FS_PIN(local_v4));
BPF_TABLE_PINNED("array", __u32, struct fs_dir_pair, v4_tbl24, FS_DIR24_ENTRIES / 2,
		 FS_PIN(v4_tbl24), BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct fs_dir_pair, v4_tbl8,
		 FS_MAX_TBL8_GROUPS * FS_TBL8_ENTRIES / 2, FS_PIN(v4_tbl8), BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct fs_route, v4_slots, FS_MAX_SLOTS, FS_PIN(v4_slots),
		 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct fs_nexthop, v4_nh, FS_MAX_SLOTS * 2, FS_PIN(v4_nh),
		 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("hash", struct fs_v6_key, struct fs_route, v6_hash, FS_MAX_ROUTES_V6,
		 FS_PIN(v6_hash), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct fs_v6_lengths, v6_lengths, FS_V6_SLOTS + 1,
		 FS_PIN(v6_lengths), BPF_F_MMAPABLE);

/*
 * The interfaces the program may redirect to. tx_ports, a DEVMAP_HASH (any
 * ifindex), holds them all; tx_direct, an array DEVMAP indexed by ifindex,
 * holds those below FS_TX_DIRECT too, and the program redirects through it
 * where it can: an array slot instead of a hash lookup costs ~8 ns less a
 * packet (84 -> 76.5 ns a DIR-24-8 hit, measured). bcc 0.26 has no name for
 * DEVMAP_HASH, but it only needs one to open a pinned map, and the verifier
 * checks bpf_redirect_map against the real map type.
 */
struct tx_ports_table_t {
	__u32 key;
	__u32 leaf;
	u64 (*redirect_map)(int, int);
	__u32 max_entries;
};
__attribute__((section("maps/devmap:" FS_PIN(tx_ports))))
struct tx_ports_table_t tx_ports = { .max_entries = FS_MAX_TX_PORTS };
__attribute__((section("maps/devmap:" FS_PIN(tx_direct))))
struct tx_ports_table_t tx_direct = { .max_entries = FS_TX_DIRECT };

/* ---------------------------------------------------------------- state */

/*
 * fs_config, read once per packet: every decision about one packet sees the
 * same settings, even while the daemon rewrites them (a reload). Without an
 * entry (never: it is an array) the zeroed copy means LPM trie, L3 hashing,
 * fragments forwarded.
 */
static __always_inline void fs_config_read(struct fs_config *cfg)
{
	__u32 zero = 0;
	struct fs_config *c = config.lookup(&zero);

	if (c)
		*cfg = *c;
}

/*
 * How far the daemon's promises (fs_heartbeat) stand, read once per packet:
 * FS_TRUST_TABLES, its tables and conditions; FS_TRUST_FIB, its conditions
 * only (the tables may lag the kernel's: bpf_fib_lookup alone); FS_TRUST_NONE,
 * nothing (no daemon follows the kernel: every packet to the kernel). The
 * clock is read once per jiffy and heartbeat on each CPU (struct
 * fs_trust_memo); the other packets compare three words.
 */
static __always_inline __u8 fs_trust(void)
{
	__u32 zero = 0;
	struct fs_heartbeat *hb = heartbeat.lookup(&zero);
	struct fs_trust_memo *memo;
	__u64 fresh, watched, tick, now;
	__u8 trust = FS_TRUST_TABLES;

	if (!hb)
		return FS_TRUST_TABLES;
	fresh = hb->fresh_until;
	watched = hb->watched_until;
	if (!(fresh | watched))
		return FS_TRUST_TABLES;
	tick = bpf_jiffies64();
	memo = trust_memo.lookup(&zero);
	if (memo && memo->jiffies == tick && memo->fresh_until == fresh &&
	    memo->watched_until == watched)
		return memo->trust;
	now = bpf_ktime_get_coarse_ns();
	if (watched && now > watched)
		trust = FS_TRUST_NONE;
	else if (fresh && now > fresh)
		trust = FS_TRUST_FIB;
	if (memo) {
		memo->jiffies = tick;
		memo->fresh_until = fresh;
		memo->watched_until = watched;
		memo->trust = trust;
	}
	return trust;
}

static __always_inline void fs_count(__u32 reason, __u64 bytes)
{
	struct fs_counter *cnt = counters.lookup(&reason);

	if (cnt) {
		cnt->packets++;
		cnt->bytes += bytes;
	}
}

/* ---------------------------------------------------------------- lookup: own tables */

/*
 * The route (IPv4 from the LPM trie or the DIR-24-8 table, IPv6 from the LPM
 * trie or the hash per prefix length), then its egress through an ECMP group, a nexthop and, for a
 * connected route, the neighbour. Nothing here touches the frame.
 */

/*
 * DIR-24-8: one array read for prefixes up to /24, a second for longer ones,
 * then the route's slot (array lookups are inlined by the verifier). User
 * space fills a tbl8 group before a tbl24 entry points to it and stores each
 * entry with one aligned 4-byte write, so this never reads a half-built range.
 */
static __always_inline struct fs_route *fs_dir24_lookup(__be32 daddr)
{
	__u32 addr = bpf_ntohl(daddr);
	__u32 i = addr >> 8;
	__u32 k = i >> 1;
	struct fs_dir_pair *pair = v4_tbl24.lookup(&k);
	__u32 e;

	if (!pair)
		return NULL;
	e = pair->entry[i & 1];
	if (e & FS_DIR_EXT) {
		i = ((e & FS_DIR_INDEX) << 8) | (addr & 0xff);
		k = i >> 1;
		pair = v4_tbl8.lookup(&k);
		if (!pair)
			return NULL;
		e = pair->entry[i & 1];
	}
	if (!e)
		return NULL;
	k = e & FS_DIR_INDEX;
	return v4_slots.lookup(&k);
}

/* The table choice: the IPv4 route from the table fs_config.v4_table names. */
static __always_inline struct fs_route *fs_v4_route(const struct fs_config *cfg, __be32 daddr)
{
	struct fs_v4_key key = { .prefixlen = 32 };
	struct fs_route *r;

	if (cfg->v4_table == FS_V4_DIR24) {
		r = fs_dir24_lookup(daddr);
		/* Keeps clang from sinking this branch's last lookup and the trie's into
		 * one call whose map is chosen at run time, which the verifier cannot
		 * inline (with the source lookup a second copy of this function made
		 * clang do it: 116 against 91 ns a DIR-24-8 hit). */
		asm volatile("" : "+r"(r));
		return r;
	}
	__builtin_memcpy(key.addr, &daddr, 4);
	return routes_v4.lookup(&key);
}

/* Bits set in x, without branches (the BPF target has no instruction for it). */
static __always_inline __u32 fs_popcount64(__u64 x)
{
	x = x - ((x >> 1) & 0x5555555555555555ULL);
	x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
	x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (x * 0x0101010101010101ULL) >> 56;
}

/* The network-order mask that keeps the first len bits of an address word
 * starting at bit ``from``: 0 to 32 of its bits, without a branch on the shift. */
static __always_inline __u32 fs_v6_word_mask(__u32 len, __u32 from)
{
	__u32 bits = len > from ? len - from : 0;

	if (bits > 32)
		bits = 32;
	return bpf_htonl((__u32)(0xffffffff00000000ULL >> bits));
}

/*
 * Probe v6_hash at the lengths one word of a v6_lengths slot names, longest
 * first: bit i stands for length ``top`` - i. The first hit is the longest
 * prefix of those lengths that holds the address.
 */
static __always_inline struct fs_route *fs_v6_probe(const __u32 *a, __u64 lengths, __u32 top)
{
	struct fs_v6_key key;
	struct fs_route *r;
	__u32 w[4], i, len;
	__u64 low;

	for (i = 0; i < 64 && lengths; i++) {
		low = lengths & -lengths;
		lengths ^= low;
		len = top - fs_popcount64(low - 1);
		w[0] = a[0] & fs_v6_word_mask(len, 0);
		w[1] = a[1] & fs_v6_word_mask(len, 32);
		w[2] = a[2] & fs_v6_word_mask(len, 64);
		w[3] = a[3] & fs_v6_word_mask(len, 96);
		key.prefixlen = len;
		__builtin_memcpy(key.addr, w, 16);
		r = v6_hash.lookup(&key);
		if (r)
			return r;
	}
	return NULL;
}

/*
 * The IPv6 hash table (see fibsync.h): the lengths longer than /32 in use in
 * the destination's /32 (its slot), then the lengths up to /32 in use (the
 * last slot), each probed longest first; the first hit is the route.
 */
static __always_inline struct fs_route *fs_v6_hash_lookup(const __u8 *daddr)
{
	__u32 a[4], slot, last = FS_V6_SLOTS;
	struct fs_v6_lengths *l;
	struct fs_route *r;

	__builtin_memcpy(a, daddr, 16);
	slot = fs_fibonacci_hash(bpf_ntohl(a[0]), FS_V6_SLOT_HASH, FS_V6_SLOT_BITS);
	l = v6_lengths.lookup(&slot);
	if (l) {
		r = fs_v6_probe(a, l->lengths[0], 128);
		if (r)
			return r;
		r = fs_v6_probe(a, l->lengths[1], 64);
		if (r)
			return r;
	}
	l = v6_lengths.lookup(&last);
	if (!l)
		return NULL;
	r = fs_v6_probe(a, l->lengths[1], 64);
	if (r)
		return r;
	return fs_v6_probe(a, l->lengths[2], 0);
}

/* The table choice: the IPv6 route from the table fs_config.v6_table names. */
static __always_inline struct fs_route *fs_v6_route(const struct fs_config *cfg,
						    const __u8 *daddr)
{
	struct fs_v6_key key;
	struct fs_route *r;

	if (cfg->v6_table == FS_V6_HASH) {
		r = fs_v6_hash_lookup(daddr);
		asm volatile("" : "+r"(r)); /* as in fs_v4_route */
		return r;
	}
	key.prefixlen = 128;
	__builtin_memcpy(key.addr, daddr, 16);
	return routes_v6.lookup(&key);
}

/*
 * The nexthop a route names (nh_id: the route's, or its group's choice): its
 * copy in `v4_nh` (a DIR-24-8 slot's one nexthop, an array read the verifier
 * inlines) or the `nexthops` hash.
 */
static __always_inline struct fs_nexthop *fs_route_nexthop(const struct fs_route *r,
							   __u32 nh_id)
{
	struct fs_nexthop *nh;

	if (r->flags & FS_ROUTE_NH_COPY) {
		nh = v4_nh.lookup(&nh_id);
		/* Keeps clang from merging the two lookups into one call whose map is
		 * chosen at run time, which the verifier cannot inline: the copy's
		 * array read was a bpf_map_lookup_elem call, and through it the hash's
		 * lookup function (bpftool's xlated dump, 2026-12-04). */
		asm volatile("" : "+r"(nh));
		return nh;
	}
	return nexthops.lookup(&nh_id);
}

/*
 * A FORWARD route's egress: true with *eg filled, false when the fast path's
 * tables cannot say (missing entry, unresolved neighbour) and bpf_fib_lookup
 * must. An unresolved neighbour is never probed from here: bpf_fib_lookup
 * answers NO_NEIGH, the packet goes to the kernel, and the kernel resolves
 * it exactly when and as it would have (a FAILED path skipped under
 * fib_multipath_use_neigh stays skipped).
 */
static __always_inline bool fs_nexthop_egress(struct fs_pkt *p, void *l3, const void *daddr,
					      const struct fs_route *r, struct fs_egress *eg)
{
	struct fs_nexthop *nh;
	__u32 nh_id = r->nh_id;

	if (r->flags & FS_ROUTE_GROUP) {
		struct fs_group *g = groups.lookup(&nh_id);
		__u32 n, bucket;

		if (!g)
			return false;
		n = g->nbuckets;
		if (n == 0 || n > FS_GROUP_BUCKETS)
			return false;
		bucket = fs_hash_flow(p, l3) % n;
		/* clang proves the mask redundant and drops it; the verifier
		 * cannot follow the modulo and needs it */
		asm volatile("" : "+r"(bucket));
		nh_id = g->buckets[bucket & (FS_GROUP_BUCKETS - 1)];
	}

	/* A route may briefly name a nexthop the writer has not stored yet. */
	nh = fs_route_nexthop(r, nh_id);
	if (!nh)
		return false;

	if (nh->flags & FS_NH_CONNECTED) {
		struct fs_neigh_key nk = {};
		struct fs_neigh *ne;

		nk.ifindex = nh->ifindex;
		nk.family = p->family;
		if (p->family == AF_INET)
			__builtin_memcpy(nk.addr, daddr, 4);
		else
			__builtin_memcpy(nk.addr, daddr, 16);
		ne = neighbours.lookup(&nk);
		if (!ne)
			return false;
		eg->dmac = ne->mac;
	} else if (nh->flags & FS_NH_RESOLVED) {
		eg->dmac = nh->dmac;
	} else {
		return false;
	}
	eg->ifindex = nh->ifindex;
	eg->mtu = nh->mtu;
	eg->smac = nh->smac;
	return true;
}

/* ---------------------------------------------------------------- the redirect */

/*
 * Whichever lookup found the egress: the checks that would hand the frame
 * back first, then bpf_redirect_map, then the rewrite (MACs, TTL or hop
 * limit, the IPv4 checksum), so that the kernel always receives a frame as it
 * arrived ("bail while the frame is still untouched", xdp-forward).
 */

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), on 16-bit words as they lie in
 * memory (one's complement sums do not care about byte order). */
static __always_inline void fs_csum_replace2(__sum16 *sum, __u16 old, __u16 new)
{
	__u32 c = (__u16)~*sum;

	c += (__u16)~old;
	c += new;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	*sum = (__sum16)~c;
}

static __always_inline void fs_ipv4_decrement_ttl(struct iphdr *iph)
{
	__u16 *word = (__u16 *)&iph->ttl; /* ttl and protocol share one word */
	__u16 old = *word;

	iph->ttl--;
	fs_csum_replace2(&iph->check, old, *word);
}

/*
 * Why bpf_redirect_map refused an egress: the daemon keeps an interface with
 * egress conditions (a qdisc, tc, netfilter's postrouting: `ifaces`.egress
 * says which) out of tx_ports, so that checking them costs a forwarded packet
 * nothing; an interface with none there runs no program of ours.
 */
static __always_inline struct fs_verdict fs_egress_refused(__u32 out)
{
	struct fs_iface *e = ifaces.lookup(&out);

	if (!e)
		return FS_PASS(PASS_IFACE_UNKNOWN);
	if (e->egress)
		return fs_pass(e->egress);
	return FS_PASS(PASS_EGRESS);
}

/*
 * Send the frame to eg, whichever lookup found it: the checks that would
 * hand it back first, while it is untouched, then bpf_redirect_map, then
 * the rewrite. ``reason`` is what a forwarded packet counts under.
 */
static __always_inline struct fs_verdict fs_redirect(struct fs_pkt *p, void *l3,
						     const struct fs_egress *eg, __u32 reason)
{
	long sent;

	__u32 out = eg->ifindex;
	long trailer = (long)(p->end - l3) - (long)p->l3_len;

	if (eg->mtu && p->l3_len > eg->mtu)
		return FS_PASS(PASS_MTU);
	if (p->hops <= 1)
		return FS_PASS(PASS_TTL);
	if (out == p->ctx->ingress_ifindex)
		return FS_PASS(PASS_HAIRPIN);
	/* With XDP_PASS as the fallback action, a port missing from tx_ports
	 * returns the frame untouched to the kernel. */
	if (eg->ifindex < FS_TX_DIRECT) {
		sent = tx_direct.redirect_map(eg->ifindex, XDP_PASS);
		/* Keeps clang from merging the two calls into one whose map is
		 * chosen at run time: the verifier inlines bpf_redirect_map's
		 * lookup only where the map is known (97 against 76.5 ns). */
		asm volatile("" ::: "memory");
	} else {
		sent = tx_ports.redirect_map(eg->ifindex, XDP_PASS);
	}
	if (sent != XDP_REDIRECT)
		return fs_egress_refused(out);

	__builtin_memcpy(p->eth->h_dest, eg->dmac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_source, eg->smac, ETH_ALEN);
	if (p->family == AF_INET)
		fs_ipv4_decrement_ttl(l3);
	else
		((struct ipv6hdr *)l3)->hop_limit--;
	/* Bytes after the IP packet (Ethernet padding, junk): the kernel trims them
	 * before forwarding (pskb_trim_rcsum), and so do we, last (the frame's
	 * pointers are invalid after it; shrinking to at least a header cannot fail). */
	if (trailer > 0)
		bpf_xdp_adjust_tail(p->ctx, -trailer);
	return fs_verdict(XDP_REDIRECT, reason);
}

/* ---------------------------------------------------------------- decisions */

/*
 * What the route itself decides: true with *v (a forward, a blackhole drop,
 * a hand-over to the kernel), false when bpf_fib_lookup must decide (a
 * FORWARD route whose egress the tables cannot say, an unknown action).
 */
static __always_inline bool fs_route_verdict(struct fs_pkt *p, void *l3, const void *daddr,
					     const struct fs_route *r, struct fs_verdict *v)
{
	struct fs_egress eg = {};

	switch (r->action) {
	case FS_ACT_FORWARD:
		if (!fs_nexthop_egress(p, l3, daddr, r, &eg))
			return false;
		*v = fs_redirect(p, l3, &eg, FS_REASON_FWD_FAST);
		return true;
	case FS_ACT_DROP:
		*v = fs_verdict(XDP_DROP, FS_REASON_DROP_BLACKHOLE);
		return true;
	case FS_ACT_KERNEL:
		*v = r->reason < FS_REASON_MAX ? fs_pass(r->reason) : FS_PASS(PASS_KERNEL_ROUTE);
		return true;
	default:
		return false;
	}
}

/* Forward by bpf_fib_lookup; ``reason``: FWD_FIB, or FWD_STALE. */
static __always_inline struct fs_verdict fs_fib_forward(struct fs_pkt *p, void *l3,
							struct bpf_fib_lookup *fib, __u32 reason)
{
	struct fs_egress eg = {};
	struct fs_verdict v;

	if (!fs_fib_lookup(p, fib, &eg, &v))
		return v;
	return fs_redirect(p, l3, &eg, reason);
}

static __always_inline struct fs_verdict fs_fib_v4(struct fs_pkt *p, struct iphdr *iph,
						   __u32 reason)
{
	struct bpf_fib_lookup fib = {};

	fs_fib_params_v4(p, iph, &fib);
	return fs_fib_forward(p, iph, &fib, reason);
}

static __always_inline struct fs_verdict fs_fib_v6(struct fs_pkt *p, struct ipv6hdr *ip6h,
						   __u32 reason)
{
	struct bpf_fib_lookup fib = {};

	fs_fib_params_v6(p, ip6h, &fib);
	return fs_fib_forward(p, ip6h, &fib, reason);
}

/* ---------------------------------------------------------------- conditions */

/*
 * Kernel behaviour our tables do not hold (fs_iface, from fibsync/fidelity.py):
 * the ingress interface's entry says whether this family's packets go to the
 * kernel (forwarding off, VRF, tc ingress, netfilter, IPsec, unsupported
 * rules), whether TCP/UDP may carry partial checksums, and how to check the
 * source. The common case, no condition, costs one inlined array read (in
 * fs_process) and, for IPv4, a `local_v4` bit (fs_ipv4_source); egress
 * conditions cost it nothing (fs_egress_refused).
 */
static __always_inline bool fs_ingress_ok(const struct fs_pkt *p, __u8 pass, __u32 *reason)
{
	if (pass) {
		*reason = pass;
		return false;
	}
	if ((p->ifc->flags & FS_IF_CHECKSUM) &&
	    (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP)) {
		*reason = FS_REASON_PASS_CHECKSUM;
		return false;
	}
	return true;
}

/* False when no route of this host's (PASS_LOCAL) can hold addr: see `local_v4`. */
static __always_inline bool fs_maybe_local_v4(__be32 addr)
{
	__u32 bit = fs_fibonacci_hash(bpf_ntohl(addr) >> 8, FS_LOCAL_V4_HASH, FS_LOCAL_V4_BITS);
	__u32 word = bit >> 6;
	__u64 *w = local_v4.lookup(&word);

	return !w || (*w >> (bit & 63)) & 1;
}

/*
 * The source, as ip_route_input_slow() and fib_validate_source() check a
 * forwarded packet's: an address of this host is a martian (accept_local
 * aside, which we leave to the kernel); under rp_filter the source needs a
 * unicast route (loose), and one whose nexthop is the ingress interface
 * (strict). Our own table answers where it can; what it cannot confirm (no
 * route, an ECMP route under strict) goes to the kernel, which decides.
 * Without rp_filter, `local_v4` spares most sources the table walk (a cache
 * miss in the 64 MiB tbl24 for each new source /24).
 */
static __always_inline bool fs_ipv4_source(struct fs_pkt *p, struct iphdr *iph, __u32 *reason)
{
	__u8 rpf = p->ifc->flags & (FS_IF_RPF_LOOSE | FS_IF_RPF_STRICT);
	struct fs_route *r;
	struct fs_nexthop *nh;

	if (!rpf && !fs_maybe_local_v4(iph->saddr))
		return true;
	r = fs_v4_route(&p->cfg, iph->saddr);
	if (r && r->action == FS_ACT_KERNEL && r->reason == FS_REASON_PASS_LOCAL) {
		*reason = FS_REASON_PASS_MARTIAN_SOURCE;
		return false;
	}
	if (!rpf)
		return true;
	*reason = FS_REASON_PASS_RP_FILTER;
	if (!r || r->action != FS_ACT_FORWARD)
		return false;
	if (!(rpf & FS_IF_RPF_STRICT))
		return true;
	if (r->flags & FS_ROUTE_GROUP)
		return false;
	nh = fs_route_nexthop(r, r->nh_id);
	return nh && nh->ifindex == p->ctx->ingress_ifindex;
}

/* The fragment policy: fragments go to the kernel when fs_config says so. */
static __always_inline bool fs_fragment_to_kernel(const struct fs_pkt *p)
{
	return p->is_frag && (p->cfg.flags & FS_CFG_PASS_FRAGMENTS);
}

/* ---------------------------------------------------------------- IPv4 */

/*
 * Header validation: true with *iphp and the packet's header facts set;
 * false with *reason (MALFORMED, or IP_OPTIONS for ihl > 5).
 */
static __always_inline bool fs_ipv4_header(struct fs_pkt *p, struct fs_cursor *c,
					   struct iphdr **iphp, __u32 *reason)
{
	struct iphdr *iph = fs_parse_ipv4(c);

	*reason = FS_REASON_PASS_MALFORMED;
	if (!iph || iph->version != 4 || iph->ihl < 5)
		return false;
	p->l3_len = bpf_ntohs(iph->tot_len);
	if (p->l3_len < sizeof(*iph) || (void *)iph + p->l3_len > c->end)
		return false;
	if (iph->ihl != 5) {
		*reason = FS_REASON_PASS_IP_OPTIONS;
		return false;
	}
	/* ip_rcv_core() drops a header whose checksum is wrong */
	if (!fs_ipv4_checksum_ok(iph))
		return false;
	p->proto = iph->protocol;
	p->hops = iph->ttl;
	p->l4 = c->pos;
	p->is_frag = (iph->frag_off & bpf_htons(FS_IP_MF | FS_IP_OFFSET)) != 0;
	*iphp = iph;
	return true;
}

/* 0/8 and 127/8: addresses no packet may carry across a router. */
static __always_inline int fs_ipv4_martian(__be32 addr)
{
	__u8 first = ((__u8 *)&addr)[0];

	return first == 0 || first == 127;
}

/*
 * Addresses the fast path forwards: false with *reason for multicast and
 * broadcast destinations (link-layer multicast was caught already) and for
 * martians the kernel would drop (it counts them: let it).
 */
static __always_inline bool fs_ipv4_addresses(const struct iphdr *iph, __u32 *reason)
{
	/* 224/4 and limited broadcast */
	if ((((__u8 *)&iph->daddr)[0] & 0xf0) == 0xe0 || iph->daddr == 0xffffffff) {
		*reason = FS_REASON_PASS_MULTICAST;
		return false;
	}
	if (fs_ipv4_martian(iph->saddr) || fs_ipv4_martian(iph->daddr) ||
	    (((__u8 *)&iph->saddr)[0] & 0xf0) == 0xe0 || iph->saddr == 0xffffffff) {
		*reason = FS_REASON_PASS_MALFORMED;
		return false;
	}
	return true;
}

static __always_inline struct fs_verdict fs_ipv4(struct fs_pkt *p, struct fs_cursor *c)
{
	struct iphdr *iph = NULL;
	struct fs_route *r;
	struct fs_verdict v;
	__u32 reason;

	if (!fs_ipv4_header(p, c, &iph, &reason) || !fs_ipv4_addresses(iph, &reason))
		return fs_pass(reason);
	if (fs_fragment_to_kernel(p))
		return FS_PASS(PASS_FRAGMENT);
	if (!fs_ingress_ok(p, p->ifc->pass_v4, &reason))
		return fs_pass(reason);
	if (p->ifc->flags & FS_IF_RULES_V4) {
		/* policy rules: bpf_fib_lookup applies them, to the source too */
		if (!fs_fib_source_v4(p, iph, &reason))
			return fs_pass(reason);
		reason = FS_REASON_FWD_RULES;
	} else if (p->trust == FS_TRUST_FIB) {
		/* tables that may lag the kernel's judge neither the destination nor the
		 * source: bpf_fib_lookup does both (what it cannot confirm, the kernel
		 * decides) */
		if (!fs_fib_source_v4(p, iph, &reason))
			return fs_pass(reason);
		reason = FS_REASON_FWD_STALE;
	} else {
		if (!fs_ipv4_source(p, iph, &reason))
			return fs_pass(reason);
		r = fs_v4_route(&p->cfg, iph->daddr);
		if (r && fs_route_verdict(p, iph, &iph->daddr, r, &v))
			return v;
		reason = FS_REASON_FWD_FIB;
	}
	/* one bpf_fib_lookup for the three ways here (each inlined copy of the
	 * lookup and the redirect is code the fast path's hits must live beside) */
	return fs_fib_v4(p, iph, reason);
}

/* ---------------------------------------------------------------- IPv6 */

/* Header validation: true with *ip6hp and l3_len set; false: malformed. */
static __always_inline bool fs_ipv6_header(struct fs_pkt *p, struct fs_cursor *c,
					   struct ipv6hdr **ip6hp)
{
	struct ipv6hdr *ip6h = fs_parse_ipv6(c);

	if (!ip6h || ip6h->version != 6)
		return false;
	p->l3_len = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
	if ((void *)ip6h + p->l3_len > c->end)
		return false;
	*ip6hp = ip6h;
	return true;
}

/* :: (ip6_forward() will not forward what comes from it) */
static __always_inline int fs_ipv6_unspecified(const __u32 *a)
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

/* ::1 and ::ffff:0:0/96 */
static __always_inline int fs_ipv6_martian(const __u32 *a)
{
	if (a[0] | a[1])
		return 0;
	return (a[2] == 0 && a[3] == bpf_htonl(1)) || a[2] == bpf_htonl(0xffff);
}

/*
 * Addresses the fast path forwards: false with *reason for multicast
 * destinations, link-local addresses either way (the kernel answers "beyond
 * scope"), and martians ipv6_rcv() drops: multicast source, loopback,
 * v4-mapped.
 */
static __always_inline bool fs_ipv6_addresses(const struct ipv6hdr *ip6h, __u32 *reason)
{
	const __u8 *d = ip6h->daddr.s6_addr;
	const __u8 *s = ip6h->saddr.s6_addr;

	if (d[0] == 0xff) {
		*reason = FS_REASON_PASS_MULTICAST;
		return false;
	}
	if ((d[0] == 0xfe && (d[1] & 0xc0) == 0x80) || (s[0] == 0xfe && (s[1] & 0xc0) == 0x80)) {
		*reason = FS_REASON_PASS_LOCAL;
		return false;
	}
	if (s[0] == 0xff || fs_ipv6_martian((const __u32 *)s) ||
	    fs_ipv6_martian((const __u32 *)d) || fs_ipv6_unspecified((const __u32 *)s)) {
		*reason = FS_REASON_PASS_MALFORMED;
		return false;
	}
	return true;
}

static __always_inline struct fs_verdict fs_ipv6(struct fs_pkt *p, struct fs_cursor *c)
{
	struct ipv6hdr *ip6h = NULL;
	struct fs_route *r;
	struct fs_verdict v;
	__u32 reason;

	if (!fs_ipv6_header(p, c, &ip6h))
		return FS_PASS(PASS_MALFORMED);
	if (!fs_ipv6_addresses(ip6h, &reason))
		return fs_pass(reason);
	/* after the addresses, as before: a hop-by-hop header is an option */
	if (ip6h->nexthdr == IPPROTO_HOPOPTS)
		return FS_PASS(PASS_IP_OPTIONS);
	p->proto = ip6h->nexthdr;
	p->hops = ip6h->hop_limit;
	p->l4 = c->pos;
	/* Only a fragment header right after the fixed header is seen: deeper
	 * ones carry no ports we could read anyway. */
	p->is_frag = ip6h->nexthdr == IPPROTO_FRAGMENT;
	if (fs_fragment_to_kernel(p))
		return FS_PASS(PASS_FRAGMENT);
	if (!fs_ingress_ok(p, p->ifc->pass_v6, &reason))
		return fs_pass(reason);
	if (p->ifc->flags & FS_IF_RULES_V6) {
		reason = FS_REASON_FWD_RULES;
	} else if (p->trust == FS_TRUST_FIB) {
		reason = FS_REASON_FWD_STALE;
	} else {
		r = fs_v6_route(&p->cfg, ip6h->daddr.s6_addr);
		if (r && fs_route_verdict(p, ip6h, ip6h->daddr.s6_addr, r, &v))
			return v;
		reason = FS_REASON_FWD_FIB;
	}
	return fs_fib_v6(p, ip6h, reason);
}

/* ---------------------------------------------------------------- entry */

static __always_inline struct fs_verdict fs_process(struct xdp_md *ctx, void *data,
						    void *data_end)
{
	struct fs_cursor c = { .pos = data, .end = data_end };
	struct fs_pkt p = { .ctx = ctx, .end = data_end };
	__u32 ingress = ctx->ingress_ifindex;
	struct fs_iface *ifc;
	__be16 proto;

	p.eth = fs_parse_eth(&c);
	if (!p.eth)
		return FS_PASS(PASS_MALFORMED);
	proto = p.eth->h_proto;
	if (fs_is_vlan(proto)) {
		/* Egress tagging is not implemented: the kernel forwards VLANs. */
		if (!fs_parse_vlan(&c, &proto))
			return FS_PASS(PASS_MALFORMED);
		if (proto == bpf_htons(ETH_P_IP) || proto == bpf_htons(ETH_P_IPV6) ||
		    fs_is_vlan(proto))
			return FS_PASS(PASS_VLAN);
		return FS_PASS(PASS_NOT_IP);
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		p.family = AF_INET;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		p.family = AF_INET6;
	} else {
		return FS_PASS(PASS_NOT_IP);
	}
	if (p.eth->h_dest[0] & 1)
		return FS_PASS(PASS_MULTICAST);
	/* before anything the daemon wrote is read: `ifaces` is as old as its promise */
	p.trust = fs_trust();
	if (p.trust == FS_TRUST_NONE)
		return FS_PASS(PASS_NO_DAEMON);
	ifc = ifaces.lookup(&ingress);
	if (!ifc)
		return FS_PASS(PASS_IFACE_UNKNOWN);
	if (!fs_mac_equal(p.eth->h_dest, ifc->mac))
		return FS_PASS(PASS_OTHERHOST);
	p.ifc = ifc;
	fs_config_read(&p.cfg);
	if (p.family == AF_INET)
		return fs_ipv4(&p, &c);
	return fs_ipv6(&p, &c);
}

int xdp_fibsync(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct fs_verdict v = fs_process(ctx, data, data_end);

	fs_count(v.reason, data_end - data);
	return v.action;
}
