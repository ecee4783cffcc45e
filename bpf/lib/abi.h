/* SPDX-License-Identifier: Apache-2.0 */
/*
 * kvroute ABI: every struct, enum, flag and counter slot shared between the
 * eBPF programs and the Python agent. Python gets these layouts from bcc's
 * own type information (table.Key / table.Leaf); dataplane/abi.py mirrors the
 * constants and a test compares both field by field.
 *
 * Layout rules: fixed-width types only, explicit pad fields, no implicit
 * trailing padding in any hash key, a size assertion on every struct. A layout
 * change gets a new map name suffix (_v2) instead of an in-place migration.
 */
#ifndef __KVR_ABI_H
#define __KVR_ABI_H

/* setsockopt(SOL_KVROUTE, KVROUTE_SESSION, &u64, 8): tag a socket with a
 * session hash before connect(). Caught by cgroup/setsockopt, never seen by
 * the kernel's own socket code. 0x6b76 is "kv"; real SOL_* levels are < 0x200. */
#define KVR_SOL_KVROUTE		0x6b76
#define KVR_SO_SESSION		1

/* How a service derives the key that picks a backend. */
enum kvr_affinity {
	KVR_AFF_NONE	= 0,	/* random backend per connection */
	KVR_AFF_CLIENT	= 1,	/* network-namespace cookie (the pod), with a timeout */
	KVR_AFF_SESSION	= 2,	/* u64 the client put on its socket; untagged -> client */
};

/* Backend state as user space set it. The kernel adds its own breaker trip
 * (struct kvr_health.flags & KVR_HEALTH_TRIPPED), which reads as "open". */
enum kvr_be_state {
	KVR_BE_ACTIVE	= 0,	/* chosen normally */
	KVR_BE_DRAINING	= 1,	/* no new connections; sessions move on their next connect */
	KVR_BE_OPEN	= 2,	/* breaker open: never chosen */
	KVR_BE_PROBING	= 3,	/* half-open: admitted for probe_milli/1000 of picks */
};

/* struct kvr_svc.flags */
#define KVR_SVC_F_SATURATED	(1U << 0)	/* every engine saturated: fail fast */
#define KVR_SVC_F_FLEET		(1U << 1)	/* bindings are fleet-wide: announced on kvr_events,
						 * expired by the controller, never locally */

/* struct kvr_svc.eps_milli value that disables the check. */
#define KVR_EPS_OFF		0xffff

/*
 * Addresses of either family are 16 bytes in network order: an IPv6 address,
 * or an IPv4 address as the IPv4-mapped IPv6 address ::ffff:a.b.c.d (RFC 4291
 * 2.5.5.2). That is the form an AF_INET6 socket uses for an IPv4 peer, so a
 * v4 client's VIP and a dual-stack socket's ::ffff:VIP are one key, and a
 * reply's source matches a record whichever family the socket has.
 */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define KVR_V4MAPPED_W2	0xffff0000U	/* word 2 of ::ffff:a.b.c.d, as loaded */
#else
#define KVR_V4MAPPED_W2	0x0000ffffU
#endif

/* Key of kvr_svc_v2 (services): one per VIP, a dual-stack service has two. */
struct kvr_l4_key {
	__be32	addr[4];	/* VIP: IPv6, or IPv4 as ::ffff:a.b.c.d */
	__be16	port;		/* L4 port, network order */
	__u8	proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8	pad;		/* always 0: part of the hash key */
};
_Static_assert(sizeof(struct kvr_l4_key) == 20, "kvr_l4_key size");

/*
 * Value of kvr_svc_v2: one per Service VIP:port/proto. A dual-stack service's
 * two VIPs hold the same value (same id, table and ident), so its sessions
 * and affinity entries are the service's, not a VIP's.
 *
 * A service's lookup table is the range [tbl_base, tbl_base + table_size) of
 * the array kvr_tables[tbl_group]. A new table is written to a free range and
 * published by replacing this value, so a connect() reads the whole old table
 * or the whole new one.
 */
struct kvr_svc {
	__u32	id;		/* agent-local service id, keys every per-service map */
	__u32	table_size;	/* M: slots in this service's table */
	__u32	tbl_group;	/* key of kvr_tables holding the table */
	__u32	tbl_base;	/* first slot of the table in that group */
	__u32	aff_timeout;	/* affinity entry lifetime, seconds (client and session) */
	__u16	eps_milli;	/* bounded-load epsilon x1000, KVR_EPS_OFF disables */
	__u16	probe_milli;	/* share of picks a probing backend accepts, x1000 */
	__u8	affinity;	/* enum kvr_affinity */
	__u8	flags;		/* KVR_SVC_F_* */
	__u16	n_backends;	/* members, for people reading the map */
	__u16	move_eps_milli;	/* a live session moves when its backend's load is over
				 * (1 + this/1000) x mean; 0: sticky for good (the
				 * value an agent before ABI 2 left in this padding) */
	__u16	pad;
	__u64	revision;	/* hash of the table's inputs: a restarted agent diffs on it */
	__u64	ident;		/* the service's identity in every slot hash, the same on
				 * every node and for both VIPs of a dual-stack service
				 * (dataplane/hashing.py svc_ident) */
};
_Static_assert(sizeof(struct kvr_svc) == 48, "kvr_svc size");

/* Value of kvr_be_v2: one per backend endpoint, shared by the services it
 * serves. A dual-stack pod is one backend with both addresses, so a session
 * lands on the same engine whichever family its client uses. */
struct kvr_backend {
	__be32	addr4;		/* pod IPv4, network order; 0: none */
	__be32	addr6[4];	/* pod IPv6, network order; all zero: none */
	__be16	port;		/* pod port, network order */
	__u8	proto;		/* IPPROTO_* */
	__u8	state;		/* enum kvr_be_state */
};
_Static_assert(sizeof(struct kvr_backend) == 24, "kvr_backend size");

/* Key of kvr_member: a backend belongs to a service (affinity hits check it). */
struct kvr_member_key {
	__u32	svc_id;
	__u32	be_id;
};
_Static_assert(sizeof(struct kvr_member_key) == 8, "kvr_member_key size");

/* Value of kvr_health: the kernel's own view of a backend, written by sockops. */
struct kvr_health {
	__u32	consec_fail;	/* failed connects since the last established one */
	__u32	flags;		/* KVR_HEALTH_* */
	__u32	srtt_us;	/* smoothed RTT of established connections, microseconds */
	__u32	pad;
	__u64	tripped_ns;	/* bpf_ktime_get_ns() when the kernel tripped it, 0 if not */
};
_Static_assert(sizeof(struct kvr_health) == 24, "kvr_health size");

#define KVR_HEALTH_TRIPPED	(1U << 0)	/* K consecutive failed connects: treat as open */

/* Key of kvr_affinity. */
struct kvr_aff_key {
	__u32	svc_id;
	__u32	pad;
	__u64	key;		/* session hash or network-namespace cookie */
};
_Static_assert(sizeof(struct kvr_aff_key) == 16, "kvr_aff_key size");

/* Value of kvr_affinity. */
struct kvr_aff_val {
	__u32	be_id;
	__u32	reported_s;	/* bpf_ktime_get_ns() / 1e9 when this binding was last
				 * announced on kvr_events (fleet services only) */
	__u64	last_ns;	/* bpf_ktime_get_ns() of the last connect that used it */
};
_Static_assert(sizeof(struct kvr_aff_val) == 16, "kvr_aff_val size");

/* Socket-local storage (kvr_sk): the session tag, on tagged sockets only. */
struct kvr_sk {
	__u64	session;	/* setsockopt(SOL_KVROUTE, KVROUTE_SESSION); 0: untagged */
};
_Static_assert(sizeof(struct kvr_sk) == 8, "kvr_sk size");

/* Value of kvr_sock_v2: what connect4/6 did to a socket, by socket cookie. */
struct kvr_sock {
	__be32	vip[4];		/* original destination, for getpeername (v4 mapped) */
	__be16	vport;
	__u16	pad;
	__u32	be_id;		/* backend chosen: sockops counts against it */
};
_Static_assert(sizeof(struct kvr_sock) == 24, "kvr_sock size");

/* One VIP a UDP socket sends to, and where its datagrams go (struct kvr_udp). */
struct kvr_udp_flow {
	__be32	vip[4];		/* the VIP (v4 mapped), what replies must come from */
	__be32	be_addr[4];	/* the backend as the socket addresses it (v4 mapped) */
	__be16	vport;		/* 0: slot unused */
	__be16	be_port;
	__u32	be_id;
	__u32	svc_id;		/* counts replies against the service */
	__u32	pad;
};
_Static_assert(sizeof(struct kvr_udp_flow) == 48, "kvr_udp_flow size");

/* Flows one UDP socket keeps at once: one per VIP it sends to (a resolver
 * socket talks to one). A socket sending to more VIPs recycles the oldest. */
#define KVR_UDP_FLOWS	4

/*
 * Value of kvr_udp_v1: a UDP socket's translations, by socket cookie. connect4/6
 * and sendmsg4/6 write it, recvmsg4/6 read it to give replies the VIP as their
 * source, and sock_release deletes it when the socket closes.
 */
struct kvr_udp {
	struct kvr_udp_flow flow[KVR_UDP_FLOWS];
	__u32	next;		/* slot the next new VIP takes once all are used */
	__u32	pad;
};
_Static_assert(sizeof(struct kvr_udp) == 200, "kvr_udp size");

/* Value of kvr_svc_name: the service's name, for people (never read by programs). */
struct kvr_svc_name {
	char	name[64];	/* NUL-terminated */
};
_Static_assert(sizeof(struct kvr_svc_name) == 64, "kvr_svc_name size");

/* Value of kvr_meta[0]: the build-time options the programs were compiled
 * with, so the CLI predicts the same choices (programs never read it). */
struct kvr_meta {
	__u64	hash_seed;	/* KVR_HASH_SEED */
	__u32	fail_k;		/* KVR_FAIL_K */
	__u32	candidates;	/* KVR_CANDIDATES */
	__u32	abi_version;	/* KVR_ABI_VERSION */
	__u32	pad;
};
_Static_assert(sizeof(struct kvr_meta) == 24, "kvr_meta size");

#define KVR_ABI_VERSION		3	/* 2: fleet bindings (kvr_svc.move_eps_milli,
					 * kvr_aff_val.reported_s, kvr_event);
					 * 3: UDP and IPv6 (16-byte addresses,
					 * kvr_svc.ident, kvr_udp) */

/* Per-service counter slots (kvr_svc_cnt_v3, per CPU; _v3 since KVR_SC_DGRAMS). */
enum kvr_svc_cnt {
	KVR_SC_SELECTED = 0,	/* connects translated to a backend */
	KVR_SC_AFF_HIT,		/* reused a live affinity entry */
	KVR_SC_AFF_MISS,	/* no entry, expired, or unusable: picked from the table */
	KVR_SC_SPILLED,		/* owner over the bounded-load limit: next candidate taken */
	KVR_SC_NO_BACKEND,	/* nothing usable: connect failed with ECONNREFUSED */
	KVR_SC_UNTAGGED,	/* session mode, socket untagged: fell back to client */
	KVR_SC_MOVED,		/* affinity entry pointed at an unusable backend */
	KVR_SC_SATURATED,	/* refused because the service is saturated */
	KVR_SC_MOVED_LOAD,	/* a live session's backend was over the move bound: it moved
				 * (or stayed: no other backend was usable) */
	KVR_SC_DGRAMS,		/* UDP datagrams sent to a backend by sendmsg */
	KVR_SC_REPLIES,		/* UDP datagrams received with the VIP put back as source */
	KVR_SC_MAX,
};

struct kvr_svc_cnt_val {
	__u64	c[KVR_SC_MAX];
};

/* Per-backend counter slots (kvr_be_cnt, per CPU). */
enum kvr_be_cnt {
	KVR_BC_SELECTED = 0,	/* connect() translated to this backend */
	KVR_BC_CONNECTS,	/* TCP SYNs sent (sockops) */
	KVR_BC_FAILED,		/* SYN_SENT -> CLOSE: refused, reset or timed out */
	KVR_BC_ESTABLISHED,	/* active connections established */
	KVR_BC_CLOSED,		/* established connections closed */
	KVR_BC_TRIPS,		/* times the kernel tripped this backend open */
	KVR_BC_MAX,
};

struct kvr_be_cnt_val {
	__u64	c[KVR_BC_MAX];
};

/* Why a program left a connection alone or failed it (kvr_reasons_v2, per CPU). */
enum kvr_reason {
	KVR_R_NO_TABLE = 0,	/* service has no Maglev table yet (fail open) */
	KVR_R_NO_SK_STORAGE,	/* socket storage or translation record not stored */
	KVR_R_BAD_SOCKOPT,	/* KVROUTE_SESSION refused: length not 8, tag 0, not IPv4/6, connected */
	KVR_R_TAGGED,		/* sockets tagged with a session */
	KVR_R_REVERSED,		/* getpeername answers rewritten to the VIP */
	KVR_R_EV_LOST,		/* kvr_events full: a binding event was dropped */
	KVR_R_NO_PICK,		/* the tail call to sock4_pick failed: socket left alone */
	KVR_R_HANDOVER,		/* a pick program found another socket's hand-over (its
				 * entry point preempted in between): picked as new */
	KVR_R_NO_FAMILY,	/* chosen backend has no address of the VIP's family
				 * (cannot happen with a valid model): left alone */
	KVR_R_UDP_NEW,		/* kvr_udp_v1 entries made (one per translated UDP socket) */
	KVR_R_UDP_FREED,	/* kvr_udp_v1 entries deleted as their socket closed; new -
				 * freed - live entries = entries the LRU evicted */
	KVR_R_UDP_RECYCLED,	/* a socket sent to more than KVR_UDP_FLOWS VIPs: its
				 * oldest flow's replies keep the backend's address */
	KVR_R_MAX,
};

/* Value of kvr_scratch (programs only): what an entry point (connect4/6,
 * sendmsg4/6) hands its pick program. */
struct kvr_scratch {
	__u64	cookie;		/* the socket's cookie: whose hand-over this is */
	__u64	key;		/* the session key */
	__u64	now;		/* bpf_ktime_get_ns() of this connect */
	__u32	prev;		/* backend of the binding being replaced, or KVR_NO_BACKEND */
	__u32	avoid;		/* backend the pick must not take, or KVR_NO_BACKEND */
};
_Static_assert(sizeof(struct kvr_scratch) == 32, "kvr_scratch size");

/* Slot of the program in each kvr_pick_* (pick) and kvr_walk_* (walk) program array. */
#define KVR_PROG_PICK		0

/* No backend: an unset pick, or kvr_event.prev_be_id of a brand-new binding. */
#define KVR_NO_BACKEND		0xffffffffU

/* struct kvr_event.kind */
enum kvr_event_kind {
	KVR_EV_BIND	= 1,	/* a connect or sendmsg made or replaced a binding (fleet) */
	KVR_EV_TOUCH	= 2,	/* a binding is still in use (throttled to aff_timeout / 4) */
};

/* A record on kvr_events: the agent relays it to the controller. Ids are the
 * node's own (kvr_svc_name, kvr_be_v2 say what they are). */
struct kvr_event {
	__u8	kind;		/* enum kvr_event_kind */
	__u8	pad[3];
	__u32	svc_id;		/* struct kvr_svc.id */
	__u32	be_id;		/* the backend the session is bound to */
	__u32	prev_be_id;	/* BIND: the backend it left, KVR_NO_BACKEND if new */
	__u64	key;		/* struct kvr_aff_key.key */
};
_Static_assert(sizeof(struct kvr_event) == 24, "kvr_event size");

/* ---- Packet path (tc): NodePort, externalIPs, LoadBalancer IPs --------------------------
 * Traffic that arrives at a node from outside has no local socket to rewrite: a tc
 * program DNATs it to a backend of the same tables and tracks the flow (bpf/lib/conntrack.h).
 * Addresses in conntrack records are 16 bytes (an IPv4 address in word 0, the rest 0)
 * so IPv6 can use the same records; frontends are keyed like services (kvr_l4_key, its
 * 16-byte address form), so IPv6 frontends can share kvr_np_fe_v1 when they come.
 */

/* struct kvr_np_fe.flags */
#define KVR_NP_F_LOCAL		(1U << 0)	/* externalTrafficPolicy: Local: local backends
						 * only, client address kept (no SNAT) */
#define KVR_NP_F_NODEPORT	(1U << 1)	/* a NodePort: key ::ffff:0.0.0.0, any node
						 * address */

/* Value of kvr_np_fe_v1, keyed by the frontend's kvr_l4_key (::ffff:0.0.0.0 for a
 * NodePort, an external IP as ::ffff:a.b.c.d). */
struct kvr_np_fe {
	struct kvr_l4_key svc;	/* the Service's own key in kvr_svc_v2: its table, its
				 * affinity, its hash identity (same backend as a connect) */
	__u32	flags;		/* KVR_NP_F_* */
	__u32	pad;
};
_Static_assert(sizeof(struct kvr_np_fe) == 28, "kvr_np_fe size");

/* Most local backends one service has on one node (kvr_np_local_v1). */
#define KVR_NP_LOCAL_MAX	32

/* Value of kvr_np_local_v1: a service's backends on this node, by service id. Written
 * by the agent; decides SNAT (remote backends only) and the externalTrafficPolicy: Local
 * pick. */
struct kvr_np_local {
	__u32	n;		/* valid entries in be_id */
	__u32	pad;
	__u32	be_id[KVR_NP_LOCAL_MAX];
};
_Static_assert(sizeof(struct kvr_np_local) == 136, "kvr_np_local size");

/* Value of kvr_np_cfg[0]: the node's packet-path settings, written by the agent. */
struct kvr_np_cfg {
	__be32	snat_addr;	/* source address for flows to remote backends; 0: no SNAT,
				 * such flows are left alone (counted) */
	__u16	snat_min;	/* SNAT source ports, host order, inclusive */
	__u16	snat_max;
};
_Static_assert(sizeof(struct kvr_np_cfg) == 8, "kvr_np_cfg size");

/* struct kvr_ct_key.dir */
#define KVR_CT_ORIG	0	/* client -> frontend, as it arrives */
#define KVR_CT_REPLY	1	/* backend -> client (or -> the SNAT address), as it arrives */

/* Key of kvr_ct_v1: a packet's tuple as it arrives, before any rewrite. */
struct kvr_ct_key {
	__be32	saddr[4];	/* IPv4 in saddr[0], rest 0 */
	__be32	daddr[4];
	__be16	sport;
	__be16	dport;
	__u8	proto;		/* IPPROTO_TCP or IPPROTO_UDP */
	__u8	family;		/* 4 (6 later) */
	__u8	dir;		/* KVR_CT_ORIG or KVR_CT_REPLY */
	__u8	pad;
};
_Static_assert(sizeof(struct kvr_ct_key) == 40, "kvr_ct_key size");

/* struct kvr_ct.flags */
#define KVR_CT_F_SRC		(1U << 0)	/* rewrite the source to (nat_saddr, nat_sport) */
#define KVR_CT_F_DST		(1U << 1)	/* rewrite the destination to (nat_daddr, nat_dport) */
#define KVR_CT_F_SEEN_REPLY	(1U << 2)	/* ORIG: the backend has answered */
#define KVR_CT_F_FIN		(1U << 3)	/* this direction sent a FIN */
#define KVR_CT_F_CLOSING	(1U << 4)	/* both directions sent a FIN: close timeout */

/* Value of kvr_ct_v1: what to do to the packets of one direction of a flow. */
struct kvr_ct {
	__be32	nat_saddr[4];	/* new source (KVR_CT_F_SRC) */
	__be32	nat_daddr[4];	/* new destination (KVR_CT_F_DST) */
	__be16	nat_sport;
	__be16	nat_dport;
	__u32	flags;		/* KVR_CT_F_* */
	__u32	svc_id;		/* struct kvr_svc.id of the flow's service */
	__u32	be_id;		/* backend chosen when the flow began */
	__u32	lifetime_s;	/* idle seconds before the entry is dead */
	__u32	pad;
	__u64	created_ns;	/* bpf_ktime_get_ns() of the flow's first packet */
	__u64	last_ns;	/* bpf_ktime_get_ns() of this direction's last packet */
	__u64	packets;	/* packets of this direction (not atomic: per-CPU races may lose some) */
};
_Static_assert(sizeof(struct kvr_ct) == 80, "kvr_ct size");

/* What the packet path parsed from an IPv4 frame (programs only; network order). */
struct kvr_pkt4 {
	__be32	saddr;
	__be32	daddr;
	__be16	sport;
	__be16	dport;
	__u8	proto;
	__u8	tcp_flags;	/* 0 for UDP */
	__u16	l4_off;		/* offset of the L4 header in the frame */
};
_Static_assert(sizeof(struct kvr_pkt4) == 16, "kvr_pkt4 size");

/* Value of kvr_np_scratch (programs only): a new flow's state handed from tail call to
 * tail call within one run of the program (same CPU, no preemption between them), and
 * room for its two entries off the 512-byte BPF stack. */
struct kvr_np_scratch {
	struct kvr_ct_key	fkey;	/* ORIG */
	struct kvr_ct_key	rkey;	/* REPLY */
	struct kvr_ct		fval;
	struct kvr_ct		rval;
	struct kvr_pkt4		pkt;	/* the packet as parsed */
	struct kvr_np_fe	fe;	/* the frontend it hit */
	__u64			key;	/* the pick's key (client address or random) */
	__u64			now;	/* bpf_ktime_get_ns() of this packet */
	__u32			svc_id;
	__u32			be_id;	/* the pick, or KVR_NO_BACKEND */
	__u32			prev;	/* backend of the binding being replaced */
	__u32			avoid;	/* backend the pick must not take */
};
_Static_assert(sizeof(struct kvr_np_scratch) == 320, "kvr_np_scratch size");

/* Slots of kvr_np_progs. */
#define KVR_NP_PROG_NEW		0	/* tc_np4_new: a new flow's service and pick */
#define KVR_NP_PROG_PICK	1	/* tc_np4_pick: fleet placement, a session that moves */
#define KVR_NP_PROG_NAT		2	/* tc_np4_nat: the entries (SNAT port) and rewrite */
#define KVR_NP_PROG_LOCAL	3	/* tc_np4_local: externalTrafficPolicy: Local pick */
#define KVR_NP_PROGS		4

/* Per-service packet-path counter slots (kvr_np_cnt, per CPU). */
enum kvr_np_cnt {
	KVR_NPC_NEW = 0,	/* flows started (backend picked, conntrack written) */
	KVR_NPC_FWD,		/* client -> backend packets translated */
	KVR_NPC_REV,		/* backend -> client packets translated back */
	KVR_NPC_SNAT,		/* flows SNATed (backend on another node) */
	KVR_NPC_LOCAL,		/* flows to a backend on this node */
	KVR_NPC_NO_BACKEND,	/* nothing usable (for Local: no usable local backend): dropped */
	KVR_NPC_CLOSED,		/* flows closed by RST or a FIN from each side */
	KVR_NPC_MIDFLOW,	/* a TCP packet other than SYN found no entry (evicted or expired
				 * under a live flow): picked again as a new flow */
	KVR_NPC_AFF_HIT,	/* client affinity reused a live binding */
	KVR_NPC_MAX,
};

struct kvr_np_cnt_val {
	__u64	c[KVR_NPC_MAX];
};

/* Why the packet path left a packet alone or dropped it (kvr_np_reasons, per CPU). */
enum kvr_np_reason {
	KVR_NPR_NOT_IP = 0,	/* not IPv4 over Ethernet */
	KVR_NPR_MALFORMED,	/* bad IPv4 header (version, ihl, lengths) */
	KVR_NPR_TRUNCATED,	/* the headers end before the L4 ports / TCP flags */
	KVR_NPR_FRAGMENT,	/* an IPv4 fragment: left to the stack, never tracked */
	KVR_NPR_NO_SERVICE,	/* frontend whose service is gone: left alone */
	KVR_NPR_NO_SNAT_ADDR,	/* remote backend but no SNAT address set: left alone */
	KVR_NPR_NO_SNAT_PORT,	/* no free SNAT port after KVR_SNAT_TRIES: dropped */
	KVR_NPR_CT_FULL,	/* conntrack insert failed: dropped */
	KVR_NPR_REWRITE,	/* a rewrite helper failed: dropped */
	KVR_NPR_EXPIRED,	/* a dead (idle) or closed flow's entries were replaced by a
				 * new flow on the same tuple */
	KVR_NPR_NO_PROG,	/* a tail call of a new flow failed: packet left alone */
	KVR_NPR_NO_ROUTE,	/* no FIB route for a translated packet: left to the stack */
	KVR_NPR_MAX,
};

/* Affinity key of a client seen by the packet path: its IPv4 address, tagged so it
 * never equals a network-namespace cookie (the socket path's client key). */
#define KVR_AFF_KEY_IP4(addr)	((1ULL << 63) | (__u64)(addr))

#endif /* __KVR_ABI_H */
