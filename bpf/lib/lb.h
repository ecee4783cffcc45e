/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connect-time backend selection: session key, affinity, weighted Maglev
 * table, bounded load, backend state. Everything here fails open: when
 * kvroute's own state is missing the socket is left alone.
 */
#ifndef __KVR_LB_H
#define __KVR_LB_H

#include "maps.h"
#include "hash.h"
#include "stats.h"

/* Distinct usable backends compared by the bounded-load check before the
 * least loaded of them is taken. */
#ifndef KVR_CANDIDATES
#define KVR_CANDIDATES 4
#endif

/* Hashed slots tried per pick, usable or not: enough that a table in which
 * the kernel has tripped most backends (user space has not rebuilt it yet)
 * still finds a live one. */
#define KVR_WALK 32

#define KVR_NO_BACKEND 0xffffffffU
#define KVR_NS_PER_SEC 1000000000ULL

/* What a pick produced, beyond the backend id. */
struct kvr_pick {
	__u32	be_id;
	__u32	spilled;	/* the owner was over the load bound */
};

/**
 * sock4_session_key() - the key that picks a backend for this connect.
 * @ctx: the connect context
 * @svc: the service hit
 * @sk_state: the socket's storage, if any
 * @untagged: set when session mode fell back to the client identity
 */
static __always_inline __u64 sock4_session_key(struct bpf_sock_addr *ctx,
					       const struct kvr_svc *svc,
					       const struct kvr_sk *sk_state,
					       bool *untagged)
{
	switch (svc->affinity) {
	case KVR_AFF_SESSION:
		if (sk_state && sk_state->session)
			return sk_state->session;
		*untagged = true;
		return bpf_get_netns_cookie(ctx);
	case KVR_AFF_CLIENT:
		return bpf_get_netns_cookie(ctx);
	default:
		return ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
	}
}

/*
 * A backend may take this connection: user space state, kernel trip, and for
 * a probing backend the probe share (new sessions only: a session already on
 * a probing backend stays).
 */
static __always_inline bool lb_backend_usable(__u32 be_id, const struct kvr_svc *svc,
					      bool new_session)
{
	struct kvr_backend *be = kvr_be_v1.lookup(&be_id);
	struct kvr_health *h;

	if (!be)
		return false;
	if (be->state == KVR_BE_DRAINING || be->state == KVR_BE_OPEN)
		return false;
	h = kvr_health.lookup(&be_id);
	if (h && (h->flags & KVR_HEALTH_TRIPPED))
		return false;
	if (be->state == KVR_BE_PROBING && new_session)
		return bpf_get_prandom_u32() % 1000 < svc->probe_milli;
	return true;
}

static __always_inline __u32 lb_backend_load(__u32 be_id)
{
	__u32 *load = kvr_be_load.lookup(&be_id);

	return load ? *load : 0;
}

/* Bounded loads: over when load > (1 + eps) x the service's mean load. */
static __always_inline bool lb_over_bound(__u32 load, __u32 mean, const struct kvr_svc *svc)
{
	if (svc->eps_milli == KVR_EPS_OFF || mean == 0)
		return false;
	return (__u64)load * 1000 > (__u64)mean * (1000 + svc->eps_milli);
}

static __always_inline __u32 lb_svc_mean(__u32 svc_id)
{
	__u32 *mean = kvr_svc_load.lookup(&svc_id);

	return mean ? *mean : 0;
}

/**
 * lb_maglev_pick() - consistent hashing with bounded loads over the table.
 *
 * Services without affinity have a proportional table instead of a Maglev
 * one (their keys are random, so consistency buys nothing); the walk is the
 * same.
 *
 * Candidate 0 is the key's owner; unusable candidates are skipped. The first
 * of up to KVR_CANDIDATES usable candidates under the load
 * bound wins (spilled when it is not the first usable one); if every usable
 * candidate is over it, the least loaded one does. KVR_NO_BACKEND when no
 * candidate is usable.
 */
static __always_inline bool lb_seen(const __u32 *seen, __u32 n, __u32 be_id)
{
	__u32 i;

	for (i = 0; i < KVR_CANDIDATES; i++)
		if (i < n && seen[i] == be_id)
			return true;
	return false;
}

static __always_inline struct kvr_pick lb_maglev_pick(const struct kvr_svc *svc, __u64 key,
						      __u64 ident)
{
	struct kvr_pick pick = { .be_id = KVR_NO_BACKEND, .spilled = 0 };
	__u32 seen[KVR_CANDIDATES] = {};
	__u32 best_load = 0xffffffffU, nseen = 0;
	__u32 group = svc->tbl_group;
	__u32 mean = 0;
	void *table;
	__u32 n;

	table = kvr_tables.lookup(&group);
	if (!table || svc->table_size == 0) {
		kvr_reason_inc(KVR_R_NO_TABLE);
		return pick;
	}
	/* Loads are read only when a bound can apply: the common no-load case
	 * costs no load lookups at all. */
	if (svc->eps_milli != KVR_EPS_OFF)
		mean = lb_svc_mean(svc->id);

	for (n = 0; n < KVR_WALK; n++) {
		__u32 slot = svc->tbl_base + kvr_slot_hash(key, ident, n) % svc->table_size;
		__u32 *be_id = bpf_map_lookup_elem(table, &slot);
		__u32 load, id;

		if (!be_id)
			continue;
		id = *be_id;
		/* A backend owns many slots: compare distinct backends only. */
		if (lb_seen(seen, nseen, id) || !lb_backend_usable(id, svc, true))
			continue;
		load = mean ? lb_backend_load(id) : 0;
		if (!lb_over_bound(load, mean, svc)) {
			pick.be_id = id;
			return pick;
		}
		/* Over the bound: remember the least loaded, keep walking. */
		pick.spilled = 1;
		if (load < best_load) {
			pick.be_id = id;
			best_load = load;
		}
		if (nseen < KVR_CANDIDATES)
			seen[nseen] = id;
		if (++nseen >= KVR_CANDIDATES)
			break;
	}
	return pick;
}

/**
 * lb_affinity_get() - the live affinity entry's backend, if it may be reused.
 * @moved: set when the entry exists but its backend is no longer usable
 *
 * Load does not move a live session: its KV cache is on that engine, and
 * re-prefilling the whole conversation elsewhere costs more than waiting in
 * a longer queue. Load steers new sessions (the table's weights and the
 * bounded-load walk); a session moves only when its backend stops being
 * usable (draining, breaker open, kernel trip).
 */
static __always_inline __u32 lb_affinity_get(const struct kvr_svc *svc,
					     struct kvr_aff_key *akey, __u64 now,
					     bool *moved)
{
	struct kvr_aff_val *aff = kvr_affinity.lookup(akey);
	struct kvr_member_key mkey = {};

	if (!aff)
		return KVR_NO_BACKEND;
	if (svc->aff_timeout &&
	    now - aff->last_ns > (__u64)svc->aff_timeout * KVR_NS_PER_SEC)
		return KVR_NO_BACKEND;
	mkey.svc_id = svc->id;
	mkey.be_id = aff->be_id;
	if (!kvr_member.lookup(&mkey) || !lb_backend_usable(aff->be_id, svc, false)) {
		*moved = true;
		return KVR_NO_BACKEND;
	}
	aff->last_ns = now;
	return aff->be_id;
}

#endif /* __KVR_LB_H */
