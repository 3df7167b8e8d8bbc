/*
 * netbench: load for `mq serve`, written against the wire protocol alone
 * (man/mq-protocol.7), as a client in another language would be.  Run by
 * `make bench` (tests/bench.sh); not a test.
 *
 *   netbench put   HOST PORT QUEUE -c CONNS -n MSGS -b PER_PUT -d DEPTH
 *       CONNS processes each send MSGS/CONNS 100-byte messages in PUT
 *       requests of PER_PUT frames, keeping DEPTH requests unanswered.
 *   netbench lease HOST PORT QUEUE -c CONNS -b COUNT
 *       CONNS processes loop GET group=w count=COUNT lease=60000 and ACK
 *       the receipts until a GET brings nothing.
 *   netbench lat   HOST PORT QUEUE -n MSGS
 *       one process waits in GET wait=0 while another puts MSGS single
 *       messages, 2 ms apart, each carrying its send time; prints the
 *       median and p99 of put-to-delivery in microseconds.
 *
 * put and lease print "MSGS msgs in SECONDS s: RATE msgs/s".  Exits 0,
 * or 1 on an error answer, a broken connection or a miscount.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *host, *queue;
static int port;

static int64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void die(const char *what)
{
	fprintf(stderr, "netbench[%ld]: %s\n", (long)getpid(), what);
	exit(1);
}

/* A connection with a read buffer. */
struct conn {
	int fd;
	char *buf;
	size_t len, pos, cap;
};

static void c_open(struct conn *c)
{
	struct sockaddr_in sa = {0};
	int one = 1;
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		die("bad host (an IPv4 address)");
	c->fd = socket(AF_INET, SOCK_STREAM, 0);
	if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		die("cannot connect");
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	c->cap = 1 << 20;
	c->buf = malloc(c->cap);
	c->len = c->pos = 0;
}

static void c_send(struct conn *c, const char *p, size_t n)
{
	while (n) {
		ssize_t k = send(c->fd, p, n, MSG_NOSIGNAL);
		if (k <= 0)
			die("send failed");
		p += k;
		n -= (size_t)k;
	}
}

/* The next line, NUL-terminated, newline removed. */
static char *c_line(struct conn *c)
{
	for (;;) {
		char *nl = memchr(c->buf + c->pos, '\n', c->len - c->pos);
		if (nl) {
			char *l = c->buf + c->pos;
			*nl = 0;
			c->pos = (size_t)(nl - c->buf) + 1;
			return l;
		}
		if (c->pos) {
			memmove(c->buf, c->buf + c->pos, c->len - c->pos);
			c->len -= c->pos;
			c->pos = 0;
		}
		if (c->len == c->cap && !(c->buf = realloc(c->buf, c->cap *= 2)))
			die("out of memory");
		ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
		if (k <= 0)
			die("server closed the connection");
		c->len += (size_t)k;
	}
}

/* Skip n body bytes and the newline after them; returns a copy's start
 * only while the buffer is not refilled (enough for 100-byte bodies). */
static char *c_body(struct conn *c, size_t n)
{
	while (c->len - c->pos < n + 1) {
		if (c->pos) {
			memmove(c->buf, c->buf + c->pos, c->len - c->pos);
			c->len -= c->pos;
			c->pos = 0;
		}
		ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
		if (k <= 0)
			die("server closed the connection");
		c->len += (size_t)k;
	}
	char *b = c->buf + c->pos;
	c->pos += n + 1;
	return b;
}

static void expect_ok(struct conn *c)
{
	char *l = c_line(c);
	if (strncmp(l, "OK", 2)) {
		fprintf(stderr, "netbench: answer: %s\n", l);
		exit(1);
	}
}

static void put_worker(uint64_t n, uint64_t per, uint64_t depth)
{
	struct conn c;
	char body[101], *req;
	size_t len = 0;
	memset(body, 'x', 100);
	body[100] = '\n';
	c_open(&c);
	if (!(req = malloc(64 + per * 110)))
		die("out of memory");
	uint64_t sent = 0, ahead = 0;
	while (sent < n || ahead) {
		if (sent < n && ahead < depth) {
			uint64_t k = n - sent < per ? n - sent : per;
			len = (size_t)sprintf(req, "PUT %s %" PRIu64 "\n", queue, k);
			for (uint64_t i = 0; i < k; i++) {
				memcpy(req + len, "100\n", 4);
				memcpy(req + len + 4, body, 101);
				len += 105;
			}
			c_send(&c, req, len);
			sent += k;
			ahead++;
			continue;
		}
		expect_ok(&c);
		ahead--;
	}
	exit(0);
}

static void lease_worker(uint64_t count, int id)
{
	struct conn c;
	char line[128], *ack = malloc(64 + count * 48);
	uint64_t got = 0;
	c_open(&c);
	for (;;) {
		int n = snprintf(line, sizeof line, "GET %s group=w count=%" PRIu64 " lease=60000\n",
		                 queue, count);
		c_send(&c, line, (size_t)n);
		size_t al = (size_t)sprintf(ack, "ACK %s", queue);
		uint64_t k = 0;
		for (;;) {
			char *l = c_line(&c);
			unsigned part, attempt;
			uint64_t off, blen, lease;
			int64_t ts;
			if (!strncmp(l, "OK", 2))
				break;
			if (sscanf(l, "MSG %u %" SCNu64 " %" SCNd64 " %u %" SCNu64 " %" SCNu64, &part, &off,
			           &ts, &attempt, &lease, &blen) != 6) {
				fprintf(stderr, "netbench: answer: %s\n", l);
				exit(1);
			}
			c_body(&c, blen);
			al += (size_t)sprintf(ack + al, " w:%u:%" PRIu64 ":%" PRIu64, part, off, lease);
			k++;
		}
		if (k == 0)
			break;
		ack[al++] = '\n';
		c_send(&c, ack, al);
		char *l = c_line(&c);
		if (strncmp(l, "OK", 2) || strchr(l + 3, ' ') == NULL) {
			fprintf(stderr, "netbench: ack answer: %s\n", l);
			exit(1);
		}
		for (char *p = strchr(l + 3, ' ') + 1; *p; p++) /* every result 1: acked */
			if (*p != '1' && *p != ',') {
				fprintf(stderr, "netbench: ack results: %s\n", l);
				exit(1);
			}
		got += k;
	}
	(void)id;
	printf("%" PRIu64 "\n", got);
	exit(0);
}

static int cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static void latency(uint64_t n)
{
	int64_t *lat = calloc(n, sizeof *lat);
	int pfd[2];
	if (!lat || pipe(pfd) < 0)
		die("setup");
	pid_t pid = fork();
	if (pid == 0) { /* the producer: starts once the consumer waits */
		struct conn c;
		char ch, req[256];
		close(pfd[1]);
		if (read(pfd[0], &ch, 1) != 1)
			die("go");
		c_open(&c);
		for (uint64_t i = 0; i < n; i++) {
			char body[32];
			int bl = snprintf(body, sizeof body, "%020" PRId64, now_us());
			int k = snprintf(req, sizeof req, "PUT %s 1\n%d\n%s\n", queue, bl, body);
			c_send(&c, req, (size_t)k);
			expect_ok(&c);
			usleep(2000);
		}
		exit(0);
	}
	struct conn c;
	char req[128];
	c_open(&c);
	int rl = snprintf(req, sizeof req, "GET %s group=lat count=0 wait=0\n", queue);
	uint64_t got = 0;
	close(pfd[0]);
	c_send(&c, req, (size_t)rl);
	if (write(pfd[1], "g", 1) != 1)
		die("go");
	while (got < n) {
		char *l = c_line(&c);
		if (!strncmp(l, "OK", 2)) {
			c_send(&c, req, (size_t)rl);
			continue;
		}
		unsigned part, attempt;
		uint64_t off, blen, lease;
		int64_t ts;
		if (sscanf(l, "MSG %u %" SCNu64 " %" SCNd64 " %u %" SCNu64 " %" SCNu64, &part, &off, &ts,
		           &attempt, &lease, &blen) != 6)
			die("bad MSG line");
		char *b = c_body(&c, blen);
		lat[got++] = now_us() - strtoll(b, NULL, 10);
	}
	waitpid(pid, NULL, 0);
	qsort(lat, n, sizeof *lat, cmp64);
	printf("%" PRId64 " %" PRId64 "\n", lat[n / 2], lat[n * 99 / 100]);
	exit(0);
}

/* netbench fsync DIR: the disk's floor for acks that each wait for an
 * fdatasync: append 100 B to a fresh file and fdatasync it, n times (as
 * a segment grows); prints the median and p99 in microseconds. */
static void fsync_floor(const char *dir, uint64_t n)
{
	char path[4096], b[100];
	snprintf(path, sizeof path, "%s/netbench-fsync", dir);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
	int64_t *t = calloc(n, sizeof *t);
	if (fd < 0 || !t)
		die("open");
	memset(b, 'x', sizeof b);
	for (uint64_t i = 0; i < n; i++) {
		int64_t t0 = now_us();
		if (write(fd, b, sizeof b) != (ssize_t)sizeof b || fdatasync(fd) < 0)
			die("write");
		t[i] = now_us() - t0;
	}
	close(fd);
	unlink(path);
	qsort(t, n, sizeof *t, cmp64);
	printf("%" PRId64 " %" PRId64 "\n", t[n / 2], t[n * 99 / 100]);
	exit(0);
}

/* netbench pingpong: a one-byte round trip between two processes over a
 * socketpair, median in microseconds: what an ack costs a producer that
 * waits for it, before any work. */
static void pingpong(uint64_t n)
{
	int sv[2];
	char c = 'x';
	int64_t *t = calloc(n, sizeof *t);
	if (!t || socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
		die("socketpair");
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		while (read(sv[1], &c, 1) == 1 && write(sv[1], &c, 1) == 1)
			;
		_exit(0);
	}
	close(sv[1]);
	for (uint64_t i = 0; i < n; i++) {
		int64_t t0 = now_us();
		if (write(sv[0], &c, 1) != 1 || read(sv[0], &c, 1) != 1)
			die("pingpong");
		t[i] = now_us() - t0;
	}
	close(sv[0]);
	waitpid(pid, NULL, 0);
	qsort(t, n, sizeof *t, cmp64);
	printf("%" PRId64 " %" PRId64 "\n", t[n / 2], t[n * 99 / 100]);
	exit(0);
}

int main(int argc, char **argv)
{
	uint64_t n = 100000, per = 100, depth = 8;
	int conns = 1;
	if (argc == 3 && !strcmp(argv[1], "fsync"))
		fsync_floor(argv[2], 2000);
	if (argc == 2 && !strcmp(argv[1], "pingpong"))
		pingpong(5000);
	if (argc < 5) {
		fprintf(stderr, "usage: netbench put|lease|lat HOST PORT QUEUE [-c N] [-n N] [-b N] "
		        "[-d N]\n       netbench fsync DIR | pingpong\n");
		return 64;
	}
	host = argv[2];
	port = atoi(argv[3]);
	queue = argv[4];
	for (int i = 5; i + 1 < argc; i += 2) {
		uint64_t v = strtoull(argv[i + 1], NULL, 10);
		if (!strcmp(argv[i], "-c"))
			conns = (int)v;
		else if (!strcmp(argv[i], "-n"))
			n = v;
		else if (!strcmp(argv[i], "-b"))
			per = v;
		else if (!strcmp(argv[i], "-d"))
			depth = v;
	}
	if (!strcmp(argv[1], "lat"))
		latency(n);
	int lease = !strcmp(argv[1], "lease");
	int out[2];
	if (pipe(out) < 0)
		die("pipe");
	fflush(NULL);
	int64_t t0 = now_us();
	for (int i = 0; i < conns; i++) {
		if (fork() == 0) {
			dup2(out[1], 1);
			if (lease)
				lease_worker(per, i);
			put_worker(n / (uint64_t)conns + (i < (int)(n % (uint64_t)conns)), per, depth);
		}
	}
	close(out[1]);
	int st, bad = 0;
	while (wait(&st) > 0)
		bad |= !WIFEXITED(st) || WEXITSTATUS(st);
	double s = (double)(now_us() - t0) / 1e6;
	uint64_t total = 0;
	if (lease) {
		FILE *f = fdopen(out[0], "r");
		uint64_t v;
		while (f && fscanf(f, "%" SCNu64, &v) == 1)
			total += v;
	} else {
		total = n;
	}
	if (bad)
		die("a worker failed");
	printf("%" PRIu64 " msgs in %.3f s: %.0f msgs/s\n", total, s, (double)total / s);
	return 0;
}
