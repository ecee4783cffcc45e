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

/*
 * __sock4_xlate_fwd() - translate a connect() to a service VIP into a backend.
 *
 * Returns SYS_PROCEED for everything kvroute does not own, and for every
 * translated connect; SYS_REJECT (with ECONNREFUSED) only for a service whose
 * backends are all unusable, so the client fails fast instead of hanging.
 */
static __always_inline int __sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct kvr_l4_key skey = {
		.addr	= ctx->user_ip4,
		.port	= (__be16)ctx->user_port,
		.proto	= (__u8)ctx->protocol,
	};
	struct kvr_aff_key akey = {};
	struct kvr_aff_val aval = {};
	struct kvr_pick pick = { .be_id = KVR_NO_BACKEND };
	bool untagged = false, moved = false;
	struct kvr_sock xl = {};
	struct kvr_backend *be;
	struct kvr_svc *svc;
	struct kvr_sk *sks;
	__u64 key, now, cookie;

	svc = kvr_svc_v1.lookup(&skey);
	if (!svc)
		return SYS_PROCEED;

	if (svc->flags & KVR_SVC_F_SATURATED) {
		kvr_svc_inc(svc->id, KVR_SC_SATURATED);
		bpf_set_retval(-ECONNREFUSED);
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
	if (svc->affinity != KVR_AFF_NONE) {
		pick.be_id = lb_affinity_get(svc, &akey, now, &moved);
		if (moved)
			kvr_svc_inc(svc->id, KVR_SC_MOVED);
	}
	if (pick.be_id != KVR_NO_BACKEND) {
		kvr_svc_inc(svc->id, KVR_SC_AFF_HIT);
	} else {
		if (svc->affinity != KVR_AFF_NONE)
			kvr_svc_inc(svc->id, KVR_SC_AFF_MISS);
		pick = lb_maglev_pick(svc, key, kvr_svc_ident(&skey));
		if (pick.spilled)
			kvr_svc_inc(svc->id, KVR_SC_SPILLED);
	}

	if (pick.be_id == KVR_NO_BACKEND) {
		kvr_svc_inc(svc->id, KVR_SC_NO_BACKEND);
		bpf_set_retval(-ECONNREFUSED);
		return SYS_REJECT;
	}
	be = kvr_be_v1.lookup(&pick.be_id);
	if (!be)
		return SYS_PROCEED;	/* removed under us: fail open */

	if (svc->affinity != KVR_AFF_NONE) {
		aval.be_id = pick.be_id;
		aval.last_ns = now;
		kvr_affinity.update(&akey, &aval);
	}
	xl.vip = skey.addr;
	xl.vport = skey.port;
	xl.be_id = pick.be_id;
	cookie = bpf_get_socket_cookie(ctx);
	if (kvr_sock.update(&cookie, &xl))
		kvr_reason_inc(KVR_R_NO_SK_STORAGE);
	ctx->user_ip4 = be->addr;
	ctx->user_port = (__u32)be->port;
	kvr_svc_inc(svc->id, KVR_SC_SELECTED);
	kvr_be_inc(pick.be_id, KVR_BC_SELECTED);
	return SYS_PROCEED;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
	return __sock4_xlate_fwd(ctx);
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
		bpf_set_retval(-EINVAL);
		return SYS_REJECT;
	}
	session = *(__u64 *)optval;
	if (!ctx->sk || (ctx->sk->family != KVR_AF_INET &&
			    ctx->sk->family != KVR_AF_INET6)) {
		kvr_reason_inc(KVR_R_BAD_SOCKOPT);
		bpf_set_retval(-ENOPROTOOPT);
		return SYS_REJECT;
	}
	if (session == 0 || ctx->sk->state != BPF_TCP_CLOSE) {
		kvr_reason_inc(KVR_R_BAD_SOCKOPT);
		bpf_set_retval(-EINVAL);
		return SYS_REJECT;
	}
	sks = sock4_storage(ctx->sk, true);
	if (!sks) {
		kvr_reason_inc(KVR_R_NO_SK_STORAGE);
		bpf_set_retval(-ENOMEM);
		return SYS_REJECT;
	}
	sks->session = session;
	ctx->optlen = -1;
	kvr_reason_inc(KVR_R_TAGGED);
	return SYS_PROCEED;
}
