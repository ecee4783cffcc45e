/* SPDX-License-Identifier: Apache-2.0 */
/*
 * httpserve: a minimal HTTP/1.1 server for the NodePort benchmark (lab/bench_nodeport.py),
 * fast enough that the packet path, not the server, is what a NodePort-vs-direct
 * comparison measures (the lab's Python podserver tops out far below).
 *
 *   httpserve PORT
 *
 * One thread, epoll. Every request (a head ending in CRLFCRLF; bodies are not read) gets
 * "200 OK" with a 2-byte body. A request with "Connection: close" is answered with it,
 * and the client closes first: TIME_WAIT stays with the client, which never reuses a
 * port in it, instead of piling up here, where a reused client port meets a TIME_WAIT
 * socket and its SYN waits a second (PAWS) whatever the path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define BUF 16384

static const char OK[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
static const char OK_CLOSE[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

/* Answer every complete request head in buf[0..len); returns 1 when the connection must
 * close, and moves an incomplete head to the front (*len updated). */
static int serve(int fd, char *buf, size_t *len)
{
	char *start = buf, *end;

	buf[*len] = '\0';
	while ((end = strstr(start, "\r\n\r\n")) != NULL) {
		int close_it;

		*end = '\0';
		close_it = strcasestr(start, "connection: close") != NULL;
		if (close_it) {
			if (write(fd, OK_CLOSE, sizeof(OK_CLOSE) - 1) < 0)
				return 1;
		} else if (write(fd, OK, sizeof(OK) - 1) < 0) {
			return 1;
		}
		start = end + 4;
	}
	*len -= (size_t)(start - buf);
	memmove(buf, start, *len);
	return *len >= BUF - 1;	/* a head that does not fit: refuse it */
}

int main(int argc, char **argv)
{
	struct epoll_event ev, evs[MAX_EVENTS];
	struct sockaddr_in addr = { .sin_family = AF_INET };
	static char bufs[4096][BUF];
	static size_t lens[4096];
	int one = 1, lfd, ep, n, i;

	if (argc != 2) {
		fprintf(stderr, "usage: httpserve PORT\n");
		return 2;
	}
	addr.sin_port = htons((unsigned short)atoi(argv[1]));
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 4096)) {
		perror("httpserve: listen");
		return 1;
	}
	ep = epoll_create1(EPOLL_CLOEXEC);
	ev.events = EPOLLIN;
	ev.data.fd = lfd;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	for (;;) {
		n = epoll_wait(ep, evs, MAX_EVENTS, -1);
		for (i = 0; i < n; i++) {
			int fd = evs[i].data.fd, c;
			ssize_t got;

			if (fd == lfd) {
				while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
					if (c >= 4096) {
						close(c);
						continue;
					}
					lens[c] = 0;
					ev.events = EPOLLIN;
					ev.data.fd = c;
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
				}
				continue;
			}
			got = read(fd, bufs[fd] + lens[fd], BUF - 1 - lens[fd]);
			if (got <= 0) {
				if (got < 0 && (errno == EAGAIN || errno == EINTR))
					continue;
				close(fd);
				continue;
			}
			lens[fd] += (size_t)got;
			if (serve(fd, bufs[fd], &lens[fd]))
				close(fd);
		}
	}
}
