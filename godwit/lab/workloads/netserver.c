/*
 * netserver: a TCP + UDP counter server, a live-migration test workload for godwit.
 *
 *   netserver PORT
 *
 * TCP on 0.0.0.0:PORT: every request line "N\n" is answered with "N C\n", where C counts
 * the requests received on that connection so far (1, 2, ...). A client that numbers its
 * requests 1, 2, ... on one connection sees C == N on every reply; a lost or duplicated
 * request shows up as C != N.
 *
 * UDP on 0.0.0.0:PORT: every datagram "N" (a trailing newline is ignored) is answered
 * with "N C\n", where C counts the datagrams the server has received from any peer.
 *
 * One thread, poll(); stdio is not used, so CRIU can dump it at any time (with
 * --tcp-established once a connection is open). SIGTERM/SIGINT exit 0 (needed: as PID 1
 * of a pid namespace, default-disposition signals are ignored).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 64
#define LINE_MAX_LEN 64

struct conn {
	int fd;
	unsigned long count;
	size_t used;
	char line[LINE_MAX_LEN];
};

static volatile sig_atomic_t stop_requested;
static struct conn conns[MAX_CONNS];

static void on_stop(int sig)
{
	(void)sig;
	stop_requested = 1;
}

static int open_socket(int type, int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1;
	int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	addr.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		return -1;
	if (type == SOCK_STREAM && listen(fd, 16) < 0)
		return -1;
	return fd;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static void drop(struct conn *c)
{
	close(c->fd);
	c->fd = -1;
}

/* Answer every complete line in the connection's buffer. */
static int answer_lines(struct conn *c)
{
	char *nl;

	while ((nl = memchr(c->line, '\n', c->used)) != NULL) {
		char reply[LINE_MAX_LEN + 32];
		size_t len = (size_t)(nl - c->line);
		int n;

		c->count++;
		n = snprintf(reply, sizeof(reply), "%.*s %lu\n", (int)len, c->line, c->count);
		if (write_all(c->fd, reply, (size_t)n) < 0)
			return -1;
		c->used -= len + 1;
		memmove(c->line, nl + 1, c->used);
	}
	return c->used == sizeof(c->line) ? -1 : 0; /* a line too long: drop the peer */
}

static void read_conn(struct conn *c)
{
	ssize_t n = read(c->fd, c->line + c->used, sizeof(c->line) - c->used);

	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n <= 0) {
		drop(c);
		return;
	}
	c->used += (size_t)n;
	if (answer_lines(c) < 0)
		drop(c);
}

static void accept_conn(int listener)
{
	int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
	int one = 1;

	if (fd < 0)
		return;
	for (int i = 0; i < MAX_CONNS; i++) {
		if (conns[i].fd < 0) {
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			conns[i] = (struct conn){ .fd = fd };
			return;
		}
	}
	close(fd);
}

static void answer_datagram(int udp, unsigned long *count)
{
	struct sockaddr_storage peer;
	socklen_t peer_len = sizeof(peer);
	char buf[LINE_MAX_LEN], reply[LINE_MAX_LEN + 32];
	ssize_t n = recvfrom(udp, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &peer_len);
	int len;

	if (n < 0)
		return;
	while (n > 0 && buf[n - 1] == '\n')
		n--;
	(*count)++;
	len = snprintf(reply, sizeof(reply), "%.*s %lu\n", (int)n, buf, *count);
	sendto(udp, reply, (size_t)len, 0, (struct sockaddr *)&peer, peer_len);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_stop };
	unsigned long udp_count = 0;
	int listener, udp;

	if (argc != 2 || atoi(argv[1]) <= 0 || atoi(argv[1]) > 65535)
		return 2;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	listener = open_socket(SOCK_STREAM, atoi(argv[1]));
	udp = open_socket(SOCK_DGRAM, atoi(argv[1]));
	if (listener < 0 || udp < 0)
		return 1;
	for (int i = 0; i < MAX_CONNS; i++)
		conns[i].fd = -1;

	while (!stop_requested) {
		struct pollfd fds[MAX_CONNS + 2];
		int slot[MAX_CONNS + 2];
		int nfds = 2;

		fds[0] = (struct pollfd){ .fd = listener, .events = POLLIN };
		fds[1] = (struct pollfd){ .fd = udp, .events = POLLIN };
		for (int i = 0; i < MAX_CONNS; i++) {
			if (conns[i].fd >= 0) {
				slot[nfds] = i;
				fds[nfds++] = (struct pollfd){ .fd = conns[i].fd, .events = POLLIN };
			}
		}
		if (poll(fds, (nfds_t)nfds, -1) < 0)
			continue; /* EINTR: re-check stop_requested */
		if (fds[0].revents)
			accept_conn(listener);
		if (fds[1].revents)
			answer_datagram(udp, &udp_count);
		for (int i = 2; i < nfds; i++)
			if (fds[i].revents)
				read_conn(&conns[slot[i]]);
	}
	return 0;
}
