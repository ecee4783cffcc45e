/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every kvroute map, in one place. Build-time options come from the agent's
 * config as -D flags (dataplane/loader.py); the defaults here only let the
 * file compile on its own.
 *
 * Pinned maps live under KVR_PIN_DIR, so a restarted agent (or a new program
 * version) adopts them and routing never stops. Hash maps are not
 * preallocated: memory grows with the services and backends that exist;
 * max_entries is only a ceiling.
 */
#ifndef __KVR_MAPS_H
#define __KVR_MAPS_H

#include "abi.h"

#ifndef KVR_PIN_DIR
#define KVR_PIN_DIR "/sys/fs/bpf/kvroute"
#endif
#ifndef KVR_MAX_SERVICES
#define KVR_MAX_SERVICES 65536
#endif
#ifndef KVR_MAX_BACKENDS
#define KVR_MAX_BACKENDS 262144
#endif
#ifndef KVR_AFFINITY_ENTRIES
#define KVR_AFFINITY_ENTRIES 262144
#endif
#ifndef KVR_SOCK_ENTRIES
#define KVR_SOCK_ENTRIES 65536
#endif

#ifndef KVR_UDP_ENTRIES
#define KVR_UDP_ENTRIES 16384
#endif

#ifndef KVR_EVENTS_BYTES
#define KVR_EVENTS_BYTES (1 << 20)
#endif

#define KVR_PIN(name) KVR_PIN_DIR "/" name

/* bcc's BPF_RINGBUF_OUTPUT cannot pin; this is its table type with a pinned
 * section (bcc opens the pinned ring when it exists, else creates and pins
 * it), so a restarted agent keeps reading the same ring. */
#define KVR_RINGBUF_PINNED(_name, _bytes, _pinned)				\
struct _name##_table_t {							\
	int key;								\
	u32 leaf;								\
	int (*ringbuf_output)(void *, u64, u64);				\
	void *(*ringbuf_reserve)(u64);						\
	void (*ringbuf_discard)(void *, u64);					\
	void (*ringbuf_submit)(void *, u64);					\
	u32 max_entries;							\
};										\
__attribute__((section("maps/ringbuf:" _pinned)))				\
struct _name##_table_t _name = { .max_entries = (_bytes) }

/* (vip, port, proto) -> service; a dual-stack service has one entry per VIP */
BPF_TABLE_PINNED7("hash", struct kvr_l4_key, struct kvr_svc, kvr_svc_v2,
		  2 * KVR_MAX_SERVICES, KVR_PIN("kvr_svc_v2"), BPF_F_NO_PREALLOC);

/* service id -> name, for the CLI (programs never read it) */
BPF_TABLE_PINNED7("hash", u32, struct kvr_svc_name, kvr_svc_name,
		  KVR_MAX_SERVICES, KVR_PIN("kvr_svc_name"), BPF_F_NO_PREALLOC);

/* Template of a table group: slot -> backend id, the tables of many services
 * of one size side by side. Groups are created at run time as services appear
 * (BPF_F_INNER_MAP lifts the size match) and written by the agent through
 * mmap (BPF_F_MMAPABLE), a memcpy instead of a syscall per slot. */
BPF_F_TABLE("array", u32, u32, kvr_tbl_tmpl, 1, BPF_F_INNER_MAP | BPF_F_MMAPABLE);

/* group id -> table group (see struct kvr_svc.tbl_group) */
BPF_TABLE_PINNED("hash_of_maps$kvr_tbl_tmpl", u32, int, kvr_tables,
		 KVR_MAX_SERVICES, KVR_PIN("kvr_tables"));

/* backend id -> endpoint (one or both families) and state */
BPF_TABLE_PINNED7("hash", u32, struct kvr_backend, kvr_be_v2,
		  KVR_MAX_BACKENDS, KVR_PIN("kvr_be_v2"), BPF_F_NO_PREALLOC);

/* (service id, backend id) -> weight: membership, checked on affinity hits */
BPF_TABLE_PINNED7("hash", struct kvr_member_key, u32, kvr_member,
		  KVR_MAX_BACKENDS, KVR_PIN("kvr_member"), BPF_F_NO_PREALLOC);

/* backend id -> current load, written by user space (bounded-load input) */
BPF_TABLE_PINNED7("hash", u32, u32, kvr_be_load,
		  KVR_MAX_BACKENDS, KVR_PIN("kvr_be_load"), BPF_F_NO_PREALLOC);

/* service id -> mean load of its usable backends, written with kvr_be_load */
BPF_TABLE_PINNED7("hash", u32, u32, kvr_svc_load,
		  KVR_MAX_SERVICES, KVR_PIN("kvr_svc_load"), BPF_F_NO_PREALLOC);

/* backend id -> the kernel's health view (consecutive failures, trip, RTT) */
BPF_TABLE_PINNED7("hash", u32, struct kvr_health, kvr_health,
		  KVR_MAX_BACKENDS, KVR_PIN("kvr_health"), BPF_F_NO_PREALLOC);

/* (service id, key) -> backend id + last use: live sessions stay put */
BPF_TABLE_PINNED("lru_hash", struct kvr_aff_key, struct kvr_aff_val, kvr_affinity,
		 KVR_AFFINITY_ENTRIES, KVR_PIN("kvr_affinity"));

/* backend id -> sessions bound to it fleet-wide: written by user space, and
 * +1 / -1 by connect4 on each bind / move of a fleet service (residency input) */
BPF_TABLE_PINNED7("hash", u32, u32, kvr_be_sess,
		  KVR_MAX_BACKENDS, KVR_PIN("kvr_be_sess"), BPF_F_NO_PREALLOC);

/* KVR_PROG_PICK -> the pick program of one entry point, tail-called for
 * fleet placement and moving sessions (written by the agent at load). One
 * array per attach type: the kernel takes a program array's owner from the
 * first program using it and refuses tail calls across attach types (their
 * contexts differ). Pinned: an unpinned program array is emptied when the
 * last user space handle closes, which would end every new session's
 * routing. */
BPF_TABLE_PINNED("prog", u32, u32, kvr_pick_c4, 1, KVR_PIN("kvr_pick_c4"));
BPF_TABLE_PINNED("prog", u32, u32, kvr_pick_c6, 1, KVR_PIN("kvr_pick_c6"));
BPF_TABLE_PINNED("prog", u32, u32, kvr_pick_s4, 1, KVR_PIN("kvr_pick_s4"));
BPF_TABLE_PINNED("prog", u32, u32, kvr_pick_s6, 1, KVR_PIN("kvr_pick_s6"));

/* KVR_PROG_PICK -> the walk program of one entry point, tail-called by its
 * pick program when residency placed nothing (one array per attach type, as
 * above). A stage of its own: residency and the bounded-load walk in one
 * program take the 5.10 and 6.1 verifiers past their 1M instruction budget. */
BPF_TABLE_PINNED("prog", u32, u32, kvr_walk_c4, 1, KVR_PIN("kvr_walk_c4"));
BPF_TABLE_PINNED("prog", u32, u32, kvr_walk_c6, 1, KVR_PIN("kvr_walk_c6"));
BPF_TABLE_PINNED("prog", u32, u32, kvr_walk_s4, 1, KVR_PIN("kvr_walk_s4"));
BPF_TABLE_PINNED("prog", u32, u32, kvr_walk_s6, 1, KVR_PIN("kvr_walk_s6"));

/* 0 -> per-CPU hand-over from an entry point to its pick program (same CPU,
 * same call). Pinned so an old entry point and a new pick program share it
 * during an upgrade. */
BPF_TABLE_PINNED("percpu_array", u32, struct kvr_scratch, kvr_scratch, 1,
		 KVR_PIN("kvr_scratch"));

/* ring of struct kvr_event: bindings fleet services made or still use */
KVR_RINGBUF_PINNED(kvr_events, KVR_EVENTS_BYTES, KVR_PIN("kvr_events"));

/* socket -> session tag (tagged sockets only) */
BPF_TABLE_PINNED7("sk_storage", int, struct kvr_sk, kvr_sk,
		  0, KVR_PIN("kvr_sk"), BPF_F_NO_PREALLOC);

/* socket cookie -> the translation connect4/6 made. An LRU, preallocated:
 * allocating socket storage on every translated connect cost about 1 us,
 * most of what a VIP connect added. Entries go when the socket closes: TCP
 * ones in sockops (or at release, never connected), UDP ones at release. */
BPF_TABLE_PINNED("lru_hash", u64, struct kvr_sock, kvr_sock_v2,
		 KVR_SOCK_ENTRIES, KVR_PIN("kvr_sock_v2"));

/* socket cookie -> a UDP socket's flows (reverse NAT for recvmsg4/6). Deleted
 * by sock_release when the socket closes; the LRU bound only matters when
 * more than KVR_UDP_ENTRIES translated UDP sockets are open at once, and
 * KVR_R_UDP_NEW/FREED count what it evicted. */
BPF_TABLE_PINNED("lru_hash", u64, struct kvr_udp, kvr_udp_v1,
		 KVR_UDP_ENTRIES, KVR_PIN("kvr_udp_v1"));

/* 0 -> a zeroed struct kvr_udp to create entries from (too big for the stack) */
BPF_TABLE("percpu_array", u32, struct kvr_udp, kvr_udp_tmpl, 1);

/* service id -> per-CPU outcome counters (enum kvr_svc_cnt) */
BPF_TABLE_PINNED7("percpu_hash", u32, struct kvr_svc_cnt_val, kvr_svc_cnt_v3,
		  KVR_MAX_SERVICES, KVR_PIN("kvr_svc_cnt_v3"), BPF_F_NO_PREALLOC);

/* backend id -> per-CPU counters (enum kvr_be_cnt) */
BPF_TABLE_PINNED7("percpu_hash", u32, struct kvr_be_cnt_val, kvr_be_cnt,
		  KVR_MAX_BACKENDS, KVR_PIN("kvr_be_cnt"), BPF_F_NO_PREALLOC);

/* 0 -> the options the programs were built with (struct kvr_meta) */
BPF_TABLE_PINNED("array", u32, struct kvr_meta, kvr_meta, 1, KVR_PIN("kvr_meta"));

/* enum kvr_reason -> per-CPU count of fail-open and bookkeeping events */
BPF_TABLE_PINNED("percpu_array", u32, u64, kvr_reasons_v2,
		 KVR_R_MAX, KVR_PIN("kvr_reasons_v2"));

#ifdef ENABLE_NODEPORT
/* Packet-path maps: created by the tc program's load only, so a node without NodePort
 * traffic pays no conntrack memory. */
#ifndef KVR_CT_ENTRIES
#define KVR_CT_ENTRIES 262144
#endif

/* (frontend address as ::ffff:a.b.c.d, ::ffff:0.0.0.0 for a NodePort; port, proto)
 * -> the Service it reaches */
BPF_TABLE_PINNED7("hash", struct kvr_l4_key, struct kvr_np_fe, kvr_np_fe_v1,
		  KVR_MAX_SERVICES, KVR_PIN("kvr_np_fe_v1"), BPF_F_NO_PREALLOC);

/* node IPv4 address -> 1: the addresses a NodePort answers on */
BPF_TABLE_PINNED7("hash", __be32, u32, kvr_np_addr, 256, KVR_PIN("kvr_np_addr"),
		  BPF_F_NO_PREALLOC);

/* service id -> its backends on this node */
BPF_TABLE_PINNED7("hash", u32, struct kvr_np_local, kvr_np_local_v1,
		  KVR_MAX_SERVICES, KVR_PIN("kvr_np_local_v1"), BPF_F_NO_PREALLOC);

/* 0 -> the node's packet-path settings (struct kvr_np_cfg) */
BPF_TABLE_PINNED("array", u32, struct kvr_np_cfg, kvr_np_cfg, 1, KVR_PIN("kvr_np_cfg"));

/* flow direction tuple -> its rewrite: every later packet and the replies follow the
 * backend chosen at the flow's first packet. An LRU: a full table drops the least
 * recently used flow (counted when its next packet misses, KVR_NPC_MIDFLOW). */
BPF_TABLE_PINNED("lru_hash", struct kvr_ct_key, struct kvr_ct, kvr_ct_v1,
		 KVR_CT_ENTRIES, KVR_PIN("kvr_ct_v1"));

/* service id -> per-CPU packet-path counters (enum kvr_np_cnt) */
BPF_TABLE_PINNED7("percpu_hash", u32, struct kvr_np_cnt_val, kvr_np_cnt,
		  KVR_MAX_SERVICES, KVR_PIN("kvr_np_cnt"), BPF_F_NO_PREALLOC);

/* KVR_NP_PROG_* -> the new-flow stages, tail-called in turn (written at load). Pinned, as kvr_progs: an unpinned program array empties when its last user
 * space handle closes. */
BPF_TABLE_PINNED("prog", u32, u32, kvr_np_progs, KVR_NP_PROGS, KVR_PIN("kvr_np_progs"));

/* 0 -> per-CPU hand-over between a new flow's stages (programs only) */
BPF_TABLE_PINNED("percpu_array", u32, struct kvr_np_scratch, kvr_np_scratch, 1,
		 KVR_PIN("kvr_np_scratch"));

/* enum kvr_np_reason -> per-CPU count */
BPF_TABLE_PINNED("percpu_array", u32, u64, kvr_np_reasons,
		 KVR_NPR_MAX, KVR_PIN("kvr_np_reasons"));
#endif /* ENABLE_NODEPORT */

#endif /* __KVR_MAPS_H */
