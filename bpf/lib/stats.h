/* SPDX-License-Identifier: Apache-2.0 */
/* Counter helpers. Entries are created here on first use, not by the agent:
 * inserting into a per-CPU hash costs about 10 us in the kernel, which would
 * dominate applying 100,000 backends, while the first connect pays it once. */
#ifndef __KVR_STATS_H
#define __KVR_STATS_H

#include "maps.h"

static __always_inline void kvr_reason_inc(__u32 reason)
{
	u64 *v = kvr_reasons_v2.lookup(&reason);

	if (v)
		*v += 1;
}

static __always_inline void kvr_svc_inc(__u32 svc_id, __u32 slot)
{
	struct kvr_svc_cnt_val zero = {};
	struct kvr_svc_cnt_val *v = kvr_svc_cnt_v3.lookup_or_try_init(&svc_id, &zero);

	if (v && slot < KVR_SC_MAX)
		v->c[slot] += 1;
}

/* For events that may come after the service is gone (a late UDP reply): count
 * only into an entry that exists, never re-create one for a removed id. */
static __always_inline void kvr_svc_inc_live(__u32 svc_id, __u32 slot)
{
	struct kvr_svc_cnt_val *v = kvr_svc_cnt_v3.lookup(&svc_id);

	if (v && slot < KVR_SC_MAX)
		v->c[slot] += 1;
}

static __always_inline void kvr_be_inc(__u32 be_id, __u32 slot)
{
	struct kvr_be_cnt_val zero = {};
	struct kvr_be_cnt_val *v = kvr_be_cnt.lookup_or_try_init(&be_id, &zero);

	if (v && slot < KVR_BC_MAX)
		v->c[slot] += 1;
}

#endif /* __KVR_STATS_H */
