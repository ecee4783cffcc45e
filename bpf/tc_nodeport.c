/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Packet-path entry points (tc clsact, direct action) for traffic from outside the
 * node: NodePort, externalIPs, LoadBalancer IPs. Ingress on the node's external
 * interface(s) starts and follows flows (and takes SNATed replies from other nodes);
 * egress translates the replies of local backends back to the frontend.
 * The logic lives in lib/nodeport.h and lib/conntrack.h.
 */
#define ENABLE_NODEPORT

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/abi.h"
#include "lib/maps.h"
#include "lib/nodeport.h"

int tc_np4_ingress(struct __sk_buff *skb)
{
	return np4_handle(skb, true);
}

int tc_np4_egress(struct __sk_buff *skb)
{
	return np4_handle(skb, false);
}

/* The stages of a new flow, tail-called in turn through kvr_np_progs; never attached. */
int tc_np4_new(struct __sk_buff *skb)
{
	return np4_choose(skb);
}

int tc_np4_pick(struct __sk_buff *skb)
{
	return np4_pick_more(skb);
}

int tc_np4_local(struct __sk_buff *skb)
{
	return np4_pick_local(skb);
}

int tc_np4_nat(struct __sk_buff *skb)
{
	return np4_nat(skb);
}
