/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking for the packet path: two kvr_ct_v1 entries per flow, one per
 * direction, each keyed by the tuple its packets arrive with and saying how to rewrite
 * them. Entries die by idle time (a lifetime by TCP state, checked on lookup), by RST,
 * and by a FIN from each side (then a short close lifetime); the LRU drops the least
 * recently used flow when the table is full.
 */
#ifndef __KVR_CONNTRACK_H
#define __KVR_CONNTRACK_H

#include "maps.h"

/* Idle lifetimes, seconds (build-time options, as the agent's -D flags). The defaults
 * are Cilium's: a half-open TCP flow 60 s, an established one 6 h, a closing one 10 s,
 * any UDP flow 60 s. */
#ifndef KVR_CT_SYN_S
#define KVR_CT_SYN_S 60
#endif
#ifndef KVR_CT_TCP_S
#define KVR_CT_TCP_S 21600
#endif
#ifndef KVR_CT_CLOSE_S
#define KVR_CT_CLOSE_S 10
#endif
#ifndef KVR_CT_UDP_S
#define KVR_CT_UDP_S 60
#endif

#define KVR_TCP_FIN	0x01
#define KVR_TCP_SYN	0x02
#define KVR_TCP_RST	0x04
#define KVR_TCP_ACK	0x10

static __always_inline void ct4_key(struct kvr_ct_key *k, __be32 saddr, __be32 daddr,
				    __be16 sport, __be16 dport, __u8 proto, __u8 dir)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->saddr[0] = saddr;
	k->daddr[0] = daddr;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->family = 4;
	k->dir = dir;
}

/* The idle lifetime an entry with these flags gets. */
static __always_inline __u32 ct_lifetime(__u8 proto, __u32 flags)
{
	if (proto != IPPROTO_TCP)
		return KVR_CT_UDP_S;
	if (flags & KVR_CT_F_CLOSING)
		return KVR_CT_CLOSE_S;
	if (flags & KVR_CT_F_SEEN_REPLY)
		return KVR_CT_TCP_S;
	return KVR_CT_SYN_S;
}

static __always_inline bool ct_alive(const struct kvr_ct *ct, __u64 now)
{
	return now - ct->last_ns <= (__u64)ct->lifetime_s * KVR_NS_PER_SEC;
}

/*
 * ct4_partner() - the key of the other direction's entry, from a packet's tuple after
 * its rewrite: the other direction's packets arrive with it reversed.
 */
static __always_inline void ct4_partner(struct kvr_ct_key *k, const struct kvr_pkt4 *p,
					const struct kvr_ct *ct, __u8 dir)
{
	__be32 saddr = ct->flags & KVR_CT_F_SRC ? ct->nat_saddr[0] : p->saddr;
	__be32 daddr = ct->flags & KVR_CT_F_DST ? ct->nat_daddr[0] : p->daddr;
	__be16 sport = ct->flags & KVR_CT_F_SRC ? ct->nat_sport : p->sport;
	__be16 dport = ct->flags & KVR_CT_F_DST ? ct->nat_dport : p->dport;

	ct4_key(k, daddr, saddr, dport, sport, p->proto,
		dir == KVR_CT_ORIG ? KVR_CT_REPLY : KVR_CT_ORIG);
}

/*
 * ct4_track() - account a packet of a tracked flow to its entry (and, when the flow
 * changes state, to the other direction's). Returns true when the flow ends with this
 * packet (RST, or the last FIN's close is due): the caller translates the packet, then
 * ct4_forget()s both entries.
 */
static __always_inline bool ct4_track(struct kvr_ct *ct, const struct kvr_ct_key *partner,
				      __u8 proto, __u8 tcp_flags, __u8 dir, __u64 now)
{
	struct kvr_ct *other;
	__u32 flags = ct->flags;

	ct->last_ns = now;
	ct->packets += 1;
	if (proto != IPPROTO_TCP) {
		if (dir == KVR_CT_REPLY && !(flags & KVR_CT_F_SEEN_REPLY)) {
			ct->flags = flags | KVR_CT_F_SEEN_REPLY;
			other = kvr_ct_v1.lookup((void *)partner);
			if (other)
				other->flags |= KVR_CT_F_SEEN_REPLY;
		}
		return false;
	}
	if (tcp_flags & KVR_TCP_RST)
		return true;
	/* The first answer makes the flow established in both directions. */
	if (dir == KVR_CT_REPLY && !(flags & KVR_CT_F_SEEN_REPLY)) {
		flags |= KVR_CT_F_SEEN_REPLY;
		other = kvr_ct_v1.lookup((void *)partner);
		if (other) {
			other->flags |= KVR_CT_F_SEEN_REPLY;
			other->lifetime_s = ct_lifetime(proto, other->flags);
		}
	}
	if (tcp_flags & KVR_TCP_FIN) {
		flags |= KVR_CT_F_FIN;
		other = kvr_ct_v1.lookup((void *)partner);
		if (other && (other->flags & KVR_CT_F_FIN)) {
			flags |= KVR_CT_F_CLOSING;
			other->flags |= KVR_CT_F_CLOSING;
			other->lifetime_s = ct_lifetime(proto, other->flags);
		}
	}
	ct->flags = flags;
	ct->lifetime_s = ct_lifetime(proto, flags);
	return false;
}

static __always_inline void ct4_forget(const struct kvr_ct_key *key,
				       const struct kvr_ct_key *partner)
{
	kvr_ct_v1.delete((void *)key);
	kvr_ct_v1.delete((void *)partner);
}

#endif /* __KVR_CONNTRACK_H */
