/* SPDX-License-Identifier: GPL-2.0 */
/* ECMP: the flow hash that picks a group's bucket; the tables' Fibonacci hashing. */
#ifndef FIBSYNC_HASH_H
#define FIBSYNC_HASH_H

/* Fibonacci hashing: the top ``bits`` of x * mult (mod 2^32), as abi.fibonacci_hash
 * computes it for the daemon (local_v4's bits, v6_lengths' slots). */
static __always_inline __u32 fs_fibonacci_hash(__u32 x, __u32 mult, __u32 bits)
{
	return (x * mult) >> (32 - bits);
}

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

/* The flow's hash under the family's policy (fs_config.hash_policy_v4/v6). */
static __always_inline __u32 fs_hash_flow(struct fs_pkt *p, void *l3)
{
	__u32 h = 0;

	if (p->family == AF_INET) {
		struct iphdr *iph = l3;

		h = fs_hash_mix(h, iph->saddr);
		h = fs_hash_mix(h, iph->daddr);
		if (p->cfg.hash_policy_v4 == FS_HASH_L4)
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
		if (p->cfg.hash_policy_v6 == FS_HASH_L4) {
			h = fs_hash_ports(p, h);
		} else {
			/* the kernel's L3 policy for IPv6 adds flow label and next header */
			h = fs_hash_mix(h, *(__be32 *)ip6h & bpf_htonl(0x000FFFFF));
			h = fs_hash_mix(h, p->proto);
		}
	}
	return fs_hash_final(h);
}

#endif /* FIBSYNC_HASH_H */
