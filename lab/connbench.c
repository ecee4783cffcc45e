/* SPDX-License-Identifier: Apache-2.0 */
/*
 * connbench - time connect() alone, for `python -m lab.bench --only connect`.
 *
 * Compiled at bench time by lab/connbench.py with the machine's cc (no binary is
 * committed). Two modes:
 *
 *   connbench connect ADDR PORT N [WARMUP [TAG [SEED]]]
 *	N connects (after WARMUP unmeasured ones) to ADDR:PORT. Each socket:
 *	socket(), an optional session tag with setsockopt(SOL_KVROUTE 0x6b76,
 *	KVROUTE_SESSION 1, u64), connect() timed with CLOCK_MONOTONIC around the
 *	call alone, then SO_LINGER {1, 0} and close() (an RST: no TIME_WAIT, so
 *	the local ports never run out). TAG: "none" (default), "new" (a new tag
 *	per connect: every connect is a new session) or "fixed" (one tag for all:
 *	a live session). Prints one JSON object: the count, errors, latency
 *	percentiles in ns and the rate (connects a second over the whole loop).
 *
 *   connbench serve PORT...
 *	Accepts and closes connections on every PORT (0.0.0.0) from one epoll
 *	loop, fast enough that no accept queue ever overflows (an overflow drops
 *	a SYN: a one second retransmit in the client's tail).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "benchtime.h"

#define SOL_KVROUTE	0x6b76	/* dataplane/client.py SOL_KVROUTE */
#define KVROUTE_SESSION	1	/* dataplane/client.py KVROUTE_SESSION */
#define MAX_PORTS	64

/* One connect; its latency in ns, or 0 with errno set on failure. */
static uint64_t one(const struct sockaddr_in *to, int tag, uint64_t session)
{
	static const struct linger rst = { .l_onoff = 1, .l_linger = 0 };
	uint64_t t0, t1;
	int fd, rc, err;

	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	if (tag && setsockopt(fd, SOL_KVROUTE, KVROUTE_SESSION, &session, sizeof(session))) {
		err = errno;
		close(fd);
		errno = err;
		return 0;
	}
	t0 = now_ns();
	rc = connect(fd, (const struct sockaddr *)to, sizeof(*to));
	t1 = now_ns();
	err = errno;
	setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst));
	close(fd);
	if (rc) {
		errno = err;
		return 0;
	}
	return t1 > t0 ? t1 - t0 : 1;
}

static int run_connect(int argc, char **argv)
{
	struct sockaddr_in to = { .sin_family = AF_INET };
	long n, warmup = 0, i, ok = 0, errors = 0;
	uint64_t session, t, *lat, started, elapsed, sum = 0;
	int tag = 0, fixed = 0, first_errno = 0;

	if (argc < 5) {
		fprintf(stderr, "usage: connbench connect ADDR PORT N [WARMUP [TAG [SEED]]]\n");
		return 2;
	}
	if (inet_pton(AF_INET, argv[2], &to.sin_addr) != 1) {
		fprintf(stderr, "connbench: bad IPv4 address %s\n", argv[2]);
		return 2;
	}
	to.sin_port = htons((uint16_t)atoi(argv[3]));
	n = atol(argv[4]);
	if (argc > 5)
		warmup = atol(argv[5]);
	if (argc > 6 && strcmp(argv[6], "none")) {
		tag = 1;
		fixed = !strcmp(argv[6], "fixed");
		if (!fixed && strcmp(argv[6], "new")) {
			fprintf(stderr, "connbench: TAG must be none, new or fixed\n");
			return 2;
		}
	}
	/* Tags of one run never meet another run's: the seed picks the high bits. */
	session = argc > 7 ? strtoull(argv[7], NULL, 0) : ((uint64_t)getpid() << 32 | 1);
	if (session == 0)
		session = 1;
	if (n < 1 || warmup < 0) {
		fprintf(stderr, "connbench: N must be >= 1 and WARMUP >= 0\n");
		return 2;
	}
	lat = calloc((size_t)n, sizeof(*lat));
	if (!lat)
		return 1;
	for (i = 0; i < warmup; i++) {
		if (!one(&to, tag, session) && !first_errno)
			first_errno = errno;
		if (!fixed)
			session++;
	}
	started = now_ns();
	for (i = 0; i < n; i++) {
		t = one(&to, tag, session);
		if (!fixed)
			session++;
		if (!t) {
			if (!first_errno)
				first_errno = errno;
			errors++;
			continue;
		}
		lat[ok++] = t;
		sum += t;
	}
	elapsed = now_ns() - started;
	if (!ok) {
		printf("{\"n\": %ld, \"ok\": 0, \"errors\": %ld, \"errno\": %d, \"error\": \"%s\"}\n",
		       n, errors, first_errno, strerror(first_errno));
		free(lat);
		return 1;
	}
	qsort(lat, (size_t)ok, sizeof(*lat), cmp_u64);
	printf("{\"n\": %ld, \"ok\": %ld, \"errors\": %ld, \"errno\": %d, "
	       "\"min_ns\": %" PRIu64 ", \"p50_ns\": %" PRIu64 ", \"p90_ns\": %" PRIu64
	       ", \"p99_ns\": %" PRIu64 ", \"max_ns\": %" PRIu64 ", \"mean_ns\": %" PRIu64
	       ", \"elapsed_ns\": %" PRIu64 ", \"rate\": %.1f}\n",
	       n, ok, errors, first_errno, lat[0], pct(lat, (size_t)ok, 50),
	       pct(lat, (size_t)ok, 90), pct(lat, (size_t)ok, 99), lat[ok - 1], sum / (uint64_t)ok,
	       elapsed, (double)n * 1e9 / (double)(elapsed ? elapsed : 1));
	free(lat);
	return 0;
}

static int run_serve(int argc, char **argv)
{
	struct epoll_event ev, evs[MAX_PORTS];
	int ep, i, n, one_ = 1, fd, c;

	if (argc < 3 || argc - 2 > MAX_PORTS) {
		fprintf(stderr, "usage: connbench serve PORT... (at most %d)\n", MAX_PORTS);
		return 2;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0) {
		perror("epoll_create1");
		return 1;
	}
	for (i = 2; i < argc; i++) {
		struct sockaddr_in at = { .sin_family = AF_INET,
					  .sin_port = htons((uint16_t)atoi(argv[i])) };

		fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one_, sizeof(one_)) ||
		    bind(fd, (struct sockaddr *)&at, sizeof(at)) || listen(fd, 4096)) {
			fprintf(stderr, "connbench: port %s: %s\n", argv[i], strerror(errno));
			return 1;
		}
		ev.events = EPOLLIN;
		ev.data.fd = fd;
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) {
			perror("epoll_ctl");
			return 1;
		}
	}
	printf("{\"listening\": %d}\n", argc - 2);
	fflush(stdout);
	for (;;) {
		n = epoll_wait(ep, evs, MAX_PORTS, -1);
		if (n < 0 && errno != EINTR) {
			perror("epoll_wait");
			return 1;
		}
		for (i = 0; i < n; i++) {
			while ((c = accept4(evs[i].data.fd, NULL, NULL, SOCK_CLOEXEC)) >= 0)
				close(c);
		}
	}
}

int main(int argc, char **argv)
{
	if (argc >= 2 && !strcmp(argv[1], "connect"))
		return run_connect(argc, argv);
	if (argc >= 2 && !strcmp(argv[1], "serve"))
		return run_serve(argc, argv);
	fprintf(stderr, "usage: connbench connect ADDR PORT N [WARMUP [TAG [SEED]]]\n"
			"       connbench serve PORT...\n");
	return 2;
}
