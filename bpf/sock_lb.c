/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket load balancing entry points: connect4 picks and rewrites,
 * getpeername4 reverses, setsockopt catches the session tag.
 * The logic lives in lib/lb.h.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/errno.h>

#include "lib/abi.h"
#include "lib/compat.h"
#include "lib/maps.h"
#include "lib/lb.h"

#define SYS_REJECT	0
#define SYS_PROCEED	1
/* linux/socket.h values; the UAPI headers kvroute includes do not define them. */
#define KVR_AF_INET	2
#define KVR_AF_INET6	10

static __always_inline struct kvr_sk *sock4_storage(struct bpf_sock *sk, bool create)
{
	if (!sk)
		return NULL;
	return kvr_sk.sk_storage_get(sk, NULL, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

static __always_inline struct kvr_svc *sock4_service(struct bpf_sock_addr *ctx,
						      struct kvr_l4_key *skey)
{
	skey->addr = ctx->user_ip4;
	skey->port = (__be16)ctx->user_port;
	skey->proto = (__u8)ctx->protocol;
	return kvr_svc_v1.lookup(skey);
}

/*
 * sock4_xlate_to() - send the connect to a chosen backend; with @bind, record
 * the binding first (the session leaves @prev, KVR_NO_BACKEND if new).
 */
static __always_inline int sock4_xlate_to(struct bpf_sock_addr *ctx, const struct kvr_svc *svc,
					  const struct kvr_l4_key *skey, __u64 key, __u32 be_id,
					  bool bind, __u32 prev, __u64 now)
{
	struct kvr_aff_key akey = { .svc_id = svc->id, .key = key };
	struct kvr_sock xl = {};
	struct kvr_backend *be;
	__u64 cookie;

	if (be_id == KVR_NO_BACKEND) {
		kvr_svc_inc(svc->id, KVR_SC_NO_BACKEND);
		kvr_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	be = kvr_be_v1.lookup(&be_id);
	if (!be)
		return SYS_PROCEED;	/* removed under us: fail open */

	if (bind)
		lb_affinity_bind(svc, &akey, be_id, prev, now);
	xl.vip = skey->addr;
	xl.vport = skey->port;
	xl.be_id = be_id;
	cookie = bpf_get_socket_cookie(ctx);
	if (kvr_sock.update(&cookie, &xl))
		kvr_reason_inc(KVR_R_NO_SK_STORAGE);
	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	kvr_svc_inc(svc->id, KVR_SC_SELECTED);
	kvr_be_inc(be_id, KVR_BC_SELECTED);
	return SYS_PROCEED;
}

/*
 * __sock4_xlate_fwd() - translate a connect() to a service VIP into a backend.
 *
 * A live binding is used here, and a plain service's new session walks the
 * table here (as cheap as before fleet bindings existed). A fleet service's
 * new session (residency) and a session that must move (its backend unusable
 * or saturated) go to sock4_pick, tail-called with the hand-over in
 * kvr_scratch: in one program, those cases took the verifier past its 1M
 * instruction budget.
 *
 * Returns SYS_PROCEED for everything kvroute does not own, and for every
 * translated connect; SYS_REJECT (with ECONNREFUSED) only for a service whose
 * backends are all unusable, so the client fails fast instead of hanging.
 */
static __always_inline int __sock4_xlate_fwd(struct bpf_sock_addr *ctx)
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

	svc = sock4_service(ctx, &skey);
	if (!svc)
		return SYS_PROCEED;

	if (svc->flags & KVR_SVC_F_SATURATED) {
		kvr_svc_inc(svc->id, KVR_SC_SATURATED);
		kvr_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}

	/* Only a tagged socket has storage: looking costs little, creating would
	 * cost every connect an allocation. */
	sks = svc->affinity == KVR_AFF_SESSION ? sock4_storage(ctx->sk, false) : NULL;
	key = sock4_session_key(ctx, svc, sks, &untagged);
	if (untagged)
		kvr_svc_inc(svc->id, KVR_SC_UNTAGGED);

	now = bpf_ktime_get_ns();
	akey.svc_id = svc->id;
	akey.key = key;
	if (svc->affinity != KVR_AFF_NONE)
		be_id = lb_affinity_get(svc, &akey, now, &prev, &how);
	if (how == LB_AFF_HIT) {
		kvr_svc_inc(svc->id, KVR_SC_AFF_HIT);
		return sock4_xlate_to(ctx, svc, &skey, key, be_id, false, KVR_NO_BACKEND, now);
	}
	if (svc->affinity != KVR_AFF_NONE)
		kvr_svc_inc(svc->id, KVR_SC_AFF_MISS);
	if (how == LB_AFF_GONE)
		kvr_svc_inc(svc->id, KVR_SC_MOVED);
	if (how == LB_AFF_LOADED)
		kvr_svc_inc(svc->id, KVR_SC_MOVED_LOAD);

	/* The common case walks here: a plain service's new session. */
	if (how == LB_AFF_NEW && !(svc->flags & KVR_SVC_F_FLEET)) {
		pick = lb_maglev_pick(svc, key, kvr_svc_ident(&skey), KVR_NO_BACKEND, false);
		if (pick.spilled)
			kvr_svc_inc(svc->id, KVR_SC_SPILLED);
		return sock4_xlate_to(ctx, svc, &skey, key, pick.be_id,
				      svc->affinity != KVR_AFF_NONE, KVR_NO_BACKEND, now);
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
	kvr_progs.call(ctx, KVR_PROG_PICK);
	/* Only reached when the tail call failed: leave the socket alone. */
	kvr_reason_inc(KVR_R_NO_PICK);
	return SYS_PROCEED;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
	return __sock4_xlate_fwd(ctx);
}

/*
 * sock4_pick() - the table walk for a fleet service's new session or a
 * session that moves; tail-called by connect4 only (kvr_progs), never
 * attached.
 */
int sock4_pick(struct bpf_sock_addr *ctx)
{
	struct kvr_l4_key skey = {};
	__u32 zero = 0, prev, avoid;
	struct kvr_scratch *hand;
	bool bind, untagged = false;
	struct kvr_pick pick;
	struct kvr_svc *svc;
	__u64 key, now;

	svc = sock4_service(ctx, &skey);
	hand = kvr_scratch.lookup(&zero);
	if (!svc || !hand) {
		kvr_reason_inc(KVR_R_NO_PICK);
		return SYS_PROCEED;
	}
	if (hand->cookie == bpf_get_socket_cookie(ctx)) {
		key = hand->key;
		now = hand->now;
		prev = hand->prev;
		avoid = hand->avoid;
	} else {
		/* Another connect on this CPU overwrote the hand-over while this
		 * one was preempted: derive the key again, pick as for a new
		 * session. */
		kvr_reason_inc(KVR_R_HANDOVER);
		key = sock4_session_key(ctx, svc, svc->affinity == KVR_AFF_SESSION ?
					sock4_storage(ctx->sk, false) : NULL, &untagged);
		now = bpf_ktime_get_ns();
		prev = avoid = KVR_NO_BACKEND;
	}
	/* A saturated session's move never lands on the backend it leaves... */
	pick = lb_maglev_pick(svc, key, kvr_svc_ident(&skey), avoid,
			      svc->flags & KVR_SVC_F_FLEET);
	if (pick.spilled)
		kvr_svc_inc(svc->id, KVR_SC_SPILLED);
	bind = pick.be_id != KVR_NO_BACKEND && svc->affinity != KVR_AFF_NONE;
	if (pick.be_id == KVR_NO_BACKEND)
		pick.be_id = avoid;	/* ...and stays where nothing else is usable. */
	return sock4_xlate_to(ctx, svc, &skey, key, pick.be_id, bind, prev, now);
}

/* Applications keep seeing the VIP they connected to. */
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct kvr_sock *xl = kvr_sock.lookup(&cookie);

	if (xl) {
		ctx->user_ip4 = xl->vip;
		ctx->user_port = (__u32)xl->vport;
		kvr_reason_inc(KVR_R_REVERSED);
	}
	return SYS_PROCEED;
}

/*
 * sock_setsockopt() - catch setsockopt(SOL_KVROUTE, KVROUTE_SESSION, u64).
 *
 * The tag goes to socket storage; optlen = -1 tells the kernel to skip its
 * own handling (it would reject the unknown level). Everything else passes.
 * Refused where kvroute cannot route the socket, so a client learns at once
 * that its tag has no effect: ENOPROTOOPT on a socket that is not IPv4 or
 * IPv6 (AF_UNIX), EINVAL on one already connected (connect4 has run) and for
 * tag 0 (the value meaning "no session" in the maps).
 */
int sock_setsockopt(struct bpf_sockopt *ctx)
{
	void *optval = ctx->optval, *optval_end = ctx->optval_end;
	struct kvr_sk *sks;
	__u64 session;

	if (ctx->level != KVR_SOL_KVROUTE)
		return SYS_PROCEED;
	if (ctx->optname != KVR_SO_SESSION || ctx->optlen != sizeof(__u64) ||
	    optval + sizeof(__u64) > optval_end) {
		kvr_reason_inc(KVR_R_BAD_SOCKOPT);
		kvr_set_retval(-EINVAL);
		return SYS_REJECT;
	}
	session = *(__u64 *)optval;
	if (!ctx->sk || (ctx->sk->family != KVR_AF_INET &&
			    ctx->sk->family != KVR_AF_INET6)) {
		kvr_reason_inc(KVR_R_BAD_SOCKOPT);
		kvr_set_retval(-ENOPROTOOPT);
		return SYS_REJECT;
	}
	if (session == 0 || ctx->sk->state != BPF_TCP_CLOSE) {
		kvr_reason_inc(KVR_R_BAD_SOCKOPT);
		kvr_set_retval(-EINVAL);
		return SYS_REJECT;
	}
	sks = sock4_storage(ctx->sk, true);
	if (!sks) {
		kvr_reason_inc(KVR_R_NO_SK_STORAGE);
		kvr_set_retval(-ENOMEM);
		return SYS_REJECT;
	}
	sks->session = session;
	ctx->optlen = -1;
	kvr_reason_inc(KVR_R_TAGGED);
	return SYS_PROCEED;
}
