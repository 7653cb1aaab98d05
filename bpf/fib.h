/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Lookup by bpf_fib_lookup, the kernel's own FIB and neighbour table: on a
 * miss in the fast path's tables, for what they cannot say, and for
 * everything while they are stale. As in cilium's bpf/lib/fib.h, the lookup
 * only finds the egress (or the kernel's refusal); fs_redirect sends.
 */
#ifndef FIBSYNC_FIB_H
#define FIBSYNC_FIB_H

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

static __always_inline void fs_fib_params_v4(struct fs_pkt *p, struct iphdr *iph,
					     struct bpf_fib_lookup *fib)
{
	fib->family = AF_INET;
	fib->tos = iph->tos;
	fib->tot_len = p->l3_len;
	fib->ifindex = p->ctx->ingress_ifindex;
	fib->ipv4_src = iph->saddr;
	fib->ipv4_dst = iph->daddr;
	fs_fib_ports(p, fib);
}

static __always_inline void fs_fib_params_v6(struct fs_pkt *p, struct ipv6hdr *ip6h,
					     struct bpf_fib_lookup *fib)
{
	fib->family = AF_INET6;
	fib->flowinfo = *(__be32 *)ip6h & bpf_htonl(0x0FFFFFFF);
	fib->tot_len = p->l3_len;
	fib->ifindex = p->ctx->ingress_ifindex;
	__builtin_memcpy(fib->ipv6_src, &ip6h->saddr, 16);
	__builtin_memcpy(fib->ipv6_dst, &ip6h->daddr, 16);
	fs_fib_ports(p, fib);
}

/*
 * The kernel's own route and neighbour for *fib: true with *eg filled (the
 * MTU already checked against tot_len), false with *v the kernel's refusal.
 */
#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2) /* Linux 6.3; the build may use older headers */
#endif

/*
 * Under policy rules, the source as fib_validate_source() checks it then (a
 * "full check"): its route, found through the rules, must be unicast; under
 * strict rp_filter, via the ingress interface. bpf_fib_lookup finds it (the
 * kernel's check looks up from lo, this one from the ingress interface: the
 * daemon hands rules with an iif selector to the kernel instead).
 */
static __always_inline bool fs_fib_source_v4(struct fs_pkt *p, struct iphdr *iph, __u32 *reason)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	fib.family = AF_INET;
	fib.tos = iph->tos;
	fib.tot_len = p->l3_len;
	fib.ifindex = p->ctx->ingress_ifindex;
	fib.ipv4_src = iph->daddr;
	fib.ipv4_dst = iph->saddr;
	rc = bpf_fib_lookup(p->ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS &&
	    (!(p->ifc->flags & FS_IF_RPF_STRICT) || fib.ifindex == p->ctx->ingress_ifindex))
		return true;
	/* local (NOT_FWDED), blackhole, unreachable, no route: the kernel decides */
	*reason = FS_REASON_PASS_RP_FILTER;
	return false;
}

static __always_inline bool fs_fib_lookup(struct fs_pkt *p, struct bpf_fib_lookup *fib,
					  struct fs_egress *eg, struct fs_verdict *v)
{
	switch (bpf_fib_lookup(p->ctx, fib, sizeof(*fib), 0)) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		eg->ifindex = fib->ifindex;
		eg->smac = fib->smac;
		eg->dmac = fib->dmac;
		return true;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
		*v = fs_verdict(XDP_DROP, FS_REASON_DROP_BLACKHOLE);
		return false;
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		*v = FS_PASS(PASS_UNREACHABLE);
		return false;
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		*v = FS_PASS(PASS_NO_ROUTE);
		return false;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		*v = FS_PASS(PASS_NO_NEIGH);
		return false;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		*v = FS_PASS(PASS_MTU);
		return false;
	default:
		*v = FS_PASS(PASS_FIB_OTHER);
		return false;
	}
}

#endif /* FIBSYNC_FIB_H */
