/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The program's own types (fibsync.h holds those shared with user space):
 * the verdict every packet ends in, the packet's facts, and the egress a
 * lookup finds for the redirect.
 */
#ifndef FIBSYNC_TYPES_H
#define FIBSYNC_TYPES_H

/* The one verdict type: what happens to the frame, and the reason it is counted under. */
struct fs_verdict {
	__u32 action; /* XDP_PASS, XDP_DROP or XDP_REDIRECT */
	__u32 reason; /* enum fs_reason */
};

static __always_inline struct fs_verdict fs_verdict(__u32 action, __u32 reason)
{
	struct fs_verdict v = { .action = action, .reason = reason };

	return v;
}

static __always_inline struct fs_verdict fs_pass(__u32 reason)
{
	return fs_verdict(XDP_PASS, reason);
}

#define FS_PASS(name) fs_pass(FS_REASON_##name)

/* Where the packet goes once the next hop is known: what a lookup finds. */
struct fs_egress {
	__u32 ifindex;
	__u32 mtu; /* L3; 0 = already checked (bpf_fib_lookup) or unknown */
	const __u8 *smac;
	const __u8 *dmac;
};

/* fs_trust(): how far the daemon's promises (struct fs_heartbeat) stand. */
enum fs_trust {
	FS_TRUST_TABLES = 0, /* tables and conditions follow the kernel */
	FS_TRUST_FIB = 1,    /* conditions only: bpf_fib_lookup alone (FWD_STALE) */
	FS_TRUST_NONE = 2,   /* no daemon follows the kernel: to the kernel */
};

/* Header facts the forwarding decision needs, family independent. */
struct fs_pkt {
	struct xdp_md *ctx;
	struct ethhdr *eth;
	void *l4;
	void *end;
	struct fs_config cfg; /* this packet's copy of fs_config */
	const struct fs_iface *ifc; /* its ingress interface's conditions (`ifaces`) */
	__u32 l3_len;
	__u8 proto;
	__u8 hops; /* TTL or hop limit */
	__u8 is_frag;
	__u8 family;
	__u8 trust; /* fs_trust(): how far the daemon's promises stand */
};

#endif /* FIBSYNC_TYPES_H */
