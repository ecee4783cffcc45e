/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Key hashing shared by the connect hook and dataplane/hashing.py (which must
 * give the same numbers: `kvroute explain` and the tests rely on it).
 */
#ifndef __KVR_HASH_H
#define __KVR_HASH_H

#ifndef KVR_HASH_SEED
#define KVR_HASH_SEED 0x6b76726f75746531ULL
#endif

/* MurmurHash3's 64-bit finaliser: a cheap full-avalanche mix. */
static __always_inline __u64 kvr_mix64(__u64 x)
{
	x ^= x >> 33;
	x *= 0xff51afd7ed558ccdULL;
	x ^= x >> 33;
	x *= 0xc4ceb9fe1a85ec53ULL;
	x ^= x >> 33;
	return x;
}

/*
 * kvr_slot_hash() - the hash of the nth candidate slot for a key.
 *
 * Candidate 0 is the key's Maglev owner; later candidates are the bounded-load
 * and unusable-backend walk, independent of each other. @svc_ident is
 * struct kvr_svc.ident: service ids are local to a node, so they must not
 * reach the hash (two nodes that number services differently must still send
 * a key to the same slot), and a dual-stack service's two VIPs share it.
 */
static __always_inline __u64 kvr_slot_hash(__u64 key, __u64 svc_ident, __u32 n)
{
	return kvr_mix64(key ^ KVR_HASH_SEED ^ kvr_mix64(svc_ident) ^
			 ((__u64)n * 0x9e3779b97f4a7c15ULL));
}

#endif /* __KVR_HASH_H */
