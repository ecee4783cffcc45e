/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Socket load balancing entry points, IPv4 and IPv6: connect picks and
 * rewrites (TCP and connected UDP), sendmsg does the same per datagram of an
 * unconnected UDP socket, recvmsg and getpeername reverse it, sock_release
 * forgets a closed socket, setsockopt catches the session tag. The logic
 * lives in lib/sock.h and lib/lb.h.
 *
 * A v6 entry point also serves IPv4 through IPv4-mapped addresses
 * (::ffff:a.b.c.d on an AF_INET6 socket): the maps hold IPv4 in that form, so
 * the lookup is the same and the rewrite stays mapped. A dual-stack socket's
 * unconnected datagram to ::ffff:VIP is seen by sendmsg4 (the kernel hands
 * it to the IPv4 path first).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/errno.h>

#include "lib/abi.h"
#include "lib/compat.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/sock.h"

int sock4_connect(struct bpf_sock_addr *ctx)
{
	return __sock_xlate_fwd(ctx, false, SOCK_CONNECT);
}

int sock6_connect(struct bpf_sock_addr *ctx)
{
	return __sock_xlate_fwd(ctx, true, SOCK_CONNECT);
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return __sock_xlate_fwd(ctx, false, SOCK_SENDMSG);
}

int sock6_sendmsg(struct bpf_sock_addr *ctx)
{
	return __sock_xlate_fwd(ctx, true, SOCK_SENDMSG);
}

/* Pick programs: tail-called by the entry point of the same attach type only. */
int sock4_pick(struct bpf_sock_addr *ctx)
{
	return __sock_pick(ctx, false, SOCK_CONNECT);
}

int sock6_pick(struct bpf_sock_addr *ctx)
{
	return __sock_pick(ctx, true, SOCK_CONNECT);
}

int udp4_pick(struct bpf_sock_addr *ctx)
{
	return __sock_pick(ctx, false, SOCK_SENDMSG);
}

int udp6_pick(struct bpf_sock_addr *ctx)
{
	return __sock_pick(ctx, true, SOCK_SENDMSG);
}

/* Walk programs: tail-called by the pick program of the same attach type only. */
int sock4_walk(struct bpf_sock_addr *ctx)
{
	return __sock_walk(ctx, false, SOCK_CONNECT);
}

int sock6_walk(struct bpf_sock_addr *ctx)
{
	return __sock_walk(ctx, true, SOCK_CONNECT);
}

int udp4_walk(struct bpf_sock_addr *ctx)
{
	return __sock_walk(ctx, false, SOCK_SENDMSG);
}

int udp6_walk(struct bpf_sock_addr *ctx)
{
	return __sock_walk(ctx, true, SOCK_SENDMSG);
}

int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return __sock_recv_rev(ctx, false);
}

int sock6_recvmsg(struct bpf_sock_addr *ctx)
{
	return __sock_recv_rev(ctx, true);
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return __sock_peer_rev(ctx, false);
}

int sock6_getpeername(struct bpf_sock_addr *ctx)
{
	return __sock_peer_rev(ctx, true);
}

int sock_release(struct bpf_sock *sk)
{
	return __sock_release(sk);
}

/*
 * sock_setsockopt() - catch setsockopt(SOL_KVROUTE, KVROUTE_SESSION, u64).
 *
 * The tag goes to socket storage; optlen = -1 tells the kernel to skip its
 * own handling (it would reject the unknown level). Everything else passes.
 * Refused where kvroute cannot route the socket, so a client learns at once
 * that its tag has no effect: ENOPROTOOPT on a socket that is not IPv4 or
 * IPv6 (AF_UNIX), EINVAL on one already connected (connect4/6 has run) and
 * for tag 0 (the value meaning "no session" in the maps).
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
	sks = sock_storage(ctx->sk, true);
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
