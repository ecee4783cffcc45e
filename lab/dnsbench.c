/* SPDX-License-Identifier: Apache-2.0 */
/*
 * dnsbench - DNS queries a second over UDP, for `python -m lab.dns bench`.
 *
 * Compiled at bench time by lab/dns.py with the machine's cc (no binary is
 * committed), like lab/connbench.c.
 *
 *   dnsbench ADDR PORT N MODE NAME
 *	N queries (type A for NAME) to ADDR:PORT (IPv4 or IPv6), one at a
 *	time: send, then wait up to one second for the answer. MODE "reuse":
 *	one unconnected socket for all (a long-lived client); "new": a socket
 *	per query, as a stub resolver opens one per lookup (socket, sendto,
 *	recvfrom, close). An answer counts only with the query's id and from
 *	ADDR:PORT itself: through a VIP, a reply whose source was not put back
 *	to the VIP is counted in "wrong_source", not "ok". Prints one JSON
 *	object: counts, latency percentiles in ns and the rate (answered
 *	queries a second over the whole loop).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "benchtime.h"

/* A query for NAME, type A, class IN, recursion desired; returns its length. */
static size_t build_query(unsigned char *buf, size_t cap, const char *name, uint16_t id)
{
	size_t len = 12, label;
	const char *p = name, *dot;

	memset(buf, 0, 12);
	buf[0] = id >> 8;
	buf[1] = id & 0xff;
	buf[2] = 0x01;	/* RD */
	buf[5] = 1;	/* QDCOUNT */
	while (*p) {
		dot = strchr(p, '.');
		label = dot ? (size_t)(dot - p) : strlen(p);
		if (label == 0 || label > 63 || len + label + 6 > cap)
			return 0;
		buf[len++] = (unsigned char)label;
		memcpy(buf + len, p, label);
		len += label;
		p += label + (dot ? 1 : 0);
	}
	buf[len++] = 0;
	buf[len++] = 0;
	buf[len++] = 1;	/* A */
	buf[len++] = 0;
	buf[len++] = 1;	/* IN */
	return len;
}

static int same_peer(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family == AF_INET && b->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;

		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->ss_family == AF_INET6 && b->ss_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;

		return x->sin6_port == y->sin6_port &&
		       !memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr));
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage dst = {0}, src;
	unsigned char query[512], reply[1500];
	uint64_t *lat, start, t0, elapsed;
	long n, i, ok = 0, errors = 0, wrong = 0, last_errno = 0;
	socklen_t dlen, slen;
	int fd = -1, reuse, family;
	size_t qlen;

	if (argc != 6) {
		fprintf(stderr, "usage: %s ADDR PORT N reuse|new NAME\n", argv[0]);
		return 2;
	}
	n = atol(argv[3]);
	reuse = !strcmp(argv[4], "reuse");
	if (n <= 0 || (!reuse && strcmp(argv[4], "new"))) {
		fprintf(stderr, "N must be positive and MODE reuse or new\n");
		return 2;
	}
	if (inet_pton(AF_INET, argv[1], &((struct sockaddr_in *)&dst)->sin_addr) == 1) {
		family = AF_INET;
		((struct sockaddr_in *)&dst)->sin_family = AF_INET;
		((struct sockaddr_in *)&dst)->sin_port = htons((uint16_t)atoi(argv[2]));
		dlen = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, argv[1], &((struct sockaddr_in6 *)&dst)->sin6_addr) == 1) {
		family = AF_INET6;
		((struct sockaddr_in6 *)&dst)->sin6_family = AF_INET6;
		((struct sockaddr_in6 *)&dst)->sin6_port = htons((uint16_t)atoi(argv[2]));
		dlen = sizeof(struct sockaddr_in6);
	} else {
		fprintf(stderr, "not an address: %s\n", argv[1]);
		return 2;
	}
	lat = calloc((size_t)n, sizeof(*lat));
	if (!lat)
		return 1;
	start = now_ns();
	for (i = 0; i < n; i++) {
		struct pollfd pfd;
		ssize_t got;
		int answered = 0;

		if (fd < 0) {
			fd = socket(family, SOCK_DGRAM, 0);
			if (fd < 0) {
				last_errno = errno;
				errors++;
				continue;
			}
		}
		qlen = build_query(query, sizeof(query), argv[5], (uint16_t)i);
		if (qlen == 0) {
			fprintf(stderr, "bad name: %s\n", argv[5]);
			return 2;
		}
		t0 = now_ns();
		if (sendto(fd, query, qlen, 0, (struct sockaddr *)&dst, dlen) < 0) {
			last_errno = errno;
			errors++;
		} else {
			pfd.fd = fd;
			pfd.events = POLLIN;
			while (!answered && poll(&pfd, 1, 1000) == 1) {
				slen = sizeof(src);
				got = recvfrom(fd, reply, sizeof(reply), 0, (struct sockaddr *)&src, &slen);
				if (got < 12 || reply[0] != query[0] || reply[1] != query[1])
					continue;	/* a late answer to an earlier query */
				if (!same_peer(&src, &dst)) {
					wrong++;
					break;
				}
				lat[ok++] = now_ns() - t0;
				answered = 1;
			}
			if (!answered)
				errors++;
		}
		if (!reuse) {
			close(fd);
			fd = -1;
		}
	}
	elapsed = now_ns() - start;
	if (fd >= 0)
		close(fd);
	qsort(lat, (size_t)ok, sizeof(*lat), cmp_u64);
	printf("{\"n\": %ld, \"ok\": %ld, \"errors\": %ld, \"wrong_source\": %ld, "
	       "\"errno\": %ld, \"p50_ns\": %llu, \"p99_ns\": %llu, \"rate\": %.1f}\n",
	       n, ok, errors, wrong, last_errno, (unsigned long long)(ok ? pct(lat, (size_t)ok, 50) : 0),
	       (unsigned long long)(ok ? pct(lat, (size_t)ok, 99) : 0),
	       elapsed ? (double)ok * 1e9 / (double)elapsed : 0.0);
	free(lat);
	return ok ? 0 : 1;
}
