/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Timing helpers shared by the lab's compiled clients (connbench.c, dnsbench.c);
 * lab/connbench.py's build() hashes this file with the client it compiles.
 */
#ifndef KVR_BENCHTIME_H
#define KVR_BENCHTIME_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array of n >= 1 values. */
static uint64_t pct(const uint64_t *v, size_t n, double p)
{
	size_t rank = (size_t)(p / 100.0 * (double)n + 0.999999);

	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return v[rank - 1];
}

#endif /* KVR_BENCHTIME_H */
