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

#define KVR_NS_PER_SEC 1000000000ULL

/* What a pick produced, beyond the backend id. */
struct kvr_pick {
	__u32	be_id;
	__u32	spilled;	/* the owner was over the load bound */
};

/**
 * sock_session_key() - the key that picks a backend for this connect or
 * datagram (either family: the key is the client's, not the VIP's).
 * @ctx: the connect context
 * @svc: the service hit
 * @sk_state: the socket's storage, if any
 * @untagged: set when session mode fell back to the client identity
 */
static __always_inline __u64 sock_session_key(struct bpf_sock_addr *ctx,
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
	struct kvr_backend *be = kvr_be_v2.lookup(&be_id);
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

/*
 * The distinct backends a walk has taken as candidates, newest first: a
 * shift register, filled with the walk's @avoid at the start (a backend never
 * taken anyway), so a lookup compares every slot and never asks how many are
 * filled. Indexing by that count would make the verifier track it as a
 * constant in each state and explore each iteration once per count (with
 * the other loop counters, past the 5.10 and 6.1 verifiers' budget).
 */
static __always_inline void lb_seen_init(__u32 *seen, __u32 avoid)
{
	__u32 i;

#pragma unroll
	for (i = 0; i < KVR_CANDIDATES; i++)
		seen[i] = avoid;
}

static __always_inline bool lb_seen(const __u32 *seen, __u32 be_id)
{
	__u32 i;

#pragma unroll
	for (i = 0; i < KVR_CANDIDATES; i++)
		if (seen[i] == be_id)
			return true;
	return false;
}

static __always_inline void lb_seen_add(__u32 *seen, __u32 be_id)
{
	__u32 i;

#pragma unroll
	for (i = KVR_CANDIDATES - 1; i > 0; i--)
		seen[i] = seen[i - 1];
	seen[0] = be_id;
}

static __always_inline __u32 lb_sessions(__u32 be_id)
{
	__u32 *n = kvr_be_sess.lookup(&be_id);

	return n ? *n : 0;
}

static __always_inline __u32 lb_weight(__u32 svc_id, __u32 be_id)
{
	struct kvr_member_key mkey = { .svc_id = svc_id, .be_id = be_id };
	__u32 *w = kvr_member.lookup(&mkey);

	return w ? *w : 0;
}

/*
 * A walk counts the candidates it took as taken - base, with base derived
 * from the session key: a number the verifier cannot know, so the count is
 * no constant to it either and iterations that took different numbers of
 * candidates share one verifier state (a count from 0 made it explore every
 * iteration once per count). Unsigned wrap-around keeps the difference exact.
 */
static __always_inline __u32 lb_walk_base(__u64 key)
{
	return (__u32)key;
}

/*
 * lb_residency_pick() - where a fleet service's new session goes: of the
 * first KVR_CANDIDATES distinct usable backends in the key's walk, those
 * under the load bound, the one holding the fewest fleet-wide sessions
 * (kvr_be_sess) per unit of weight (kvr_member), compared as
 * sess_a * w_b < sess_b * w_a in u64; ties to the earlier in walk order.
 * KVR_NO_BACKEND when none qualifies (the walk then takes the least loaded).
 *
 * A pass of its own before the walk: carrying these candidates through the
 * bounded-load walk multiplies the verifier's states past its limit.
 */
static __always_inline __u32 lb_residency_pick(const struct kvr_svc *svc, void *table,
					       __u64 key, __u64 ident, __u32 mean, __u32 avoid)
{
	__u32 best = KVR_NO_BACKEND, best_sess = 0, best_w = 0;
	/* Candidates counted from an arbitrary base: see lb_walk_base(). */
	__u32 base = lb_walk_base(key), taken = base;
	__u32 seen[KVR_CANDIDATES];
	__u32 n, id, sess, w, slot;
	__u32 *be_id;

	lb_seen_init(seen, avoid);
	for (n = 0; n < KVR_WALK; n++) {
		slot = svc->tbl_base + kvr_slot_hash(key, ident, n) % svc->table_size;
		be_id = bpf_map_lookup_elem(table, &slot);
		if (!be_id)
			continue;
		id = *be_id;
		if (lb_seen(seen, id) || !lb_backend_usable(id, svc, true))
			continue;
		lb_seen_add(seen, id);
		taken++;
		if (!lb_over_bound(mean ? lb_backend_load(id) : 0, mean, svc)) {
			sess = lb_sessions(id);
			w = lb_weight(svc->id, id);
			if (best == KVR_NO_BACKEND ||
			    (__u64)sess * best_w < (__u64)best_sess * w) {
				best = id;
				best_sess = sess;
				best_w = w;
			}
		}
		if (taken - base >= KVR_CANDIDATES)
			break;
	}
	return best;
}

/*
 * lb_pick_prepare() - the service's table and mean load for a pick; false
 * when it has no table (the walk counts that, once).
 */
static __always_inline bool lb_pick_prepare(const struct kvr_svc *svc, void **table,
					    __u32 *mean)
{
	__u32 group = svc->tbl_group;

	*table = kvr_tables.lookup(&group);
	*mean = 0;
	if (!*table || svc->table_size == 0)
		return false;
	/* Loads are read only when a bound can apply: the common no-load case
	 * costs no load lookups at all. */
	if (svc->eps_milli != KVR_EPS_OFF)
		*mean = lb_svc_mean(svc->id);
	return true;
}

/*
 * lb_fleet_pick() - a fleet service's placement by residency
 * (lb_residency_pick); KVR_NO_BACKEND sends the pick on to the walk
 * (lb_maglev_pick), which then decides alone. Verified in a program of its
 * own (the pick program; the walk has the walk program): see kvr_walk_* in
 * maps.h.
 */
static __always_inline __u32 lb_fleet_pick(const struct kvr_svc *svc, __u64 key, __u64 ident,
					   __u32 avoid)
{
	void *table;
	__u32 mean;

	if (!lb_pick_prepare(svc, &table, &mean))
		return KVR_NO_BACKEND;
	return lb_residency_pick(svc, table, key, ident, mean, avoid);
}

/**
 * lb_maglev_pick() - consistent hashing with bounded loads over the table.
 * @avoid: a backend never taken (the one a saturated session leaves), or
 *	   KVR_NO_BACKEND
 *
 * Services without affinity have a proportional table instead of a Maglev
 * one (their keys are random, so consistency buys nothing); the walk is the
 * same.
 *
 * Candidate 0 is the key's owner; unusable candidates are skipped. The first
 * of up to KVR_CANDIDATES usable candidates under the load bound wins
 * (spilled when an earlier one was over it); if every usable candidate is
 * over it, the least loaded one does. KVR_NO_BACKEND when no candidate is
 * usable.
 *
 * Fleet services place by residency first (lb_fleet_pick, in the program
 * before this one); the walk decides only when no backend there is under
 * the bound. Services without the flag pay nothing for it.
 */
static __always_inline struct kvr_pick lb_maglev_pick(const struct kvr_svc *svc, __u64 key,
						      __u64 ident, __u32 avoid)
{
	struct kvr_pick pick = { .be_id = KVR_NO_BACKEND, .spilled = 0 };
	__u32 base = lb_walk_base(key), taken = base;
	__u32 best_load = 0xffffffffU;
	__u32 seen[KVR_CANDIDATES];
	__u32 mean;
	void *table;
	__u32 n;

	if (!lb_pick_prepare(svc, &table, &mean)) {
		kvr_reason_inc(KVR_R_NO_TABLE);
		return pick;
	}

	lb_seen_init(seen, avoid);
	for (n = 0; n < KVR_WALK; n++) {
		__u32 slot = svc->tbl_base + kvr_slot_hash(key, ident, n) % svc->table_size;
		__u32 *be_id = bpf_map_lookup_elem(table, &slot);
		__u32 load, id;

		if (!be_id)
			continue;
		id = *be_id;
		/* A backend owns many slots: compare distinct backends only. */
		if (lb_seen(seen, id) || !lb_backend_usable(id, svc, true))
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
		lb_seen_add(seen, id);
		if (++taken - base >= KVR_CANDIDATES)
			break;
	}
	return pick;
}

/* How a connect's affinity lookup ended. */
enum lb_aff_how {
	LB_AFF_NEW = 0,		/* no entry (or expired): a new binding */
	LB_AFF_HIT,		/* live entry reused */
	LB_AFF_GONE,		/* entry's backend unusable or no longer a member */
	LB_AFF_LOADED,		/* entry's backend over the move bound */
};

static __always_inline void lb_event(__u8 kind, __u32 svc_id, __u32 be_id, __u32 prev,
				     __u64 key)
{
	struct kvr_event ev = {
		.kind = kind, .svc_id = svc_id, .be_id = be_id, .prev_be_id = prev, .key = key,
	};

	/* A full ring costs the controller one announcement, never the connect. */
	if (kvr_events.ringbuf_output(&ev, sizeof(ev), 0))
		kvr_reason_inc(KVR_R_EV_LOST);
}

static __always_inline __u32 lb_now_s(__u64 now)
{
	return (__u32)(now / KVR_NS_PER_SEC);
}

/* Load units a backend must carry above its service's mean before a live session
 * leaves it (dataplane.model.MOVE_MIN_EXCESS): near idle, one request in flight is
 * many times the mean, and no reason to throw a session's KV cache away. */
#ifndef KVR_MOVE_MIN_EXCESS
#define KVR_MOVE_MIN_EXCESS 4000
#endif

/* Sticky until saturated: over when load > (1 + move_eps) x the service's mean and
 * at least KVR_MOVE_MIN_EXCESS above it. */
static __always_inline bool lb_over_move_bound(__u32 be_id, const struct kvr_svc *svc)
{
	__u32 mean, load;

	if (svc->move_eps_milli == 0)
		return false;
	mean = lb_svc_mean(svc->id);
	if (mean == 0)
		return false;
	load = lb_backend_load(be_id);
	if ((__u64)load < (__u64)mean + KVR_MOVE_MIN_EXCESS)
		return false;
	return (__u64)load * 1000 > (__u64)mean * (1000 + svc->move_eps_milli);
}

/**
 * lb_affinity_get() - the live affinity entry's backend, if it may be reused.
 * @prev: set to the entry's backend when it exists but must be replaced
 * @how: set to an enum lb_aff_how
 *
 * Load rarely moves a live session: its KV cache is on that engine, and
 * re-prefilling the whole conversation elsewhere costs more than waiting in
 * a longer queue. Load steers new sessions (the table's weights, the
 * bounded-load walk, residency); a session moves when its backend stops being
 * usable (draining, breaker open, kernel trip) or, with a move bound, when
 * it is saturated.
 *
 * Fleet services never expire an entry here (the controller does), and a hit
 * announces itself (KVR_EV_TOUCH) at most every max(1, aff_timeout / 4) s.
 */
static __always_inline __u32 lb_affinity_get(const struct kvr_svc *svc,
					     struct kvr_aff_key *akey, __u64 now,
					     __u32 *prev, int *how)
{
	struct kvr_aff_val *aff = kvr_affinity.lookup(akey);
	bool fleet = svc->flags & KVR_SVC_F_FLEET;
	struct kvr_member_key mkey = {};
	__u32 be_id, now_s, every;

	*how = LB_AFF_NEW;
	if (!aff)
		return KVR_NO_BACKEND;
	if (!fleet && svc->aff_timeout &&
	    now - aff->last_ns > (__u64)svc->aff_timeout * KVR_NS_PER_SEC)
		return KVR_NO_BACKEND;
	be_id = aff->be_id;
	mkey.svc_id = svc->id;
	mkey.be_id = be_id;
	if (!kvr_member.lookup(&mkey) || !lb_backend_usable(be_id, svc, false)) {
		*prev = be_id;
		*how = LB_AFF_GONE;
		return KVR_NO_BACKEND;
	}
	aff->last_ns = now;
	if (lb_over_move_bound(be_id, svc)) {
		*prev = be_id;
		*how = LB_AFF_LOADED;
		return KVR_NO_BACKEND;
	}
	*how = LB_AFF_HIT;
	if (fleet) {
		now_s = lb_now_s(now);
		every = svc->aff_timeout / 4 ? svc->aff_timeout / 4 : 1;
		if (now_s - aff->reported_s >= every) {
			aff->reported_s = now_s;
			lb_event(KVR_EV_TOUCH, svc->id, be_id, KVR_NO_BACKEND, akey->key);
		}
	}
	return be_id;
}

/**
 * lb_affinity_bind() - record a new or replaced binding.
 * @prev: the backend the session leaves, KVR_NO_BACKEND for a new one
 *
 * Fleet services announce it (KVR_EV_BIND) and keep the fleet-wide session
 * counts current until user space next writes them: +1 on the new backend
 * (atomic), -1 on the old one (never below 0; a decrement racing another
 * change may be lost, the next kvr_be_sess write corrects it).
 */
static __always_inline void lb_affinity_bind(const struct kvr_svc *svc,
					     struct kvr_aff_key *akey, __u32 be_id,
					     __u32 prev, __u64 now)
{
	struct kvr_aff_val aval = {
		.be_id = be_id, .reported_s = lb_now_s(now), .last_ns = now,
	};
	__u32 zero = 0, *n;

	kvr_affinity.update(akey, &aval);
	if (!(svc->flags & KVR_SVC_F_FLEET))
		return;
	n = kvr_be_sess.lookup_or_try_init(&be_id, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	/* No branch on prev: KVR_NO_BACKEND has no entry (and the verifier
	 * need not tell new bindings from moves). */
	n = kvr_be_sess.lookup(&prev);
	if (n && *n)
		*n = *n - 1;
	lb_event(KVR_EV_BIND, svc->id, be_id, prev, akey->key);
}

#endif /* __KVR_LB_H */
