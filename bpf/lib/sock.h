/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket-address translation for both families and both protocols: the work
 * behind connect4/6, sendmsg4/6, recvmsg4/6 and getpeername4/6 (bpf/sock_lb.c
 * holds only the entry points).
 *
 * Every address is handled in the 16-byte form of abi.h (IPv4 as ::ffff:a.b.c.d).
 * @v6 is a constant at every call site: the compiler keeps only the context
 * fields the entry point's attach type may touch (user_ip4 or user_ip6).
 */
#ifndef __KVR_SOCK_H
#define __KVR_SOCK_H

#include "compat.h"
#include "maps.h"
#include "lb.h"

#define SYS_REJECT	0
#define SYS_PROCEED	1
/* linux/socket.h values; the UAPI headers kvroute includes do not define them. */
#define KVR_AF_INET	2
#define KVR_AF_INET6	10

/* What the entry point that translates is: connect() records kvr_sock (for
 * getpeername and sockops), sendmsg() on an unconnected socket does not. */
enum sock_hook {
	SOCK_CONNECT = 0,
	SOCK_SENDMSG = 1,
};

static __always_inline bool sock_is_v4mapped(const __be32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == KVR_V4MAPPED_W2;
}

static __always_inline bool sock_addr_eq(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline void sock_set_v4mapped(__be32 *a, __be32 v4)
{
	a[0] = 0;
	a[1] = 0;
	a[2] = KVR_V4MAPPED_W2;
	a[3] = v4;
}

/* The context's user address (destination, or a datagram's source in recvmsg). */
static __always_inline void sock_ctx_addr(struct bpf_sock_addr *ctx, __be32 *a, const bool v6)
{
	if (v6) {
		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
	} else {
		sock_set_v4mapped(a, ctx->user_ip4);
	}
}

/* Write an address back; a v4 hook is only ever handed a v4-mapped one. */
static __always_inline void sock_ctx_set(struct bpf_sock_addr *ctx, const __be32 *a,
					 __be16 port, const bool v6)
{
	if (v6) {
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	} else {
		ctx->user_ip4 = a[3];
	}
	ctx->user_port = (__u32)port;
}

static __always_inline struct kvr_svc *sock_service(struct bpf_sock_addr *ctx,
						     struct kvr_l4_key *skey, const bool v6)
{
	sock_ctx_addr(ctx, skey->addr, v6);
	skey->port = (__be16)ctx->user_port;
	skey->proto = (__u8)ctx->protocol;
	return kvr_svc_v2.lookup(skey);
}

static __always_inline struct kvr_sk *sock_storage(struct bpf_sock *sk, bool create)
{
	if (!sk)
		return NULL;
	return kvr_sk.sk_storage_get(sk, NULL, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

/*
 * sock_backend_addr() - where the socket must send for this backend: its
 * IPv4 address (v4 mapped) when the VIP is IPv4, else its IPv6 address.
 * False when the backend has no address of that family.
 */
static __always_inline bool sock_backend_addr(const struct kvr_backend *be,
					      const struct kvr_l4_key *skey, __be32 *dst)
{
	if (sock_is_v4mapped(skey->addr)) {
		sock_set_v4mapped(dst, be->addr4);
		return be->addr4 != 0;
	}
	dst[0] = be->addr6[0];
	dst[1] = be->addr6[1];
	dst[2] = be->addr6[2];
	dst[3] = be->addr6[3];
	return (dst[0] | dst[1] | dst[2] | dst[3]) != 0;
}

/*
 * sock_udp_record() - remember that this UDP socket's datagrams to @skey go
 * to @dst:@port, so recvmsg can give replies the VIP as their source. One
 * slot per VIP: a new backend for the same VIP replaces the old one.
 */
static __always_inline void sock_udp_record(__u64 cookie, const struct kvr_l4_key *skey,
					    const __be32 *dst, __be16 port, __u32 be_id,
					    __u32 svc_id)
{
	struct kvr_udp *u = kvr_udp_v1.lookup(&cookie);
	struct kvr_udp_flow *f;
	__u32 zero = 0, i, slot = KVR_UDP_FLOWS;

	if (!u) {
		u = kvr_udp_tmpl.lookup(&zero);
		if (!u)
			return;
		__builtin_memset(u, 0, sizeof(*u));
		if (kvr_udp_v1.update(&cookie, u)) {
			kvr_reason_inc(KVR_R_NO_SK_STORAGE);
			return;
		}
		kvr_reason_inc(KVR_R_UDP_NEW);
		u = kvr_udp_v1.lookup(&cookie);
		if (!u)
			return;
	}
	for (i = 0; i < KVR_UDP_FLOWS; i++) {
		f = &u->flow[i];
		if (f->vport == skey->port && sock_addr_eq(f->vip, skey->addr)) {
			slot = i;
			break;
		}
	}
	if (slot == KVR_UDP_FLOWS) {
		slot = u->next % KVR_UDP_FLOWS;
		u->next = slot + 1;
		if (u->flow[slot].vport)
			kvr_reason_inc(KVR_R_UDP_RECYCLED);
	}
	if (slot >= KVR_UDP_FLOWS)
		return;	/* for the verifier */
	f = &u->flow[slot];
	f->vip[0] = skey->addr[0];
	f->vip[1] = skey->addr[1];
	f->vip[2] = skey->addr[2];
	f->vip[3] = skey->addr[3];
	f->be_addr[0] = dst[0];
	f->be_addr[1] = dst[1];
	f->be_addr[2] = dst[2];
	f->be_addr[3] = dst[3];
	f->vport = skey->port;
	f->be_port = port;
	f->be_id = be_id;
	f->svc_id = svc_id;
}

/*
 * sock_xlate_to() - send the connect or datagram to a chosen backend; with
 * @bind, record the binding first (the session leaves @prev, KVR_NO_BACKEND
 * if new).
 */
static __always_inline int sock_xlate_to(struct bpf_sock_addr *ctx, const struct kvr_svc *svc,
					 const struct kvr_l4_key *skey, __u64 key, __u32 be_id,
					 bool bind, __u32 prev, __u64 now, const bool v6,
					 const enum sock_hook hook)
{
	struct kvr_aff_key akey = { .svc_id = svc->id, .key = key };
	struct kvr_sock xl = {};
	struct kvr_backend *be;
	__be32 dst[4];
	__u64 cookie;

	if (be_id == KVR_NO_BACKEND) {
		kvr_svc_inc(svc->id, KVR_SC_NO_BACKEND);
		kvr_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	be = kvr_be_v2.lookup(&be_id);
	if (!be)
		return SYS_PROCEED;	/* removed under us: fail open */
	if (!sock_backend_addr(be, skey, dst)) {
		kvr_reason_inc(KVR_R_NO_FAMILY);
		return SYS_PROCEED;
	}

	if (bind)
		lb_affinity_bind(svc, &akey, be_id, prev, now);
	cookie = bpf_get_socket_cookie(ctx);
	if (hook == SOCK_CONNECT) {
		xl.vip[0] = skey->addr[0];
		xl.vip[1] = skey->addr[1];
		xl.vip[2] = skey->addr[2];
		xl.vip[3] = skey->addr[3];
		xl.vport = skey->port;
		xl.be_id = be_id;
		if (kvr_sock_v2.update(&cookie, &xl))
			kvr_reason_inc(KVR_R_NO_SK_STORAGE);
	}
	/* A connected UDP socket read with recvfrom() needs the reverse too. */
	if (skey->proto == IPPROTO_UDP)
		sock_udp_record(cookie, skey, dst, be->port, be_id, svc->id);
	sock_ctx_set(ctx, dst, be->port, v6);
	kvr_svc_inc(svc->id, KVR_SC_SELECTED);
	if (hook == SOCK_SENDMSG)
		kvr_svc_inc(svc->id, KVR_SC_DGRAMS);
	kvr_be_inc(be_id, KVR_BC_SELECTED);
	return SYS_PROCEED;
}

/*
 * sock_udp_sticky() - the backend an unconnected UDP socket's earlier
 * datagrams to this VIP went to, while it is usable: a socket's flow to a
 * VIP stays on one backend (as conntrack keeps a flow under kube-proxy), and
 * its replies keep matching the one reverse record. KVR_NO_BACKEND if none.
 */
static __always_inline __u32 sock_udp_sticky(__u64 cookie, const struct kvr_svc *svc,
					     const struct kvr_l4_key *skey)
{
	struct kvr_member_key mkey = { .svc_id = svc->id };
	struct kvr_udp *u = kvr_udp_v1.lookup(&cookie);
	struct kvr_udp_flow *f;
	__u32 i;

	if (!u)
		return KVR_NO_BACKEND;
	for (i = 0; i < KVR_UDP_FLOWS; i++) {
		f = &u->flow[i];
		if (f->vport != skey->port || !sock_addr_eq(f->vip, skey->addr))
			continue;
		mkey.be_id = f->be_id;
		if (!kvr_member.lookup(&mkey) || !lb_backend_usable(f->be_id, svc, false))
			return KVR_NO_BACKEND;
		return f->be_id;
	}
	return KVR_NO_BACKEND;
}

/* Jump to the entry point's own pick program (its attach type's array). */
static __always_inline void sock_tail_pick(struct bpf_sock_addr *ctx, const bool v6,
					   const enum sock_hook hook)
{
	if (hook == SOCK_CONNECT) {
		if (v6)
			kvr_pick_c6.call(ctx, KVR_PROG_PICK);
		else
			kvr_pick_c4.call(ctx, KVR_PROG_PICK);
	} else {
		if (v6)
			kvr_pick_s6.call(ctx, KVR_PROG_PICK);
		else
			kvr_pick_s4.call(ctx, KVR_PROG_PICK);
	}
}

/* Jump to the entry point's own walk program (from its pick program). */
static __always_inline void sock_tail_walk(struct bpf_sock_addr *ctx, const bool v6,
					   const enum sock_hook hook)
{
	if (hook == SOCK_CONNECT) {
		if (v6)
			kvr_walk_c6.call(ctx, KVR_PROG_PICK);
		else
			kvr_walk_c4.call(ctx, KVR_PROG_PICK);
	} else {
		if (v6)
			kvr_walk_s6.call(ctx, KVR_PROG_PICK);
		else
			kvr_walk_s4.call(ctx, KVR_PROG_PICK);
	}
}

/*
 * __sock_xlate_fwd() - translate a connect() or sendmsg() to a service VIP
 * into a backend.
 *
 * A live binding is used here, and a plain service's new session walks the
 * table here. A fleet service's new session (residency) and a session that
 * must move (its backend unusable or saturated) go to the entry point's pick
 * program, tail-called through its kvr_pick_* array with the hand-over in kvr_scratch: in
 * one program, those cases took the verifier past its 1M instruction budget.
 *
 * Returns SYS_PROCEED for everything kvroute does not own, and for every
 * translated call; SYS_REJECT (with ECONNREFUSED) only for a service whose
 * backends are all unusable, so the client fails fast instead of hanging.
 */
static __always_inline int __sock_xlate_fwd(struct bpf_sock_addr *ctx, const bool v6,
					    const enum sock_hook hook)
{
	struct kvr_l4_key skey = {};
	struct kvr_aff_key akey = {};
	__u32 be_id = KVR_NO_BACKEND, prev = KVR_NO_BACKEND, zero = 0;
	struct kvr_scratch *hand;
	struct kvr_pick pick;
	bool untagged = false;
	int how = LB_AFF_NEW;
	struct kvr_svc *svc;
	struct kvr_sk *sks;
	__u64 key, now;

	svc = sock_service(ctx, &skey, v6);
	if (!svc)
		return SYS_PROCEED;

	if (svc->flags & KVR_SVC_F_SATURATED) {
		kvr_svc_inc(svc->id, KVR_SC_SATURATED);
		kvr_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}

	now = bpf_ktime_get_ns();
	if (hook == SOCK_SENDMSG) {
		be_id = sock_udp_sticky(bpf_get_socket_cookie(ctx), svc, &skey);
		if (be_id != KVR_NO_BACKEND)
			return sock_xlate_to(ctx, svc, &skey, 0, be_id, false, KVR_NO_BACKEND,
					     now, v6, hook);
	}

	/* Only a tagged socket has storage: looking costs little, creating would
	 * cost every connect an allocation. */
	sks = svc->affinity == KVR_AFF_SESSION ? sock_storage(ctx->sk, false) : NULL;
	key = sock_session_key(ctx, svc, sks, &untagged);
	if (untagged)
		kvr_svc_inc(svc->id, KVR_SC_UNTAGGED);

	akey.svc_id = svc->id;
	akey.key = key;
	if (svc->affinity != KVR_AFF_NONE)
		be_id = lb_affinity_get(svc, &akey, now, &prev, &how);
	if (how == LB_AFF_HIT) {
		kvr_svc_inc(svc->id, KVR_SC_AFF_HIT);
		return sock_xlate_to(ctx, svc, &skey, key, be_id, false, KVR_NO_BACKEND, now,
				     v6, hook);
	}
	if (svc->affinity != KVR_AFF_NONE)
		kvr_svc_inc(svc->id, KVR_SC_AFF_MISS);
	if (how == LB_AFF_GONE)
		kvr_svc_inc(svc->id, KVR_SC_MOVED);
	if (how == LB_AFF_LOADED)
		kvr_svc_inc(svc->id, KVR_SC_MOVED_LOAD);

	/* The common case walks here: a plain service's new session. */
	if (how == LB_AFF_NEW && !(svc->flags & KVR_SVC_F_FLEET)) {
		pick = lb_maglev_pick(svc, key, svc->ident, KVR_NO_BACKEND);
		if (pick.spilled)
			kvr_svc_inc(svc->id, KVR_SC_SPILLED);
		return sock_xlate_to(ctx, svc, &skey, key, pick.be_id,
				     svc->affinity != KVR_AFF_NONE, KVR_NO_BACKEND, now, v6, hook);
	}

	hand = kvr_scratch.lookup(&zero);
	if (!hand) {
		kvr_reason_inc(KVR_R_NO_PICK);
		return SYS_PROCEED;
	}
	hand->cookie = bpf_get_socket_cookie(ctx);
	hand->key = key;
	hand->now = now;
	hand->prev = prev;
	hand->avoid = how == LB_AFF_LOADED ? prev : KVR_NO_BACKEND;
	sock_tail_pick(ctx, v6, hook);
	/* Only reached when the tail call failed: leave the socket alone. */
	kvr_reason_inc(KVR_R_NO_PICK);
	return SYS_PROCEED;
}

/*
 * sock_handover() - what the entry point handed over for this call: the
 * session key, its time, the binding left (@prev) and the backend to avoid.
 * False when there is no hand-over map. Another call on this CPU may have
 * overwritten the hand-over while this one was preempted: then the key is
 * derived again and the pick is as for a new session.
 */
static __always_inline bool sock_handover(struct bpf_sock_addr *ctx, const struct kvr_svc *svc,
					  __u64 *key, __u64 *now, __u32 *prev, __u32 *avoid)
{
	struct kvr_scratch *hand;
	bool untagged = false;
	__u32 zero = 0;

	hand = kvr_scratch.lookup(&zero);
	if (!hand)
		return false;
	if (hand->cookie == bpf_get_socket_cookie(ctx)) {
		*key = hand->key;
		*now = hand->now;
		*prev = hand->prev;
		*avoid = hand->avoid;
		return true;
	}
	kvr_reason_inc(KVR_R_HANDOVER);
	*key = sock_session_key(ctx, svc, svc->affinity == KVR_AFF_SESSION ?
				sock_storage(ctx->sk, false) : NULL, &untagged);
	*now = bpf_ktime_get_ns();
	*prev = *avoid = KVR_NO_BACKEND;
	return true;
}

/*
 * __sock_pick() - a fleet service's residency placement for a new session
 * or a session that moves; tail-called by an entry point only (its
 * kvr_pick_* array), never attached. Everything residency does not place
 * (and every plain service's move) goes on to the walk program.
 *
 * Two programs, not one: residency and the bounded-load walk each unroll
 * into many verifier states (a known loop index times the candidates seen so
 * far), and together they took the 5.10 and 6.1 verifiers past their 1M
 * instruction budget. Split, each stays well under it. The hand-over in
 * kvr_scratch is left as it is for the walk program.
 */
static __always_inline int __sock_pick(struct bpf_sock_addr *ctx, const bool v6,
				       const enum sock_hook hook)
{
	struct kvr_l4_key skey = {};
	__u32 prev, avoid, be_id;
	struct kvr_svc *svc;
	__u64 key, now;

	svc = sock_service(ctx, &skey, v6);
	if (!svc || !sock_handover(ctx, svc, &key, &now, &prev, &avoid)) {
		kvr_reason_inc(KVR_R_NO_PICK);
		return SYS_PROCEED;
	}
	if (svc->flags & KVR_SVC_F_FLEET) {
		/* A saturated session's move never lands on the backend it leaves. */
		be_id = lb_fleet_pick(svc, key, svc->ident, avoid);
		if (be_id != KVR_NO_BACKEND)
			return sock_xlate_to(ctx, svc, &skey, key, be_id,
					     svc->affinity != KVR_AFF_NONE, prev, now, v6, hook);
	}
	sock_tail_walk(ctx, v6, hook);
	/* Only reached when the tail call failed: leave the socket alone. */
	kvr_reason_inc(KVR_R_NO_PICK);
	return SYS_PROCEED;
}

/*
 * __sock_walk() - the bounded-load table walk for a pick residency did not
 * place; tail-called by a pick program only (its kvr_walk_* array).
 */
static __always_inline int __sock_walk(struct bpf_sock_addr *ctx, const bool v6,
				       const enum sock_hook hook)
{
	struct kvr_l4_key skey = {};
	__u32 prev, avoid;
	struct kvr_pick pick;
	struct kvr_svc *svc;
	__u64 key, now;
	bool bind;

	svc = sock_service(ctx, &skey, v6);
	if (!svc || !sock_handover(ctx, svc, &key, &now, &prev, &avoid)) {
		kvr_reason_inc(KVR_R_NO_PICK);
		return SYS_PROCEED;
	}
	/* A saturated session's move never lands on the backend it leaves... */
	pick = lb_maglev_pick(svc, key, svc->ident, avoid);
	if (pick.spilled)
		kvr_svc_inc(svc->id, KVR_SC_SPILLED);
	bind = pick.be_id != KVR_NO_BACKEND && svc->affinity != KVR_AFF_NONE;
	if (pick.be_id == KVR_NO_BACKEND)
		pick.be_id = avoid;	/* ...and stays where nothing else is usable. */
	return sock_xlate_to(ctx, svc, &skey, key, pick.be_id, bind, prev, now, v6, hook);
}

/* getpeername: applications keep seeing the VIP they connected to. */
static __always_inline int __sock_peer_rev(struct bpf_sock_addr *ctx, const bool v6)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct kvr_sock *xl = kvr_sock_v2.lookup(&cookie);

	if (xl) {
		sock_ctx_set(ctx, xl->vip, xl->vport, v6);
		kvr_reason_inc(KVR_R_REVERSED);
	}
	return SYS_PROCEED;
}

/*
 * __sock_recv_rev() - a datagram from a backend this socket sent to through
 * a VIP reads as coming from the VIP (recvfrom/recvmsg source address).
 */
static __always_inline int __sock_recv_rev(struct bpf_sock_addr *ctx, const bool v6)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct kvr_udp *u = kvr_udp_v1.lookup(&cookie);
	struct kvr_udp_flow *f;
	__be32 src[4];
	__be16 port;
	__u32 i;

	if (!u)
		return SYS_PROCEED;
	sock_ctx_addr(ctx, src, v6);
	port = (__be16)ctx->user_port;
	for (i = 0; i < KVR_UDP_FLOWS; i++) {
		f = &u->flow[i];
		if (f->vport && f->be_port == port && sock_addr_eq(f->be_addr, src)) {
			sock_ctx_set(ctx, f->vip, f->vport, v6);
			kvr_svc_inc_live(f->svc_id, KVR_SC_REPLIES);
			break;
		}
	}
	return SYS_PROCEED;
}

/*
 * __sock_release() - a closing socket's translation records go with it:
 * a UDP socket's always (nothing else ever sees it close), a TCP socket's
 * only if it never got past CLOSE (sockops deletes the others when TCP
 * reaches CLOSE, after counting the outcome against the backend).
 */
static __always_inline int __sock_release(struct bpf_sock *sk)
{
	__u64 cookie;

	if (sk->protocol == IPPROTO_UDP) {
		cookie = bpf_get_socket_cookie(sk);
		if (!kvr_udp_v1.delete(&cookie))
			kvr_reason_inc(KVR_R_UDP_FREED);
		kvr_sock_v2.delete(&cookie);
	} else if (sk->protocol == IPPROTO_TCP && sk->state == BPF_TCP_CLOSE) {
		cookie = bpf_get_socket_cookie(sk);
		kvr_sock_v2.delete(&cookie);
	}
	return SYS_PROCEED;
}

#endif /* __KVR_SOCK_H */
