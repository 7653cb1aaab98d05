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
 * Per packet on a hit: routes (IPv4: LPM trie or DIR-24-8, by fs_config) ->
 * [groups] -> nexthops -> [neighbours] -> tx_ports (inside bpf_redirect_map)
 * -> counters. Everything that can make
 * us hand the packet back (MTU, TTL, egress) is decided before the first byte
 * is rewritten: the kernel must receive the frame as it arrived.
 */
#include <uapi/linux/bpf.h>

#include "fibsync.h"
#include "parse.h"

#ifndef FS_PIN_DIR
#error "FS_PIN_DIR must name the instance's pin directory (program.py defines it)"
#endif

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/*
 * The maps are created (or adopted) and pinned by program.py before this file
 * is compiled; bcc opens the pinned files instead of creating its own. The
 * section names follow bcc's BPF_TABLE_PINNED convention.
 */
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
BPF_TABLE_PINNED("array", __u32, struct fs_dir_pair, v4_tbl24, FS_DIR24_ENTRIES / 2,
		 FS_PIN(v4_tbl24), BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct fs_dir_pair, v4_tbl8,
		 FS_MAX_TBL8_GROUPS * FS_TBL8_ENTRIES / 2, FS_PIN(v4_tbl8), BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct fs_route, v4_slots, FS_MAX_SLOTS, FS_PIN(v4_slots),
		 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct fs_nexthop, v4_nh, FS_MAX_SLOTS * 2, FS_PIN(v4_nh),
		 BPF_F_MMAPABLE);

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

/* bcc's BPF_RINGBUF_OUTPUT, pinned. */
struct neigh_miss_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" FS_PIN(neigh_miss))))
struct neigh_miss_table_t neigh_miss = { .max_entries = FS_NEIGH_MISS_BYTES };

/* A verdict carries the XDP action and the reason it is counted under. */
#define FS_VERDICT(act, reason) (((act) << 8) | (reason))
#define FS_PASS(reason) FS_VERDICT(XDP_PASS, FS_REASON_##reason)

/* Where the packet goes once the next hop is known. */
struct fs_egress {
	__u32 ifindex;
	__u32 mtu; /* L3; 0 = already checked (bpf_fib_lookup) or unknown */
	const __u8 *smac;
	const __u8 *dmac;
};

/* Header facts the forwarding decision needs, family independent. */
struct fs_pkt {
	struct xdp_md *ctx;
	struct ethhdr *eth;
	void *l4;
	void *end;
	__u32 l3_len;
	__u8 proto;
	__u8 hops; /* TTL or hop limit */
	__u8 is_frag;
	__u8 family;
};

static __always_inline __u32 fs_rol32(__u32 w, unsigned int s)
{
	return (w << s) | (w >> (32 - s));
}

/*
 * Murmur3 mixing: cheap, and good enough that consecutive addresses or ports
 * spread evenly over the buckets. The kernel's own multipath hash is keyed
 * with a secret, so matching it is neither possible nor needed: a flow only
 * has to stay on one path while the fast path forwards it.
 */
static __always_inline __u32 fs_hash_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = fs_rol32(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = fs_rol32(h, 13);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 fs_hash_final(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Ports feed the hash only when policy asks and the packet has them: every
 * fragment of a datagram (the first included) must hash alike. */
static __always_inline __u32 fs_hash_ports(struct fs_pkt *p, __u32 h)
{
	struct fs_cursor c = { .pos = p->l4, .end = p->end };
	struct fs_ports *ports;

	if (p->is_frag)
		return h;
	h = fs_hash_mix(h, p->proto);
	ports = fs_parse_ports(&c, p->proto);
	if (ports)
		h = fs_hash_mix(h, ((__u32)ports->sport << 16) | ports->dport);
	return h;
}

static __always_inline void fs_count(__u32 reason, __u64 bytes)
{
	struct fs_counter *cnt = counters.lookup(&reason);

	if (cnt) {
		cnt->packets++;
		cnt->bytes += bytes;
	}
}

static __always_inline void fs_neigh_miss(__u32 ifindex, __u32 family, const void *addr)
{
	struct fs_miss *m = neigh_miss.ringbuf_reserve(sizeof(*m));

	if (!m)
		return;
	m->ifindex = ifindex;
	m->family = family;
	__builtin_memcpy(m->addr, addr, sizeof(m->addr));
	neigh_miss.ringbuf_submit(m, 0);
}

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
 * The common tail of both forwarding paths. Returns the verdict; on
 * XDP_REDIRECT the frame has been rewritten.
 */
static __always_inline __u32 fs_xmit(struct fs_pkt *p, void *l3, struct fs_egress *eg,
				     __u32 reason)
{
	if (eg->mtu && p->l3_len > eg->mtu)
		return FS_PASS(PASS_MTU);
	if (p->hops <= 1)
		return FS_PASS(PASS_TTL);
	/* With XDP_PASS as the fallback action, a port missing from tx_ports
	 * returns the frame untouched to the kernel. */
	long sent;

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
		return FS_PASS(PASS_EGRESS);

	__builtin_memcpy(p->eth->h_dest, eg->dmac, ETH_ALEN);
	__builtin_memcpy(p->eth->h_source, eg->smac, ETH_ALEN);
	if (p->family == AF_INET)
		fs_ipv4_decrement_ttl(l3);
	else
		((struct ipv6hdr *)l3)->hop_limit--;
	return FS_VERDICT(XDP_REDIRECT, reason);
}

/* fwd: the reason a forwarded packet counts under (FWD_FIB, or FWD_STALE) */
static __always_inline __u32 fs_fib_verdict(struct fs_pkt *p, void *l3,
					    struct bpf_fib_lookup *fib, int rc, __u32 fwd)
{
	struct fs_egress eg = {};

	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		eg.ifindex = fib->ifindex;
		eg.smac = fib->smac;
		eg.dmac = fib->dmac;
		return fs_xmit(p, l3, &eg, fwd);
	case BPF_FIB_LKUP_RET_BLACKHOLE:
		return FS_VERDICT(XDP_DROP, FS_REASON_DROP_BLACKHOLE);
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		return FS_PASS(PASS_UNREACHABLE);
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		return FS_PASS(PASS_NO_ROUTE);
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		return FS_PASS(PASS_NO_NEIGH);
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		return FS_PASS(PASS_MTU);
	default:
		return FS_PASS(PASS_FIB_OTHER);
	}
}

static __always_inline void fs_fib_ports(struct fs_pkt *p, struct bpf_fib_lookup *fib)
{
	struct fs_cursor c = { .pos = p->l4, .end = p->end };
	struct fs_ports *ports;

	/* Ports let the kernel's L4 multipath hash and FIB rules see the flow. */
	fib->l4_protocol = p->proto;
	if (p->is_frag)
		return;
	ports = fs_parse_ports(&c, p->proto);
	if (ports) {
		fib->sport = ports->sport;
		fib->dport = ports->dport;
	}
}

static __always_inline __u32 fs_fib_v4(struct fs_pkt *p, struct iphdr *iph, __u32 fwd)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET;
	fib.tos = iph->tos;
	fib.tot_len = p->l3_len;
	fib.ifindex = p->ctx->ingress_ifindex;
	fib.ipv4_src = iph->saddr;
	fib.ipv4_dst = iph->daddr;
	fs_fib_ports(p, &fib);
	return fs_fib_verdict(p, iph, &fib, bpf_fib_lookup(p->ctx, &fib, sizeof(fib), 0), fwd);
}

static __always_inline __u32 fs_fib_v6(struct fs_pkt *p, struct ipv6hdr *ip6h, __u32 fwd)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AF_INET6;
	fib.flowinfo = *(__be32 *)ip6h & bpf_htonl(0x0FFFFFFF);
	fib.tot_len = p->l3_len;
	fib.ifindex = p->ctx->ingress_ifindex;
	__builtin_memcpy(fib.ipv6_src, &ip6h->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &ip6h->daddr, 16);
	fs_fib_ports(p, &fib);
	return fs_fib_verdict(p, ip6h, &fib, bpf_fib_lookup(p->ctx, &fib, sizeof(fib), 0), fwd);
}

static __always_inline struct fs_config *fs_config_get(void)
{
	__u32 zero = 0;

	return config.lookup(&zero);
}

/* The daemon missed its heartbeat: its tables may lag the kernel's. */
static __always_inline int fs_stale(void)
{
	__u32 zero = 0;
	struct fs_heartbeat *hb = heartbeat.lookup(&zero);

	return hb && hb->fresh_until && bpf_ktime_get_coarse_ns() > hb->fresh_until;
}

/* Not a verdict: "let bpf_fib_lookup decide" (no action is 0xffffff). */
#define FS_FALLBACK 0xffffffff
#define FS_RESOLVED 0

static __always_inline __u32 fs_hash_flow(struct fs_pkt *p, void *l3)
{
	struct fs_config *cfg = fs_config_get();
	__u32 h = 0;

	if (p->family == AF_INET) {
		struct iphdr *iph = l3;

		h = fs_hash_mix(h, iph->saddr);
		h = fs_hash_mix(h, iph->daddr);
		if (cfg && cfg->hash_policy_v4 == FS_HASH_L4)
			h = fs_hash_ports(p, h);
	} else {
		struct ipv6hdr *ip6h = l3;
		__u32 *s = (__u32 *)&ip6h->saddr;
		__u32 *d = (__u32 *)&ip6h->daddr;

		h = fs_hash_mix(h, s[0]);
		h = fs_hash_mix(h, s[1]);
		h = fs_hash_mix(h, s[2]);
		h = fs_hash_mix(h, s[3]);
		h = fs_hash_mix(h, d[0]);
		h = fs_hash_mix(h, d[1]);
		h = fs_hash_mix(h, d[2]);
		h = fs_hash_mix(h, d[3]);
		if (cfg && cfg->hash_policy_v6 == FS_HASH_L4) {
			h = fs_hash_ports(p, h);
		} else {
			/* the kernel's L3 policy for IPv6 adds flow label and next header */
			h = fs_hash_mix(h, *(__be32 *)ip6h & bpf_htonl(0x000FFFFF));
			h = fs_hash_mix(h, p->proto);
		}
	}
	return fs_hash_final(h);
}

/*
 * A FORWARD route's egress: FS_RESOLVED with *eg filled, or FS_FALLBACK when
 * the fast path's tables cannot say (missing entry, unresolved neighbour).
 */
static __always_inline __u32 fs_route_egress(struct fs_pkt *p, void *l3, const void *daddr,
					     struct fs_route *r, struct fs_egress *eg)
{
	struct fs_nexthop *nh;
	__u32 nh_id = r->nh_id;

	if (r->flags & FS_ROUTE_GROUP) {
		struct fs_group *g = groups.lookup(&nh_id);
		__u32 n, bucket;

		if (!g)
			return FS_FALLBACK;
		n = g->nbuckets;
		if (n == 0 || n > FS_GROUP_BUCKETS)
			return FS_FALLBACK;
		bucket = fs_hash_flow(p, l3) % n;
		/* clang proves the mask redundant and drops it; the verifier
		 * cannot follow the modulo and needs it */
		asm volatile("" : "+r"(bucket));
		nh_id = g->buckets[bucket & (FS_GROUP_BUCKETS - 1)];
	}

	/* A route may briefly name a nexthop the writer has not stored yet. */
	if (r->flags & FS_ROUTE_NH_COPY)
		nh = v4_nh.lookup(&nh_id);
	else
		nh = nexthops.lookup(&nh_id);
	if (!nh)
		return FS_FALLBACK;

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
		if (!ne) {
			fs_neigh_miss(nk.ifindex, nk.family, nk.addr);
			return FS_FALLBACK;
		}
		eg->dmac = ne->mac;
	} else if (nh->flags & FS_NH_RESOLVED) {
		eg->dmac = nh->dmac;
	} else {
		fs_neigh_miss(nh->ifindex, nh->family, nh->gateway);
		return FS_FALLBACK;
	}
	eg->ifindex = nh->ifindex;
	eg->mtu = nh->mtu;
	eg->smac = nh->smac;
	return FS_RESOLVED;
}

/* The route's verdict, or FS_FALLBACK when bpf_fib_lookup must decide. */
static __always_inline __u32 fs_route_verdict(struct fs_pkt *p, void *l3, const void *daddr,
					      struct fs_route *r)
{
	struct fs_egress eg = {};

	switch (r->action) {
	case FS_ACT_FORWARD:
		if (fs_route_egress(p, l3, daddr, r, &eg) != FS_RESOLVED)
			return FS_FALLBACK;
		return fs_xmit(p, l3, &eg, FS_REASON_FWD_FAST);
	case FS_ACT_DROP:
		return FS_VERDICT(XDP_DROP, FS_REASON_DROP_BLACKHOLE);
	case FS_ACT_KERNEL:
		if (r->reason >= FS_REASON_MAX)
			return FS_PASS(PASS_KERNEL_ROUTE);
		return FS_VERDICT(XDP_PASS, r->reason);
	default:
		return FS_FALLBACK;
	}
}

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

static __always_inline int fs_ipv4_martian(__be32 addr)
{
	__u8 first = ((__u8 *)&addr)[0];

	return first == 0 || first == 127;
}

static __always_inline __u32 fs_ipv4(struct fs_pkt *p, struct fs_cursor *c)
{
	struct iphdr *iph = fs_parse_ipv4(c);
	struct fs_config *cfg = fs_config_get();
	struct fs_route *r;
	__u32 v;

	if (!iph || iph->version != 4 || iph->ihl < 5)
		return FS_PASS(PASS_MALFORMED);
	p->l3_len = bpf_ntohs(iph->tot_len);
	if (p->l3_len < sizeof(*iph) || (void *)iph + p->l3_len > c->end)
		return FS_PASS(PASS_MALFORMED);
	if (iph->ihl != 5)
		return FS_PASS(PASS_IP_OPTIONS);
	/* 224/4 and limited broadcast; link-layer multicast was caught already */
	if ((((__u8 *)&iph->daddr)[0] & 0xf0) == 0xe0 || iph->daddr == 0xffffffff)
		return FS_PASS(PASS_MULTICAST);
	/* martians the kernel would drop: let it count them */
	if (fs_ipv4_martian(iph->saddr) || fs_ipv4_martian(iph->daddr) ||
	    (((__u8 *)&iph->saddr)[0] & 0xf0) == 0xe0 || iph->saddr == 0xffffffff)
		return FS_PASS(PASS_MALFORMED);

	p->proto = iph->protocol;
	p->hops = iph->ttl;
	p->l4 = c->pos;
	p->is_frag = (iph->frag_off & bpf_htons(FS_IP_MF | FS_IP_OFFSET)) != 0;
	if (p->is_frag && cfg && (cfg->flags & FS_CFG_PASS_FRAGMENTS))
		return FS_PASS(PASS_FRAGMENT);

	if (fs_stale())
		return fs_fib_v4(p, iph, FS_REASON_FWD_STALE);
	if (cfg && cfg->v4_table == FS_V4_DIR24) {
		r = fs_dir24_lookup(iph->daddr);
	} else {
		struct fs_v4_key key = { .prefixlen = 32 };

		__builtin_memcpy(key.addr, &iph->daddr, 4);
		r = routes_v4.lookup(&key);
	}
	if (r) {
		v = fs_route_verdict(p, iph, &iph->daddr, r);
		if (v != FS_FALLBACK)
			return v;
	}
	return fs_fib_v4(p, iph, FS_REASON_FWD_FIB);
}

static __always_inline int fs_ipv6_martian(const __u32 *a)
{
	if (a[0] | a[1])
		return 0;
	return (a[2] == 0 && a[3] == bpf_htonl(1)) || a[2] == bpf_htonl(0xffff);
}

static __always_inline __u32 fs_ipv6(struct fs_pkt *p, struct fs_cursor *c)
{
	struct ipv6hdr *ip6h = fs_parse_ipv6(c);
	struct fs_v6_key key;
	struct fs_route *r;
	__u8 *d, *s;
	__u32 v;

	if (!ip6h || ip6h->version != 6)
		return FS_PASS(PASS_MALFORMED);
	p->l3_len = sizeof(*ip6h) + bpf_ntohs(ip6h->payload_len);
	if ((void *)ip6h + p->l3_len > c->end)
		return FS_PASS(PASS_MALFORMED);
	d = ip6h->daddr.s6_addr;
	s = ip6h->saddr.s6_addr;
	if (d[0] == 0xff)
		return FS_PASS(PASS_MULTICAST);
	/* fe80::/10 either way: the kernel answers "beyond scope" */
	if ((d[0] == 0xfe && (d[1] & 0xc0) == 0x80) || (s[0] == 0xfe && (s[1] & 0xc0) == 0x80))
		return FS_PASS(PASS_LOCAL);
	/* martians ipv6_rcv() drops: multicast source, loopback, v4-mapped */
	if (s[0] == 0xff || fs_ipv6_martian((__u32 *)s) || fs_ipv6_martian((__u32 *)d))
		return FS_PASS(PASS_MALFORMED);
	if (ip6h->nexthdr == IPPROTO_HOPOPTS)
		return FS_PASS(PASS_IP_OPTIONS);

	p->proto = ip6h->nexthdr;
	p->hops = ip6h->hop_limit;
	p->l4 = c->pos;
	/* Only a fragment header right after the fixed header is seen: deeper
	 * ones carry no ports we could read anyway. */
	p->is_frag = ip6h->nexthdr == IPPROTO_FRAGMENT;
	if (p->is_frag) {
		struct fs_config *cfg = fs_config_get();

		if (cfg && (cfg->flags & FS_CFG_PASS_FRAGMENTS))
			return FS_PASS(PASS_FRAGMENT);
	}

	if (fs_stale())
		return fs_fib_v6(p, ip6h, FS_REASON_FWD_STALE);
	key.prefixlen = 128;
	__builtin_memcpy(key.addr, d, 16);
	r = routes_v6.lookup(&key);
	if (r) {
		v = fs_route_verdict(p, ip6h, d, r);
		if (v != FS_FALLBACK)
			return v;
	}
	return fs_fib_v6(p, ip6h, FS_REASON_FWD_FIB);
}

static __always_inline __u32 fs_process(struct xdp_md *ctx, void *data, void *data_end)
{
	struct fs_cursor c = { .pos = data, .end = data_end };
	struct fs_pkt p = { .ctx = ctx, .end = data_end };
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
	if (p.family == AF_INET)
		return fs_ipv4(&p, &c);
	return fs_ipv6(&p, &c);
}

int xdp_fibsync(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 v = fs_process(ctx, data, data_end);

	fs_count(v & 0xff, data_end - data);
	return v >> 8;
}
