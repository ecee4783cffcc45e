/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The packet path for traffic from outside the node (NodePort, externalIPs,
 * LoadBalancer IPs): parse, follow a tracked flow, or start one by picking a backend
 * from the same tables as connect4 (lib/lb.h) and writing both conntrack entries.
 *
 * Fails open for what kvroute does not own: a packet that is not to a frontend, not
 * IPv4, a fragment or malformed passes untouched and writes no conntrack entry. A
 * frontend packet that cannot be sent anywhere (no usable backend, no SNAT port, a
 * failed rewrite) is dropped and counted.
 */
#ifndef __KVR_NODEPORT_H
#define __KVR_NODEPORT_H

#include "maps.h"
#include "hash.h"
#include "lb.h"
#include "conntrack.h"

#ifndef KVR_SNAT_TRIES
#define KVR_SNAT_TRIES 32	/* random SNAT ports tried before a new flow is dropped */
#endif
/* A closed flow's SNAT port may go to a new flow once the closed flow has been quiet
 * this long: its last ACK has long passed, and holding the port for the whole close
 * lifetime capped a remote backend's new flows at range / KVR_CT_CLOSE_S a second. */
#ifndef KVR_SNAT_REUSE_S
#define KVR_SNAT_REUSE_S 1
#endif

#define KVR_ETH_HLEN	14
#define KVR_IP_OFF	KVR_ETH_HLEN
#define KVR_IP_CSUM	(KVR_IP_OFF + 10)
#define KVR_IP_SADDR	(KVR_IP_OFF + 12)
#define KVR_IP_DADDR	(KVR_IP_OFF + 16)
#define KVR_IP_MF	0x2000
#define KVR_IP_OFFMASK	0x1fff

static __always_inline void np_reason_inc(__u32 reason)
{
	u64 *v = kvr_np_reasons.lookup(&reason);

	if (v)
		*v += 1;
}

static __always_inline void np_svc_inc(__u32 svc_id, __u32 slot)
{
	struct kvr_np_cnt_val zero = {};
	struct kvr_np_cnt_val *v = kvr_np_cnt.lookup_or_try_init(&svc_id, &zero);

	if (v && slot < KVR_NPC_MAX)
		v->c[slot] += 1;
}

/*
 * np4_parse() - the tuple of an IPv4 TCP/UDP frame. Returns false (counted) for
 * anything the packet path leaves alone: not IPv4, bad header, fragment, truncated.
 */
static __always_inline bool np4_parse(struct __sk_buff *skb, struct kvr_pkt4 *p)
{
	struct iphdr ip;
	__u8 l4[14];
	__u32 ihl;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		np_reason_inc(KVR_NPR_NOT_IP);
		return false;
	}
	if (bpf_skb_load_bytes(skb, KVR_IP_OFF, &ip, sizeof(ip))) {
		np_reason_inc(KVR_NPR_TRUNCATED);
		return false;
	}
	ihl = ip.ihl * 4;
	if (ip.version != 4 || ihl < sizeof(ip) || bpf_ntohs(ip.tot_len) < ihl ||
	    KVR_IP_OFF + bpf_ntohs(ip.tot_len) > skb->len) {
		np_reason_inc(KVR_NPR_MALFORMED);
		return false;
	}
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return false;
	/* Only a first fragment carries ports, and its rewrite would not reach the rest:
	 * fragments are the stack's (it reassembles what is addressed to the node). */
	if (ip.frag_off & bpf_htons(KVR_IP_MF | KVR_IP_OFFMASK)) {
		np_reason_inc(KVR_NPR_FRAGMENT);
		return false;
	}
	p->l4_off = KVR_IP_OFF + ihl;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->proto = ip.protocol;
	p->tcp_flags = 0;
	/* TCP: ports, seq, ack, data offset and flags (14 bytes); UDP: its 8-byte header. */
	if (ip.protocol == IPPROTO_TCP) {
		if (bpf_ntohs(ip.tot_len) < ihl + 20 ||
		    bpf_skb_load_bytes(skb, p->l4_off, l4, 14)) {
			np_reason_inc(KVR_NPR_TRUNCATED);
			return false;
		}
		p->tcp_flags = l4[13];
	} else if (bpf_ntohs(ip.tot_len) < ihl + 8 || bpf_skb_load_bytes(skb, p->l4_off, l4, 8)) {
		np_reason_inc(KVR_NPR_TRUNCATED);
		return false;
	}
	__builtin_memcpy(&p->sport, &l4[0], 2);
	__builtin_memcpy(&p->dport, &l4[2], 2);
	return true;
}

/*
 * np4_frontend() - the frontend a packet is addressed to, or NULL. The one place that
 * knows the frontend key's shape: keys are kvr_l4_key, so an IPv4 frontend is held in
 * the 16-byte form of every map (::ffff:a.b.c.d, abi.h). A NodePort is
 * (::ffff:0.0.0.0, port, proto) and answers on the node's own addresses only
 * (kvr_np_addr, like kube-proxy's --nodeport-addresses); an external or LoadBalancer
 * IP is its own (address, port, proto).
 */
static __always_inline struct kvr_np_fe *np4_frontend(const struct kvr_pkt4 *p)
{
	struct kvr_l4_key key = {
		.addr = { 0, 0, KVR_V4MAPPED_W2, p->daddr },
		.port = p->dport,
		.proto = p->proto,
	};
	struct kvr_np_fe *fe = kvr_np_fe_v1.lookup(&key);
	__be32 daddr = p->daddr;

	if (fe || !kvr_np_addr.lookup(&daddr))
		return fe;
	key.addr[3] = 0;	/* the NodePort key: the v4-mapped unspecified address */
	return kvr_np_fe_v1.lookup(&key);
}

/* The backend is on this node: no SNAT, and an externalTrafficPolicy: Local choice. */
static __always_inline bool np_backend_local(const struct kvr_np_local *loc, __u32 be_id)
{
	__u32 i;

	if (!loc)
		return false;
	for (i = 0; i < KVR_NP_LOCAL_MAX; i++) {
		if (i >= loc->n)
			break;
		if (loc->be_id[i] == be_id)
			return true;
	}
	return false;
}

/*
 * np_pick_local() - externalTrafficPolicy: Local: the key's own entry of the local list
 * if usable, else the first usable one in list order. Plain modular hashing: the list
 * is short and node-local, and tracked flows never move when it changes. (A rotation
 * from the key's entry gave the verifier a state per index range: too complex.)
 */
static __always_inline __u32 np_pick_local(const struct kvr_svc *svc,
					   const struct kvr_np_local *loc, __u64 key, __u64 ident)
{
	__u32 i, n, id;

	if (!loc || loc->n == 0)
		return KVR_NO_BACKEND;
	n = loc->n < KVR_NP_LOCAL_MAX ? loc->n : KVR_NP_LOCAL_MAX;
	i = kvr_slot_hash(key, ident, 0) % n;
	/* Hidden from the compiler (it knows i < n and would drop the mask), so that the
	 * verifier sees the bound. */
	asm volatile("" : "+r"(i));
	id = loc->be_id[i & (KVR_NP_LOCAL_MAX - 1)];
	if (lb_backend_usable(id, svc, true))
		return id;
	for (i = 0; i < KVR_NP_LOCAL_MAX; i++) {
		if (i >= n)
			break;
		id = loc->be_id[i];
		if (lb_backend_usable(id, svc, true))
			return id;
	}
	return KVR_NO_BACKEND;
}

static __always_inline int np4_set_addr(struct __sk_buff *skb, const struct kvr_pkt4 *p,
					__u32 off, __be32 from, __be32 to)
{
	__u32 csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
	__u64 l4_flags = BPF_F_PSEUDO_HDR | sizeof(to) |
			 (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);

	if (bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags) ||
	    bpf_l3_csum_replace(skb, KVR_IP_CSUM, from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

static __always_inline int np4_set_port(struct __sk_buff *skb, const struct kvr_pkt4 *p,
					__u32 off, __be16 from, __be16 to)
{
	__u32 csum_off = p->l4_off + (p->proto == IPPROTO_TCP ? 16 : 6);
	__u64 l4_flags = sizeof(to) | (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);

	if (bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags))
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

/* bpf_redirect_neigh as 5.11+ declares it (bcc's declaration is older). On 5.10 the
 * helper takes (ifindex, flags): NULL lands in flags as 0, the rest is ignored. */
static long (*kvr_redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

/*
 * np4_forward() - send a translated ingress packet on its way. A packet whose source
 * became one of the node's own addresses (SNAT, or a reply from the node's NodePort)
 * would be dropped by the stack's input route as a martian, so it is routed here: a
 * FIB lookup, then bpf_redirect with the neighbour's MAC, or bpf_redirect_neigh (5.10)
 * when the neighbour is not resolved yet. Any other packet goes to the stack, which
 * routes it (and a packet for a local pod needs nothing more).
 */
static __always_inline int np4_forward(struct __sk_buff *skb, const struct kvr_ct *ct,
				       __u8 dir, bool ingress)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	if (!ingress || !(ct->flags & KVR_CT_F_SRC))
		return TC_ACT_OK;
	fib.family = 2;	/* AF_INET */
	fib.l4_protocol = 0;
	fib.ipv4_src = ct->nat_saddr[0];
	fib.ipv4_dst = ct->flags & KVR_CT_F_DST ? ct->nat_daddr[0] : 0;
	if (!fib.ipv4_dst) {
		if (bpf_skb_load_bytes(skb, KVR_IP_DADDR, &fib.ipv4_dst, 4))
			return TC_ACT_OK;
	}
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) ||
		    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0))
			return TC_ACT_SHOT;
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return kvr_redirect_neigh(fib.ifindex, NULL, 0, 0);
	np_reason_inc(KVR_NPR_NO_ROUTE);
	return TC_ACT_OK;
}

/* Rewrite a packet as its conntrack entry says; checksums follow. */
static __always_inline int np4_rewrite(struct __sk_buff *skb, const struct kvr_pkt4 *p,
				       const struct kvr_ct *ct)
{
	if (ct->flags & KVR_CT_F_SRC) {
		if (np4_set_addr(skb, p, KVR_IP_SADDR, p->saddr, ct->nat_saddr[0]) ||
		    np4_set_port(skb, p, p->l4_off, p->sport, ct->nat_sport))
			return -1;
	}
	if (ct->flags & KVR_CT_F_DST) {
		if (np4_set_addr(skb, p, KVR_IP_DADDR, p->daddr, ct->nat_daddr[0]) ||
		    np4_set_port(skb, p, p->l4_off + 2, p->dport, ct->nat_dport))
			return -1;
	}
	return 0;
}

/*
 * np4_snat_port() - reserve a source port on the SNAT address for a flow to a remote
 * backend: the reply entry is inserted only where none lives (BPF_NOEXIST), so two
 * flows never share the tuple the backend answers to. A dead entry, or a closed flow
 * quiet for KVR_SNAT_REUSE_S, is taken over (with the old flow's ORIG entry removed).
 * Returns the port (network order) or 0.
 */
static __always_inline __be16 np4_snat_port(const struct kvr_np_cfg *cfg,
					    struct kvr_ct_key *rkey, struct kvr_ct *rval,
					    __u64 now)
{
	__u32 range = cfg->snat_max >= cfg->snat_min ? cfg->snat_max - cfg->snat_min + 1 : 0;
	struct kvr_ct_key okey;
	struct kvr_ct *old;
	__be16 port;
	__u32 i;

	if (!range || !cfg->snat_min)
		return 0;
	for (i = 0; i < KVR_SNAT_TRIES; i++) {
		port = bpf_htons(cfg->snat_min + bpf_get_prandom_u32() % range);
		rkey->dport = port;
		if (!kvr_ct_v1.insert(rkey, rval))
			return port;
		old = kvr_ct_v1.lookup(rkey);
		if (old && (!ct_alive(old, now) ||
			    ((old->flags & KVR_CT_F_CLOSING) &&
			     now - old->last_ns > KVR_SNAT_REUSE_S * KVR_NS_PER_SEC))) {
			/* The old flow's ORIG entry goes with it: it would SNAT to this
			 * port, and forgetting it later would take this flow's entry. */
			ct4_key(&okey, old->nat_daddr[0], old->nat_saddr[0], old->nat_dport,
				old->nat_sport, rkey->proto, KVR_CT_ORIG);
			kvr_ct_v1.delete(&okey);
			kvr_ct_v1.update(rkey, rval);
			np_reason_inc(KVR_NPR_EXPIRED);
			return port;
		}
	}
	return 0;
}

static __always_inline struct kvr_np_scratch *np_scratch(void)
{
	__u32 zero = 0;

	return kvr_np_scratch.lookup(&zero);
}

/* The service a stage works for, from the hand-over; NULL (counted) when it is gone. */
static __always_inline struct kvr_svc *np_stage_service(struct kvr_np_scratch *s)
{
	struct kvr_svc *svc = kvr_svc_v2.lookup(&s->fe.svc);

	if (!svc)
		np_reason_inc(KVR_NPR_NO_SERVICE);
	return svc;
}

/* Hand a new flow to its next stage; returns only when the tail call failed. */
static __always_inline int np_next(struct __sk_buff *skb, __u32 stage)
{
	kvr_np_progs.call(skb, stage);
	np_reason_inc(KVR_NPR_NO_PROG);
	return TC_ACT_OK;
}

/*
 * np4_choose() - stage KVR_NP_PROG_NEW: the backend of a new flow, as connect4 would
 * choose for this service (affinity, the same Maglev table and identity, bounded load,
 * states), with the client's address as the `client` key (a packet has no network
 * namespace; `session` falls back to it: a packet carries no tag).
 *
 * As on the socket path, a live binding and a plain service's new session are decided
 * here; a fleet service's placement and a session that must move go on to
 * np4_pick_more (one program for all of it exceeds the verifier's limits).
 */
static __always_inline int np4_choose(struct __sk_buff *skb)
{
	struct kvr_np_scratch *s = np_scratch();
	__u32 prev = KVR_NO_BACKEND, be_id;
	struct kvr_aff_key akey = {};
	int how = LB_AFF_NEW;
	struct kvr_pick pick;
	struct kvr_svc *svc;
	__u64 key;

	if (!s)
		return TC_ACT_OK;
	svc = np_stage_service(s);
	if (!svc)
		return TC_ACT_OK;
	s->svc_id = svc->id;
	s->be_id = KVR_NO_BACKEND;
	if (s->pkt.proto == IPPROTO_TCP &&
	    (s->pkt.tcp_flags & (KVR_TCP_SYN | KVR_TCP_ACK)) != KVR_TCP_SYN)
		np_svc_inc(svc->id, KVR_NPC_MIDFLOW);
	if (svc->flags & KVR_SVC_F_SATURATED)
		return np_next(skb, KVR_NP_PROG_NAT);
	key = svc->affinity == KVR_AFF_NONE ?
	      ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32() :
	      KVR_AFF_KEY_IP4(s->pkt.saddr);
	s->key = key;
	if (s->fe.flags & KVR_NP_F_LOCAL)
		return np_next(skb, KVR_NP_PROG_LOCAL);
	akey.svc_id = svc->id;
	akey.key = key;
	if (svc->affinity != KVR_AFF_NONE) {
		be_id = lb_affinity_get(svc, &akey, s->now, &prev, &how);
		if (how == LB_AFF_HIT) {
			np_svc_inc(svc->id, KVR_NPC_AFF_HIT);
			s->be_id = be_id;
			return np_next(skb, KVR_NP_PROG_NAT);
		}
	}
	if (how == LB_AFF_NEW && !(svc->flags & KVR_SVC_F_FLEET)) {
		pick = lb_maglev_pick(svc, key, svc->ident, KVR_NO_BACKEND);
		if (pick.be_id != KVR_NO_BACKEND && svc->affinity != KVR_AFF_NONE)
			lb_affinity_bind(svc, &akey, pick.be_id, KVR_NO_BACKEND, s->now);
		s->be_id = pick.be_id;
		return np_next(skb, KVR_NP_PROG_NAT);
	}
	s->prev = prev;
	s->avoid = how == LB_AFF_LOADED ? prev : KVR_NO_BACKEND;
	return np_next(skb, KVR_NP_PROG_PICK);
}

/*
 * np4_pick_local() - stage KVR_NP_PROG_LOCAL: externalTrafficPolicy: Local picks among
 * the node's own backends, and keeps no binding (a binding may name a backend on
 * another node).
 */
static __always_inline int np4_pick_local(struct __sk_buff *skb)
{
	struct kvr_np_scratch *s = np_scratch();
	struct kvr_svc *svc;

	if (!s)
		return TC_ACT_OK;
	svc = np_stage_service(s);
	if (!svc)
		return TC_ACT_OK;
	s->be_id = np_pick_local(svc, kvr_np_local_v1.lookup(&s->svc_id), s->key,
				 svc->ident);
	return np_next(skb, KVR_NP_PROG_NAT);
}

/* np4_pick_more() - stage KVR_NP_PROG_PICK: sock4_pick's walk for a new flow. */
static __always_inline int np4_pick_more(struct __sk_buff *skb)
{
	struct kvr_np_scratch *s = np_scratch();
	struct kvr_aff_key akey = {};
	struct kvr_pick pick;
	struct kvr_svc *svc;

	if (!s)
		return TC_ACT_OK;
	svc = np_stage_service(s);
	if (!svc)
		return TC_ACT_OK;
	/* Residency first for a fleet service, as __sock_pick; the walk decides
	 * what it does not place. One stage holds both: tc programs verified on
	 * 6.18 only so far (the socket path splits them for 5.10 and 6.1). */
	pick.be_id = KVR_NO_BACKEND;
	pick.spilled = 0;
	if (svc->flags & KVR_SVC_F_FLEET)
		pick.be_id = lb_fleet_pick(svc, s->key, svc->ident, s->avoid);
	if (pick.be_id == KVR_NO_BACKEND)
		pick = lb_maglev_pick(svc, s->key, svc->ident, s->avoid);
	akey.svc_id = svc->id;
	akey.key = s->key;
	if (pick.be_id != KVR_NO_BACKEND && svc->affinity != KVR_AFF_NONE)
		lb_affinity_bind(svc, &akey, pick.be_id, s->prev, s->now);
	/* A saturated session stays where nothing else is usable. */
	s->be_id = pick.be_id != KVR_NO_BACKEND ? pick.be_id : s->avoid;
	return np_next(skb, KVR_NP_PROG_NAT);
}

/*
 * np4_nat() - stage KVR_NP_PROG_NAT: write the reply entry (with its SNAT port when the
 * backend is remote) and then the forward one, and rewrite the packet.
 */
static __always_inline int np4_nat(struct __sk_buff *skb)
{
	struct kvr_np_scratch *s = np_scratch();
	struct kvr_np_local *loc;
	struct kvr_np_cfg *cfg;
	struct kvr_backend *be;
	struct kvr_pkt4 *p;
	__u32 be_id, zero = 0;
	__be16 sport;
	bool local;

	if (!s)
		return TC_ACT_OK;
	p = &s->pkt;
	be_id = s->be_id;
	be = be_id == KVR_NO_BACKEND ? NULL : kvr_be_v2.lookup(&be_id);
	/* The packet path rewrites IPv4 headers: a backend without an IPv4 address (the
	 * model gives a service with a NodePort or external IP none) cannot take it. */
	if (!be || !be->addr4) {
		np_svc_inc(s->svc_id, KVR_NPC_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	loc = kvr_np_local_v1.lookup(&s->svc_id);
	local = np_backend_local(loc, be_id);
	__builtin_memset(&s->fval, 0, sizeof(s->fval));
	__builtin_memset(&s->rval, 0, sizeof(s->rval));
	s->fval.svc_id = s->rval.svc_id = s->svc_id;
	s->fval.be_id = s->rval.be_id = be_id;
	s->fval.created_ns = s->rval.created_ns = s->now;
	s->fval.last_ns = s->rval.last_ns = s->now;
	s->fval.lifetime_s = s->rval.lifetime_s = ct_lifetime(p->proto, 0);
	/* Forward: to the backend. Reply: from the frontend. */
	s->fval.flags = KVR_CT_F_DST;
	s->fval.nat_daddr[0] = be->addr4;
	s->fval.nat_dport = be->port;
	s->rval.flags = KVR_CT_F_SRC;
	s->rval.nat_saddr[0] = p->daddr;
	s->rval.nat_sport = p->dport;
	ct4_key(&s->rkey, be->addr4, p->saddr, be->port, p->sport, p->proto, KVR_CT_REPLY);
	if (local) {
		kvr_ct_v1.update(&s->rkey, &s->rval);
	} else {
		/* A remote backend answers the node, which then answers the client. */
		cfg = kvr_np_cfg.lookup(&zero);
		if (!cfg || !cfg->snat_addr) {
			np_reason_inc(KVR_NPR_NO_SNAT_ADDR);
			return TC_ACT_OK;
		}
		s->rval.flags |= KVR_CT_F_DST;
		s->rval.nat_daddr[0] = p->saddr;
		s->rval.nat_dport = p->sport;
		s->rkey.daddr[0] = cfg->snat_addr;
		sport = np4_snat_port(cfg, &s->rkey, &s->rval, s->now);
		if (!sport) {
			np_reason_inc(KVR_NPR_NO_SNAT_PORT);
			return TC_ACT_SHOT;
		}
		s->fval.flags |= KVR_CT_F_SRC;
		s->fval.nat_saddr[0] = cfg->snat_addr;
		s->fval.nat_sport = sport;
	}
	ct4_key(&s->fkey, p->saddr, p->daddr, p->sport, p->dport, p->proto, KVR_CT_ORIG);
	s->fval.packets = 1;
	if (kvr_ct_v1.update(&s->fkey, &s->fval)) {
		kvr_ct_v1.delete(&s->rkey);
		np_reason_inc(KVR_NPR_CT_FULL);
		return TC_ACT_SHOT;
	}
	np_svc_inc(s->svc_id, KVR_NPC_NEW);
	np_svc_inc(s->svc_id, local ? KVR_NPC_LOCAL : KVR_NPC_SNAT);
	np_svc_inc(s->svc_id, KVR_NPC_FWD);
	if (np4_rewrite(skb, p, &s->fval)) {
		np_reason_inc(KVR_NPR_REWRITE);
		return TC_ACT_SHOT;
	}
	return np4_forward(skb, &s->fval, KVR_CT_ORIG, true);
}

/*
 * np4_follow() - a packet of a tracked flow, in direction @dir: rewrite as its entry
 * says; its last packet (RST, or after both FINs the close lifetime) ends the flow.
 */
static __always_inline int np4_follow(struct __sk_buff *skb, const struct kvr_pkt4 *p,
				      const struct kvr_ct_key *key, struct kvr_ct *ct, __u8 dir,
				      __u64 now, bool ingress)
{
	struct kvr_ct_key partner;
	struct kvr_ct copy;
	bool closing = ct->flags & KVR_CT_F_CLOSING;
	bool ends;

	ct4_partner(&partner, p, ct, dir);
	ends = ct4_track(ct, &partner, p->proto, p->tcp_flags, dir, now);
	np_svc_inc(ct->svc_id, dir == KVR_CT_ORIG ? KVR_NPC_FWD : KVR_NPC_REV);
	if (ends || (!closing && (ct->flags & KVR_CT_F_CLOSING)))
		np_svc_inc(ct->svc_id, KVR_NPC_CLOSED);
	/* The entry may go (RST) before the rewrite reads it. */
	__builtin_memcpy(&copy, ct, sizeof(copy));
	if (ends)
		ct4_forget(key, &partner);
	if (np4_rewrite(skb, p, &copy)) {
		np_reason_inc(KVR_NPR_REWRITE);
		return TC_ACT_SHOT;
	}
	return np4_forward(skb, &copy, dir, ingress);
}

/*
 * np4_handle() - the packet path. @new_flows: this attach point may start flows
 * (ingress from outside; it also routes what it translates, np4_forward); egress only
 * translates replies of tracked flows.
 *
 * A new flow continues through the stages tc_np4_new -> (tc_np4_pick) -> tc_np4_nat,
 * tail calls with the state in kvr_np_scratch: following flows, picking and writing
 * entries in one program took the verifier past its limits (jump sequences).
 */
static __always_inline int np4_handle(struct __sk_buff *skb, bool new_flows)
{
	struct kvr_ct_key key;
	struct kvr_ct_key partner;
	struct kvr_np_scratch *s;
	struct kvr_pkt4 p = {};
	struct kvr_np_fe *fe;
	struct kvr_ct *ct;
	__u64 now;

	if (!np4_parse(skb, &p))
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	ct4_key(&key, p.saddr, p.daddr, p.sport, p.dport, p.proto, KVR_CT_REPLY);
	ct = kvr_ct_v1.lookup(&key);
	if (ct && ct_alive(ct, now)) {
		/* A SYN-ACK on a closed flow's reply tuple answers another connection
		 * (the client reached the pod directly from the same port): not ours. */
		if (!(p.proto == IPPROTO_TCP && (ct->flags & (KVR_CT_F_FIN | KVR_CT_F_CLOSING)) &&
		      (p.tcp_flags & (KVR_TCP_SYN | KVR_TCP_ACK)) == (KVR_TCP_SYN | KVR_TCP_ACK)))
			return np4_follow(skb, &p, &key, ct, KVR_CT_REPLY, now, new_flows);
		ct4_partner(&partner, &p, ct, KVR_CT_REPLY);
		ct4_forget(&key, &partner);
		np_reason_inc(KVR_NPR_EXPIRED);
		return TC_ACT_OK;
	}
	key.dir = KVR_CT_ORIG;
	ct = kvr_ct_v1.lookup(&key);
	if (ct) {
		/* A SYN on a closed flow's tuple (the client reused its port within the
		 * close lifetime) is a new connection: a new pick, a new SNAT port. */
		if (ct_alive(ct, now) && !(p.proto == IPPROTO_TCP &&
					   (ct->flags & KVR_CT_F_CLOSING) &&
					   (p.tcp_flags & (KVR_TCP_SYN | KVR_TCP_ACK)) == KVR_TCP_SYN))
			return np4_follow(skb, &p, &key, ct, KVR_CT_ORIG, now, new_flows);
		/* Dead or closed: this packet starts a new flow. The old reply entry goes
		 * too (it holds the SNAT port). */
		ct4_partner(&partner, &p, ct, KVR_CT_ORIG);
		ct4_forget(&key, &partner);
		np_reason_inc(KVR_NPR_EXPIRED);
	}
	if (!new_flows)
		return TC_ACT_OK;
	fe = np4_frontend(&p);
	if (!fe)
		return TC_ACT_OK;
	s = np_scratch();
	if (!s)
		return TC_ACT_OK;
	s->pkt = p;
	s->fe = *fe;
	s->now = now;
	return np_next(skb, KVR_NP_PROG_NEW);
}

#endif /* __KVR_NODEPORT_H */
