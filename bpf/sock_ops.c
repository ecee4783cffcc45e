/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops entry point: per-backend connect, failure, establish and close
 * counters, RTT, and the kernel breaker trip. Logic in lib/health.h.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "lib/abi.h"
#include "lib/maps.h"
#include "lib/lb.h"
#include "lib/health.h"

int sock_ops(struct bpf_sock_ops *skops)
{
	__u64 cookie;
	__u32 be_id;

	if (skops->family != 2 /* AF_INET */ && skops->family != 10 /* AF_INET6 */)
		return 1;
	cookie = bpf_get_socket_cookie(skops);
	be_id = ops4_backend(cookie);
	if (be_id == KVR_NO_BACKEND)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		kvr_be_inc(be_id, KVR_BC_CONNECTS);
		/* Ask for state changes on this socket: the only way to see a
		 * refused or timed-out connect. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					  BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		/* srtt_us is kept <<3 by TCP. */
		ops4_established(be_id, skops->srtt_us >> 3);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		if (skops->args[0] == BPF_TCP_SYN_SENT)
			ops4_connect_failed(be_id);
		else
			kvr_be_inc(be_id, KVR_BC_CLOSED);
		kvr_sock_v2.delete(&cookie);
		break;
	}
	return 1;
}
