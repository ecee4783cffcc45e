/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The kernel's own view of backend health, fed by sockops: connect outcomes,
 * smoothed RTT, and the breaker trip after KVR_FAIL_K consecutive failed
 * connects. User space (the controller's breaker) is the one that clears a
 * trip again.
 */
#ifndef __KVR_HEALTH_H
#define __KVR_HEALTH_H

#include "maps.h"
#include "stats.h"

#ifndef KVR_FAIL_K
#define KVR_FAIL_K 3
#endif

/*
 * ops4_backend() - the backend a socket was sent to by connect4/6, if any.
 *
 * connect4/6 record its choice under the socket's cookie, so sockops needs no
 * address-to-backend map, and sockets kvroute did not translate cost one
 * lookup. A backend removed since is skipped.
 */
static __always_inline __u32 ops4_backend(__u64 cookie)
{
	struct kvr_sock *xl = kvr_sock_v2.lookup(&cookie);
	__u32 be_id;

	if (!xl)
		return KVR_NO_BACKEND;
	be_id = xl->be_id;
	if (!kvr_be_v2.lookup(&be_id))
		return KVR_NO_BACKEND;
	return be_id;
}

static __always_inline void ops4_connect_failed(__u32 be_id)
{
	struct kvr_health zero = {};
	struct kvr_health *h = kvr_health.lookup_or_try_init(&be_id, &zero);
	__u32 fails;

	kvr_be_inc(be_id, KVR_BC_FAILED);
	if (!h)
		return;
	/* Older BPF ISAs cannot return the fetched value of an atomic add. */
	__sync_fetch_and_add(&h->consec_fail, 1);
	fails = h->consec_fail;
	if (fails >= KVR_FAIL_K && !(h->flags & KVR_HEALTH_TRIPPED)) {
		h->flags |= KVR_HEALTH_TRIPPED;
		h->tripped_ns = bpf_ktime_get_ns();
		kvr_be_inc(be_id, KVR_BC_TRIPS);
	}
}

static __always_inline void ops4_established(__u32 be_id, __u32 srtt_us)
{
	struct kvr_health zero = {};
	struct kvr_health *h = kvr_health.lookup_or_try_init(&be_id, &zero);

	kvr_be_inc(be_id, KVR_BC_ESTABLISHED);
	if (!h)
		return;
	h->consec_fail = 0;
	/* EWMA with gain 1/8, as TCP smooths its own RTT. */
	h->srtt_us = h->srtt_us ? h->srtt_us - (h->srtt_us >> 3) + (srtt_us >> 3) : srtt_us;
}

#endif /* __KVR_HEALTH_H */
