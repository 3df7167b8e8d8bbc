/*
 * mq - a durable message queue in one C file.
 *
 * mq keeps queues in a spool directory.  Each queue is a directory of
 * partitions; each partition is an append-only log of checksummed batches
 * split into segment files, with a derived offset index and time index per
 * segment, a head file naming where durable (published) data ends, and
 * consumer-group offset files.  Processes coordinate with flock(2): one
 * writer per partition, one consumer per group and partition, readers take
 * no lock.  The formats are documented byte by byte in mq.h.
 *
 * Layers, bottom up; a layer calls only lower-numbered ones, and nothing
 * below layer 14 prints or exits:
 *
 *   1. Utilities: errors, buffers, numbers, durations, names, clock
 *   2. Durable files: the syscall table, full writes, fsync, locks
 *   3. Configuration: settings table, mq.yaml and queue meta (libyaml)
 *   4. Record format: batch encode/decode, crc, compression (pure)
 *   5. Segments: segment files, index and time index, tail scan
 *   6. Partitions and queues: open/create, append, recover, read, retain
 *   7. Consumer groups: offset files and consumption-driven retention
 *   8. Messages waiting outside their partition: delays, transactions
 *   9. Producer: batching, partition choice and the sync policy
 *  10. Verification and repair
 *  11. Delivery: claims, leases, acks, retries and dead letters
 *  12. Wire protocol: requests, escapes, message frames, the client
 *  13. Server: the event loop, connections, group commit, the verbs
 *  14. CLI: option parser, output formats, commands and the command table
 *  15. main
 *
 * Build switches: MQ_TEST compiles without main() for tests/unit.c, which
 * includes this file; MQ_FAULTS adds fault injection to the syscall table,
 * driven by the MQ_FAULT environment variable (see dur_fault_init()).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* O_CLOEXEC, memmem, fdatasync on older libcs */
#endif
#include <assert.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#include <sys/inotify.h>
#endif

#include <yaml.h>
#include <zlib.h>

#include "mq.h"

#ifndef O_NOFOLLOW
#define O_NOFOLLOW 0
#endif

/* ===================================================================
 * 1. Utilities: errors, buffers, numbers, durations, names, clock
 *
 * Pure helpers with no I/O besides the clock.  Errors travel in a
 * struct mq_err filled by the deepest function that knows the cause.
 * =================================================================== */

/* snprintf through a va_list: every path in mq is built from a spool
 * path capped in spool_init() plus short names, so it always fits; this
 * wrapper keeps that single argument out of gcc's truncation guesses. */
static int strfmt(char *out, size_t n, const char *f, ...)
	__attribute__((format(printf, 3, 4)));
static int strfmt(char *out, size_t n, const char *f, ...)
{
	va_list ap;
	va_start(ap, f);
	int r = vsnprintf(out, n, f, ap);
	va_end(ap);
	return r;
}

struct mq_err {
	int code;      /* an enum mq_exit value: how the CLI should exit */
	int sys;       /* saved errno, 0 if none */
	char msg[768]; /* one lower-case line, no final full stop */
};

static int err_vset(struct mq_err *e, int code, int sys, const char *fmt,
                    va_list ap)
{
	if (!e)
		return -1;
	e->code = code;
	e->sys = sys;
	vsnprintf(e->msg, sizeof e->msg, fmt, ap);
	if (sys) {
		size_t n = strlen(e->msg);
		strfmt(e->msg + n, sizeof e->msg - n, ": %s", strerror(sys));
	}
	return -1;
}

/* Fill e with code and a message; returns -1 so callers can return it. */
static int err_set(struct mq_err *e, int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	err_vset(e, code, 0, fmt, ap);
	va_end(ap);
	return -1;
}

/* Like err_set, appending strerror(errno); errno is read first. */
static int err_sys(struct mq_err *e, int code, const char *fmt, ...)
{
	int sys = errno;
	va_list ap;
	va_start(ap, fmt);
	err_vset(e, code, sys, fmt, ap);
	va_end(ap);
	errno = sys;
	return -1;
}

/* Prefix e's message with "path:pos: " (corruption messages say where). */
static int err_prefix(struct mq_err *e, int code, const char *path, uint64_t pos)
{
	char msg[sizeof e->msg];
	strfmt(msg, sizeof msg, "%s", e->msg);
	return err_set(e, code, "%s:%" PRIu64 ": %s", path, pos, msg);
}

/* Exit code for an errno from an I/O call: full disk and I/O are 74. */
static int err_code_for(int sys)
{
	return sys == EWOULDBLOCK || sys == EAGAIN ? MQ_EX_TEMPFAIL : MQ_EX_IOERR;
}

struct buf {
	char *p;
	size_t len, cap; /* bytes used, bytes allocated */
};

/* Make room for n more bytes.  Allocation failure aborts: mq has no
 * useful way to continue without memory and must not half-write. */
static void buf_reserve(struct buf *b, size_t n)
{
	if (b->len + n <= b->cap)
		return;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + n)
		cap *= 2;
	char *p = realloc(b->p, cap);
	if (!p) {
		fprintf(stderr, "mq: out of memory (%zu bytes)\n", cap);
		abort();
	}
	b->p = p;
	b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
	buf_reserve(b, n);
	if (n)
		memcpy(b->p + b->len, p, n);
	b->len += n;
}

static void buf_adds(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

/* NUL-terminate b's contents (the NUL is not counted in len). */
static void buf_addc0(struct buf *b)
{
	buf_reserve(b, 1);
	b->p[b->len] = 0;
}

static void buf_printf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(NULL, 0, fmt, ap);
	va_end(ap);
	buf_reserve(b, (size_t)n + 1);
	va_start(ap, fmt);
	vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

static void buf_free(struct buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

/* Little-endian field access: the only way integers reach the disk. */
static void le16_put(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void le32_put(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}
static void le64_put(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}
static uint16_t le16_get(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32_get(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64_get(const unsigned char *p)
{
	return (uint64_t)le32_get(p) | (uint64_t)le32_get(p + 4) << 32;
}

/* LEB128 varints.  varint_get returns bytes used, or 0 if the input ends
 * early or the value does not fit 64 bits. */
static size_t varint_put(unsigned char *p, uint64_t v)
{
	size_t n = 0;
	while (v >= 0x80) {
		p[n++] = (unsigned char)(v | 0x80);
		v >>= 7;
	}
	p[n++] = (unsigned char)v;
	return n;
}

static size_t varint_get(const unsigned char *p, const unsigned char *end, uint64_t *v)
{
	uint64_t r = 0;
	for (size_t n = 0; n < 10 && p + n < end; n++) {
		r |= (uint64_t)(p[n] & 0x7f) << (7 * n);
		if (!(p[n] & 0x80)) {
			if (n == 9 && p[n] > 1)
				return 0;
			*v = r;
			return n + 1;
		}
	}
	return 0;
}

static uint64_t zigzag(int64_t v) { return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63); }
static int64_t unzigzag(uint64_t v) { return (int64_t)(v >> 1) ^ -(int64_t)(v & 1); }

/* FNV-1a 32-bit: the documented partition hash (mq.h, MQ_KEY_HASH). */
static uint32_t fnv1a(const void *p, size_t n)
{
	const unsigned char *s = p;
	uint32_t h = MQ_FNV_BASIS;
	for (size_t i = 0; i < n; i++)
		h = (h ^ s[i]) * MQ_FNV_PRIME;
	return h;
}

static uint32_t tag_hash(const void *p, size_t n)
{
	uint32_t h = fnv1a(p, n);
	return h ? h : 1;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Queue and group names: [A-Za-z0-9][A-Za-z0-9._-]{0,127}.  Anything else
 * could escape the spool ("../x", "a/b") or hide (".x"). */
static int name_valid(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > MQ_NAME_MAX || !isalnum((unsigned char)s[0]))
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!(isalnum(c) || c == '.' || c == '_' || c == '-') || c >= 0x80)
			return 0;
	}
	return 1;
}

/* Parse an unsigned decimal that must fill the whole string. */
static int parse_u64(const char *s, uint64_t *out)
{
	if (!s || !isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	char *end;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/* Parse NUMBER[suffix] where suffix scales; suffixes is a list of
 * {name, multiplier}.  The result must not overflow int64. */
struct unit {
	const char *name;
	int64_t mul;
};

static int parse_scaled(const char *s, const struct unit *units, int64_t *out)
{
	if (!s || !isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	char *end;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno)
		return -1;
	for (const struct unit *u = units; u->name; u++) {
		if (strcmp(end, u->name) == 0) {
			if (v > (unsigned long long)(INT64_MAX / u->mul))
				return -1;
			*out = (int64_t)v * u->mul;
			return 0;
		}
	}
	return -1;
}

/* Durations: 500ms 10s 5m 1h 2d; a bare number is seconds. */
static int parse_duration_ms(const char *s, int64_t *ms)
{
	static const struct unit u[] = {
		{"ms", 1}, {"", 1000}, {"s", 1000}, {"m", 60000}, {"h", 3600000},
		{"d", 86400000}, {NULL, 0}};
	return parse_scaled(s, u, ms);
}

/* The MS of fsync=interval:MS: milliseconds, or a duration with a unit
 * (interval:250 = interval:250ms, interval:1s); must be > 0. */
static int parse_interval_ms(const char *s, int64_t *ms)
{
	uint64_t v;
	if (parse_u64(s, &v) == 0)
		*ms = v > INT64_MAX ? -1 : (int64_t)v;
	else if (parse_duration_ms(s, ms) < 0)
		return -1;
	return *ms > 0 ? 0 : -1;
}

/* Sizes: 4k 64M 1G (powers of 1024, either case); a bare number is bytes. */
static int parse_size(const char *s, int64_t *bytes)
{
	static const struct unit u[] = {
		{"", 1}, {"b", 1}, {"B", 1}, {"k", 1 << 10}, {"K", 1 << 10},
		{"kb", 1 << 10}, {"KB", 1 << 10}, {"KiB", 1 << 10}, {"m", 1 << 20},
		{"M", 1 << 20}, {"MB", 1 << 20}, {"MiB", 1 << 20}, {"g", 1 << 30},
		{"G", 1 << 30}, {"GB", 1 << 30}, {"GiB", 1 << 30}, {NULL, 0}};
	return parse_scaled(s, u, bytes);
}

/* Times: RFC 3339 (2026-12-01T09:00[:SS][.mmm][Z|+HH:MM], local time
 * without a zone; a space may replace the T), epoch seconds (all digits,
 * or @SECONDS), or a duration meaning that long ago ("10m"). */
static int parse_time_ms(const char *s, int64_t *ms)
{
	uint64_t v;
	if (*s == '@')
		s++;
	if (parse_u64(s, &v) == 0) {
		if (v > (uint64_t)INT64_MAX / 1000)
			return -1;
		*ms = (int64_t)v * 1000;
		return 0;
	}
	int64_t d;
	if (parse_duration_ms(s, &d) == 0) {
		*ms = now_ms() - d;
		return 0;
	}
	struct tm tm = {0};
	int frac = 0, n = 0, got;
	got = sscanf(s, "%4d-%2d-%2d%*1[T ]%2d:%2d%n", &tm.tm_year, &tm.tm_mon,
	             &tm.tm_mday, &tm.tm_hour, &tm.tm_min, &n);
	if (got != 5 || n == 0)
		return -1;
	const char *p = s + n;
	if (*p == ':') {
		if (!isdigit((unsigned char)p[1]) || !isdigit((unsigned char)p[2]))
			return -1;
		tm.tm_sec = (p[1] - '0') * 10 + (p[2] - '0');
		p += 3;
		if (*p == '.') {
			int digits = 0;
			for (p++; isdigit((unsigned char)*p); p++, digits++)
				if (digits < 3)
					frac = frac * 10 + (*p - '0');
			for (; digits > 0 && digits < 3; digits++)
				frac *= 10;
		}
	}
	if (tm.tm_mon < 1 || tm.tm_mon > 12 || tm.tm_mday < 1 || tm.tm_mday > 31 ||
	    tm.tm_hour > 23 || tm.tm_min > 59 || tm.tm_sec > 60)
		return -1;
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	int64_t secs;
	if (*p == 0) {
		tm.tm_isdst = -1;
		time_t t = mktime(&tm);
		if (t == (time_t)-1)
			return -1;
		secs = (int64_t)t;
	} else {
		int off = 0;
		if (*p == 'Z' || *p == 'z') {
			p++;
		} else if (*p == '+' || *p == '-') {
			int hh, mm;
			if (sscanf(p + 1, "%2d:%2d", &hh, &mm) != 2 || strlen(p) != 6)
				return -1;
			off = (hh * 60 + mm) * 60 * (*p == '-' ? -1 : 1);
			p += 6;
		}
		if (*p)
			return -1;
		secs = (int64_t)timegm(&tm) - off;
	}
	*ms = secs * 1000 + frac;
	return 0;
}

/* Format a duration exactly, in a form parse_duration_ms accepts:
 * the largest unit that divides it (2d, 90s, 1500ms). */
static void fmt_duration_exact(char *out, size_t n, int64_t ms)
{
	static const struct unit u[] = {{"d", 86400000}, {"h", 3600000}, {"m", 60000},
	                                {"s", 1000}, {"ms", 1}};
	for (size_t i = 0; i < 5; i++)
		if (ms % u[i].mul == 0) {
			strfmt(out, n, "%" PRId64 "%s", ms / u[i].mul, u[i].name);
			return;
		}
}

/* Format a duration for humans: 950ms, 12s, 5m3s, 2h10m, 3d4h. */
static void fmt_duration(char *out, size_t n, int64_t ms)
{
	if (ms < 0)
		ms = 0;
	if (ms < 1000)
		strfmt(out, n, "%" PRId64 "ms", ms);
	else if (ms < 60000)
		strfmt(out, n, "%" PRId64 "s", ms / 1000);
	else if (ms < 3600000)
		strfmt(out, n, "%" PRId64 "m%" PRId64 "s", ms / 60000, ms / 1000 % 60);
	else if (ms < 86400000)
		strfmt(out, n, "%" PRId64 "h%" PRId64 "m", ms / 3600000, ms / 60000 % 60);
	else
		strfmt(out, n, "%" PRId64 "d%" PRId64 "h", ms / 86400000, ms / 3600000 % 24);
}

/* Format a size: exact with a binary suffix when it divides, else bytes. */
static void fmt_size(char *out, size_t n, int64_t v)
{
	if (v >= (1 << 30) && v % (1 << 30) == 0)
		strfmt(out, n, "%" PRId64 "G", v >> 30);
	else if (v >= (1 << 20) && v % (1 << 20) == 0)
		strfmt(out, n, "%" PRId64 "M", v >> 20);
	else if (v >= (1 << 10) && v % (1 << 10) == 0)
		strfmt(out, n, "%" PRId64 "k", v >> 10);
	else
		strfmt(out, n, "%" PRId64, v);
}

/* ===================================================================
 * 2. Durable files: the syscall table, full writes, fsync, locks
 *
 * Every call that changes the disk goes through `sys`, so a test build
 * (MQ_FAULTS) can fail the Nth call of a kind or kill the process there.
 * Functions here retry EINTR and short writes, and fill an mq_err naming
 * the file; they never decide policy (what to do after a failed fsync is
 * the caller's business, and the answer is always "fail, never retry").
 * =================================================================== */

struct mq_sys {
	ssize_t (*write)(int, const void *, size_t);
	ssize_t (*pwrite)(int, const void *, size_t, off_t);
	int (*fsync)(int);
	int (*fdatasync)(int);
	int (*rename)(const char *, const char *);
	int (*open)(const char *, int, ...);
	int (*ftruncate)(int, off_t);
	int (*unlink)(const char *);
	int (*mkdir)(const char *, mode_t);
	int (*rmdir)(const char *);
};

#ifdef MQ_FAULTS
/*
 * MQ_FAULT=CALL:N:WHAT[:sticky] makes the Nth call (counting from 1) of
 * CALL (write pwrite fsync fdatasync rename open ftruncate unlink mkdir
 * rmdir) fail.  WHAT is eio, enospc, short (that write transfers only
 * half; the write loop then goes on, unless sticky makes every later
 * write short too, which ends in ENOSPC), or kill (SIGKILL the process
 * just before the call).  sticky keeps failing every later call of that
 * kind too.
 */
static struct {
	char call[16];
	long n, seen;
	int what; /* 0 none, EIO, ENOSPC, -1 short, -2 kill */
	int sticky;
} fault;

static void dur_fault_init(void)
{
	const char *s = getenv("MQ_FAULT");
	char what[16] = "", sticky[16] = "";
	if (!s || sscanf(s, "%15[a-z]:%ld:%15[a-z]:%15s", fault.call, &fault.n, what,
	                 sticky) < 3)
		return;
	fault.what = !strcmp(what, "eio") ? EIO : !strcmp(what, "enospc") ? ENOSPC
	             : !strcmp(what, "short") ? -1 : !strcmp(what, "kill") ? -2 : 0;
	fault.sticky = !strcmp(sticky, "sticky");
}

/* Returns 0 to let the call run, -1 (errno set) to fail it, 1 for short. */
static int fault_hit(const char *call)
{
	if (!fault.what || strcmp(call, fault.call))
		return 0;
	fault.seen++;
	if (fault.seen < fault.n || (fault.seen > fault.n && !fault.sticky))
		return 0;
	if (fault.what == -2)
		kill(getpid(), SIGKILL);
	if (fault.what == -1)
		return 1;
	errno = fault.what;
	return -1;
}

static ssize_t f_write(int fd, const void *p, size_t n)
{
	int f = fault_hit("write");
	if (f < 0)
		return -1;
	return write(fd, p, f ? n / 2 : n);
}
static ssize_t f_pwrite(int fd, const void *p, size_t n, off_t o)
{
	int f = fault_hit("pwrite");
	if (f < 0)
		return -1;
	return pwrite(fd, p, f ? n / 2 : n, o);
}
#define FAULT_WRAP1(name, T1)                                                  \
	static int f_##name(T1 a) { return fault_hit(#name) ? -1 : name(a); }
#define FAULT_WRAP2(name, T1, T2)                                              \
	static int f_##name(T1 a, T2 b) { return fault_hit(#name) ? -1 : name(a, b); }
FAULT_WRAP1(fsync, int)
FAULT_WRAP1(fdatasync, int)
FAULT_WRAP2(rename, const char *, const char *)
FAULT_WRAP2(ftruncate, int, off_t)
FAULT_WRAP1(unlink, const char *)
FAULT_WRAP2(mkdir, const char *, mode_t)
FAULT_WRAP1(rmdir, const char *)
static int f_open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	if (flags & O_CREAT) {
		va_list ap;
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	if (fault_hit("open"))
		return -1;
	return open(path, flags, mode);
}
static struct mq_sys sys = {f_write, f_pwrite, f_fsync, f_fdatasync, f_rename,
                            f_open, f_ftruncate, f_unlink, f_mkdir, f_rmdir};
#else
static void dur_fault_init(void) {}
static struct mq_sys sys = {write, pwrite, fsync, fdatasync, rename,
                            open, ftruncate, unlink, mkdir, rmdir};
#endif

/* Write all n bytes at the current position; a short write that makes
 * no progress (full disk) ends in an error, never a silent loss. */
static int dur_write_all(int fd, const void *p, size_t n, const char *path,
                         struct mq_err *e)
{
	const char *s = p;
	while (n > 0) {
		ssize_t w = sys.write(fd, s, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			if (w == 0)
				errno = ENOSPC;
			return err_sys(e, err_code_for(errno), "cannot write '%s'", path);
		}
		s += w;
		n -= (size_t)w;
	}
	return 0;
}

static int dur_pwrite_all(int fd, const void *p, size_t n, off_t off,
                          const char *path, struct mq_err *e)
{
	const char *s = p;
	while (n > 0) {
		ssize_t w = sys.pwrite(fd, s, n, off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			if (w == 0)
				errno = ENOSPC;
			return err_sys(e, err_code_for(errno), "cannot write '%s'", path);
		}
		s += w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/* Read up to n bytes at off; returns bytes read (short only at EOF). */
static ssize_t dur_pread(int fd, void *p, size_t n, off_t off, const char *path,
                         struct mq_err *e)
{
	size_t got = 0;
	while (got < n) {
		ssize_t r = pread(fd, (char *)p + got, n - got, off + (off_t)got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			return err_sys(e, MQ_EX_IOERR, "cannot read '%s'", path);
		if (r == 0)
			break;
		got += (size_t)r;
	}
	return (ssize_t)got;
}

/* How long this process's fsyncs took, for the server's metrics: counts
 * of calls at or under each bound (cumulative, as Prometheus wants). */
static const double fsync_bounds[] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                      0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
#define NFSYNC_BOUNDS (sizeof fsync_bounds / sizeof fsync_bounds[0])
static struct {
	uint64_t n, failed;
	uint64_t le[NFSYNC_BOUNDS];
	double sum; /* seconds */
} fsync_stats;

static int dur_timed_sync(int (*fn)(int), int fd, const char *path, struct mq_err *e)
{
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	int r = fn(fd);
	int saved = errno;
	clock_gettime(CLOCK_MONOTONIC, &b);
	double d = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
	fsync_stats.n++;
	fsync_stats.sum += d;
	for (size_t i = 0; i < NFSYNC_BOUNDS; i++)
		fsync_stats.le[i] += d <= fsync_bounds[i];
	if (r < 0) {
		fsync_stats.failed++;
		errno = saved;
		return err_sys(e, MQ_EX_IOERR, "cannot fsync '%s'", path);
	}
	return 0;
}

/*
 * Make a file's data durable.  A failure is final: the kernel may have
 * dropped the dirty pages and marked them clean, so a second fdatasync
 * could "succeed" without the data being on disk.  Callers fail the
 * command and cut the unsafe bytes off instead of retrying.
 */
static int dur_datasync(int fd, const char *path, struct mq_err *e)
{
	return dur_timed_sync(sys.fdatasync, fd, path, e);
}

static int dur_sync(int fd, const char *path, struct mq_err *e)
{
	return dur_timed_sync(sys.fsync, fd, path, e);
}

/* fsync a directory so that names created, renamed or removed in it
 * survive a power loss. */
static int dur_sync_dir(const char *dir, struct mq_err *e)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot open directory '%s'", dir);
	int r = dur_sync(fd, dir, e);
	close(fd);
	return r;
}

/* Parent directory of path, into out. */
static void dur_dirname(const char *path, char *out, size_t n)
{
	strfmt(out, n, "%s", path);
	char *slash = strrchr(out, '/');
	if (slash == out)
		out[1] = 0;
	else if (slash)
		*slash = 0;
	else
		strfmt(out, n, ".");
}

/*
 * Replace the file at path with data, atomically: write ".NAME.tmp" with
 * O_EXCL, fsync it, rename it over NAME, fsync the directory.  A crash
 * leaves either the old or the new file (and maybe a stale temporary,
 * which the next replace removes first).
 */
static int dur_replace(const char *path, const void *data, size_t n,
                       struct mq_err *e)
{
	char dir[PATH_MAX], tmp[PATH_MAX + 16];
	dur_dirname(path, dir, sizeof dir);
	const char *base = strrchr(path, '/');
	base = base ? base + 1 : path;
	strfmt(tmp, sizeof tmp, "%s/.%s.tmp", dir, base);
	sys.unlink(tmp);
	int fd = sys.open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		return err_sys(e, err_code_for(errno), "cannot create '%s'", tmp);
	if (dur_write_all(fd, data, n, tmp, e) < 0 || dur_sync(fd, tmp, e) < 0) {
		close(fd);
		sys.unlink(tmp);
		return -1;
	}
	close(fd);
	if (sys.rename(tmp, path) < 0) {
		err_sys(e, MQ_EX_IOERR, "cannot rename '%s' to '%s'", tmp, path);
		sys.unlink(tmp);
		return -1;
	}
	return dur_sync_dir(dir, e);
}

/* Create a directory if missing (EEXIST is fine). */
static int dur_mkdir(const char *path, struct mq_err *e)
{
	if (sys.mkdir(path, 0755) < 0 && errno != EEXIST)
		return err_sys(e, err_code_for(errno), "cannot create directory '%s'", path);
	return 0;
}

/* Set by mq serve: no lock is waited for, whatever the caller asks.  One
 * event loop serves every connection, so a lock held by another process
 * (or by a request of another connection, such as a pipe step's group
 * claim) would stall them all; the request fails with 75 instead and the
 * client sends it again (mq-protocol(7)). */
static int dur_lock_nowait;

/* flock with EINTR retried.  Returns 0, or -1 with code 75 when nonblock
 * (or dur_lock_nowait) and another process holds it. */
static int dur_lock(int fd, int op, const char *path, struct mq_err *e)
{
	if (dur_lock_nowait && !(op & LOCK_UN))
		op |= LOCK_NB;
	while (flock(fd, op) < 0) {
		if (errno == EINTR)
			continue;
		if (errno == EWOULDBLOCK)
			return err_set(e, MQ_EX_TEMPFAIL, "'%s' is locked by another process", path);
		return err_sys(e, MQ_EX_IOERR, "cannot lock '%s'", path);
	}
	return 0;
}

static void dur_close(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* Remove a directory tree (only regular files and directories; a symlink
 * is unlinked, never followed). */
static int dur_rmtree(const char *path, struct mq_err *e)
{
	DIR *d = opendir(path);
	if (!d)
		return err_sys(e, MQ_EX_IOERR, "cannot open directory '%s'", path);
	struct dirent *de;
	char sub[PATH_MAX];
	int r = 0;
	while ((de = readdir(d)) && r == 0) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		strfmt(sub, sizeof sub, "%s/%s", path, de->d_name);
		struct stat st;
		if (lstat(sub, &st) < 0)
			continue;
		if (S_ISDIR(st.st_mode))
			r = dur_rmtree(sub, e);
		else if (sys.unlink(sub) < 0 && errno != ENOENT)
			r = err_sys(e, MQ_EX_IOERR, "cannot remove '%s'", sub);
	}
	closedir(d);
	if (r == 0 && sys.rmdir(path) < 0 && errno != ENOENT)
		r = err_sys(e, MQ_EX_IOERR, "cannot remove directory '%s'", path);
	return r;
}

static int64_t file_size(const char *path)
{
	struct stat st;
	return lstat(path, &st) < 0 ? -1 : (int64_t)st.st_size;
}

static void names_free(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* The entries of a directory that keep(name) accepts, sorted.  A missing
 * directory has none. */
static int dir_names(const char *path, int (*keep)(const char *), char ***names, size_t *n,
                     struct mq_err *e)
{
	*names = NULL;
	*n = 0;
	DIR *d = opendir(path);
	if (!d)
		return errno == ENOENT ? 0 : err_sys(e, MQ_EX_IOERR, "cannot open '%s'", path);
	struct dirent *de;
	size_t cap = 0;
	while ((de = readdir(d))) {
		if (!keep(de->d_name))
			continue;
		if (*n == cap) {
			cap = cap ? cap * 2 : 8;
			*names = realloc(*names, cap * sizeof **names);
			if (!*names)
				abort();
		}
		if (!((*names)[(*n)++] = strdup(de->d_name)))
			abort();
	}
	closedir(d);
	if (*n > 1)
		qsort(*names, *n, sizeof **names, cmp_str);
	return 0;
}

/* ===================================================================
 * 3. Configuration: settings table, mq.yaml and queue meta (libyaml)
 *
 * A queue's effective settings are layered, later wins: built-in
 * defaults, mq.yaml "defaults:", mq.yaml "queues: NAME:", the queue's
 * meta.yaml (what `mq create` was told), then command-line flags.  Each
 * setting remembers where its value came from for `mq config`.
 * =================================================================== */

enum fsync_mode { MQ_FSYNC_NEVER, MQ_FSYNC_INTERVAL, MQ_FSYNC_BATCH, MQ_FSYNC_ALWAYS };

struct qconf {
	int64_t partitions;
	int64_t fsync;           /* enum fsync_mode */
	int64_t fsync_ms;        /* interval for MQ_FSYNC_INTERVAL, ms */
	int64_t segment_bytes;   /* roll a segment past this, bytes */
	int64_t retain_age_ms;   /* 0 = keep by age forever */
	int64_t retain_bytes;    /* 0 = no size limit, bytes per partition */
	int64_t compression;     /* 0 none, 1 zlib */
	int64_t max_message;     /* largest body + key + tag + headers, bytes */
	int64_t retries;         /* retries of a failed message before it is dead */
	int64_t dedupe_ms;       /* put --id drops duplicates seen this recently */
	int64_t nbackoff;        /* delays before retry 1, 2, ... (the last repeats) */
	int64_t backoff[MQ_BACKOFF_MAX];
	int64_t txn_after_ms;    /* txn check: transactions older than this */
	int64_t txn_max_checks;  /* ... rolled back after this many checks */
	int64_t has_txn_check;   /* txn_check is set (mq serve runs it) */
	char txn_check[1024];    /* txn-check: a shell command, "" for none */
	char src[24][PATH_MAX + 32]; /* where each setting came from */
};

enum set_kind { SET_INT, SET_SIZE, SET_DURATION, SET_FSYNC, SET_COMPRESSION, SET_DURATIONS,
                SET_COMMAND };

/* The settings table drives mq.yaml parsing, `mq create` flags and
 * `mq config` output alike. */
static const struct setting {
	const char *name;
	enum set_kind kind;
	size_t off; /* offsetof the int64_t field in struct qconf */
	int64_t min, max;
	const char *help;
} settings[] = {
	{"partitions", SET_INT, offsetof(struct qconf, partitions), 1, MQ_MAX_PARTITIONS,
	 "number of partitions (fixed when the queue is created)"},
	{"fsync", SET_FSYNC, offsetof(struct qconf, fsync), 0, 3,
	 "always, batch, interval:MS or never"},
	{"segment-bytes", SET_SIZE, offsetof(struct qconf, segment_bytes),
	 MQ_MIN_SEGMENT_BYTES, MQ_MAX_SEGMENT_BYTES, "roll segments at this size"},
	{"retain-age", SET_DURATION, offsetof(struct qconf, retain_age_ms), 0, INT64_MAX,
	 "remove sealed segments older than this (0 = never)"},
	{"retain-bytes", SET_SIZE, offsetof(struct qconf, retain_bytes), 0, INT64_MAX,
	 "keep at most this much per partition (0 = no limit)"},
	{"compression", SET_COMPRESSION, offsetof(struct qconf, compression), 0, 1,
	 "none or zlib, per batch"},
	{"max-message-bytes", SET_SIZE, offsetof(struct qconf, max_message), 1,
	 MQ_MAX_MESSAGE_LIMIT, "largest message accepted"},
	{"retries", SET_INT, offsetof(struct qconf, retries), 0, 1000,
	 "retries of a failed message before it goes to QUEUE.dlq"},
	{"backoff", SET_DURATIONS, offsetof(struct qconf, nbackoff), 1, MQ_BACKOFF_MAX,
	 "delays before each retry, e.g. '10s 30s 1m' (the last repeats)"},
	{"dedupe-window", SET_DURATION, offsetof(struct qconf, dedupe_ms), 0, INT64_MAX,
	 "put --id drops a duplicate id seen this recently"},
	{"txn-check", SET_COMMAND, offsetof(struct qconf, has_txn_check), 0, 1,
	 "shell command mq serve runs to check open transactions ('' for none)"},
	{"txn-check-after", SET_DURATION, offsetof(struct qconf, txn_after_ms), 0, INT64_MAX,
	 "check transactions open this long"},
	{"txn-max-checks", SET_INT, offsetof(struct qconf, txn_max_checks), 1, 1000000,
	 "roll back a transaction still unknown after this many checks"},
};
#define NSETTINGS (sizeof settings / sizeof settings[0])

static int64_t *conf_field(struct qconf *c, const struct setting *s)
{
	return (int64_t *)(void *)((char *)c + s->off);
}

static int conf_set(struct qconf *c, const char *name, const char *val, const char *src,
                    struct mq_err *e);

static void conf_defaults(struct qconf *c)
{
	memset(c, 0, sizeof *c);
	c->partitions = MQ_DEF_PARTITIONS;
	c->fsync = MQ_FSYNC_BATCH;
	c->segment_bytes = MQ_DEF_SEGMENT_BYTES;
	c->max_message = MQ_DEF_MAX_MESSAGE;
	c->retries = MQ_DEF_RETRIES;
	c->dedupe_ms = MQ_DEF_DEDUPE_MS;
	c->txn_after_ms = MQ_DEF_TXN_CHECK_AFTER_MS;
	c->txn_max_checks = MQ_DEF_TXN_MAX_CHECKS;
	struct mq_err ignored;
	conf_set(c, "backoff", MQ_DEF_BACKOFF, "built-in default", &ignored);
	for (size_t i = 0; i < NSETTINGS; i++)
		strfmt(c->src[i], sizeof c->src[i], "built-in default");
}

/*
 * Set one setting from its text form.  Returns 0, or -1 with a message
 * (without location: the caller knows the file and line).
 */
static int conf_set(struct qconf *c, const char *name, const char *val,
                    const char *src, struct mq_err *e)
{
	for (size_t i = 0; i < NSETTINGS; i++) {
		const struct setting *s = &settings[i];
		if (strcmp(s->name, name))
			continue;
		int64_t v = 0;
		int bad = 0;
		switch (s->kind) {
		case SET_INT: {
			uint64_t u;
			bad = parse_u64(val, &u) < 0 || u > INT64_MAX;
			v = (int64_t)u;
			break;
		}
		case SET_SIZE: bad = parse_size(val, &v) < 0; break;
		case SET_DURATION: bad = parse_duration_ms(val, &v) < 0; break;
		case SET_DURATIONS: {
			int64_t d[MQ_BACKOFF_MAX];
			char word[64];
			for (const char *p = val; *p && !bad;) {
				size_t k = strcspn(p, " ,\t");
				if (k == 0) {
					p++;
					continue;
				}
				bad = k >= sizeof word || v == MQ_BACKOFF_MAX;
				if (!bad) {
					memcpy(word, p, k);
					word[k] = 0;
					bad = parse_duration_ms(word, &d[v]) < 0 || d[v] <= 0;
					v++;
				}
				p += k;
			}
			if (!bad && v >= s->min)
				memcpy(c->backoff, d, (size_t)v * sizeof *d);
			break;
		}
		case SET_COMMAND:
			bad = strlen(val) >= sizeof c->txn_check;
			if (!bad)
				strfmt(c->txn_check, sizeof c->txn_check, "%s", val);
			v = *val != 0;
			break;
		case SET_COMPRESSION:
			v = !strcmp(val, "zlib") ? 1 : 0;
			bad = strcmp(val, "zlib") && strcmp(val, "none");
			break;
		case SET_FSYNC:
			if (!strcmp(val, "always")) v = MQ_FSYNC_ALWAYS;
			else if (!strcmp(val, "batch")) v = MQ_FSYNC_BATCH;
			else if (!strcmp(val, "never")) v = MQ_FSYNC_NEVER;
			else if (!strncmp(val, "interval:", 9) && parse_interval_ms(val + 9, &c->fsync_ms) == 0)
				v = MQ_FSYNC_INTERVAL;
			else
				bad = 1;
			break;
		}
		if (bad || v < s->min || v > s->max)
			return err_set(e, MQ_EX_USAGE, "bad value '%s' for '%s' (%s)", val, name, s->help);
		*conf_field(c, s) = v;
		strfmt(c->src[i], sizeof c->src[i], "%s", src);
		return 0;
	}
	return err_set(e, MQ_EX_USAGE, "unknown key '%s'", name);
}

/* The text form of a setting, as conf_set would accept it. */
static void conf_format(const struct qconf *c, size_t i, char *out, size_t n)
{
	const struct setting *s = &settings[i];
	int64_t v = *conf_field((struct qconf *)c, s);
	switch (s->kind) {
	case SET_INT: strfmt(out, n, "%" PRId64, v); break;
	case SET_SIZE: fmt_size(out, n, v); break;
	case SET_DURATION:
		if (v == 0)
			strfmt(out, n, "0");
		else
			fmt_duration_exact(out, n, v);
		break;
	case SET_COMPRESSION: strfmt(out, n, "%s", v ? "zlib" : "none"); break;
	case SET_COMMAND: strfmt(out, n, "%s", v ? c->txn_check : "''"); break;
	case SET_DURATIONS:
		*out = 0;
		for (int64_t k = 0; k < v; k++) {
			char d[32];
			size_t used = strlen(out);
			fmt_duration_exact(d, sizeof d, c->backoff[k]);
			strfmt(out + used, n - used, "%s%s", k ? " " : "", d);
		}
		break;
	case SET_FSYNC: {
		static const char *names[] = {"never", "interval", "batch", "always"};
		if (v == MQ_FSYNC_INTERVAL)
			strfmt(out, n, "interval:%" PRId64, c->fsync_ms);
		else
			strfmt(out, n, "%s", names[v]);
		break;
	}
	}
}

/* The server's settings: mq.yaml "server:" (or the file of mq serve
 * --config), then mq serve's flags.  Checked here; used by layer 13. */
struct srv_token {
	char name[64];
	char *secret;
	char *read, *write; /* queue name patterns, space separated ("*": all) */
};

struct srv_opts {
	char listen[8][256];
	int nlisten;
	char spool[PATH_MAX];   /* "" when not set */
	char metrics[256];      /* metrics-listen, "" for none */
	char ns[8][256];        /* nameservers to register with */
	int nns;
	char advertise[256];    /* the address registered ("" = the first listened on) */
	char role[16];          /* registered with the nameservers */
	int64_t idle_ms;        /* close a client silent this long (no request pending) */
	int64_t request_ms;     /* drop a client whose request stalls this long */
	int64_t register_ms;    /* register with the nameservers this often */
	size_t out_max;         /* unsent answer bytes past which a client is not read */
	size_t in_chunk;        /* bytes read from one client per round */
	int max_conns;
	struct srv_token *tok;  /* none: no token needed */
	int ntok;
};

static void srvconf_defaults(struct srv_opts *o)
{
	memset(o, 0, sizeof *o);
	o->idle_ms = 300000;
	o->request_ms = 30000;
	o->register_ms = 30000;
	o->out_max = 4u << 20;
	o->in_chunk = 256u << 10;
	o->max_conns = 100000;
	strfmt(o->role, sizeof o->role, "master");
}

static void srvconf_free(struct srv_opts *o)
{
	for (int i = 0; i < o->ntok; i++) {
		free(o->tok[i].secret);
		free(o->tok[i].read);
		free(o->tok[i].write);
	}
	free(o->tok);
	o->tok = NULL;
	o->ntok = 0;
}

/* The spool configuration: mq.yaml loaded as a document and kept, so a
 * queue's section can be applied when the queue is opened. */
struct cfg {
	char path[PATH_MAX];
	int loaded;
	yaml_document_t doc;
};

static const char *yaml_scalar(yaml_node_t *n)
{
	return n && n->type == YAML_SCALAR_NODE ? (const char *)n->data.scalar.value : NULL;
}

/* Apply a mapping of settings (a "defaults:" or "queues: Q:" block, or a
 * meta.yaml) to c.  Errors name file, line and key. */
static int cfg_apply_map(yaml_document_t *doc, yaml_node_t *map, const char *file,
                         const char *what, struct qconf *c, struct mq_err *e)
{
	const char *empty = yaml_scalar(map);
	if (empty && (!*empty || !strcmp(empty, "~") || !strcmp(empty, "null")))
		return 0; /* "defaults:" with nothing under it */
	if (!map || map->type != YAML_MAPPING_NODE)
		return err_set(e, MQ_EX_USAGE, "%s:%lu: '%s' must be a mapping of settings",
		               file, map ? (unsigned long)map->start_mark.line + 1 : 0, what);
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start;
	     p < map->data.mapping.pairs.top; p++) {
		yaml_node_t *k = yaml_document_get_node(doc, p->key);
		yaml_node_t *v = yaml_document_get_node(doc, p->value);
		const char *ks = yaml_scalar(k), *vs = yaml_scalar(v);
		unsigned long line = (unsigned long)k->start_mark.line + 1;
		char src[PATH_MAX + 32];
		strfmt(src, sizeof src, "%s:%lu", file, line);
		if (!ks || !vs)
			return err_set(e, MQ_EX_USAGE, "%s: key and value must be plain scalars", src);
		struct mq_err sub;
		if (conf_set(c, ks, vs, src, &sub) < 0)
			return err_set(e, MQ_EX_USAGE, "%s: %s", src, sub.msg);
	}
	return 0;
}

static int cfg_load_doc(const char *path, yaml_document_t *doc, int *found,
                        struct mq_err *e)
{
	*found = 0;
	FILE *f = fopen(path, "rb");
	if (!f) {
		if (errno == ENOENT)
			return 0;
		return err_sys(e, MQ_EX_IOERR, "cannot open '%s'", path);
	}
	yaml_parser_t parser;
	yaml_parser_initialize(&parser);
	yaml_parser_set_input_file(&parser, f);
	int ok = yaml_parser_load(&parser, doc);
	if (!ok)
		err_set(e, MQ_EX_USAGE, "%s:%lu: %s", path,
		        (unsigned long)parser.problem_mark.line + 1,
		        parser.problem ? parser.problem : "bad YAML");
	yaml_parser_delete(&parser);
	fclose(f);
	if (!ok)
		return -1;
	*found = 1;
	return 0;
}

/*
 * Load SPOOL/mq.yaml if present and check it completely (unknown keys and
 * bad values are errors now, not when some queue happens to be opened).
 */
static int srvconf_parse(yaml_document_t *doc, yaml_node_t *map, const char *file,
                         struct srv_opts *o, struct mq_err *e);

static int cfg_load_file(struct cfg *cfg, const char *path, struct mq_err *e)
{
	memset(cfg, 0, sizeof *cfg);
	strfmt(cfg->path, sizeof cfg->path, "%s", path);
	int found;
	if (cfg_load_doc(cfg->path, &cfg->doc, &found, e) < 0)
		return -1;
	if (!found)
		return 0;
	cfg->loaded = 1;
	yaml_node_t *root = yaml_document_get_root_node(&cfg->doc);
	if (!root)
		return 0; /* an empty file is an empty configuration */
	if (root->type != YAML_MAPPING_NODE)
		return err_set(e, MQ_EX_USAGE, "%s:%lu: the top level must be a mapping", cfg->path,
		               (unsigned long)root->start_mark.line + 1);
	for (yaml_node_pair_t *p = root->data.mapping.pairs.start;
	     p < root->data.mapping.pairs.top; p++) {
		yaml_node_t *k = yaml_document_get_node(&cfg->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(&cfg->doc, p->value);
		const char *ks = yaml_scalar(k);
		unsigned long line = (unsigned long)k->start_mark.line + 1;
		struct qconf scratch;
		conf_defaults(&scratch);
		if (ks && !strcmp(ks, "defaults")) {
			if (cfg_apply_map(&cfg->doc, v, cfg->path, "defaults", &scratch, e) < 0)
				return -1;
		} else if (ks && !strcmp(ks, "queues")) {
			const char *empty = yaml_scalar(v);
			if (empty && (!*empty || !strcmp(empty, "~") || !strcmp(empty, "null")))
				continue;
			if (v->type != YAML_MAPPING_NODE)
				return err_set(e, MQ_EX_USAGE, "%s:%lu: 'queues' must map queue names to settings",
				               cfg->path, line);
			for (yaml_node_pair_t *q = v->data.mapping.pairs.start;
			     q < v->data.mapping.pairs.top; q++) {
				yaml_node_t *qk = yaml_document_get_node(&cfg->doc, q->key);
				const char *qn = yaml_scalar(qk);
				if (!qn || !name_valid(qn))
					return err_set(e, MQ_EX_USAGE, "%s:%lu: bad queue name '%s'", cfg->path,
					               (unsigned long)qk->start_mark.line + 1, qn ? qn : "?");
				if (cfg_apply_map(&cfg->doc, yaml_document_get_node(&cfg->doc, q->value),
				                  cfg->path, qn, &scratch, e) < 0)
					return -1;
			}
		} else if (ks && !strcmp(ks, "server")) {
			struct srv_opts o;
			srvconf_defaults(&o);
			int r = srvconf_parse(&cfg->doc, v, cfg->path, &o, e);
			srvconf_free(&o);
			if (r < 0)
				return -1;
		} else {
			return err_set(e, MQ_EX_USAGE, "%s:%lu: unknown key '%s'", cfg->path, line,
			               ks ? ks : "?");
		}
	}
	return 0;
}

static int cfg_load(struct cfg *cfg, const char *spool, struct mq_err *e)
{
	char path[PATH_MAX];
	strfmt(path, sizeof path, "%s/mq.yaml", spool);
	return cfg_load_file(cfg, path, e);
}

static void cfg_free(struct cfg *cfg)
{
	if (cfg->loaded)
		yaml_document_delete(&cfg->doc);
	cfg->loaded = 0;
}

/* Find a top-level key's value node in mq.yaml, or NULL. */
static yaml_node_t *cfg_section(struct cfg *cfg, const char *key)
{
	if (!cfg->loaded)
		return NULL;
	yaml_node_t *root = yaml_document_get_root_node(&cfg->doc);
	if (!root || root->type != YAML_MAPPING_NODE)
		return NULL;
	for (yaml_node_pair_t *p = root->data.mapping.pairs.start;
	     p < root->data.mapping.pairs.top; p++) {
		const char *ks = yaml_scalar(yaml_document_get_node(&cfg->doc, p->key));
		if (ks && !strcmp(ks, key))
			return yaml_document_get_node(&cfg->doc, p->value);
	}
	return NULL;
}

/* Settings for queue `name` from mq.yaml (defaults, then its section). */
static int cfg_queue(struct cfg *cfg, const char *name, struct qconf *c,
                     struct mq_err *e)
{
	conf_defaults(c);
	yaml_node_t *d = cfg_section(cfg, "defaults");
	if (d && cfg_apply_map(&cfg->doc, d, cfg->path, "defaults", c, e) < 0)
		return -1;
	yaml_node_t *qs = cfg_section(cfg, "queues");
	if (!qs || qs->type != YAML_MAPPING_NODE)
		return 0;
	for (yaml_node_pair_t *p = qs->data.mapping.pairs.start; p < qs->data.mapping.pairs.top; p++) {
		const char *qn = yaml_scalar(yaml_document_get_node(&cfg->doc, p->key));
		if (qn && !strcmp(qn, name))
			return cfg_apply_map(&cfg->doc, yaml_document_get_node(&cfg->doc, p->value),
			                     cfg->path, name, c, e);
	}
	return 0;
}

/* Apply a queue's meta.yaml over c.  A missing file is not an error. */
static int cfg_apply_meta(const char *path, struct qconf *c, struct mq_err *e)
{
	yaml_document_t doc;
	int found;
	if (cfg_load_doc(path, &doc, &found, e) < 0) {
		e->code = e->code == MQ_EX_USAGE ? MQ_EX_DATAERR : e->code;
		return -1;
	}
	if (!found)
		return 0;
	yaml_node_t *root = yaml_document_get_root_node(&doc);
	int r = root ? cfg_apply_map(&doc, root, path, "meta", c, e) : 0;
	yaml_document_delete(&doc);
	if (r < 0)
		e->code = MQ_EX_DATAERR; /* mq wrote it: damage, not a usage error */
	return r;
}

/* A list of addresses: a YAML sequence, or one scalar of them separated
 * by commas or blanks. */
static int yaml_addrs(yaml_document_t *doc, yaml_node_t *v, const char *src,
                      char (*out)[256], int max, int *n, struct mq_err *e)
{
	*n = 0;
	yaml_node_item_t *it = NULL, *end = NULL;
	if (v->type == YAML_SEQUENCE_NODE) {
		it = v->data.sequence.items.start;
		end = v->data.sequence.items.top;
	}
	for (const char *p = yaml_scalar(v); v->type == YAML_SCALAR_NODE || it < end;) {
		char word[256];
		size_t k;
		if (v->type == YAML_SCALAR_NODE) {
			p += strspn(p, ", \t");
			if (!*p)
				break;
			k = strcspn(p, ", \t");
		} else {
			p = yaml_scalar(yaml_document_get_node(doc, *it++));
			if (!p)
				return err_set(e, MQ_EX_USAGE, "%s: each address must be a plain scalar", src);
			k = strlen(p);
		}
		if (k == 0 || k >= sizeof word || *n == max)
			return err_set(e, MQ_EX_USAGE, k ? "%s: at most %d addresses of under 256 "
			               "bytes" : "%s: an empty address", src, max);
		memcpy(word, p, k);
		word[k] = 0;
		if (!strchr(word, ':'))
			return err_set(e, MQ_EX_USAGE, "%s: address '%s' is not HOST:PORT", src, word);
		strfmt(out[(*n)++], 256, "%s", word);
		if (v->type == YAML_SCALAR_NODE)
			p += k;
	}
	return 0;
}

/* One entry of "tokens:": NAME: {secret: S, read: PATTERNS, write: PATTERNS}. */
static int srvconf_token(yaml_document_t *doc, yaml_node_t *k, yaml_node_t *v,
                         const char *file, struct srv_opts *o, struct mq_err *e)
{
	const char *name = yaml_scalar(k);
	unsigned long line = (unsigned long)k->start_mark.line + 1;
	if (!name || !name_valid(name) || strlen(name) >= sizeof o->tok[0].name)
		return err_set(e, MQ_EX_USAGE, "%s:%lu: bad token name '%s' (letters, digits, "
		               "'.', '_', '-')", file, line, name ? name : "?");
	if (v->type != YAML_MAPPING_NODE)
		return err_set(e, MQ_EX_USAGE, "%s:%lu: token '%s' must be a mapping of secret, "
		               "read and write", file, line, name);
	if (!(o->tok = realloc(o->tok, (size_t)(o->ntok + 1) * sizeof *o->tok)))
		abort();
	struct srv_token *t = &o->tok[o->ntok++];
	memset(t, 0, sizeof *t);
	strfmt(t->name, sizeof t->name, "%s", name);
	for (yaml_node_pair_t *p = v->data.mapping.pairs.start; p < v->data.mapping.pairs.top; p++) {
		yaml_node_t *kk = yaml_document_get_node(doc, p->key);
		const char *ks = yaml_scalar(kk), *vs = yaml_scalar(yaml_document_get_node(doc, p->value));
		unsigned long l2 = (unsigned long)kk->start_mark.line + 1;
		char **dst = ks && !strcmp(ks, "secret") ? &t->secret : ks && !strcmp(ks, "read")
		             ? &t->read : ks && !strcmp(ks, "write") ? &t->write : NULL;
		if (!dst)
			return err_set(e, MQ_EX_USAGE, "%s:%lu: unknown key '%s' in token '%s' (secret, "
			               "read, write)", file, l2, ks ? ks : "?", name);
		if (!vs)
			return err_set(e, MQ_EX_USAGE, "%s:%lu: '%s' must be a plain scalar", file, l2, ks);
		free(*dst);
		if (!(*dst = strdup(vs)))
			abort();
	}
	if (!t->secret || strlen(t->secret) < 16)
		return err_set(e, MQ_EX_USAGE, "%s:%lu: token '%s' needs a secret of at least 16 "
		               "characters", file, line, name);
	for (int i = 0; i < o->ntok - 1; i++)
		if (!strcmp(o->tok[i].name, name))
			return err_set(e, MQ_EX_USAGE, "%s:%lu: token '%s' given twice", file, line, name);
	return 0;
}

/*
 * The "server:" section over o.  Keys: listen, spool, metrics-listen,
 * idle-timeout, request-timeout, max-connections, nameservers,
 * register-interval, advertise, role, tokens.
 */
static int srvconf_parse(yaml_document_t *doc, yaml_node_t *map, const char *file,
                         struct srv_opts *o, struct mq_err *e)
{
	const char *empty = yaml_scalar(map);
	if (empty && (!*empty || !strcmp(empty, "~") || !strcmp(empty, "null")))
		return 0;
	if (map->type != YAML_MAPPING_NODE)
		return err_set(e, MQ_EX_USAGE, "%s:%lu: 'server' must be a mapping", file,
		               (unsigned long)map->start_mark.line + 1);
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
		yaml_node_t *k = yaml_document_get_node(doc, p->key);
		yaml_node_t *v = yaml_document_get_node(doc, p->value);
		const char *ks = yaml_scalar(k), *vs = yaml_scalar(v);
		char src[PATH_MAX + 32];
		strfmt(src, sizeof src, "%s:%lu", file, (unsigned long)k->start_mark.line + 1);
		if (!ks)
			return err_set(e, MQ_EX_USAGE, "%s: keys must be plain scalars", src);
		if (!strcmp(ks, "listen") || !strcmp(ks, "nameservers")) {
			int *n = ks[0] == 'l' ? &o->nlisten : &o->nns;
			if (yaml_addrs(doc, v, src, ks[0] == 'l' ? o->listen : o->ns, 8, n, e) < 0)
				return -1;
			continue;
		}
		if (!strcmp(ks, "tokens")) {
			if (vs && (!*vs || !strcmp(vs, "~") || !strcmp(vs, "null")))
				continue;
			if (v->type != YAML_MAPPING_NODE)
				return err_set(e, MQ_EX_USAGE, "%s: 'tokens' must map names to tokens", src);
			for (yaml_node_pair_t *q = v->data.mapping.pairs.start;
			     q < v->data.mapping.pairs.top; q++)
				if (srvconf_token(doc, yaml_document_get_node(doc, q->key),
				                  yaml_document_get_node(doc, q->value), file, o, e) < 0)
					return -1;
			continue;
		}
		if (!vs || !*vs)
			return err_set(e, MQ_EX_USAGE, "%s: '%s' needs a plain scalar value", src, ks);
		int64_t ms;
		uint64_t u;
		if (!strcmp(ks, "spool") || !strcmp(ks, "metrics-listen") || !strcmp(ks, "advertise")) {
			char *dst = ks[0] == 's' ? o->spool : ks[0] == 'm' ? o->metrics : o->advertise;
			size_t cap = ks[0] == 's' ? sizeof o->spool : 256;
			if (strlen(vs) >= cap - (ks[0] == 's' ? 300 : 0) || (ks[0] != 's' && !strchr(vs, ':')))
				return err_set(e, MQ_EX_USAGE, "%s: bad value '%s' for '%s'", src, vs, ks);
			strfmt(dst, cap, "%s", vs);
		} else if (!strcmp(ks, "idle-timeout") || !strcmp(ks, "request-timeout") ||
		           !strcmp(ks, "register-interval")) {
			if (parse_duration_ms(vs, &ms) < 0 || ms <= 0)
				return err_set(e, MQ_EX_USAGE, "%s: bad duration '%s' for '%s'", src, vs, ks);
			*(ks[0] == 'i' ? &o->idle_ms : ks[2] == 'q' ? &o->request_ms : &o->register_ms) = ms;
		} else if (!strcmp(ks, "max-connections")) {
			if (parse_u64(vs, &u) < 0 || u == 0 || u > INT_MAX)
				return err_set(e, MQ_EX_USAGE, "%s: bad number '%s' for '%s'", src, vs, ks);
			o->max_conns = (int)u;
		} else if (!strcmp(ks, "role")) {
			if (strcmp(vs, "master") && strcmp(vs, "follower"))
				return err_set(e, MQ_EX_USAGE, "%s: role must be master or follower", src);
			strfmt(o->role, sizeof o->role, "%s", vs);
		} else {
			return err_set(e, MQ_EX_USAGE, "%s: unknown key '%s' in 'server'", src, ks);
		}
	}
	return 0;
}

/* The "server:" section of a loaded configuration over o. */
static int cfg_server(struct cfg *cfg, struct srv_opts *o, struct mq_err *e)
{
	yaml_node_t *n = cfg_section(cfg, "server");
	return n ? srvconf_parse(&cfg->doc, n, cfg->path, o, e) : 0;
}

/* ===================================================================
 * 4. Record format: batch encode/decode, crc, compression
 *
 * Pure functions over memory; the layout is documented in mq.h.  An
 * encoder appends batches to a caller's buffer with base offset and crc
 * left blank; rec_finish() fills both when the writer knows the offset.
 * A decoder trusts nothing before the crc has been checked.
 * =================================================================== */

struct rec_hdr {
	uint8_t version, flags;
	uint16_t hdr_len;
	uint32_t len, crc, count, raw_len, pseq;
	uint64_t base, pid;
	int64_t first_ts, max_ts;
};

/* A decoded message; pointers into the batch's payload. */
struct rec_msg {
	uint64_t offset;
	int64_t ts;
	const unsigned char *key, *tag, *hdrs, *body;
	size_t klen, tlen, hlen, blen;
	int has_key, has_tag;
	uint64_t nhdrs;
};

/* The encoder state for the batch being built at the end of `out`. */
struct rec_enc {
	struct buf out;   /* complete batches, then the open one */
	struct buf tags;  /* u32 tag hash per message, in order */
	size_t open_at;   /* position of the open batch's header, or SIZE_MAX */
	uint32_t count;   /* messages in the open batch */
	int64_t first_ts, max_ts;
	uint64_t nmsgs;   /* messages in out, all batches */
	int compress;     /* close batches with zlib */
	size_t target;    /* close a batch once it passes this many bytes */
};

static void rec_enc_init(struct rec_enc *enc, int compress, size_t target)
{
	memset(enc, 0, sizeof *enc);
	enc->open_at = SIZE_MAX;
	enc->compress = compress;
	enc->target = target;
}

static void rec_enc_reset(struct rec_enc *enc)
{
	enc->out.len = enc->tags.len = 0;
	enc->open_at = SIZE_MAX;
	enc->count = 0;
	enc->nmsgs = 0;
}

static void rec_enc_free(struct rec_enc *enc)
{
	buf_free(&enc->out);
	buf_free(&enc->tags);
}

/* crc of a whole batch: bytes 0..11 then 16..len-1 (mq.h). */
static uint32_t rec_crc(const unsigned char *b, uint32_t len)
{
	uLong c = crc32(0L, Z_NULL, 0);
	c = crc32(c, b, 12);
	return (uint32_t)crc32(c, b + 16, len - 16);
}

/*
 * Close the open batch: write its header (base offset and crc blank) and
 * compress the payload if asked and worth it.  Returns -1 only if zlib
 * fails, which leaves the batch uncompressed and valid.
 */
static void rec_enc_close(struct rec_enc *enc)
{
	if (enc->open_at == SIZE_MAX)
		return;
	unsigned char *h = (unsigned char *)enc->out.p + enc->open_at;
	size_t raw = enc->out.len - enc->open_at - MQ_BATCH_HDR;
	uint8_t flags = 0;
	if (enc->compress && raw > 64) {
		uLongf zlen = compressBound((uLong)raw);
		unsigned char *z = malloc(zlen);
		if (z && compress2(z, &zlen, h + MQ_BATCH_HDR, (uLong)raw, 1) == Z_OK && zlen < raw) {
			memcpy(h + MQ_BATCH_HDR, z, zlen);
			enc->out.len = enc->open_at + MQ_BATCH_HDR + zlen;
			flags |= MQ_BF_ZLIB;
		}
		free(z);
	}
	le32_put(h, MQ_BATCH_MAGIC);
	h[4] = MQ_BATCH_VERSION;
	h[5] = flags;
	le16_put(h + 6, MQ_BATCH_HDR);
	le32_put(h + 8, (uint32_t)(enc->out.len - enc->open_at));
	le32_put(h + 24, enc->count);
	le32_put(h + 28, (uint32_t)raw);
	le64_put(h + 32, (uint64_t)enc->first_ts);
	le64_put(h + 40, (uint64_t)enc->max_ts);
	enc->open_at = SIZE_MAX;
	enc->count = 0;
}

/* Bytes a message record takes, its leading length varint included. */
static size_t rec_msg_size(const struct rec_msg *m, uint32_t delta, int64_t tsd,
                           size_t *inner)
{
	unsigned char tmp[10];
	size_t n = varint_put(tmp, delta) + varint_put(tmp, zigzag(tsd)) +
	           varint_put(tmp, m->has_key ? m->klen + 1 : 0) + m->klen +
	           varint_put(tmp, m->has_tag ? m->tlen + 1 : 0) + m->tlen +
	           (m->hlen ? m->hlen : 1) + m->blen;
	*inner = n;
	return n + varint_put(tmp, n);
}

/*
 * Append one message (m->hdrs holds the encoded header block: varint
 * count then pairs, or hlen 0 for none).  Opens a new batch when none is
 * open or the open one would pass the encoder's target size.
 */
static void rec_enc_add(struct rec_enc *enc, const struct rec_msg *m)
{
	if (enc->open_at != SIZE_MAX &&
	    enc->out.len - enc->open_at + m->blen > enc->target)
		rec_enc_close(enc);
	if (enc->open_at == SIZE_MAX) {
		enc->open_at = enc->out.len;
		buf_reserve(&enc->out, MQ_BATCH_HDR);
		memset(enc->out.p + enc->out.len, 0, MQ_BATCH_HDR);
		enc->out.len += MQ_BATCH_HDR;
		enc->first_ts = enc->max_ts = m->ts;
	}
	int64_t tsd = m->ts - enc->first_ts;
	size_t inner, total = rec_msg_size(m, enc->count, tsd, &inner);
	buf_reserve(&enc->out, total);
	unsigned char *p = (unsigned char *)enc->out.p + enc->out.len;
	p += varint_put(p, inner);
	p += varint_put(p, enc->count);
	p += varint_put(p, zigzag(tsd));
	p += varint_put(p, m->has_key ? m->klen + 1 : 0);
	if (m->klen)
		memcpy(p, m->key, m->klen), p += m->klen;
	p += varint_put(p, m->has_tag ? m->tlen + 1 : 0);
	if (m->tlen)
		memcpy(p, m->tag, m->tlen), p += m->tlen;
	if (m->hlen)
		memcpy(p, m->hdrs, m->hlen), p += m->hlen;
	else
		*p++ = 0;
	if (m->blen)
		memcpy(p, m->body, m->blen);
	enc->out.len += total;
	if (m->ts > enc->max_ts)
		enc->max_ts = m->ts;
	enc->count++;
	enc->nmsgs++;
	uint32_t th = m->has_tag ? tag_hash(m->tag, m->tlen) : 0;
	buf_add(&enc->tags, &th, sizeof th);
}

/* Set a closed batch's base offset and crc; it is then ready to write. */
static void rec_finish(unsigned char *b, uint64_t base)
{
	le64_put(b + 16, base);
	le32_put(b + 12, rec_crc(b, le32_get(b + 8)));
}

/*
 * Parse and sanity-check a batch header from avail bytes at p.  Returns 0,
 * or -1 with a reason (code 65) that the caller prefixes with path:pos.
 */
static int rec_parse_hdr(const unsigned char *p, size_t avail, struct rec_hdr *h,
                         struct mq_err *e)
{
	if (avail < MQ_BATCH_HDR)
		return err_set(e, MQ_EX_DATAERR, "truncated batch header (%zu bytes)", avail);
	if (le32_get(p) != MQ_BATCH_MAGIC)
		return err_set(e, MQ_EX_DATAERR, "bad batch magic 0x%08x", le32_get(p));
	h->version = p[4];
	h->flags = p[5];
	h->hdr_len = le16_get(p + 6);
	h->len = le32_get(p + 8);
	h->crc = le32_get(p + 12);
	h->base = le64_get(p + 16);
	h->count = le32_get(p + 24);
	h->raw_len = le32_get(p + 28);
	h->first_ts = (int64_t)le64_get(p + 32);
	h->max_ts = (int64_t)le64_get(p + 40);
	h->pid = le64_get(p + 48);
	h->pseq = le32_get(p + 56);
	if (h->version != MQ_BATCH_VERSION)
		return err_set(e, MQ_EX_DATAERR, "unknown batch version %u", h->version);
	if (h->hdr_len < MQ_BATCH_HDR || h->len < h->hdr_len || h->len > MQ_BATCH_MAX)
		return err_set(e, MQ_EX_DATAERR, "bad batch length %" PRIu32, h->len);
	if (h->count == 0 || h->raw_len > MQ_BATCH_MAX || (h->flags & ~MQ_BF_ZLIB))
		return err_set(e, MQ_EX_DATAERR, "bad batch header fields");
	return 0;
}

static int rec_check_crc(const unsigned char *p, const struct rec_hdr *h,
                         struct mq_err *e)
{
	uint32_t c = rec_crc(p, h->len);
	if (c != h->crc)
		return err_set(e, MQ_EX_DATAERR, "bad checksum (stored 0x%08x, computed 0x%08x)",
		               h->crc, c);
	return 0;
}

/* Iterator over the messages of a checked batch. */
struct rec_iter {
	const unsigned char *p, *end;
	uint64_t base;
	int64_t first_ts;
	uint32_t left, index; /* messages left; index of the next one */
};

/*
 * Point it at a checked batch's messages, inflating into scratch if the
 * batch is compressed.  Returns 0 or -1 (65).
 */
static int rec_iter_init(struct rec_iter *it, const unsigned char *b,
                         const struct rec_hdr *h, struct buf *scratch, struct mq_err *e)
{
	const unsigned char *pl = b + h->hdr_len;
	size_t plen = h->len - h->hdr_len;
	if (h->flags & MQ_BF_ZLIB) {
		scratch->len = 0;
		buf_reserve(scratch, h->raw_len + 1);
		uLongf out = h->raw_len;
		if (uncompress((Bytef *)scratch->p, &out, pl, (uLong)plen) != Z_OK || out != h->raw_len)
			return err_set(e, MQ_EX_DATAERR, "cannot inflate batch payload");
		pl = (const unsigned char *)scratch->p;
		plen = out;
	} else if (plen != h->raw_len) {
		return err_set(e, MQ_EX_DATAERR, "payload length %zu, header says %" PRIu32, plen,
		               h->raw_len);
	}
	it->p = pl;
	it->end = pl + plen;
	it->base = h->base;
	it->first_ts = h->first_ts;
	it->left = h->count;
	it->index = 0;
	return 0;
}

/* Next message: 1 got one, 0 batch done, -1 malformed record (65). */
static int rec_next(struct rec_iter *it, struct rec_msg *m, struct mq_err *e)
{
	if (it->left == 0)
		return it->p == it->end ? 0 : err_set(e, MQ_EX_DATAERR, "trailing bytes after last message");
	uint64_t len, v;
	size_t n = varint_get(it->p, it->end, &len);
	if (!n || len > (uint64_t)(it->end - it->p - n))
		return err_set(e, MQ_EX_DATAERR, "bad message length");
	const unsigned char *p = it->p + n, *end = p + len;
	it->p = end;
	it->left--;
#define TAKE(var)                                                              \
	do {                                                                       \
		size_t k_ = varint_get(p, end, &(var));                                \
		if (!k_)                                                               \
			return err_set(e, MQ_EX_DATAERR, "bad message field");             \
		p += k_;                                                               \
	} while (0)
	TAKE(v);
	if (v != it->index++) /* offsets are dense: the delta is the index */
		return err_set(e, MQ_EX_DATAERR, "message %u has offset delta %" PRIu64, it->index - 1, v);
	m->offset = it->base + v;
	TAKE(v);
	m->ts = it->first_ts + unzigzag(v);
	TAKE(v);
	if (v > 0 && v - 1 > (uint64_t)(end - p))
		return err_set(e, MQ_EX_DATAERR, "bad key length");
	m->has_key = v > 0;
	m->klen = v ? v - 1 : 0;
	m->key = p;
	p += m->klen;
	TAKE(v);
	if (v > 0 && v - 1 > (uint64_t)(end - p))
		return err_set(e, MQ_EX_DATAERR, "bad tag length");
	m->has_tag = v > 0;
	m->tlen = v ? v - 1 : 0;
	m->tag = p;
	p += m->tlen;
	const unsigned char *hstart = p;
	TAKE(m->nhdrs);
	if (m->nhdrs > (uint64_t)(end - p) / 2) /* each header takes >= 2 bytes */
		return err_set(e, MQ_EX_DATAERR, "bad header count %" PRIu64, m->nhdrs);
	for (uint64_t i = 0; i < m->nhdrs * 2; i++) {
		TAKE(v);
		if (v > (uint64_t)(end - p))
			return err_set(e, MQ_EX_DATAERR, "bad header length");
		p += v;
	}
#undef TAKE
	m->hdrs = hstart;
	m->hlen = (size_t)(p - hstart);
	m->body = p;
	m->blen = (size_t)(end - p);
	return 1;
}

/* Walk an encoded header block (checked by rec_next).  Returns 1 and the
 * next pair, or 0 at the end; *pp is the cursor, *left the pairs left. */
static int rec_hdr_next(const unsigned char **pp, const unsigned char *end, uint64_t *left,
                        const unsigned char **name, size_t *nlen,
                        const unsigned char **val, size_t *vlen)
{
	uint64_t n = 0, k = 0;
	const unsigned char *p = *pp;
	size_t a = *left ? varint_get(p, end, &n) : 0;
	if (!a || n > (uint64_t)(end - p - a))
		return 0;
	*name = p + a, *nlen = n, p += a + n;
	size_t b = varint_get(p, end, &k);
	if (!b || k > (uint64_t)(end - p - b))
		return 0;
	*val = p + b, *vlen = k, p += b + k;
	*pp = p;
	(*left)--;
	return 1;
}

/* Is header name in m's headers with value val? */
static int rec_hdr_is(const struct rec_msg *m, const char *name, const char *val)
{
	const unsigned char *p = m->hdrs, *end = m->hdrs + m->hlen, *hn, *hv;
	uint64_t left = 0;
	size_t nl, vl, n = strlen(name), v = strlen(val);
	if (!m->hlen)
		return 0;
	p += varint_get(p, end, &left);
	while (rec_hdr_next(&p, end, &left, &hn, &nl, &hv, &vl))
		if (nl == n && vl == v && !memcmp(hn, name, n) && !memcmp(hv, val, v))
			return 1;
	return 0;
}

/* Append one encoded header pair (name, value) to b. */
static void rec_hdr_pair(struct buf *b, const char *name, const void *val, size_t vlen)
{
	unsigned char tmp[10];
	buf_add(b, tmp, varint_put(tmp, strlen(name)));
	buf_adds(b, name);
	buf_add(b, tmp, varint_put(tmp, vlen));
	buf_add(b, val, vlen);
}

/* Append m's header pairs to b, leaving out names starting with skip;
 * returns how many were appended. */
static uint64_t rec_hdr_copy(const struct rec_msg *m, const char *skip, struct buf *b)
{
	const unsigned char *p = m->hdrs, *end = m->hdrs + m->hlen, *hn, *hv;
	uint64_t left = 0, kept = 0;
	size_t nl, vl, sl = strlen(skip);
	unsigned char tmp[10];
	if (m->hlen)
		p += varint_get(p, end, &left);
	while (rec_hdr_next(&p, end, &left, &hn, &nl, &hv, &vl)) {
		if (sl && nl >= sl && !memcmp(hn, skip, sl))
			continue;
		buf_add(b, tmp, varint_put(tmp, nl));
		buf_add(b, hn, nl);
		buf_add(b, tmp, varint_put(tmp, vl));
		buf_add(b, hv, vl);
		kept++;
	}
	return kept;
}

/* ===================================================================
 * 5. Segments: segment files, index and time index, tail scan
 *
 * Owns file names and the mapping between offsets, file positions and
 * times inside one segment.  Uses layers 1-4.  Never changes a file it
 * was not asked to; recovery policy lives in layer 6.
 * =================================================================== */

static void seg_path(char *out, size_t n, const char *pdir, uint64_t base,
                     const char *suffix)
{
	strfmt(out, n, "%s/%0*" PRIu64 "%s", pdir, MQ_SEG_DIGITS, base, suffix);
}

/* Largest run of missing offsets (cut out by a repair) a scan accepts
 * between two batches; a larger jump is damage. */
#define MQ_MAX_GAP (1u << 24)

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Sorted base offsets of the segments (.log files) in pdir. */
static int seg_list(const char *pdir, uint64_t **bases, size_t *n, struct mq_err *e)
{
	*bases = NULL;
	*n = 0;
	DIR *d = opendir(pdir);
	if (!d)
		return err_sys(e, errno == ENOENT ? MQ_EX_NOINPUT : MQ_EX_IOERR,
		               "cannot open partition '%s'", pdir);
	size_t cap = 0;
	struct dirent *de;
	while ((de = readdir(d))) {
		const char *s = de->d_name;
		if (strlen(s) != MQ_SEG_DIGITS + 4 || strcmp(s + MQ_SEG_DIGITS, MQ_LOG_SUFFIX))
			continue;
		uint64_t v = 0;
		int ok = 1;
		for (int i = 0; i < MQ_SEG_DIGITS; i++) {
			if (!isdigit((unsigned char)s[i]))
				ok = 0;
			v = v * 10 + (uint64_t)(s[i] - '0');
		}
		if (!ok)
			continue;
		if (*n == cap) {
			cap = cap ? cap * 2 : 16;
			uint64_t *nb = realloc(*bases, cap * sizeof **bases);
			if (!nb)
				abort();
			*bases = nb;
		}
		(*bases)[(*n)++] = v;
	}
	closedir(d);
	if (*n > 1)
		qsort(*bases, *n, sizeof **bases, cmp_u64);
	return 0;
}

/*
 * Read and check the batch at pos of a segment (limit = bytes that may be
 * read).  Returns 1 with the batch in b (b->p[0] is its first byte), 0 if
 * pos == limit, -1 with "path:pos: reason" (code 65 for bad data).
 */
static int seg_read_batch(int fd, const char *path, uint64_t pos, uint64_t limit,
                          struct buf *b, struct rec_hdr *h, struct mq_err *e)
{
	if (pos >= limit)
		return 0;
	struct mq_err sub;
	b->len = 0;
	buf_reserve(b, MQ_BATCH_HDR);
	size_t want = limit - pos < MQ_BATCH_HDR ? (size_t)(limit - pos) : MQ_BATCH_HDR;
	ssize_t r = dur_pread(fd, b->p, want, (off_t)pos, path, e);
	if (r < 0)
		return -1;
	if (rec_parse_hdr((unsigned char *)b->p, (size_t)r, h, &sub) < 0)
		return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": %s", path, pos, sub.msg);
	if (h->len > limit - pos)
		return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": batch of %" PRIu32
		               " bytes runs past the end (%" PRIu64 ")", path, pos, h->len, limit);
	buf_reserve(b, h->len);
	r = dur_pread(fd, b->p, h->len, (off_t)pos, path, e);
	if (r < 0)
		return -1;
	if ((size_t)r < h->len)
		return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": batch cut short", path, pos);
	b->len = h->len;
	if (rec_check_crc((unsigned char *)b->p, h, &sub) < 0)
		return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": %s", path, pos, sub.msg);
	return 1;
}

/* Index entries for the messages of one batch at pos. */
static void seg_idx_entries(struct buf *idx, uint64_t pos, const uint32_t *tags,
                            uint32_t count)
{
	buf_reserve(idx, (size_t)count * MQ_IDX_ENTRY);
	unsigned char *p = (unsigned char *)idx->p + idx->len;
	for (uint32_t i = 0; i < count; i++, p += MQ_IDX_ENTRY) {
		le32_put(p, (uint32_t)pos);
		le32_put(p + 4, tags ? tags[i] : 0);
	}
	idx->len += (size_t)count * MQ_IDX_ENTRY;
}

/* Tag hashes of a checked batch's messages (for rebuilding an index). */
static int seg_batch_tags(const unsigned char *b, const struct rec_hdr *h,
                          struct buf *scratch, struct buf *tags, struct mq_err *e)
{
	struct rec_iter it;
	struct rec_msg m;
	tags->len = 0;
	if (rec_iter_init(&it, b, h, scratch, e) < 0)
		return -1;
	int r;
	while ((r = rec_next(&it, &m, e)) == 1) {
		uint32_t th = m.has_tag ? tag_hash(m.tag, m.tlen) : 0;
		buf_add(tags, &th, sizeof th);
	}
	if (r == 0 && tags->len / 4 != h->count)
		return err_set(e, MQ_EX_DATAERR, "batch holds %zu messages, header says %" PRIu32,
		               tags->len / 4, h->count);
	return r;
}

/* Look up offset's batch position in an index fd.  Returns 1 found, 0 not
 * in the index (short file), -1 I/O error. */
static int seg_idx_lookup(int fd, const char *path, uint64_t rel, uint64_t *pos,
                          uint32_t *tag, struct mq_err *e)
{
	unsigned char ent[MQ_IDX_ENTRY];
	ssize_t r = dur_pread(fd, ent, sizeof ent, (off_t)(rel * MQ_IDX_ENTRY), path, e);
	if (r < 0)
		return -1;
	if (r < (ssize_t)sizeof ent)
		return 0;
	*pos = le32_get(ent);
	if (tag)
		*tag = le32_get(ent + 4);
	return 1;
}

/*
 * Starting offset for "first message at or after time ts" in a segment,
 * from its time index: the offset of the last entry whose max ts < ts (or
 * the segment base).
 */
static int seg_tix_seek(const char *tixpath, uint64_t base, int64_t ts, uint64_t *off,
                        struct mq_err *e)
{
	*off = base;
	int fd = open(tixpath, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? 0 : err_sys(e, MQ_EX_IOERR, "cannot open '%s'", tixpath);
	struct stat st;
	fstat(fd, &st);
	uint64_t n = (uint64_t)st.st_size / MQ_TIX_ENTRY, lo = 0, hi = n;
	unsigned char ent[MQ_TIX_ENTRY];
	/* Binary search: first entry with max ts >= ts. */
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;
		if (dur_pread(fd, ent, sizeof ent, (off_t)(mid * MQ_TIX_ENTRY), tixpath, e) < 0) {
			close(fd);
			return -1;
		}
		if ((int64_t)le64_get(ent) < ts)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo > 0 && dur_pread(fd, ent, sizeof ent, (off_t)((lo - 1) * MQ_TIX_ENTRY),
	                        tixpath, e) == sizeof ent)
		*off = le64_get(ent + 8);
	close(fd);
	return 0;
}

/* ===================================================================
 * 6. Partitions and queues: open/create, append, recover, read
 *
 * Owns a partition's files and the rules that keep them consistent:
 *  - one writer at a time holds P/lock (flock); only it appends, rolls,
 *    truncates or deletes segments;
 *  - the writer publishes the end of acknowledged data in P/head only
 *    after the sync its fsync mode requires; readers read up to the
 *    published end and never past it, without taking any lock;
 *  - a segment other than the one head names is sealed: complete,
 *    synced, and never changed again (except by `mq verify --repair`).
 * Uses layers 1-5.  Reports notable events (a cut torn tail) through the
 * spool's notice hook; never prints.
 * =================================================================== */

struct spool {
	char dir[PATH_MAX];
	struct cfg cfg;
	void (*notice)(void *ctx, const char *msg); /* recoveries, warnings */
	void *notice_ctx;
};

/* Format a line and hand it to a hook (notices, the server's log). */
static void hook_vsay(void (*fn)(void *ctx, const char *line), void *ctx, const char *fmt,
                      va_list ap)
{
	char line[1024];
	vsnprintf(line, sizeof line, fmt, ap);
	if (fn)
		fn(ctx, line);
}

static void hook_say(void (*fn)(void *ctx, const char *line), void *ctx, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void hook_say(void (*fn)(void *ctx, const char *line), void *ctx, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	hook_vsay(fn, ctx, fmt, ap);
	va_end(ap);
}

static void sp_notice(struct spool *sp, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	hook_vsay(sp->notice, sp->notice_ctx, fmt, ap);
	va_end(ap);
}

struct head {
	uint64_t next;     /* next offset to assign */
	uint64_t seg_base; /* active segment */
	uint64_t seg_len;  /* published bytes of the active segment */
	int64_t time_ms;   /* when published */
};

static void head_encode(unsigned char *b, const struct head *h)
{
	le32_put(b, MQ_HEAD_MAGIC);
	le64_put(b + 8, h->next);
	le64_put(b + 16, h->seg_base);
	le64_put(b + 24, h->seg_len);
	le64_put(b + 32, (uint64_t)h->time_ms);
	le32_put(b + 4, (uint32_t)crc32(0L, b + 8, MQ_HEAD_SIZE - 8));
}

static int head_decode(const unsigned char *b, struct head *h)
{
	if (le32_get(b) != MQ_HEAD_MAGIC ||
	    le32_get(b + 4) != (uint32_t)crc32(0L, b + 8, MQ_HEAD_SIZE - 8))
		return -1;
	h->next = le64_get(b + 8);
	h->seg_base = le64_get(b + 16);
	h->seg_len = le64_get(b + 24);
	h->time_ms = (int64_t)le64_get(b + 32);
	return h->seg_base <= h->next ? 0 : -1;
}

struct queue;

struct part {
	struct queue *q;
	int id;
	char dir[PATH_MAX];
	int lock_fd, head_fd; /* -1 until needed; head_fd O_RDWR when writable */
	int locked;           /* we hold the writer lock */
	/* Writer state, valid while locked: */
	struct head h;        /* last published */
	uint64_t next;        /* next offset to assign */
	uint64_t log_base;    /* segment the fds below belong to */
	uint64_t seg_len;     /* bytes written to it (>= h.seg_len) */
	uint64_t idx_len, tix_len; /* bytes in the index files */
	int64_t tix_max_ts;   /* cumulative max ts for the next tix entry */
	int tix_loaded;       /* tix_max_ts read from the file */
	int log_fd, idx_fd, tix_fd;
	char head_path[PATH_MAX + 8];  /* for messages: every error names its file */
	char log_path[PATH_MAX + 32], idx_path[PATH_MAX + 32], tix_path[PATH_MAX + 32];
	int rolled;           /* a roll happened since the lock was taken */
	int hold;             /* a commit is appending: no roll (it would publish) */
	int broken;           /* a sync failed: no more appends here */
	struct buf scratch, idxbuf, tixbuf, tags;
	/* The batch a reader of this handle checked last (segment, position,
	 * length, crc): a reader finding the same header there again skips
	 * the checksum.  mq serve re-reads a batch for every GET. */
	uint64_t ok_seg, ok_pos;
	uint32_t ok_len, ok_crc;
};

struct queue {
	struct spool *sp;
	char name[MQ_NAME_MAX + 1];
	char dir[PATH_MAX];
	struct qconf conf;
	int nparts;
	struct part *parts;
};

static void part_path(const struct part *p, char *out, size_t n, uint64_t base,
                      const char *suffix)
{
	seg_path(out, n, p->dir, base, suffix);
}

/* Open P/head (read-write when we may, else read-only). */
static int head_open(struct part *p, int create, struct mq_err *e)
{
	if (p->head_fd >= 0)
		return 0;
	char *path = p->head_path;
	strfmt(path, sizeof p->head_path, "%s/head", p->dir);
	p->head_fd = sys.open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0), 0644);
	if (p->head_fd < 0 && (errno == EACCES || errno == EROFS || errno == EPERM))
		p->head_fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (p->head_fd < 0)
		return err_sys(e, errno == ENOENT ? MQ_EX_NOINPUT : MQ_EX_IOERR,
		               "cannot open '%s'", path);
	return 0;
}

/*
 * Read the head.  Returns 1 valid, 0 missing or damaged, -1 I/O error.
 * A crc mismatch is usually a concurrent rewrite, so read again a few
 * times before calling it damaged.
 */
static int head_read(struct part *p, struct head *h, struct mq_err *e)
{
	if (head_open(p, 0, e) < 0)
		return e->code == MQ_EX_NOINPUT ? 0 : -1;
	unsigned char b[MQ_HEAD_SIZE];
	for (int tries = 0; tries < 200; tries++) {
		ssize_t r = dur_pread(p->head_fd, b, sizeof b, 0, p->head_path, e);
		if (r < 0)
			return -1;
		if (r == sizeof b && head_decode(b, h) == 0)
			return 1;
		if (r < (ssize_t)sizeof b && tries > 2)
			return 0;
		if (tries > 20)
			usleep(100);
	}
	return 0;
}

static int part_publish(struct part *p, int sync, struct mq_err *e)
{
	struct head h = {p->next, p->log_base, p->seg_len, now_ms()};
	unsigned char b[MQ_HEAD_SIZE];
	head_encode(b, &h);
	if (head_open(p, 1, e) < 0 ||
	    dur_pwrite_all(p->head_fd, b, sizeof b, 0, p->head_path, e) < 0)
		return -1;
	if (sync && dur_sync(p->head_fd, p->head_path, e) < 0)
		return -1;
	p->h = h;
	return 0;
}

static void part_close_seg(struct part *p)
{
	dur_close(&p->log_fd);
	dur_close(&p->idx_fd);
	dur_close(&p->tix_fd);
}

/* Open the three files of segment base for writing. */
static int part_open_seg(struct part *p, uint64_t base, int flags, struct mq_err *e)
{
	static const char *sfx[3] = {MQ_LOG_SUFFIX, MQ_IDX_SUFFIX, MQ_TIX_SUFFIX};
	int *fds[3] = {&p->log_fd, &p->idx_fd, &p->tix_fd};
	char *paths[3] = {p->log_path, p->idx_path, p->tix_path};
	part_close_seg(p);
	for (int i = 0; i < 3; i++) {
		char *path = paths[i];
		part_path(p, path, sizeof p->log_path, base, sfx[i]);
		*fds[i] = sys.open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | flags, 0644);
		if (*fds[i] < 0) {
			err_sys(e, errno == ENOENT ? MQ_EX_DATAERR : err_code_for(errno),
			        "cannot open segment file '%s'", path);
			part_close_seg(p);
			return -1;
		}
	}
	p->log_base = base;
	p->tix_loaded = 0;
	return 0;
}

/* Find the next position >= from where a valid batch starts (by magic
 * and crc), or -1 if none before limit. */
static int64_t seg_find_valid(int fd, const char *path, uint64_t from, uint64_t limit,
                              struct buf *b)
{
	static const unsigned char magic[4] = {'M', 'Q', 'B', '1'};
	struct buf chunk = {0};
	int64_t found = -1;
	struct mq_err e;
	buf_reserve(&chunk, 1 << 20);
	for (uint64_t at = from; at < limit && found < 0;) {
		ssize_t r = dur_pread(fd, chunk.p, 1 << 20, (off_t)at, path, &e);
		if (r <= 0)
			break;
		for (const char *s = chunk.p; found < 0 && s < chunk.p + r;) {
			s = memmem(s, (size_t)(chunk.p + r - s), magic, 4);
			if (!s)
				break;
			uint64_t pos = at + (uint64_t)(s - chunk.p);
			struct rec_hdr h;
			if (seg_read_batch(fd, path, pos, limit, b, &h, &e) == 1)
				found = (int64_t)pos;
			s++;
		}
		at += (uint64_t)r > 3 ? (uint64_t)r - 3 : (uint64_t)r;
	}
	buf_free(&chunk);
	return found;
}

/* Append a tix entry for a batch at pos if it crosses a MQ_TIX_INTERVAL
 * boundary (or starts the segment). */
static void part_tix_note(struct part *p, uint64_t pos, uint32_t len, uint64_t base,
                          int64_t max_ts)
{
	if (!p->tix_loaded) {
		unsigned char ent[MQ_TIX_ENTRY];
		struct mq_err e;
		p->tix_max_ts = INT64_MIN;
		if (p->tix_len >= MQ_TIX_ENTRY &&
		    dur_pread(p->tix_fd, ent, sizeof ent, (off_t)(p->tix_len - MQ_TIX_ENTRY), p->tix_path,
		              &e) == sizeof ent)
			p->tix_max_ts = (int64_t)le64_get(ent);
		p->tix_loaded = 1;
	}
	if (max_ts > p->tix_max_ts)
		p->tix_max_ts = max_ts;
	if (pos != 0 && (pos + len - 1) / MQ_TIX_INTERVAL == (pos - 1) / MQ_TIX_INTERVAL)
		return;
	unsigned char ent[MQ_TIX_ENTRY];
	le64_put(ent, (uint64_t)p->tix_max_ts);
	le64_put(ent + 8, base);
	buf_add(&p->tixbuf, ent, sizeof ent);
}

/* Write the index and time-index entries gathered in idxbuf/tixbuf. */
static int part_write_indexes(struct part *p, struct mq_err *e)
{
	if (p->idxbuf.len && dur_pwrite_all(p->idx_fd, p->idxbuf.p, p->idxbuf.len,
	                                    (off_t)p->idx_len, p->idx_path, e) < 0)
		return -1;
	p->idx_len += p->idxbuf.len;
	if (p->tixbuf.len && dur_pwrite_all(p->tix_fd, p->tixbuf.p, p->tixbuf.len,
	                                    (off_t)p->tix_len, p->tix_path, e) < 0)
		return -1;
	p->tix_len += p->tixbuf.len;
	p->idxbuf.len = p->tixbuf.len = 0;
	return 0;
}

/* Bytes of the open segment's time index that describe offsets < next
 * (entries past that belong to data being cut or rescanned). */
static uint64_t part_tix_keep(struct part *p, uint64_t next)
{
	struct stat st;
	struct mq_err e;
	if (fstat(p->tix_fd, &st) < 0)
		return 0;
	uint64_t n = (uint64_t)st.st_size / MQ_TIX_ENTRY, lo = 0, hi = n;
	unsigned char ent[MQ_TIX_ENTRY];
	while (lo < hi) { /* first entry with offset >= next */
		uint64_t mid = lo + (hi - lo) / 2;
		if (dur_pread(p->tix_fd, ent, sizeof ent, (off_t)(mid * MQ_TIX_ENTRY), p->tix_path, &e) !=
		    sizeof ent)
			return 0;
		if (le64_get(ent + 8) < next)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo * MQ_TIX_ENTRY;
}

/*
 * Scan the active segment from pos (offset next) to its end, rebuilding
 * index entries, and cut a torn tail.  Damage followed by valid batches
 * is not a torn write but corruption: refuse (65) and leave it to
 * `mq verify --repair`, so no acknowledged batch behind it is cut.
 */
static int part_scan_tail(struct part *p, uint64_t pos, uint64_t next, uint64_t size,
                          uint64_t pub_len, struct mq_err *e)
{
	char path[PATH_MAX + 32];
	part_path(p, path, sizeof path, p->log_base, MQ_LOG_SUFFIX);
	struct rec_hdr h;
	struct mq_err sub;
	for (;;) {
		int r = seg_read_batch(p->log_fd, path, pos, size, &p->scratch, &h, &sub);
		if (r == 0)
			break;
		if (r == 1 && (h.base < next || h.base - next > MQ_MAX_GAP))
			r = err_set(&sub, MQ_EX_DATAERR, "%s:%" PRIu64 ": batch base offset %" PRIu64
			            ", expected %" PRIu64, path, pos, h.base, next);
		if (r == 1 && h.base > next) { /* offsets cut out by a repair */
			seg_idx_entries(&p->idxbuf, pos, NULL, (uint32_t)(h.base - next));
			next = h.base;
		}
		struct buf inflate = {0};
		if (r == 1 && seg_batch_tags((unsigned char *)p->scratch.p, &h, &inflate, &p->tags,
		                             &sub) < 0)
			r = err_prefix(&sub, MQ_EX_DATAERR, path, pos);
		buf_free(&inflate);
		if (r < 0) {
			if (sub.code != MQ_EX_DATAERR) {
				*e = sub;
				return -1;
			}
			if (seg_find_valid(p->log_fd, path, pos + 1, size, &p->scratch) >= 0)
				return err_set(e, MQ_EX_DATAERR, "%s; valid data follows, so this is damage, "
				               "not a torn write: run 'mq verify --repair %s'", sub.msg, p->q->name);
			if (sys.ftruncate(p->log_fd, (off_t)pos) < 0)
				return err_sys(e, MQ_EX_IOERR, "cannot truncate '%s'", path);
			sp_notice(p->q->sp, "%s/%d: cut a torn tail of %" PRIu64 " bytes at %s:%" PRIu64
			          " (offsets from %" PRIu64 " were never acknowledged)",
			          p->q->name, p->id, size - pos, path, pos, next);
			break;
		}
		if (h.pid == MQ_PRODUCER_TXN && pos >= pub_len) {
			/* A commit died before publishing: its messages must appear
			 * all at once, so they go, and the resumed commit (txn_move)
			 * writes them again. */
			if (sys.ftruncate(p->log_fd, (off_t)pos) < 0)
				return err_sys(e, MQ_EX_IOERR, "cannot truncate '%s'", path);
			sp_notice(p->q->sp, "%s/%d: cut %" PRIu64 " bytes of an unfinished transaction commit "
			          "at %s:%" PRIu64 "; they come back when the commit is finished", p->q->name,
			          p->id, size - pos, path, pos);
			break;
		}
		seg_idx_entries(&p->idxbuf, pos, (uint32_t *)(void *)p->tags.p, h.count);
		part_tix_note(p, pos, h.len, h.base, h.max_ts);
		pos += h.len;
		next += h.count;
	}
	p->seg_len = pos;
	p->next = next;
	return 0;
}

/* Check that the index's last entry names a batch that holds its offset. */
static int part_idx_sane(struct part *p, uint64_t entries)
{
	if (entries == 0)
		return 1;
	uint64_t pos;
	struct mq_err e;
	struct rec_hdr h;
	unsigned char hb[MQ_BATCH_HDR];
	if (seg_idx_lookup(p->idx_fd, p->idx_path, entries - 1, &pos, NULL, &e) != 1 ||
	    dur_pread(p->log_fd, hb, sizeof hb, (off_t)pos, p->log_path, &e) != sizeof hb ||
	    rec_parse_hdr(hb, sizeof hb, &h, &e) < 0)
		return 0;
	uint64_t off = p->log_base + entries - 1;
	return h.base <= off && off < h.base + h.count;
}

static int part_remove_seg(struct part *p, uint64_t base, struct mq_err *e);

/*
 * A crash during a roll, after the new segment's files were created and
 * before the head named them, leaves an empty orphan segment named after
 * the offset where the old one ended: the recovered next offset.  Remove
 * it, or the writer would go on filling the old segment past the
 * orphan's base and seeks would land in the orphan.  Returns 1 when that
 * segment is not empty: then the head is older than the segments (a
 * roll's head fsync failed) and the caller recovers from the listing.
 */
static int part_drop_orphan(struct part *p, struct mq_err *e)
{
	char path[PATH_MAX + 32];
	if (p->next == p->log_base)
		return 0;
	part_path(p, path, sizeof path, p->next, MQ_LOG_SUFFIX);
	int64_t size = file_size(path);
	if (size < 0)
		return 0;
	if (size > 0) /* not an orphan: the head is stale (its fsync failed) */
		return 1;
	sp_notice(p->q->sp, "%s/%d: removed segment %" PRIu64 " left empty by an interrupted roll",
	          p->q->name, p->id, p->next);
	if (part_remove_seg(p, p->next, e) < 0)
		return -1;
	return dur_sync_dir(p->dir, e);
}

/*
 * Bring the writer state in line with the disk; called with the writer
 * lock held.  Fast path (the usual case): head is valid and the files
 * have exactly the sizes it implies, which costs three small syscalls.
 * Otherwise a previous writer died: scan from the published end (or the
 * segment start if the head is unusable), cut a torn tail, rebuild the
 * index where it disagrees, sync what survived and publish it.  The work
 * is bounded by one segment, whatever the partition holds.
 */
static int part_recover_from(struct part *p, int trust_head, struct mq_err *e)
{
	struct head h;
	int valid = head_read(p, &h, e);
	if (valid < 0)
		return -1;
	if (!trust_head)
		valid = 0;
	char path[PATH_MAX + 32];
	if (valid) {
		part_path(p, path, sizeof path, h.seg_base, MQ_LOG_SUFFIX);
		if (file_size(path) < 0)
			valid = 0;
	}
	uint64_t base = valid ? h.seg_base : 0;
	if (!valid) {
		uint64_t *segs;
		size_t n;
		if (seg_list(p->dir, &segs, &n, e) < 0)
			return -1;
		base = n ? segs[n - 1] : 0;
		free(segs);
	}
	if ((p->log_fd < 0 || p->log_base != base) && part_open_seg(p, base, O_CREAT, e) < 0)
		return -1;
	struct stat ls, is, ts;
	if (fstat(p->log_fd, &ls) < 0 || fstat(p->idx_fd, &is) < 0 || fstat(p->tix_fd, &ts) < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot stat segment of %s/%d", p->q->name, p->id);
	uint64_t size = (uint64_t)ls.st_size;
	p->tix_len = (uint64_t)ts.st_size - (uint64_t)ts.st_size % MQ_TIX_ENTRY;
	p->tix_loaded = 0;
	p->idxbuf.len = p->tixbuf.len = 0;
	if (valid && size == h.seg_len && (uint64_t)is.st_size == (h.next - base) * MQ_IDX_ENTRY) {
		p->h = h;
		p->next = h.next;
		p->seg_len = h.seg_len;
		p->idx_len = (uint64_t)is.st_size;
		return part_drop_orphan(p, e);
	}
	uint64_t pub_len = valid ? h.seg_len : 0; /* what was acknowledged for sure */
	/* Slow path: something was left behind by a writer that died. */
	uint64_t pos = valid ? h.seg_len : 0, next = valid ? h.next : base;
	if (size < pos) /* the head claims more than exists: trust the log */
		pos = 0, next = base;
	uint64_t entries = next - base;
	if ((uint64_t)is.st_size < entries * MQ_IDX_ENTRY || !part_idx_sane(p, entries)) {
		if (pos > 0)
			sp_notice(p->q->sp, "%s/%d: rebuilding the index of segment %" PRIu64,
			          p->q->name, p->id, base);
		pos = 0, next = base, entries = 0;
	}
	p->idx_len = entries * MQ_IDX_ENTRY;
	p->tix_len = pos == 0 ? 0 : part_tix_keep(p, next);
	if (sys.ftruncate(p->idx_fd, (off_t)p->idx_len) < 0 ||
	    sys.ftruncate(p->tix_fd, (off_t)p->tix_len) < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot truncate the index of %s/%d", p->q->name, p->id);
	p->log_base = base;
	if (part_scan_tail(p, pos, next, size, valid ? pub_len : UINT64_MAX, e) < 0 ||
	    part_write_indexes(p, e) < 0)
		return -1;
	/* What survived may never have been synced: sync before publishing.
	 * If that fails, the unpublished tail is cut (it was never
	 * acknowledged) and the partition retired for this process. */
	part_path(p, path, sizeof path, base, MQ_LOG_SUFFIX);
	if (dur_datasync(p->log_fd, path, e) < 0) {
		p->broken = 1;
		if (valid && pub_len <= size) {
			sys.ftruncate(p->log_fd, (off_t)pub_len);
			sys.ftruncate(p->idx_fd, (off_t)((h.next - base) * MQ_IDX_ENTRY));
			sys.ftruncate(p->tix_fd, (off_t)part_tix_keep(p, h.next));
		}
		return -1;
	}
	int orphan = part_drop_orphan(p, e);
	return orphan != 0 ? orphan : part_publish(p, 0, e);
}

/* part_recover_from() trusting the head, then, if segments newer than
 * the head hold data, again from the directory listing. */
static int part_recover(struct part *p, struct mq_err *e)
{
	int r = part_recover_from(p, 1, e);
	if (r == 1) {
		sp_notice(p->q->sp, "%s/%d: head older than the segments; recovering from the newest",
		          p->q->name, p->id);
		part_close_seg(p);
		r = part_recover_from(p, 0, e);
	}
	return r == 1 ? err_set(e, MQ_EX_DATAERR, "%s/%d: cannot find the active segment",
	                        p->q->name, p->id) : r;
}

/* Take the writer lock only (no recovery): for `mq verify`. */
static int part_flock(struct part *p, int nonblock, struct mq_err *e)
{
	char path[PATH_MAX + 8];
	strfmt(path, sizeof path, "%s/lock", p->dir);
	if (p->lock_fd < 0) {
		p->lock_fd = sys.open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
		if (p->lock_fd < 0)
			return err_sys(e, errno == ENOENT ? MQ_EX_NOINPUT : err_code_for(errno),
			               "cannot open '%s'", path);
	}
	if (dur_lock(p->lock_fd, LOCK_EX | (nonblock ? LOCK_NB : 0), path, e) < 0)
		return -1;
	p->locked = 1;
	p->rolled = 0;
	return 0;
}

/* Become the partition's writer: lock, then bring state in line with
 * the disk (part_recover). */
static int part_lock(struct part *p, int nonblock, struct mq_err *e)
{
	if (p->broken) /* never write (or sync) again after a failed sync */
		return err_set(e, MQ_EX_IOERR, "%s/%d: an earlier sync failed; not writing more",
		               p->q->name, p->id);
	if (part_flock(p, nonblock, e) < 0)
		return -1;
	if (part_recover(p, e) < 0) {
		flock(p->lock_fd, LOCK_UN);
		p->locked = 0;
		return -1;
	}
	return 0;
}

static void part_unlock(struct part *p)
{
	if (p->locked)
		flock(p->lock_fd, LOCK_UN);
	p->locked = 0;
}

/*
 * A sync failed: the bytes past the published end may be lost even if a
 * later fsync "succeeds", so cut them off now and take this partition out
 * of service for the life of the process.  What was acknowledged before
 * (up to the published end) is untouched.
 */
static void part_fail(struct part *p)
{
	p->broken = 1;
	if (p->log_fd >= 0 && p->h.seg_base == p->log_base) {
		sys.ftruncate(p->log_fd, (off_t)p->h.seg_len);
		sys.ftruncate(p->idx_fd, (off_t)((p->h.next - p->log_base) * MQ_IDX_ENTRY));
		sys.ftruncate(p->tix_fd, (off_t)part_tix_keep(p, p->h.next));
	}
}

static int part_sync(struct part *p, struct mq_err *e)
{
	char path[PATH_MAX + 32];
	part_path(p, path, sizeof path, p->log_base, MQ_LOG_SUFFIX);
	if (dur_datasync(p->log_fd, path, e) < 0) {
		part_fail(p);
		return -1;
	}
	return 0;
}

/*
 * Seal the active segment and start a new one at the next offset.
 * Order, and what a crash between steps leaves:
 *  1. sync the old log and indexes (sealed data must be durable);
 *  2. create the new empty files (a crash leaves empty orphans, which
 *     a later roll truncates and reuses: no head ever named them);
 *  3. sync the directory, then publish and fsync the head naming the new
 *     segment (after this, a stale head can never name an older one).
 */
static int part_roll(struct part *p, struct mq_err *e)
{
	if (part_sync(p, e) < 0)
		return -1;
	if (dur_datasync(p->idx_fd, p->idx_path, e) < 0 ||
	    dur_datasync(p->tix_fd, p->tix_path, e) < 0 ||
	    part_open_seg(p, p->next, O_CREAT | O_TRUNC, e) < 0)
		goto fail;
	p->seg_len = p->idx_len = p->tix_len = 0;
	p->tix_loaded = 1;
	p->tix_max_ts = INT64_MIN;
	p->rolled = 1;
	if (dur_sync_dir(p->dir, e) < 0 || part_publish(p, 1, e) < 0)
		goto fail;
	return 0;
fail:
	/* Half a roll: what is on disk is unknown (a head whose fsync failed
	 * may still be read from the page cache).  No more writes here; the
	 * next process recovers from what the disk says. */
	part_fail(p);
	return -1;
}

/* Write [from, to) of enc's batches plus gathered index entries; on
 * failure cut everything written past the old end. */
static int part_write(struct part *p, const char *data, size_t n, struct mq_err *e)
{
	uint64_t old_len = p->seg_len, old_idx = p->idx_len, old_tix = p->tix_len;
	char path[PATH_MAX + 32];
	part_path(p, path, sizeof path, p->log_base, MQ_LOG_SUFFIX);
	if (dur_pwrite_all(p->log_fd, data, n, (off_t)p->seg_len, path, e) < 0 ||
	    part_write_indexes(p, e) < 0) {
		int saved = errno;
		sys.ftruncate(p->log_fd, (off_t)old_len);
		sys.ftruncate(p->idx_fd, (off_t)old_idx);
		sys.ftruncate(p->tix_fd, (off_t)old_tix);
		p->idx_len = old_idx;
		p->tix_len = old_tix;
		p->idxbuf.len = p->tixbuf.len = 0;
		errno = saved;
		return -1;
	}
	p->seg_len += n;
	return 0;
}

/*
 * Append the closed batches in enc (lock held): assign offsets, write
 * log and index, rolling the segment when it would pass segment-bytes.
 * Nothing is synced or published here.  *first gets the first offset.
 */
static int part_append(struct part *p, struct rec_enc *enc, uint64_t *first,
                       struct mq_err *e)
{
	if (p->broken)
		return err_set(e, MQ_EX_IOERR, "%s/%d: an earlier sync failed; not writing more",
		               p->q->name, p->id);
	*first = p->next;
	const uint32_t *tags = (const uint32_t *)(const void *)enc->tags.p;
	size_t at = 0, chunk = 0;
	uint64_t pos = p->seg_len, next = p->next; /* p->next: what is written */
	while (at < enc->out.len) {
		unsigned char *b = (unsigned char *)enc->out.p + at;
		uint32_t len = le32_get(b + 8), count = le32_get(b + 24);
		if (pos > 0 && !p->hold && pos + len > (uint64_t)p->q->conf.segment_bytes) {
			if (part_write(p, enc->out.p + chunk, at - chunk, e) < 0)
				return -1;
			p->next = next;
			if (part_roll(p, e) < 0)
				return -1;
			chunk = at;
			pos = 0;
		}
		rec_finish(b, next);
		seg_idx_entries(&p->idxbuf, pos, tags, count);
		part_tix_note(p, pos, len, next, (int64_t)le64_get(b + 40));
		tags += count;
		pos += len;
		next += count;
		at += len;
	}
	if (part_write(p, enc->out.p + chunk, at - chunk, e) < 0)
		return -1;
	p->next = next;
	return 0;
}

/* A drained partition's active segment is rolled away past this size. */
#define MQ_DRAINED_ROLL (64u << 10)

/* Remove segment base's three files (sealed segments, or an orphan).
 * The log goes last: a crash in between leaves a segment without its
 * derived files (rebuilt, or removed by the next retention), never
 * derived files without their log. */
static int part_remove_seg(struct part *p, uint64_t base, struct mq_err *e)
{
	static const char *sfx[3] = {MQ_TIX_SUFFIX, MQ_IDX_SUFFIX, MQ_LOG_SUFFIX};
	char path[PATH_MAX + 32];
	for (int i = 0; i < 3; i++) {
		part_path(p, path, sizeof path, base, sfx[i]);
		if (sys.unlink(path) < 0 && errno != ENOENT)
			return err_sys(e, MQ_EX_IOERR, "cannot remove '%s'", path);
	}
	return 0;
}

static int64_t seg_bytes(struct part *p, uint64_t base)
{
	char path[PATH_MAX + 32];
	int64_t t = 0, s;
	part_path(p, path, sizeof path, base, MQ_LOG_SUFFIX);
	if ((s = file_size(path)) > 0) t += s;
	part_path(p, path, sizeof path, base, MQ_IDX_SUFFIX);
	if ((s = file_size(path)) > 0) t += s;
	part_path(p, path, sizeof path, base, MQ_TIX_SUFFIX);
	if ((s = file_size(path)) > 0) t += s;
	return t;
}

/*
 * Retention, lock held: remove the oldest sealed segments that every
 * group has consumed (all offsets < consumed), that are older than
 * retain-age, or while the partition exceeds retain-bytes.  When
 * everything is consumed and the active segment holds roll_min bytes or
 * more (MQ_DRAINED_ROLL, or 1 for a purge), it is rolled and removed too, so a drained queue uses
 * almost no disk (and a consumer that keeps up does not roll per get).  Readers still inside a removed
 * segment keep reading it through their open descriptor.  Returns the
 * number of segments removed.
 */
static int part_retain(struct part *p, uint64_t consumed, uint64_t roll_min, struct mq_err *e)
{
	uint64_t *segs;
	size_t n;
	if (seg_list(p->dir, &segs, &n, e) < 0)
		return -1;
	const struct qconf *c = &p->q->conf;
	int64_t total = 0, cutoff = c->retain_age_ms ? now_ms() - c->retain_age_ms : INT64_MIN;
	for (size_t i = 0; i < n; i++)
		total += seg_bytes(p, segs[i]);
	int removed = 0;
	for (size_t i = 0; i + 1 < n && segs[i] < p->log_base; i++) {
		char path[PATH_MAX + 32];
		struct stat st;
		part_path(p, path, sizeof path, segs[i], MQ_LOG_SUFFIX);
		int old = cutoff != INT64_MIN && stat(path, &st) == 0 &&
		          (int64_t)st.st_mtime * 1000 < cutoff;
		int big = c->retain_bytes && total > c->retain_bytes;
		if (!(segs[i + 1] <= consumed || old || big))
			break;
		total -= seg_bytes(p, segs[i]);
		if (part_remove_seg(p, segs[i], e) < 0)
			goto fail;
		removed++;
	}
	if (consumed >= p->next && p->seg_len >= roll_min && p->seg_len > 0) {
		uint64_t old = p->log_base;
		if (part_roll(p, e) < 0 || part_remove_seg(p, old, e) < 0)
			goto fail;
		removed++;
	}
	free(segs);
	return removed && dur_sync_dir(p->dir, e) < 0 ? -1 : removed;
fail:
	free(segs);
	return -1;
}

/* ----- queues ----- */

struct kv {
	const char *k, *v;
};


static void q_dir(const struct spool *sp, const char *name, char *out, size_t n)
{
	strfmt(out, n, "%s/%s", sp->dir, name);
}

static int q_check_name(const char *what, const char *name, struct mq_err *e)
{
	if (!name_valid(name))
		return err_set(e, MQ_EX_USAGE, "bad %s name '%s': use 1-%d of A-Z a-z 0-9 . _ -, "
		               "starting with a letter or digit", what, name, MQ_NAME_MAX);
	return 0;
}

/* Effective settings: mq.yaml, then meta.yaml (if the queue exists), then
 * the command line's. */
static int q_conf(struct spool *sp, const char *name, const struct kv *set, int nset,
                  struct qconf *c, struct mq_err *e)
{
	char path[PATH_MAX + 200];
	if (cfg_queue(&sp->cfg, name, c, e) < 0)
		return -1;
	strfmt(path, sizeof path, "%s/%s/meta.yaml", sp->dir, name);
	if (cfg_apply_meta(path, c, e) < 0)
		return -1;
	for (int i = 0; i < nset; i++)
		if (conf_set(c, set[i].k, set[i].v, "command line", e) < 0)
			return -1;
	return 0;
}

/* Write one small file in a directory being built (not yet visible). */
static int q_write_new(const char *path, const void *data, size_t n, struct mq_err *e)
{
	int fd = sys.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		return err_sys(e, err_code_for(errno), "cannot create '%s'", path);
	int r = dur_write_all(fd, data, n, path, e);
	if (r == 0 && n)
		r = dur_sync(fd, path, e);
	close(fd);
	return r;
}

/*
 * Create queue `name`.  The whole tree is built under a hidden name and
 * renamed into place, so other processes see no queue or a complete one;
 * a crash leaves only a hidden ".new-" directory, ignored by everything.
 * Returns 1 created, 0 it already existed (someone else won a race), -1.
 */
static int q_create(struct spool *sp, const char *name, const struct kv *set, int nset,
                    struct mq_err *e)
{
	struct qconf c;
	char tmp[PATH_MAX], path[PATH_MAX + 64], final[PATH_MAX];
	if (q_check_name("queue", name, e) < 0 || cfg_queue(&sp->cfg, name, &c, e) < 0)
		return -1;
	struct buf meta = {0};
	buf_adds(&meta, "# settings given when this queue was created; see mq.yaml(5)\n");
	for (int i = 0; i < nset; i++) {
		if (conf_set(&c, set[i].k, set[i].v, "command line", e) < 0)
			goto fail_meta;
		if (strcmp(set[i].k, "partitions")) { /* a YAML double-quoted scalar */
			buf_printf(&meta, "%s: \"", set[i].k);
			for (const char *v = set[i].v; *v; v++)
				if (*v == '"' || *v == '\\')
					buf_printf(&meta, "\\%c", *v);
				else if ((unsigned char)*v < 0x20)
					buf_printf(&meta, "\\x%02x", (unsigned char)*v);
				else
					buf_add(&meta, v, 1);
			buf_adds(&meta, "\"\n");
		}
	}
	buf_printf(&meta, "partitions: %" PRId64 "\n", c.partitions);
	strfmt(tmp, sizeof tmp, "%s/.new-%s.%ld", sp->dir, name, (long)getpid());
	q_dir(sp, name, final, sizeof final);
	dur_rmtree(tmp, e); /* a leftover of ours from a crash, if any */
	if (dur_mkdir(tmp, e) < 0)
		goto fail_meta;
	strfmt(path, sizeof path, "%s/meta.yaml", tmp);
	if (q_write_new(path, meta.p, meta.len, e) < 0)
		goto fail;
	strfmt(path, sizeof path, "%s/groups", tmp);
	if (dur_mkdir(path, e) < 0)
		goto fail;
	for (int64_t i = 0; i < c.partitions; i++) {
		static const char *files[] = {"lock", "00000000000000000000.log",
		                              "00000000000000000000.idx", "00000000000000000000.tix"};
		unsigned char hb[MQ_HEAD_SIZE];
		struct head h = {0, 0, 0, now_ms()};
		strfmt(path, sizeof path, "%s/%" PRId64, tmp, i);
		if (dur_mkdir(path, e) < 0)
			goto fail;
		for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
			strfmt(path, sizeof path, "%s/%" PRId64 "/%s", tmp, i, files[f]);
			if (q_write_new(path, "", 0, e) < 0)
				goto fail;
		}
		head_encode(hb, &h);
		strfmt(path, sizeof path, "%s/%" PRId64 "/head", tmp, i);
		if (q_write_new(path, hb, sizeof hb, e) < 0)
			goto fail;
		strfmt(path, sizeof path, "%s/%" PRId64, tmp, i);
		if (dur_sync_dir(path, e) < 0)
			goto fail;
	}
	if (dur_sync_dir(tmp, e) < 0)
		goto fail;
	if (sys.rename(tmp, final) < 0) {
		if (errno == EEXIST || errno == ENOTEMPTY) {
			dur_rmtree(tmp, e);
			buf_free(&meta);
			return 0;
		}
		err_sys(e, err_code_for(errno), "cannot create queue '%s'", name);
		goto fail;
	}
	buf_free(&meta);
	return dur_sync_dir(sp->dir, e) < 0 ? -1 : 1;
fail:
	{
		struct mq_err ignored;
		dur_rmtree(tmp, &ignored);
	}
fail_meta:
	buf_free(&meta);
	return -1;
}

static int q_exists(struct spool *sp, const char *name)
{
	char path[PATH_MAX];
	struct stat st;
	if (!name_valid(name))
		return 0;
	q_dir(sp, name, path, sizeof path);
	return lstat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static void q_close(struct queue *q)
{
	if (!q)
		return;
	for (int i = 0; i < q->nparts; i++) {
		struct part *p = &q->parts[i];
		part_unlock(p);
		part_close_seg(p);
		dur_close(&p->lock_fd);
		dur_close(&p->head_fd);
		buf_free(&p->scratch);
		buf_free(&p->idxbuf);
		buf_free(&p->tixbuf);
		buf_free(&p->tags);
	}
	free(q->parts);
	free(q);
}

/*
 * Open queue `name` (creating it first when create is set and it does not
 * exist).  set/nset are settings from the command line, applied last.
 */
static int q_open(struct spool *sp, const char *name, int create, const struct kv *set,
                  int nset, struct queue **out, struct mq_err *e)
{
	*out = NULL;
	if (q_check_name("queue", name, e) < 0)
		return -1;
	if (!q_exists(sp, name)) {
		if (!create)
			return err_set(e, MQ_EX_NOINPUT, "no such queue '%s'", name);
		struct qconf check; /* bad settings must not leave a queue behind */
		if (q_conf(sp, name, set, nset, &check, e) < 0)
			return -1;
		/* Created with the configured settings only: command-line
		 * settings of this command (put --fsync) apply to it alone. */
		if (dur_mkdir(sp->dir, e) < 0 || q_create(sp, name, NULL, 0, e) < 0)
			return -1;
	}
	struct queue *q = calloc(1, sizeof *q);
	if (!q)
		abort();
	q->sp = sp;
	strfmt(q->name, sizeof q->name, "%s", name);
	q_dir(sp, name, q->dir, sizeof q->dir);
	if (q_conf(sp, name, set, nset, &q->conf, e) < 0) {
		free(q);
		return -1;
	}
	/* The partition count is what the queue was created with, never a
	 * command-line override. */
	struct qconf stored;
	if (q_conf(sp, name, NULL, 0, &stored, e) < 0) {
		free(q);
		return -1;
	}
	q->conf.partitions = stored.partitions;
	strfmt(q->conf.src[0], sizeof q->conf.src[0], "%s", stored.src[0]);
	q->nparts = (int)q->conf.partitions;
	q->parts = calloc((size_t)q->nparts, sizeof *q->parts);
	if (!q->parts)
		abort();
	for (int i = 0; i < q->nparts; i++) {
		struct part *p = &q->parts[i];
		p->q = q;
		p->id = i;
		strfmt(p->dir, sizeof p->dir, "%s/%d", q->dir, i);
		p->lock_fd = p->head_fd = p->log_fd = p->idx_fd = p->tix_fd = -1;
	}
	*out = q;
	return 0;
}

/* Names of all queues in the spool, sorted. */
static int q_list(struct spool *sp, char ***names, size_t *n, struct mq_err *e)
{
	*names = NULL;
	*n = 0;
	DIR *d = opendir(sp->dir);
	if (!d) {
		if (errno == ENOENT)
			return 0;
		return err_sys(e, MQ_EX_IOERR, "cannot open spool '%s'", sp->dir);
	}
	struct dirent *de;
	size_t cap = 0;
	while ((de = readdir(d))) {
		char meta[PATH_MAX + 200];
		strfmt(meta, sizeof meta, "%s/%s/meta.yaml", sp->dir, de->d_name);
		if (!name_valid(de->d_name) || !q_exists(sp, de->d_name) || file_size(meta) < 0)
			continue; /* not a queue: a stray directory */
		if (*n == cap) {
			cap = cap ? cap * 2 : 16;
			*names = realloc(*names, cap * sizeof **names);
			if (!*names)
				abort();
		}
		(*names)[(*n)++] = strdup(de->d_name);
	}
	closedir(d);
	if (*n > 1)
		qsort(*names, *n, sizeof **names, cmp_str);
	return 0;
}

/*
 * Remove queue `name`: rename it to a hidden name (atomic: from then on
 * it is gone for everyone), sync the spool, then delete the tree.  A crash
 * during the delete leaves a hidden ".rm-" directory that the next
 * `mq rm` clears.
 */
static int q_remove(struct spool *sp, const char *name, struct mq_err *e)
{
	char path[PATH_MAX], tmp[PATH_MAX + 64];
	if (q_check_name("queue", name, e) < 0)
		return -1;
	if (!q_exists(sp, name))
		return err_set(e, MQ_EX_NOINPUT, "no such queue '%s'", name);
	q_dir(sp, name, path, sizeof path);
	strfmt(tmp, sizeof tmp, "%s/.rm-%s.%ld", sp->dir, name, (long)getpid());
	if (sys.rename(path, tmp) < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot remove queue '%s'", name);
	if (dur_sync_dir(sp->dir, e) < 0)
		return -1;
	int r = dur_rmtree(tmp, e);
	DIR *d = opendir(sp->dir);
	struct dirent *de;
	while (d && (de = readdir(d))) {
		if (strncmp(de->d_name, ".rm-", 4) == 0) {
			struct mq_err ignored;
			strfmt(tmp, sizeof tmp, "%s/%s", sp->dir, de->d_name);
			dur_rmtree(tmp, &ignored);
		}
	}
	if (d)
		closedir(d);
	return r;
}

/* ----- reading ----- */

/* A tag filter, 'A||B||C' (RocketMQ's syntax): messages with one of the
 * tags; the hashes let a reader skip batches through the index alone. */
struct tagset {
	size_t n;
	const char **tag;
	size_t *len;
	uint32_t *hash;
};

static int tagset_has_hash(const struct tagset *ts, uint32_t h)
{
	for (size_t i = 0; i < ts->n; i++)
		if (ts->hash[i] == h)
			return 1;
	return 0;
}

static void tagset_free(struct tagset *ts)
{
	free(ts->tag);
	free(ts->len);
	free(ts->hash);
	memset(ts, 0, sizeof *ts);
}

/* Parse a tag expression 'A||B' into ts, whose tags point into v; NULL
 * or '*' means every message and sets *out NULL, else *out = ts.  Returns
 * 0, or -1 (MQ_EX_USAGE) for an empty alternative. */
static int tagset_parse(const char *v, struct tagset *ts, const struct tagset **out,
                        struct mq_err *e)
{
	*out = NULL;
	memset(ts, 0, sizeof *ts);
	if (!v || !strcmp(v, "*"))
		return 0;
	size_t cap = 1;
	for (const char *p = v; (p = strstr(p, "||")); p += 2)
		cap++;
	ts->tag = calloc(cap, sizeof *ts->tag);
	ts->len = calloc(cap, sizeof *ts->len);
	ts->hash = calloc(cap, sizeof *ts->hash);
	if (!ts->tag || !ts->len || !ts->hash)
		abort();
	for (const char *p = v;;) {
		const char *end = strstr(p, "||");
		size_t n = end ? (size_t)(end - p) : strlen(p);
		while (n && *p == ' ')
			p++, n--;
		while (n && p[n - 1] == ' ')
			n--;
		if (n == 0) {
			tagset_free(ts);
			return err_set(e, MQ_EX_USAGE, "bad --tag '%s': use TAG or 'TAG1||TAG2'", v);
		}
		ts->tag[ts->n] = p;
		ts->len[ts->n] = n;
		ts->hash[ts->n++] = tag_hash(p, n);
		if (!end)
			break;
		p = end + 2;
	}
	*out = ts;
	return 0;
}

static int tagset_match(const struct tagset *ts, const struct rec_msg *m)
{
	for (size_t i = 0; m->has_tag && i < ts->n; i++)
		if (ts->len[i] == m->tlen && !memcmp(ts->tag[i], m->tag, m->tlen))
			return 1;
	return 0;
}

/*
 * A lock-free reader of one partition.  It delivers messages at offsets
 * >= want in order, up to the published end, and never returns a message
 * from a batch whose crc failed.  Offsets that no longer exist (removed by
 * retention or purge, or cut out by a repair) are skipped and recorded
 * in skip_from/skip_to.
 */
struct reader {
	struct part *p;
	uint64_t want;          /* next offset to deliver */
	struct head h;          /* last head read */
	uint64_t *segs;         /* segment bases, from the last listing */
	size_t nsegs;
	uint64_t seg;           /* base of the open segment */
	int fd;
	char path[PATH_MAX + 32];
	uint64_t pos;           /* position of the next batch to read */
	uint64_t limit;         /* bytes of this segment that may be read */
	int sealed;             /* not the active segment: limit = file size */
	int check_idx;          /* the next batch came from an index lookup */
	struct buf rb;          /* file bytes [rb_at, rb_at + rb.len) */
	uint64_t rb_at;
	size_t chunk;           /* next read size: grows while reading on */
	struct buf inflate;
	struct rec_iter it;
	int in_batch;
	uint64_t batch_pos;     /* position of the batch being iterated */
	uint64_t skip_from, skip_to; /* last range of missing offsets */
	int64_t min_ts;         /* skip messages older than this (time seek) */
	const struct tagset *tags; /* deliver only these tags (NULL: all) */
	int idx_fd;             /* index of the open segment, for tag skips */
};

/* Read the head; if a writer died leaving unpublished bytes (or a bad
 * head), recover the partition first, unless a live writer holds it. */
static int rd_head(struct reader *r, struct mq_err *e)
{
	struct part *p = r->p;
	int valid = head_read(p, &r->h, e);
	if (valid < 0)
		return -1;
	if (valid) {
		char path[PATH_MAX + 32];
		part_path(p, path, sizeof path, r->h.seg_base, MQ_LOG_SUFFIX);
		int64_t size = file_size(path);
		if (size >= 0 && (uint64_t)size == r->h.seg_len)
			return 0;
	}
	struct mq_err le;
	if (part_lock(p, valid, &le) == 0) {
		part_unlock(p);
		valid = head_read(p, &r->h, e);
		if (valid < 0)
			return -1;
	} else if (!valid) {
		*e = le;
		return -1;
	}
	return valid ? 0 : err_set(e, MQ_EX_DATAERR, "%s/%d: head file is damaged", p->q->name, p->id);
}

static int rd_list(struct reader *r, struct mq_err *e)
{
	free(r->segs);
	return seg_list(r->p->dir, &r->segs, &r->nsegs, e);
}

/* Open segment base for reading.  Returns 1, 0 if it is gone, -1. */
static int rd_open_seg(struct reader *r, uint64_t base, struct mq_err *e)
{
	dur_close(&r->fd);
	part_path(r->p, r->path, sizeof r->path, base, MQ_LOG_SUFFIX);
	r->fd = open(r->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (r->fd < 0)
		return errno == ENOENT ? 0 : err_sys(e, MQ_EX_IOERR, "cannot open '%s'", r->path);
	if (base > r->h.seg_base) { /* past the published end: not ours to read */
		dur_close(&r->fd);
		return 0;
	}
	r->seg = base;
	r->pos = 0;
	r->rb.len = 0;
	r->rb_at = 0;
	r->in_batch = 0;
	dur_close(&r->idx_fd); /* opened again when a tag filter needs it */
	r->sealed = base < r->h.seg_base;
	if (r->sealed) {
		struct stat st;
		if (fstat(r->fd, &st) < 0)
			return err_sys(e, MQ_EX_IOERR, "cannot stat '%s'", r->path);
		r->limit = (uint64_t)st.st_size;
	} else {
		r->limit = r->h.seg_len;
	}
	return 1;
}

/* Position the reader at offset want (clamped to what exists). */
static int rd_seek(struct reader *r, uint64_t want, struct mq_err *e)
{
	r->want = want;
	r->in_batch = 0;
	r->check_idx = 0;
	for (int tries = 0; tries < 100; tries++) {
		struct head h;
		int v;
		if (rd_list(r, e) < 0 || (v = head_read(r->p, &h, e)) < 0)
			return -1;
		if (v)
			r->h = h;
		/* Retention may have rolled and removed the segment an older head
		 * named: then list again with the head that replaced it. */
		int listed = 0;
		for (size_t k = 0; k < r->nsegs; k++)
			listed |= r->segs[k] == r->h.seg_base;
		if (!listed && r->nsegs > 0)
			continue;
		size_t i = r->nsegs; /* the last segment <= want, never past the active one */
		while (i > 0 && (r->segs[i - 1] > r->want || r->segs[i - 1] > r->h.seg_base))
			i--;
		if (i == 0) {
			if (r->nsegs == 0)
				return err_set(e, MQ_EX_DATAERR, "%s/%d: no segment files", r->p->q->name, r->p->id);
			r->skip_from = r->want, r->skip_to = r->segs[0];
			r->want = r->segs[0];
			i = 1;
		}
		int k = rd_open_seg(r, r->segs[i - 1], e);
		if (k < 0)
			return -1;
		if (k == 0)
			continue; /* removed under us: list again */
		if (r->want > r->seg && r->want < r->h.next) {
			char ipath[PATH_MAX + 32];
			part_path(r->p, ipath, sizeof ipath, r->seg, MQ_IDX_SUFFIX);
			int fd = open(ipath, O_RDONLY | O_CLOEXEC);
			uint64_t pos;
			if (fd >= 0 && seg_idx_lookup(fd, ipath, r->want - r->seg, &pos, NULL, e) == 1 &&
			    pos < r->limit) {
				r->pos = pos;
				r->check_idx = 1;
			}
			if (fd >= 0)
				close(fd);
		}
		return 0;
	}
	return err_set(e, MQ_EX_TEMPFAIL, "%s/%d: segments keep disappearing", r->p->q->name, r->p->id);
}

static int rd_open(struct reader *r, struct part *p, uint64_t want, struct mq_err *e)
{
	memset(r, 0, sizeof *r);
	r->p = p;
	r->fd = r->idx_fd = -1;
	r->min_ts = INT64_MIN;
	if (rd_head(r, e) < 0)
		return -1;
	return rd_seek(r, want, e);
}

static void rd_close(struct reader *r)
{
	dur_close(&r->fd);
	dur_close(&r->idx_fd);
	free(r->segs);
	r->segs = NULL;
	buf_free(&r->rb);
	buf_free(&r->inflate);
}

/* Make rb hold n bytes from pos (or up to limit).  Returns bytes held. */
static ssize_t rd_fill(struct reader *r, size_t n, struct mq_err *e)
{
	uint64_t have_end = r->rb_at + r->rb.len;
	if (r->pos >= r->rb_at && r->pos + n <= have_end)
		return (ssize_t)n;
	if (r->pos >= r->rb_at && r->pos < have_end) {
		size_t keep = (size_t)(have_end - r->pos);
		memmove(r->rb.p, r->rb.p + (r->pos - r->rb_at), keep);
		r->rb.len = keep;
	} else {
		r->rb.len = 0;
	}
	r->rb_at = r->pos;
	/* Small first reads keep a seek cheap; a reader that goes on gets
	 * ever larger reads, up to 1 MiB. */
	if (r->chunk < (64u << 10))
		r->chunk = 64u << 10;
	size_t want = n < r->chunk ? r->chunk : n;
	if (r->chunk < (1u << 20))
		r->chunk *= 2;
	uint64_t room = r->limit - (r->rb_at + r->rb.len);
	if (want - r->rb.len > room)
		want = r->rb.len + (size_t)room;
	if (want > r->rb.len) {
		buf_reserve(&r->rb, want - r->rb.len);
		ssize_t got = dur_pread(r->fd, r->rb.p + r->rb.len, want - r->rb.len,
		                        (off_t)(r->rb_at + r->rb.len), r->path, e);
		if (got < 0)
			return -1;
		r->rb.len += (size_t)got;
	}
	return (ssize_t)(r->rb.len < n ? r->rb.len : n);
}

/* Move on from an exhausted segment.  Returns 1 moved, 0 at the end. */
static int rd_advance(struct reader *r, struct mq_err *e)
{
	if (!r->sealed) {
		struct head h;
		int v = head_read(r->p, &h, e);
		if (v < 0)
			return -1;
		if (v)
			r->h = h;
		if (r->h.seg_base == r->seg) {
			r->limit = r->h.seg_len;
			return r->pos < r->limit;
		}
		struct stat st; /* rolled: this segment is sealed now */
		if (fstat(r->fd, &st) < 0)
			return err_sys(e, MQ_EX_IOERR, "cannot stat '%s'", r->path);
		r->sealed = 1;
		r->limit = (uint64_t)st.st_size;
		return 1;
	}
	for (int pass = 0; pass < 2; pass++) {
		struct head h; /* the head may have moved on while we read */
		int v = head_read(r->p, &h, e);
		if (v < 0)
			return -1;
		if (v)
			r->h = h;
		for (size_t i = 0; i < r->nsegs; i++) {
			if (r->segs[i] <= r->seg || r->segs[i] > r->h.seg_base)
				continue; /* done, or an orphan of an interrupted roll */
			int k = rd_open_seg(r, r->segs[i], e);
			if (k != 0)
				return k;
		}
		if (rd_list(r, e) < 0)
			return -1;
	}
	return 0;
}

/*
 * With a tag filter: may the batch h hold a wanted message?  Answered from
 * the index's tag hashes, without checking or decoding the batch; when the
 * index cannot answer (missing, short), the batch is decoded and each
 * message compared.
 */
static int rd_batch_may_match(struct reader *r, const struct rec_hdr *h)
{
	uint64_t from = h->base > r->want ? h->base : r->want, n = h->base + h->count - from;
	unsigned char ent[4096];
	if (r->idx_fd < 0) {
		char ipath[PATH_MAX + 32];
		part_path(r->p, ipath, sizeof ipath, r->seg, MQ_IDX_SUFFIX);
		r->idx_fd = open(ipath, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
		if (r->idx_fd < 0)
			return 1;
	}
	for (uint64_t at = from; n > 0;) {
		size_t k = n > sizeof ent / MQ_IDX_ENTRY ? sizeof ent / MQ_IDX_ENTRY : (size_t)n;
		ssize_t got = pread(r->idx_fd, ent, k * MQ_IDX_ENTRY, (off_t)((at - r->seg) * MQ_IDX_ENTRY));
		if (got != (ssize_t)(k * MQ_IDX_ENTRY))
			return 1;
		for (size_t i = 0; i < k; i++) {
			uint64_t pos = le32_get(ent + i * MQ_IDX_ENTRY);
			if (pos != r->pos) /* an index that disagrees cannot be trusted */
				return 1;
			if (tagset_has_hash(r->tags, le32_get(ent + i * MQ_IDX_ENTRY + 4)))
				return 1;
		}
		at += k;
		n -= k;
	}
	return 0;
}

/*
 * Next message at offset >= want.  Returns 1 (m valid until the next
 * call), 0 at the published end, -1 on error: a bad batch is code 65 with
 * "path:position" in the message, and nothing of it is returned.
 */
static int rd_next(struct reader *r, struct rec_msg *m, struct mq_err *e)
{
	struct mq_err sub = {0};
	for (;;) {
		if (r->in_batch) {
			int k = rec_next(&r->it, m, &sub);
			if (k < 0)
				return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": %s", r->path, r->batch_pos,
				               sub.msg);
			if (k == 1) {
				if (m->offset < r->want)
					continue;
				r->want = m->offset + 1;
				if (m->ts < r->min_ts || (r->tags && !tagset_match(r->tags, m)))
					continue;
				r->min_ts = INT64_MIN;
				return 1;
			}
			r->in_batch = 0;
		}
		if (r->pos >= r->limit) {
			int k = rd_advance(r, e);
			if (k <= 0)
				return k;
			continue;
		}
		ssize_t got = rd_fill(r, MQ_BATCH_HDR, e);
		if (got < 0)
			return -1;
		struct rec_hdr h;
		const unsigned char *b = (unsigned char *)r->rb.p + (r->pos - r->rb_at);
		sub.msg[0] = 0;
		int bad = rec_parse_hdr(b, (size_t)got, &h, &sub) < 0 || h.len > r->limit - r->pos;
		if (r->check_idx && (bad || h.base > r->want || h.base + h.count <= r->want)) {
			r->check_idx = 0; /* the index misled us: scan the segment */
			r->pos = 0;
			continue;
		}
		r->check_idx = 0;
		if (bad)
			return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": %s", r->path, r->pos,
			               sub.msg[0] ? sub.msg : "batch runs past the end of the data");
		if (h.base + h.count <= r->want) { /* skip without checking the body */
			r->pos += h.len;
			continue;
		}
		if (r->tags && !rd_batch_may_match(r, &h)) { /* nothing wanted in it */
			r->want = h.base + h.count;
			r->pos += h.len;
			continue;
		}
		if ((got = rd_fill(r, h.len, e)) < 0)
			return -1;
		b = (unsigned char *)r->rb.p + (r->pos - r->rb_at);
		if ((size_t)got < h.len)
			return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": batch cut short", r->path, r->pos);
		struct part *p = r->p;
		int known = p->ok_len && p->ok_seg == r->seg && p->ok_pos == r->pos &&
		            p->ok_len == h.len && p->ok_crc == h.crc;
		if ((!known && rec_check_crc(b, &h, &sub) < 0) ||
		    rec_iter_init(&r->it, b, &h, &r->inflate, &sub) < 0)
			return err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": %s", r->path, r->pos, sub.msg);
		p->ok_seg = r->seg, p->ok_pos = r->pos, p->ok_len = h.len, p->ok_crc = h.crc;
		if (h.base > r->want) {
			r->skip_from = r->want, r->skip_to = h.base;
			r->want = h.base;
		}
		r->batch_pos = r->pos;
		r->pos += h.len;
		r->in_batch = 1;
	}
}

/* First offset at or after time ts (approximate start; the reader's
 * min_ts finishes the job). */
static int part_offset_for_time(struct part *p, int64_t ts, uint64_t *off, struct mq_err *e)
{
	uint64_t *segs;
	size_t n;
	*off = 0;
	if (seg_list(p->dir, &segs, &n, e) < 0)
		return -1;
	int r = 0;
	for (size_t i = n; i-- > 0;) {
		char path[PATH_MAX + 32];
		unsigned char ent[MQ_TIX_ENTRY];
		part_path(p, path, sizeof path, segs[i], MQ_TIX_SUFFIX);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		int older = fd >= 0 && pread(fd, ent, sizeof ent, 0) == sizeof ent &&
		            (int64_t)le64_get(ent) < ts;
		if (fd >= 0)
			close(fd);
		if (older || i == 0) {
			r = seg_tix_seek(path, segs[i], ts, off, e);
			break;
		}
	}
	free(segs);
	return r;
}

/* ----- waiting for new messages ----- */

/* Watches every partition's head file, so a waiting reader wakes as soon
 * as a writer publishes (inotify on Linux; a short poll elsewhere). */
struct waiter {
	int fd;
};

static void wait_init(struct waiter *w, struct queue *q)
{
	w->fd = -1;
#ifdef __linux__
	w->fd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
	for (int i = 0; w->fd >= 0 && i < q->nparts; i++) {
		char path[PATH_MAX + 8];
		strfmt(path, sizeof path, "%s/head", q->parts[i].dir);
		inotify_add_watch(w->fd, path, IN_MODIFY | IN_ATTRIB | IN_DELETE_SELF);
	}
#else
	(void)q;
#endif
}

/* Sleep until something may have been published or timeout_ms passes
 * (-1: no limit).  Wakes at least every second to re-check regardless. */
static void wait_change(struct waiter *w, int64_t timeout_ms)
{
	int t = timeout_ms < 0 || timeout_ms > 1000 ? 1000 : (int)timeout_ms;
	if (w->fd < 0) {
		poll(NULL, 0, t < 20 ? t : 20);
		return;
	}
	struct pollfd pfd = {w->fd, POLLIN, 0};
	if (poll(&pfd, 1, t) > 0) {
		char ev[4096];
		while (read(w->fd, ev, sizeof ev) > 0)
			;
	}
}

static void wait_free(struct waiter *w) { dur_close(&w->fd); }

/* ===================================================================
 * 7. Consumer groups: offset files and consumption-driven retention
 *
 * A group's progress in a partition is data: groups/G/P.off, a run of
 * checksummed state records, each written after the newest (mq.h).  The
 * file is also the group's lock for that partition: one consumer of a
 * group works on a partition at a time (lease holders only while they
 * hand out or answer), so each message goes to exactly one of them.
 * Uses layers 1-6.
 * =================================================================== */

static void grp_path(const struct queue *q, const char *g, int part, char *out, size_t n)
{
	if (part < 0)
		strfmt(out, n, "%s/groups/%s", q->dir, g);
	else
		strfmt(out, n, "%s/groups/%s/%d.off", q->dir, g, part);
}

/* Open (creating if asked) group g's offset file for partition part. */
static int grp_open(struct queue *q, const char *g, int part, int create, int *fd,
                    struct mq_err *e)
{
	char dir[PATH_MAX + 200], path[PATH_MAX + 220];
	*fd = -1;
	if (q_check_name("group", g, e) < 0)
		return -1;
	grp_path(q, g, -1, dir, sizeof dir);
	grp_path(q, g, part, path, sizeof path);
	if (create && file_size(dir) < 0) {
		char groups[PATH_MAX + 16];
		strfmt(groups, sizeof groups, "%s/groups", q->dir);
		if (dur_mkdir(groups, e) < 0 || dur_mkdir(dir, e) < 0 || dur_sync_dir(groups, e) < 0)
			return -1;
	}
	int existed = file_size(path) >= 0;
	*fd = sys.open(path, (create ? O_RDWR | O_CREAT : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (*fd < 0)
		return err_sys(e, errno == ENOENT ? MQ_EX_NOINPUT : err_code_for(errno),
		               "cannot open '%s'", path);
	if (create && !existed && dur_sync_dir(dir, e) < 0)
		return -1;
	return 0;
}

/*
 * A group's state in one partition (mq.h: the offset file): everything
 * below `off` is done, everything from `next` on is new, and between the
 * two, entries name the offsets still leased out or waiting for a retry;
 * the offsets no entry names are done.  Each save writes the whole state
 * as a new record, never over the newest one, so a crash leaves either
 * the old state or the new.
 */
enum { GE_LEASED = MQ_OFF_LEASED, GE_WAITING = MQ_OFF_WAITING, GE_RUNNING = MQ_OFF_RUNNING };

struct gent {
	uint64_t lo;
	uint32_t n, lease, why;
	uint16_t attempt, kind;
	int64_t until;
};

struct gstate {
	uint64_t seq, off, next;
	uint32_t lease;       /* the last lease id handed out */
	struct gent *e;
	size_t n, cap;
	uint64_t at, len;     /* the newest record in the file (len 0: none) */
	int damaged;          /* the file had bytes but no valid record */
};

static void gs_free(struct gstate *gs)
{
	free(gs->e);
	memset(gs, 0, sizeof *gs);
}

/* Parse the record at b (n bytes available); 0 if it is valid. */
static int gs_parse(const unsigned char *b, uint64_t n, struct gstate *gs)
{
	if (n < MQ_OFF_HDR || le32_get(b) != MQ_OFF_MAGIC)
		return -1;
	uint32_t len = le32_get(b + 8), cnt = le32_get(b + 12);
	if (len < MQ_OFF_HDR || len > n || (uint64_t)cnt * MQ_OFF_ENTRY != len - MQ_OFF_HDR ||
	    le32_get(b + 4) != (uint32_t)crc32(0L, b + 8, len - 8))
		return -1;
	uint64_t off = le64_get(b + 24), next = le64_get(b + 32), prev = off;
	if (off > next)
		return -1;
	struct gent *e = cnt ? calloc(cnt, sizeof *e) : NULL;
	if (cnt && !e)
		abort();
	for (uint32_t i = 0; i < cnt; i++) {
		const unsigned char *p = b + MQ_OFF_HDR + (size_t)i * MQ_OFF_ENTRY;
		e[i] = (struct gent){le64_get(p), le32_get(p + 8), le32_get(p + 24), le32_get(p + 28),
		                     le16_get(p + 12), le16_get(p + 14), (int64_t)le64_get(p + 16)};
		if (e[i].lo < prev || e[i].n == 0 || e[i].lo + e[i].n > next ||
		    e[i].kind < GE_LEASED || e[i].kind > GE_RUNNING) {
			free(e);
			return -1;
		}
		prev = e[i].lo + e[i].n;
	}
	free(gs->e);
	gs->e = e;
	gs->n = gs->cap = cnt;
	gs->seq = le64_get(b + 16);
	gs->off = off;
	gs->next = next;
	gs->lease = le32_get(b + 48);
	gs->len = len;
	return 0;
}

/* Read the state: the valid record with the highest sequence.  None
 * (a new group, or every record damaged) reads as offset 0. */
static int gs_read(int fd, const char *path, struct gstate *gs, struct mq_err *e)
{
	struct stat st;
	memset(gs, 0, sizeof *gs);
	if (fstat(fd, &st) < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot stat '%s'", path);
	if (st.st_size == 0)
		return 0;
	if (st.st_size > MQ_OFF_FILE_MAX)
		return err_set(e, MQ_EX_DATAERR, "offset file '%s' is too large", path);
	size_t size = (size_t)st.st_size;
	unsigned char *b = malloc(size);
	if (!b)
		abort();
	ssize_t got = dur_pread(fd, b, size, 0, path, e);
	if (got < 0) {
		free(b);
		return -1;
	}
	/* Newest first: only the record in force pays for its checksum, and
	 * an older one only when every newer one is damaged. */
	struct gstate cand = {0};
	for (uint64_t below = UINT64_MAX;;) {
		uint64_t best = 0, best_at = 0;
		for (uint64_t at = 0; at + MQ_OFF_HDR <= (uint64_t)got; at += MQ_OFF_ALIGN) {
			uint64_t seq = le64_get(b + at + 16);
			if (le32_get(b + at) == MQ_OFF_MAGIC && seq > best && seq < below)
				best = seq, best_at = at;
		}
		if (best == 0)
			break;
		if (gs_parse(b + best_at, (uint64_t)got - best_at, &cand) == 0) {
			*gs = cand;
			gs->at = best_at;
			break;
		}
		below = best;
	}
	free(b);
	gs->damaged = gs->len == 0;
	return 0;
}

/*
 * Write the state as record seq + 1, after the newest record, or at the
 * start once the file passes MQ_OFF_WRAP and the record ends before the
 * newest one begins: the newest record is never overwritten, so a torn
 * write leaves it in force.  A failed sync may leave the new record
 * readable from the page cache though never on disk, so it is zeroed:
 * later readers see the previous state (redelivery), as a reader after a
 * power loss might.
 */
static int gs_write(int fd, const char *path, struct gstate *gs, int sync, struct mq_err *e)
{
	size_t len = MQ_OFF_HDR + gs->n * MQ_OFF_ENTRY;
	unsigned char *b = calloc(1, len);
	if (!b)
		abort();
	le32_put(b, MQ_OFF_MAGIC);
	le32_put(b + 8, (uint32_t)len);
	le32_put(b + 12, (uint32_t)gs->n);
	le64_put(b + 16, gs->seq + 1);
	le64_put(b + 24, gs->off);
	le64_put(b + 32, gs->next);
	le64_put(b + 40, (uint64_t)now_ms());
	le32_put(b + 48, gs->lease);
	for (size_t i = 0; i < gs->n; i++) {
		unsigned char *p = b + MQ_OFF_HDR + i * MQ_OFF_ENTRY;
		const struct gent *g = &gs->e[i];
		le64_put(p, g->lo);
		le32_put(p + 8, g->n);
		le16_put(p + 12, g->attempt);
		le16_put(p + 14, g->kind);
		le64_put(p + 16, (uint64_t)g->until);
		le32_put(p + 24, g->lease);
		le32_put(p + 28, g->why);
	}
	le32_put(b + 4, (uint32_t)crc32(0L, b + 8, (uInt)(len - 8)));
	uint64_t at = 0;
	if (gs->len) {
		at = (gs->at + gs->len + MQ_OFF_ALIGN - 1) / MQ_OFF_ALIGN * MQ_OFF_ALIGN;
		if (at + len > MQ_OFF_WRAP && len <= gs->at)
			at = 0;
	}
	int r = dur_pwrite_all(fd, b, len, (off_t)at, path, e);
	if (r == 0 && sync && dur_datasync(fd, path, e) < 0) {
		struct mq_err ignored;
		memset(b, 0, len);
		dur_pwrite_all(fd, b, len, (off_t)at, path, &ignored);
		r = -1;
	}
	free(b);
	if (r == 0) {
		gs->seq++;
		gs->at = at;
		gs->len = len;
	}
	return r;
}

/* Make room for one more entry at index i. */
static void gs_insert(struct gstate *gs, size_t i, const struct gent *g)
{
	if (gs->n == gs->cap) {
		gs->cap = gs->cap ? gs->cap * 2 : 8;
		gs->e = realloc(gs->e, gs->cap * sizeof *gs->e);
		if (!gs->e)
			abort();
	}
	memmove(gs->e + i + 1, gs->e + i, (gs->n - i) * sizeof *gs->e);
	gs->e[i] = *g;
	gs->n++;
}

/* Remove offsets [lo, lo + n) from every entry, splitting as needed. */
static void gs_clear(struct gstate *gs, uint64_t lo, uint64_t n)
{
	uint64_t hi = lo + n;
	for (size_t i = 0; i < gs->n; i++) {
		struct gent *g = &gs->e[i];
		uint64_t glo = g->lo, ghi = g->lo + g->n;
		if (ghi <= lo || glo >= hi)
			continue;
		if (glo < lo && ghi > hi) { /* a hole in the middle: split */
			struct gent tail = *g;
			tail.lo = hi;
			tail.n = (uint32_t)(ghi - hi);
			g->n = (uint32_t)(lo - glo);
			gs_insert(gs, i + 1, &tail);
			return;
		}
		if (glo < lo) {
			g->n = (uint32_t)(lo - glo);
		} else if (ghi > hi) {
			g->lo = hi;
			g->n = (uint32_t)(ghi - hi);
		} else {
			memmove(g, g + 1, (gs->n - i - 1) * sizeof *g);
			gs->n--;
			i--;
		}
	}
}

/* Recompute the committed offset: the low watermark of what is done. */
static void gs_norm(struct gstate *gs)
{
	gs->off = gs->n && gs->e[0].lo < gs->next ? gs->e[0].lo : gs->next;
}

/* Offsets [lo, lo + n) are done (acknowledged, or gone). */
static void gs_done(struct gstate *gs, uint64_t lo, uint64_t n)
{
	gs_clear(gs, lo, n);
	if (gs->next < lo + n)
		gs->next = lo + n;
	gs_norm(gs);
}

/* Give offsets [g->lo, g->lo + g->n) the state *g, merging with an equal
 * neighbour so a run of messages stays one entry. */
static void gs_set(struct gstate *gs, const struct gent *g)
{
	gs_clear(gs, g->lo, g->n);
	if (gs->next < g->lo + g->n)
		gs->next = g->lo + g->n;
	size_t i = 0;
	while (i < gs->n && gs->e[i].lo < g->lo)
		i++;
	struct gent *pv = i ? &gs->e[i - 1] : NULL;
	if (pv && pv->lo + pv->n == g->lo && pv->kind == g->kind && pv->attempt == g->attempt &&
	    pv->until == g->until && pv->lease == g->lease && pv->why == g->why &&
	    (uint64_t)pv->n + g->n <= UINT32_MAX)
		pv->n += g->n;
	else
		gs_insert(gs, i, g);
	gs_norm(gs);
}

/* The entry holding offset off, or NULL. */
static struct gent *gs_find(struct gstate *gs, uint64_t off)
{
	for (size_t i = 0; i < gs->n; i++)
		if (off >= gs->e[i].lo && off < gs->e[i].lo + gs->e[i].n)
			return &gs->e[i];
	return NULL;
}

/* Messages leased out (with an unexpired lease) and waiting for a retry. */
static void gs_count(const struct gstate *gs, int64_t now, uint64_t *leased, uint64_t *waiting)
{
	*leased = *waiting = 0;
	for (size_t i = 0; i < gs->n; i++) {
		if ((gs->e[i].kind == GE_LEASED && gs->e[i].until > now) || gs->e[i].kind == GE_RUNNING)
			*leased += gs->e[i].n;
		else
			*waiting += gs->e[i].n;
	}
}

/* Group names of a queue, sorted. */
static int grp_list(struct queue *q, char ***names, size_t *n, struct mq_err *e)
{
	char dir[PATH_MAX + 16];
	strfmt(dir, sizeof dir, "%s/groups", q->dir);
	return dir_names(dir, name_valid, names, n, e);
}

/* State of group g in partition part (empty if it never read). */
static int grp_state(struct queue *q, const char *g, int part, struct gstate *gs,
                     struct mq_err *e)
{
	int fd;
	memset(gs, 0, sizeof *gs);
	if (grp_open(q, g, part, 0, &fd, e) < 0)
		return e->code == MQ_EX_NOINPUT ? 0 : -1;
	char path[PATH_MAX + 220];
	grp_path(q, g, part, path, sizeof path);
	int r = gs_read(fd, path, gs, e);
	close(fd);
	return r;
}

/* Committed offset of group g in partition part (0 if it never read). */
static int grp_offset(struct queue *q, const char *g, int part, uint64_t *off,
                      struct mq_err *e)
{
	struct gstate gs;
	int r = grp_state(q, g, part, &gs, e);
	*off = gs.off;
	gs_free(&gs);
	return r;
}

/* Lowest committed offset over all groups (0 when there are none: with
 * no consumer yet, nothing counts as consumed). */
static int grp_min(struct queue *q, int part, uint64_t *min, struct mq_err *e)
{
	char **names;
	size_t n;
	*min = 0;
	if (grp_list(q, &names, &n, e) < 0)
		return -1;
	int r = 0;
	for (size_t i = 0; i < n && r == 0; i++) {
		uint64_t off;
		r = grp_offset(q, names[i], part, &off, e);
		if (r == 0 && (i == 0 || off < *min))
			*min = off;
	}
	names_free(names, n);
	return r;
}

/* Run retention on a partition if no writer is busy with it (a busy
 * writer runs it itself when it rolls). */
static int grp_retain(struct queue *q, int part, struct mq_err *e)
{
	uint64_t min;
	struct part *p = &q->parts[part];
	if (grp_min(q, part, &min, e) < 0)
		return -1;
	if (part_lock(p, 1, e) < 0)
		return e->code == MQ_EX_TEMPFAIL ? 0 : -1;
	int r = part_retain(p, min, MQ_DRAINED_ROLL, e);
	part_unlock(p);
	return r < 0 ? -1 : 0;
}

/* Timestamp of the first message at or after off in a partition
 * (INT64_MAX if there is none). */
static int part_ts_at(struct part *p, uint64_t off, int64_t *ts, struct mq_err *e)
{
	struct reader r;
	struct rec_msg m;
	*ts = INT64_MAX;
	if (rd_open(&r, p, off, e) < 0)
		return -1;
	int k = rd_next(&r, &m, e);
	if (k == 1)
		*ts = m.ts;
	rd_close(&r);
	return k < 0 ? -1 : 0;
}

struct gstat {
	char *name;
	uint64_t *off;     /* committed offset per partition */
	uint64_t lag;      /* messages not yet consumed, all partitions */
	uint64_t leased;   /* of those, leased out now */
	uint64_t waiting;  /* of those, waiting for a retry (or an expired lease) */
	int64_t oldest_ts; /* timestamp of the oldest unconsumed, or INT64_MAX */
};

struct qstat {
	int nparts;
	uint64_t *next, *earliest; /* per partition */
	uint64_t messages, bytes, segments;
	int64_t oldest_ts;         /* oldest stored message, or INT64_MAX */
	size_t ngroups;
	struct gstat *g;
};

static void q_stat_free(struct qstat *st)
{
	for (size_t i = 0; i < st->ngroups; i++) {
		free(st->g[i].name);
		free(st->g[i].off);
	}
	free(st->g);
	free(st->next);
	free(st->earliest);
	memset(st, 0, sizeof *st);
}

/* Counts, sizes and per-group lag of a queue, read without locks. */
static int q_stat(struct queue *q, struct qstat *st, struct mq_err *e)
{
	memset(st, 0, sizeof *st);
	st->nparts = q->nparts;
	st->next = calloc((size_t)q->nparts, sizeof *st->next);
	st->earliest = calloc((size_t)q->nparts, sizeof *st->earliest);
	st->oldest_ts = INT64_MAX;
	for (int i = 0; i < q->nparts; i++) {
		struct part *p = &q->parts[i];
		struct head h;
		uint64_t *segs;
		size_t n;
		int v = head_read(p, &h, e);
		if (v < 0 || seg_list(p->dir, &segs, &n, e) < 0)
			return -1;
		st->next[i] = v ? h.next : 0;
		st->earliest[i] = n ? segs[0] : 0;
		if (st->earliest[i] > st->next[i])
			st->earliest[i] = st->next[i];
		st->messages += st->next[i] - st->earliest[i];
		st->segments += n;
		for (size_t k = 0; k < n; k++)
			st->bytes += (uint64_t)seg_bytes(p, segs[k]);
		free(segs);
		int64_t ts;
		if (st->next[i] > st->earliest[i] && part_ts_at(p, st->earliest[i], &ts, e) == 0 &&
		    ts < st->oldest_ts)
			st->oldest_ts = ts;
	}
	char **names;
	if (grp_list(q, &names, &st->ngroups, e) < 0)
		return -1;
	st->g = calloc(st->ngroups + 1, sizeof *st->g);
	for (size_t g = 0; g < st->ngroups; g++) {
		struct gstat *gs = &st->g[g];
		gs->name = names[g];
		gs->off = calloc((size_t)q->nparts, sizeof *gs->off);
		gs->oldest_ts = INT64_MAX;
		for (int i = 0; i < q->nparts; i++) {
			struct gstate s;
			uint64_t leased, waiting;
			if (grp_state(q, names[g], i, &s, e) < 0)
				return -1;
			uint64_t off = s.off, fresh = s.next;
			gs_count(&s, now_ms(), &leased, &waiting);
			gs_free(&s);
			if (off < st->earliest[i])
				off = st->earliest[i];
			if (off > st->next[i])
				off = st->next[i];
			if (fresh < off)
				fresh = off;
			if (fresh > st->next[i])
				fresh = st->next[i];
			gs->off[i] = off;
			gs->leased += leased;
			gs->waiting += waiting;
			gs->lag += st->next[i] - fresh + leased + waiting;
			int64_t ts;
			if (off < st->next[i] && part_ts_at(&q->parts[i], off, &ts, e) == 0 &&
			    ts < gs->oldest_ts)
				gs->oldest_ts = ts;
		}
	}
	free(names);
	return 0;
}

/* Point group g at offset off in partition part (creating the group),
 * holding the group's lock so no consumer is mid-read.  The offset is
 * clamped to what exists; returns it in *now. */
static int grp_seek(struct queue *q, const char *g, int part, uint64_t off, uint64_t *now,
                    struct mq_err *e)
{
	int fd;
	struct gstate gs = {0};
	struct head h;
	uint64_t *segs;
	size_t n;
	char path[PATH_MAX + 220];
	struct part *p = &q->parts[part];
	grp_path(q, g, part, path, sizeof path);
	if (grp_open(q, g, part, 1, &fd, e) < 0)
		return -1;
	int r = dur_lock(fd, LOCK_EX, path, e);
	if (r == 0)
		r = gs_read(fd, path, &gs, e);
	if (r == 0 && head_read(p, &h, e) < 0)
		r = -1;
	if (r == 0 && seg_list(p->dir, &segs, &n, e) == 0) {
		uint64_t lo = n ? segs[0] : 0;
		free(segs);
		*now = off < lo ? lo : off > h.next ? h.next : off;
		gs.n = 0; /* leases and retries are forgotten with the position */
		gs.off = gs.next = *now;
		r = gs_write(fd, path, &gs, q->conf.fsync >= MQ_FSYNC_BATCH, e);
	} else {
		r = -1;
	}
	gs_free(&gs);
	close(fd);
	return r;
}

/* Remove every message of queue name, keeping it, its settings and its
 * groups (whose offsets then point past the end). */
static int q_purge(struct spool *sp, const char *name, struct mq_err *e)
{
	struct queue *q;
	if (q_open(sp, name, 0, NULL, 0, &q, e) < 0)
		return -1;
	int r = 0;
	for (int k = 0; k < q->nparts && r >= 0; k++) {
		struct part *p = &q->parts[k];
		r = part_lock(p, 0, e);
		if (r == 0)
			r = part_retain(p, UINT64_MAX, 1, e); /* a count of what went */
		part_unlock(p);
	}
	q_close(q);
	return r < 0 ? -1 : 0;
}

/* Offset of the first message at or after time ts in a partition, or the
 * partition's end if there is none. */
static int part_offset_at_time(struct part *p, int64_t ts, uint64_t *off, struct mq_err *e)
{
	uint64_t start;
	struct reader r;
	struct rec_msg m;
	if (part_offset_for_time(p, ts, &start, e) < 0 || rd_open(&r, p, start, e) < 0)
		return -1;
	r.min_ts = ts;
	int k = rd_next(&r, &m, e);
	*off = k == 1 ? m.offset : r.h.next;
	rd_close(&r);
	return k < 0 ? -1 : 0;
}

/*
 * Forget group g: wait until no consumer of it holds a partition, rename
 * its directory to a hidden name (from then on the group is gone), sync,
 * delete, and let retention reclaim what only it was holding.
 */
static int grp_remove(struct queue *q, const char *g, struct mq_err *e)
{
	char dir[PATH_MAX + 200], tmp[PATH_MAX + 240], groups[PATH_MAX + 16];
	if (q_check_name("group", g, e) < 0)
		return -1;
	grp_path(q, g, -1, dir, sizeof dir);
	struct stat st;
	if (lstat(dir, &st) < 0 || !S_ISDIR(st.st_mode))
		return err_set(e, MQ_EX_NOINPUT, "no such group '%s'", g);
	int *fds = calloc((size_t)q->nparts, sizeof *fds);
	if (!fds)
		abort();
	int r = 0;
	for (int i = 0; i < q->nparts; i++) {
		char path[PATH_MAX + 220];
		grp_path(q, g, i, path, sizeof path);
		fds[i] = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
		if (fds[i] >= 0 && r == 0)
			r = dur_lock(fds[i], LOCK_EX, path, e);
	}
	strfmt(groups, sizeof groups, "%s/groups", q->dir);
	strfmt(tmp, sizeof tmp, "%s/.rm-%s.%ld", groups, g, (long)getpid());
	if (r == 0 && sys.rename(dir, tmp) < 0)
		r = err_sys(e, MQ_EX_IOERR, "cannot remove group '%s'", g);
	if (r == 0)
		r = dur_sync_dir(groups, e);
	if (r == 0)
		r = dur_rmtree(tmp, e);
	for (int i = 0; i < q->nparts; i++)
		dur_close(&fds[i]);
	free(fds);
	struct mq_err ignored; /* retention is housekeeping */
	for (int i = 0; r == 0 && i < q->nparts; i++)
		grp_retain(q, i, &ignored);
	return r;
}

/* What a seek target names: earliest, latest, an offset or a time. */
enum { TO_EARLIEST, TO_LATEST, TO_OFFSET, TO_TIME };

static int seek_kind(const char *to, uint64_t *off, int64_t *ts)
{
	if (!strcmp(to, "earliest"))
		return TO_EARLIEST;
	if (!strcmp(to, "latest"))
		return TO_LATEST;
	if (parse_u64(to, off) == 0)
		return TO_OFFSET;
	if (parse_time_ms(to, ts) == 0)
		return TO_TIME;
	return -1;
}

static int seek_check(const char *to, struct mq_err *e)
{
	uint64_t off;
	int64_t ts;
	if (seek_kind(to, &off, &ts) < 0)
		return err_set(e, MQ_EX_USAGE, "bad --to '%s' (earliest, latest, an offset, or a time)",
		               to);
	return 0;
}

/*
 * Move group g to `to` (earliest, latest, an offset or a time) in
 * partition part, or in each partition when part < 0.  now[k] gets the
 * k-th moved partition's new offset (clamped to what is stored).
 * Returns how many partitions moved; fewer than asked means e says why.
 */
static int grp_seek_to(struct queue *q, const char *g, int part, const char *to, uint64_t *now,
                       struct mq_err *e)
{
	uint64_t off = 0;
	int64_t ts = 0;
	int kind = seek_kind(to, &off, &ts), n = 0;
	if (kind < 0)
		return seek_check(to, e);
	for (int i = 0; i < q->nparts; i++) {
		uint64_t target = kind == TO_OFFSET ? off : kind == TO_LATEST ? UINT64_MAX : 0;
		if (part >= 0 && i != part)
			continue;
		if (kind == TO_TIME && part_offset_at_time(&q->parts[i], ts, &target, e) < 0)
			break;
		if (grp_seek(q, g, i, target, &now[n], e) < 0)
			break;
		n++;
	}
	return n;
}

/* ===================================================================
 * 8. Messages waiting outside their partition: delays, transactions
 *
 * Delayed messages and the half messages of open transactions are stored
 * durably beside the partitions and moved in later, exactly once.
 *
 * A delayed message waits in QUEUE/delay/ until it is due, then moves
 * into its partition (mq.h: the delay files).  Buckets are files named by
 * due second and partition; a hint file holds the earliest due time, so
 * a consumer learns with one read that nothing is due, however many
 * messages wait.  Whoever finds something due moves it under the wheel's
 * lock, a chunk at a time: an intent record names the chunk and where it
 * will land before it is appended, and the chunk's batches carry the
 * intent's id, so after a crash the move resumes exactly where the
 * partition says it stopped: no duplicate, no loss.  Uses layers 1-7.
 * =================================================================== */

static void dly_path(const struct queue *q, const char *name, char *out, size_t n)
{
	strfmt(out, n, "%s/%s%s%s", q->dir, MQ_DELAY_DIR, *name ? "/" : "", name);
}

/* The earliest due time (ms since the epoch) that may be waiting:
 * INT64_MAX when nothing is, 0 when the hint is unreadable. */
static int64_t dly_hint(const struct queue *q)
{
	char path[PATH_MAX + 32];
	unsigned char b[MQ_DELAY_HINT];
	dly_path(q, MQ_DELAY_NEXT, path, sizeof path);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? INT64_MAX : 0;
	ssize_t n = pread(fd, b, sizeof b, 0);
	close(fd);
	if (n != (ssize_t)sizeof b || le32_get(b) != MQ_DELAY_MAGIC ||
	    le32_get(b + 4) != (uint32_t)crc32(0L, b + 8, 8))
		return 0;
	return (int64_t)le64_get(b + 8);
}

static int dly_hint_write(const struct queue *q, int64_t due, struct mq_err *e)
{
	char path[PATH_MAX + 32];
	unsigned char b[MQ_DELAY_HINT];
	dly_path(q, MQ_DELAY_NEXT, path, sizeof path);
	le32_put(b, MQ_DELAY_MAGIC);
	le64_put(b + 8, (uint64_t)due);
	le32_put(b + 4, (uint32_t)crc32(0L, b + 8, 8));
	int fd = sys.open(path, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0)
		return err_sys(e, err_code_for(errno), "cannot open '%s'", path);
	int r = dur_pwrite_all(fd, b, sizeof b, 0, path, e);
	if (r == 0)
		r = dur_datasync(fd, path, e);
	close(fd);
	return r;
}

/* Lock the wheel (creating it when asked).  Returns the lock's fd, -2 if
 * nonblock and another process holds it or there is no wheel, -1. */
static int dly_lock(const struct queue *q, int create, int nonblock, struct mq_err *e)
{
	char dir[PATH_MAX + 32], path[PATH_MAX + 32];
	dly_path(q, "", dir, sizeof dir);
	dly_path(q, "lock", path, sizeof path);
	if (create && file_size(dir) < 0 && (dur_mkdir(dir, e) < 0 || dur_sync_dir(q->dir, e) < 0))
		return -1;
	int fd = sys.open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW | (create ? O_CREAT : 0), 0644);
	if (fd < 0 && errno == ENOENT && !create)
		return -2;
	if (fd < 0)
		return err_sys(e, err_code_for(errno), "cannot open '%s'", path);
	if (dur_lock(fd, LOCK_EX | (nonblock ? LOCK_NB : 0), path, e) < 0) {
		close(fd);
		return nonblock && e->code == MQ_EX_TEMPFAIL ? -2 : -1;
	}
	return fd;
}

/*
 * Store the closed batches of enc for partition part, due at due_ms:
 * append them to the bucket of their due second, synced when sync, after
 * lowering the hint if this is now the earliest.  A crash mid-append
 * leaves a torn batch in the bucket, which the mover skips.
 */
static int dly_append(struct queue *q, int part, int64_t due_ms, struct rec_enc *enc, int sync,
                      struct mq_err *e)
{
	int64_t sec = due_ms / 1000 + (due_ms % 1000 != 0);
	char dir[PATH_MAX + 64], path[PATH_MAX + 96], name[64];
	int nowait = dur_lock_nowait; /* a put waits, even in mq serve: movers hold the */
	dur_lock_nowait = 0;          /* wheel's lock only while they move due batches */
	int lk = dly_lock(q, 1, 0, e), fd = -1, r = -1;
	dur_lock_nowait = nowait;
	if (lk < 0)
		return -1;
	strfmt(name, sizeof name, "%0*" PRId64, MQ_DELAY_DIGITS, sec / 1000);
	dly_path(q, name, dir, sizeof dir);
	strfmt(path, sizeof path, "%s/%0*" PRId64 ".%d", dir, MQ_DELAY_DIGITS, sec, part);
	int fresh_dir = file_size(dir) < 0;
	if (fresh_dir && dur_mkdir(dir, e) < 0)
		goto out;
	if (fresh_dir) {
		char top[PATH_MAX + 32];
		dly_path(q, "", top, sizeof top);
		if (dur_sync_dir(top, e) < 0)
			goto out;
	}
	if (sec * 1000 < dly_hint(q) && dly_hint_write(q, sec * 1000, e) < 0)
		goto out;
	int existed = file_size(path) >= 0;
	fd = sys.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0) {
		err_sys(e, err_code_for(errno), "cannot open '%s'", path);
		goto out;
	}
	for (size_t at = 0; at < enc->out.len;) {
		unsigned char *b = (unsigned char *)enc->out.p + at;
		rec_finish(b, 0);
		at += le32_get(b + 8);
	}
	struct stat st;
	if (fstat(fd, &st) < 0) {
		err_sys(e, MQ_EX_IOERR, "cannot stat '%s'", path);
		goto out;
	}
	if (dur_pwrite_all(fd, enc->out.p, enc->out.len, st.st_size, path, e) < 0) {
		sys.ftruncate(fd, st.st_size);
		goto out;
	}
	if ((sync && dur_datasync(fd, path, e) < 0) || (!existed && dur_sync_dir(dir, e) < 0))
		goto out;
	r = 0;
out:
	dur_close(&fd);
	close(lk);
	return r;
}

/* The move intent: two slots written alternately (like offset files). */
struct dly_intent {
	uint64_t seq;          /* 0: none */
	int64_t sec;           /* the bucket */
	uint32_t part, count;  /* target partition; messages in the chunk */
	uint64_t from, to;     /* the chunk: bucket bytes [from, to) */
	uint64_t at;           /* the partition offset its first message gets */
};

static void dly_intent_read(int fd, struct dly_intent *in)
{
	unsigned char b[2 * MQ_DELAY_INTENT];
	ssize_t n = pread(fd, b, sizeof b, 0);
	memset(in, 0, sizeof *in);
	for (int s = 0; s < 2; s++) {
		const unsigned char *p = b + s * MQ_DELAY_INTENT;
		if (n < (s + 1) * MQ_DELAY_INTENT || le32_get(p) != MQ_DELAY_MAGIC ||
		    le32_get(p + 4) != (uint32_t)crc32(0L, p + 8, MQ_DELAY_INTENT - 8) ||
		    le64_get(p + 8) <= in->seq)
			continue;
		*in = (struct dly_intent){le64_get(p + 8), (int64_t)le64_get(p + 16), le32_get(p + 24),
		                          le32_get(p + 28), le64_get(p + 32), le64_get(p + 40),
		                          le64_get(p + 48)};
	}
}

static int dly_intent_write(int fd, const char *path, const struct dly_intent *in,
                            struct mq_err *e)
{
	unsigned char p[MQ_DELAY_INTENT] = {0};
	le32_put(p, MQ_DELAY_MAGIC);
	le64_put(p + 8, in->seq);
	le64_put(p + 16, (uint64_t)in->sec);
	le32_put(p + 24, in->part);
	le32_put(p + 28, in->count);
	le64_put(p + 32, in->from);
	le64_put(p + 40, in->to);
	le64_put(p + 48, in->at);
	le32_put(p + 4, (uint32_t)crc32(0L, p + 8, MQ_DELAY_INTENT - 8));
	if (dur_pwrite_all(fd, p, sizeof p, (off_t)(in->seq % 2) * MQ_DELAY_INTENT, path, e) < 0)
		return -1;
	return dur_datasync(fd, path, e);
}

/* Did the chunk an intent names reach its partition?  Its last message
 * must exist, in a batch stamped with the intent's id. */
static int dly_landed(struct queue *q, const struct dly_intent *in, struct mq_err *e)
{
	struct part *p = &q->parts[in->part];
	uint64_t last = in->at + in->count - 1;
	if (in->count == 0 || p->next <= last)
		return 0;
	struct reader r;
	struct rec_msg m;
	struct rec_hdr h;
	struct buf b = {0};
	if (rd_open(&r, p, last, e) < 0)
		return -1;
	int k = rd_next(&r, &m, e), landed = 0;
	if (k == 1 && m.offset == last &&
	    seg_read_batch(r.fd, r.path, r.batch_pos, r.limit, &b, &h, e) == 1)
		landed = h.pid == MQ_PRODUCER_DELAY && h.pseq == (uint32_t)in->seq;
	rd_close(&r);
	buf_free(&b);
	return k < 0 ? -1 : landed;
}

static int dly_digits(const char *name)
{
	size_t k = strspn(name, "0123456789");
	return k == MQ_DELAY_DIGITS && name[k] == 0;
}

static int dly_bucket_name(const char *name)
{
	size_t k = strspn(name, "0123456789");
	return k == MQ_DELAY_DIGITS && name[k] == '.' && name[k + 1] &&
	       strspn(name + k + 1, "0123456789") == strlen(name + k + 1);
}

/* The earliest bucket: its due second and partition; returns 1, or 0 if
 * there is none.  Emptied directories of the wheel go on the way. */
static int dly_first(struct queue *q, int64_t *sec, int *part, struct mq_err *e)
{
	char top[PATH_MAX + 32];
	dly_path(q, "", top, sizeof top);
	for (;;) {
		char **dirs, **files, sub[PATH_MAX + 64];
		size_t nd, nf;
		if (dir_names(top, dly_digits, &dirs, &nd, e) < 0)
			return -1;
		if (nd)
			strfmt(sub, sizeof sub, "%s/%s", top, dirs[0]);
		names_free(dirs, nd);
		if (nd == 0)
			return 0;
		if (dir_names(sub, dly_bucket_name, &files, &nf, e) < 0)
			return -1;
		if (nf) {
			*sec = strtoll(files[0], NULL, 10);
			*part = atoi(files[0] + MQ_DELAY_DIGITS + 1);
		}
		names_free(files, nf);
		if (nf)
			return 1;
		if (sys.rmdir(sub) < 0) /* not empty: something foreign; leave it be */
			return errno == ENOENT ? 0 : err_sys(e, MQ_EX_IOERR, "cannot remove '%s'", sub);
	}
}

/*
 * Move the bucket (sec, part) into its partition from bucket byte start,
 * a chunk at a time, then remove it.  A damaged batch (a torn append) is
 * skipped up to the next valid one.
 */
static int dly_move_bucket(struct queue *q, int ifd, const char *ipath, struct dly_intent *last,
                           int64_t sec, int part, uint64_t start, uint64_t *moved,
                           struct mq_err *e)
{
	char dir[PATH_MAX + 64], path[PATH_MAX + 96], name[64];
	strfmt(name, sizeof name, "%0*" PRId64, MQ_DELAY_DIGITS, sec / 1000);
	dly_path(q, name, dir, sizeof dir);
	strfmt(path, sizeof path, "%s/%0*" PRId64 ".%d", dir, MQ_DELAY_DIGITS, sec, part);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot open '%s'", path);
	struct stat st;
	struct buf b = {0}, scratch = {0};
	struct rec_enc enc;
	struct part *p = &q->parts[part];
	rec_enc_init(&enc, (int)q->conf.compression, MQ_BATCH_TARGET);
	int r = fstat(fd, &st) < 0 ? err_sys(e, MQ_EX_IOERR, "cannot stat '%s'", path) : 0;
	uint64_t size = r == 0 ? (uint64_t)st.st_size : 0, pos = start;
	while (r == 0 && pos < size) {
		struct dly_intent in = {last->seq + 1, sec, (uint32_t)part, 0, pos, pos, 0};
		rec_enc_reset(&enc);
		while (pos < size && enc.out.len < MQ_BATCH_TARGET) {
			struct rec_hdr h;
			struct rec_iter it;
			struct rec_msg m;
			struct mq_err bad;
			if (seg_read_batch(fd, path, pos, size, &b, &h, &bad) != 1 ||
			    rec_iter_init(&it, (unsigned char *)b.p, &h, &scratch, &bad) < 0) {
				pos++; /* torn: look for the next batch */
				continue;
			}
			int k;
			while ((k = rec_next(&it, &m, &bad)) == 1) {
				m.ts = now_ms();
				rec_enc_add(&enc, &m);
			}
			pos += h.len;
		}
		in.to = pos;
		if (enc.nmsgs == 0)
			break;
		rec_enc_close(&enc);
		for (size_t at = 0; at < enc.out.len;) {
			unsigned char *h = (unsigned char *)enc.out.p + at;
			le64_put(h + 48, MQ_PRODUCER_DELAY);
			le32_put(h + 56, (uint32_t)in.seq);
			at += le32_get(h + 8);
		}
		in.count = (uint32_t)enc.nmsgs;
		uint64_t first;
		if (part_lock(p, 0, e) < 0) {
			r = -1;
			break;
		}
		in.at = p->next;
		r = dly_intent_write(ifd, ipath, &in, e);
		if (r == 0)
			r = part_append(p, &enc, &first, e);
		if (r == 0 && q->conf.fsync >= MQ_FSYNC_BATCH)
			r = part_sync(p, e);
		if (r == 0 && part_publish(p, 0, e) < 0) {
			part_fail(p);
			r = -1;
		}
		part_unlock(p);
		if (r == 0) {
			*last = in;
			*moved += enc.nmsgs;
		}
	}
	close(fd);
	buf_free(&b);
	buf_free(&scratch);
	rec_enc_free(&enc);
	if (r == 0 && sys.unlink(path) < 0)
		r = err_sys(e, MQ_EX_IOERR, "cannot remove '%s'", path);
	if (r == 0)
		r = dur_sync_dir(dir, e);
	return r;
}

/*
 * Move every due delayed message into its partition, if no other process
 * is doing it.  Cheap when nothing is due: one read of the hint.
 * Returns messages moved, or -1.
 */
static int64_t dly_tick(struct queue *q, struct mq_err *e)
{
	int64_t now = now_ms();
	if (dly_hint(q) > now)
		return 0;
	int lk = dly_lock(q, 0, 1, e);
	if (lk == -2)
		return 0;
	if (lk < 0)
		return -1;
	char ipath[PATH_MAX + 32];
	dly_path(q, MQ_DELAY_MOVING, ipath, sizeof ipath);
	int ifd = sys.open(ipath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
	uint64_t moved = 0;
	int r = ifd < 0 ? err_sys(e, err_code_for(errno), "cannot open '%s'", ipath) : 0;
	struct dly_intent in;
	int64_t sec = 0;
	int part = 0, k = 0;
	if (r == 0) {
		dly_intent_read(ifd, &in);
		/* a move cut short by a crash: resume the bucket where it stopped */
		char path[PATH_MAX + 96];
		strfmt(path, sizeof path, "%s/%s/%0*" PRId64 "/%0*" PRId64 ".%u", q->dir, MQ_DELAY_DIR,
		       MQ_DELAY_DIGITS, in.sec / 1000, MQ_DELAY_DIGITS, in.sec, in.part);
		if (in.seq && in.part < (uint32_t)q->nparts && file_size(path) >= 0) {
			struct part *p = &q->parts[in.part];
			int landed = part_lock(p, 0, e) < 0 ? -1 : dly_landed(q, &in, e);
			part_unlock(p);
			if (landed < 0)
				r = -1;
			else
				r = dly_move_bucket(q, ifd, ipath, &in, in.sec, (int)in.part,
				                    landed ? in.to : in.from, &moved, e);
		}
	}
	while (r == 0 && (k = dly_first(q, &sec, &part, e)) == 1 && sec * 1000 <= now &&
	       part < q->nparts)
		r = dly_move_bucket(q, ifd, ipath, &in, sec, part, 0, &moved, e);
	if (r == 0 && k == 1 && (part < 0 || part >= q->nparts))
		r = err_set(e, MQ_EX_DATAERR, "%s: delayed messages for partition %d, which the queue "
		            "does not have", q->name, part);
	if (r == 0 && k >= 0)
		r = dly_hint_write(q, k == 1 ? sec * 1000 : INT64_MAX, e);
	if (k < 0)
		r = -1;
	dur_close(&ifd);
	close(lk);
	return r < 0 ? -1 : (int64_t)moved;
}

/* ----- Transactions: half messages (mq.h: the transaction files) -----
 *
 * A transaction's messages wait in one file under QUEUE/txn/ until it is
 * committed, then move into their partitions the way due delayed messages
 * do: the decision (with each partition's next offset) is synced first,
 * and the moved batches carry the transaction's tag, so a move cut short
 * by a crash resumes exactly where each partition says it stopped.
 */

struct txn {
	struct queue *q;
	char name[2 * MQ_NAME_MAX + 32]; /* file name under QUEUE/txn/ */
	char path[PATH_MAX + 2 * MQ_NAME_MAX + 64];
	int fd;                /* the file, flocked; -1 */
	int fresh;             /* created by us: its directory entry needs a sync */
	uint32_t slot;         /* MQ_TXN_SLOT(nparts) */
	int valid;             /* a slot was read or written */
	uint64_t seq;
	uint32_t state, checks, tag, flags, src_part;
	int64_t created, decided;
	uint64_t data_start, data_end, src_lo, src_hi;
	uint64_t *at;          /* per partition; UINT64_MAX: nothing goes there */
};

#define MQ_TXN_PIPE 1u     /* flags: a step of mq pipe */

static void txn_dir(const struct queue *q, const char *name, char *out, size_t n)
{
	strfmt(out, n, "%s/%s%s%s", q->dir, MQ_TXN_DIR, *name ? "/" : "", name);
}

static void txn_init(struct txn *t, struct queue *q)
{
	memset(t, 0, sizeof *t);
	t->q = q;
	t->fd = -1;
	t->slot = MQ_TXN_SLOT((uint32_t)q->nparts);
	t->at = malloc((size_t)q->nparts * sizeof *t->at);
	if (!t->at)
		abort();
	for (int i = 0; i < q->nparts; i++)
		t->at[i] = UINT64_MAX;
}

static void txn_free(struct txn *t)
{
	dur_close(&t->fd);
	free(t->at);
	t->at = NULL;
}

/* Is name the file of an ordinary transaction (16 hex digits)? */
static int txn_hexname(const char *name)
{
	return strlen(name) == 16 && strspn(name, "0123456789abcdef") == 16;
}

static int txn_filename(const char *name)
{
	return txn_hexname(name) || !strncmp(name, "pipe:", 5);
}

static void txn_slot_read(struct txn *t)
{
	unsigned char *b = malloc(2 * (size_t)t->slot);
	if (!b)
		abort();
	ssize_t n = pread(t->fd, b, 2 * (size_t)t->slot, 0);
	t->valid = 0;
	for (int s = 0; s < 2; s++) {
		const unsigned char *p = b + (size_t)s * t->slot;
		if (n < (ssize_t)((s + 1) * t->slot) || le32_get(p) != MQ_TXN_MAGIC ||
		    le32_get(p + 4) != (uint32_t)crc32(0L, p + 8, t->slot - 8) ||
		    (t->valid && le64_get(p + 8) <= t->seq) || le32_get(p + 44) != (uint32_t)t->q->nparts)
			continue;
		t->valid = 1;
		t->seq = le64_get(p + 8);
		t->state = le32_get(p + 16);
		t->checks = le32_get(p + 20);
		t->created = (int64_t)le64_get(p + 24);
		t->data_end = le64_get(p + 32);
		t->tag = le32_get(p + 40);
		t->flags = le32_get(p + 48);
		t->src_part = le32_get(p + 52);
		t->src_lo = le64_get(p + 56);
		t->src_hi = le64_get(p + 64);
		t->decided = (int64_t)le64_get(p + 72);
		t->data_start = le64_get(p + 80);
		for (int i = 0; i < t->q->nparts; i++)
			t->at[i] = le64_get(p + MQ_TXN_SLOT_HDR + 8 * i);
	}
	free(b);
}

/* Write the next slot; synced when sync (and the queue syncs at all). */
static int txn_slot_write(struct txn *t, int sync, struct mq_err *e)
{
	unsigned char *p = calloc(1, t->slot);
	if (!p)
		abort();
	t->seq++;
	le32_put(p, MQ_TXN_MAGIC);
	le64_put(p + 8, t->seq);
	le32_put(p + 16, t->state);
	le32_put(p + 20, t->checks);
	le64_put(p + 24, (uint64_t)t->created);
	le64_put(p + 32, t->data_end);
	le32_put(p + 40, t->tag);
	le32_put(p + 44, (uint32_t)t->q->nparts);
	le32_put(p + 48, t->flags);
	le32_put(p + 52, t->src_part);
	le64_put(p + 56, t->src_lo);
	le64_put(p + 64, t->src_hi);
	le64_put(p + 72, (uint64_t)t->decided);
	le64_put(p + 80, t->data_start);
	for (int i = 0; i < t->q->nparts; i++)
		le64_put(p + MQ_TXN_SLOT_HDR + 8 * i, t->at[i]);
	le32_put(p + 4, (uint32_t)crc32(0L, p + 8, t->slot - 8));
	int r = dur_pwrite_all(t->fd, p, t->slot, (off_t)(t->seq % 2) * t->slot, t->path, e);
	free(p);
	if (r == 0 && sync && t->q->conf.fsync >= MQ_FSYNC_BATCH)
		r = dur_datasync(t->fd, t->path, e);
	if (r == 0)
		t->valid = 1;
	return r;
}

/* Start the file over: no messages, no state (a new transaction, or a
 * pipe's next step once the last one finished). */
static void txn_reset(struct txn *t)
{
	t->data_start = t->data_end = 2 * (uint64_t)t->slot;
	t->state = t->checks = t->flags = 0;
	t->created = t->decided = 0;
	for (int i = 0; i < t->q->nparts; i++)
		t->at[i] = UINT64_MAX;
}

enum { TX_CREATE = 1, TX_NONBLOCK = 2, TX_NOLOCK = 4 };

/* Open and lock the transaction file `name` (TX_CREATE: a new ordinary
 * transaction when name is NULL, else a pipe's file; TX_NOLOCK: only to
 * look).  Returns 1, 0 if there is no such file, -2 if TX_NONBLOCK and
 * it is locked, -1. */
static int txn_open(struct queue *q, const char *name, int flags, struct txn *t,
                    struct mq_err *e)
{
	int create = flags & TX_CREATE, nonblock = flags & TX_NONBLOCK;
	char dir[PATH_MAX + 32];
	txn_init(t, q);
	txn_dir(q, "", dir, sizeof dir);
	if (create && file_size(dir) < 0 && (dur_mkdir(dir, e) < 0 || dur_sync_dir(q->dir, e) < 0))
		return -1;
	for (int tries = 0; t->fd < 0; tries++) {
		int oflags = (flags & TX_NOLOCK ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NOFOLLOW;
		if (name) {
			strfmt(t->name, sizeof t->name, "%s", name);
			oflags |= create ? O_CREAT : 0;
		} else { /* ms since the epoch and 16 bits of chance; O_EXCL settles clashes */
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			uint64_t x = (uint64_t)ts.tv_nsec ^ (uint64_t)getpid() << 32 ^ (uint64_t)tries << 20;
			x = (x ^ x >> 30) * 0xbf58476d1ce4e5b9u; /* splitmix64's finish */
			x = (x ^ x >> 27) * 0x94d049bb133111ebu;
			uint64_t id = (uint64_t)now_ms() << 16 | ((x ^ x >> 31) & 0xffff);
			strfmt(t->name, sizeof t->name, "%016" PRIx64, id);
			oflags |= O_CREAT | O_EXCL;
		}
		txn_dir(q, t->name, t->path, sizeof t->path);
		int existed = name && file_size(t->path) >= 0;
		t->fd = sys.open(t->path, oflags, 0644);
		if (t->fd < 0 && errno == EEXIST && !name && tries < 100)
			continue;
		if (t->fd < 0 && errno == ENOENT && !create)
			return 0;
		if (t->fd < 0)
			return err_sys(e, err_code_for(errno), "cannot open '%s'", t->path);
		t->fresh = create && !existed;
	}
	if (!(flags & TX_NOLOCK) && dur_lock(t->fd, LOCK_EX | (nonblock ? LOCK_NB : 0), t->path, e) < 0)
		return nonblock && e->code == MQ_EX_TEMPFAIL ? -2 : -1;
	if (name)
		txn_slot_read(t);
	else
		txn_reset(t);
	return 1;
}

/* Add the closed batches of enc, all for partition part.  Unsynced: the
 * seal syncs them with the slot that makes them count. */
static int txn_add(struct txn *t, int part, struct rec_enc *enc, struct mq_err *e)
{
	if (t->data_end - t->data_start + enc->out.len > MQ_TXN_MAX_BYTES)
		return err_set(e, MQ_EX_DATAERR, "a transaction holds at most %u MiB",
		               MQ_TXN_MAX_BYTES >> 20);
	for (size_t at = 0; at < enc->out.len;) {
		unsigned char *b = (unsigned char *)enc->out.p + at;
		le64_put(b + 48, MQ_PRODUCER_TXN);
		le32_put(b + 56, (uint32_t)part);
		rec_finish(b, 0);
		at += le32_get(b + 8);
	}
	if (dur_pwrite_all(t->fd, enc->out.p, enc->out.len, (off_t)t->data_end, t->path, e) < 0)
		return -1;
	t->data_end += enc->out.len;
	return 0;
}

/* Sync what was added; then, for put --txn (slot), write the slot OPEN:
 * from now on the transaction exists.  A pipe step writes no slot here:
 * its first is txn_move()'s decision. */
static int txn_seal(struct txn *t, int slot, struct mq_err *e)
{
	int sync = t->q->conf.fsync >= MQ_FSYNC_BATCH;
	if (sync && dur_datasync(t->fd, t->path, e) < 0)
		return -1;
	t->state = MQ_TXN_OPEN;
	if (!t->created)
		t->created = now_ms();
	if (slot && txn_slot_write(t, 1, e) < 0)
		return -1;
	if (t->fresh && sync) {
		char dir[PATH_MAX + 32];
		txn_dir(t->q, "", dir, sizeof dir);
		if (dur_sync_dir(dir, e) < 0)
			return -1;
		t->fresh = 0;
	}
	return 0;
}

/*
 * Walk the transaction's batches (checking each crc): each message goes
 * to fn with its partition.  Returns 0, or -1 (65 for damage, which
 * commits nothing: the first walk of a commit reads everything).
 */
static int txn_walk(struct txn *t, int (*fn)(void *ctx, int part, struct rec_msg *m,
                                              struct mq_err *e), void *ctx, struct mq_err *e)
{
	struct buf b = {0}, scratch = {0};
	struct rec_hdr h;
	struct rec_iter it;
	struct rec_msg m;
	int r = 0, k;
	for (uint64_t pos = t->data_start; r == 0 && pos < t->data_end; pos += h.len) {
		if (seg_read_batch(t->fd, t->path, pos, t->data_end, &b, &h, e) != 1 ||
		    rec_iter_init(&it, (unsigned char *)b.p, &h, &scratch, e) < 0) {
			r = -1;
			break;
		}
		if (h.pid != MQ_PRODUCER_TXN || h.pseq >= (uint32_t)t->q->nparts) {
			r = err_set(e, MQ_EX_DATAERR, "%s:%" PRIu64 ": not a batch of this transaction",
			            t->path, pos);
			break;
		}
		while (r == 0 && (k = rec_next(&it, &m, e)) == 1)
			r = fn(ctx, (int)h.pseq, &m, e);
		if (r == 0 && k < 0)
			r = -1;
	}
	buf_free(&b);
	buf_free(&scratch);
	return r;
}

/* Messages and their bytes per partition. */
struct txn_sums {
	uint64_t *n, *bytes;
};

static int txn_count_msg(void *ctx, int part, struct rec_msg *m, struct mq_err *e)
{
	struct txn_sums *s = ctx;
	(void)e;
	s->n[part]++;
	s->bytes[part] += m->klen + m->tlen + m->hlen + m->blen + 16;
	return 0;
}

/* Messages (n) and bytes per partition, reading every batch. */
static int txn_counts(struct txn *t, uint64_t *n, uint64_t *bytes, struct mq_err *e)
{
	struct txn_sums s = {n, bytes};
	memset(n, 0, (size_t)t->q->nparts * sizeof *n);
	memset(bytes, 0, (size_t)t->q->nparts * sizeof *bytes);
	return txn_walk(t, txn_count_msg, &s, e);
}

/* How many messages of this transaction landed in p from offset at on:
 * those of batches stamped with its tag, up to the first that is not. */
static int txn_landed(struct txn *t, struct part *p, uint64_t *n, struct mq_err *e)
{
	struct reader r;
	struct rec_msg m;
	struct rec_hdr h;
	struct buf b = {0};
	uint64_t seg = UINT64_MAX, pos = UINT64_MAX;
	int k, ours = 0;
	*n = 0;
	if (rd_open(&r, p, t->at[p->id], e) < 0)
		return -1;
	while ((k = rd_next(&r, &m, e)) == 1) {
		if (r.seg != seg || r.batch_pos != pos) {
			seg = r.seg;
			pos = r.batch_pos;
			if (seg_read_batch(r.fd, r.path, pos, r.limit, &b, &h, e) != 1) {
				k = -1;
				break;
			}
			ours = h.pid == MQ_PRODUCER_TXN && h.pseq == t->tag;
		}
		if (!ours)
			break;
		(*n)++;
	}
	rd_close(&r);
	buf_free(&b);
	return k < 0 ? -1 : 0;
}

/* The copy of a commit: messages per partition still to skip (landed
 * before a crash), and an encoder per partition. */
struct txn_copy {
	struct txn *t;
	uint64_t *skip;
	struct rec_enc *enc;
};

static int txn_copy_flush(struct txn_copy *c, int part, struct mq_err *e)
{
	struct rec_enc *enc = &c->enc[part];
	uint64_t first;
	if (enc->nmsgs == 0)
		return 0;
	rec_enc_close(enc);
	for (size_t at = 0; at < enc->out.len;) {
		unsigned char *b = (unsigned char *)enc->out.p + at;
		le64_put(b + 48, MQ_PRODUCER_TXN);
		le32_put(b + 56, c->t->tag);
		at += le32_get(b + 8);
	}
	int r = part_append(&c->t->q->parts[part], enc, &first, e);
	rec_enc_reset(enc);
	return r;
}

static int txn_copy_msg(void *ctx, int part, struct rec_msg *m, struct mq_err *e)
{
	struct txn_copy *c = ctx;
	if (c->skip[part]) {
		c->skip[part]--;
		return 0;
	}
	m->ts = c->t->decided; /* the moment of commit */
	rec_enc_add(&c->enc[part], m);
	return c->enc[part].out.len >= MQ_FLUSH_BYTES ? txn_copy_flush(c, part, e) : 0;
}

/*
 * Commit (or finish committing) under the transaction's lock: lock the
 * partitions it writes, in ascending order; if still open, sync the
 * decision; append what has not landed yet, sync and publish.  The file
 * is left COMMITTING: txn_end() records the outcome and removes it.
 *
 * Each partition shows its part all at once: a segment that would not
 * hold it is rolled first, none is rolled while appending (a roll
 * publishes), and recovery cuts a commit's unpublished batches (see
 * part_scan_tail()), which the resumed commit writes again.  Across
 * partitions the publishes follow each other with every lock held.
 */
static int txn_move(struct txn *t, struct mq_err *e)
{
	struct queue *q = t->q;
	int np = q->nparts, r = 0, locked = 0;
	uint64_t *n = calloc((size_t)np, sizeof *n), *bytes = calloc((size_t)np, sizeof *bytes);
	struct rec_enc *enc = calloc((size_t)np, sizeof *enc);
	if (!n || !bytes || !enc)
		abort();
	if (txn_counts(t, n, bytes, e) < 0) {
		r = -1;
		goto out;
	}
	for (; locked < np && r == 0; locked++)
		if ((n[locked] || t->at[locked] != UINT64_MAX) && part_lock(&q->parts[locked], 0, e) < 0)
			r = -1;
	if (r < 0)
		goto out;
	for (int i = 0; i < np && r == 0; i++) {
		struct part *p = &q->parts[i];
		if (n[i] && p->seg_len > 0 && p->seg_len + bytes[i] > (uint64_t)q->conf.segment_bytes)
			r = part_roll(p, e);
	}
	if (r < 0)
		goto out;
	if (t->state == MQ_TXN_OPEN) { /* the decision */
		for (int i = 0; i < np; i++)
			t->at[i] = n[i] ? q->parts[i].next : UINT64_MAX;
		t->state = MQ_TXN_COMMITTING;
		t->decided = now_ms();
		/* its batches' stamp: another commit's must differ, as one may
		 * land right after a crash cut this one short */
		t->tag = (uint32_t)crc32(0L, (const unsigned char *)t->name, (uInt)strlen(t->name)) ^
		         (uint32_t)(t->seq + 1) * 2654435761u;
		if (txn_slot_write(t, 1, e) < 0) {
			r = -1;
			goto out;
		}
		memset(n, 0, (size_t)np * sizeof *n); /* nothing landed yet */
	} else {
		for (int i = 0; i < np && r == 0; i++)
			r = t->at[i] == UINT64_MAX ? (n[i] = 0, 0) : txn_landed(t, &q->parts[i], &n[i], e);
		if (r < 0)
			goto out;
	}
	struct txn_copy c = {t, n, enc};
	for (int i = 0; i < np; i++) {
		rec_enc_init(&enc[i], (int)q->conf.compression, MQ_BATCH_TARGET);
		q->parts[i].hold = 1;
	}
	r = txn_walk(t, txn_copy_msg, &c, e);
	for (int i = 0; i < np && r == 0; i++)
		r = txn_copy_flush(&c, i, e);
	for (int i = 0; i < np && r == 0; i++) {
		struct part *p = &q->parts[i];
		if (!p->locked)
			continue;
		/* The head is synced too: recovery cuts a commit's batches past
		 * the head on disk, so one that returned must be named there. */
		int sync = q->conf.fsync >= MQ_FSYNC_BATCH;
		if (sync && part_sync(p, e) < 0)
			r = -1;
		else if (part_publish(p, sync, e) < 0) {
			part_fail(p);
			r = -1;
		}
	}
	for (int i = 0; i < np; i++) {
		rec_enc_free(&enc[i]);
		q->parts[i].hold = 0;
	}
out:
	for (int i = 0; i < locked && i < np; i++)
		part_unlock(&q->parts[i]);
	free(n);
	free(bytes);
	free(enc);
	return r;
}

/* Record an ordinary transaction's outcome in txn/done (rotated to
 * done.old past MQ_TXN_DONE_MAX), under txn/lock. */
static int txn_done_add(struct queue *q, const char *name, uint32_t state, struct mq_err *e)
{
	char lpath[PATH_MAX + 32], path[PATH_MAX + 32], old[PATH_MAX + 32];
	unsigned char rec[MQ_TXN_DONE_REC] = {0};
	txn_dir(q, "lock", lpath, sizeof lpath);
	txn_dir(q, MQ_TXN_DONE, path, sizeof path);
	txn_dir(q, MQ_TXN_DONE ".old", old, sizeof old);
	int lk = sys.open(lpath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644), fd = -1, r = -1;
	if (lk < 0)
		return err_sys(e, err_code_for(errno), "cannot open '%s'", lpath);
	if (dur_lock(lk, LOCK_EX, lpath, e) < 0)
		goto out;
	if (file_size(path) >= MQ_TXN_DONE_MAX && sys.rename(path, old) < 0) {
		err_sys(e, MQ_EX_IOERR, "cannot rename '%s'", path);
		goto out;
	}
	fd = sys.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0644);
	if (fd < 0) {
		err_sys(e, err_code_for(errno), "cannot open '%s'", path);
		goto out;
	}
	le32_put(rec, MQ_TXN_MAGIC);
	le64_put(rec + 8, strtoull(name, NULL, 16));
	le32_put(rec + 16, state);
	le64_put(rec + 24, (uint64_t)now_ms());
	le32_put(rec + 4, (uint32_t)crc32(0L, rec + 8, MQ_TXN_DONE_REC - 8));
	struct stat st;
	if (fstat(fd, &st) < 0) {
		err_sys(e, MQ_EX_IOERR, "cannot stat '%s'", path);
		goto out;
	}
	st.st_size -= st.st_size % MQ_TXN_DONE_REC; /* past a torn record */
	if (dur_pwrite_all(fd, rec, sizeof rec, st.st_size, path, e) < 0 ||
	    (q->conf.fsync >= MQ_FSYNC_BATCH && dur_datasync(fd, path, e) < 0))
		goto out;
	r = 0;
out:
	dur_close(&fd);
	close(lk);
	return r;
}

/* The recorded outcome of a finished transaction, or 0 if none is known. */
static uint32_t txn_done_find(struct queue *q, const char *name)
{
	uint64_t id = strtoull(name, NULL, 16);
	uint32_t found = 0;
	static const char *files[] = {MQ_TXN_DONE ".old", MQ_TXN_DONE};
	for (int f = 0; f < 2; f++) {
		char path[PATH_MAX + 32];
		unsigned char b[64 * MQ_TXN_DONE_REC];
		txn_dir(q, files[f], path, sizeof path);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		ssize_t n;
		for (off_t off = 0; fd >= 0 && (n = pread(fd, b, sizeof b, off)) > 0; off += n)
			for (ssize_t i = 0; i + MQ_TXN_DONE_REC <= n; i += MQ_TXN_DONE_REC) {
				const unsigned char *p = b + i;
				if (le32_get(p) == MQ_TXN_MAGIC && le64_get(p + 8) == id &&
				    le32_get(p + 4) == (uint32_t)crc32(0L, p + 8, MQ_TXN_DONE_REC - 8))
					found = le32_get(p + 16);
			}
		if (fd >= 0)
			close(fd);
	}
	return found;
}

/* The end of an ordinary transaction: its outcome recorded, its file
 * removed (a pipe's file stays for the next step, marked finished). */
static int txn_end(struct txn *t, uint32_t state, struct mq_err *e)
{
	t->state = state;
	if (t->flags & MQ_TXN_PIPE)
		return txn_slot_write(t, 0, e); /* unsynced: finishing again is harmless */
	if (txn_done_add(t->q, t->name, state, e) < 0)
		return -1;
	if (sys.unlink(t->path) < 0 && errno != ENOENT)
		return err_sys(e, MQ_EX_IOERR, "cannot remove '%s'", t->path);
	return 0;
}

/*
 * Commit, or roll back, a transaction opened with txn_open().  Both are
 * idempotent, and whichever decided first wins: a commit finds a
 * rollback's outcome and the other way round.  Returns the state the
 * transaction ended in (MQ_TXN_COMMITTED or MQ_TXN_ROLLEDBACK), -1.
 */
static int txn_commit(struct txn *t, struct mq_err *e)
{
	if (t->state >= MQ_TXN_COMMITTED)
		return (int)t->state;
	if (txn_move(t, e) < 0 || txn_end(t, MQ_TXN_COMMITTED, e) < 0)
		return -1;
	return MQ_TXN_COMMITTED;
}

static int txn_rollback(struct txn *t, struct mq_err *e)
{
	if (t->state == MQ_TXN_COMMITTING) /* decided already: finish the commit */
		return txn_commit(t, e);
	if (t->state >= MQ_TXN_COMMITTED)
		return (int)t->state;
	t->state = MQ_TXN_ROLLEDBACK;
	if (txn_slot_write(t, 1, e) < 0 || txn_end(t, MQ_TXN_ROLLEDBACK, e) < 0)
		return -1;
	return MQ_TXN_ROLLEDBACK;
}

/*
 * Open an ordinary transaction by its file name for commit or rollback:
 * returns 1 (open, locked), or the outcome of a finished one
 * (MQ_TXN_COMMITTED, MQ_TXN_ROLLEDBACK; t closed), 0 if unknown, -2
 * (nonblock, busy), -1.
 */
static int txn_find(struct queue *q, const char *name, int nonblock, struct txn *t,
                    struct mq_err *e)
{
	int k = txn_open(q, name, nonblock ? TX_NONBLOCK : 0, t, e);
	if (k < 0)
		return k;
	if (k == 1 && t->valid && t->state < MQ_TXN_COMMITTED)
		return 1;
	if (k == 1 && t->valid) { /* ended, but its file was left: finish the end */
		uint32_t st = t->state;
		k = txn_end(t, st, e);
		txn_free(t);
		return k < 0 ? -1 : (int)st;
	}
	txn_free(t); /* no file, or one whose put died before its slot */
	return (int)txn_done_find(q, name);
}

/* ===================================================================
 * 9. Producer: batching, partition choice and the sync policy
 *
 * Buffers messages per partition and writes them in batches, taking a
 * partition's writer lock only while writing.  When a flush returns, its
 * messages are acknowledged: synced for fsync always/batch, written (and
 * visible) for interval/never.  Uses layers 1-7.
 * =================================================================== */

struct prod {
	struct queue *q;
	int fixed;             /* partition forced by the caller, or -1 */
	int sticky;            /* partition for messages without a key */
	struct rec_enc *enc;   /* per partition: batches not yet written */
	uint64_t *first;       /* per partition: first offset of the last flush */
	int64_t *dirty_ms;     /* per partition: monotonic time it became dirty */
	char *dirty;           /* per partition: written but not synced (interval) */
	size_t pending;        /* bytes buffered over all partitions */
	int64_t oldest_ms;     /* monotonic time of the oldest buffered message */
	struct buf order;      /* u16 partition of each buffered message */
	int failed;            /* a flush failed: the producer takes nothing more */
	int64_t due_ms;        /* > 0: delayed until then (into the timing wheel) */
	struct txn *txn;       /* put --txn: into this transaction's file */
	int group;             /* the caller flushes (mq serve's group commit): no
	                        * flush per message under fsync=always */
	int nonblock;          /* a partition another process holds defers the flush
	                        * (mq serve's shared producers), rather than waiting */
	int64_t retry_ms;      /* ... until then (monotonic) */
	const char *id;        /* put --id: drop the put if this id is stored */
	int id_checked;        /* the first flush looked for it */
	int dup;               /* it was there: everything is dropped */
	uint64_t dup_off;      /* where it was */
	/* Called for each message once acknowledged, in the order added: */
	void (*acked)(void *ctx, int part, uint64_t offset);
	void *ctx;
};

static void prod_init(struct prod *pr, struct queue *q, int fixed)
{
	memset(pr, 0, sizeof *pr);
	pr->q = q;
	pr->fixed = fixed;
	pr->enc = calloc((size_t)q->nparts, sizeof *pr->enc);
	pr->first = calloc((size_t)q->nparts, sizeof *pr->first);
	pr->dirty_ms = calloc((size_t)q->nparts, sizeof *pr->dirty_ms);
	pr->dirty = calloc((size_t)q->nparts, 1);
	if (!pr->enc || !pr->first || !pr->dirty_ms || !pr->dirty)
		abort();
	/* Batches stay well below the segment size so segments fill evenly. */
	size_t target = MQ_BATCH_TARGET;
	if ((int64_t)target > q->conf.segment_bytes / 4)
		target = (size_t)(q->conf.segment_bytes / 4);
	for (int i = 0; i < q->nparts; i++)
		rec_enc_init(&pr->enc[i], (int)q->conf.compression, target);
	pr->sticky = (int)((uint64_t)(getpid() ^ now_ms()) % (uint64_t)q->nparts);
}

static void prod_free(struct prod *pr)
{
	for (int i = 0; pr->enc && i < pr->q->nparts; i++)
		rec_enc_free(&pr->enc[i]);
	free(pr->enc);
	free(pr->first);
	free(pr->dirty_ms);
	free(pr->dirty);
	buf_free(&pr->order);
}

/* Milliseconds until a flush is due (0 = now), or -1 if nothing waits. */
static int64_t prod_due(const struct prod *pr)
{
	int64_t now = mono_ms(), due = INT64_MAX; /* (overdue is negative: now) */
	if (pr->pending)
		due = pr->oldest_ms + MQ_SYNC_EVERY_MS - now;
	if (pr->q->conf.fsync == MQ_FSYNC_INTERVAL)
		for (int i = 0; i < pr->q->nparts; i++)
			if (pr->dirty[i] && pr->dirty_ms[i] + pr->q->conf.fsync_ms - now < due)
				due = pr->dirty_ms[i] + pr->q->conf.fsync_ms - now;
	if (due != INT64_MAX && pr->retry_ms > now && due < pr->retry_ms - now)
		due = pr->retry_ms - now; /* a lock was busy: not before then */
	return due == INT64_MAX ? -1 : due > 0 ? due : 0;
}

/* Is a message with header MQ_ID_HEADER = pr->id in partition p, put
 * within the dedupe window?  1 with its offset, 0, or -1. */
static int prod_seen(struct prod *pr, struct part *p, uint64_t *off, struct mq_err *e)
{
	uint64_t start;
	struct reader r;
	struct rec_msg m;
	int64_t since = now_ms() - pr->q->conf.dedupe_ms;
	if (part_offset_for_time(p, since, &start, e) < 0 || rd_open(&r, p, start, e) < 0)
		return -1;
	r.min_ts = since;
	int k, found = 0;
	while (!found && (k = rd_next(&r, &m, e)) == 1)
		if ((found = rec_hdr_is(&m, MQ_ID_HEADER, pr->id)))
			*off = m.offset;
	rd_close(&r);
	return k < 0 ? -1 : found;
}

/*
 * Write (and sync, as the mode says) everything buffered; final forces
 * the sync that interval mode would otherwise postpone.  Returns 0 once
 * the messages are acknowledged; prod_offset() then names their offsets.
 */
/* Does partition i have anything to write, or to sync, in this flush?
 * *sync says whether it is synced. */
static int prod_part_due(const struct prod *pr, int i, int final, int64_t now, int *sync)
{
	const struct queue *q = pr->q;
	int64_t mode = q->conf.fsync;
	/* interval: unsynced data (dirty since dirty_ms) is synced once the
	 * interval has passed, and always before the command ends. */
	int pending = pr->enc[i].nmsgs > 0 || pr->dirty[i];
	*sync = mode >= MQ_FSYNC_BATCH ||
	        (mode == MQ_FSYNC_INTERVAL && pending &&
	         (final || (pr->dirty[i] && now - pr->dirty_ms[i] >= q->conf.fsync_ms)));
	return pr->enc[i].nmsgs > 0 || (*sync && pr->dirty[i]);
}

static void q_unlock_all(struct queue *q)
{
	for (int i = 0; i < q->nparts; i++)
		part_unlock(&q->parts[i]);
}

/* pr->nonblock: take every writer lock this flush needs, or none.
 * Returns 1 with them held, 0 if another process holds one (nothing is
 * held; try again from pr->retry_ms), -1 on error. */
static int prod_lock_all(struct prod *pr, int64_t now, struct mq_err *e)
{
	struct queue *q = pr->q;
	if (pr->retry_ms > now)
		return 0;
	for (int i = 0; i < q->nparts; i++) {
		int sync;
		if (!prod_part_due(pr, i, 0, now, &sync) || part_lock(&q->parts[i], 1, e) == 0)
			continue;
		q_unlock_all(q);
		if (e->code != MQ_EX_TEMPFAIL)
			return -1;
		pr->retry_ms = now + 1;
		return 0;
	}
	return 1;
}

static int prod_flush(struct prod *pr, int final, struct mq_err *e)
{
	struct queue *q = pr->q;
	int64_t mode = q->conf.fsync, now = mono_ms();
	if (pr->failed)
		return err_set(e, MQ_EX_IOERR, "%s: an earlier write failed", q->name);
	int held = pr->nonblock && !final && !pr->txn && pr->due_ms <= 0;
	if (held) {
		int k = prod_lock_all(pr, now, e);
		if (k < 0)
			pr->failed = 1;
		if (k <= 0)
			return k; /* 0: everything stays buffered for the next flush */
	}
	for (int i = 0; i < q->nparts; i++) {
		struct rec_enc *enc = &pr->enc[i];
		int sync;
		if (!prod_part_due(pr, i, final, now, &sync))
			continue;
		struct part *p = &q->parts[i];
		rec_enc_close(enc);
		if (pr->txn) { /* a half message: synced by txn_seal() */
			if (txn_add(pr->txn, i, enc, e) < 0) {
				pr->failed = 1;
				return -1;
			}
			rec_enc_reset(enc);
			continue;
		}
		if (pr->due_ms > 0) { /* delayed: to the wheel, not the partition */
			if (dly_append(q, i, pr->due_ms, enc, mode >= MQ_FSYNC_BATCH, e) < 0) {
				pr->failed = 1;
				return -1;
			}
			rec_enc_reset(enc);
			continue;
		}
		/* A put waits for the writer lock, even in mq serve (dur_lock_nowait):
		 * writers hold it only for an append and its sync, and failing here
		 * would fail the put (the shared producer takes its locks above,
		 * without waiting). */
		int nowait = dur_lock_nowait;
		dur_lock_nowait = 0;
		int lk = held ? 0 : part_lock(p, 0, e);
		dur_lock_nowait = nowait;
		if (lk < 0) {
			pr->failed = 1;
			return -1;
		}
		if (pr->id && !pr->id_checked && enc->nmsgs) {
			/* under the writer lock: a concurrent put of the id waits here */
			int k = prod_seen(pr, p, &pr->dup_off, e);
			pr->id_checked = k >= 0;
			pr->dup = k == 1;
			if (k != 0) {
				part_unlock(p);
				rec_enc_reset(enc);
				pr->order.len = 0;
				pr->pending = 0;
				if (k < 0)
					pr->failed = 1;
				return k < 0 ? -1 : 0;
			}
		}
		int r = enc->nmsgs ? part_append(p, enc, &pr->first[i], e) : 0;
		if (r == 0 && sync) {
			r = part_sync(p, e);
			pr->dirty[i] = 0;
		} else if (r == 0 && mode == MQ_FSYNC_INTERVAL && !pr->dirty[i]) {
			pr->dirty[i] = 1;
			pr->dirty_ms[i] = now;
		}
		if (r == 0 && enc->nmsgs && part_publish(p, 0, e) < 0) {
			part_fail(p); /* unpublished: cut it, so a failed put stores nothing */
			r = -1;
		}
		if (r == 0 && p->rolled) {
			uint64_t min;
			struct mq_err re; /* retention is housekeeping: its failure fails no put */
			if (grp_min(q, i, &min, &re) == 0)
				part_retain(p, min, MQ_DRAINED_ROLL, &re);
		}
		part_unlock(p);
		if (r < 0) {
			/* Partitions before this one are written and published; their
			 * buffers are already empty, and nothing is ever written twice. */
			q_unlock_all(q);
			pr->failed = 1;
			return -1;
		}
		rec_enc_reset(enc); /* written: never again */
	}
	if (pr->acked && pr->due_ms <= 0 && !pr->txn) {
		const uint16_t *order = (const uint16_t *)(const void *)pr->order.p;
		for (size_t k = 0; k < pr->order.len / 2; k++)
			pr->acked(pr->ctx, order[k], pr->first[order[k]]++);
	}
	pr->order.len = 0;
	pr->pending = 0;
	pr->sticky = (pr->sticky + 1) % q->nparts; /* spread long streams */
	return 0;
}

/*
 * Buffer one message (m->ts set by the caller).  A message over
 * max-message-bytes is refused (65) before any of it is buffered.  May
 * flush: in fsync=always each message is acknowledged on its own, else
 * every MQ_FLUSH_BYTES.  Returns 1 if a flush happened.
 */
static int prod_add(struct prod *pr, const struct rec_msg *m, struct mq_err *e)
{
	struct queue *q = pr->q;
	size_t size = m->klen + m->tlen + m->hlen + m->blen;
	if (pr->failed)
		return err_set(e, MQ_EX_IOERR, "%s: an earlier write failed", q->name);
	if (size > (size_t)q->conf.max_message)
		return err_set(e, MQ_EX_DATAERR, "message of %zu bytes is over the maximum of %" PRId64
		               " (max-message-bytes)", size, q->conf.max_message);
	if (pr->dup) /* a duplicate put: drop the rest of it too */
		return 0;
	int part = pr->fixed >= 0 ? pr->fixed
	           : m->has_key ? (int)(fnv1a(m->key, m->klen) % (uint32_t)q->nparts)
	           : pr->sticky;
	if (pr->pending == 0)
		pr->oldest_ms = mono_ms();
	rec_enc_add(&pr->enc[part], m);
	uint16_t p16 = (uint16_t)part;
	buf_add(&pr->order, &p16, sizeof p16);
	pr->pending += size + 16;
	/* Flushing every MQ_FLUSH_BYTES (< MQ_SYNC_EVERY_BYTES) keeps memory
	 * small whatever the input size; fsync=batch then syncs that often. */
	if ((q->conf.fsync == MQ_FSYNC_ALWAYS && !pr->group) || pr->pending >= MQ_FLUSH_BYTES) {
		if (prod_flush(pr, 0, e) < 0)
			return -1;
		return 1;
	}
	return 0;
}

/* ===================================================================
 * 10. Verification and repair
 *
 * Checks every batch's header, crc and records, offset continuity, every
 * index entry, the time index, the head and the group offset files, and
 * reports damage by queue, partition and offset range through a report
 * hook.  Repair cuts damaged byte ranges out of a segment into
 * P/quarantine/ (valid batches after the damage stay), truncates torn
 * tails, rebuilds indexes, and says exactly what was dropped.  Runs with
 * the partition's writer lock held.  Uses layers 1-8.
 * =================================================================== */

struct vrep {
	void (*line)(void *ctx, const char *msg);
	void *ctx;
	int damaged;  /* problems found */
	int repaired; /* problems repaired */
	/* Optional: called before each segment is checked (progress). */
	void (*progress)(void *ctx, const char *queue, int part, size_t seg, size_t nsegs);
};

static void vr_say(struct vrep *vr, const char *fmt, ...)
{
	char msg[1400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (vr->line)
		vr->line(vr->ctx, msg);
}

struct vcut {
	uint64_t from, to; /* byte range [from, to) cut out */
};

/* Copy [from, to) of fd into a new file at path, fsynced. */
static int vr_copy_range(int fd, const char *src, uint64_t from, uint64_t to, int out,
                         const char *dst, struct mq_err *e)
{
	char *chunk = malloc(1 << 20);
	if (!chunk)
		abort();
	int r = 0;
	while (from < to && r == 0) {
		size_t n = to - from > (1 << 20) ? (1 << 20) : (size_t)(to - from);
		ssize_t got = dur_pread(fd, chunk, n, (off_t)from, src, e);
		if (got <= 0)
			r = got < 0 ? -1 : err_set(e, MQ_EX_IOERR, "'%s' shrank while copying", src);
		else
			r = dur_write_all(out, chunk, (size_t)got, dst, e);
		from += got > 0 ? (uint64_t)got : 0;
	}
	free(chunk);
	return r;
}

/*
 * Rewrite segment log without the cut ranges: quarantine each cut into
 * P/quarantine/BASE-POS.bad, write the kept bytes to a hidden temporary,
 * fsync, rename over the segment, fsync the directory.  A crash leaves
 * the old (damaged) segment or the new one, never a mix.
 */
static int vr_cut(struct part *p, uint64_t base, int fd, const char *path,
                  uint64_t size, const struct vcut *cuts, size_t ncuts, struct mq_err *e)
{
	char qdir[PATH_MAX + 32], qpath[PATH_MAX + 96], tmp[PATH_MAX + 48];
	strfmt(qdir, sizeof qdir, "%s/%s", p->dir, MQ_QUARANTINE_DIR);
	if (dur_mkdir(qdir, e) < 0)
		return -1;
	for (size_t i = 0; i < ncuts; i++) {
		strfmt(qpath, sizeof qpath, "%s/%0*" PRIu64 "-%" PRIu64 ".bad", qdir, MQ_SEG_DIGITS,
		         base, cuts[i].from);
		int out = sys.open(qpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (out < 0)
			return err_sys(e, err_code_for(errno), "cannot create '%s'", qpath);
		int r = vr_copy_range(fd, path, cuts[i].from, cuts[i].to, out, qpath, e);
		if (r == 0)
			r = dur_sync(out, qpath, e);
		close(out);
		if (r < 0)
			return -1;
	}
	if (dur_sync_dir(qdir, e) < 0)
		return -1;
	strfmt(tmp, sizeof tmp, "%s/.%0*" PRIu64 ".repair", p->dir, MQ_SEG_DIGITS, base);
	int out = sys.open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (out < 0)
		return err_sys(e, err_code_for(errno), "cannot create '%s'", tmp);
	uint64_t at = 0;
	int r = 0;
	for (size_t i = 0; i <= ncuts && r == 0; i++) {
		uint64_t end = i < ncuts ? cuts[i].from : size;
		r = vr_copy_range(fd, path, at, end, out, tmp, e);
		at = i < ncuts ? cuts[i].to : size;
	}
	if (r == 0)
		r = dur_sync(out, tmp, e);
	close(out);
	if (r == 0 && sys.rename(tmp, path) < 0)
		r = err_sys(e, MQ_EX_IOERR, "cannot rename '%s' over '%s'", tmp, path);
	if (r < 0) {
		sys.unlink(tmp);
		return -1;
	}
	return dur_sync_dir(p->dir, e);
}

/*
 * Build the expected index and time index of a segment by scanning it,
 * noting damaged ranges in cuts.  *next is the offset after the segment
 * (in: its base).  Returns the number of damaged ranges, or -1 (I/O).
 */
/* What verify remembers of each good batch, to judge the time index. */
struct vbatch {
	uint64_t base;
	int64_t max_ts; /* the batch's own */
	int64_t cum_ts; /* cumulative over the segment up to this batch */
};

static int vr_scan(struct part *p, uint64_t base, int fd, const char *path, uint64_t size,
                   uint64_t *next, struct buf *idx, struct buf *tix, struct buf *vb,
                   struct vcut **cuts, struct vrep *vr, struct mq_err *e)
{
	struct buf b = {0}, scratch = {0}, tags = {0};
	struct rec_hdr h;
	struct mq_err sub;
	int ncuts = 0;
	int64_t maxts = INT64_MIN;
	uint64_t pos = 0;
	*cuts = NULL;
	while (pos < size) {
		int r = seg_read_batch(fd, path, pos, size, &b, &h, &sub);
		if (r == 1 && (h.base < *next || h.base - *next > MQ_MAX_GAP))
			r = err_set(&sub, MQ_EX_DATAERR, "%s:%" PRIu64 ": batch base offset %" PRIu64
			            " out of sequence (expected %" PRIu64 ")", path, pos, h.base, *next);
		if (r == 1 && seg_batch_tags((unsigned char *)b.p, &h, &scratch, &tags, &sub) < 0)
			r = err_prefix(&sub, MQ_EX_DATAERR, path, pos);
		if (r < 0 && sub.code != MQ_EX_DATAERR) {
			*e = sub;
			ncuts = -1;
			break;
		}
		if (r < 0) {
			int64_t y = seg_find_valid(fd, path, pos + 1, size, &scratch);
			uint64_t to = y < 0 ? size : (uint64_t)y;
			struct rec_hdr nh = {0};
			if (y >= 0) {
				unsigned char hb[MQ_BATCH_HDR];
				dur_pread(fd, hb, sizeof hb, (off_t)y, path, e);
				rec_parse_hdr(hb, sizeof hb, &nh, &sub);
			}
			char range[64];
			if (y >= 0 && nh.base > *next)
				strfmt(range, sizeof range, "offsets %" PRIu64 "-%" PRIu64, *next, nh.base - 1);
			else if (y >= 0)
				strfmt(range, sizeof range, "no whole offsets");
			else
				strfmt(range, sizeof range, "offsets from %" PRIu64 " to the end", *next);
			vr_say(vr, "%s/%d: %s: %s (%" PRIu64 " damaged bytes at %s:%" PRIu64 "-%" PRIu64 ")",
			       p->q->name, p->id, range, sub.msg, to - pos, path, pos, to);
			*cuts = realloc(*cuts, (size_t)(ncuts + 1) * sizeof **cuts);
			if (!*cuts)
				abort();
			(*cuts)[ncuts++] = (struct vcut){pos, to};
			pos = to;
			continue;
		}
		/* Positions in the rebuilt index are those after the cuts. */
		uint64_t newpos = pos;
		for (int i = 0; i < ncuts; i++)
			newpos -= (*cuts)[i].to - (*cuts)[i].from;
		if (h.base > *next)
			seg_idx_entries(idx, newpos, NULL, (uint32_t)(h.base - *next));
		seg_idx_entries(idx, newpos, (uint32_t *)(void *)tags.p, h.count);
		if (h.max_ts > maxts)
			maxts = h.max_ts;
		struct vbatch one = {h.base, h.max_ts, maxts};
		buf_add(vb, &one, sizeof one);
		if (newpos == 0 || (newpos + h.len - 1) / MQ_TIX_INTERVAL != (newpos - 1) / MQ_TIX_INTERVAL) {
			unsigned char ent[MQ_TIX_ENTRY];
			le64_put(ent, (uint64_t)maxts);
			le64_put(ent + 8, h.base);
			buf_add(tix, ent, sizeof ent);
		}
		*next = h.base + h.count;
		pos += h.len;
	}
	buf_free(&b);
	buf_free(&scratch);
	buf_free(&tags);
	(void)base;
	return ncuts;
}

/*
 * Is a time index sound?  Entries must rise in offset and time, each must
 * start a batch of the segment, and its time must lie between that batch's
 * own max and the cumulative max (a writer resuming in a new process
 * carries the cumulative max on from the last entry, so entries need not
 * equal a rebuild byte for byte).
 */
static int vr_tix_sound(const char *path, const struct buf *vb)
{
	const struct vbatch *b = (const struct vbatch *)(const void *)vb->p;
	size_t nb = vb->len / sizeof *b, k = 0;
	int64_t size = file_size(path);
	if (size < 0 || size % MQ_TIX_ENTRY)
		return size == 0 || (size < 0 && nb == 0);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	unsigned char ent[MQ_TIX_ENTRY];
	int64_t last_ts = INT64_MIN;
	int ok = 1;
	for (int64_t at = 0; ok && at < size; at += MQ_TIX_ENTRY) {
		if (pread(fd, ent, sizeof ent, (off_t)at) != sizeof ent) {
			ok = 0;
			break;
		}
		int64_t ts = (int64_t)le64_get(ent);
		uint64_t off = le64_get(ent + 8);
		while (k < nb && b[k].base < off)
			k++;
		ok = k < nb && b[k].base == off && ts >= last_ts && ts >= b[k].max_ts &&
		     ts <= b[k].cum_ts;
		last_ts = ts;
		k++;
	}
	close(fd);
	return ok;
}

/* Compare a derived file with what it should hold; rewrite it if asked. */
static int vr_derived(struct part *p, const char *path, const char *what, const struct buf *want,
                      const struct buf *vb, int repair, struct vrep *vr, struct mq_err *e)
{
	if (vb) { /* the time index: judged for soundness */
		if (vr_tix_sound(path, vb))
			return 0;
		goto differs;
	}
	struct buf have = {0};
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	int64_t size = fd >= 0 ? file_size(path) : -1;
	if (size > 0) {
		buf_reserve(&have, (size_t)size);
		ssize_t r = dur_pread(fd, have.p, (size_t)size, 0, path, e);
		have.len = r > 0 ? (size_t)r : 0;
	}
	if (fd >= 0)
		close(fd);
	int same = have.len == want->len && (want->len == 0 || !memcmp(have.p, want->p, want->len));
	buf_free(&have);
	if (same)
		return 0;
differs:
	vr->damaged++;
	vr_say(vr, "%s/%d: %s '%s' disagrees with the log%s", p->q->name, p->id, what, path,
	       repair ? "; rebuilt" : "");
	if (!repair)
		return 0;
	vr->repaired++;
	return dur_replace(path, want->p ? want->p : "", want->len, e);
}

/* Verify (and with repair, mend) one partition. */
static int verify_part(struct part *p, int repair, struct vrep *vr, struct mq_err *e)
{
	uint64_t *segs = NULL;
	size_t n;
	struct mq_err re;
	if (part_flock(p, 0, e) < 0)
		return -1;
	/* First what any command does on open: finish a dead writer's tail.
	 * It refuses (65) when it finds damage; the scan below reports it. */
	if (part_recover(p, &re) < 0 && re.code != MQ_EX_DATAERR) {
		part_unlock(p);
		*e = re;
		return -1;
	}
	int rc = seg_list(p->dir, &segs, &n, e), cut_active = 0;
	uint64_t expect = n ? segs[0] : 0;
	for (size_t i = 0; i < n && rc == 0; i++) {
		char path[PATH_MAX + 32];
		struct buf idx = {0}, tix = {0}, vb = {0};
		if (vr->progress)
			vr->progress(vr->ctx, p->q->name, p->id, i, n);
		struct vcut *cuts = NULL;
		part_path(p, path, sizeof path, segs[i], MQ_LOG_SUFFIX);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			rc = err_sys(e, MQ_EX_IOERR, "cannot open '%s'", path);
			break;
		}
		if (segs[i] > expect) /* a gap between segments: earlier repair */
			vr_say(vr, "%s/%d: note: offsets %" PRIu64 "-%" PRIu64 " are missing (cut by an "
			       "earlier repair)", p->q->name, p->id, expect, segs[i] - 1);
		if (segs[i] < expect) {
			vr->damaged++;
			vr_say(vr, "%s/%d: segment %s starts at offset %" PRIu64 ", inside the previous one",
			       p->q->name, p->id, path, segs[i]);
		}
		uint64_t next = segs[i], size = (uint64_t)file_size(path);
		int k = vr_scan(p, segs[i], fd, path, size, &next, &idx, &tix, &vb, &cuts, vr, e);
		if (k < 0)
			rc = -1;
		if (k > 0 && i == n - 1)
			cut_active = repair;
		if (k > 0) {
			vr->damaged += k;
			if (repair && vr_cut(p, segs[i], fd, path, size, cuts, (size_t)k, e) < 0)
				rc = -1;
			else if (repair) {
				vr->repaired += k;
				uint64_t cut = 0;
				for (int c = 0; c < k; c++)
					cut += cuts[c].to - cuts[c].from;
				vr_say(vr, "%s/%d: repaired: moved %" PRIu64 " damaged bytes of %s to %s/%s/",
				       p->q->name, p->id, cut, path, p->dir, MQ_QUARANTINE_DIR);
			}
		}
		close(fd);
		/* After cutting damage the indexes are simply rewritten; without
		 * damage they are compared with what the log says. */
		char ipath[PATH_MAX + 32], tpath[PATH_MAX + 32];
		part_path(p, ipath, sizeof ipath, segs[i], MQ_IDX_SUFFIX);
		part_path(p, tpath, sizeof tpath, segs[i], MQ_TIX_SUFFIX);
		if (rc == 0 && k > 0 && repair) {
			rc = dur_replace(ipath, idx.p ? idx.p : "", idx.len, e);
			if (rc == 0)
				rc = dur_replace(tpath, tix.p ? tix.p : "", tix.len, e);
		} else if (rc == 0 && k == 0) {
			rc = vr_derived(p, ipath, "index", &idx, NULL, repair, vr, e);
			if (rc == 0)
				rc = vr_derived(p, tpath, "time index", &tix, &vb, repair, vr, e);
		}
		free(cuts);
		buf_free(&idx);
		buf_free(&tix);
		buf_free(&vb);
		expect = next;
	}
	struct head h;
	if (rc == 0 && n) {
		char path[PATH_MAX + 32];
		part_path(p, path, sizeof path, segs[n - 1], MQ_LOG_SUFFIX);
		int valid = head_read(p, &h, e);
		if (valid < 0)
			rc = -1;
		else if (cut_active || !valid || h.seg_base != segs[n - 1] || h.next != expect ||
		    h.seg_len != (uint64_t)file_size(path)) {
			if (!cut_active) {
				vr->damaged++;
				vr->repaired += repair;
				vr_say(vr, "%s/%d: head does not match the log (damaged)%s", p->q->name,
				       p->id, repair ? "; recovered" : "");
			}
			if (repair) {
				/* The head no longer matches: recovery rescans the tail. */
				unsigned char zero[MQ_HEAD_SIZE] = {0};
				if (head_open(p, 1, e) < 0 ||
				    dur_pwrite_all(p->head_fd, zero, sizeof zero, 0, p->head_path, e) < 0)
					rc = -1;
				dur_close(&p->log_fd); /* force part_recover to reopen */
			}
		}
	}
	if (rc == 0 && repair) {
		part_close_seg(p); /* a repaired segment is a new file */
		rc = part_recover(p, e);
	}
	part_unlock(p);
	free(segs);
	return rc;
}

/* Verify a queue: every partition, then every group's offset files. */
static int verify_queue(struct queue *q, int repair, struct vrep *vr, struct mq_err *e)
{
	for (int i = 0; i < q->nparts; i++)
		if (verify_part(&q->parts[i], repair, vr, e) < 0)
			return -1;
	char **groups;
	size_t ng;
	if (grp_list(q, &groups, &ng, e) < 0)
		return -1;
	for (size_t g = 0; g < ng; g++) {
		for (int i = 0; i < q->nparts; i++) {
			char path[PATH_MAX + 220];
			struct gstate gs;
			grp_path(q, groups[g], i, path, sizeof path);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			struct mq_err re;
			int bad = gs_read(fd, path, &gs, &re) < 0 || gs.damaged;
			close(fd);
			gs_free(&gs);
			if (bad) {
				vr->damaged++;
				vr_say(vr, "%s/%d: offset file '%s' of group '%s' is damaged: the group will "
				       "read this partition again from the start%s", q->name, i, path,
				       groups[g], repair ? "; reset to offset 0" : "");
				/* Reading it already means offset 0 (redelivery, never a skip);
				 * repair writes that down so the file is valid again. */
				if (repair) {
					int ofd = -1;
					struct gstate fresh = {0};
					if (grp_open(q, groups[g], i, 1, &ofd, e) < 0 ||
					    (sys.ftruncate(ofd, 0) < 0 &&
					     err_sys(e, MQ_EX_IOERR, "cannot truncate '%s'", path) < 0) ||
					    gs_write(ofd, path, &fresh, 1, e) < 0) {
						dur_close(&ofd);
						names_free(groups, ng);
						return -1;
					}
					dur_close(&ofd);
					vr->repaired++;
				}
			}
		}
	}
	names_free(groups, ng);
	return 0;
}

/* The effective settings (of queue q, else the defaults) as the lines
 * `mq config` prints, each handed to line(). */
static int conf_report(struct spool *sp, const char *q, void (*line)(void *ctx, const char *text),
                       void *ctx, struct mq_err *e)
{
	struct qconf c;
	char text[PATH_MAX + 64];
	if (q ? q_check_name("queue", q, e) < 0 || q_conf(sp, q, NULL, 0, &c, e) < 0
	      : cfg_queue(&sp->cfg, "", &c, e) < 0)
		return -1;
	strfmt(text, sizeof text, "# spool: %s", sp->dir);
	line(ctx, text);
	strfmt(text, sizeof text, "# config: %s%s", sp->cfg.path, sp->cfg.loaded ? "" : " (not present)");
	line(ctx, text);
	if (q) {
		strfmt(text, sizeof text, "# queue: %s%s", q, q_exists(sp, q) ? "" : " (not created yet)");
		line(ctx, text);
	}
	for (size_t i = 0; i < NSETTINGS; i++) {
		char v[64], kv[128];
		conf_format(&c, i, v, sizeof v);
		strfmt(kv, sizeof kv, "%s: %s", settings[i].name, v);
		strfmt(text, sizeof text, "%-32s # %s", kv, c.src[i]);
		line(ctx, text);
	}
	return 0;
}

/* ===================================================================
 * 11. Delivery: claims, leases, acks, retries and dead letters
 *
 * A consumer works on one partition of a group under a claim: the
 * group's lock on the partition and its state (layer 7).  It takes the
 * messages due again first (retries, expired leases), then new ones, and
 * settles what it took: done, leased until a time, or failed.  A failed
 * message waits out the queue's backoff and comes back with its attempt
 * count raised; after the last retry it is buried in QUEUE.dlq.
 * Uses layers 1-8.
 * =================================================================== */

/* A run of offsets taken under a claim and not yet settled. */
struct took {
	uint64_t lo;
	uint32_t n;
	uint16_t attempt;
};

enum { CL_NONBLOCK = 1, CL_NOREAD = 2, CL_ORDERED = 4, CL_NOCREATE = 8 };

struct claim {
	struct queue *q;
	const char *group;
	int part, flags;
	int fd;                 /* the offset file, locked */
	char path[PATH_MAX + 220];
	struct gstate gs;
	uint64_t start;         /* committed offset when claimed */
	int64_t now;            /* ms since the epoch when claimed */
	int dirty;              /* gs changed and is not yet written */
	int failed;             /* a write failed: gs is not what is on disk */
	struct reader r;        /* new messages, from gs.next */
	struct reader rr;       /* a run due again */
	int rr_open;
	uint64_t rr_want, rr_hi;
	uint16_t rr_attempt;
	uint64_t scan;          /* runs below this were already taken up */
	struct took *t;
	size_t nt, ct;
};

/* Why a message failed, in words (for notices and dead-letter headers). */
static void why_text(uint32_t why, char *out, size_t n)
{
	switch (why & 0xff) {
	case MQ_WHY_EXIT: strfmt(out, n, "exit status %u", why >> 8); break;
	case MQ_WHY_SIGNAL: strfmt(out, n, "killed by signal %u", why >> 8); break;
	case MQ_WHY_TIMEOUT: strfmt(out, n, "timed out"); break;
	case MQ_WHY_NACK: strfmt(out, n, "nack"); break;
	case MQ_WHY_EXPIRED: strfmt(out, n, "lease expired"); break;
	default: strfmt(out, n, "failed");
	}
}

/* Delay before the retry that follows failed attempt `attempt`. */
static int64_t backoff_ms(const struct qconf *c, unsigned attempt)
{
	int64_t i = attempt < 1 ? 0 : (int64_t)attempt - 1;
	return c->backoff[i < c->nbackoff ? i : c->nbackoff - 1];
}

/*
 * Move offsets [lo, lo + n) of the claimed partition to QUEUE.dlq, each
 * with its key, tag, headers and body, plus headers saying from where,
 * after how many attempts and why.  The dead letters are synced before
 * the caller marks the offsets done, so a crash in between buries them
 * twice, never loses them.
 */
static int grp_bury(struct claim *c, uint64_t lo, uint64_t n, unsigned attempt, uint32_t why,
                    struct mq_err *e)
{
	struct queue *q = c->q, *dq = NULL;
	char name[MQ_NAME_MAX + 8], whys[64], num[32];
	strfmt(name, sizeof name, "%s%s", q->name, MQ_DLQ_SUFFIX);
	if (!name_valid(name))
		return err_set(e, MQ_EX_DATAERR, "%s: cannot bury dead letters: '%s' is not a valid "
		               "queue name", q->name, name);
	if (q_open(q->sp, name, 1, NULL, 0, &dq, e) < 0)
		return -1;
	why_text(why, whys, sizeof whys);
	struct prod pr;
	struct reader r;
	struct rec_msg m;
	struct buf hb = {0};
	int k, rc = 0;
	prod_init(&pr, dq, -1);
	if (rd_open(&r, &q->parts[c->part], lo, e) < 0) {
		rc = -1;
		goto out;
	}
	while (rc == 0 && (k = rd_next(&r, &m, e)) == 1 && m.offset < lo + n) {
		/* the message's own headers, then ours */
		struct buf pairs = {0};
		uint64_t have = rec_hdr_copy(&m, "", &pairs);
		rec_hdr_pair(&pairs, "mq-dlq-queue", q->name, strlen(q->name));
		rec_hdr_pair(&pairs, "mq-dlq-group", c->group, strlen(c->group));
		strfmt(num, sizeof num, "%d", c->part);
		rec_hdr_pair(&pairs, "mq-dlq-partition", num, strlen(num));
		strfmt(num, sizeof num, "%" PRIu64, m.offset);
		rec_hdr_pair(&pairs, "mq-dlq-offset", num, strlen(num));
		strfmt(num, sizeof num, "%u", attempt);
		rec_hdr_pair(&pairs, "mq-dlq-attempts", num, strlen(num));
		rec_hdr_pair(&pairs, "mq-dlq-reason", whys, strlen(whys));
		strfmt(num, sizeof num, "%" PRId64, m.ts);
		rec_hdr_pair(&pairs, "mq-dlq-timestamp", num, strlen(num));
		unsigned char tmp[10];
		hb.len = 0;
		buf_add(&hb, tmp, varint_put(tmp, have + 7));
		buf_add(&hb, pairs.p, pairs.len);
		buf_free(&pairs);
		struct rec_msg d = m;
		d.hdrs = (const unsigned char *)hb.p;
		d.hlen = hb.len;
		d.ts = now_ms();
		if (prod_add(&pr, &d, e) < 0)
			rc = -1;
	}
	if (rc == 0 && k < 0)
		rc = -1;
	rd_close(&r);
	if (rc == 0)
		rc = prod_flush(&pr, 1, e);
out:
	prod_free(&pr);
	buf_free(&hb);
	q_close(dq);
	return rc;
}

/*
 * Offsets [lo, lo + n), delivered as attempt `attempt`, failed (base: when;
 * delay_ms < 0: the queue's backoff).  They wait for their retry, or are
 * buried after the last one.
 */
static int grp_failed(struct claim *c, uint64_t lo, uint32_t n, unsigned attempt, uint32_t why,
                      int64_t base, int64_t delay_ms, struct mq_err *e)
{
	const struct qconf *conf = &c->q->conf;
	c->dirty = 1;
	if ((int64_t)attempt > conf->retries) {
		if (grp_bury(c, lo, n, attempt, why, e) < 0)
			return -1;
		char w[64];
		why_text(why, w, sizeof w);
		sp_notice(c->q->sp, "%s/%d: group '%s': offsets %" PRIu64 "-%" PRIu64 " failed %u "
		          "times (last: %s); moved to %s%s", c->q->name, c->part, c->group, lo,
		          lo + n - 1, attempt, w, c->q->name, MQ_DLQ_SUFFIX);
		gs_done(&c->gs, lo, n);
		return 0;
	}
	struct gent g = {lo, n, 0, why, (uint16_t)(attempt + 1), GE_WAITING,
	                 base + (delay_ms >= 0 ? delay_ms : backoff_ms(conf, attempt))};
	gs_set(&c->gs, &g);
	return 0;
}

/* Write the state if it changed (synced for fsync batch and always, and
 * whenever sync asks even in lower modes' absence of a choice). */
static int grp_save(struct claim *c, int sync, struct mq_err *e)
{
	if (c->r.p && c->nt == 0 && c->r.want > c->gs.next) /* passed (tags, gaps) */
		c->gs.next = c->r.want, c->dirty = 1;
	if (c->failed) /* never write again what failed: the next claim rereads */
		return err_set(e, MQ_EX_IOERR, "%s/%d: group '%s': an earlier write of its offsets "
		               "failed", c->q->name, c->part, c->group);
	if (!c->dirty)
		return 0;
	gs_norm(&c->gs);
	if (gs_write(c->fd, c->path, &c->gs, sync && c->q->conf.fsync >= MQ_FSYNC_BATCH, e) < 0) {
		c->failed = 1;
		return -1;
	}
	c->dirty = 0;
	return 0;
}

/*
 * Claim partition part of group g: lock its offset file (waiting unless
 * CL_NONBLOCK), read the state, turn expired leases into retries (or
 * dead letters), and open a reader at the first new offset (unless
 * CL_NOREAD).  Returns 1 with the claim, 0 if another consumer holds it
 * (CL_NONBLOCK), -1 on error.
 */
static int grp_claim(struct queue *q, const char *g, int part, int flags, struct claim *c,
                     struct mq_err *e)
{
	memset(c, 0, sizeof *c);
	c->q = q;
	c->group = g;
	c->part = part;
	c->flags = flags;
	c->now = now_ms();
	grp_path(q, g, part, c->path, sizeof c->path);
	c->fd = -1;
	if ((flags & CL_NOCREATE) && file_size(c->path) < 0)
		return err_set(e, MQ_EX_NOINPUT, "group '%s' never read partition %d", g, part);
	if (grp_open(q, g, part, 1, &c->fd, e) < 0)
		return -1;
	if (dur_lock(c->fd, LOCK_EX | (flags & CL_NONBLOCK ? LOCK_NB : 0), c->path, e) < 0) {
		dur_close(&c->fd);
		return e->code == MQ_EX_TEMPFAIL && (flags & CL_NONBLOCK) ? 0 : -1;
	}
	if (gs_read(c->fd, c->path, &c->gs, e) < 0)
		goto fail;
	c->start = c->gs.off;
	for (size_t i = 0; i < c->gs.n; i++) {
		struct gent *r = &c->gs.e[i];
		if (r->kind == GE_RUNNING) { /* its consumer died (we hold the lock): again, now */
			r->kind = GE_WAITING;
			r->until = 0;
			r->attempt++;
			c->dirty = 1;
		}
	}
	for (size_t i = 0; i < c->gs.n; i++) {
		struct gent x = c->gs.e[i];
		if (x.kind != GE_LEASED || x.until > c->now)
			continue;
		if (grp_failed(c, x.lo, x.n, x.attempt, MQ_WHY_EXPIRED, x.until, -1, e) < 0)
			goto fail;
		i = (size_t)-1; /* the entries changed: look again from the start */
	}
	if (flags & CL_NOREAD)
		return 1;
	if (rd_open(&c->r, &q->parts[part], c->gs.next, e) < 0)
		goto fail;
	uint64_t end = c->r.h.next, first = c->r.nsegs ? c->r.segs[0] : end;
	if (c->gs.next > end) {
		sp_notice(q->sp, "%s/%d: group '%s' had committed offset %" PRIu64 " past the end (%"
		          PRIu64 "), probably lost with unsynced data (fsync interval/never); "
		          "continuing from the end", q->name, part, g, c->gs.next, end);
		c->r.want = end;
		gs_clear(&c->gs, end, UINT64_MAX - end);
		c->gs.next = end;
		c->dirty = 1;
	}
	if (c->gs.n && c->gs.e[0].lo < first) { /* removed by retention, purge or repair */
		gs_clear(&c->gs, 0, first);
		c->dirty = 1;
	}
	gs_norm(&c->gs);
	return 1;
fail:
	gs_free(&c->gs);
	dur_close(&c->fd);
	return -1;
}

static void took_add(struct claim *c, uint64_t off, uint16_t attempt)
{
	struct took *t = c->nt ? &c->t[c->nt - 1] : NULL;
	if (t && t->lo + t->n == off && t->attempt == attempt && t->n < UINT32_MAX) {
		t->n++;
		return;
	}
	if (c->nt == c->ct) {
		c->ct = c->ct ? c->ct * 2 : 8;
		c->t = realloc(c->t, c->ct * sizeof *c->t);
		if (!c->t)
			abort();
	}
	c->t[c->nt++] = (struct took){off, 1, attempt};
}

/* Hand what was taken to a run that settles later: it is marked
 * running (so a save does not count it done), and the claim forgets it. */
static void grp_took_detach(struct claim *c, struct took **t, size_t *n)
{
	for (size_t i = 0; i < c->nt; i++) {
		struct gent g = {c->t[i].lo, c->t[i].n, 0, 0, c->t[i].attempt, GE_RUNNING, 0};
		gs_set(&c->gs, &g);
	}
	c->dirty = 1;
	*t = c->t;
	*n = c->nt;
	c->t = NULL;
	c->nt = c->ct = 0;
}

/* Take a run's offsets back, to settle them (done or failed). */
static void grp_took_attach(struct claim *c, struct took *t, size_t n)
{
	free(c->t);
	c->t = t;
	c->nt = c->ct = n;
}

/*
 * The next message for this consumer: first runs due again (retries and
 * expired leases), in offset order, then new messages.  With CL_ORDERED
 * a run still waiting or leased stops the partition: nothing after it is
 * delivered until it is done.  Returns 1 with *m (valid until the next
 * call) and its attempt, 0 when there is nothing, -1 on error.
 */
static int grp_take(struct claim *c, struct rec_msg *m, unsigned *attempt, struct mq_err *e)
{
	for (;;) {
		if (c->rr_open) {
			int k = rd_next(&c->rr, m, e);
			if (k < 0)
				return -1;
			uint64_t upto = k == 1 && m->offset < c->rr_hi ? m->offset : c->rr_hi;
			if (upto > c->rr_want) { /* gone meanwhile (retention): done */
				gs_done(&c->gs, c->rr_want, upto - c->rr_want);
				c->dirty = 1;
			}
			if (k == 1 && m->offset < c->rr_hi) {
				c->rr_want = m->offset + 1;
				*attempt = c->rr_attempt;
				took_add(c, m->offset, c->rr_attempt);
				return 1;
			}
			rd_close(&c->rr);
			c->rr_open = 0;
		}
		struct gent *due = NULL;
		for (size_t i = 0; i < c->gs.n && !due; i++) {
			struct gent *g = &c->gs.e[i];
			if (g->lo + g->n <= c->scan)
				continue;
			if (g->kind == GE_WAITING && g->until <= c->now)
				due = g;
			else if (c->flags & CL_ORDERED)
				return 0;
		}
		if (!due)
			break;
		c->rr_want = due->lo > c->scan ? due->lo : c->scan;
		c->rr_hi = c->scan = due->lo + due->n;
		c->rr_attempt = due->attempt;
		if (rd_open(&c->rr, &c->q->parts[c->part], c->rr_want, e) < 0)
			return -1;
		c->rr_open = 1;
	}
	int k = rd_next(&c->r, m, e);
	if (k == 1) {
		*attempt = 1;
		took_add(c, m->offset, 1);
	}
	return k;
}

/* Settle what was taken since the last settle: done, leased until
 * lease_until (ms since the epoch) under a new lease id, or failed. */
static int grp_settle_done(struct claim *c, struct mq_err *e)
{
	for (size_t i = 0; i < c->nt; i++)
		gs_done(&c->gs, c->t[i].lo, c->t[i].n);
	c->dirty |= c->nt > 0;
	c->nt = 0;
	return grp_save(c, 1, e);
}

static int grp_settle_lease(struct claim *c, int64_t lease_until, uint32_t *lease,
                            struct mq_err *e)
{
	*lease = ++c->gs.lease;
	for (size_t i = 0; i < c->nt; i++) {
		struct gent g = {c->t[i].lo, c->t[i].n, *lease, 0, c->t[i].attempt, GE_LEASED,
		                 lease_until};
		gs_set(&c->gs, &g);
	}
	c->dirty = 1;
	c->nt = 0;
	/* A lease is not synced: after a power loss the message comes back
	 * sooner, which at-least-once allows; acks and failures are synced. */
	return grp_save(c, 0, e);
}

static int grp_settle_failed(struct claim *c, uint32_t why, struct mq_err *e)
{
	for (size_t i = 0; i < c->nt; i++)
		if (grp_failed(c, c->t[i].lo, c->t[i].n, c->t[i].attempt, why, now_ms(), -1, e) < 0)
			return -1;
	c->nt = 0;
	return grp_save(c, 1, e);
}

/* Forget what was taken since the last settle, as if it had only been
 * looked at: grp_release() records nothing of it. */
static void grp_untake(struct claim *c)
{
	c->nt = 0;
	if (c->r.p) { /* (grp_save() would take its position as passed) */
		rd_close(&c->r);
		c->r.p = NULL;
	}
}

/* Drop the claim: write the state if it changed, say once if retention
 * removed offsets the group never read, and run retention if the
 * committed offset moved. */
static int grp_release(struct claim *c, struct mq_err *e)
{
	struct queue *q = c->q;
	struct reader *r = &c->r;
	for (size_t i = 0; i < c->nt; i++) { /* taken, never settled: due again now */
		struct gent g = {c->t[i].lo, c->t[i].n, 0, 0, c->t[i].attempt, GE_WAITING, 0};
		gs_set(&c->gs, &g);
		c->dirty = 1;
	}
	c->nt = 0;
	int rc = c->fd >= 0 && !c->failed ? grp_save(c, 1, e) : 0;
	if (r->p && r->skip_to > c->start)
		sp_notice(q->sp, "%s/%d: offsets %" PRIu64 "-%" PRIu64 " were removed (retention, purge "
		          "or repair) before group '%s' read them", q->name, c->part, r->skip_from,
		          r->skip_to - 1, c->group);
	int drained = c->gs.off > c->start && (!r->p || c->gs.off >= r->h.next || r->nsegs > 1);
	if (r->p)
		rd_close(r);
	if (c->rr_open)
		rd_close(&c->rr);
	dur_close(&c->fd);
	gs_free(&c->gs);
	free(c->t);
	c->t = NULL;
	struct mq_err ignored; /* housekeeping: its failure fails no consumer */
	if (drained)
		grp_retain(q, c->part, &ignored);
	return rc;
}

/*
 * How grp_deliver() hands messages out.  emit() sees each message as it
 * is taken (valid only during the call) with its attempt and the lease it
 * will carry (0: none).  With `after` the messages are committed only
 * once out() has handed them on (at-least-once); otherwise they are
 * leased, or committed, first and out() runs after that (at-most-once
 * without a lease).  drop() discards what emit() kept when the first
 * settle failed, so nothing unrecorded is handed out.
 */
struct deliver {
	const char *group;
	uint64_t want;             /* messages at most; 0: all there are */
	int64_t lease_ms;          /* >= 0: lease them for this long */
	int after;                 /* commit after out() (no lease) */
	int nonblock;              /* a busy partition is skipped, not waited for */
	const struct tagset *tags;
	/* nonzero: take no more after this one */
	int (*emit)(void *ctx, int part, const struct rec_msg *m, unsigned attempt, uint32_t lease);
	int (*out)(void *ctx, struct mq_err *e);
	void (*drop)(void *ctx);
	void *ctx;
};

/* Deliver up to d->want messages of partition part to the group under a
 * claim.  Returns the number delivered (*busy set when the partition was
 * locked and d->nonblock said not to wait), or -1. */
static int64_t grp_deliver(struct queue *q, int part, const struct deliver *d, int *busy,
                           struct mq_err *e)
{
	struct claim c;
	int64_t got = 0;
	int k = grp_claim(q, d->group, part, d->nonblock ? CL_NONBLOCK : 0, &c, e);
	*busy = k == 0;
	if (k <= 0)
		return k;
	c.r.tags = d->tags;
	uint32_t lease = d->lease_ms >= 0 ? c.gs.lease + 1 : 0; /* what the settle will assign */
	unsigned attempt;
	struct rec_msg m;
	int full = 0;
	while (!full && (d->want == 0 || (uint64_t)got < d->want) &&
	       (k = grp_take(&c, &m, &attempt, e)) == 1) {
		full = d->emit(d->ctx, part, &m, attempt, lease);
		got++;
	}
	int rc = k < 0 ? -1 : 0;
	struct mq_err ce;
	if (got > 0 && rc == 0) {
		if (!d->after && (lease ? grp_settle_lease(&c, now_ms() + d->lease_ms, &lease, &ce)
		                        : grp_settle_done(&c, &ce)) < 0) {
			d->drop(d->ctx); /* not recorded: deliver nothing */
			rc = (*e = ce, -1);
		} else if (d->out(d->ctx, e) < 0) {
			rc = -1;
		} else if (d->after && grp_settle_done(&c, &ce) < 0) {
			rc = (*e = ce, -1);
		}
	}
	if (grp_release(&c, &ce) < 0 && rc == 0)
		rc = (*e = ce, -1);
	return rc < 0 ? -1 : got;
}

/* m's header block without the headers whose names start with prefix. */
static void hdrs_without(const struct rec_msg *m, const char *prefix, struct buf *b)
{
	unsigned char tmp[10];
	struct buf pairs = {0};
	uint64_t kept = rec_hdr_copy(m, prefix, &pairs);
	b->len = 0;
	if (kept) {
		buf_add(b, tmp, varint_put(tmp, kept));
		buf_add(b, pairs.p, pairs.len);
	}
	buf_free(&pairs);
}

/*
 * Move up to want messages (0: all) of src, consumed as group g, into
 * dst, without the mq-dlq-* headers a burial added: dead letters going
 * back.  Each partition's messages are committed in src only once dst
 * has them durable, so a crash in between moves them again
 * (at-least-once), never loses them.  With nonblock a partition another
 * consumer of g holds is skipped and counted in *busy.
 */
static int q_move(struct queue *src, struct queue *dst, const char *g, uint64_t want,
                  int nonblock, uint64_t *moved, int *busy, struct mq_err *e)
{
	struct prod pr;
	struct buf hb = {0};
	int rc = 0;
	*moved = 0;
	if (busy)
		*busy = 0;
	prod_init(&pr, dst, -1);
	for (int i = 0; i < src->nparts && rc == 0 && (want == 0 || *moved < want); i++) {
		struct claim c;
		struct rec_msg m;
		unsigned attempt;
		int k = grp_claim(src, g, i, nonblock ? CL_NONBLOCK : 0, &c, e);
		if (k < 0) {
			rc = -1;
			break;
		}
		if (k == 0) {
			++*busy;
			continue;
		}
		while ((want == 0 || *moved < want) && (k = grp_take(&c, &m, &attempt, e)) == 1) {
			struct rec_msg d = m;
			hdrs_without(&m, "mq-dlq-", &hb);
			d.hdrs = (const unsigned char *)hb.p;
			d.hlen = hb.len;
			d.ts = now_ms();
			if (prod_add(&pr, &d, e) < 0) {
				k = -1;
				break;
			}
			++*moved;
		}
		if (k < 0 || prod_flush(&pr, 1, e) < 0 || grp_settle_done(&c, e) < 0)
			rc = -1;
		struct mq_err re;
		if (grp_release(&c, &re) < 0 && rc == 0)
			rc = (*e = re, -1);
	}
	prod_free(&pr);
	buf_free(&hb);
	return rc;
}

/*
 * mq pipe's steps.  A step takes a run of source messages under the
 * group's claim of one partition, stores what the command made of them
 * as the messages of a transaction of the destination queue, kept in
 * DEST/txn/pipe:SOURCE:GROUP:PART, and commits that transaction and the
 * group's offsets together: the transaction's decision names the source
 * offsets the step consumed, so after a crash pipe_open() finishes a
 * decided step (the rest of its messages, then the offsets), and an
 * undecided one is forgotten and done again.
 */
#define MQ_PIPE_REWIND (16u << 20) /* a step file starts over past this */

static void pipe_txn_name(const struct claim *c, char *out, size_t n)
{
	strfmt(out, n, "pipe:%s:%s:%d", c->q->name, c->group, c->part);
}

/* The source offsets of a decided step are done (idempotent). */
static int pipe_settle(struct claim *c, const struct txn *t, struct mq_err *e)
{
	c->nt = 0; /* what was taken is exactly [src_lo, src_hi) */
	if (t->src_hi > t->src_lo)
		gs_done(&c->gs, t->src_lo, t->src_hi - t->src_lo);
	c->dirty = 1;
	return grp_save(c, 1, e);
}

/* Open the claimed partition's step file in dst, finishing a step that
 * was decided when its pipe died.  t stays open (and locked). */
static int pipe_open(struct claim *c, struct queue *dst, struct txn *t, struct mq_err *e)
{
	char name[2 * MQ_NAME_MAX + 32];
	pipe_txn_name(c, name, sizeof name);
	if (txn_open(dst, name, TX_CREATE, t, e) < 0)
		return -1;
	if (!t->valid || t->state != MQ_TXN_COMMITTING)
		return 0;
	if (!(t->flags & MQ_TXN_PIPE) || t->src_part != (uint32_t)c->part)
		return err_set(e, MQ_EX_DATAERR, "'%s' is not a step of this pipe", t->path);
	if (txn_move(t, e) < 0 || pipe_settle(c, t, e) < 0)
		return -1;
	if (c->r.p && c->r.want < c->gs.next) { /* the claim's reader: past what is done now */
		rd_close(&c->r);
		if (rd_open(&c->r, &c->q->parts[c->part], c->gs.next, e) < 0)
			return -1;
	}
	return txn_end(t, MQ_TXN_COMMITTED, e);
}

/* Start the next step: its messages go after the last step's, or, past
 * MQ_PIPE_REWIND, from the start once the last step's end is synced (a
 * decided step's messages are never overwritten while it may resume). */
static int pipe_begin(struct txn *t, struct mq_err *e)
{
	uint64_t at = t->data_end;
	if (at >= MQ_PIPE_REWIND || at < 2 * (uint64_t)t->slot) {
		if (t->valid && t->q->conf.fsync >= MQ_FSYNC_BATCH && dur_datasync(t->fd, t->path, e) < 0)
			return -1;
		at = 2 * (uint64_t)t->slot;
	}
	txn_reset(t);
	t->data_start = t->data_end = at;
	t->flags = MQ_TXN_PIPE;
	return 0;
}

/* Commit a step whose messages were added (txn_add): sync them, decide
 * (txn_move), then mark source offsets [lo, hi) done, then end it. */
static int pipe_commit(struct claim *c, struct txn *t, uint64_t lo, uint64_t hi, struct mq_err *e)
{
	t->src_part = (uint32_t)c->part;
	t->src_lo = lo;
	t->src_hi = hi;
	if (t->data_end == t->data_start) /* nothing for dst: only the offsets */
		return pipe_settle(c, t, e);
	if (txn_seal(t, 0, e) < 0 || txn_move(t, e) < 0 || pipe_settle(c, t, e) < 0)
		return -1;
	return txn_end(t, MQ_TXN_COMMITTED, e);
}

/*
 * A step's source messages: up to want of them under the claim, each
 * handed to emit() (nonzero: take no more), their offsets summed up in
 * *pt.  mq pipe through a server takes a step twice, letting the claim
 * go while the client runs its filter: the commit goes on only if the
 * second take (pipe_retake) is the same as the first, that is, nothing
 * consumed, acknowledged or rewound those offsets in between.
 */
struct ptake {
	uint64_t n, lo, hi;
	uint32_t sum;
};

static int64_t pipe_take(struct claim *c, uint64_t want,
                         int (*emit)(void *ctx, int part, const struct rec_msg *m,
                                     unsigned attempt), void *ctx, struct ptake *pt,
                         struct mq_err *e)
{
	struct rec_msg m;
	unsigned attempt;
	int k = 0, full = 0;
	memset(pt, 0, sizeof *pt);
	while (!full && pt->n < want && (k = grp_take(c, &m, &attempt, e)) == 1) {
		unsigned char b[8];
		le64_put(b, m.offset);
		pt->sum = (uint32_t)crc32(pt->sum, b, 8);
		if (pt->n++ == 0)
			pt->lo = m.offset;
		pt->hi = m.offset + 1;
		if (emit)
			full = emit(ctx, c->part, &m, attempt);
	}
	return k < 0 ? -1 : (int64_t)pt->n;
}

/* Take the step *was describes again: 1 if it is the same, 0 if the
 * group's position moved (what was taken is let go), -1 on error. */
static int pipe_retake(struct claim *c, const struct ptake *was, struct mq_err *e)
{
	struct ptake now;
	if (pipe_take(c, was->n, NULL, NULL, &now, e) < 0)
		return -1;
	if (now.n == was->n && now.lo == was->lo && now.hi == was->hi && now.sum == was->sum)
		return 1;
	grp_untake(c);
	return 0;
}

/* A receipt names one leased message: GROUP:PARTITION:OFFSET:LEASE. */
struct receipt {
	char group[MQ_NAME_MAX + 1];
	int part;
	uint64_t off;
	uint32_t lease;
	int result;            /* set by grp_answer() */
};

enum { RC_OK = 1, RC_ALREADY, RC_STALE, RC_UNKNOWN };

static int receipt_parse(const char *s, struct receipt *r)
{
	const char *c1 = strchr(s, ':');
	char *end;
	if (!c1 || c1 == s || (size_t)(c1 - s) > MQ_NAME_MAX)
		return -1;
	memcpy(r->group, s, (size_t)(c1 - s));
	r->group[c1 - s] = 0;
	if (!name_valid(r->group) || !isdigit((unsigned char)c1[1]))
		return -1;
	errno = 0;
	unsigned long p = strtoul(c1 + 1, &end, 10);
	if (*end != ':' || p >= MQ_MAX_PARTITIONS || !isdigit((unsigned char)end[1]))
		return -1;
	unsigned long long o = strtoull(end + 1, &end, 10);
	if (*end != ':' || errno || !isdigit((unsigned char)end[1]))
		return -1;
	unsigned long long l = strtoull(end + 1, &end, 10);
	if (*end || errno || l > UINT32_MAX)
		return -1;
	r->part = (int)p;
	r->off = o;
	r->lease = (uint32_t)l;
	r->result = 0;
	return 0;
}

/*
 * Answer the receipts rs[0..n) that name group g and partition part:
 * ack (nack 0: the message is done) or nack (nack is why it failed, an
 * MQ_WHY_* code, MQ_WHY_NACK for mq nack: retried after delay_ms,
 * or the queue's backoff when delay_ms < 0).  Each gets a result: RC_OK;
 * RC_ALREADY (done before: acked, or its lease expired and another
 * consumer finished it); RC_STALE (its lease expired and the message is
 * waiting or leased to someone else); RC_UNKNOWN (never delivered).  One
 * synced write covers them all.
 */
static int grp_answer(struct queue *q, const char *g, int part, struct receipt *rs, size_t n,
                      int nack, int64_t delay_ms, int flags, struct mq_err *e)
{
	struct claim c;
	int k = grp_claim(q, g, part, CL_NOREAD | CL_NOCREATE | flags, &c, e);
	if (k == 0)
		return err_set(e, MQ_EX_TEMPFAIL, "group '%s' partition %d is locked by a consumer; "
		               "try again", g, part);
	if (k < 0) {
		if (e->code != MQ_EX_NOINPUT)
			return -1;
		for (size_t i = 0; i < n; i++) /* no such group: nothing was delivered to it */
			rs[i].result = RC_UNKNOWN;
		return 0;
	}
	int rc = 0;
	for (size_t i = 0; i < n && rc == 0; i++) {
		struct receipt *r = &rs[i];
		struct gent *x = gs_find(&c.gs, r->off);
		if (x && x->kind == GE_LEASED && x->lease == r->lease) {
			r->result = RC_OK;
			if (nack)
				rc = grp_failed(&c, r->off, 1, x->attempt, (uint32_t)nack, now_ms(), delay_ms, e);
			else
				gs_done(&c.gs, r->off, 1);
			c.dirty = 1;
		} else if (!x && r->off < c.gs.next) {
			r->result = RC_ALREADY;
		} else {
			r->result = x ? RC_STALE : RC_UNKNOWN;
		}
	}
	if (grp_release(&c, e) < 0)
		rc = -1;
	return rc;
}

static int cmp_receipt(const void *x, const void *y)
{
	const struct receipt *a = *(struct receipt *const *)x, *b = *(struct receipt *const *)y;
	int c = strcmp(a->group, b->group);
	return c ? c : (a->part > b->part) - (a->part < b->part);
}

/* Answer receipts of any groups and partitions of q: one claim (one
 * synced write) per group and partition.  A receipt naming a partition
 * the queue lacks stops it with 65.  With flags CL_NONBLOCK a partition
 * whose group lock is held fails with 75 instead of waiting. */
static int grp_answer_all(struct queue *q, struct receipt *rs, size_t nr, int nack,
                          int64_t delay_ms, int flags, struct mq_err *e)
{
	struct receipt **by = malloc((nr ? nr : 1) * sizeof *by), *run = NULL;
	int rc = 0;
	if (!by)
		abort();
	for (size_t i = 0; i < nr; i++)
		by[i] = &rs[i];
	qsort(by, nr, sizeof *by, cmp_receipt);
	for (size_t i = 0, j; i < nr && rc == 0; i = j) {
		for (j = i + 1; j < nr && !cmp_receipt(&by[i], &by[j]);)
			j++;
		if (by[i]->part >= q->nparts) {
			rc = err_set(e, MQ_EX_DATAERR, "receipt '%s:%d:...' names partition %d; the queue "
			             "has %d", by[i]->group, by[i]->part, by[i]->part, q->nparts);
			break;
		}
		/* grp_answer takes an array: gather this run's receipts */
		if (!(run = realloc(run, (j - i) * sizeof *run)))
			abort();
		for (size_t k = i; k < j; k++)
			run[k - i] = *by[k];
		rc = grp_answer(q, by[i]->group, by[i]->part, run, j - i, nack, delay_ms, flags, e);
		for (size_t k = i; k < j && rc == 0; k++)
			by[k]->result = run[k - i].result;
	}
	free(run);
	free(by);
	return rc;
}

/* ===================================================================
 * 12. Wire protocol: requests, escapes, message frames, the client
 *
 * What `mq serve` speaks (man/mq-protocol.7).  A request is one line of
 * tokens separated by spaces: a verb, positional arguments, then
 * NAME=VALUE options.  In a token, bytes outside '!'..'~' and the
 * characters '%' and '=' are written %XX, so any key, tag or header fits.
 * A PUT line is followed by its message frames, "LEN[ key=K][ tag=T]\n",
 * LEN bytes and "\n".  An answer is zero or more data lines (a MSG line
 * is followed by its body like a frame) and then "OK ..." or
 * "ERR CODE MESSAGE", CODE being the exit status of the local command.
 * Pure functions, and the blocking connection the CLI uses as a client.
 * Uses layers 1-4.
 * =================================================================== */

/* One token of a request: an option (name set) or a positional value. */
struct ptok {
	char *name;  /* NULL for a positional token */
	char *val;   /* decoded, NUL-terminated */
	size_t len;  /* bytes in val (a decoded value may hold NULs) */
};

struct preq {
	struct ptok *t; /* t[0] is the verb */
	int n, cap;
};

static void preq_free(struct preq *r)
{
	free(r->t);
	memset(r, 0, sizeof *r);
}

static int unhex(int c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
	       : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Decode %XX escapes in s[0..n) in place and NUL-terminate; returns the
 * decoded length, or -1 for a malformed escape. */
static ssize_t proto_unesc(char *s, size_t n)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i++) {
		int h, l;
		if (s[i] != '%') {
			s[o++] = s[i];
			continue;
		}
		if (n - i < 3 || (h = unhex(s[i + 1])) < 0 || (l = unhex(s[i + 2])) < 0)
			return -1;
		s[o++] = (char)(h * 16 + l);
		i += 2;
	}
	s[o] = 0;
	return (ssize_t)o;
}

/* Append p[0..n) to b as a token value. */
static void proto_esc(struct buf *b, const void *p, size_t n)
{
	static const char hex[] = "0123456789ABCDEF";
	const unsigned char *s = p;
	size_t run = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = s[i];
		if (c > ' ' && c < 0x7f && c != '%' && c != '=')
			continue;
		buf_add(b, s + run, i - run);
		char x[3] = {'%', hex[c >> 4], hex[c & 15]};
		buf_add(b, x, 3);
		run = i + 1;
	}
	buf_add(b, s + run, n - run);
}

/* Append " name=VALUE" (VALUE escaped) to b. */
static void proto_opt(struct buf *b, const char *name, const void *val, size_t n)
{
	buf_printf(b, " %s=", name);
	proto_esc(b, val, n);
}

/* Split a request line (NUL-terminated, newline removed) into r, in
 * place.  Returns 0, or -1 (64) for a malformed escape. */
static int proto_parse(char *line, struct preq *r, struct mq_err *e)
{
	r->n = 0;
	for (char *p = line, *next; *p; p = next) {
		char *end = strchr(p, ' ');
		next = end ? end + 1 : p + strlen(p);
		if (end)
			*end = 0;
		if (p == end)
			continue;
		if (r->n == r->cap) {
			r->cap = r->cap ? r->cap * 2 : 16;
			if (!(r->t = realloc(r->t, (size_t)r->cap * sizeof *r->t)))
				abort();
		}
		struct ptok *t = &r->t[r->n++];
		char *eq = r->n > 1 ? strchr(p, '=') : NULL; /* the verb is never an option */
		t->name = NULL;
		t->val = p;
		if (eq) {
			*eq = 0;
			t->name = p;
			t->val = eq + 1;
			if (proto_unesc(p, (size_t)(eq - p)) < 0)
				return err_set(e, MQ_EX_USAGE, "bad %%XX escape in '%s'", p);
		}
		ssize_t k = proto_unesc(t->val, strlen(t->val));
		if (k < 0)
			return err_set(e, MQ_EX_USAGE, "bad %%XX escape in '%s'", t->val);
		t->len = (size_t)k;
	}
	return r->n ? 0 : err_set(e, MQ_EX_USAGE, "empty request");
}

/* The last value of option name, or NULL. */
static const char *preq_opt(const struct preq *r, const char *name)
{
	for (int i = r->n - 1; i > 0; i--)
		if (r->t[i].name && !strcmp(r->t[i].name, name))
			return r->t[i].val;
	return NULL;
}

/* Positional argument i (0 is the first after the verb), or NULL. */
static const char *preq_pos(const struct preq *r, int i)
{
	for (int k = 1; k < r->n; k++)
		if (!r->t[k].name && i-- == 0)
			return r->t[k].val;
	return NULL;
}

static int preq_npos(const struct preq *r)
{
	int n = 0;
	for (int k = 1; k < r->n; k++)
		n += !r->t[k].name;
	return n;
}

/* A delivered message as an answer line and body:
 * MSG PARTITION OFFSET TIMESTAMP ATTEMPT LEASE LEN [key=K] [tag=T] [h.NAME=V]... */
static void proto_msg(struct buf *b, int part, const struct rec_msg *m, unsigned attempt,
                      uint32_t lease)
{
	const unsigned char *p = m->hdrs, *end = m->hdrs + m->hlen, *hn, *hv;
	uint64_t left = 0;
	size_t nl, vl;
	buf_printf(b, "MSG %d %" PRIu64 " %" PRId64 " %u %" PRIu32 " %zu", part, m->offset, m->ts,
	           attempt, lease, m->blen);
	if (m->has_key)
		proto_opt(b, "key", m->key, m->klen);
	if (m->has_tag)
		proto_opt(b, "tag", m->tag, m->tlen);
	if (m->hlen)
		p += varint_get(p, end, &left);
	while (rec_hdr_next(&p, end, &left, &hn, &nl, &hv, &vl)) {
		buf_adds(b, " h.");
		proto_esc(b, hn, nl);
		buf_add(b, "=", 1);
		proto_esc(b, hv, vl);
	}
	buf_add(b, "\n", 1);
	buf_add(b, m->body, m->blen);
	buf_add(b, "\n", 1);
}

/* Split "HOST:PORT", "[V6]:PORT", "HOST" or ":PORT" (the port defaults to
 * MQ_DEFAULT_PORT, the host to the loopback address). */
static int net_split(const char *addr, const char *defport, char *host, size_t hn, char *port,
                     size_t pn, struct mq_err *e)
{
	const char *colon = strrchr(addr, ':'), *h = addr;
	size_t hl = colon ? (size_t)(colon - addr) : strlen(addr);
	if (*addr == '[') {
		const char *rb = strchr(addr, ']');
		if (!rb || (rb[1] && rb[1] != ':'))
			return err_set(e, MQ_EX_USAGE, "bad address '%s' (use HOST:PORT or [V6]:PORT)", addr);
		h = addr + 1;
		hl = (size_t)(rb - h);
		colon = rb[1] ? rb + 1 : NULL;
	} else if (colon && strchr(addr, ':') != colon) { /* a bare IPv6 address */
		colon = NULL;
		hl = strlen(addr);
	}
	if (hl >= hn || (colon && strlen(colon + 1) >= pn) || (colon && !colon[1]))
		return err_set(e, MQ_EX_USAGE, "bad address '%s' (use HOST:PORT or [V6]:PORT)", addr);
	strfmt(host, hn, "%.*s", hl ? (int)hl : 9, hl ? h : "127.0.0.1");
	strfmt(port, pn, "%s", colon ? colon + 1 : defport);
	return 0;
}

/* A blocking client connection to mq serve. */
struct rconn {
	int fd;
	struct buf in;   /* received; unread bytes start at pos */
	size_t pos;
	struct buf line; /* the last line read, NUL-terminated */
	char addr[256];
	int broken;      /* a send or receive failed: no answer is coming */
	volatile sig_atomic_t *stop; /* set by a signal: a wait is given up */
	void (*notice)(void *ctx, const char *msg); /* the server's NOTICE lines */
};

/* Connect (to port defport when addr names none); with ms > 0, give up
 * on the connect after ms milliseconds. */
static int rc_open(struct rconn *c, const char *addr, const char *defport, int ms,
                   struct mq_err *e)
{
	char host[256], port[32];
	struct addrinfo hints = {0}, *res = NULL;
	memset(c, 0, sizeof *c);
	c->fd = -1;
	strfmt(c->addr, sizeof c->addr, "%s", addr);
	if (net_split(addr, defport, host, sizeof host, port, sizeof port, e) < 0)
		return -1;
	hints.ai_socktype = SOCK_STREAM;
	int k = getaddrinfo(host, port, &hints, &res);
	if (k)
		return err_set(e, MQ_EX_UNAVAILABLE, "cannot resolve server '%s': %s", addr,
		               gai_strerror(k));
	int sys = 0;
	for (struct addrinfo *ai = res; ai && c->fd < 0; ai = ai->ai_next) {
		c->fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC |
		               (ms > 0 ? SOCK_NONBLOCK : 0), ai->ai_protocol);
		int r = c->fd < 0 ? -1 : connect(c->fd, ai->ai_addr, ai->ai_addrlen);
		if (r < 0 && c->fd >= 0 && ms > 0 && errno == EINPROGRESS) {
			struct pollfd pfd = {c->fd, POLLOUT, 0};
			int err = ETIMEDOUT;
			socklen_t el = sizeof err;
			if (poll(&pfd, 1, ms) == 1)
				getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
			r = err ? -1 : 0;
			errno = err;
		}
		if (r == 0 && ms > 0)
			fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) & ~O_NONBLOCK);
		if (c->fd >= 0 && r < 0) {
			sys = errno;
			close(c->fd);
			c->fd = -1;
		}
	}
	freeaddrinfo(res);
	if (c->fd < 0)
		return err_set(e, MQ_EX_UNAVAILABLE, "cannot connect to server '%s': %s", addr,
		               strerror(sys ? sys : errno));
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	return 0;
}

/* Fail any later send or receive that waits longer than ms. */
static void rc_timeout(struct rconn *c, int ms)
{
	struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
	setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void rc_close(struct rconn *c)
{
	dur_close(&c->fd);
	buf_free(&c->in);
	buf_free(&c->line);
}

static int rc_send(struct rconn *c, const void *p, size_t n, struct mq_err *e)
{
	const char *s = p;
	while (n > 0) {
		ssize_t k = send(c->fd, s, n, MSG_NOSIGNAL);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			c->broken = 1;
			return err_sys(e, MQ_EX_UNAVAILABLE, "cannot send to server '%s'", c->addr);
		}
		s += k;
		n -= (size_t)k;
	}
	return 0;
}

/* Read more bytes; the server closing the connection is 69. */
static int rc_fill(struct rconn *c, struct mq_err *e)
{
	if (c->pos > 0 && c->pos == c->in.len)
		c->pos = c->in.len = 0;
	buf_reserve(&c->in, 65536);
	for (;;) {
		ssize_t k = c->stop && *c->stop ? -1 : recv(c->fd, c->in.p + c->in.len,
		                                            c->in.cap - c->in.len, 0);
		if (c->stop && *c->stop) { /* the signal came before the recv, or during it */
			c->broken = 1;
			return err_set(e, MQ_EX_TEMPFAIL, "interrupted");
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			c->broken = 1;
		if (k < 0)
			return err_sys(e, MQ_EX_UNAVAILABLE, "cannot read from server '%s'", c->addr);
		if (k == 0)
			return err_set(e, MQ_EX_UNAVAILABLE, "server '%s' closed the connection", c->addr);
		c->in.len += (size_t)k;
		return 0;
	}
}

/* Are bytes (a line) waiting, without blocking? */
static int rc_ready(struct rconn *c)
{
	struct pollfd pfd = {c->fd, POLLIN, 0};
	return c->pos < c->in.len || poll(&pfd, 1, 0) > 0;
}

/* The next line of the answer, NUL-terminated without its newline; valid
 * until the next rc_line(). */
static int rc_line(struct rconn *c, char **line, struct mq_err *e)
{
	char *nl;
	while (!(nl = c->in.p ? memchr(c->in.p + c->pos, '\n', c->in.len - c->pos) : NULL)) {
		if (c->in.len - c->pos > MQ_LINE_MAX)
			return err_set(e, MQ_EX_UNAVAILABLE, "server '%s' sent a line over %d bytes",
			               c->addr, MQ_LINE_MAX);
		if (c->pos > 0) { /* keep the partial line at the start */
			memmove(c->in.p, c->in.p + c->pos, c->in.len - c->pos);
			c->in.len -= c->pos;
			c->pos = 0;
		}
		if (rc_fill(c, e) < 0)
			return -1;
	}
	size_t n = (size_t)(nl - (c->in.p + c->pos));
	c->line.len = 0;
	buf_add(&c->line, c->in.p + c->pos, n && nl[-1] == '\r' ? n - 1 : n);
	buf_addc0(&c->line);
	c->pos += n + 1;
	*line = c->line.p;
	return 0;
}

/* The n bytes of a body and its newline; *p is valid until the next read. */
static int rc_body(struct rconn *c, size_t n, const char **p, struct mq_err *e)
{
	if (c->in.len - c->pos < n + 1 && c->pos > 0) {
		memmove(c->in.p, c->in.p + c->pos, c->in.len - c->pos);
		c->in.len -= c->pos;
		c->pos = 0;
	}
	buf_reserve(&c->in, n + 1);
	while (c->in.len - c->pos < n + 1)
		if (rc_fill(c, e) < 0)
			return -1;
	if (c->in.p[c->pos + n] != '\n')
		return err_set(e, MQ_EX_UNAVAILABLE, "server '%s' sent a malformed body", c->addr);
	*p = c->in.p + c->pos;
	c->pos += n + 1;
	return 0;
}

/* Read lines until the answer's final line: returns 0 with *rest (what
 * follows "OK", maybe "") for OK, 1 with *line for a data line, or -1
 * with e set from "ERR CODE MESSAGE" or a broken connection. */
static int rc_next(struct rconn *c, char **line, struct mq_err *e)
{
	if (rc_line(c, line, e) < 0)
		return -1;
	while (!strncmp(*line, "NOTICE ", 7)) { /* the server's spool notice: as a local one */
		struct preq r = {0};
		if (proto_parse(*line, &r, e) == 0 && preq_npos(&r) == 1)
			if (c->notice)
				c->notice(NULL, preq_pos(&r, 0));
		preq_free(&r);
		if (rc_line(c, line, e) < 0)
			return -1;
	}
	char *l = *line;
	if (!strncmp(l, "OK", 2) && (!l[2] || l[2] == ' ')) {
		*line = l[2] ? l + 3 : l + 2;
		return 0;
	}
	if (!strncmp(l, "ERR ", 4)) {
		char *end;
		long code = strtol(l + 4, &end, 10);
		if (code <= 0 || code > 125)
			code = MQ_EX_UNAVAILABLE;
		return err_set(e, (int)code, "%s", *end == ' ' ? end + 1 : end);
	}
	return 1;
}

/* A MSG line parsed back into m (pointing into c's buffers, valid until
 * the next read); headers are re-encoded into hb. */
static int rc_msg(struct rconn *c, char *line, struct rec_msg *m, int *part, unsigned *attempt,
                  uint32_t *lease, struct buf *hb, struct mq_err *e)
{
	struct preq r = {0};
	uint64_t v[6];
	int rc = -1;
	memset(m, 0, sizeof *m);
	if (proto_parse(line, &r, e) < 0 || strcmp(r.t[0].val, "MSG") || preq_npos(&r) != 6)
		goto bad;
	for (int i = 0; i < 6; i++)
		if (parse_u64(preq_pos(&r, i), &v[i]) < 0)
			goto bad;
	*part = (int)v[0];
	m->offset = v[1];
	m->ts = (int64_t)v[2];
	*attempt = (unsigned)v[3];
	*lease = (uint32_t)v[4];
	hb->len = 0;
	struct buf pairs = {0};
	uint64_t nh = 0;
	for (int i = 1; i < r.n; i++) {
		struct ptok *t = &r.t[i];
		if (!t->name)
			continue;
		if (!strcmp(t->name, "key")) {
			m->key = (const unsigned char *)t->val, m->klen = t->len, m->has_key = 1;
		} else if (!strcmp(t->name, "tag")) {
			m->tag = (const unsigned char *)t->val, m->tlen = t->len, m->has_tag = 1;
		} else if (!strncmp(t->name, "h.", 2)) {
			rec_hdr_pair(&pairs, t->name + 2, t->val, t->len);
			nh++;
		}
	}
	if (nh) {
		unsigned char tmp[10];
		buf_add(hb, tmp, varint_put(tmp, nh));
		buf_add(hb, pairs.p, pairs.len);
	}
	buf_free(&pairs);
	/* key and tag point into c->line, which the body read leaves alone */
	const char *body = NULL;
	if (rc_body(c, (size_t)v[5], &body, e) < 0)
		goto out;
	m->body = (const unsigned char *)body;
	m->blen = (size_t)v[5];
	m->hdrs = (const unsigned char *)hb->p;
	m->hlen = hb->len;
	rc = 0;
	goto out;
bad:
	err_set(e, MQ_EX_UNAVAILABLE, "server '%s' sent a malformed message line", c->addr);
out:
	preq_free(&r);
	return rc;
}

/* ===================================================================
 * 13. Server: the event loop, connections, group commit, the verbs
 *
 * One thread, one epoll loop.  Each round reads what the ready clients
 * sent (at most in_chunk bytes each), runs their requests, then commits:
 * every queue's shared producer is flushed once, so one fdatasync per
 * partition covers all the clients' puts of the round (group commit), and
 * only then are those puts answered.  Answers leave in request order
 * (tickets), so clients may pipeline.  A client with too much unsent is
 * not read until it catches up (backpressure), a half-sent request that
 * stalls is dropped, an idle client is closed.  Uses layers 1-12; logs
 * through srv->log and never prints or exits.
 * =================================================================== */

#ifdef __linux__
enum { EV_LISTEN = 1, EV_CONN, EV_WATCH };

struct srv;
struct conn;

enum { TK_READY, TK_PUT, TK_WAIT };

/* One request's answer.  A connection's tickets form a list in request
 * order; the head is sent once it is ready. */
struct ticket {
	struct ticket *next;
	struct conn *c;        /* NULL once the client is gone */
	int kind;
	struct buf resp;       /* the answer; a put's offsets so far */
	/* TK_PUT */
	uint64_t count;        /* frames announced */
	uint64_t nread;        /* frames received */
	uint64_t inflight;     /* messages in a producer, not yet acknowledged */
	uint64_t acked;
	int offsets;           /* answer with PARTITION:OFFSET lines */
	int frames_done;
	char dup[64];          /* put id=: "PARTITION:OFFSET" of the stored one */
	struct mq_err err;     /* the first failure; err.code 0 if none */
	/* TK_WAIT: a get (or a watch) waiting for messages */
	char *line;            /* its request line, run again on a wake */
	int (*rerun)(struct srv *s, struct ticket *t, struct preq *r, struct mq_err *e);
	struct sq *wq;
	int64_t deadline;      /* monotonic ms; -1 for ever */
	struct ticket *wprev, *wnext;
};

/* A producer's messages belong to these tickets, n each, in order. */
struct pend {
	struct ticket *t;
	uint64_t n;
};

/* A queue the server keeps open, with the producer its plain puts share. */
struct sq {
	int kind;              /* EV_WATCH: w.fd tells of other writers */
	struct srv *s;
	struct queue *q;
	struct prod pr;        /* group commit: a round's messages of every client */
	struct pend *fifo;     /* whose messages pr holds, oldest at fhead */
	size_t fhead, flen, fcap;
	struct waiter w;
	int changed;           /* new messages since the waiters last looked */
	struct sq *next;
};

struct conn {
	int kind;              /* EV_CONN */
	int fd;
	struct buf in;         /* unparsed input starts at ipos */
	size_t ipos;
	struct buf out;        /* unsent output starts at opos */
	size_t opos;
	struct ticket *head, *tail;
	size_t nt;
	int waiting;           /* a TK_WAIT ticket holds the requests behind it */
	/* the PUT whose frames are arriving */
	struct ticket *put;
	struct sq *psq;
	struct prod *ppr;      /* &psq->pr, or a producer of its own (own != 0) */
	int own;
	struct queue *pq;      /* a queue handle with the put's own settings, or NULL */
	struct txn *tx;        /* BEGIN ... PREPARE: the transaction being put */
	int txbad;             /* a put into it failed: PREPARE refuses it */
	struct queue *txq;     /* ... and its queue handle */
	struct claim *pcl;     /* PIPEBEGIN ... PIPECOMMIT: tx is a pipe step, this its */
	struct queue *psrc;    /* source's claim, of this queue handle, */
	char *pgroup;          /* for this group, */
	struct ptake ptk;      /* taking these messages */
	struct buf pkey, ptag, phdr;
	struct rec_msg tmpl;
	uint64_t skip;         /* bytes of a refused frame still to discard */
	int64_t last_ms;       /* monotonic: last byte received */
	int64_t progress_ms;   /* monotonic: last whole line or frame */
	int events;            /* registered epoll events */
	int eof, dead;
	int quit;              /* QUIT or a refused request: parse nothing more */
	struct preq fr;        /* frame headers, parsed (kept to save allocations) */
	int tok;               /* the token it showed (index in s->o.tok), or -1 */
	int http;              /* a metrics client: one HTTP request, then close */
	char peer[80];
	struct conn *prev, *next;
};

struct lsn {
	int kind; /* EV_LISTEN */
	int fd;
	int http; /* the metrics-listen address */
};

struct srv {
	struct spool *sp;
	struct srv_opts o;
	int ep;
	struct lsn l[9];
	int nl;
	const struct verb *verbs; /* the broker's, or the nameserver's */
	size_t nverbs;
	char bound[300];          /* the first address listened on, port resolved */
	int ready;                /* systemd was told */
	struct reg *reg;          /* a broker's registering thread, once started */
	int64_t reg_next;         /* monotonic ms: the next registration round */
	struct nsreg *nsr;        /* a nameserver's registry (mq nameserver) */
	struct conn *conns;
	int nconns;
	struct sq *queues;
	struct ticket *waiting;
	unsigned rr;           /* rotates the partition a get starts at */
	int64_t started_ms, tick_ms;
	struct ticket *cur;       /* the request being run: spool notices go to it too */
	struct tchild *tck;       /* txn-check runs, one per queue at a time */
	int ntck;
	int64_t tck_scan_ms;      /* monotonic: the last look for queues to check */
	uint64_t msgs_in, msgs_out, bytes_in, bytes_out, commits, accepted, refused;
	void (*log)(void *ctx, const char *line);
	void *log_ctx;
};

static void srv_log(struct srv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void srv_log(struct srv *s, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	hook_vsay(s->log, s->log_ctx, fmt, ap);
	va_end(ap);
}

static void srv_events(struct srv *s, struct conn *c)
{
	size_t unsent = c->out.len - c->opos;
	int want = (c->eof ? 0 : EPOLLRDHUP) | (c->out.len > c->opos ? EPOLLOUT : 0) |
	           (!c->eof && !c->dead && !c->waiting && unsent < s->o.out_max && c->nt < 4096
	            ? EPOLLIN : 0);
	if (want == c->events)
		return;
	struct epoll_event ev = {(uint32_t)want, {.ptr = c}};
	epoll_ctl(s->ep, EPOLL_CTL_MOD, c->fd, &ev);
	c->events = want;
}

/* ----- tickets ----- */

static struct ticket *tk_new(struct conn *c, int kind)
{
	struct ticket *t = calloc(1, sizeof *t);
	if (!t)
		abort();
	t->c = c;
	t->kind = kind;
	if (c->tail)
		c->tail->next = t;
	else
		c->head = t;
	c->tail = t;
	c->nt++;
	return t;
}

static void tk_free(struct ticket *t)
{
	buf_free(&t->resp);
	free(t->line);
	free(t);
}

static void tk_err(struct ticket *t, const struct mq_err *e)
{
	buf_printf(&t->resp, "ERR %d %s\n", e->code ? e->code : MQ_EX_IOERR, e->msg);
	t->kind = TK_READY;
}

/* A put is answered once its frames are in and none is in a producer. */
static void tk_put_settle(struct ticket *t)
{
	if (t->kind != TK_PUT || !t->frames_done || t->inflight)
		return;
	if (!t->c) { /* its client is gone: nobody to tell */
		tk_free(t);
		return;
	}
	if (t->err.code)
		tk_err(t, &t->err);
	else if (t->dup[0])
		buf_printf(&t->resp, "OK 0 duplicate=%s\n", t->dup);
	else
		buf_printf(&t->resp, "OK %" PRIu64 "\n", t->acked);
	t->kind = TK_READY;
}

/* ----- queues ----- */

static void sq_acked(void *ctx, int part, uint64_t off)
{
	struct sq *q = ctx;
	assert(q->flen > 0);
	struct pend *p = &q->fifo[q->fhead];
	struct ticket *t = p->t;
	t->inflight--;
	t->acked++;
	if (t->offsets && t->c)
		buf_printf(&t->resp, "%d:%" PRIu64 "\n", part, off);
	if (--p->n == 0) {
		q->fhead++;
		q->flen--;
		tk_put_settle(t);
	}
}

static void sq_prod_init(struct sq *q)
{
	prod_init(&q->pr, q->q, -1);
	q->pr.group = 1;
	q->pr.nonblock = 1;
	q->pr.acked = sq_acked;
	q->pr.ctx = q;
}

/* The open queue called name, opened (and created with create) now if
 * need be. */
static struct sq *srv_queue(struct srv *s, const char *name, int create, struct mq_err *e)
{
	for (struct sq *q = s->queues; q; q = q->next)
		if (!strcmp(q->q->name, name))
			return q;
	struct sq *q = calloc(1, sizeof *q);
	if (!q)
		abort();
	if (q_check_name("queue", name, e) < 0 || q_open(s->sp, name, create, NULL, 0, &q->q, e) < 0) {
		free(q);
		return NULL;
	}
	q->kind = EV_WATCH;
	q->s = s;
	sq_prod_init(q);
	wait_init(&q->w, q->q);
	if (q->w.fd >= 0) {
		struct epoll_event ev = {EPOLLIN, {.ptr = q}};
		epoll_ctl(s->ep, EPOLL_CTL_ADD, q->w.fd, &ev);
	}
	q->next = s->queues;
	s->queues = q;
	return q;
}

/* The producer failed: its tickets fail with e, and it starts afresh. */
static void sq_failed(struct sq *q, const struct mq_err *e)
{
	for (; q->flen; q->fhead++, q->flen--) {
		struct ticket *t = q->fifo[q->fhead].t;
		t->inflight -= q->fifo[q->fhead].n;
		if (!t->err.code)
			t->err = *e;
		tk_put_settle(t);
	}
	prod_free(&q->pr);
	sq_prod_init(q);
}

/* Remember that the producer's next n messages are t's. */
static void sq_pend(struct sq *q, struct ticket *t)
{
	if (q->flen && q->fifo[q->fhead + q->flen - 1].t == t) {
		q->fifo[q->fhead + q->flen - 1].n++;
	} else {
		if (q->fhead + q->flen == q->fcap) {
			if (q->fhead) {
				memmove(q->fifo, q->fifo + q->fhead, q->flen * sizeof *q->fifo);
				q->fhead = 0;
			} else {
				q->fcap = q->fcap ? q->fcap * 2 : 64;
				if (!(q->fifo = realloc(q->fifo, q->fcap * sizeof *q->fifo)))
					abort();
			}
		}
		q->fifo[q->fhead + q->flen++] = (struct pend){t, 1};
	}
	t->inflight++;
}

/* Free the producer a put had of its own. */
static void own_free(struct conn *c)
{
	free((char *)c->ppr->id);
	prod_free(c->ppr);
	free(c->ppr);
	c->ppr = NULL;
	c->own = 0;
}

static void sq_close(struct srv *s, struct sq *q)
{
	struct mq_err e;
	if (q->pr.pending && prod_flush(&q->pr, 1, &e) < 0)
		sq_failed(q, &e);
	for (struct conn *c = s->conns; c; c = c->next) {
		if (c->psq != q)
			continue;
		/* a put into it is arriving: it fails */
		if (c->put && !c->put->err.code)
			err_set(&c->put->err, MQ_EX_NOINPUT, "queue '%s' was removed", q->q->name);
		if (c->put && c->own && !c->pq) { /* its producer writes through q */
			own_free(c);
			c->put->inflight = 0;
		}
		if (!c->own)
			c->ppr = NULL;
		c->psq = NULL;
	}
	for (struct ticket *t = s->waiting; t; t = t->wnext)
		if (t->wq == q)
			t->wq = NULL;
	prod_free(&q->pr);
	free(q->fifo);
	if (q->w.fd >= 0)
		epoll_ctl(s->ep, EPOLL_CTL_DEL, q->w.fd, NULL);
	wait_free(&q->w);
	q_close(q->q);
	for (struct sq **pp = &s->queues; *pp; pp = &(*pp)->next)
		if (*pp == q) {
			*pp = q->next;
			break;
		}
	free(q);
}

/* Does a client put into q or wait on it? */
static int sq_busy(struct srv *s, struct sq *q)
{
	for (struct conn *c = s->conns; c; c = c->next)
		if (c->psq == q)
			return 1;
	for (struct ticket *t = s->waiting; t; t = t->wnext)
		if (t->wq == q)
			return 1;
	return q->flen > 0;
}

/* Group commit: flush every shared producer once; answer the puts.  A
 * partition another process holds defers its queue's flush to a later
 * round, unless final (the server is stopping), which waits for it. */
static void srv_commit(struct srv *s, int final)
{
	for (struct sq *q = s->queues; q; q = q->next) {
		struct mq_err e;
		int64_t due = prod_due(&q->pr);
		if (due != 0 && !q->pr.pending)
			continue;
		if (q->pr.pending)
			q->changed = 1;
		s->commits++;
		if (prod_flush(&q->pr, final, &e) < 0) {
			srv_log(s, "level=error event=commit queue=%s error=\"%s\"", q->q->name, e.msg);
			sq_failed(q, &e);
		}
	}
}

/* ----- connections ----- */

/* Take t off the server's list of waiting gets. */
static void srv_unwait(struct srv *s, struct ticket *t)
{
	if (t->wprev)
		t->wprev->wnext = t->wnext;
	else
		s->waiting = t->wnext;
	if (t->wnext)
		t->wnext->wprev = t->wprev;
	t->wprev = t->wnext = NULL;
}

/* Drop the connection's transaction if it was never prepared: no id was
 * acknowledged for it. */
static void srv_tx_drop(struct srv *s, struct conn *c)
{
	if (c->tx && c->tx->fd >= 0 && !c->tx->valid && !c->pcl) /* (a pipe's step file stays) */
		sys.unlink(c->tx->path);
	if (c->tx)
		txn_free(c->tx);
	free(c->tx);
	q_close(c->txq);
	c->tx = NULL;
	c->txq = NULL;
	if (c->pcl) { /* an unfinished step: its source messages stay where they were */
		struct mq_err ignored;
		grp_untake(c->pcl);
		grp_release(c->pcl, &ignored);
		free(c->pcl);
		c->pcl = NULL;
		for (struct sq *q = s->queues; q; q = q->next)
			if (!strcmp(q->q->name, c->psrc->name))
				q->changed = 1; /* waiting readers of the group look again */
	}
	q_close(c->psrc);
	c->psrc = NULL;
	free(c->pgroup);
	c->pgroup = NULL;
}

static void srv_close(struct srv *s, struct conn *c, const char *why)
{
	srv_log(s, "level=info event=close peer=%s reason=%s", c->peer, why);
	if (c->put && c->own) { /* never acknowledged: not flushed */
		own_free(c);
		c->put->inflight = 0;
	}
	srv_tx_drop(s, c);
	preq_free(&c->fr);
	if (c->pq)
		q_close(c->pq);
	for (struct ticket *t = c->head, *n; t; t = n) {
		n = t->next;
		if (t->kind == TK_WAIT)
			srv_unwait(s, t);
		if (t->kind == TK_PUT && t->inflight) { /* in a shared producer: freed when settled */
			t->c = NULL;
			t->frames_done = 1;
			continue;
		}
		tk_free(t);
	}
	epoll_ctl(s->ep, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	buf_free(&c->in);
	buf_free(&c->out);
	buf_free(&c->pkey);
	buf_free(&c->ptag);
	buf_free(&c->phdr);
	if (c->prev)
		c->prev->next = c->next;
	else
		s->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	s->nconns--;
	free(c);
}

/* Move ready answers to the output and send what the socket takes. */
static void srv_send(struct srv *s, struct conn *c)
{
	while (c->head && c->head->kind == TK_READY) {
		struct ticket *t = c->head;
		buf_add(&c->out, t->resp.p, t->resp.len);
		c->head = t->next;
		if (!c->head)
			c->tail = NULL;
		c->nt--;
		tk_free(t);
	}
	while (c->opos < c->out.len) {
		ssize_t k = send(c->fd, c->out.p + c->opos, c->out.len - c->opos, MSG_NOSIGNAL);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (k < 0) {
			c->dead = 1;
			break;
		}
		c->opos += (size_t)k;
		s->bytes_out += (uint64_t)k;
	}
	if (c->opos == c->out.len) {
		c->opos = c->out.len = 0;
		if (c->out.cap > (1u << 20)) { /* give back what a big answer took */
			buf_free(&c->out);
		}
	}
}

/* ----- the verbs ----- */

/* What a verb needs when the server has tokens: nothing, any token, or a
 * token that may read or write the queue(s) it names. */
enum { NEED_NONE, NEED_AUTH, NEED_READ, NEED_WRITE };

struct verb {
	const char *name;
	int (*fn)(struct srv *s, struct conn *c, struct preq *r, struct ticket *t, struct mq_err *e);
	int min_pos, max_pos; /* positional arguments; -1: no limit */
	int need;
	int all_pos;          /* every positional argument is a queue (RM, PURGE) */
};

/* Compare a shown secret with a configured one in time that depends only
 * on the shown one's length. */
static int ct_equal(const char *want, const char *got, size_t glen)
{
	size_t wlen = strlen(want);
	unsigned char d = wlen != glen;
	for (size_t i = 0; i < glen; i++)
		d |= (unsigned char)((unsigned char)got[i] ^ (unsigned char)want[wlen ? i % wlen : 0]);
	return d == 0;
}

/* Does a space- or comma-separated list of name patterns match q? */
static int acl_match(const char *pats, const char *q)
{
	char pat[256];
	for (const char *p = pats ? pats : ""; *p;) {
		p += strspn(p, ", \t");
		size_t k = strcspn(p, ", \t");
		if (k && k < sizeof pat) {
			memcpy(pat, p, k);
			pat[k] = 0;
			if (fnmatch(pat, q, 0) == 0)
				return 1;
		}
		p += k;
	}
	return 0;
}

/* May c do what `need` asks to queue q (NULL: no particular queue)? */
static int srv_allowed(struct srv *s, struct conn *c, int need, const char *q,
                       struct mq_err *e)
{
	if (!s->o.ntok || need == NEED_NONE)
		return 0;
	if (c->tok < 0)
		return err_set(e, MQ_EX_NOPERM, "this server needs a token: send AUTH TOKEN first "
		               "(mq reads it from $MQ_TOKEN)");
	const struct srv_token *t = &s->o.tok[c->tok];
	if (need == NEED_AUTH || !q || acl_match(need == NEED_READ ? t->read : t->write, q))
		return 0;
	return err_set(e, MQ_EX_NOPERM, "token '%s' may not %s queue '%s'", t->name,
	               need == NEED_READ ? "read" : "write", q);
}

static int v_hello(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                   struct mq_err *e)
{
	(void)s, (void)c, (void)r, (void)e;
	buf_printf(&t->resp, "OK mq %d %s\n", MQ_PROTO_VERSION, MQ_VERSION);
	return 0;
}

/* AUTH SECRET: every token is compared, whichever matches. */
static int v_auth(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	const struct ptok *k = NULL; /* the secret, as decoded (%00 included) */
	int found = -1;
	for (int i = 1; i < r->n && !k; i++)
		if (!r->t[i].name)
			k = &r->t[i];
	for (int i = 0; i < s->o.ntok; i++)
		if (ct_equal(s->o.tok[i].secret, k->val, k->len) && found < 0)
			found = i;
	if (!s->o.ntok) {
		buf_adds(&t->resp, "OK\n"); /* no tokens: none needed */
		return 0;
	}
	if (found < 0) {
		srv_log(s, "level=warn event=auth-failed peer=%s", c->peer);
		c->eof = c->quit = 1; /* nothing more from this one */
		return err_set(e, MQ_EX_NOPERM, "bad token");
	}
	c->tok = found;
	buf_printf(&t->resp, "OK %s\n", s->o.tok[found].name);
	return 0;
}

static int v_ping(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	(void)s, (void)c, (void)r, (void)e;
	buf_adds(&t->resp, "OK\n");
	return 0;
}

static int v_quit(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	(void)s, (void)r, (void)e;
	buf_adds(&t->resp, "OK\n");
	c->eof = c->quit = 1; /* run and read nothing more; closed once answered */
	return 0;
}

/* An unsigned option, or def when absent. */
static int ropt_u64(const struct preq *r, const char *name, uint64_t def, uint64_t *v,
                    struct mq_err *e)
{
	const char *s = preq_opt(r, name);
	*v = def;
	if (s && parse_u64(s, v) < 0)
		return err_set(e, MQ_EX_USAGE, "bad %s '%s' (a non-negative integer)", name, s);
	return 0;
}

/* Settings a request may give for its queue handle (retries, backoff,
 * fsync); returns how many went into set. */
static int ropt_settings(const struct preq *r, struct kv *set)
{
	static const char *const names[] = {"retries", "backoff", "fsync"};
	int n = 0;
	for (size_t i = 0; i < sizeof names / sizeof *names; i++)
		if (preq_opt(r, names[i]))
			set[n++] = (struct kv){names[i], preq_opt(r, names[i])};
	return n;
}

/* A put's own producer acknowledged a message: its offset, if asked. */
static void own_acked(void *ctx, int part, uint64_t off)
{
	struct ticket *t = ctx;
	if (t->offsets)
		buf_printf(&t->resp, "%d:%" PRIu64 "\n", part, off);
}

/*
 * PUT QUEUE COUNT [key=K] [tag=T] [h.NAME=V]... [partition=P] [fsync=MODE]
 * [id=ID] [at=MS] [offsets=1] [create=0], then COUNT frames.  Plain puts
 * share the queue's producer (group commit); one with a partition, fsync
 * mode, id or due time gets a producer of its own, synced when its last
 * frame is in.  An error here still reads (and drops) the frames.
 */
static int v_put_start(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                       struct mq_err *e);

static int v_put(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                 struct mq_err *e)
{
	int k = v_put_start(s, c, r, t, e);
	const char *txn = preq_opt(r, "txn");
	if (c->tx && txn && !strcmp(txn, "1") && (k < 0 || t->err.code))
		c->txbad = 1; /* a refused part of a transaction (or pipe step) dooms it */
	return k;
}

static int v_put_start(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                       struct mq_err *e)
{
	uint64_t part = 0, at = 0, create = 1;
	const char *name = preq_pos(r, 0), *id = preq_opt(r, "id");
	int txn = preq_opt(r, "txn") && !strcmp(preq_opt(r, "txn"), "1");
	t->kind = TK_PUT;
	if (parse_u64(preq_pos(r, 1), &t->count) < 0) {
		c->eof = c->dead = 1; /* the frames cannot be told from requests */
		return err_set(e, MQ_EX_USAGE, "bad message count '%s'", preq_pos(r, 1));
	}
	c->put = t;
	c->own = 0;
	c->ppr = NULL;
	c->psq = NULL;
	c->progress_ms = mono_ms();
	t->offsets = preq_opt(r, "offsets") && !strcmp(preq_opt(r, "offsets"), "1");
	if (srv_allowed(s, c, NEED_WRITE, name, &t->err) < 0)
		return 0; /* its frames are skipped unread */
	struct kv set[3];
	int nset = ropt_settings(r, set);
	if (ropt_u64(r, "partition", 0, &part, &t->err) < 0 || ropt_u64(r, "at", 0, &at, &t->err) < 0 ||
	    ropt_u64(r, "create", 1, &create, &t->err) < 0)
		return 0;
	struct mq_err qe; /* e may be scribbled on by a call that succeeds */
	if (txn && (!c->tx || strcmp(c->txq->name, name))) {
		err_set(&t->err, MQ_EX_USAGE, "no transaction of '%s' begun on this connection (BEGIN "
		        "QUEUE first)", name);
		return 0;
	}
	if (txn && (at || id || nset || preq_opt(r, "partition") || t->offsets)) {
		err_set(&t->err, MQ_EX_USAGE, "txn=1 excludes at, id, fsync, retries, backoff, "
		        "partition and offsets");
		return 0;
	}
	struct qconf chk; /* bad settings are refused before the queue is created */
	conf_defaults(&chk);
	for (int i = 0; i < nset; i++)
		if (conf_set(&chk, set[i].k, set[i].v, "request", &t->err) < 0) {
			t->err.code = MQ_EX_USAGE;
			return 0;
		}
	if (!(c->psq = srv_queue(s, name, (int)create, &qe))) {
		t->err = qe;
		return 0;
	}
	struct queue *q = c->psq->q;
	if (dly_tick(q, &qe) > 0) /* due delayed messages join their partitions, as a local put */
		c->psq->changed = 1;  /* moves them */
	if (preq_opt(r, "partition") && part >= (uint64_t)q->nparts) {
		err_set(&t->err, MQ_EX_USAGE, "partition %" PRIu64 " does not exist (the queue has %d)",
		        part, q->nparts);
		return 0;
	}
	/* key, tag and headers: copies, as the request line goes away */
	c->pkey.len = c->ptag.len = c->phdr.len = 0;
	memset(&c->tmpl, 0, sizeof c->tmpl);
	struct buf pairs = {0};
	uint64_t nh = 0;
	if (id) {
		rec_hdr_pair(&pairs, MQ_ID_HEADER, id, strlen(id));
		nh++;
	}
	for (int i = 1; i < r->n; i++) {
		struct ptok *k = &r->t[i];
		if (k->name && !strncmp(k->name, "h.", 2) && k->name[2]) {
			rec_hdr_pair(&pairs, k->name + 2, k->val, k->len);
			nh++;
		} else if (k->name && !strcmp(k->name, "key")) {
			c->pkey.len = 0; /* the last one counts */
			buf_add(&c->pkey, k->val, k->len);
			c->tmpl.has_key = 1;
		} else if (k->name && !strcmp(k->name, "tag")) {
			c->ptag.len = 0;
			buf_add(&c->ptag, k->val, k->len);
			c->tmpl.has_tag = 1;
		}
	}
	if (nh) {
		unsigned char tmp[10];
		buf_add(&c->phdr, tmp, varint_put(tmp, nh));
		buf_add(&c->phdr, pairs.p, pairs.len);
	}
	buf_free(&pairs);
	if (at || id || nset || txn || preq_opt(r, "partition")) { /* a producer of its own */
		int fixed = preq_opt(r, "partition") ? (int)part : -1;
		if (txn && c->pcl) /* a pipe step: source partition P goes to P mod N */
			fixed = c->pcl->part % c->txq->nparts;
		if (nset && q_open(s->sp, name, 0, set, nset, &c->pq, &qe) < 0) {
			t->err = qe;
			return 0;
		}
		struct queue *pq = txn ? c->txq : c->pq ? c->pq : q;
		if (id && fixed < 0) { /* one partition for the whole put: by key, else by id */
			const char *k = c->tmpl.has_key ? c->pkey.p : id;
			size_t kl = c->tmpl.has_key ? c->pkey.len : strlen(id);
			fixed = (int)(fnv1a((const unsigned char *)k, kl) % (uint32_t)pq->nparts);
		}
		if (!(c->ppr = calloc(1, sizeof *c->ppr)))
			abort();
		prod_init(c->ppr, pq, fixed);
		c->ppr->acked = own_acked;
		c->ppr->ctx = t;
		c->ppr->due_ms = at > (uint64_t)now_ms() ? (int64_t)at : 0;
		c->ppr->txn = txn ? c->tx : NULL;
		c->ppr->id = NULL;
		c->own = 1;
		if (id && !(c->ppr->id = strdup(id)))
			abort();
	} else {
		c->ppr = &c->psq->pr;
	}
	return 0;
}

/* One frame of the arriving put. */
static void srv_frame(struct srv *s, struct conn *c, const char *body, size_t blen,
                      struct ptok *key, struct ptok *tag)
{
	struct ticket *t = c->put;
	struct mq_err e;
	t->nread++;
	if (t->err.code || !c->ppr)
		return;
	struct rec_msg m = c->tmpl;
	m.key = (const unsigned char *)(key ? key->val : c->pkey.p ? c->pkey.p : "");
	m.klen = key ? key->len : c->pkey.len;
	m.has_key |= key != NULL;
	m.tag = (const unsigned char *)(tag ? tag->val : c->ptag.p ? c->ptag.p : "");
	m.tlen = tag ? tag->len : c->ptag.len;
	m.has_tag |= tag != NULL;
	m.hdrs = (const unsigned char *)c->phdr.p;
	m.hlen = c->phdr.len;
	m.body = (const unsigned char *)body;
	m.blen = blen;
	m.ts = now_ms();
	if (!c->own)
		sq_pend(c->psq, t);
	else
		t->inflight++;
	int k = prod_add(c->ppr, &m, &e);
	if (k < 0 && e.code == MQ_EX_DATAERR) { /* refused before buffering */
		if (!c->own) {
			struct sq *q = c->psq;
			if (--q->fifo[q->fhead + q->flen - 1].n == 0)
				q->flen--;
		}
		t->inflight--;
		err_set(&t->err, MQ_EX_DATAERR, "message %" PRIu64 " is longer than the maximum of %"
		        PRId64 " bytes (max-message-bytes); it and the rest of the put were not written",
		        t->nread, c->ppr->q->conf.max_message);
	} else if (k < 0 && !c->own) {
		srv_log(s, "level=error event=commit queue=%s error=\"%s\"", c->psq->q->name, e.msg);
		sq_failed(c->psq, &e);
	} else if (k < 0) {
		t->err = e;
	} else {
		s->msgs_in++;
	}
}

/* The put's last frame is in: a producer of its own is flushed now. */
static void srv_put_end(struct srv *s, struct conn *c)
{
	struct ticket *t = c->put;
	(void)s;
	c->put = NULL;
	t->frames_done = 1;
	if (c->own) {
		struct mq_err e;
		struct prod *pr = c->ppr;
		if (!t->err.code && prod_flush(pr, 1, &e) < 0)
			t->err = e;
		if (t->err.code && pr->txn)
			c->txbad = 1;
		else if (!t->err.code && pr->dup)
			strfmt(t->dup, sizeof t->dup, "%d:%" PRIu64, pr->fixed, pr->dup_off);
		else if (!t->err.code)
			t->acked = t->inflight;
		if (!t->err.code && !pr->dup && pr->due_ms <= 0 && !pr->txn && c->psq)
			c->psq->changed = 1;
		t->inflight = 0;
		own_free(c);
		if (c->pq)
			q_close(c->pq);
		c->pq = NULL;
	}
	c->ppr = NULL;
	tk_put_settle(t);
}

/* get's side of grp_deliver(): MSG frames into the ticket's answer. */
struct sget {
	struct ticket *t;
	size_t mark;    /* answer length before this partition */
	uint64_t n;     /* messages in the answer */
	uint64_t nmark; /* ... before this partition */
};

static int sget_emit(void *ctx, int part, const struct rec_msg *m, unsigned attempt,
                     uint32_t lease)
{
	struct sget *g = ctx;
	proto_msg(&g->t->resp, part, m, attempt, lease);
	g->n++;
	return g->t->resp.len >= MQ_ANSWER_MAX || g->n >= MQ_ANSWER_MSGS;
}

static int sget_out(void *ctx, struct mq_err *e)
{
	(void)ctx, (void)e;
	return 0;
}

static void sget_drop(void *ctx)
{
	struct sget *g = ctx;
	g->t->resp.len = g->mark;
	g->n = g->nmark;
}

/*
 * GET QUEUE [group=G] [count=N] [wait=MS] [lease=MS]
 * [tag=EXPR] [retries=N] [backoff=DELAYS]: the group's next messages.
 * They are leased (lease=), or committed before they are sent: over the
 * wire at-least-once means a lease and an ACK.  count=0 is as many as
 * fit in MQ_ANSWER_MAX bytes.  Returns 1 when it should wait.
 */
static int srv_get(struct srv *s, struct ticket *t, struct preq *r, struct mq_err *e)
{
	uint64_t want, wait = 0, lease = 0;
	const char *g = preq_opt(r, "group") ? preq_opt(r, "group") : "default";
	struct kv set[3];
	int nset = ropt_settings(r, set), rc = 0;
	struct queue *own = NULL, *q;
	struct tagset tsbuf;
	const struct tagset *tags = NULL;
	if (ropt_u64(r, "count", 1, &want, e) < 0 || ropt_u64(r, "wait", 0, &wait, e) < 0 ||
	    ropt_u64(r, "lease", 0, &lease, e) < 0 || q_check_name("group", g, e) < 0)
		return -1;
	if (preq_opt(r, "lease") && lease == 0)
		return err_set(e, MQ_EX_USAGE, "lease must be at least 1 ms");
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq || (nset && q_open(s->sp, preq_pos(r, 0), 0, set, nset, &own, e) < 0))
		return -1;
	if (tagset_parse(preq_opt(r, "tag"), &tsbuf, &tags, e) < 0) {
		q_close(own);
		return -1;
	}
	q = own ? own : sq->q;
	struct sget sg = {t, t->resp.len, 0, 0};
	struct deliver d = {g, 0, preq_opt(r, "lease") ? (int64_t)lease : -1, 0, 1, tags,
	                    sget_emit, sget_out, sget_drop, &sg};
	struct mq_err te;
	dly_tick(q, &te); /* delayed messages now due join their partitions */
	unsigned start = s->rr++;
	int nbusy = 0;
	for (int j = 0; j < q->nparts && rc == 0; j++) {
		int busy = 0;
		if (want && sg.n >= want)
			break;
		if (t->resp.len >= MQ_ANSWER_MAX)
			break;
		d.want = want ? want - sg.n : MQ_ANSWER_MSGS - sg.n;
		sg.mark = t->resp.len;
		sg.nmark = sg.n;
		if (grp_deliver(q, (int)((start + (unsigned)j) % (unsigned)q->nparts), &d, &busy, e) < 0)
			rc = -1;
		nbusy += busy;
		if (sg.n >= MQ_ANSWER_MSGS)
			break;
	}
	if (tags)
		tagset_free(&tsbuf);
	q_close(own);
	s->msgs_out += sg.n;
	if (rc < 0 && sg.n == 0)
		return -1;
	if (rc < 0) /* what was delivered before goes out; say what failed */
		srv_log(s, "level=error event=get queue=%s group=%s error=\"%s\"", preq_pos(r, 0), g,
		        e->msg);
	if (sg.n == 0 && preq_opt(r, "wait")) {
		if (t->kind != TK_WAIT) {
			t->deadline = wait ? mono_ms() + (int64_t)wait : -1;
			t->wq = sq;
		}
		if (t->deadline < 0 || mono_ms() < t->deadline)
			return 1;
	}
	if (nbusy) /* held by other consumers: the client may ask again */
		buf_printf(&t->resp, "OK %" PRIu64 " busy=%d\n", sg.n, nbusy);
	else
		buf_printf(&t->resp, "OK %" PRIu64 "\n", sg.n);
	return 0;
}

/* Run fn; when it returns 1 (nothing yet, and a wait= given), t waits
 * and srv_wake runs fn again on the request line. */
static int srv_get(struct srv *s, struct ticket *t, struct preq *r, struct mq_err *e);

static int srv_waiting(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                       int (*fn)(struct srv *, struct ticket *, struct preq *, struct mq_err *),
                       struct mq_err *e)
{
	char *copy = NULL;
	/* the line is parsed in place: keep a copy in case it waits */
	if (preq_opt(r, "wait") || fn != srv_get) {
		struct buf b = {0};
		for (int i = 0; i < r->n; i++) {
			if (i)
				buf_add(&b, " ", 1);
			if (r->t[i].name) {
				proto_esc(&b, r->t[i].name, strlen(r->t[i].name));
				buf_add(&b, "=", 1);
			}
			proto_esc(&b, r->t[i].val, r->t[i].len);
		}
		buf_addc0(&b);
		copy = b.p;
	}
	int k = fn(s, t, r, e);
	if (k == 1) {
		t->kind = TK_WAIT;
		t->rerun = fn;
		t->line = copy;
		t->wnext = s->waiting;
		if (s->waiting)
			s->waiting->wprev = t;
		s->waiting = t;
		c->waiting = 1;
		return 0;
	}
	free(copy);
	return k;
}

static int v_get(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                 struct mq_err *e)
{
	return srv_waiting(s, c, r, t, srv_get, e);
}

/* WATCH QUEUE NEXT,... [partition=P] [wait=MS]: "OK 1" once a partition
 * (or partition P) holds messages at or past the NEXT offset given for it,
 * "OK 0" when the wait runs out (wait=0: never). */
static int srv_watch(struct srv *s, struct ticket *t, struct preq *r, struct mq_err *e)
{
	uint64_t part = 0, wait = 0;
	if (ropt_u64(r, "partition", 0, &part, e) < 0 || ropt_u64(r, "wait", 0, &wait, e) < 0)
		return -1;
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq)
		return -1;
	struct queue *q = sq->q;
	int one = preq_opt(r, "partition") != NULL, moved = 0;
	if (one && part >= (uint64_t)q->nparts)
		return err_set(e, MQ_EX_USAGE, "partition %" PRIu64 " does not exist (the queue has %d)",
		               part, q->nparts);
	const char *p = preq_pos(r, 1);
	for (int i = 0; i < q->nparts && !moved; i++) {
		char *end;
		errno = 0;
		uint64_t next = strtoull(p, &end, 10);
		if (!isdigit((unsigned char)*p) || errno || (*end && *end != ','))
			return err_set(e, MQ_EX_USAGE, "give the next offset of each of the %d partitions, "
			               "separated by commas", q->nparts);
		p = *end ? end + 1 : end;
		struct head h;
		int v = one && (uint64_t)i != part ? 0 : head_read(&q->parts[i], &h, e);
		if (v < 0)
			return -1;
		moved = v && h.next > next;
	}
	if (!moved) {
		if (t->kind != TK_WAIT) {
			t->deadline = wait ? mono_ms() + (int64_t)wait : -1;
			t->wq = sq;
		}
		if (t->deadline < 0 || mono_ms() < t->deadline)
			return 1;
	}
	buf_printf(&t->resp, "OK %d\n", moved);
	return 0;
}

static int v_watch(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                   struct mq_err *e)
{
	return srv_waiting(s, c, r, t, srv_watch, e);
}

/* Run the waiting gets again: those whose queue changed, and all of them
 * on a tick (due retries, expired leases, delayed messages, deadlines). */
static void srv_wake(struct srv *s, int tick)
{
	for (struct ticket *t = s->waiting, *n; t; t = n) {
		n = t->wnext;
		int64_t now = mono_ms();
		if (t->c->dead) /* about to be closed: nobody to deliver to */
			continue;
		if (!tick && !(t->wq && t->wq->changed) && (t->deadline < 0 || now < t->deadline))
			continue;
		struct preq r = {0};
		struct mq_err e = {0};
		char *line = strdup(t->line);
		if (!line)
			abort();
		int k = proto_parse(line, &r, &e) < 0 ||
		        srv_allowed(s, t->c, NEED_READ, preq_pos(&r, 0), &e) < 0 /* a reload */
		        ? -1 : (s->cur = t, t->rerun(s, t, &r, &e));
		s->cur = NULL;
		free(line);
		preq_free(&r);
		if (k == 1)
			continue;
		if (k < 0)
			tk_err(t, &e);
		t->kind = TK_READY;
		srv_unwait(s, t);
		t->c->waiting = 0;
	}
	for (struct sq *q = s->queues; q; q = q->next)
		q->changed = 0;
}

/* ACK QUEUE RECEIPT... / NACK QUEUE [delay=MS] RECEIPT...: answers
 * "OK N R1,R2,..." with each receipt's result (1 ok, 2 already done,
 * 3 stale, 4 never delivered). */
static int v_ack(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                 struct mq_err *e)
{
	int nack = !strcasecmp(r->t[0].val, "NACK"), n = preq_npos(r) - 1;
	uint64_t delay = 0;
	struct kv set[3];
	int nset = ropt_settings(r, set);
	struct queue *q;
	(void)c;
	uint64_t why = MQ_WHY_NACK; /* why=: the consumer's reason (consume through a server) */
	if (ropt_u64(r, "delay", 0, &delay, e) < 0 || ropt_u64(r, "why", MQ_WHY_NACK, &why, e) < 0)
		return -1;
	if (nack && ((why & 0xff) < MQ_WHY_EXIT || (why & 0xff) > MQ_WHY_EXPIRED || why > UINT32_MAX))
		return err_set(e, MQ_EX_USAGE, "bad why '%s' (an MQ_WHY_* code, see mq.h)",
		               preq_opt(r, "why"));
	if (nack)
		nack = (int)why;
	struct receipt *rs = calloc((size_t)n, sizeof *rs);
	if (!rs)
		abort();
	for (int i = 0; i < n; i++)
		if (receipt_parse(preq_pos(r, i + 1), &rs[i]) < 0) {
			free(rs);
			return err_set(e, MQ_EX_USAGE, "bad receipt '%s' (GROUP:PARTITION:OFFSET:LEASE)",
			               preq_pos(r, i + 1));
		}
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq || (nset && q_open(s->sp, preq_pos(r, 0), 0, set, nset, &q, e) < 0)) {
		free(rs);
		return -1;
	}
	if (!nset)
		q = sq->q;
	/* never wait for a lock here: the whole server would wait */
	int k = grp_answer_all(q, rs, (size_t)n, nack,
	                       preq_opt(r, "delay") ? (int64_t)delay : -1, CL_NONBLOCK, e);
	if (nset)
		q_close(q);
	if (k == 0) {
		buf_printf(&t->resp, "OK %d ", n);
		for (int i = 0; i < n; i++)
			buf_printf(&t->resp, "%s%d", i ? "," : "", rs[i].result);
		buf_add(&t->resp, "\n", 1);
	}
	free(rs);
	return k;
}

/*
 * PEEK QUEUE partition=P [from=OFF] [since=MS] [last=N] [count=N]
 * [tag=EXPR]: messages of one partition without consuming them; answers
 * "OK N next=OFFSET partitions=P", next being where to go on from.
 */
static int v_peek(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	uint64_t part, from, last, count, since = 0;
	struct tagset tsbuf;
	const struct tagset *tags = NULL;
	(void)c;
	if (ropt_u64(r, "partition", 0, &part, e) < 0 || ropt_u64(r, "from", 0, &from, e) < 0 ||
	    ropt_u64(r, "last", 0, &last, e) < 0 || ropt_u64(r, "count", 0, &count, e) < 0 ||
	    ropt_u64(r, "since", 0, &since, e) < 0)
		return -1;
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq)
		return -1;
	struct queue *q = sq->q;
	if (part >= (uint64_t)q->nparts)
		return err_set(e, MQ_EX_USAGE, "partition %" PRIu64 " does not exist (the queue has %d)",
		               part, q->nparts);
	if (tagset_parse(preq_opt(r, "tag"), &tsbuf, &tags, e) < 0)
		return -1;
	struct reader rd;
	struct part *p = &q->parts[part];
	uint64_t n = 0, next = from;
	int k = 0;
	if (preq_opt(r, "since") && !preq_opt(r, "from") &&
	    part_offset_for_time(p, (int64_t)since, &from, e) < 0)
		k = -1;
	if (k == 0 && rd_open(&rd, p, from, e) < 0)
		k = -1;
	if (k == 0) {
		if (preq_opt(r, "last"))
			k = rd_seek(&rd, rd.h.next > last ? rd.h.next - last : 0, e);
		rd.min_ts = preq_opt(r, "since") ? (int64_t)since : INT64_MIN;
		rd.tags = tags;
		struct rec_msg m;
		while (k == 0 && (count == 0 || n < count) && t->resp.len < MQ_ANSWER_MAX &&
		       n < MQ_ANSWER_MSGS && (k = rd_next(&rd, &m, e)) == 1) {
			proto_msg(&t->resp, (int)part, &m, 0, 0);
			next = m.offset + 1;
			n++;
			k = 0;
		}
		if (k == 0 && n == 0)
			next = rd.h.next > from ? rd.h.next : from;
		rd_close(&rd);
	}
	if (tags)
		tagset_free(&tsbuf);
	if (k < 0) {
		t->resp.len = 0;
		return -1;
	}
	buf_printf(&t->resp, "OK %" PRIu64 " next=%" PRIu64 " partitions=%d\n", n, next, q->nparts);
	return 0;
}

static int v_ls(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                struct mq_err *e)
{
	char **names;
	size_t n;
	(void)r;
	if (q_list(s->sp, &names, &n, e) < 0)
		return -1;
	size_t shown = 0;
	for (size_t i = 0; i < n; i++) {
		struct mq_err ignored;
		if (srv_allowed(s, c, NEED_READ, names[i], &ignored) < 0 &&
		    srv_allowed(s, c, NEED_WRITE, names[i], &ignored) < 0)
			continue; /* a queue this token may neither read nor write */
		buf_printf(&t->resp, "QUEUE %s\n", names[i]);
		shown++;
	}
	buf_printf(&t->resp, "OK %zu\n", shown);
	names_free(names, n);
	return 0;
}

/* One group of a STAT or GROUPS answer. */
static void proto_group(struct buf *b, const struct gstat *g, int nparts)
{
	buf_printf(b, "GROUP %s %" PRIu64 " %" PRIu64 " %" PRIu64 " ", g->name, g->lag, g->leased,
	           g->waiting);
	if (g->oldest_ts == INT64_MAX)
		buf_add(b, "-", 1);
	else
		buf_printf(b, "%" PRId64, g->oldest_ts);
	for (int i = 0; i < nparts; i++)
		buf_printf(b, "%c%" PRIu64, i ? ',' : ' ', g->off[i]);
	buf_add(b, "\n", 1);
}

/* STAT QUEUE (or GROUPS QUEUE, the same): "STAT NAME PARTITIONS MESSAGES
 * BYTES SEGMENTS OLDEST NEXT,..." then a GROUP line per group.
 * GROUP NAME LAG LEASED RETRYING OLDEST OFFSET,...; OLDEST is a timestamp
 * in ms, or '-'. */
static int v_stat(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	struct qstat st;
	(void)c;
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq)
		return -1;
	if (q_stat(sq->q, &st, e) < 0) {
		q_stat_free(&st);
		return -1;
	}
	buf_printf(&t->resp, "STAT %s %d %" PRIu64 " %" PRIu64 " %" PRIu64 " ", sq->q->name,
	           st.nparts, st.messages, st.bytes, st.segments);
	if (st.oldest_ts == INT64_MAX)
		buf_add(&t->resp, "-", 1);
	else
		buf_printf(&t->resp, "%" PRId64, st.oldest_ts);
	for (int i = 0; i < st.nparts; i++)
		buf_printf(&t->resp, "%c%" PRIu64, i ? ',' : ' ', st.next[i]);
	buf_add(&t->resp, "\n", 1);
	for (size_t g = 0; g < st.ngroups; g++)
		proto_group(&t->resp, &st.g[g], st.nparts);
	buf_printf(&t->resp, "OK %zu\n", st.ngroups);
	q_stat_free(&st);
	return 0;
}

/* SEEK QUEUE group=G to=WHERE [partition=P]: "OFFSET P OFF" per partition. */
static int v_seek(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	const char *g = preq_opt(r, "group"), *to = preq_opt(r, "to");
	uint64_t part = 0;
	(void)c;
	if (!g || !to)
		return err_set(e, MQ_EX_USAGE, "group= and to= are required");
	if (ropt_u64(r, "partition", 0, &part, e) < 0 || seek_check(to, e) < 0 ||
	    q_check_name("group", g, e) < 0)
		return -1;
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq)
		return -1;
	int p = preq_opt(r, "partition") ? (int)part : -1;
	if (preq_opt(r, "partition") && part >= (uint64_t)sq->q->nparts)
		return err_set(e, MQ_EX_USAGE, "partition %" PRIu64 " does not exist (the queue has %d)",
		               part, sq->q->nparts);
	uint64_t *now = calloc((size_t)sq->q->nparts, sizeof *now);
	if (!now)
		abort();
	int n = grp_seek_to(sq->q, g, p, to, now, e);
	for (int i = 0; i < n; i++)
		buf_printf(&t->resp, "OFFSET %d %" PRIu64 "\n", p >= 0 ? p : i, now[i]);
	free(now);
	if (n < (p >= 0 ? 1 : sq->q->nparts)) {
		t->resp.len = 0;
		return -1;
	}
	buf_printf(&t->resp, "OK %d\n", n);
	return 0;
}

/* CREATE QUEUE [SETTING=VALUE]... [if-not-exists=1] */
static int v_create(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                    struct mq_err *e)
{
	struct kv set[NSETTINGS];
	int nset = 0, ine = 0;
	const char *name = preq_pos(r, 0);
	(void)c;
	for (int i = 1; i < r->n; i++) {
		struct ptok *k = &r->t[i];
		size_t j = 0;
		if (!k->name)
			continue;
		if (!strcmp(k->name, "if-not-exists")) {
			ine = !strcmp(k->val, "1");
			continue;
		}
		while (j < NSETTINGS && strcmp(settings[j].name, k->name))
			j++;
		if (j == NSETTINGS)
			return err_set(e, MQ_EX_USAGE, "unknown setting '%s'", k->name);
		if (nset < (int)NSETTINGS)
			set[nset++] = (struct kv){k->name, k->val};
	}
	if (q_check_name("queue", name, e) < 0)
		return -1;
	int k = q_exists(s->sp, name) ? 0 : q_create(s->sp, name, set, nset, e);
	if (k < 0)
		return -1;
	if (k == 0 && !ine)
		return err_set(e, MQ_EX_DATAERR, "queue already exists (use --if-not-exists to accept "
		               "that)");
	buf_adds(&t->resp, "OK\n");
	return 0;
}

/* RM QUEUE... / PURGE QUEUE...: the server lets go of its handle first. */
static int v_rm(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                struct mq_err *e)
{
	int purge = !strcasecmp(r->t[0].val, "PURGE");
	(void)c;
	for (int i = 0; i < preq_npos(r); i++) {
		const char *name = preq_pos(r, i);
		if (q_check_name("queue", name, e) < 0)
			return -1;
		for (struct sq *q = s->queues; q; q = q->next)
			if (!strcmp(q->q->name, name)) {
				sq_close(s, q);
				break;
			}
		if ((purge ? q_purge(s->sp, name, e) : q_remove(s->sp, name, e)) < 0) {
			char msg[sizeof e->msg];
			strfmt(msg, sizeof msg, "%s: %s", name, e->msg);
			strfmt(e->msg, sizeof e->msg, "%s", msg);
			return -1;
		}
	}
	buf_adds(&t->resp, "OK\n");
	return 0;
}

/* DELGROUP QUEUE GROUP: forget a group (mq groups rm). */
static int v_delgroup(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                      struct mq_err *e)
{
	(void)c;
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	if (!sq || grp_remove(sq->q, preq_pos(r, 1), e) < 0)
		return -1;
	buf_adds(&t->resp, "OK\n");
	return 0;
}

/* STATS: "STAT NAME VALUE" lines about the server. */
static int v_stats(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                   struct mq_err *e)
{
	(void)c, (void)r, (void)e;
	int nq = 0;
	for (struct sq *q = s->queues; q; q = q->next)
		nq++;
	buf_printf(&t->resp, "STAT uptime_ms %" PRId64 "\nSTAT connections %d\n"
	           "STAT connections_accepted %" PRIu64 "\nSTAT connections_refused %" PRIu64 "\n"
	           "STAT messages_in %" PRIu64 "\nSTAT messages_out %" PRIu64 "\n"
	           "STAT bytes_in %" PRIu64 "\nSTAT bytes_out %" PRIu64 "\nSTAT commits %" PRIu64
	           "\nSTAT open_queues %d\nOK\n", mono_ms() - s->started_ms, s->nconns, s->accepted,
	           s->refused, s->msgs_in, s->msgs_out, s->bytes_in, s->bytes_out, s->commits, nq);
	return 0;
}

/* A line of text as a "LINE TEXT" data line of an answer. */
static void resp_line(void *ctx, const char *text)
{
	struct buf *b = ctx;
	buf_adds(b, "LINE ");
	proto_esc(b, text, strlen(text));
	buf_add(b, "\n", 1);
}

/* CONFIG [QUEUE]: the lines `mq config` prints, as LINE lines. */
static int v_config(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                    struct mq_err *e)
{
	(void)c;
	if (conf_report(s->sp, preq_pos(r, 0), resp_line, &t->resp, e) < 0)
		return -1;
	buf_adds(&t->resp, "OK\n");
	return 0;
}

/* VERIFY [QUEUE...] [repair=1]: what `mq verify` reports, as LINE lines,
 * then "OK DAMAGED REPAIRED QUEUES PARTITIONS".  The loop waits for it:
 * the server serves nobody else meanwhile. */
static int v_verify(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                    struct mq_err *e)
{
	char **names = NULL;
	size_t n = 0, parts = 0, checked = 0;
	uint64_t repair = 0;
	int np = preq_npos(r), rc = 0;
	struct vrep vr = {resp_line, &t->resp, 0, 0, NULL};
	if (ropt_u64(r, "repair", 0, &repair, e) < 0)
		return -1;
	if (np == 0 && q_list(s->sp, &names, &n, e) < 0)
		return -1;
	srv_commit(s, 0); /* what the shared producers hold, on disk first (a busy partition
	                     stays busy: verifying it then answers 75) */
	size_t total = np ? (size_t)np : n;
	for (size_t i = 0; i < total && rc == 0; i++) {
		struct queue *q = NULL;
		const char *name = np ? preq_pos(r, (int)i) : names[i];
		struct mq_err ignored;
		if (!np && srv_allowed(s, c, NEED_WRITE, name, &ignored) < 0)
			continue; /* all queues: those this token may write */
		struct sq *sq; /* the server's own handle would keep the writer's lock */
		for (sq = s->queues; sq && strcmp(sq->q->name, name); sq = sq->next)
			;
		if (sq && sq_busy(s, sq) && repair) {
			rc = err_set(e, MQ_EX_TEMPFAIL, "queue '%s' is in use on this server (a get waits "
			             "or a put is arriving); try again", name);
			break;
		}
		if (sq && !sq_busy(s, sq))
			sq_close(s, sq);
		rc = q_open(s->sp, name, 0, NULL, 0, &q, e) < 0 || verify_queue(q, (int)repair, &vr, e) < 0
		     ? -1 : 0;
		if (q)
			parts += (size_t)q->nparts, checked++;
		q_close(q);
	}
	names_free(names, n);
	if (rc == 0)
		buf_printf(&t->resp, "OK %d %d %zu %zu\n", vr.damaged, vr.repaired, checked, parts);
	return rc;
}

/* BEGIN QUEUE [create=0]: the connection's transaction; PUT ... txn=1
 * adds to it, PREPARE stores it.  Answers "OK txn=NAME". */
static int v_begin(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                   struct mq_err *e)
{
	uint64_t create = 1;
	const char *name = preq_pos(r, 0);
	if (c->tx)
		return err_set(e, MQ_EX_USAGE, "a transaction of '%s' is begun on this connection: "
		               "PREPARE it first", c->txq->name);
	if (ropt_u64(r, "create", 1, &create, e) < 0 ||
	    q_open(s->sp, name, (int)create, NULL, 0, &c->txq, e) < 0)
		return -1;
	if (!(c->tx = calloc(1, sizeof *c->tx)))
		abort();
	if (txn_open(c->txq, NULL, TX_CREATE, c->tx, e) < 0) {
		srv_tx_drop(s, c);
		return -1;
	}
	c->txbad = 0;
	buf_printf(&t->resp, "OK txn=%s\n", c->tx->name);
	return 0;
}

/* PREPARE QUEUE: sync the connection's transaction and write its slot;
 * from the answer on it exists (open) until COMMIT or ROLLBACK. */
static int v_prepare(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                     struct mq_err *e)
{
	(void)s;
	if (!c->tx || strcmp(c->txq->name, preq_pos(r, 0)))
		return err_set(e, MQ_EX_USAGE, "no transaction of '%s' begun on this connection",
		               preq_pos(r, 0));
	if (c->pcl)
		return err_set(e, MQ_EX_USAGE, "the transaction begun is a pipe step: PIPECOMMIT it");
	int rc = 0;
	if (c->txbad)
		rc = err_set(e, MQ_EX_DATAERR, "a put into this transaction failed: it is dropped");
	else if (txn_seal(c->tx, 1, e) < 0)
		rc = -1;
	else
		buf_printf(&t->resp, "OK txn=%s\n", c->tx->name);
	srv_tx_drop(s, c); /* removes it unless sealed */
	return rc;
}

/* The transaction file NAME of an existing queue, for the verbs below:
 * returns txn_find()'s answer; -2 (busy) is 75, try again. */
static int srv_txn(struct srv *s, struct preq *r, struct sq **sq, struct txn *tx,
                   struct mq_err *e)
{
	const char *name = preq_pos(r, 1);
	if (!(*sq = srv_queue(s, preq_pos(r, 0), 0, e)))
		return -1;
	if (!txn_hexname(name))
		return err_set(e, MQ_EX_USAGE, "bad transaction name '%s' (16 hex digits)", name);
	int k = txn_find((*sq)->q, name, 1, tx, e);
	if (k == -2)
		return err_set(e, MQ_EX_TEMPFAIL, "transaction '%s:%s' is busy (another process is "
		               "ending or checking it)", preq_pos(r, 0), name);
	return k;
}

/* COMMIT QUEUE NAME, ROLLBACK QUEUE NAME: "OK committed" or "OK rolled
 * back" (the state it ended in: the other end may have won), or 66. */
static int v_end(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                 struct mq_err *e)
{
	struct sq *sq;
	struct txn tx;
	int commit = !strcasecmp(r->t[0].val, "COMMIT");
	(void)c;
	int k = srv_txn(s, r, &sq, &tx, e);
	if (k == 1) {
		k = commit ? txn_commit(&tx, e) : txn_rollback(&tx, e);
		txn_free(&tx);
	}
	if (k < 0)
		return -1;
	if (k == 0)
		return err_set(e, MQ_EX_NOINPUT, "no such transaction '%s:%s' (never begun, or ended "
		               "long ago)", preq_pos(r, 0), preq_pos(r, 1));
	if (k == MQ_TXN_COMMITTED)
		sq->changed = 1; /* waiting readers look again */
	buf_printf(&t->resp, "OK %s\n", k == MQ_TXN_COMMITTED ? "committed" : "rolled-back");
	return 0;
}

static int stxn_count(void *ctx, int part, struct rec_msg *m, struct mq_err *e)
{
	(void)part, (void)m, (void)e;
	++*(uint64_t *)ctx;
	return 0;
}

/* TXNS QUEUE: "TXN NAME CREATED_MS CHECKS MESSAGES STATE" for each open
 * transaction (STATE open, committing or pipe), then "OK N". */
static int v_txns(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	char dir[PATH_MAX + 32], **files;
	size_t nf, n = 0;
	struct sq *sq = srv_queue(s, preq_pos(r, 0), 0, e);
	(void)c;
	if (!sq)
		return -1;
	txn_dir(sq->q, "", dir, sizeof dir);
	if (dir_names(dir, txn_filename, &files, &nf, e) < 0)
		return -1;
	for (size_t f = 0; f < nf; f++) {
		struct txn tx;
		uint64_t msgs = 0;
		if (txn_open(sq->q, files[f], TX_NOLOCK, &tx, e) == 1 && tx.valid &&
		    tx.state < MQ_TXN_COMMITTED && txn_walk(&tx, stxn_count, &msgs, e) == 0) {
			buf_adds(&t->resp, "TXN ");
			proto_esc(&t->resp, files[f], strlen(files[f]));
			buf_printf(&t->resp, " %" PRId64 " %u %" PRIu64 " %s\n", tx.created, tx.checks, msgs,
			           tx.flags & MQ_TXN_PIPE ? "pipe" : tx.state == MQ_TXN_OPEN ? "open"
			           : "committing");
			n++;
		}
		txn_free(&tx);
	}
	names_free(files, nf);
	buf_printf(&t->resp, "OK %zu\n", n);
	return 0;
}

static int stxn_msg(void *ctx, int part, struct rec_msg *m, struct mq_err *e)
{
	(void)e;
	proto_msg(ctx, part, m, 0, 0);
	return 0;
}

/* TXNCHECK QUEUE NAME: count one check of an open transaction (synced)
 * and answer its messages as MSG frames, then "OK N checks=C
 * created=MS"; one whose commit was cut short is finished: "OK 0
 * state=committed"; an ended one "OK 0 state=committed|rolled-back". */
static int v_txncheck(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                      struct mq_err *e)
{
	struct sq *sq;
	struct txn tx;
	(void)c;
	int k = srv_txn(s, r, &sq, &tx, e);
	if (k == 1 && tx.state == MQ_TXN_COMMITTING) {
		k = txn_commit(&tx, e);
		txn_free(&tx);
		sq->changed = k == MQ_TXN_COMMITTED;
	}
	if (k < 0)
		return -1;
	if (k == 0)
		return err_set(e, MQ_EX_NOINPUT, "no such transaction '%s:%s'", preq_pos(r, 0),
		               preq_pos(r, 1));
	if (k != 1) {
		buf_printf(&t->resp, "OK 0 state=%s\n", k == MQ_TXN_COMMITTED ? "committed"
		           : "rolled-back");
		return 0;
	}
	size_t mark = t->resp.len;
	uint64_t n = 0;
	tx.checks++;
	int rc = txn_slot_write(&tx, 1, e) < 0 || txn_walk(&tx, stxn_msg, &t->resp, e) < 0 ? -1
	         : txn_walk(&tx, stxn_count, &n, e);
	if (rc < 0)
		t->resp.len = mark;
	else
		buf_printf(&t->resp, "OK %" PRIu64 " checks=%u created=%" PRId64 "\n", n, tx.checks,
		           tx.created);
	txn_free(&tx);
	return rc;
}

/*
 * mq pipe through a server: a step is PIPEGET (the messages, for the
 * client's filter; nothing recorded), PIPEBEGIN (the same messages
 * taken again under the group's claim, which the connection then holds),
 * PUT DEST COUNT txn=1 (the filter's output) and PIPECOMMIT (output and
 * offsets together, pipe_commit()).  A connection that goes before
 * PIPECOMMIT leaves the source as it was.
 */
static int spipe_emit(void *ctx, int part, const struct rec_msg *m, unsigned attempt)
{
	struct ticket *t = ctx;
	proto_msg(&t->resp, part, m, attempt, 0);
	return t->resp.len >= MQ_ANSWER_MAX;
}

static int spipe_names(struct srv *s, struct conn *c, struct preq *r, struct mq_err *e)
{
	if (srv_allowed(s, c, NEED_WRITE, preq_pos(r, 1), e) < 0 ||
	    q_check_name("queue", preq_pos(r, 1), e) < 0 || q_check_name("group", preq_pos(r, 2), e) < 0)
		return -1;
	if (!strcmp(preq_pos(r, 0), preq_pos(r, 1)))
		return err_set(e, MQ_EX_USAGE, "SOURCE and DEST must differ");
	return 0;
}

/* PIPEGET SOURCE DEST GROUP [count=N] [wait=MS]: up to N (default 100)
 * of the group's next messages of one partition of SOURCE as MSG frames,
 * then "OK N partition=P lo=L hi=H sum=S" to give PIPEBEGIN, or "OK 0
 * busy=B" (B partitions held by other consumers: ask again soon).  A
 * step DEST holds decided for that partition is finished first. */
static int srv_pipeget(struct srv *s, struct ticket *t, struct preq *r, struct mq_err *e)
{
	uint64_t want, wait = 0;
	const char *g = preq_pos(r, 2);
	struct sq *sq, *dq;
	if (ropt_u64(r, "count", 100, &want, e) < 0 || ropt_u64(r, "wait", 0, &wait, e) < 0 ||
	    spipe_names(s, t->c, r, e) < 0 || !(sq = srv_queue(s, preq_pos(r, 0), 0, e)) ||
	    !(dq = srv_queue(s, preq_pos(r, 1), 1, e)))
		return -1;
	if (want == 0 || want > MQ_ANSWER_MSGS)
		want = MQ_ANSWER_MSGS;
	struct queue *q = sq->q;
	struct ptake pt = {0};
	struct mq_err te;
	int busy = 0, part = 0;
	dly_tick(q, &te);
	unsigned start = s->rr++;
	for (int j = 0; j < q->nparts && pt.n == 0; j++) {
		struct claim cl;
		struct txn tx;
		struct mq_err re;
		part = (int)((start + (unsigned)j) % (unsigned)q->nparts);
		int k = grp_claim(q, g, part, CL_ORDERED | CL_NONBLOCK, &cl, e);
		busy += k == 0;
		if (k < 0)
			return -1;
		if (k == 0)
			continue;
		size_t mark = t->resp.len;
		int rc = pipe_open(&cl, dq->q, &tx, e) < 0 || pipe_take(&cl, want, spipe_emit, t, &pt,
		                                                          e) < 0 ? -1 : 0;
		txn_free(&tx);
		grp_untake(&cl); /* nothing recorded */
		if (grp_release(&cl, &re) < 0 && rc == 0)
			rc = (*e = re, -1);
		if (rc < 0) {
			t->resp.len = mark;
			return -1;
		}
	}
	if (pt.n == 0 && busy == 0 && preq_opt(r, "wait")) {
		if (t->kind != TK_WAIT) {
			t->deadline = wait ? mono_ms() + (int64_t)wait : -1;
			t->wq = sq;
		}
		if (t->deadline < 0 || mono_ms() < t->deadline)
			return 1;
	}
	if (pt.n == 0)
		buf_printf(&t->resp, "OK 0 busy=%d\n", busy);
	else
		buf_printf(&t->resp, "OK %" PRIu64 " partition=%d lo=%" PRIu64 " hi=%" PRIu64 " sum=%"
		           PRIu32 "\n", pt.n, part, pt.lo, pt.hi, pt.sum);
	s->msgs_out += pt.n;
	return 0;
}

static int v_pipeget(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                     struct mq_err *e)
{
	return srv_waiting(s, c, r, t, srv_pipeget, e);
}

/* PIPEBEGIN SOURCE DEST GROUP PARTITION n=N lo=L hi=H sum=S: take
 * PIPEGET's messages again under the group's claim of the partition, to
 * be committed by PIPECOMMIT with the PUT DEST COUNT txn=1 between; 75
 * when the partition is busy or its messages are no longer those (the
 * client takes them again). */
static int v_pipebegin(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                       struct mq_err *e)
{
	uint64_t part;
	struct ptake pt = {0};
	uint64_t sum = 0;
	if (c->tx)
		return err_set(e, MQ_EX_USAGE, "a transaction of '%s' is begun on this connection: "
		               "end it first", c->txq->name);
	if (parse_u64(preq_pos(r, 3), &part) < 0)
		return err_set(e, MQ_EX_USAGE, "bad partition '%s'", preq_pos(r, 3));
	if (ropt_u64(r, "n", 0, &pt.n, e) < 0 || ropt_u64(r, "lo", 0, &pt.lo, e) < 0 ||
	    ropt_u64(r, "hi", 0, &pt.hi, e) < 0 || ropt_u64(r, "sum", 0, &sum, e) < 0 ||
	    spipe_names(s, c, r, e) < 0)
		return -1;
	if (pt.n == 0 || pt.n > MQ_ANSWER_MSGS || sum > UINT32_MAX)
		return err_set(e, MQ_EX_USAGE, "PIPEBEGIN needs n, lo, hi and sum as PIPEGET gave them");
	pt.sum = (uint32_t)sum;
	if (q_open(s->sp, preq_pos(r, 0), 0, NULL, 0, &c->psrc, e) < 0 ||
	    q_open(s->sp, preq_pos(r, 1), 1, NULL, 0, &c->txq, e) < 0)
		goto fail;
	if (part >= (uint64_t)c->psrc->nparts) {
		err_set(e, MQ_EX_USAGE, "partition %" PRIu64 " does not exist (the queue has %d)",
		        part, c->psrc->nparts);
		goto fail;
	}
	struct claim *cl = calloc(1, sizeof *cl);
	if (!cl || !(c->tx = calloc(1, sizeof *c->tx)) || !(c->pgroup = strdup(preq_pos(r, 2))))
		abort();
	c->tx->fd = -1; /* (pipe_open() fills it in) */
	int k = grp_claim(c->psrc, c->pgroup, (int)part, CL_ORDERED | CL_NONBLOCK, cl, e);
	if (k <= 0) {
		free(cl);
		if (k == 0)
			err_set(e, MQ_EX_TEMPFAIL, "partition %" PRIu64 " of '%s' is busy: another consumer "
			        "of group '%s' holds it", part, c->psrc->name, c->pgroup);
		goto fail;
	}
	c->pcl = cl;
	if (pipe_open(cl, c->txq, c->tx, e) < 0 || (k = pipe_retake(cl, &pt, e)) < 0)
		goto fail;
	if (k == 0) {
		err_set(e, MQ_EX_TEMPFAIL, "group '%s' of '%s' partition %" PRIu64 " moved since "
		        "PIPEGET: get the step again", c->pgroup, c->psrc->name, part);
		goto fail;
	}
	if (pipe_begin(c->tx, e) < 0)
		goto fail;
	c->ptk = pt;
	c->txbad = 0;
	buf_adds(&t->resp, "OK\n");
	return 0;
fail:
	srv_tx_drop(s, c);
	return -1;
}

/* PIPECOMMIT DEST: the step begun commits: "OK N" (messages put). */
static int v_pipecommit(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                        struct mq_err *e)
{
	if (!c->pcl || strcmp(c->txq->name, preq_pos(r, 0)))
		return err_set(e, MQ_EX_USAGE, "no pipe step into '%s' begun on this connection "
		               "(PIPEBEGIN first)", preq_pos(r, 0));
	int rc = 0;
	if (c->txbad)
		rc = err_set(e, MQ_EX_DATAERR, "a put into this step failed: it is dropped, and its "
		             "messages come again");
	else if (pipe_commit(c->pcl, c->tx, c->ptk.lo, c->ptk.hi, e) < 0)
		rc = -1;
	else
		buf_printf(&t->resp, "OK %" PRIu64 "\n", c->ptk.n);
	for (struct sq *q = s->queues; rc == 0 && q; q = q->next)
		if (!strcmp(q->q->name, c->txq->name))
			q->changed = 1; /* waiting readers look again */
	srv_tx_drop(s, c);
	return rc;
}

/* MOVE SOURCE DEST [group=G] [count=N]: q_move() (group "move", up to N,
 * at most MQ_ANSWER_MSGS, messages): "OK MOVED busy=B", B partitions
 * skipped because another consumer of the group holds them (ask again
 * for the rest). */
static int v_move(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                  struct mq_err *e)
{
	uint64_t want, moved;
	int busy;
	const char *g = preq_opt(r, "group") ? preq_opt(r, "group") : "move";
	struct sq *sq, *dq;
	if (ropt_u64(r, "count", 0, &want, e) < 0 || q_check_name("group", g, e) < 0 ||
	    srv_allowed(s, c, NEED_WRITE, preq_pos(r, 1), e) < 0)
		return -1;
	if (!strcmp(preq_pos(r, 0), preq_pos(r, 1)))
		return err_set(e, MQ_EX_USAGE, "source and destination are the same queue");
	if (!(sq = srv_queue(s, preq_pos(r, 0), 0, e)) || !(dq = srv_queue(s, preq_pos(r, 1), 1, e)))
		return -1;
	if (want == 0 || want > MQ_ANSWER_MSGS)
		want = MQ_ANSWER_MSGS; /* one request moves a bounded amount: others wait meanwhile */
	int rc = q_move(sq->q, dq->q, g, want, 1, &moved, &busy, e);
	if (moved)
		dq->changed = 1; /* waiting readers look again */
	s->msgs_in += moved;
	if (rc < 0)
		return -1;
	buf_printf(&t->resp, "OK %" PRIu64 " busy=%d\n", moved, busy);
	return 0;
}

static const struct verb verbs[] = {
	{"HELLO", v_hello, 0, 1, NEED_NONE, 0},    {"AUTH", v_auth, 1, 1, NEED_NONE, 0},
	{"PING", v_ping, 0, 0, NEED_NONE, 0},      {"QUIT", v_quit, 0, 0, NEED_NONE, 0},
	{"PUT", v_put, 2, 2, NEED_WRITE, 0},       {"GET", v_get, 1, 1, NEED_READ, 0},
	{"ACK", v_ack, 2, -1, NEED_READ, 0},       {"NACK", v_ack, 2, -1, NEED_READ, 0},
	{"PEEK", v_peek, 1, 1, NEED_READ, 0},      {"LS", v_ls, 0, 0, NEED_AUTH, 0},
	{"STAT", v_stat, 1, 1, NEED_READ, 0},      {"GROUPS", v_stat, 1, 1, NEED_READ, 0},
	{"SEEK", v_seek, 1, 1, NEED_READ, 0},      {"CREATE", v_create, 1, 1, NEED_WRITE, 0},
	{"RM", v_rm, 1, -1, NEED_WRITE, 1},        {"PURGE", v_rm, 1, -1, NEED_WRITE, 1},
	{"DELGROUP", v_delgroup, 2, 2, NEED_READ, 0}, {"STATS", v_stats, 0, 0, NEED_AUTH, 0},
	{"CONFIG", v_config, 0, 1, NEED_READ, 0},  {"VERIFY", v_verify, 0, -1, NEED_WRITE, 1},
	{"WATCH", v_watch, 2, 2, NEED_READ, 0},
	{"BEGIN", v_begin, 1, 1, NEED_WRITE, 0},   {"PREPARE", v_prepare, 1, 1, NEED_WRITE, 0},
	{"COMMIT", v_end, 2, 2, NEED_WRITE, 0},    {"ROLLBACK", v_end, 2, 2, NEED_WRITE, 0},
	{"TXNS", v_txns, 1, 1, NEED_READ, 0},      {"TXNCHECK", v_txncheck, 2, 2, NEED_WRITE, 0},
	{"PIPEGET", v_pipeget, 3, 3, NEED_READ, 0}, {"PIPEBEGIN", v_pipebegin, 4, 4, NEED_READ, 0},
	{"PIPECOMMIT", v_pipecommit, 1, 1, NEED_WRITE, 0}, {"MOVE", v_move, 2, 2, NEED_READ, 0},
};

/* Run one request line (NUL-terminated). */
static void srv_request(struct srv *s, struct conn *c, char *line)
{
	struct ticket *t = tk_new(c, TK_READY);
	struct preq r = {0};
	struct mq_err e = {0};
	const struct verb *v = NULL;
	int rc = proto_parse(line, &r, &e);
	for (size_t i = 0; rc == 0 && i < s->nverbs && !v; i++)
		if (!strcasecmp(r.t[0].val, s->verbs[i].name))
			v = &s->verbs[i];
	if (rc == 0 && !v)
		rc = err_set(&e, MQ_EX_USAGE, "unknown command '%.40s'", r.t[0].val);
	int np = rc == 0 ? preq_npos(&r) : 0;
	if (rc == 0 && (np < v->min_pos || (v->max_pos >= 0 && np > v->max_pos)) &&
	    strcmp(v->name, "PUT"))
		rc = err_set(&e, MQ_EX_USAGE, "%s takes %d%s argument%s, not %d", v->name, v->min_pos,
		             v->max_pos < 0 ? " or more" : v->max_pos > v->min_pos ? " or 1" : "",
		             v->min_pos == 1 && v->max_pos == 1 ? "" : "s", np);
	if (rc == 0 && v->fn == v_put && np != 2) {
		c->eof = c->dead = 1; /* frames would follow that cannot be told from requests */
		rc = err_set(&e, MQ_EX_USAGE, "use PUT QUEUE COUNT [OPTIONS], then COUNT frames");
	}
	for (int i = 0; rc == 0 && v->fn != v_put && i < (v->all_pos && np ? np : 1); i++)
		rc = srv_allowed(s, c, v->need, preq_pos(&r, i), &e); /* a put checks in v_put */
	if (rc == 0)
		s->cur = t, rc = v->fn(s, c, &r, t, &e), s->cur = NULL;
	if (rc < 0)
		tk_err(t, &e);
	if (c->put == t && t->count == 0)
		srv_put_end(s, c);
	preq_free(&r);
}

/* c sent what cannot be told apart from the next request: answer ERR
 * (after the answers before it), read nothing more, close once sent.  A
 * put in progress fails; what it already gave a producer is stored. */
static void srv_refuse(struct srv *s, struct conn *c, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void srv_refuse(struct srv *s, struct conn *c, const char *fmt, ...)
{
	struct mq_err e;
	va_list ap;
	va_start(ap, fmt);
	err_vset(&e, MQ_EX_USAGE, 0, fmt, ap);
	va_end(ap);
	if (c->put) {
		if (!c->put->err.code)
			c->put->err = e;
		srv_put_end(s, c);
	} else {
		tk_err(tk_new(c, TK_READY), &e);
	}
	srv_log(s, "level=warn event=refuse peer=%s error=\"%s\"", c->peer, e.msg);
	c->eof = c->quit = 1;
	c->ipos = c->in.len;
}

/* ----- metrics over HTTP (metrics-listen) ----- */

static void prom(struct buf *b, const char *name, const char *type, const char *help, double v)
{
	buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n%s %.15g\n", name, help, name, type, name, v);
}

/* The Prometheus text exposition of the server and of every queue's groups. */
static void srv_metrics(struct srv *s, struct buf *b)
{
	int nq = 0;
	for (struct sq *q = s->queues; q; q = q->next)
		nq++;
	prom(b, "mq_uptime_seconds", "gauge", "Seconds since the server started.",
	     (double)(mono_ms() - s->started_ms) / 1000);
	prom(b, "mq_connections", "gauge", "Clients connected now.", s->nconns);
	prom(b, "mq_connections_accepted_total", "counter", "Clients accepted.", (double)s->accepted);
	prom(b, "mq_connections_refused_total", "counter", "Clients refused (max-connections).",
	     (double)s->refused);
	prom(b, "mq_messages_in_total", "counter", "Messages stored by puts.", (double)s->msgs_in);
	prom(b, "mq_messages_out_total", "counter", "Messages delivered by gets.", (double)s->msgs_out);
	prom(b, "mq_bytes_in_total", "counter", "Bytes received from clients.", (double)s->bytes_in);
	prom(b, "mq_bytes_out_total", "counter", "Bytes sent to clients.", (double)s->bytes_out);
	prom(b, "mq_commits_total", "counter", "Group commits (producer flushes).", (double)s->commits);
	prom(b, "mq_open_queues", "gauge", "Queues the server holds open.", nq);
	prom(b, "mq_fsync_failures_total", "counter", "fsync and fdatasync calls that failed.",
	     (double)fsync_stats.failed);
	buf_adds(b, "# HELP mq_fsync_seconds Time taken by fsync and fdatasync.\n"
	            "# TYPE mq_fsync_seconds histogram\n");
	for (size_t i = 0; i < NFSYNC_BOUNDS; i++)
		buf_printf(b, "mq_fsync_seconds_bucket{le=\"%g\"} %" PRIu64 "\n", fsync_bounds[i],
		           fsync_stats.le[i]);
	buf_printf(b, "mq_fsync_seconds_bucket{le=\"+Inf\"} %" PRIu64 "\nmq_fsync_seconds_sum %.9f\n"
	           "mq_fsync_seconds_count %" PRIu64 "\n", fsync_stats.n, fsync_stats.sum, fsync_stats.n);
	char **names;
	size_t n;
	struct mq_err e;
	if (q_list(s->sp, &names, &n, &e) < 0)
		return;
	buf_adds(b, "# HELP mq_queue_messages Messages stored in a queue.\n"
	            "# TYPE mq_queue_messages gauge\n");
	struct buf lag = {0};
	buf_adds(&lag, "# HELP mq_group_lag Messages a consumer group has not consumed yet.\n"
	               "# TYPE mq_group_lag gauge\n");
	for (size_t i = 0; i < n; i++) {
		struct sq *sq = NULL; /* an open queue, else opened for this */
		for (sq = s->queues; sq && strcmp(sq->q->name, names[i]); sq = sq->next)
			;
		struct queue *q = sq ? sq->q : NULL;
		struct qstat st;
		if (!q && q_open(s->sp, names[i], 0, NULL, 0, &q, &e) < 0)
			continue;
		int r = q_stat(q, &st, &e);
		if (!sq)
			q_close(q);
		if (r < 0) {
			q_stat_free(&st);
			continue;
		}
		buf_printf(b, "mq_queue_messages{queue=\"%s\"} %" PRIu64 "\n", names[i], st.messages);
		for (size_t g = 0; g < st.ngroups; g++) /* group names are [A-Za-z0-9._-] */
			buf_printf(&lag, "mq_group_lag{queue=\"%s\",group=\"%s\"} %" PRIu64 "\n",
			           names[i], st.g[g].name, st.g[g].lag);
		q_stat_free(&st);
	}
	buf_add(b, lag.p, lag.len);
	buf_free(&lag);
	names_free(names, n);
}

/* A metrics client: once the request head is in, answer it and close. */
static void srv_http(struct srv *s, struct conn *c)
{
	char *p = c->in.p ? c->in.p : "";
	size_t n = c->in.len;
	if (!memmem(p, n, "\r\n\r\n", 4) && !memmem(p, n, "\n\n", 2)) {
		if (n > 16384)
			c->dead = 1;
		return;
	}
	struct buf body = {0};
	const char *status = "200 OK";
	if (!strncmp(p, "GET /metrics ", 13) || !strncmp(p, "GET /metrics?", 13))
		srv_metrics(s, &body);
	else if (!strncmp(p, "GET / ", 6))
		buf_adds(&body, "mq: metrics at /metrics\n");
	else
		status = "404 Not Found", buf_adds(&body, "not found: try /metrics\n");
	buf_printf(&c->out, "HTTP/1.0 %s\r\nContent-Type: text/plain; version=0.0.4; "
	           "charset=utf-8\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", status,
	           body.len);
	buf_add(&c->out, body.p, body.len);
	buf_free(&body);
	c->ipos = c->in.len = 0;
	c->eof = c->quit = 1;
}

/* Parse and run what c sent, as far as it is complete and allowed. */
static void srv_parse(struct srv *s, struct conn *c)
{
	if (c->http) {
		srv_http(s, c);
		return;
	}
	while (!c->dead && !c->waiting && !c->quit) {
		char *p = c->in.p + c->ipos;
		size_t avail = c->in.len - c->ipos;
		if (c->skip) { /* the rest of a refused frame */
			size_t k = avail < c->skip ? avail : (size_t)c->skip;
			c->ipos += k;
			c->skip -= k;
			if (c->skip)
				break;
			if (c->put && c->put->nread == c->put->count)
				srv_put_end(s, c);
			continue;
		}
		if (!c->put && (c->nt >= 4096 || c->out.len - c->opos >= s->o.out_max))
			break;
		char *nl = memchr(p, '\n', avail);
		if (!nl) {
			if (avail > MQ_LINE_MAX)
				srv_refuse(s, c, "request line over %d bytes", MQ_LINE_MAX);
			break;
		}
		size_t ll = (size_t)(nl - p);
		if (ll > MQ_LINE_MAX) {
			srv_refuse(s, c, "request line over %d bytes", MQ_LINE_MAX);
			break;
		}
		if (c->put) {
			/* LEN first, from the raw line: the body may not be here yet,
			 * and a refused or failed put's bodies are never buffered */
			char *end;
			errno = 0;
			unsigned long long blen = isdigit((unsigned char)*p) ? strtoull(p, &end, 10) : 0;
			if (!isdigit((unsigned char)*p) || errno || (*end != ' ' && *end != '\r' && *end != '\n')) {
				srv_refuse(s, c, "bad frame header (LEN[ key=K][ tag=T])");
				break;
			}
			int64_t max = c->psq ? c->psq->q->conf.max_message : 0;
			if (c->put->err.code || !c->ppr || blen > (unsigned long long)max) {
				if (!c->put->err.code) /* refused without buffering it */
					err_set(&c->put->err, MQ_EX_DATAERR, "message %" PRIu64 " is longer than "
					        "the maximum of %" PRId64 " bytes (max-message-bytes); it and the rest "
					        "of the put were not written", c->put->nread + 1, max);
				c->put->nread++;
				c->ipos += ll + 1;
				c->skip = (uint64_t)blen + 1;
				c->progress_ms = mono_ms();
				continue;
			}
			if (avail < ll + 1 + blen + 1) { /* the body is still arriving */
				buf_reserve(&c->in, ll + 1 + (size_t)blen + 1 - avail);
				break;
			}
			if (nl[1 + blen] != '\n') {
				srv_refuse(s, c, "frame body not followed by a newline");
				break;
			}
			struct preq *r = &c->fr;
			*nl = 0;
			if (ll && p[ll - 1] == '\r')
				p[ll - 1] = 0;
			if (proto_parse(p, r, &(struct mq_err){0}) < 0) {
				srv_refuse(s, c, "bad frame header (LEN[ key=K][ tag=T])");
				break;
			}
			struct ptok *key = NULL, *tag = NULL;
			for (int i = 1; i < r->n; i++)
				if (r->t[i].name && !strcmp(r->t[i].name, "key"))
					key = &r->t[i];
				else if (r->t[i].name && !strcmp(r->t[i].name, "tag"))
					tag = &r->t[i];
			srv_frame(s, c, nl + 1, (size_t)blen, key, tag);
			c->ipos += ll + 1 + (size_t)blen + 1;
			c->progress_ms = mono_ms();
			if (c->put->nread == c->put->count)
				srv_put_end(s, c);
			continue;
		}
		*nl = 0;
		if (ll && p[ll - 1] == '\r')
			p[ll - 1] = 0;
		c->ipos += ll + 1;
		c->progress_ms = mono_ms();
		if (*p)
			srv_request(s, c, p);
	}
	if (c->ipos == c->in.len) {
		c->ipos = c->in.len = 0;
	} else if (c->ipos > 65536 && c->ipos > c->in.len / 2) {
		memmove(c->in.p, c->in.p + c->ipos, c->in.len - c->ipos);
		c->in.len -= c->ipos;
		c->ipos = 0;
	}
}

static void srv_read(struct srv *s, struct conn *c)
{
	size_t got = 0;
	while (got < s->o.in_chunk) {
		buf_reserve(&c->in, 65536);
		ssize_t k = recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len, 0);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (k <= 0) {
			c->eof = 1;
			if (k < 0)
				c->dead = 1;
			break;
		}
		c->in.len += (size_t)k;
		got += (size_t)k;
	}
	if (got) {
		s->bytes_in += got;
		c->last_ms = mono_ms();
	}
	srv_parse(s, c);
}

static void srv_accept(struct srv *s, struct lsn *l)
{
	for (;;) {
		struct sockaddr_storage sa;
		socklen_t sl = sizeof sa;
		int fd = accept4(l->fd, (struct sockaddr *)&sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE)
				srv_log(s, "level=warn event=accept error=\"%s\"", strerror(errno));
			return;
		}
		if (s->nconns >= s->o.max_conns && !l->http) {
			static const char msg[] = "ERR 75 too many connections\n";
			(void)!write(fd, msg, sizeof msg - 1);
			close(fd);
			s->refused++;
			continue;
		}
		struct conn *c = calloc(1, sizeof *c);
		if (!c)
			abort();
		c->kind = EV_CONN;
		c->fd = fd;
		c->tok = -1;
		c->http = l->http;
		c->last_ms = c->progress_ms = mono_ms();
		char host[64] = "?", port[16] = "?";
		getnameinfo((struct sockaddr *)&sa, sl, host, sizeof host, port, sizeof port,
		            NI_NUMERICHOST | NI_NUMERICSERV);
		strfmt(c->peer, sizeof c->peer, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		struct epoll_event ev = {EPOLLIN | EPOLLRDHUP, {.ptr = c}};
		c->events = EPOLLIN | EPOLLRDHUP;
		if (epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
			close(fd);
			free(c);
			continue;
		}
		c->next = s->conns;
		if (s->conns)
			s->conns->prev = c;
		s->conns = c;
		s->nconns++;
		s->accepted++;
	}
}

/* Bind one listening address; logs the address it got (port 0 picks one). */
static int srv_listen(struct srv *s, const char *addr, int http, struct mq_err *e)
{
	char host[256], port[32];
	struct addrinfo hints = {0}, *res = NULL;
	if (s->nl == 9)
		return err_set(e, MQ_EX_USAGE, "at most 8 listen addresses");
	if (net_split(addr, s->nsr ? MQ_NAMESRV_PORT : MQ_DEFAULT_PORT, host, sizeof host, port,
	              sizeof port, e) < 0)
		return -1;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	int k = getaddrinfo(host, port, &hints, &res);
	if (k)
		return err_set(e, MQ_EX_USAGE, "cannot resolve listen address '%s': %s", addr,
		               gai_strerror(k));
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
	if (fd >= 0) {
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (res->ai_family == AF_INET6)
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
	}
	if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
		err_sys(e, MQ_EX_UNAVAILABLE, "cannot listen on '%s'", addr);
		if (fd >= 0)
			close(fd);
		freeaddrinfo(res);
		return -1;
	}
	freeaddrinfo(res);
	struct sockaddr_storage sa;
	socklen_t sl = sizeof sa;
	char h[64] = "?", p[16] = "?";
	getsockname(fd, (struct sockaddr *)&sa, &sl);
	getnameinfo((struct sockaddr *)&sa, sl, h, sizeof h, p, sizeof p,
	            NI_NUMERICHOST | NI_NUMERICSERV);
	s->l[s->nl] = (struct lsn){EV_LISTEN, fd, http};
	struct epoll_event ev = {EPOLLIN, {.ptr = &s->l[s->nl]}};
	epoll_ctl(s->ep, EPOLL_CTL_ADD, fd, &ev);
	s->nl++;
	char at[300];
	strfmt(at, sizeof at, strchr(h, ':') ? "[%s]:%s" : "%s:%s", h, p);
	if (!http && !s->bound[0])
		strfmt(s->bound, sizeof s->bound, "%s", at);
	srv_log(s, "level=info event=%s addr=%s", http ? "metrics-listen" : "listen", at);
	return 0;
}

/* Tell systemd (Type=notify) through $NOTIFY_SOCKET, without libsystemd. */
static void srv_notify(const char *state)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = {0};
	if (!path || !*path || strlen(path) >= sizeof sa.sun_path)
		return;
	sa.sun_family = AF_UNIX;
	memcpy(sa.sun_path, path, strlen(path));
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = 0; /* the abstract namespace */
	int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa,
	       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path)));
	close(fd);
}

/* ----- registering with the nameservers -----
 *
 * A thread sends each round's REGISTER lines to every nameserver, so a
 * nameserver that is down or slow never stalls the loop; the loop only
 * builds the lines.  On the way out it sends UNREGISTER. */

struct reg {
	pthread_t th;
	pthread_mutex_t mu;
	int stop;              /* under mu */
	uint64_t gen;          /* under mu: bumped with each new msg */
	struct buf msg;        /* under mu: the newest round's lines */
	int nlines;
	char ns[8][256];       /* under mu */
	int nns;
	char addr[300];        /* under mu */
	void (*log)(void *ctx, const char *line);
	void *log_ctx;
};

/* Send lines (n of them) to one nameserver and read an answer to each. */
static int reg_send(const char *ns, const struct buf *msg, int n, struct mq_err *e)
{
	struct rconn c;
	char *line;
	if (rc_open(&c, ns, MQ_NAMESRV_PORT, 2000, e) < 0)
		return -1;
	rc_timeout(&c, 2000);
	int k = rc_send(&c, msg->p, msg->len, e);
	for (int i = 0; k == 0 && i < n; i++)
		while ((k = rc_next(&c, &line, e)) == 1)
			;
	rc_close(&c);
	return k < 0 ? -1 : 0;
}

static void *reg_main(void *arg)
{
	struct reg *r = arg;
	uint64_t sent = 0;
	int state[8] = {0}; /* 1 registered, -1 failing: log only changes */
	for (;;) {
		struct buf msg = {0};
		char ns[8][256], addr[300];
		pthread_mutex_lock(&r->mu);
		int stop = r->stop, nns = r->nns, n = r->nlines;
		uint64_t gen = r->gen;
		memcpy(ns, r->ns, sizeof ns);
		memcpy(addr, r->addr, sizeof addr);
		if (!stop && gen != sent)
			buf_add(&msg, r->msg.p, r->msg.len);
		pthread_mutex_unlock(&r->mu);
		if (stop && sent) {
			buf_printf(&msg, "UNREGISTER %s\n", addr);
			n = 1;
		}
		for (int i = 0; msg.len && i < nns; i++) {
			struct mq_err e;
			int ok = reg_send(ns[i], &msg, n, &e) == 0;
			if (ok && state[i] != 1 && !stop)
				hook_say(r->log, r->log_ctx, "level=info event=registered nameserver=%s as=%s",
				         ns[i], addr);
			else if (!ok && state[i] != -1)
				hook_say(r->log, r->log_ctx, "level=warn event=%s nameserver=%s "
				         "error=\"%s\"", stop ? "unregister" : "register", ns[i], e.msg);
			state[i] = ok ? 1 : -1;
		}
		buf_free(&msg);
		if (stop)
			return NULL;
		sent = gen;
		poll(NULL, 0, 50);
	}
}

/* Each register-interval: this broker's address, role and queues with
 * their partitions, as REGISTER lines of under MQ_LINE_MAX bytes. */
static void srv_register(struct srv *s)
{
	if (!s->o.nns || mono_ms() < s->reg_next)
		return;
	s->reg_next = mono_ms() + s->o.register_ms;
	if (!s->reg) {
		struct reg *r = calloc(1, sizeof *r);
		if (!r)
			abort();
		pthread_mutex_init(&r->mu, NULL);
		r->log = s->log;
		r->log_ctx = s->log_ctx;
		if (pthread_create(&r->th, NULL, reg_main, r)) {
			srv_log(s, "level=error event=register error=\"cannot start a thread\"");
			pthread_mutex_destroy(&r->mu);
			free(r);
			return;
		}
		s->reg = r;
	}
	const char *addr = s->o.advertise[0] ? s->o.advertise : s->bound;
	struct buf b = {0}, line = {0};
	char **names = NULL;
	size_t n = 0;
	struct mq_err e;
	int nl = 0;
	if (q_list(s->sp, &names, &n, &e) < 0)
		srv_log(s, "level=error event=register error=\"%s\"", e.msg);
	for (size_t i = 0; i <= n; i++) {
		struct qconf qc;
		if (i < n && q_conf(s->sp, names[i], NULL, 0, &qc, &e) < 0)
			continue;
		if (i < n)
			buf_printf(&line, " %s:%" PRId64, names[i], qc.partitions);
		if (i == n || line.len > MQ_LINE_MAX / 2) {
			buf_printf(&b, "REGISTER %s role=%s part=%d%s%.*s\n", addr, s->o.role, nl,
			           i < n ? " more=1" : "", (int)line.len, line.p ? line.p : "");
			line.len = 0;
			nl++;
		}
	}
	names_free(names, n);
	buf_free(&line);
	pthread_mutex_lock(&s->reg->mu);
	buf_free(&s->reg->msg);
	s->reg->msg = b;
	s->reg->nlines = nl;
	s->reg->gen++;
	memcpy(s->reg->ns, s->o.ns, sizeof s->reg->ns);
	s->reg->nns = s->o.nns;
	strfmt(s->reg->addr, sizeof s->reg->addr, "%s", addr);
	pthread_mutex_unlock(&s->reg->mu);
}

/* Stop the registering thread; it unregisters first. */
static void srv_unregister(struct srv *s)
{
	if (!s->reg)
		return;
	pthread_mutex_lock(&s->reg->mu);
	s->reg->stop = 1;
	pthread_mutex_unlock(&s->reg->mu);
	pthread_join(s->reg->th, NULL);
	pthread_mutex_destroy(&s->reg->mu);
	buf_free(&s->reg->msg);
	free(s->reg);
	s->reg = NULL;
}

/* ----- the nameserver: brokers, their queues, and routes ----- */

struct nsq {
	char *name;
	int parts;
};

struct broker {
	char addr[256];
	char role[16];
	int64_t seen_ms;       /* monotonic: last complete registration */
	int64_t created_ms;
	struct nsq *q, *pq;    /* queues; pq: a registration still arriving */
	size_t nq, npq, cpq;
	struct broker *next;
};

struct nsreg {
	struct broker *b;
	int nb;
	int64_t scan_ms, expire_ms, scanned_ms;
};

static void nsq_free(struct nsq *q, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(q[i].name);
	free(q);
}

static void broker_free(struct broker *b)
{
	nsq_free(b->q, b->nq);
	nsq_free(b->pq, b->npq);
	free(b);
}

static struct broker **ns_find(struct nsreg *ns, const char *addr)
{
	struct broker **p = &ns->b;
	while (*p && strcmp((*p)->addr, addr))
		p = &(*p)->next;
	return p;
}

/* REGISTER ADDR role=R part=K [more=1] QUEUE:PARTITIONS...: part 0 starts
 * a registration, the line without more=1 completes it. */
static int v_register(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                      struct mq_err *e)
{
	const char *addr = preq_pos(r, 0), *role = preq_opt(r, "role");
	uint64_t part = 0, more = 0;
	(void)c;
	if (strlen(addr) >= sizeof s->nsr->b->addr || !strchr(addr, ':'))
		return err_set(e, MQ_EX_USAGE, "bad broker address '%.80s'", addr);
	if (role && strcmp(role, "master") && strcmp(role, "follower"))
		return err_set(e, MQ_EX_USAGE, "bad role '%.20s' (master, follower)", role);
	if (ropt_u64(r, "part", 0, &part, e) < 0 || ropt_u64(r, "more", 0, &more, e) < 0)
		return -1;
	struct broker **pb = ns_find(s->nsr, addr), *b = *pb;
	if (!b) {
		if (s->nsr->nb >= 4096)
			return err_set(e, MQ_EX_TEMPFAIL, "too many brokers");
		if (!(b = calloc(1, sizeof *b)))
			abort();
		strfmt(b->addr, sizeof b->addr, "%s", addr);
		b->created_ms = mono_ms();
		*pb = b;
		s->nsr->nb++;
	}
	if (part == 0) {
		nsq_free(b->pq, b->npq);
		b->pq = NULL;
		b->npq = b->cpq = 0;
	}
	for (int i = 1; i < preq_npos(r); i++) {
		const char *qs = preq_pos(r, i), *colon = strrchr(qs, ':');
		char name[256];
		uint64_t np;
		if (!colon || (size_t)(colon - qs) >= sizeof name || parse_u64(colon + 1, &np) < 0 ||
		    np < 1 || np > MQ_MAX_PARTITIONS)
			return err_set(e, MQ_EX_USAGE, "bad queue '%.80s' (QUEUE:PARTITIONS)", qs);
		memcpy(name, qs, (size_t)(colon - qs));
		name[colon - qs] = 0;
		if (!name_valid(name))
			return err_set(e, MQ_EX_USAGE, "bad queue name '%.80s'", name);
		if (b->npq >= 1000000)
			return err_set(e, MQ_EX_USAGE, "too many queues");
		if (b->npq == b->cpq &&
		    !(b->pq = realloc(b->pq, (b->cpq = b->cpq ? 2 * b->cpq : 64) * sizeof *b->pq)))
			abort();
		if (!(b->pq[b->npq].name = strdup(name)))
			abort();
		b->pq[b->npq++].parts = (int)np;
	}
	if (!more) {
		int fresh = b->seen_ms == 0;
		nsq_free(b->q, b->nq);
		b->q = b->pq;
		b->nq = b->npq;
		b->pq = NULL;
		b->npq = b->cpq = 0;
		b->seen_ms = mono_ms();
		strfmt(b->role, sizeof b->role, "%s", role ? role : "master");
		if (fresh)
			srv_log(s, "level=info event=register broker=%s role=%s queues=%zu", b->addr,
			        b->role, b->nq);
	}
	buf_adds(&t->resp, "OK\n");
	return 0;
}

static void ns_drop(struct srv *s, struct broker **pb, const char *why)
{
	struct broker *b = *pb;
	srv_log(s, "level=info event=%s broker=%s", why, b->addr);
	*pb = b->next;
	broker_free(b);
	s->nsr->nb--;
}

static int v_unregister(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                        struct mq_err *e)
{
	struct broker **pb = ns_find(s->nsr, preq_pos(r, 0));
	(void)c, (void)e;
	if (*pb)
		ns_drop(s, pb, "unregister");
	buf_adds(&t->resp, "OK\n");
	return 0;
}

/* ROUTE QUEUE: "BROKER ADDR PARTITIONS ROLE" for each live broker that
 * holds it, in the order they registered. */
static int v_route(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                   struct mq_err *e)
{
	const char *q = preq_pos(r, 0);
	int n = 0;
	(void)c, (void)e;
	for (struct broker *b = s->nsr->b; b; b = b->next)
		for (size_t i = 0; b->seen_ms && i < b->nq; i++)
			if (!strcmp(b->q[i].name, q)) {
				buf_printf(&t->resp, "BROKER %s %d %s\n", b->addr, b->q[i].parts, b->role);
				n++;
			}
	buf_printf(&t->resp, "OK %d\n", n);
	return 0;
}

/* BROKERS: "BROKER ADDR QUEUES ROLE AGE_MS" for each live broker. */
static int v_brokers(struct srv *s, struct conn *c, struct preq *r, struct ticket *t,
                     struct mq_err *e)
{
	int n = 0;
	(void)c, (void)r, (void)e;
	for (struct broker *b = s->nsr->b; b; b = b->next)
		if (b->seen_ms) {
			buf_printf(&t->resp, "BROKER %s %zu %s %" PRId64 "\n", b->addr, b->nq, b->role,
			           mono_ms() - b->seen_ms);
			n++;
		}
	buf_printf(&t->resp, "OK %d\n", n);
	return 0;
}

static const struct verb ns_verbs[] = {
	{"HELLO", v_hello, 0, 1, NEED_NONE, 0},     {"PING", v_ping, 0, 0, NEED_NONE, 0},
	{"QUIT", v_quit, 0, 0, NEED_NONE, 0},       {"REGISTER", v_register, 1, -1, NEED_NONE, 0},
	{"UNREGISTER", v_unregister, 1, 1, NEED_NONE, 0},
	{"ROUTE", v_route, 1, 1, NEED_NONE, 0},     {"BROKERS", v_brokers, 0, 0, NEED_NONE, 0},
};

/* Every scan-interval: forget brokers silent longer than expire. */
static void ns_scan(struct srv *s)
{
	struct nsreg *ns = s->nsr;
	int64_t now = mono_ms();
	if (!ns || now - ns->scanned_ms < ns->scan_ms)
		return;
	ns->scanned_ms = now;
	for (struct broker **pb = &ns->b; *pb;)
		if (now - ((*pb)->seen_ms ? (*pb)->seen_ms : (*pb)->created_ms) > ns->expire_ms)
			ns_drop(s, pb, "expire");
		else
			pb = &(*pb)->next;
}

static int srv_init(struct srv *s, struct spool *sp, const struct srv_opts *o, struct mq_err *e)
{
	memset(s, 0, sizeof *s);
	s->sp = sp;
	s->o = *o;
	s->verbs = verbs;
	s->nverbs = sizeof verbs / sizeof *verbs;
	s->started_ms = s->tick_ms = mono_ms();
	dur_lock_nowait = 1;
	s->ep = epoll_create1(EPOLL_CLOEXEC);
	if (s->ep < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot create an epoll instance");
	struct rlimit rl; /* room for many clients: as many fds as allowed */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	return 0;
}

/* A queue's txn-check command: the run going (pid) and when it began. */
struct tchild {
	char queue[MQ_NAME_MAX + 1];
	pid_t pid;
	int64_t last_ms;
};

/*
 * Queues whose settings name a txn-check command get `mq txn check`
 * every txn-check-after, in a child running this program on the spool
 * with the server's settings for the queue; its lines go to the log
 * stream (stderr).  One run per queue at a time; children are reaped here.
 */
static void srv_txn_checks(struct srv *s)
{
	struct mq_err e;
	char **names, exe[PATH_MAX];
	size_t n;
	int64_t now = mono_ms();
	for (int i = 0; i < s->ntck; i++) {
		int st;
		if (s->tck[i].pid <= 0 || waitpid(s->tck[i].pid, &st, WNOHANG) == 0)
			continue;
		if (!WIFEXITED(st) || WEXITSTATUS(st))
			srv_log(s, "level=warn event=txn-check queue=%s status=%d", s->tck[i].queue,
			        WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
		s->tck[i].pid = 0;
	}
	if (!s->sp || now - s->tck_scan_ms < 5000)
		return;
	s->tck_scan_ms = now;
	ssize_t el = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (el <= 0 || q_list(s->sp, &names, &n, &e) < 0)
		return;
	exe[el] = 0;
	for (size_t q = 0; q < n; q++) {
		struct qconf c;
		struct queue fake = {0};
		char dir[PATH_MAX + 32], **files, older[32], maxc[32];
		size_t nf = 0;
		int i;
		if (q_conf(s->sp, names[q], NULL, 0, &c, &e) < 0 || !c.has_txn_check)
			continue;
		q_dir(s->sp, names[q], fake.dir, sizeof fake.dir);
		txn_dir(&fake, "", dir, sizeof dir);
		if (dir_names(dir, txn_hexname, &files, &nf, &e) < 0 || nf == 0) {
			names_free(files, nf);
			continue; /* no open transaction: nothing to run */
		}
		names_free(files, nf);
		for (i = 0; i < s->ntck && strcmp(s->tck[i].queue, names[q]); i++)
			;
		if (i == s->ntck) {
			if (!(s->tck = realloc(s->tck, (size_t)(s->ntck + 1) * sizeof *s->tck)))
				abort();
			memset(&s->tck[i], 0, sizeof s->tck[i]);
			strfmt(s->tck[i].queue, sizeof s->tck[i].queue, "%s", names[q]);
			s->ntck++;
		}
		struct tchild *t = &s->tck[i];
		if (t->pid > 0 || (t->last_ms && now - t->last_ms < (c.txn_after_ms > 1000 ?
		                                                     c.txn_after_ms : 1000)))
			continue;
		strfmt(older, sizeof older, "%" PRId64 "ms", c.txn_after_ms);
		strfmt(maxc, sizeof maxc, "%" PRId64, c.txn_max_checks);
		t->last_ms = now;
		t->pid = fork();
		if (t->pid == 0) {
			dup2(2, 1);
			execl(exe, "mq", "-d", s->sp->dir, "txn", "check", "--older", older, "--max-checks",
			      maxc, names[q], "--", "/bin/sh", "-c", c.txn_check, (char *)NULL);
			_exit(127);
		}
		if (t->pid < 0)
			srv_log(s, "level=error event=txn-check queue=%s error=\"cannot fork: %s\"",
			        names[q], strerror(errno));
		else
			srv_log(s, "level=info event=txn-check queue=%s pid=%ld", names[q], (long)t->pid);
	}
	names_free(names, n);
}

/* Once a second: drop stalled and idle clients; run txn-check commands. */
static void srv_timers(struct srv *s)
{
	srv_txn_checks(s);
	int64_t now = mono_ms();
	for (struct conn *c = s->conns, *n; c; c = n) {
		n = c->next;
		int partial = (c->ipos < c->in.len && !c->waiting) || c->put;
		if (partial && now - c->progress_ms > s->o.request_ms) {
			srv_close(s, c, "request-timeout");
		} else if (!partial && !c->head && now - c->last_ms > s->o.idle_ms) {
			srv_close(s, c, "idle-timeout");
		}
	}
}

/*
 * New settings (SIGHUP): o's tokens replace the old ones, and a client
 * keeps its token only if one of that name and secret is still there.
 * Idle queues are let go, so changed queue settings apply when they are
 * opened again.  Addresses to listen on and the spool need a restart.
 */
static void srv_reconf(struct srv *s, struct srv_opts *o)
{
	srv_commit(s, 0);
	int same = o->nlisten == s->o.nlisten && !strcmp(o->metrics, s->o.metrics) &&
	           !strcmp(o->spool, s->o.spool);
	for (int i = 0; same && i < o->nlisten; i++)
		same = !strcmp(o->listen[i], s->o.listen[i]);
	if (!same)
		srv_log(s, "level=warn event=reload msg=\"listen, metrics-listen and spool change "
		        "only with a restart\"");
	for (struct conn *c = s->conns; c; c = c->next) {
		int keep = -1;
		for (int i = 0; c->tok >= 0 && i < o->ntok && keep < 0; i++)
			if (!strcmp(o->tok[i].name, s->o.tok[c->tok].name) &&
			    !strcmp(o->tok[i].secret, s->o.tok[c->tok].secret))
				keep = i;
		c->tok = keep;
	}
	struct srv_opts old = s->o;
	memcpy(o->listen, old.listen, sizeof o->listen);
	o->nlisten = old.nlisten;
	memcpy(o->metrics, old.metrics, sizeof o->metrics);
	memcpy(o->spool, old.spool, sizeof o->spool);
	s->o = *o;
	srvconf_free(&old);
	for (struct sq *q = s->queues, *nq; q; q = nq) {
		nq = q->next;
		if (!sq_busy(s, q))
			sq_close(s, q);
	}
	for (struct sq *q = s->queues; q; q = q->next)
		q->changed = 1; /* waiting gets look again, and meet the new tokens */
	s->reg_next = 0; /* tell the nameservers (perhaps new ones) at once */
	srv_log(s, "level=info event=reload tokens=%d nameservers=%d", s->o.ntok, s->o.nns);
}

/*
 * Serve until *stop is set: SIGTERM or SIGINT return 0, and then the
 * caller calls srv_free(), which answers what was received.  SIGHUP
 * returns 1, for the caller to read the settings again (srv_reconf) and
 * call srv_run once more.  -1 if the loop itself failed.
 */
static int srv_run(struct srv *s, volatile sig_atomic_t *stop, struct mq_err *e)
{
	struct epoll_event evs[256];
	if (!s->ready) {
		srv_notify("READY=1");
		s->ready = 1;
		if (s->sp)
			srv_register(s);
	}
	while (!*stop || *stop == SIGHUP) {
		if (*stop == SIGHUP) {
			*stop = 0;
			return 1;
		}
		int64_t due = 1000 - (mono_ms() - s->tick_ms);
		for (struct sq *q = s->queues; q; q = q->next) {
			int64_t d = prod_due(&q->pr);
			if (d >= 0 && d < due)
				due = d;
		}
		int n = epoll_wait(s->ep, evs, 256, due < 0 ? 0 : (int)due);
		if (n < 0 && errno != EINTR)
			return err_sys(e, MQ_EX_IOERR, "epoll_wait failed");
		for (int i = 0; i < n; i++) {
			int kind = *(int *)evs[i].data.ptr;
			if (kind == EV_LISTEN) {
				srv_accept(s, evs[i].data.ptr);
			} else if (kind == EV_WATCH) {
				struct sq *q = evs[i].data.ptr;
				wait_change(&q->w, 0);
				q->changed = 1;
			} else {
				struct conn *c = evs[i].data.ptr;
				if (c->waiting && (evs[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
					c->dead = 1; /* gone while its get waits: deliver nothing to it */
				else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))
					srv_read(s, c);
			}
		}
		srv_commit(s, 0);
		int tick = mono_ms() - s->tick_ms >= 1000;
		srv_wake(s, tick);
		for (struct conn *c = s->conns, *nx; c; c = nx) {
			nx = c->next;
			if (!c->waiting && c->ipos < c->in.len && !c->dead)
				srv_parse(s, c); /* held back by a wait or backpressure before */
			srv_send(s, c);
			if (c->dead || (c->eof && (c->put || c->waiting)) ||
			    (c->eof && !c->head && c->opos == c->out.len))
				srv_close(s, c, c->dead ? "error" : "eof");
			else
				srv_events(s, c);
		}
		if (tick) {
			s->tick_ms = mono_ms();
			srv_timers(s);
			if (s->sp)
				srv_register(s);
			ns_scan(s);
		}
	}
	return 0;
}

/* After srv_run(): answer the waiting gets (nothing), commit, send what
 * the clients take within a few seconds, and close everything. */
static void srv_free(struct srv *s)
{
	free(s->tck);
	s->tck = NULL;
	srv_notify("STOPPING=1");
	for (int i = 0; i < s->nl; i++)
		close(s->l[i].fd);
	srv_unregister(s);
	for (struct ticket *t = s->waiting, *n; t; t = n) {
		n = t->wnext;
		buf_adds(&t->resp, "OK 0\n");
		t->kind = TK_READY;
		t->c->waiting = 0;
	}
	s->waiting = NULL;
	dur_lock_nowait = 0; /* stopping: the last commit waits for its partitions */
	srv_commit(s, 1);
	int64_t until = mono_ms() + 5000;
	for (;;) {
		int left = 0;
		for (struct conn *c = s->conns; c; c = c->next) {
			srv_send(s, c);
			left |= c->opos < c->out.len && !c->dead;
		}
		if (!left || mono_ms() > until)
			break;
		poll(NULL, 0, 10);
	}
	while (s->conns)
		srv_close(s, s->conns, "shutdown");
	while (s->queues)
		sq_close(s, s->queues);
	while (s->nsr && s->nsr->b)
		ns_drop(s, &s->nsr->b, "shutdown");
	close(s->ep);
	srv_log(s, "level=info event=stop");
}
#endif /* __linux__ */

/* ===================================================================
 * 14. CLI: option parser, output formats, commands, the command table
 *
 * Parses, validates, opens, calls one operation of the layers below,
 * prints, and picks the exit status (mq.h, enum mq_exit).  The only
 * layer that prints or exits.  stdout is data, stderr diagnostics.
 * =================================================================== */

enum { A_NONE, A_REQ, A_OPTDUR };

struct opt {
	char sh;          /* short letter, or 0 */
	const char *lng;  /* long name, also the lookup key */
	int arg;          /* A_NONE, A_REQ, A_OPTDUR (optional duration) */
	const char *meta; /* argument name in help */
	const char *help;
};

struct args;

struct cmd {
	const char *name;
	int (*fn)(struct args *);
	const char *synopsis;
	const char *summary;
	const struct opt *opts;
	int min_pos, max_pos; /* positional argument counts; -1 = no limit */
	int remote;           /* runs through a server too (-s, $MQ_SERVER) */
};

#define MAX_OPTS 32
struct args {
	const struct cmd *cmd;
	const char *val[MAX_OPTS]; /* last value of each option (or "" if set) */
	int count[MAX_OPTS];
	struct { int i; const char *v; } all[256]; /* every occurrence, in order */
	int nall;
	char **pos;
	int npos;
	struct spool sp;
	const char *queue; /* for error messages */
	const char *server; /* -s HOST:PORT or $MQ_SERVER: run it there */
	const char *namesrv; /* -n HOST:PORT,... or $MQ_NAMESRV: route through them */
	const char *cfg_file; /* serve --config: read in place of SPOOL/mq.yaml */
	int connect_ms;       /* give up connecting to a server after this (0: never) */
};

static const struct opt common_opts[] = {
	{'d', "spool", A_REQ, "DIR", "spool directory (default: $MQ_SPOOL, else /var/spool/mq "
	 "for root, else ~/.local/state/mq)"},
	{'h', "help", A_NONE, NULL, "show this help"},
	{0, NULL, 0, NULL, NULL}};

static const char *progname = "mq";
static volatile sig_atomic_t stop_flag;

/* ----- option parsing ----- */

static size_t opts_count(const struct opt *o)
{
	size_t n = 0;
	while (o && o[n].lng)
		n++;
	return n;
}

/* Find an option by short letter or long name in the command's table,
 * then the common table; returns its index in the combined numbering. */
static int opt_find(const struct cmd *c, char sh, const char *lng, size_t lnglen)
{
	size_t n = opts_count(c->opts);
	for (size_t t = 0; t < 2; t++) {
		const struct opt *o = t ? common_opts : c->opts;
		for (size_t i = 0; o && o[i].lng; i++)
			if ((sh && o[i].sh == sh) ||
			    (lng && strlen(o[i].lng) == lnglen && !strncmp(o[i].lng, lng, lnglen)))
				return (int)(t ? n + i : i);
	}
	return -1;
}

static const struct opt *opt_at(const struct cmd *c, int i)
{
	size_t n = opts_count(c->opts);
	return (size_t)i < n ? &c->opts[i] : &common_opts[(size_t)i - n];
}

static int usage_error(const struct cmd *c, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "%s: %s: ", progname, c->name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\nusage: mq %s %s\n", c->name, c->synopsis);
	return MQ_EX_USAGE;
}

static int dur_like(const char *s)
{
	int64_t ms;
	return parse_duration_ms(s, &ms) == 0;
}

/*
 * Parse argv (after the command name).  Options may come before, between
 * or after positional arguments; "--" ends options.  An optional-duration
 * option (-w) takes the next word when it is a duration and a positional
 * argument is still to come or already seen.  Returns 0 or an exit code.
 */
static int args_parse(struct args *a, const struct cmd *c, int argc, char **argv)
{
	a->cmd = c;
	a->pos = calloc((size_t)argc + 1, sizeof *a->pos);
	if (!a->pos)
		abort();
	int dashdash = 0;
	for (int i = 0; i < argc; i++) {
		char *s = argv[i];
		if (dashdash || s[0] != '-' || s[1] == 0) {
			a->pos[a->npos++] = s;
			continue;
		}
		if (!strcmp(s, "--")) {
			dashdash = 1;
			continue;
		}
		int long_form = s[1] == '-';
		const char *name = s + (long_form ? 2 : 1);
		do {
			const char *eq = long_form ? strchr(name, '=') : NULL;
			size_t len = eq ? (size_t)(eq - name) : strlen(name);
			int k = long_form ? opt_find(c, 0, name, len) : opt_find(c, name[0], NULL, 0);
			if (k < 0 || a->nall >= 256)
				return long_form ? usage_error(c, "unknown option '--%.*s'", (int)len, name)
				                 : usage_error(c, "unknown option '-%c'", name[0]);
			const struct opt *o = opt_at(c, k);
			const char *val = "";
			const char *attached = long_form ? (eq ? eq + 1 : NULL) : (name[1] ? name + 1 : NULL);
			if (o->arg == A_REQ) {
				if (attached)
					val = attached;
				else if (i + 1 < argc)
					val = argv[++i];
				else
					return usage_error(c, "option '%s%s' needs %s", long_form ? "--" : "-",
					                   long_form ? o->lng : (char[]){o->sh, 0}, o->meta);
				name = "";
			} else if (o->arg == A_OPTDUR) {
				if (attached)
					val = attached;
				else if (i + 1 < argc && dur_like(argv[i + 1]) && (a->npos > 0 || i + 2 < argc))
					val = argv[++i];
				name = "";
			} else {
				if (long_form && eq)
					return usage_error(c, "option '--%s' takes no value", o->lng);
				name = long_form ? "" : name + 1;
			}
			a->val[k] = val;
			a->count[k]++;
			a->all[a->nall].i = k;
			a->all[a->nall++].v = val;
		} while (*name);
	}
	return 0;
}

static int opt_index(const struct args *a, const char *lng)
{
	int k = opt_find(a->cmd, 0, lng, strlen(lng));
	assert(k >= 0);
	return k;
}

/* Value of option lng (NULL if absent; "" for a flag or a bare -w). */
static const char *opt_val(const struct args *a, const char *lng)
{
	int k = opt_index(a, lng);
	return a->count[k] ? a->val[k] : NULL;
}

static int opt_has(const struct args *a, const char *lng)
{
	return a->count[opt_index(a, lng)] > 0;
}

/* ----- help ----- */

static void help_opts(FILE *f, const struct opt *o)
{
	for (; o && o->lng; o++) {
		char left[64];
		if (o->sh)
			strfmt(left, sizeof left, "-%c, --%s%s%s", o->sh, o->lng,
			         o->arg == A_REQ ? " " : o->arg == A_OPTDUR ? " [" : "",
			         o->arg ? o->meta : "");
		else
			strfmt(left, sizeof left, "    --%s%s%s", o->lng,
			         o->arg == A_REQ ? " " : o->arg == A_OPTDUR ? " [" : "", o->arg ? o->meta : "");
		if (o->arg == A_OPTDUR)
			strncat(left, "]", sizeof left - strlen(left) - 1);
		fprintf(f, "  %-28s %s\n", left, o->help);
	}
}

static void help_cmd(FILE *f, const struct cmd *c)
{
	fprintf(f, "usage: mq %s %s\n\n%s\n", c->name, c->synopsis, c->summary);
	if (c->opts && c->opts->lng) {
		fprintf(f, "\noptions:\n");
		help_opts(f, c->opts);
	}
	fprintf(f, "\ncommon options:\n");
	help_opts(f, common_opts);
}

/* ----- output ----- */

struct out {
	int fd;
	struct buf b;
	int err; /* errno of the first failed write, 0 if none */
};

static int out_flush(struct out *o)
{
	size_t done = 0;
	while (done < o->b.len && !o->err) {
		ssize_t w = write(o->fd, o->b.p + done, o->b.len - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			o->err = errno;
		else
			done += (size_t)w;
	}
	o->b.len = 0;
	return o->err ? -1 : 0;
}

static void out_add(struct out *o, const void *p, size_t n)
{
	buf_add(&o->b, p, n);
	if (o->b.len >= (256 << 10))
		out_flush(o);
}

static void out_u64(struct out *o, uint64_t v)
{
	char tmp[24], *p = tmp + sizeof tmp;
	do
		*--p = (char)('0' + v % 10);
	while (v /= 10);
	out_add(o, p, (size_t)(tmp + sizeof tmp - p));
}

/* Length of the valid UTF-8 sequence at s (1-4), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];
	size_t len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3
	             : (c & 0xf8) == 0xf0 ? 4 : 0;
	if (len == 0 || len > n || (len == 2 && c < 0xc2) || (len == 4 && c > 0xf4))
		return 0;
	for (size_t i = 1; i < len; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	if ((len == 3 && c == 0xe0 && s[1] < 0xa0) || (len == 3 && c == 0xed && s[1] >= 0xa0) ||
	    (len == 4 && c == 0xf0 && s[1] < 0x90) || (len == 4 && c == 0xf4 && s[1] >= 0x90))
		return 0; /* overlong, surrogate, or past U+10FFFF */
	return len;
}

/* A JSON string: escapes as RFC 8259 requires; bytes that are not valid
 * UTF-8 become U+FFFD, so the output is always valid JSON (use -f '%s'
 * for binary bodies). */
static void out_json_str(struct out *o, const unsigned char *s, size_t n)
{
	out_add(o, "\"", 1);
	size_t run = 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = s[i];
		if (c >= 0x80) {
			size_t k = utf8_len(s + i, n - i);
			if (k) {
				i += k - 1;
				continue;
			}
			out_add(o, s + run, i - run);
			out_add(o, "\xef\xbf\xbd", 3);
			run = i + 1;
			continue;
		}
		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		out_add(o, s + run, i - run);
		run = i + 1;
		char esc[8];
		switch (c) {
		case '"': out_add(o, "\\\"", 2); break;
		case '\\': out_add(o, "\\\\", 2); break;
		case '\n': out_add(o, "\\n", 2); break;
		case '\t': out_add(o, "\\t", 2); break;
		case '\r': out_add(o, "\\r", 2); break;
		default:
			strfmt(esc, sizeof esc, "\\u%04x", c);
			out_add(o, esc, 6);
		}
	}
	out_add(o, s + run, n - run);
	out_add(o, "\"", 1);
}

/* How to print messages: -f FORMAT (kcat-like) or -f json. */
struct msgfmt {
	int json;
	const char *spec; /* format with % directives and \ escapes */
};

static void fmt_headers(struct out *o, const struct rec_msg *m, int json)
{
	const unsigned char *p = m->hdrs, *end = m->hdrs + m->hlen, *name, *val;
	uint64_t left = 0;
	size_t nl, vl;
	p += varint_get(p, end, &left);
	int first = 1;
	if (json)
		out_add(o, "{", 1);
	while (rec_hdr_next(&p, end, &left, &name, &nl, &val, &vl)) {
		if (!first)
			out_add(o, ",", 1);
		first = 0;
		if (json) {
			out_json_str(o, name, nl);
			out_add(o, ":", 1);
			out_json_str(o, val, vl);
		} else {
			out_add(o, name, nl);
			out_add(o, "=", 1);
			out_add(o, val, vl);
		}
	}
	if (json)
		out_add(o, "}", 1);
}

/* What a group consumer adds to a message: its attempt and, when leased,
 * the lease its receipt names. */
struct dlv {
	const char *group;
	unsigned attempt;
	uint32_t lease; /* 0: not leased */
};

/* Through nameservers, the broker a get runs on: receipts name it
 * ("...@HOST:PORT") so that ack -n knows where to send them. */
static const char *receipt_broker;

static void fmt_receipt(struct out *o, const struct dlv *d, int part, const struct rec_msg *m)
{
	if (!d || !d->lease)
		return;
	if (receipt_broker) { /* after the receipt proper, below */
		const char *b = receipt_broker;
		receipt_broker = NULL;
		fmt_receipt(o, d, part, m);
		receipt_broker = b;
		out_add(o, "@", 1);
		out_add(o, b, strlen(b));
		return;
	}
	out_add(o, d->group, strlen(d->group));
	out_add(o, ":", 1);
	out_u64(o, (uint64_t)part);
	out_add(o, ":", 1);
	out_u64(o, m->offset);
	out_add(o, ":", 1);
	out_u64(o, d->lease);
}

static void fmt_msg(struct out *o, const struct msgfmt *f, const char *queue, int part,
                    const struct rec_msg *m, const struct dlv *d)
{
	if (f->json) {
		out_add(o, "{\"queue\":", 9);
		out_json_str(o, (const unsigned char *)queue, strlen(queue));
		out_add(o, ",\"partition\":", 13);
		out_u64(o, (uint64_t)part);
		out_add(o, ",\"offset\":", 10);
		out_u64(o, m->offset);
		out_add(o, ",\"timestamp\":", 13);
		out_u64(o, (uint64_t)m->ts);
		out_add(o, ",\"key\":", 7);
		if (m->has_key)
			out_json_str(o, m->key, m->klen);
		else
			out_add(o, "null", 4);
		out_add(o, ",\"tag\":", 7);
		if (m->has_tag)
			out_json_str(o, m->tag, m->tlen);
		else
			out_add(o, "null", 4);
		out_add(o, ",\"headers\":", 11);
		fmt_headers(o, m, 1);
		if (d) {
			out_add(o, ",\"attempt\":", 11);
			out_u64(o, d->attempt);
		}
		if (d && d->lease) {
			out_add(o, ",\"receipt\":\"", 12);
			fmt_receipt(o, d, part, m);
			out_add(o, "\"", 1);
		}
		out_add(o, ",\"body\":", 8);
		out_json_str(o, m->body, m->blen);
		out_add(o, "}\n", 2);
		return;
	}
	for (const char *s = f->spec; *s; s++) {
		if (*s == '%' && s[1]) {
			switch (*++s) {
			case 's': out_add(o, m->body, m->blen); break;
			case 'k': out_add(o, m->key, m->klen); break;
			case 't': out_add(o, m->tag, m->tlen); break;
			case 'o': out_u64(o, m->offset); break;
			case 'p': out_u64(o, (uint64_t)part); break;
			case 'T': out_u64(o, (uint64_t)m->ts); break;
			case 'q': out_add(o, queue, strlen(queue)); break;
			case 'h': fmt_headers(o, m, 0); break;
			case 'a': out_u64(o, d ? d->attempt : 1); break;
			case 'r': fmt_receipt(o, d, part, m); break;
			case '%': out_add(o, "%", 1); break;
			default: out_add(o, s - 1, 2);
			}
		} else if (*s == '\\' && s[1]) {
			static const char from[] = "ntr0\\", to[] = "\n\t\r\0\\";
			const char *k = strchr(from, *++s);
			if (k)
				out_add(o, to + (k - from), 1);
			else
				out_add(o, s - 1, 2);
		} else {
			out_add(o, s, 1);
		}
	}
}

/* Check a -f FORMAT: known directives only. */
static int fmt_check(const char *spec)
{
	if (!strcmp(spec, "json"))
		return 0;
	for (const char *s = spec; *s; s++)
		if (*s == '%' && (!s[1] || !strchr("sktopTqhar%", *++s)))
			return -1;
	return 0;
}

static void fmt_init(struct msgfmt *f, const struct args *a)
{
	const char *spec = opt_val(a, "format");
	f->json = spec && !strcmp(spec, "json");
	f->spec = spec ? spec : opt_has(a, "null") ? "%s\\0" : "%s\\n";
}

/* Progress on a terminal for long work: one line on stderr, rewritten
 * at most every 200 ms, erased when done or before other output. */
struct progress {
	int on;           /* stderr is a terminal */
	int64_t last_ms;  /* when the line was last drawn */
	int shown;        /* a line is on the screen */
};

static void progress_draw(struct progress *pg, const char *fmt, ...)
{
	int64_t now = mono_ms();
	if (!pg->on || now - pg->last_ms < 200)
		return;
	va_list ap;
	va_start(ap, fmt);
	fputs("\r\033[K", stderr);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fflush(stderr);
	pg->last_ms = now;
	pg->shown = 1;
}

static void progress_clear(struct progress *pg)
{
	if (pg->shown)
		fputs("\r\033[K", stderr);
	pg->shown = 0;
}

/* Parse --tag 'A||B' into ts; '*' (or no --tag) means every message and
 * leaves ts NULL.  Returns 0, or -1 after a usage error. */
static int opt_tags(struct args *a, struct tagset *ts, const struct tagset **out)
{
	struct mq_err e;
	if (tagset_parse(opt_val(a, "tag"), ts, out, &e) == 0)
		return 0;
	return usage_error(a->cmd, "%s", e.msg), -1;
}

/* -f/-0 and --tag of get, peek and tail: checked, then set up.
 * Returns 0, or -1 after a usage error. */
static int opt_output(struct args *a, struct msgfmt *f, struct tagset *ts,
                      const struct tagset **tags)
{
	if (opt_val(a, "format") && fmt_check(opt_val(a, "format")) < 0)
		return usage_error(a->cmd, "bad format '%s'", opt_val(a, "format")), -1;
	fmt_init(f, a);
	return opt_tags(a, ts, tags);
}

/* ----- errors and the spool ----- */

static int fail(struct args *a, const struct mq_err *e)
{
	if (a->queue)
		fprintf(stderr, "%s: %s: %s: %s\n", progname, a->cmd->name, a->queue, e->msg);
	else
		fprintf(stderr, "%s: %s: %s\n", progname, a->cmd->name, e->msg);
	return e->code ? e->code : MQ_EX_IOERR;
}

/* Flush stdio's stdout; a failure (full disk, closed pipe) is 74 with a
 * message, like every other command's. */
static int stdout_done(struct args *a)
{
	if (fflush(stdout) == 0 && !ferror(stdout))
		return MQ_EX_OK;
	struct mq_err e;
	err_sys(&e, MQ_EX_IOERR, "cannot write to stdout");
	a->queue = NULL;
	return fail(a, &e);
}

/* Write in to a command's stdin pipe, then close it.  A command that
 * does not read its input makes the write fail with EPIPE once it exits:
 * that is its business, not an error here. */
static void feed_close(int fd, const struct buf *in)
{
	for (size_t done = 0; done < in->len;) {
		ssize_t w = write(fd, in->p + done, in->len - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			break;
		done += (size_t)w;
	}
	close(fd);
}

static void notice_stderr(void *ctx, const char *msg)
{
	(void)ctx;
	fprintf(stderr, "%s: %s\n", progname, msg);
}

/* Create dir and its missing parents. */
static int mkdirs(const char *path, struct mq_err *e)
{
	char tmp[PATH_MAX];
	strfmt(tmp, sizeof tmp, "%s", path);
	for (char *s = tmp + 1; *s; s++) {
		if (*s != '/')
			continue;
		*s = 0;
		if (sys.mkdir(tmp, 0755) < 0 && errno != EEXIST)
			return err_sys(e, err_code_for(errno), "cannot create directory '%s'", tmp);
		*s = '/';
	}
	return dur_mkdir(tmp, e);
}

/* Resolve the spool: -d, $MQ_SPOOL, /var/spool/mq for root, else XDG. */
static int spool_init(struct args *a, int create, struct mq_err *e)
{
	const char *d = opt_val(a, "spool"), *env = getenv("MQ_SPOOL");
	char def[PATH_MAX];
	if (!d && env && *env)
		d = env;
	if (!d && geteuid() == 0)
		d = "/var/spool/mq";
	if (!d) {
		const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
		struct passwd *pw = home && *home ? NULL : getpwuid(geteuid());
		if (pw)
			home = pw->pw_dir;
		if (xdg && *xdg)
			strfmt(def, sizeof def, "%s/mq", xdg);
		else
			strfmt(def, sizeof def, "%s/.local/state/mq", home ? home : ".");
		d = def;
	}
	if (strlen(d) >= sizeof a->sp.dir - 300)
		return err_set(e, MQ_EX_USAGE, "spool path too long");
	strfmt(a->sp.dir, sizeof a->sp.dir, "%s", d);
	a->sp.notice = notice_stderr;
	if (create && mkdirs(a->sp.dir, e) < 0)
		return -1;
	return a->cfg_file ? cfg_load_file(&a->sp.cfg, a->cfg_file, e)
	                   : cfg_load(&a->sp.cfg, a->sp.dir, e);
}

/* Parse a count option: a non-negative integer. */
static int opt_u64(struct args *a, const char *lng, uint64_t def, uint64_t *out)
{
	const char *v = opt_val(a, lng);
	*out = def;
	if (v && parse_u64(v, out) < 0) {
		usage_error(a->cmd, "bad number '%s' for --%s", v, lng);
		return -1;
	}
	return 0;
}

/* Parse -p/--partition against a queue. */
static int opt_partition(struct args *a, const struct queue *q, int *part)
{
	uint64_t v;
	*part = -1;
	if (!opt_has(a, "partition"))
		return 0;
	if (opt_u64(a, "partition", 0, &v) < 0)
		return -1;
	if (v >= (uint64_t)q->nparts) {
		usage_error(a->cmd, "partition %" PRIu64 " does not exist (queue '%s' has %d)", v,
		            q->name, q->nparts);
		return -1;
	}
	*part = (int)v;
	return 0;
}

/* ----- the CLI as a client of mq serve (-s HOST:PORT, $MQ_SERVER) ----- */

/* Connect to the server and check it speaks our protocol. */
static int rmt_open(struct args *a, struct rconn *c, struct mq_err *e)
{
	char *line;
	memset(c, 0, sizeof *c);
	c->fd = -1;
	if (a->queue && q_check_name("queue", a->queue, e) < 0) /* as locally, before anything */
		return -1;
	if (rc_open(c, a->server, MQ_DEFAULT_PORT, a->connect_ms, e) < 0)
		return -1;
	c->notice = notice_stderr;
	const char *tok = getenv("MQ_TOKEN");
	struct buf b = {0};
	buf_adds(&b, "HELLO 1\n");
	if (tok && *tok) { /* sent along, answered second */
		buf_adds(&b, "AUTH ");
		proto_esc(&b, tok, strlen(tok));
		buf_add(&b, "\n", 1);
	}
	int k = rc_send(c, b.p, b.len, e) < 0 ? -1 : rc_next(c, &line, e);
	buf_free(&b);
	if (k == 0 && strncmp(line, "mq ", 3))
		k = err_set(e, MQ_EX_UNAVAILABLE, "'%s' is not an mq server", a->server);
	if (k == 0 && tok && *tok)
		k = rc_next(c, &line, e);
	if (k != 0) {
		if (k > 0)
			err_set(e, MQ_EX_UNAVAILABLE, "'%s' is not an mq server", a->server);
		rc_close(c);
		return -1;
	}
	return 0;
}

/* Is e the server's "a lock is held" answer (ERR 75 ... is locked by
 * another process), which means the request did nothing? */
static int rmt_locked(const struct mq_err *e)
{
	return e->code == MQ_EX_TEMPFAIL && strstr(e->msg, " is locked by another process");
}

/* Send one request line (b, newline added) and read its answer's data
 * lines through fn (which may be NULL); *rest gets the OK line's rest.
 * A request that found a lock held and did nothing is sent again every
 * 10 ms, as a local command waits for the lock. */
static int rmt_call(struct rconn *c, struct buf *b, int (*fn)(void *ctx, char *line,
                    struct mq_err *e), void *ctx, char **rest, struct mq_err *e)
{
	char *line;
	int k;
	if (rest)
		*rest = "";
	buf_add(b, "\n", 1);
	for (;;) {
		size_t lines = 0;
		if (rc_send(c, b->p, b->len, e) < 0)
			return -1;
		while ((k = rc_next(c, &line, e)) == 1) {
			lines++;
			if (fn && fn(ctx, line, e) < 0)
				return -1;
		}
		if (k < 0 && lines == 0 && rmt_locked(e) && !stop_flag && !c->broken) {
			poll(NULL, 0, 10);
			continue;
		}
		break;
	}
	if (k == 0 && rest)
		*rest = line;
	return k;
}

/* rmt_call() of the request "VERB QUEUE". */
static int rmt_qcall(struct rconn *c, const char *verb, const char *queue,
                     int (*fn)(void *ctx, char *line, struct mq_err *e), void *ctx,
                     struct mq_err *e)
{
	struct buf b = {0};
	buf_printf(&b, "%s ", verb);
	proto_esc(&b, queue, strlen(queue));
	int k = rmt_call(c, &b, fn, ctx, NULL, e);
	buf_free(&b);
	return k;
}

/* A duration option as milliseconds on the wire (" NAME=MS"). */
static void rmt_ms(struct buf *b, const char *name, int64_t ms)
{
	buf_printf(b, " %s=%" PRId64, name, ms);
}

static int opt_retry_settings(struct args *a, struct kv *set);

/* --retries and --backoff go to the server as they are. */
static void rmt_retry_opts(struct args *a, struct buf *b)
{
	struct kv set[2];
	int n = opt_retry_settings(a, set);
	for (int i = 0; i < n; i++)
		proto_opt(b, set[i].k, set[i].v, strlen(set[i].v));
}

/* ----- routes from the nameservers ----- */

/* A route: the brokers holding a queue (or every live broker). */
struct rbroker {
	char addr[256];
	int parts;             /* of the queue; for BROKERS, the number of queues */
	char role[16];
	int64_t age_ms;        /* BROKERS: since the last registration */
};

struct route {
	struct rbroker b[64];
	int n;
};

static int route_line(void *ctx, char *line, struct mq_err *e)
{
	struct route *rt = ctx;
	struct preq r = {0};
	uint64_t parts;
	if (proto_parse(line, &r, e) < 0)
		return -1;
	int np = preq_npos(&r);
	if (!strcmp(r.t[0].val, "BROKER") && np >= 3 && rt->n < 64 &&
	    parse_u64(preq_pos(&r, 1), &parts) == 0 && parts <= INT_MAX) {
		struct rbroker *b = &rt->b[rt->n++];
		strfmt(b->addr, sizeof b->addr, "%s", preq_pos(&r, 0));
		b->parts = (int)parts;
		strfmt(b->role, sizeof b->role, "%s", preq_pos(&r, 2));
		b->age_ms = np >= 4 ? strtoll(preq_pos(&r, 3), NULL, 10) : 0;
	}
	preq_free(&r);
	return 0;
}

/* Ask the nameservers of list (comma-separated), starting at a random one,
 * until one answers: ROUTE q, or BROKERS when q is NULL. */
static int ns_ask(const char *list, const char *q, struct route *rt, struct mq_err *e)
{
	char ns[8][256];
	int n = 0;
	for (const char *p = list; *p && n < 8;) {
		size_t k = strcspn(p, ", ");
		if (k && k < sizeof ns[0]) {
			memcpy(ns[n], p, k);
			ns[n++][k] = 0;
		}
		p += k + (p[k] != 0);
	}
	if (!n)
		return err_set(e, MQ_EX_USAGE, "no nameserver in '%s'", list);
	int start = (int)((unsigned)getpid() % (unsigned)n);
	for (int i = 0; i < n; i++) {
		struct rconn c;
		struct buf b = {0};
		rt->n = 0;
		if (rc_open(&c, ns[(start + i) % n], MQ_NAMESRV_PORT, 2000, e) < 0)
			continue;
		rc_timeout(&c, 2000);
		if (q) {
			buf_adds(&b, "ROUTE ");
			proto_esc(&b, q, strlen(q));
		} else {
			buf_adds(&b, "BROKERS");
		}
		int k = rmt_call(&c, &b, route_line, rt, NULL, e);
		buf_free(&b);
		rc_close(&c);
		if (k == 0)
			return 0;
	}
	char last[sizeof e->msg];
	strfmt(last, sizeof last, "%s", e->msg);
	return err_set(e, MQ_EX_UNAVAILABLE, "no nameserver answers (%s): %s", list, last);
}

/* The brokers a command through nameservers may run on: those holding
 * the queue, else every live one; a rotation starting at a random one. */
static int ns_brokers(const char *list, const char *q, struct route *rt, struct mq_err *e)
{
	if (q && ns_ask(list, q, rt, e) < 0)
		return -1;
	if (!q || !rt->n) { /* every live broker, one partition each as far as we know */
		if (ns_ask(list, NULL, rt, e) < 0)
			return -1;
		for (int i = 0; i < rt->n; i++)
			rt->b[i].parts = 1;
	}
	if (!rt->n)
		return err_set(e, MQ_EX_UNAVAILABLE, "no live broker is registered with %s", list);
	struct route tmp = *rt;
	int start = (int)(((unsigned)getpid() ^ (unsigned)now_ms()) % (unsigned)rt->n);
	for (int i = 0; i < rt->n; i++)
		rt->b[i] = tmp.b[(start + i) % rt->n];
	return 0;
}

/* put's messages on their way to the server: frames gathered into PUT
 * requests of up to RPUT_CHUNK bytes, with at most RPUT_AHEAD of them
 * unanswered, so the pipe streams without waiting for each ack. */
enum { RPUT_CHUNK = 256 << 10, RPUT_AHEAD = 16 };

/* A PUT request kept until answered (put through nameservers). */
struct rkept {
	struct buf head, frames;
	int sent;
};

struct rput {
	struct rconn c;
	int keep;            /* keep requests until answered, to send elsewhere */
	struct rkept *kept;  /* oldest first: sent ones, then unsent ones */
	size_t nkept, ckept;
	const char *suffix;  /* --print-offsets: "@BROKER" after each offset */
	struct buf opts;     /* the PUT line's options */
	struct buf frames;   /* frames of the request being built */
	uint64_t nframes;
	uint64_t ahead;      /* requests sent, not yet answered */
	uint64_t stored;     /* messages acknowledged */
	int frame_keys;      /* -K: each frame carries its key */
	const char *queue;
	struct out *out;     /* --print-offsets */
	char dup[64];        /* put --id: where the stored one is */
};

static int rput_offset(void *ctx, char *line, struct mq_err *e)
{
	struct rput *rp = ctx;
	(void)e;
	if (rp->out) {
		out_add(rp->out, line, strlen(line));
		if (rp->suffix)
			out_add(rp->out, rp->suffix, strlen(rp->suffix));
		out_add(rp->out, "\n", 1);
	}
	return 0;
}

/* Read one PUT answer. */
static int rput_answer(struct rput *rp, struct mq_err *e)
{
	char *line;
	int k;
	while ((k = rc_next(&rp->c, &line, e)) == 1)
		rput_offset(rp, line, e);
	if (k < 0 && (rp->c.broken || (rp->keep && (e->code == MQ_EX_UNAVAILABLE ||
	                                            e->code == MQ_EX_IOERR ||
	                                            e->code == MQ_EX_TEMPFAIL))))
		return -1; /* not stored: a kept request may go to another broker */
	rp->ahead--;
	if (rp->keep) { /* answered: forget the oldest, keep its memory */
		struct rkept done = rp->kept[0];
		memmove(rp->kept, rp->kept + 1, (rp->nkept - 1) * sizeof *rp->kept);
		done.head.len = done.frames.len = 0;
		done.sent = 0;
		rp->kept[--rp->nkept] = done;
	}
	if (k < 0)
		return -1;
	uint64_t n = strtoull(line, NULL, 10);
	const char *d = strstr(line, "duplicate=");
	if (d)
		strfmt(rp->dup, sizeof rp->dup, "%s", d + 10);
	rp->stored += n;
	if (rp->out && out_flush(rp->out) < 0)
		return err_set(e, MQ_EX_IOERR, "cannot write offsets: %s", strerror(rp->out->err));
	return 0;
}

/* Send the kept requests not sent yet, in order. */
static int rput_pump(struct rput *rp, struct mq_err *e)
{
	for (size_t i = 0; i < rp->nkept; i++) {
		struct rkept *k = &rp->kept[i];
		if (k->sent)
			continue;
		if (rc_send(&rp->c, k->head.p, k->head.len, e) < 0 ||
		    rc_send(&rp->c, k->frames.p, k->frames.len, e) < 0)
			return -1;
		k->sent = 1;
		rp->ahead++;
		while (rp->ahead > RPUT_AHEAD)
			if (rput_answer(rp, e) < 0)
				return -1;
	}
	return 0;
}

/* Take a request to send (and keep) later: the gathered frames, or a
 * request another broker failed to answer. */
static struct rkept *rput_keep(struct rput *rp)
{
	if (rp->nkept == rp->ckept) {
		size_t n = rp->ckept ? 2 * rp->ckept : RPUT_AHEAD + 2;
		if (!(rp->kept = realloc(rp->kept, n * sizeof *rp->kept)))
			abort();
		memset(rp->kept + rp->ckept, 0, (n - rp->ckept) * sizeof *rp->kept);
		rp->ckept = n;
	}
	return &rp->kept[rp->nkept++];
}

static void rput_free(struct rput *rp)
{
	if (rp->c.fd >= 0)
		rc_close(&rp->c);
	for (size_t i = 0; i < rp->ckept; i++) {
		buf_free(&rp->kept[i].head);
		buf_free(&rp->kept[i].frames);
	}
	free(rp->kept);
	buf_free(&rp->frames);
}

/* Send the frames gathered; with wait, also read every answer due. */
static int rput_flush(struct rput *rp, int wait, struct mq_err *e)
{
	if (rp->nframes && rp->keep) {
		struct rkept *k = rput_keep(rp);
		buf_adds(&k->head, "PUT ");
		proto_esc(&k->head, rp->queue, strlen(rp->queue));
		buf_printf(&k->head, " %" PRIu64, rp->nframes);
		buf_add(&k->head, rp->opts.p, rp->opts.len);
		buf_add(&k->head, "\n", 1);
		struct buf t = k->frames; /* the frames move; no copy */
		k->frames = rp->frames;
		rp->frames = t;
		rp->frames.len = 0;
		rp->nframes = 0;
		if (rput_pump(rp, e) < 0)
			return -1;
	}
	if (rp->nframes) {
		struct buf head = {0};
		buf_adds(&head, "PUT ");
		proto_esc(&head, rp->queue, strlen(rp->queue));
		buf_printf(&head, " %" PRIu64, rp->nframes);
		buf_add(&head, rp->opts.p, rp->opts.len);
		buf_add(&head, "\n", 1);
		int k = rc_send(&rp->c, head.p, head.len, e);
		buf_free(&head);
		if (k < 0 || rc_send(&rp->c, rp->frames.p, rp->frames.len, e) < 0)
			return -1;
		rp->frames.len = 0;
		rp->nframes = 0;
		rp->ahead++;
	}
	while (rp->ahead && (wait || rp->ahead > RPUT_AHEAD || rc_ready(&rp->c)))
		if (rput_answer(rp, e) < 0)
			return -1;
	return 0;
}

static int rput_add(struct rput *rp, const struct rec_msg *m, struct mq_err *e)
{
	buf_printf(&rp->frames, "%zu", m->blen);
	if (rp->frame_keys && m->has_key)
		proto_opt(&rp->frames, "key", m->key, m->klen);
	buf_add(&rp->frames, "\n", 1);
	buf_add(&rp->frames, m->body, m->blen);
	buf_add(&rp->frames, "\n", 1);
	rp->nframes++;
	if (rp->frames.len >= RPUT_CHUNK)
		return rput_flush(rp, 0, e) < 0 ? -1 : 1;
	return 0;
}

/* Milliseconds until put_stdin() should call rput_flush() (as prod_due()). */
static int64_t rput_due(const struct rput *rp)
{
	if (!rp->nframes)
		return rp->ahead ? 50 : -1; /* look for answers now and then */
	return 0; /* send as soon as the input pauses */
}

/* ----- put through nameservers -----
 *
 * One pipelined rput per broker of the queue's route.  A keyed message
 * goes to the broker that owns hash(key) among all the brokers'
 * partitions; others go a request (256 KiB) at a time to each broker in
 * turn, in proportion to its partitions.  Requests are kept until
 * answered: when a broker fails, its unanswered ones and its unsent
 * frames go to another broker (at least once: some may be stored twice),
 * and the failed one is left out for RSET_BACKOFF_MS.  The route is asked
 * again every RSET_REFRESH_MS. */
enum { RSET_BACKOFF_MS = 30000, RSET_REFRESH_MS = 30000, RSET_IO_MS = 10000 };

struct rbk {
	struct rput rp;
	char addr[256];
	char suffix[260];
	int parts;
	int64_t down_until;    /* monotonic ms; left out until then */
	uint64_t sent;         /* bytes of unkeyed messages given to it */
};

struct rset {
	struct args *a;
	struct rput tmpl;      /* what every broker's rput starts from */
	struct rbk b[64];
	int n;
	int cur;               /* the broker unkeyed messages go to now */
	uint64_t slot;         /* turns of unkeyed requests, over all partitions */
	const char *id;        /* put -k KEY, else --id: chooses the broker of all */
	int64_t refreshed;
};

static int rset_live(const struct rset *rs, int i)
{
	return rs->b[i].down_until <= mono_ms();
}

/* The live broker owning partition slot h (of all live brokers'), or -1. */
static int rset_owner(const struct rset *rs, uint64_t h)
{
	uint64_t total = 0;
	for (int i = 0; i < rs->n; i++)
		total += rset_live(rs, i) ? (uint64_t)rs->b[i].parts : 0;
	if (!total)
		return -1;
	h %= total;
	for (int i = 0; i < rs->n; i++) {
		uint64_t p = rset_live(rs, i) ? (uint64_t)rs->b[i].parts : 0;
		if (h < p)
			return i;
		h -= p;
	}
	return -1;
}

static int rbroker_cmp(const void *a, const void *b)
{
	return strcmp(((const struct rbroker *)a)->addr, ((const struct rbroker *)b)->addr);
}

/* The live broker that has had the fewest unkeyed bytes for its
 * partitions, the first from rs->slot on among equals; -1 if none. */
static int rset_next(struct rset *rs)
{
	int best = -1;
	for (int k = 0; k < rs->n; k++) {
		int i = (int)((rs->slot + (uint64_t)k) % (uint64_t)rs->n);
		const struct rbk *b = &rs->b[i], *c = best >= 0 ? &rs->b[best] : NULL;
		if (rset_live(rs, i) && (!c || (double)b->sent / b->parts < (double)c->sent / c->parts))
			best = i;
	}
	return best;
}

/* Add the brokers of the route that are new to rs.  The first route is
 * taken in address order, whatever order a nameserver keeps, so that a
 * key (or an id) lands on the same broker in every put. */
static void rset_merge(struct rset *rs, struct route *rt)
{
	if (!rs->n)
		qsort(rt->b, (size_t)rt->n, sizeof *rt->b, rbroker_cmp);
	for (int i = 0; i < rt->n && rs->n < 64; i++) {
		int known = 0;
		for (int j = 0; j < rs->n && !known; j++)
			known = !strcmp(rs->b[j].addr, rt->b[i].addr);
		if (known)
			continue;
		struct rbk *b = &rs->b[rs->n++];
		memset(b, 0, sizeof *b);
		strfmt(b->addr, sizeof b->addr, "%s", rt->b[i].addr);
		strfmt(b->suffix, sizeof b->suffix, "@%s", b->addr);
		b->parts = rt->b[i].parts > 0 ? rt->b[i].parts : 1;
		b->rp = rs->tmpl;
		b->rp.c.fd = -1;
		b->rp.frames = (struct buf){0};
		b->rp.keep = 1;
		b->rp.suffix = b->suffix;
	}
}

/* Connect broker i if it is not. */
static int rset_conn(struct rset *rs, int i, struct mq_err *e)
{
	struct rbk *b = &rs->b[i];
	if (b->rp.c.fd >= 0)
		return 0;
	const char *was = rs->a->server;
	rs->a->server = b->addr;
	rs->a->connect_ms = RSET_IO_MS;
	int r = rmt_open(rs->a, &b->rp.c, e);
	rs->a->server = was;
	if (r == 0)
		rc_timeout(&b->rp.c, RSET_IO_MS);
	return r;
}

/* A broker's trouble, not the request's: another broker may do. */
static int rset_retryable(const struct mq_err *e)
{
	return e->code == MQ_EX_UNAVAILABLE || e->code == MQ_EX_IOERR || e->code == MQ_EX_TEMPFAIL;
}

/*
 * Broker i failed with e: leave it out for a while, and move its
 * unanswered requests and unsent frames to the next live broker (and on,
 * if that one fails too).  -1 with e when no broker is left.
 */
static int rset_fail(struct rset *rs, int i, struct mq_err *e)
{
	for (;;) {
		struct rbk *b = &rs->b[i];
		fprintf(stderr, "%s: put: %s: broker %s failed (%s); left out for %ds\n", progname,
		        rs->tmpl.queue, b->addr, e->msg, RSET_BACKOFF_MS / 1000);
		b->down_until = mono_ms() + RSET_BACKOFF_MS;
		if (b->rp.c.fd >= 0)
			rc_close(&b->rp.c);
		b->rp.c.fd = -1;
		b->rp.ahead = 0;
		int j = rset_owner(rs, ++rs->slot);
		if (j < 0) {
			char last[sizeof e->msg];
			strfmt(last, sizeof last, "%s", e->msg);
			return err_set(e, MQ_EX_UNAVAILABLE, "no broker of queue '%s' is left (the last "
			               "error: %s)", rs->tmpl.queue, last);
		}
		struct rbk *to = &rs->b[j];
		for (size_t k = 0; k < b->rp.nkept; k++) { /* in order, as unsent */
			struct rkept *d = rput_keep(&to->rp), s2 = b->rp.kept[k];
			b->rp.kept[k] = *d;
			*d = s2;
			d->sent = 0;
		}
		b->rp.nkept = 0;
		buf_add(&to->rp.frames, b->rp.frames.p, b->rp.frames.len);
		to->rp.nframes += b->rp.nframes;
		b->rp.frames.len = 0;
		b->rp.nframes = 0;
		rs->cur = j;
		if (rset_conn(rs, j, e) == 0 && rput_pump(&to->rp, e) == 0)
			return 0;
		if (!rset_retryable(e))
			return -1;
		i = j;
	}
}

/* Every RSET_REFRESH_MS: brokers that joined the route. */
static void rset_refresh(struct rset *rs)
{
	struct route rt;
	struct mq_err e;
	if (mono_ms() - rs->refreshed < RSET_REFRESH_MS)
		return;
	rs->refreshed = mono_ms();
	if (ns_ask(rs->a->namesrv, rs->tmpl.queue, &rt, &e) == 0)
		rset_merge(rs, &rt);
}

static int rset_add(struct rset *rs, const struct rec_msg *m, struct mq_err *e)
{
	const void *key = m->has_key ? (const void *)m->key : rs->id;
	size_t klen = m->has_key ? m->klen : rs->id ? strlen(rs->id) : 0;
	int i = key ? rset_owner(rs, fnv1a(key, klen)) : rs->cur;
	if (!key && (i < 0 || !rset_live(rs, i)))
		i = rs->cur = rset_next(rs);
	if (i < 0)
		return err_set(e, MQ_EX_UNAVAILABLE, "no broker of queue '%s' is up", rs->tmpl.queue);
	if (rset_conn(rs, i, e) < 0) {
		if (!rset_retryable(e) || rset_fail(rs, i, e) < 0)
			return -1;
		return rset_add(rs, m, e); /* i is left out now */
	}
	int r = rput_add(&rs->b[i].rp, m, e);
	if (r < 0)
		return rset_retryable(e) && rset_fail(rs, i, e) == 0 ? 1 : -1;
	if (!key)
		rs->b[i].sent += m->blen + 16;
	if (r == 1 && !key)
		rs->cur = rset_next(rs);
	if (r == 1)
		rset_refresh(rs);
	return r;
}

/* Flush every broker (as rput_flush); a failing one hands its work on. */
static int rset_flush(struct rset *rs, int wait, struct mq_err *e)
{
	rset_refresh(rs);
	for (int again = 1; again;) {
		again = 0;
		for (int i = 0; i < rs->n; i++) {
			struct rbk *b = &rs->b[i];
			if (b->rp.c.fd < 0 && !b->rp.nframes && !b->rp.nkept)
				continue;
			if (!rset_live(rs, i)) /* left out, with what nobody else could take */
				return err_set(e, MQ_EX_UNAVAILABLE, "no broker of queue '%s' is left",
				               rs->tmpl.queue);
			if (i == rs->cur && b->rp.nframes) /* the next request: the least loaded */
				rs->cur = rset_next(rs);
			if ((b->rp.c.fd < 0 && rset_conn(rs, i, e) < 0) || rput_flush(&b->rp, wait, e) < 0) {
				if (!rset_retryable(e) || rset_fail(rs, i, e) < 0)
					return -1;
				again = 1; /* what moved must be flushed where it went */
			}
		}
	}
	return 0;
}

static int64_t rset_due(const struct rset *rs)
{
	int64_t due = -1;
	for (int i = 0; i < rs->n; i++) {
		int64_t d = rput_due(&rs->b[i].rp);
		if (d >= 0 && (due < 0 || d < due))
			due = d;
	}
	return due;
}

/* ----- mq put ----- */

struct putctx {
	struct progress pg; /* bulk put from a file, on a terminal */
	int64_t in_size;    /* size of stdin when it is a regular file, else -1 */
	int64_t in_done;    /* bytes of it read */
	struct args *a;
	struct prod pr;
	struct out out;
	struct rec_msg tmpl; /* key, tag, headers shared by every message */
	const char *kdelim;  /* -K: split key from body at this string */
	size_t kdlen;
	uint64_t n;          /* messages accepted so far */
	size_t limit;        /* longest message read, bytes */
	struct rput *rp;     /* through a server: messages go there, not to pr */
	struct rset *rs;     /* through nameservers: to the brokers of the route */
};

static void put_acked(void *ctx, int part, uint64_t off)
{
	struct out *o = ctx;
	out_u64(o, (uint64_t)part);
	out_add(o, ":", 1);
	out_u64(o, off);
	out_add(o, "\n", 1);
}

/* Hand one message body to the producer. */
static int put_one(struct putctx *pc, const char *p, size_t n, int64_t ts, struct mq_err *e)
{
	struct rec_msg m = pc->tmpl;
	m.ts = ts;
	m.body = (const unsigned char *)p;
	m.blen = n;
	if (pc->kdelim) {
		const char *d = memmem(p, n, pc->kdelim, pc->kdlen);
		if (d) {
			m.key = (const unsigned char *)p;
			m.klen = (size_t)(d - p);
			m.has_key = 1;
			m.body = (const unsigned char *)d + pc->kdlen;
			m.blen = n - m.klen - pc->kdlen;
		}
	}
	pc->n++;
	int r = pc->rs ? rset_add(pc->rs, &m, e) : pc->rp ? rput_add(pc->rp, &m, e)
	        : prod_add(&pc->pr, &m, e);
	if (r < 0) {
		if (e->code == MQ_EX_DATAERR) {
			char msg[sizeof e->msg];
			strfmt(msg, sizeof msg, "message %" PRIu64 ": %s", pc->n, e->msg);
			strfmt(e->msg, sizeof e->msg, "%s", msg);
		}
		return -1;
	}
	if (r == 1 && out_flush(&pc->out) < 0)
		return err_set(e, MQ_EX_IOERR, "cannot write offsets: %s", strerror(pc->out.err));
	return 0;
}

/*
 * Read stdin and feed it to the producer: one message per line (or per
 * NUL with -0, or all of it with --whole).  Waits for input at most until
 * the next flush is due, so a slow pipe still gets acknowledged within
 * MQ_SYNC_EVERY_MS.  A message over the limit is refused as soon as the
 * limit is passed, without reading the rest of it.
 */
static int put_stdin(struct putctx *pc, int whole, char delim, struct mq_err *e)
{
	size_t bufsz = 256 << 10, limit = pc->limit;
	char *in = malloc(bufsz);
	struct buf carry = {0};
	int rc = 0;
	if (!in)
		abort();
	while (!stop_flag) { /* SIGINT/SIGTERM: stop reading, keep what was read */
		int64_t due = pc->rs ? rset_due(pc->rs) : pc->rp ? rput_due(pc->rp) : prod_due(&pc->pr);
		struct pollfd pfd = {0, POLLIN, 0};
		int pr = due == 0 ? 0 : poll(&pfd, 1, due < 0 ? -1 : (int)(due > INT_MAX ? INT_MAX : due));
		if (pr < 0 && errno != EINTR) {
			rc = err_sys(e, MQ_EX_IOERR, "cannot poll stdin");
			break;
		}
		if (pr <= 0) {
			if ((rc = pc->rs ? rset_flush(pc->rs, 0, e) : pc->rp ? rput_flush(pc->rp, 0, e)
			     : prod_flush(&pc->pr, 0, e)) < 0)
				break;
			if (out_flush(&pc->out) < 0) {
				rc = err_set(e, MQ_EX_IOERR, "cannot write offsets: %s", strerror(pc->out.err));
				break;
			}
			continue;
		}
		ssize_t n = read(0, in, bufsz);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = err_sys(e, MQ_EX_IOERR, "cannot read stdin");
			break;
		}
		if (n == 0)
			break;
		pc->in_done += n;
		if (pc->in_size > 0)
			progress_draw(&pc->pg, "mq: put: %s: %" PRId64 "%% of %" PRId64 " MB, %" PRIu64
			              " messages", pc->a->queue, pc->in_done * 100 / pc->in_size,
			              pc->in_size >> 20, pc->n);
		int64_t ts = now_ms();
		size_t at = 0;
		const char *nl;
		while (!whole && (nl = memchr(in + at, delim, (size_t)n - at))) {
			size_t len = (size_t)(nl - (in + at));
			if (carry.len) {
				buf_add(&carry, in + at, len);
				rc = put_one(pc, carry.p, carry.len, ts, e);
				carry.len = 0;
			} else {
				rc = put_one(pc, in + at, len, ts, e);
			}
			if (rc < 0)
				goto done;
			at += len + 1;
		}
		buf_add(&carry, in + at, (size_t)n - at);
		if (carry.len > limit + (pc->kdelim ? limit : 0)) {
			rc = err_set(e, MQ_EX_DATAERR, "message %" PRIu64 " is longer than the maximum of "
			             "%zu bytes (max-message-bytes); it and the rest of the input were not "
			             "written", pc->n + 1, limit);
			goto done;
		}
	}
	if (rc == 0 && !stop_flag && (carry.len || whole))
		rc = put_one(pc, carry.p ? carry.p : "", carry.len, now_ms(), e);
done:
	free(in);
	buf_free(&carry);
	return rc;
}

/* Encode -H name=value options into a header block (mq.h). */
static int put_headers(struct args *a, struct buf *hb)
{
	int k = opt_index(a, "header"), nh = 0;
	unsigned char tmp[10];
	struct buf pairs = {0};
	const char *id = opt_val(a, "id");
	if (id) {
		rec_hdr_pair(&pairs, MQ_ID_HEADER, id, strlen(id));
		nh++;
	}
	for (int i = 0; i < a->nall; i++) {
		if (a->all[i].i != k)
			continue;
		const char *v = a->all[i].v, *eq = strchr(v, '=');
		if (!eq || eq == v) {
			buf_free(&pairs);
			return usage_error(a->cmd, "bad header '%s': use NAME=VALUE", v);
		}
		buf_add(&pairs, tmp, varint_put(tmp, (uint64_t)(eq - v)));
		buf_add(&pairs, v, (size_t)(eq - v));
		buf_add(&pairs, tmp, varint_put(tmp, strlen(eq + 1)));
		buf_adds(&pairs, eq + 1);
		nh++;
	}
	if (nh) {
		buf_add(hb, tmp, varint_put(tmp, (uint64_t)nh));
		buf_add(hb, pairs.p, pairs.len);
	}
	buf_free(&pairs);
	return 0;
}

/* mq put through a server: the same input handling, frames instead of
 * a producer.  Exits as the local put would. */
/* BEGIN QUEUE or PREPARE QUEUE of put --txn: the answer's txn=NAME. */
static int rmt_txn_step(struct rput *rp, const char *verb, int nocreate, char *name,
                        struct mq_err *e)
{
	struct buf b = {0};
	char *rest;
	buf_printf(&b, "%s ", verb);
	proto_esc(&b, rp->queue, strlen(rp->queue));
	if (nocreate)
		buf_adds(&b, " create=0");
	int k = rmt_call(&rp->c, &b, NULL, NULL, &rest, e);
	buf_free(&b);
	if (k < 0)
		return -1;
	if (strncmp(rest, "txn=", 4) || !txn_hexname(rest + 4))
		return err_set(e, MQ_EX_UNAVAILABLE, "server answered '%s' to %s", rest, verb);
	strfmt(name, 64, "%s", rest + 4);
	return 0;
}

static int put_remote(struct args *a, struct putctx *pc, int64_t due)
{
	struct mq_err e = {0};
	struct rput rp;
	struct qconf tmp;
	int rc = 0;
	conf_defaults(&tmp); /* a bad --fsync is 64 here, before the queue is created there */
	if (opt_val(a, "fsync") && conf_set(&tmp, "fsync", opt_val(a, "fsync"), "option", &e) < 0) {
		e.code = MQ_EX_USAGE;
		return fail(a, &e);
	}
	memset(&rp, 0, sizeof rp);
	rp.queue = a->pos[0];
	static const char *const pass[] = {"key", "tag", "fsync", "id", "partition"};
	for (size_t i = 0; i < sizeof pass / sizeof *pass; i++)
		if (opt_val(a, pass[i]))
			proto_opt(&rp.opts, pass[i], opt_val(a, pass[i]), strlen(opt_val(a, pass[i])));
	int k = opt_index(a, "header");
	for (int i = 0; i < a->nall; i++)
		if (a->all[i].i == k) {
			const char *v = a->all[i].v, *eq = strchr(v, '=');
			buf_adds(&rp.opts, " h.");
			proto_esc(&rp.opts, v, (size_t)(eq - v));
			buf_add(&rp.opts, "=", 1);
			proto_esc(&rp.opts, eq + 1, strlen(eq + 1));
		}
	if (due > 0)
		rmt_ms(&rp.opts, "at", due);
	if (opt_has(a, "print-offsets")) {
		buf_adds(&rp.opts, " offsets=1");
		rp.out = &pc->out;
	}
	if (opt_has(a, "no-create"))
		buf_adds(&rp.opts, " create=0");
	int txn = opt_has(a, "txn");
	char txname[64] = "";
	if (txn)
		buf_adds(&rp.opts, " txn=1");
	rp.frame_keys = pc->kdelim != NULL;
	rp.c.fd = -1;
	pc->limit = MQ_REMOTE_MSG_MAX; /* the server holds the queue's own limit */
	struct rset *rs = NULL;
	struct route rt;
	if (a->namesrv) {
		if (!(rs = calloc(1, sizeof *rs)))
			abort();
		rs->a = a;
		rs->tmpl = rp;
		rs->id = opt_val(a, "key") ? opt_val(a, "key") : opt_val(a, "id");
		rs->refreshed = mono_ms();
		pc->rs = rs;
		if (ns_brokers(a->namesrv, rp.queue, &rt, &e) == 0) {
			rset_merge(rs, &rt);
			/* unkeyed messages start at a random broker */
			rs->slot = (uint64_t)getpid() ^ (uint64_t)now_ms();
			rs->cur = rset_next(rs);
		} else {
			rc = -1;
		}
	} else {
		pc->rp = &rp;
	}
	if (rc < 0 || (!rs && rmt_open(a, &rp.c, &e) < 0)) {
		rc = -1;
	} else if (txn && rmt_txn_step(&rp, "BEGIN", opt_has(a, "no-create"), txname, &e) < 0) {
		rc = -1;
	} else if (a->npos > 1) {
		int64_t ts = now_ms();
		for (int i = 1; i < a->npos && rc == 0; i++)
			rc = put_one(pc, a->pos[i], strlen(a->pos[i]), ts, &e);
	} else {
		pc->in_size = -1;
		rc = put_stdin(pc, opt_has(a, "whole"), opt_has(a, "null") ? '\0' : '\n', &e);
	}
	/* what was read before an error still goes, and is answered */
	struct mq_err fe = {0};
	int fr = rs ? rset_flush(rs, 1, &fe) : rp.c.fd >= 0 ? rput_flush(&rp, 1, &fe) : 0;
	for (int i = 0; rs && i < rs->n; i++) {
		rp.stored += rs->b[i].rp.stored;
		if (rs->b[i].rp.dup[0])
			strfmt(rp.dup, sizeof rp.dup, "%s", rs->b[i].rp.dup);
		rput_free(&rs->b[i].rp);
	}
	free(rs);
	if (out_flush(&pc->out) < 0 && fr == 0)
		fr = err_set(&fe, MQ_EX_IOERR, "cannot write offsets: %s", strerror(pc->out.err));
	if (rc == 0 && fr == 0 && txn && !stop_flag) /* all stored: now it exists */
		fr = rmt_txn_step(&rp, "PREPARE", 0, txname, &fe);
	if (rc < 0)
		rc = fail(a, &e);
	else if (fr < 0)
		rc = fail(a, &fe);
	else if (stop_flag)
		rc = 128 + stop_flag;
	if (rc == 0 && txn) {
		printf("%s:%s\n", rp.queue, txname);
		rc = stdout_done(a);
	}
	if (rc == 0 && rp.dup[0])
		fprintf(stderr, "%s: put: %s: id '%s' is already stored (partition %.*s offset %s, "
		        "within the dedupe window): nothing stored\n", progname, rp.queue,
		        opt_val(a, "id"), (int)strcspn(rp.dup, ":"),
		        rp.dup, strchr(rp.dup, ':') ? strchr(rp.dup, ':') + 1 : "?");
	rput_free(&rp);
	buf_free(&rp.opts);
	return rc;
}

static int cmd_put(struct args *a)
{
	struct mq_err e = {0};
	struct putctx pc;
	struct queue *q = NULL;
	struct buf hb = {0};
	struct kv set[1];
	int nset = 0, part, rc;
	memset(&pc, 0, sizeof pc);
	pc.a = a;
	pc.out.fd = 1;
	a->queue = a->pos[0];
	const char *fs = opt_val(a, "fsync"), *kd = opt_val(a, "key-delim");
	if (fs)
		set[nset++] = (struct kv){"fsync", fs};
	if (kd && (!*kd || opt_has(a, "key")))
		return usage_error(a->cmd, "-K needs a non-empty delimiter and excludes -k");
	if (opt_has(a, "whole") && (opt_has(a, "null") || kd || a->npos > 1))
		return usage_error(a->cmd, "--whole excludes -0, -K and message arguments");
	int64_t due = 0, dl;
	const char *dv = opt_val(a, "delay"), *at = opt_val(a, "at");
	if (dv && at)
		return usage_error(a->cmd, "--delay and --at exclude each other");
	if (dv && parse_duration_ms(dv, &dl) < 0)
		return usage_error(a->cmd, "bad duration '%s' for --delay", dv);
	uint64_t epoch;
	if (at && ((parse_u64(at, &epoch) < 0 && dur_like(at)) || parse_time_ms(at, &due) < 0))
		return usage_error(a->cmd, "bad time '%s' for --at (RFC 3339 or epoch seconds)", at);
	if (dv)
		due = dl ? (dl > INT64_MAX / 2 ? INT64_MAX : now_ms() + dl) : 0;
	if (due > 0 && due <= now_ms())
		due = 0; /* already due: an ordinary put */
	if (due / 1000 >= 999999999999) /* bucket names have 12 digits of seconds */
		return usage_error(a->cmd, "--delay/--at: too far in the future");
	if (due > 0 && opt_has(a, "print-offsets"))
		return usage_error(a->cmd, "--print-offsets: a delayed message has no offset yet");
	const char *id = opt_val(a, "id");
	if (id && (!*id || kd || dv || at))
		return usage_error(a->cmd, "--id needs a non-empty ID and excludes -K, --delay and --at");
	int txn = opt_has(a, "txn");
	if (txn && (id || dv || at || opt_has(a, "print-offsets")))
		return usage_error(a->cmd, "--txn excludes --id, --delay, --at and --print-offsets");
	if ((rc = put_headers(a, &hb)) != 0)
		return rc;
	if (a->namesrv && opt_has(a, "partition"))
		return usage_error(a->cmd, "-p names a partition of one broker: use -s, not -n");
	if (a->namesrv && txn)
		return usage_error(a->cmd, "--txn through nameservers: name the broker with -s");
	if (a->server || a->namesrv) {
		pc.kdelim = kd;
		pc.kdlen = kd ? strlen(kd) : 0;
		rc = put_remote(a, &pc, due);
		goto out;
	}
	if (spool_init(a, !opt_has(a, "no-create"), &e) < 0) {
		rc = fail(a, &e);
		goto out;
	}
	if (opt_has(a, "partition") && !q_exists(&a->sp, a->pos[0])) {
		struct queue would = {0}; /* check -p before a queue is created */
		uint64_t pv;
		if (q_conf(&a->sp, a->pos[0], set, nset, &would.conf, &e) < 0) {
			rc = fail(a, &e);
			goto out;
		}
		strfmt(would.name, sizeof would.name, "%s", a->pos[0]);
		would.nparts = (int)would.conf.partitions;
		if (opt_partition(a, &would, &part) < 0 || opt_u64(a, "partition", 0, &pv) < 0) {
			rc = MQ_EX_USAGE;
			goto out;
		}
	}
	if (q_open(&a->sp, a->pos[0], !opt_has(a, "no-create"), set, nset, &q, &e) < 0) {
		rc = fail(a, &e);
		goto out;
	}
	if (opt_partition(a, q, &part) < 0) {
		rc = MQ_EX_USAGE;
		goto out;
	}
	if (id && part < 0) { /* one partition for the whole put: by key, else by id */
		const char *k = opt_val(a, "key") ? opt_val(a, "key") : id;
		part = (int)(fnv1a((const unsigned char *)k, strlen(k)) % (uint32_t)q->nparts);
	}
	prod_init(&pc.pr, q, part);
	pc.limit = (size_t)q->conf.max_message;
	pc.pr.due_ms = due;
	struct txn tx;
	tx.at = NULL;
	tx.fd = -1;
	if (txn && txn_open(q, NULL, TX_CREATE, &tx, &e) < 0) {
		rc = fail(a, &e);
		txn_free(&tx);
		prod_free(&pc.pr);
		goto out;
	}
	pc.pr.txn = txn ? &tx : NULL;
	pc.pr.id = id;
	if (opt_has(a, "print-offsets")) {
		pc.pr.acked = put_acked;
		pc.pr.ctx = &pc.out;
	}
	const char *key = opt_val(a, "key"), *tag = opt_val(a, "tag");
	pc.tmpl.has_key = key != NULL;
	pc.tmpl.key = (const unsigned char *)(key ? key : "");
	pc.tmpl.klen = key ? strlen(key) : 0;
	pc.tmpl.has_tag = tag != NULL;
	pc.tmpl.tag = (const unsigned char *)(tag ? tag : "");
	pc.tmpl.tlen = tag ? strlen(tag) : 0;
	pc.tmpl.hdrs = (const unsigned char *)hb.p;
	pc.tmpl.hlen = hb.len;
	pc.kdelim = kd;
	pc.kdlen = kd ? strlen(kd) : 0;
	rc = 0;
	if (a->npos > 1) {
		int64_t ts = now_ms();
		for (int i = 1; i < a->npos && rc == 0; i++)
			rc = put_one(&pc, a->pos[i], strlen(a->pos[i]), ts, &e);
	} else {
		struct stat st;
		pc.in_size = fstat(0, &st) == 0 && S_ISREG(st.st_mode) ? (int64_t)st.st_size : -1;
		pc.pg = (struct progress){isatty(2) && pc.in_size > (64 << 20), mono_ms(), 0};
		rc = put_stdin(&pc, opt_has(a, "whole"), opt_has(a, "null") ? '\0' : '\n', &e);
		progress_clear(&pc.pg);
	}
	/* Whatever was accepted before an error is still written and synced. */
	struct mq_err fe = {0};
	int fr = prod_flush(&pc.pr, 1, &fe);
	if (out_flush(&pc.out) < 0 && fr == 0)
		fr = err_set(&fe, MQ_EX_IOERR, "cannot write offsets: %s", strerror(pc.out.err));
	if (rc < 0)
		rc = fail(a, &e);
	else if (fr < 0)
		rc = fail(a, &fe);
	else if (stop_flag) /* interrupted: what was read is stored, say so by 128+N */
		rc = 128 + stop_flag;
	if (txn && rc == 0 && txn_seal(&tx, 1, &fe) < 0)
		rc = fail(a, &fe);
	if (txn && rc == 0) {
		printf("%s:%s\n", q->name, tx.name);
		rc = stdout_done(a);
	}
	if (txn && rc != 0 && tx.fd >= 0) /* no id printed: nothing was acknowledged */
		sys.unlink(tx.path);
	if (txn)
		txn_free(&tx);
	if (rc == 0 && pc.pr.dup)
		fprintf(stderr, "%s: put: %s: id '%s' is already stored (partition %d offset %" PRIu64
		        ", within the dedupe window): nothing stored\n", progname, q->name, id, part,
		        pc.pr.dup_off);
	struct mq_err te; /* moving due delayed messages is housekeeping here */
	if (rc == 0)
		dly_tick(q, &te);
	prod_free(&pc.pr);
out:
	buf_free(&pc.out.b);
	buf_free(&hb);
	q_close(q);
	return rc;
}

/* ----- mq txn ----- */

/* Split a transaction id QUEUE:HHHHHHHHHHHHHHHH; returns 0 or -1. */
static int txn_id_parse(const char *id, char *queue, char *name)
{
	const char *c = strchr(id, ':');
	if (!c || c == id || (size_t)(c - id) > MQ_NAME_MAX || !txn_hexname(c + 1))
		return -1;
	memcpy(queue, id, (size_t)(c - id));
	queue[c - id] = 0;
	strfmt(name, 17, "%s", c + 1);
	return name_valid(queue) ? 0 : -1;
}

static const char *txn_state_word(uint32_t st)
{
	return st == MQ_TXN_COMMITTED ? "committed" : st == MQ_TXN_ROLLEDBACK ? "rolled back"
	       : st == MQ_TXN_COMMITTING ? "committing" : "open";
}

/* What txn ls and txn check learn of one transaction file. */
struct txn_info {
	uint64_t msgs;
	struct buf body;       /* the bodies, one per line (check) */
	struct buf key, tag;   /* the first message's, NUL-terminated */
	struct buf hdrs;       /* its headers: NAME=VALUE NUL ... */
	int has_key, has_tag;
	int want_bodies;
};

static int txn_info_msg(void *ctx, int part, struct rec_msg *m, struct mq_err *e)
{
	struct txn_info *in = ctx;
	(void)part;
	(void)e;
	if (in->msgs++ == 0 && in->want_bodies) {
		in->has_key = m->has_key;
		in->has_tag = m->has_tag;
		buf_add(&in->key, m->key, m->klen);
		buf_addc0(&in->key);
		buf_add(&in->tag, m->tag, m->tlen);
		buf_addc0(&in->tag);
		const unsigned char *p = m->hdrs, *end = m->hdrs + m->hlen, *hn, *hv;
		uint64_t left = 0;
		size_t hnl, hvl;
		if (m->hlen)
			p += varint_get(p, end, &left);
		while (rec_hdr_next(&p, end, &left, &hn, &hnl, &hv, &hvl)) {
			buf_add(&in->hdrs, hn, hnl);
			buf_add(&in->hdrs, "=", 1);
			buf_add(&in->hdrs, hv, hvl);
			buf_add(&in->hdrs, "", 1); /* counted: entries follow each other */
		}
	}
	if (in->want_bodies) {
		buf_add(&in->body, m->body, m->blen);
		buf_add(&in->body, "\n", 1);
	}
	return 0;
}

static void txn_info_free(struct txn_info *in)
{
	buf_free(&in->body);
	buf_free(&in->key);
	buf_free(&in->tag);
	buf_free(&in->hdrs);
}

/* The open transactions (names) of a queue through a server: TXNS. */
struct rtxns {
	char **v;
	size_t n;
	struct txn_row { int64_t created; uint32_t checks; uint64_t msgs; char state[16]; } *row;
};

static int rtxns_line(void *ctx, char *line, struct mq_err *e)
{
	struct rtxns *r = ctx;
	struct preq q = {0};
	int rc = proto_parse(line, &q, e);
	if (rc == 0 && (strcmp(q.t[0].val, "TXN") || preq_npos(&q) != 5 ||
	                !txn_filename(preq_pos(&q, 0))))
		rc = err_set(e, MQ_EX_UNAVAILABLE, "bad TXN line from the server");
	if (rc == 0) {
		r->v = realloc(r->v, (r->n + 1) * sizeof *r->v);
		r->row = realloc(r->row, (r->n + 1) * sizeof *r->row);
		if (!r->v || !r->row || !(r->v[r->n] = strdup(preq_pos(&q, 0))))
			abort();
		struct txn_row *w = &r->row[r->n++];
		w->created = strtoll(preq_pos(&q, 1), NULL, 10);
		w->checks = (uint32_t)strtoul(preq_pos(&q, 2), NULL, 10);
		w->msgs = strtoull(preq_pos(&q, 3), NULL, 10);
		strfmt(w->state, sizeof w->state, "%s", preq_pos(&q, 4));
	}
	preq_free(&q);
	return rc;
}

static int rmt_txns(struct rconn *c, const char *queue, struct rtxns *r, struct mq_err *e)
{
	memset(r, 0, sizeof *r);
	return rmt_qcall(c, "TXNS", queue, rtxns_line, r, e);
}

static void rtxns_free(struct rtxns *r)
{
	names_free(r->v, r->n);
	free(r->row);
	memset(r, 0, sizeof *r);
}

/* One line (or JSON object) of txn ls. */
struct txn_lsout {
	int json, first, header;
	int64_t now;
};

static void txn_ls_row(struct txn_lsout *o, const char *queue, const char *name, int64_t created,
                       uint32_t checks, uint64_t msgs, const char *state)
{
	char id[2 * MQ_NAME_MAX + 64], age[32];
	strfmt(id, sizeof id, "%s:%s", queue, name);
	fmt_duration(age, sizeof age, o->now - created);
	if (o->json) {
		printf("%s{\"id\":\"%s\",\"queue\":\"%s\",\"created\":%" PRId64 ",\"age_ms\":%" PRId64
		       ",\"checks\":%u,\"messages\":%" PRIu64 ",\"state\":\"%s\"}", o->first ? "" : ",",
		       id, queue, created, o->now - created, checks, msgs, state);
	} else {
		if (!o->header++)
			printf("%-40s %8s %6s %9s  %s\n", "ID", "AGE", "CHECKS", "MESSAGES", "STATE");
		printf("%-40s %8s %6u %9" PRIu64 "  %s\n", id, age, checks, msgs, state);
	}
	o->first = 0;
}

static int rmt_names(struct rconn *c, char ***names, size_t *n, struct mq_err *e);

/* txn ls through a server: TXNS for the queue, or for each of LS. */
static int txn_ls_remote(struct args *a, struct txn_lsout *o, struct mq_err *e)
{
	struct rconn c;
	char **names = NULL;
	size_t nq = 0;
	int rc = 0;
	if (rmt_open(a, &c, e) < 0)
		return -1;
	if (a->npos == 2) {
		if (q_check_name("queue", a->pos[1], e) < 0)
			rc = -1;
		else if (!(names = malloc(sizeof *names)) || !(names[0] = strdup(a->pos[1])))
			abort();
		nq = rc == 0;
	} else {
		rc = rmt_names(&c, &names, &nq, e);
	}
	for (size_t i = 0; rc == 0 && i < nq; i++) {
		struct rtxns rt;
		if (rmt_txns(&c, names[i], &rt, e) < 0) {
			rtxns_free(&rt);
			if (a->npos != 2 && e->code == MQ_EX_NOINPUT)
				continue; /* removed meanwhile */
			rc = -1;
			break;
		}
		for (size_t k = 0; k < rt.n; k++)
			txn_ls_row(o, names[i], rt.v[k], rt.row[k].created, rt.row[k].checks,
			           rt.row[k].msgs, rt.row[k].state);
		rtxns_free(&rt);
	}
	names_free(names, nq);
	rc_close(&c);
	return rc;
}

/* mq txn ls [--json] [QUEUE] */
static int txn_ls(struct args *a)
{
	struct mq_err e = {0};
	char **names = NULL, **files;
	size_t nq = 0, nf;
	struct txn_lsout o = {opt_has(a, "json"), 1, 0, now_ms()};
	int rc = 0;
	if (a->npos > 2)
		return usage_error(a->cmd, "use 'mq txn ls [QUEUE]'");
	if (o.json)
		printf("[");
	if (a->server) {
		if (txn_ls_remote(a, &o, &e) < 0)
			return fail(a, &e);
		if (o.json)
			printf("]\n");
		return stdout_done(a);
	}
	if (spool_init(a, 0, &e) < 0)
		return fail(a, &e);
	if (a->npos == 2) {
		a->queue = a->pos[1];
		if (q_check_name("queue", a->queue, &e) < 0 || !q_exists(&a->sp, a->queue)) {
			if (!e.msg[0])
				err_set(&e, MQ_EX_NOINPUT, "no such queue");
			return fail(a, &e);
		}
		names = malloc(sizeof *names);
		if (!names || !(names[0] = strdup(a->queue)))
			abort();
		nq = 1;
	} else if (q_list(&a->sp, &names, &nq, &e) < 0) {
		return fail(a, &e);
	}
	for (size_t i = 0; i < nq && rc == 0; i++) {
		struct queue *q = NULL;
		char dir[PATH_MAX + 32];
		if (q_open(&a->sp, names[i], 0, NULL, 0, &q, &e) < 0) {
			if (e.code == MQ_EX_NOINPUT)
				continue; /* removed meanwhile */
			rc = fail(a, &e);
			break;
		}
		txn_dir(q, "", dir, sizeof dir);
		if (dir_names(dir, txn_filename, &files, &nf, &e) < 0)
			rc = fail(a, &e);
		for (size_t f = 0; rc == 0 && f < nf; f++) {
			struct txn t;
			struct txn_info in = {0};
			if (txn_open(q, files[f], TX_NOLOCK, &t, &e) == 1 && t.valid &&
			    t.state < MQ_TXN_COMMITTED && txn_walk(&t, txn_info_msg, &in, &e) == 0)
				txn_ls_row(&o, q->name, t.name, t.created, t.checks, in.msgs,
				           t.flags & MQ_TXN_PIPE ? "pipe" : txn_state_word(t.state));
			/* else: ended or ending meanwhile, or a put still writing */
			txn_free(&t);
			txn_info_free(&in);
		}
		names_free(files, nf);
		q_close(q);
	}
	names_free(names, nq);
	if (o.json)
		printf("]\n");
	return rc ? rc : stdout_done(a);
}

/* Run the check command on one transaction; returns its exit status
 * (-1 if it could not run or was killed: an unknown answer). */
static int txn_run_check(const char *queue, const char *name, uint32_t checks, int64_t created,
                         struct txn_info *in, char **argv)
{
	int fds[2];
	if (pipe(fds) < 0)
		return -1;
	pid_t pid = fork();
	if (pid < 0) {
		close(fds[0]);
		close(fds[1]);
		return -1;
	}
	if (pid == 0) {
		char v[64], id[2 * MQ_NAME_MAX + 64];
		dup2(fds[0], 0);
		dup2(2, 1); /* its output is not txn check's answer lines */
		close(fds[0]);
		close(fds[1]);
		strfmt(id, sizeof id, "%s:%s", queue, name);
		setenv("MQ_TXN_ID", id, 1);
		setenv("MQ_QUEUE", queue, 1);
		strfmt(v, sizeof v, "%u", checks);
		setenv("MQ_TXN_CHECK", v, 1);
		strfmt(v, sizeof v, "%" PRId64, (now_ms() - created) / 1000);
		setenv("MQ_TXN_AGE", v, 1);
		strfmt(v, sizeof v, "%" PRIu64, in->msgs);
		setenv("MQ_TXN_MESSAGES", v, 1);
		setenv("MQ_KEY", in->has_key ? in->key.p : "", 1);
		setenv("MQ_TAG", in->has_tag ? in->tag.p : "", 1);
		for (size_t at = 0; at < in->hdrs.len; at += strlen(in->hdrs.p + at) + 1) {
			const char *h = in->hdrs.p + at, *eq = strchr(h, '=');
			char var[160];
			size_t n = strfmt(var, sizeof var, "MQ_HEADER_") > 0 ? 10 : 0;
			for (const char *c = h; c < eq && n + 1 < sizeof var; c++)
				var[n++] = isalnum((unsigned char)*c) ? (char)toupper((unsigned char)*c) : '_';
			var[n] = 0;
			setenv(var, eq + 1, 1);
		}
		signal(SIGPIPE, SIG_DFL);
		execvp(argv[0], argv);
		fprintf(stderr, "%s: txn check: cannot run '%s': %s\n", progname, argv[0],
		        strerror(errno));
		_exit(127);
	}
	close(fds[0]);
	feed_close(fds[1], &in->body);
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* How txn check reaches a queue's transactions: the spool, or a server. */
struct tcheck {
	struct args *a;
	const char *queue;
	struct queue *q;   /* the spool's */
	struct rconn *c;   /* a server's */
	int64_t older;
	struct txn_info *in; /* what a remote TXNCHECK answers goes here */
	struct buf hb;       /* headers of a remote message */
};

/* Start one check (local): count it (synced, so a crash still counts
 * it) and read the messages.  1: run the command; 0: nothing to check
 * (a commit cut short is finished here and said); -1. */
static int tcheck_begin_local(struct tcheck *tc, const char *name, struct txn_info *in,
                              uint32_t *checks, int64_t *created, struct mq_err *e)
{
	struct txn t;
	int k = txn_open(tc->q, name, TX_NONBLOCK, &t, e);
	if (k == 1 && !t.valid) { /* we hold its lock: the put that wrote it died */
		sys.unlink(t.path);
		k = 0;
	}
	if (k == 1 && t.state >= MQ_TXN_COMMITTED) /* ended, its file left by a crash */
		k = txn_end(&t, t.state, e) < 0 ? -1 : 0;
	if (k == 1 && t.state == MQ_TXN_COMMITTING) { /* a commit cut short */
		k = txn_commit(&t, e);
		if (k > 0)
			printf("%s:%s %s\n", tc->queue, name, txn_state_word((uint32_t)k));
		k = k < 0 ? -1 : 0;
	}
	if (k == 1 && (t.state != MQ_TXN_OPEN || now_ms() - t.created < tc->older))
		k = 0;
	if (k == 1) {
		t.checks++;
		in->want_bodies = 1;
		if (txn_slot_write(&t, 1, e) < 0 || txn_walk(&t, txn_info_msg, in, e) < 0)
			k = -1;
		*checks = t.checks;
		*created = t.created;
	}
	txn_free(&t); /* not held while the command runs */
	return k == -2 ? 0 : k;
}

/* End it by the command's answer, under its lock again: the state it
 * ended in (the producer's outcome stands if it came first), 0 if gone. */
static int tcheck_end_local(struct tcheck *tc, const char *name, int commit, struct mq_err *e)
{
	struct txn t;
	int k = txn_find(tc->q, name, 0, &t, e);
	if (k == 1) {
		k = commit ? txn_commit(&t, e) : txn_rollback(&t, e);
		txn_free(&t);
	}
	return k;
}

static int tcheck_msg(void *ctx, char *line, struct mq_err *e)
{
	struct tcheck *tc = ctx;
	struct txn_info *in = tc->in;
	struct rec_msg m;
	int part;
	unsigned attempt;
	uint32_t lease;
	if (rc_msg(tc->c, line, &m, &part, &attempt, &lease, &tc->hb, e) < 0)
		return -1;
	return txn_info_msg(in, part, &m, e);
}

/* A server's answer 75 (busy): asked again in 10 ms steps, as locally
 * the lock would be waited for. */
static int tcheck_call(struct tcheck *tc, struct buf *b, int (*fn)(void *, char *, struct mq_err *),
                       char **rest, struct mq_err *e)
{
	int k;
	for (int tries = 0; (k = rmt_call(tc->c, b, fn, tc, rest, e)) < 0 &&
	                    e->code == MQ_EX_TEMPFAIL && tries < 6000 && !stop_flag; tries++) {
		b->len--; /* rmt_call appended a newline */
		poll(NULL, 0, 10);
	}
	return k;
}

static int tcheck_begin_remote(struct tcheck *tc, const char *name, struct txn_info *in,
                               uint32_t *checks, int64_t *created, struct mq_err *e)
{
	struct buf b = {0};
	char *rest;
	in->want_bodies = 1;
	tc->in = in;
	buf_adds(&b, "TXNCHECK ");
	proto_esc(&b, tc->queue, strlen(tc->queue));
	buf_printf(&b, " %s", name);
	int k = tcheck_call(tc, &b, tcheck_msg, &rest, e);
	buf_free(&b);
	if (k < 0)
		return e->code == MQ_EX_NOINPUT ? 0 : -1; /* ended meanwhile */
	const char *st = strstr(rest, "state="), *ch = strstr(rest, "checks="),
	           *cr = strstr(rest, "created=");
	if (st) {
		printf("%s:%s %s\n", tc->queue, name, !strcmp(st + 6, "committed") ? "committed"
		       : "rolled back");
		return 0;
	}
	if (!ch || !cr)
		return err_set(e, MQ_EX_UNAVAILABLE, "server answered '%s' to TXNCHECK", rest);
	*checks = (uint32_t)strtoul(ch + 7, NULL, 10);
	*created = strtoll(cr + 8, NULL, 10);
	return 1;
}

static int tcheck_end_remote(struct tcheck *tc, const char *name, int commit, struct mq_err *e)
{
	struct buf b = {0};
	char *rest;
	buf_adds(&b, commit ? "COMMIT " : "ROLLBACK ");
	proto_esc(&b, tc->queue, strlen(tc->queue));
	buf_printf(&b, " %s", name);
	int k = tcheck_call(tc, &b, NULL, &rest, e);
	buf_free(&b);
	if (k < 0)
		return e->code == MQ_EX_NOINPUT ? 0 : -1;
	return !strcmp(rest, "committed") ? MQ_TXN_COMMITTED : MQ_TXN_ROLLEDBACK;
}

/* A queue's setting through a server (CONFIG QUEUE), as text. */
struct rsetting {
	const char *key;
	char *out;
	size_t n;
};

static int rsetting_line(void *ctx, char *line, struct mq_err *e)
{
	struct rsetting *r = ctx;
	struct preq q = {0};
	size_t kl = strlen(r->key);
	if (proto_parse(line, &q, e) < 0)
		return -1;
	const char *v = preq_npos(&q) == 1 ? preq_pos(&q, 0) : "";
	if (!strcmp(q.t[0].val, "LINE") && !strncmp(v, r->key, kl) && v[kl] == ':') {
		v += kl + 1 + strspn(v + kl + 1, " ");
		const char *end = strstr(v, " #"); /* the value, then where it came from */
		size_t n = end ? (size_t)(end - v) : strlen(v);
		while (n && v[n - 1] == ' ')
			n--;
		strfmt(r->out, r->n, "%.*s", (int)n, v);
	}
	preq_free(&q);
	return 0;
}

static int rmt_setting(struct rconn *c, const char *queue, const char *key, char *out, size_t n,
                       struct mq_err *e)
{
	struct rsetting r = {key, out, n};
	*out = 0;
	return rmt_qcall(c, "CONFIG", queue, rsetting_line, &r, e);
}

/*
 * mq txn check QUEUE -- CMD: for each open transaction older than
 * --older, count the check, run CMD without holding the transaction,
 * then act on its answer: the producer may have ended it meanwhile, and
 * then its outcome stands.
 */
static int txn_check(struct args *a)
{
	struct mq_err e = {0};
	struct rconn c;
	struct tcheck tc = {a, a->npos > 1 ? a->pos[1] : "", NULL, NULL, 0, NULL, {0}};
	struct rtxns rt = {0};
	char **files = NULL, dir[PATH_MAX + 32], v[64];
	size_t nf = 0;
	uint64_t maxc, defc = MQ_DEF_TXN_MAX_CHECKS;
	int rc = 0;
	if (a->npos < 3)
		return usage_error(a->cmd, "use 'mq txn check QUEUE -- CMD [ARG...]'");
	tc.older = MQ_DEF_TXN_CHECK_AFTER_MS;
	if (a->server) {
		if (q_check_name("queue", tc.queue, &e) < 0 || rmt_open(a, &c, &e) < 0)
			return fail(a, &e);
		tc.c = &c;
		if (rmt_setting(&c, tc.queue, "txn-check-after", v, sizeof v, &e) < 0 ||
		    (*v && parse_duration_ms(v, &tc.older) < 0) ||
		    rmt_setting(&c, tc.queue, "txn-max-checks", v, sizeof v, &e) < 0 ||
		    (*v && parse_u64(v, &defc) < 0) || rmt_txns(&c, tc.queue, &rt, &e) < 0) {
			rc_close(&c);
			rtxns_free(&rt);
			return fail(a, &e);
		}
		files = rt.v;
		nf = rt.n;
	} else {
		if (spool_init(a, 0, &e) < 0 || q_open(&a->sp, tc.queue, 0, NULL, 0, &tc.q, &e) < 0)
			return fail(a, &e);
		tc.older = tc.q->conf.txn_after_ms;
		defc = (uint64_t)tc.q->conf.txn_max_checks;
		txn_dir(tc.q, "", dir, sizeof dir);
		if (dir_names(dir, txn_hexname, &files, &nf, &e) < 0)
			rc = fail(a, &e);
	}
	const char *ov = opt_val(a, "older");
	if (rc == 0 && ov && parse_duration_ms(ov, &tc.older) < 0)
		rc = usage_error(a->cmd, "bad duration '%s' for --older", ov);
	if (rc == 0 && (opt_u64(a, "max-checks", defc, &maxc) < 0 || maxc == 0 || maxc > UINT32_MAX))
		rc = usage_error(a->cmd, "--max-checks must be 1 or more");
	signal(SIGPIPE, SIG_IGN);
	for (size_t f = 0; rc == 0 && f < nf && !stop_flag; f++) {
		struct txn_info in = {0};
		char id[2 * MQ_NAME_MAX + 64];
		uint32_t checks = 0;
		int64_t created = 0;
		strfmt(id, sizeof id, "%s:%s", tc.queue, files[f]);
		if (tc.c && (!txn_hexname(files[f]) || (!strcmp(rt.row[f].state, "open") &&
		                                        now_ms() - rt.row[f].created < tc.older)))
			continue;
		int k = tc.c ? tcheck_begin_remote(&tc, files[f], &in, &checks, &created, &e)
		             : tcheck_begin_local(&tc, files[f], &in, &checks, &created, &e);
		if (k == 1) {
			int st = txn_run_check(tc.queue, files[f], checks, created, &in, a->pos + 2);
			int end = st == 0 ? 1 : st == 1 || checks >= maxc ? 2 : 0;
			if (end == 0) {
				printf("%s open (check %u of %" PRIu64 ")\n", id, checks, maxc);
			} else if ((k = tc.c ? tcheck_end_remote(&tc, files[f], end == 1, &e)
			                     : tcheck_end_local(&tc, files[f], end == 1, &e)) > 0) {
				int late = end == 2 && st != 1 && k == MQ_TXN_ROLLEDBACK;
				printf("%s %s%s\n", id, txn_state_word((uint32_t)k),
				       late ? " (no answer after the last check)" : "");
				if (late)
					fprintf(stderr, "%s: txn check: %s: rolled back: still unknown after %u "
					        "checks (txn-max-checks)\n", progname, id, checks);
			}
		}
		txn_info_free(&in);
		if (k < 0)
			rc = fail(a, &e);
	}
	if (tc.c) {
		rc_close(&c);
		rtxns_free(&rt);
	} else {
		names_free(files, nf);
		q_close(tc.q);
	}
	buf_free(&tc.hb);
	return rc ? rc : stdout_done(a);
}

/* mq txn commit|rollback ID */
static int txn_end_cmd(struct args *a, int commit)
{
	struct mq_err e = {0};
	struct queue *q = NULL;
	struct txn t;
	char queue[MQ_NAME_MAX + 1], name[17];
	if (a->npos != 2)
		return usage_error(a->cmd, "use 'mq txn %s ID'", a->pos[0]);
	if (txn_id_parse(a->pos[1], queue, name) < 0)
		return usage_error(a->cmd, "bad transaction id '%s' (QUEUE:16 hex digits, as put --txn "
		                   "prints it)", a->pos[1]);
	a->queue = NULL;
	int k;
	if (a->server) { /* COMMIT or ROLLBACK QUEUE NAME */
		struct rconn c;
		struct tcheck tc = {a, queue, NULL, &c, 0, NULL, {0}};
		struct buf b = {0};
		char *rest;
		if (rmt_open(a, &c, &e) < 0)
			return fail(a, &e);
		buf_adds(&b, commit ? "COMMIT " : "ROLLBACK ");
		proto_esc(&b, queue, strlen(queue));
		buf_printf(&b, " %s", name);
		k = tcheck_call(&tc, &b, NULL, &rest, &e);
		if (k == 0)
			k = !strcmp(rest, "committed") ? MQ_TXN_COMMITTED : MQ_TXN_ROLLEDBACK;
		buf_free(&b);
		rc_close(&c);
		if (k < 0)
			return fail(a, &e);
	} else {
		if (spool_init(a, 0, &e) < 0 || q_open(&a->sp, queue, 0, NULL, 0, &q, &e) < 0)
			return fail(a, &e);
		k = txn_find(q, name, 0, &t, &e);
		if (k == 1) {
			k = commit ? txn_commit(&t, &e) : txn_rollback(&t, &e);
			txn_free(&t);
		}
		q_close(q);
		if (k < 0)
			return fail(a, &e);
	}
	if (k == 0) {
		err_set(&e, MQ_EX_NOINPUT, "no such transaction '%s' (never begun, or ended long ago)",
		        a->pos[1]);
		return fail(a, &e);
	}
	if (k != (commit ? MQ_TXN_COMMITTED : MQ_TXN_ROLLEDBACK)) {
		err_set(&e, MQ_EX_DATAERR, "transaction '%s' was already %s", a->pos[1],
		        txn_state_word((uint32_t)k));
		return fail(a, &e);
	}
	return MQ_EX_OK;
}

static int cmd_txn(struct args *a)
{
	const char *sub = a->pos[0];
	if (a->namesrv)
		return usage_error(a->cmd, "not through nameservers: name the broker with -s");
	if (!strcmp(sub, "commit") || !strcmp(sub, "rollback"))
		return txn_end_cmd(a, !strcmp(sub, "commit"));
	if (!strcmp(sub, "ls"))
		return txn_ls(a);
	if (!strcmp(sub, "check"))
		return txn_check(a);
	return usage_error(a->cmd, "unknown subcommand '%s' (commit, rollback, ls or check)", sub);
}

/* ----- mq get ----- */

/* --retries and --backoff as settings for q_open(); returns how many. */
static int opt_retry_settings(struct args *a, struct kv *set)
{
	int n = 0;
	const struct opt *o = a->cmd->opts;
	while (o->lng && strcmp(o->lng, "retries"))
		o++;
	if (!o->lng) /* a command without these options */
		return 0;
	if (opt_val(a, "retries"))
		set[n++] = (struct kv){"retries", opt_val(a, "retries")};
	if (opt_val(a, "backoff"))
		set[n++] = (struct kv){"backoff", opt_val(a, "backoff")};
	return n;
}

/* get's side of consumer_pass(). */
struct getctx {
	struct queue *q;
	const char *group;
	uint64_t want;    /* 0: all there are */
	int commit_first;
	int64_t lease_ms; /* < 0: no lease */
	const struct tagset *tags;
	struct out *o;
	const struct msgfmt *f;
};

/* get's side of grp_deliver(): format into the output buffer and write
 * it out (with a lease or --commit-first, only once they are recorded). */
static int get_emit(void *ctx, int part, const struct rec_msg *m, unsigned attempt,
                    uint32_t lease)
{
	struct getctx *g = ctx;
	struct dlv d = {g->group, attempt, lease};
	fmt_msg(g->o, g->f, g->q->name, part, m, &d);
	return 0;
}

static int get_out(void *ctx, struct mq_err *e)
{
	struct getctx *g = ctx;
	if (out_flush(g->o) == 0)
		return 0;
	return err_set(e, MQ_EX_IOERR, "cannot write to stdout: %s (%s)", strerror(g->o->err),
	               g->lease_ms >= 0 ? "the leases will expire and the messages come again"
	               : g->commit_first ? "already committed: lost for this group"
	               : "nothing committed");
}

static void get_drop(void *ctx) { ((struct getctx *)ctx)->o->b.len = 0; }

/* Deliver up to want messages of one partition (grp_deliver). */
static int64_t get_part(struct getctx *g, int part, uint64_t want, int nonblock, int *busy,
                        struct mq_err *e)
{
	struct deliver d = {g->group, want, g->lease_ms, !g->commit_first && g->lease_ms < 0,
	                    nonblock, g->tags, get_emit, get_out, get_drop, g};
	return grp_deliver(g->q, part, &d, busy, e);
}

/*
 * One pass of a group consumer over the partitions: first each partition
 * whose group lock is free, then, waiting for it, each that was busy;
 * starting at a pid-dependent partition so concurrent consumers spread.
 * part() handles one partition (messages done, or < 0 to stop with that);
 * more() says whether to go on after total messages.
 */
struct cpass {
	int64_t (*part)(void *ctx, int p, int nonblock, int64_t total, int *busy, struct mq_err *e);
	int (*more)(void *ctx, int64_t total);
	void *ctx;
};

static int64_t consumer_pass(struct queue *q, const struct cpass *cp, struct mq_err *e)
{
	int64_t total = 0;
	if (dly_tick(q, e) < 0) /* delayed messages now due join their partitions */
		return -1;
	char *busy = calloc((size_t)q->nparts, 1);
	int start = (int)(getpid() % q->nparts);
	if (!busy)
		abort();
	for (int pass = 0; pass < 2; pass++) {
		for (int j = 0; j < q->nparts && cp->more(cp->ctx, total); j++) {
			int i = (start + j) % q->nparts, b;
			if (pass == 1 && !busy[i])
				continue;
			int64_t got = cp->part(cp->ctx, i, pass == 0, total, &b, e);
			if (got < 0) {
				free(busy);
				return got;
			}
			busy[i] = (char)b;
			total += got;
		}
	}
	free(busy);
	return total;
}

/*
 * Passes until nothing is left (wait_ms -2), or, idle, waiting for new
 * messages up to wait_ms (-1: for ever) since the last one; cp->more()
 * or a signal ends it too.  Returns the last pass's count, or -1.
 */
static int64_t consumer_loop(struct queue *q, const struct cpass *cp, int64_t wait_ms,
                             struct mq_err *e)
{
	struct waiter wt = {-1};
	if (wait_ms != -2)
		wait_init(&wt, q);
	int64_t got = 0, idle_since = mono_ms();
	while (!stop_flag && cp->more(cp->ctx, 0)) {
		if ((got = consumer_pass(q, cp, e)) < 0)
			break;
		if (got > 0) {
			idle_since = mono_ms();
			continue;
		}
		int64_t left = wait_ms < 0 ? -1 : idle_since + wait_ms - mono_ms();
		if (wait_ms == -2 || (wait_ms >= 0 && left <= 0))
			break;
		wait_change(&wt, left);
	}
	wait_free(&wt);
	return got;
}

static int64_t get_pass_part(void *ctx, int p, int nonblock, int64_t total, int *busy,
                             struct mq_err *e)
{
	struct getctx *g = ctx;
	return get_part(g, p, g->want ? g->want - (uint64_t)total : 0, nonblock, busy, e);
}

static int get_pass_more(void *ctx, int64_t total)
{
	struct getctx *g = ctx;
	return g->want == 0 || (uint64_t)total < g->want;
}

/* What a GET or PEEK answer's MSG lines go through on the client. */
struct rmsgs {
	struct rconn *c;
	struct out *o;
	const struct msgfmt *f;
	const char *queue, *group;
	int user_lease;      /* show leases and receipts (get --lease) */
	struct buf receipts; /* internal leases to ack once written out */
	struct buf hb;
	uint64_t n, next;
};

static int rmsgs_line(void *ctx, char *line, struct mq_err *e)
{
	struct rmsgs *r = ctx;
	struct rec_msg m;
	int part;
	unsigned attempt;
	uint32_t lease;
	if (rc_msg(r->c, line, &m, &part, &attempt, &lease, &r->hb, e) < 0)
		return -1;
	struct dlv d = {r->group, attempt, r->user_lease ? lease : 0};
	fmt_msg(r->o, r->f, r->queue, part, &m, r->group ? &d : NULL);
	if (r->group && lease && !r->user_lease)
		buf_printf(&r->receipts, " %s:%d:%" PRIu64 ":%" PRIu32, r->group, part, m.offset, lease);
	r->n++;
	return 0;
}

/*
 * mq get through a server.  At-least-once as locally: without --lease
 * and --commit-first the messages are leased (MQ_REMOTE_LEASE_MS) and
 * acked once written out, so a client that dies gets them delivered
 * again when the lease runs out.
 */
static int get_remote(struct args *a, const char *g, uint64_t want, int64_t wait_ms,
                      int64_t lease_ms, const struct msgfmt *f)
{
	struct mq_err e = {0};
	struct rconn c;
	struct out o = {1, {0}, 0};
	struct rmsgs r = {&c, &o, f, a->pos[0], g, lease_ms >= 0, {0}, {0}, 0, 0};
	struct buf b = {0};
	uint64_t total = 0;
	int rc = 0, first = opt_has(a, "commit-first"), busy = 0;
	if (rmt_open(a, &c, &e) < 0)
		return fail(a, &e);
	c.stop = &stop_flag; /* SIGINT, SIGTERM: give up a wait, as locally */
	do {
		b.len = 0;
		r.n = 0;
		r.receipts.len = 0;
		buf_adds(&b, "GET ");
		proto_esc(&b, a->pos[0], strlen(a->pos[0]));
		proto_opt(&b, "group", g, strlen(g));
		buf_printf(&b, " count=%" PRIu64, want ? want - total : 0);
		if (wait_ms != -2 && total == 0)
			rmt_ms(&b, "wait", wait_ms < 0 ? 0 : wait_ms ? wait_ms : 1);
		if (lease_ms >= 0 || !first)
			rmt_ms(&b, "lease", lease_ms >= 0 ? lease_ms : MQ_REMOTE_LEASE_MS);
		if (opt_val(a, "tag"))
			proto_opt(&b, "tag", opt_val(a, "tag"), strlen(opt_val(a, "tag")));
		rmt_retry_opts(a, &b);
		char *rest;
		if (rmt_call(&c, &b, rmsgs_line, &r, &rest, &e) < 0) {
			rc = -1;
			break;
		}
		busy = strstr(rest, "busy=") ? atoi(strstr(rest, "busy=") + 5) : 0;
		if (out_flush(&o) < 0) {
			rc = err_set(&e, MQ_EX_IOERR, "cannot write to stdout: %s (%s)", strerror(o.err),
			             lease_ms >= 0 || !first ? "the leases will expire and the messages "
			             "come again" : "already committed: lost for this group");
			break;
		}
		/* written out: now they are done, in ACK lines well under MQ_LINE_MAX */
		for (size_t at = 0; at < r.receipts.len && rc == 0;) {
			size_t end = at;
			while (end < r.receipts.len && (end == at || end - at < MQ_LINE_MAX / 2)) {
				const char *sp = memchr(r.receipts.p + end + 1, ' ', r.receipts.len - end - 1);
				end = sp ? (size_t)(sp - r.receipts.p) : r.receipts.len;
			}
			b.len = 0;
			buf_adds(&b, "ACK ");
			proto_esc(&b, a->pos[0], strlen(a->pos[0]));
			buf_add(&b, r.receipts.p + at, end - at);
			if (rmt_call(&c, &b, NULL, NULL, NULL, &e) < 0)
				rc = -1;
			at = end;
		}
		if (rc < 0)
			break;
		total += r.n;
		if (r.n == 0 && busy) /* another consumer holds a partition: a local get waits */
			poll(NULL, 0, 10);
	} while ((r.n > 0 || busy) && (want == 0 || total < want) && !stop_flag);
	rc_close(&c);
	buf_free(&b);
	buf_free(&o.b);
	buf_free(&r.receipts);
	buf_free(&r.hb);
	if (rc < 0 && stop_flag && c.broken && r.n == 0) /* a signal ended the wait, as locally */
		return total > 0 ? MQ_EX_OK : MQ_EX_EMPTY;
	if (rc < 0)
		return fail(a, &e);
	return total > 0 ? MQ_EX_OK : MQ_EX_EMPTY;
}

static int cmd_get(struct args *a)
{
	struct mq_err e = {0};
	struct queue *q = NULL;
	struct out o = {1, {0}, 0};
	struct msgfmt f;
	uint64_t want;
	int64_t wait_ms = -2, lease_ms = -1; /* wait: -2 no wait, -1 forever */
	const char *g = opt_val(a, "group") ? opt_val(a, "group") : "default", *w = opt_val(a, "wait");
	const char *l = opt_val(a, "lease");
	struct kv set[2];
	int nset = opt_retry_settings(a, set);
	a->queue = a->pos[0];
	if (opt_u64(a, "count", 1, &want) < 0)
		return MQ_EX_USAGE;
	if (l && (parse_duration_ms(l, &lease_ms) < 0 || lease_ms == 0))
		return usage_error(a->cmd, "bad duration '%s' for --lease", l);
	if (l && opt_has(a, "commit-first"))
		return usage_error(a->cmd, "--lease and --commit-first exclude each other");
	if (w && *w && parse_duration_ms(w, &wait_ms) < 0)
		return usage_error(a->cmd, "bad duration '%s' for --wait", w);
	if (w && !*w)
		wait_ms = -1;
	struct tagset tsbuf;
	const struct tagset *tags;
	if (opt_output(a, &f, &tsbuf, &tags) < 0)
		return MQ_EX_USAGE;
	if (a->server) {
		tagset_free(&tsbuf);
		return q_check_name("group", g, &e) < 0 ? fail(a, &e)
		       : get_remote(a, g, want, wait_ms, lease_ms, &f);
	}
	if (q_check_name("group", g, &e) < 0 || spool_init(a, 0, &e) < 0 ||
	    q_open(&a->sp, a->pos[0], 0, set, nset, &q, &e) < 0) {
		tagset_free(&tsbuf);
		return fail(a, &e);
	}
	struct waiter wt = {-1};
	if (wait_ms != -2)
		wait_init(&wt, q);
	int64_t deadline = wait_ms >= 0 ? mono_ms() + wait_ms : 0, got;
	struct getctx gc = {q, g, want, opt_has(a, "commit-first"), lease_ms, tags, &o, &f};
	struct cpass cp = {get_pass_part, get_pass_more, &gc};
	while ((got = consumer_pass(q, &cp, &e)) == 0 && wait_ms != -2 && !stop_flag) {
		int64_t left = wait_ms < 0 ? -1 : deadline - mono_ms();
		if (wait_ms >= 0 && left <= 0)
			break;
		wait_change(&wt, left);
	}
	wait_free(&wt);
	q_close(q);
	buf_free(&o.b);
	tagset_free(&tsbuf);
	if (got < 0)
		return fail(a, &e);
	return got > 0 ? MQ_EX_OK : MQ_EX_EMPTY;
}

/* -w [TIMEOUT] and -e of consume and pipe: *wait_ms -2 (stop when
 * empty), -1 (wait for ever) or the timeout; -1 after a usage error. */
static int opt_wait(struct args *a, int64_t *wait_ms)
{
	const char *w = opt_val(a, "wait");
	*wait_ms = -2;
	if (w && *w && parse_duration_ms(w, wait_ms) < 0)
		return usage_error(a->cmd, "bad duration '%s' for --wait", w), -1;
	if (w && !*w)
		*wait_ms = -1;
	if (w && opt_has(a, "until-empty"))
		return usage_error(a->cmd, "-e and -w exclude each other"), -1;
	return 0;
}

/* ----- mq consume ----- */

struct consume {
	struct queue *q;
	const char *group;
	char **argv;              /* the command to run */
	uint64_t batch;           /* messages per run */
	int64_t timeout_ms;       /* per run; -1 none */
	const struct tagset *tags;
	uint64_t done;            /* messages handled and committed */
	uint64_t failed;          /* messages whose run failed */
	uint64_t max;             /* stop after this many (0: no limit) */
	int ordered;              /* a failed message blocks its partition */
	int parallel;             /* runs at once */
};

/* The metadata of a run's first message, copied out of the reader. */
struct runmeta {
	int part;
	unsigned attempt;
	uint64_t offset, count;
	int64_t ts;
	struct buf key, tag;
	int has_key, has_tag;
};

/* Start the command once with the messages in `in` on its stdin and the
 * first message's metadata in its environment.  Returns its pid, or -1
 * if it could not be started. */
static pid_t consume_start(struct consume *c, const struct runmeta *rm, const struct buf *in,
                           struct mq_err *e)
{
	int fds[2];
	if (pipe(fds) < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot make a pipe");
	pid_t pid = fork();
	if (pid < 0) {
		close(fds[0]);
		close(fds[1]);
		return err_sys(e, MQ_EX_IOERR, "cannot fork");
	}
	if (pid == 0) {
		char num[32];
		dup2(fds[0], 0);
		close(fds[0]);
		close(fds[1]);
		setenv("MQ_QUEUE", c->q->name, 1);
		strfmt(num, sizeof num, "%d", rm->part);
		setenv("MQ_PARTITION", num, 1);
		strfmt(num, sizeof num, "%" PRIu64, rm->offset);
		setenv("MQ_OFFSET", num, 1);
		strfmt(num, sizeof num, "%" PRIu64, rm->count);
		setenv("MQ_COUNT", num, 1);
		strfmt(num, sizeof num, "%" PRId64, rm->ts);
		setenv("MQ_TIMESTAMP", num, 1);
		strfmt(num, sizeof num, "%u", rm->attempt);
		setenv("MQ_ATTEMPT", num, 1);
		setenv("MQ_KEY", rm->has_key ? rm->key.p : "", 1);
		setenv("MQ_TAG", rm->has_tag ? rm->tag.p : "", 1);
		char id[MQ_NAME_MAX + 64];
		strfmt(id, sizeof id, "%s/%d/%" PRIu64, c->q->name, rm->part, rm->offset);
		setenv("MQ_ID", id, 1);
		signal(SIGPIPE, SIG_DFL);
		execvp(c->argv[0], c->argv);
		fprintf(stderr, "%s: consume: cannot run '%s': %s\n", progname, c->argv[0], strerror(errno));
		_exit(127);
	}
	close(fds[0]);
	feed_close(fds[1], in);
	return pid;
}

/* Why a run failed, from its wait status (MQ_WHY_* | detail << 8). */
static uint32_t run_why(int st, int timed_out)
{
	if (timed_out)
		return MQ_WHY_TIMEOUT;
	if (WIFEXITED(st))
		return MQ_WHY_EXIT | (uint32_t)WEXITSTATUS(st) << 8;
	return MQ_WHY_SIGNAL | (uint32_t)(WIFSIGNALED(st) ? WTERMSIG(st) : 0) << 8;
}

/* A run of the command: its messages (running until settled), their
 * keys (NUL-terminated each, for --parallel), and its deadline. */
struct run {
	pid_t pid;
	struct took *t;
	size_t nt;
	uint64_t n;
	struct runmeta rm;
	struct buf keys;
	int64_t deadline;
	int killed;
};

/* Does any key of batch b (NUL-separated) run in runs[0..n)? */
static int run_conflict(const struct run *runs, int n, const struct buf *b)
{
	for (size_t at = 0; at < b->len; at += strlen(b->p + at) + 1)
		for (int i = 0; i < n; i++)
			for (size_t k = 0; k < runs[i].keys.len; k += strlen(runs[i].keys.p + k) + 1)
				if (!strcmp(b->p + at, runs[i].keys.p + k))
					return 1;
	return 0;
}

/* Settle a finished run: done on exit 0, else failed (retried after the
 * backoff, or buried after the last retry). */
static int consume_settle(struct consume *c, struct claim *cl, struct run *r, int st,
                          struct mq_err *e)
{
	struct queue *q = c->q;
	grp_took_attach(cl, r->t, r->nt);
	r->t = NULL;
	if (!r->killed && WIFEXITED(st) && WEXITSTATUS(st) == 0) {
		c->done += r->n;
		return grp_settle_done(cl, e);
	}
	uint32_t why = run_why(st, r->killed);
	char w[64], d[32];
	why_text(why, w, sizeof w);
	fmt_duration(d, sizeof d, backoff_ms(&q->conf, r->rm.attempt));
	if ((int64_t)r->rm.attempt <= q->conf.retries)
		sp_notice(q->sp, "'%s' failed on %s/%d offset %" PRIu64 " (%s, attempt %u of %" PRId64
		          "); retry in %s", c->argv[0], q->name, r->rm.part, r->rm.offset, w,
		          r->rm.attempt, q->conf.retries + 1, d);
	c->failed += r->n;
	return grp_settle_failed(cl, why, e);
}

/*
 * Consume from one partition holding the group's lock on it: take up to
 * batch messages at a time (retries due first) and run the command on
 * them, up to `parallel` runs at once but never two sharing a key, and
 * settle each run as it ends.  Messages of runs still going are marked
 * running in the group's state, so the committed offset never passes
 * them.  SIGTERM/SIGINT stop the taking; running commands finish (up to
 * their timeout) and are settled.  Returns messages done, or -1.
 */
static int64_t consume_part(struct consume *c, int part, int nonblock, int *busy,
                            struct mq_err *e)
{
	struct queue *q = c->q;
	struct claim cl;
	uint64_t done0 = c->done;
	int k = grp_claim(q, c->group, part, (nonblock ? CL_NONBLOCK : 0) |
	                  (c->ordered ? CL_ORDERED : 0), &cl, e);
	*busy = k == 0;
	if (k <= 0)
		return k;
	cl.r.tags = c->tags;
	struct run *runs = calloc((size_t)c->parallel, sizeof *runs), next = {0};
	struct out o = {-1, {0}, 0};
	struct msgfmt f = {0, "%s\\n"};
	uint64_t inflight = 0;
	int nrun = 0, rc = 0, empty = 0, have = 0;
	if (!runs)
		abort();
	for (;;) {
		/* start what may start */
		while (rc == 0 && nrun < c->parallel && !stop_flag && !empty) {
			uint64_t room = c->max ? c->max - c->done - inflight : UINT64_MAX;
			if (!have && room > 0) {
				struct rec_msg m;
				unsigned attempt;
				uint64_t n = 0;
				o.b.len = 0;
				next.keys.len = 0;
				while (n < c->batch && n < room && (k = grp_take(&cl, &m, &attempt, e)) == 1) {
					if (n == 0) {
						next.rm = (struct runmeta){part, attempt, m.offset, 0, m.ts, next.rm.key,
						                           next.rm.tag, m.has_key, m.has_tag};
						next.rm.key.len = next.rm.tag.len = 0;
						buf_add(&next.rm.key, m.key, m.klen);
						buf_addc0(&next.rm.key);
						buf_add(&next.rm.tag, m.tag, m.tlen);
						buf_addc0(&next.rm.tag);
					}
					if (attempt > next.rm.attempt)
						next.rm.attempt = attempt; /* MQ_ATTEMPT: the batch's highest */
					if (m.has_key) {
						buf_add(&next.keys, m.key, m.klen);
						buf_addc0(&next.keys);
					}
					fmt_msg(&o, &f, q->name, part, &m, NULL);
					n++;
				}
				if (k < 0)
					rc = -1;
				next.n = next.rm.count = n;
				have = n > 0;
				empty = n == 0;
			}
			if (!have || rc < 0 || (nrun && run_conflict(runs, nrun, &next.keys)))
				break;
			next.pid = consume_start(c, &next.rm, &o.b, e);
			if (next.pid < 0) {
				rc = -1;
				break;
			}
			next.deadline = c->timeout_ms >= 0 ? mono_ms() + c->timeout_ms : INT64_MAX;
			grp_took_detach(&cl, &next.t, &next.nt);
			if (grp_save(&cl, 0, e) < 0) /* so a crash now raises their attempt */
				rc = -1;
			runs[nrun++] = next;
			inflight += next.n;
			next = (struct run){0};
			have = 0;
		}
		if (nrun == 0)
			break;
		/* wait for one to end, killing those past their timeout */
		int st;
		pid_t pid = waitpid(-1, &st, c->timeout_ms >= 0 ? WNOHANG : 0);
		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0) {
			rc = err_sys(e, MQ_EX_IOERR, "cannot wait for '%s'", c->argv[0]);
			break;
		}
		if (pid == 0) {
			for (int i = 0; i < nrun; i++)
				if (!runs[i].killed && mono_ms() >= runs[i].deadline) {
					kill(runs[i].pid, SIGKILL);
					runs[i].killed = 1;
				}
			poll(NULL, 0, 5);
			continue;
		}
		for (int i = 0; i < nrun; i++) {
			if (runs[i].pid != pid)
				continue;
			struct run r = runs[i];
			runs[i] = runs[--nrun];
			inflight -= r.n;
			if (consume_settle(c, &cl, &r, st, e) < 0 && rc == 0)
				rc = -1;
			buf_free(&r.keys);
			buf_free(&r.rm.key);
			buf_free(&r.rm.tag);
			break;
		}
	}
	buf_free(&o.b);
	buf_free(&next.keys);
	buf_free(&next.rm.key);
	buf_free(&next.rm.tag);
	free(runs);
	struct mq_err re;
	if (grp_release(&cl, &re) < 0 && rc == 0)
		rc = (*e = re, -1);
	return rc < 0 ? rc : (int64_t)(c->done - done0);
}

/* consume's side of consumer_pass(). */
static int64_t consume_pass_part(void *ctx, int p, int nonblock, int64_t total, int *busy,
                                 struct mq_err *e)
{
	(void)total; /* consume counts in c->done */
	return consume_part(ctx, p, nonblock, busy, e);
}

static int consume_pass_more(void *ctx, int64_t total)
{
	struct consume *c = ctx;
	(void)total;
	return !stop_flag && (c->max == 0 || c->done < c->max);
}

/* One leased batch of a consume through a server: the bodies for the
 * command's stdin, the first message's metadata, and the receipts. */
struct rbatch {
	struct rconn *c;
	struct consume *cs;
	struct out o;
	struct runmeta rm;
	struct buf receipts, hb;
	uint64_t n;
};

static int rbatch_line(void *ctx, char *line, struct mq_err *e)
{
	struct rbatch *b = ctx;
	struct rec_msg m;
	int part;
	unsigned attempt;
	uint32_t lease;
	static const struct msgfmt f = {0, "%s\n"};
	if (rc_msg(b->c, line, &m, &part, &attempt, &lease, &b->hb, e) < 0)
		return -1;
	if (b->n++ == 0) {
		b->rm = (struct runmeta){part, attempt, m.offset, 0, m.ts, b->rm.key, b->rm.tag,
		                         m.has_key, m.has_tag};
		b->rm.key.len = b->rm.tag.len = 0;
		buf_add(&b->rm.key, m.key, m.klen);
		buf_addc0(&b->rm.key);
		buf_add(&b->rm.tag, m.tag, m.tlen);
		buf_addc0(&b->rm.tag);
	}
	if (attempt > b->rm.attempt)
		b->rm.attempt = attempt;
	b->rm.count = b->n;
	fmt_msg(&b->o, &f, b->cs->q ? b->cs->q->name : "", part, &m, NULL);
	buf_printf(&b->receipts, " %s:%d:%" PRIu64 ":%" PRIu32, b->cs->group, part, m.offset, lease);
	return 0;
}

/*
 * consume through a server: GET a batch with a lease (--timeout plus a
 * minute, else an hour), run the command, then ACK the batch on exit 0
 * or NACK it (the server applies the backoff and the dead letters).  One
 * run at a time: --parallel and --ordered need the local spool.
 */
static int consume_remote(struct args *a, struct consume *cs, int64_t wait_ms)
{
	struct mq_err e = {0};
	struct rconn c;
	struct rbatch b = {&c, cs, {-1, {0}, 0}, {0}, {0}, {0}, 0};
	struct buf req = {0};
	struct queue fake = {0}; /* only its name, for MQ_QUEUE */
	int64_t lease = (cs->timeout_ms >= 0 ? cs->timeout_ms : 3600000) + 60000;
	int rc = 0;
	strfmt(fake.name, sizeof fake.name, "%s", a->queue);
	cs->q = &fake;
	if (rmt_open(a, &c, &e) < 0)
		return fail(a, &e);
	/* the retry settings the server applies, for the failure notices */
	struct kv set[2];
	int nset = opt_retry_settings(a, set);
	char v[256];
	conf_defaults(&fake.conf);
	for (int i = 0; i < 2; i++) {
		const char *key = i ? "backoff" : "retries";
		if (rmt_setting(&c, a->queue, key, v, sizeof v, &e) < 0) {
			rc_close(&c);
			return fail(a, &e);
		}
		if (*v)
			conf_set(&fake.conf, key, v, "server", &e);
	}
	for (int i = 0; i < nset; i++)
		conf_set(&fake.conf, set[i].k, set[i].v, "option", &e);
	signal(SIGPIPE, SIG_IGN);
	while (!stop_flag && (cs->max == 0 || cs->done + cs->failed < cs->max)) {
		c.stop = &stop_flag; /* a signal ends a wait for messages, not an ack */
		uint64_t want = cs->batch;
		if (cs->max && cs->max - cs->done - cs->failed < want)
			want = cs->max - cs->done - cs->failed;
		req.len = b.o.b.len = b.receipts.len = 0;
		b.n = 0;
		buf_adds(&req, "GET ");
		proto_esc(&req, a->queue, strlen(a->queue));
		proto_opt(&req, "group", cs->group, strlen(cs->group));
		buf_printf(&req, " count=%" PRIu64, want);
		if (wait_ms != -2)
			rmt_ms(&req, "wait", wait_ms < 0 ? 0 : wait_ms ? wait_ms : 1);
		rmt_ms(&req, "lease", lease);
		if (opt_val(a, "tag"))
			proto_opt(&req, "tag", opt_val(a, "tag"), strlen(opt_val(a, "tag")));
		rmt_retry_opts(a, &req);
		char *rest;
		if ((rc = rmt_call(&c, &req, rbatch_line, &b, &rest, &e)) < 0) {
			if (stop_flag && c.broken && b.n == 0)
				rc = 0; /* a signal while waiting: done, as locally */
			break;
		}
		c.stop = NULL;
		if (b.n == 0 && strstr(rest, "busy=")) { /* another consumer holds a partition */
			poll(NULL, 0, 10);
			continue;
		}
		if (b.n == 0)
			break; /* empty (after the wait, if any) */
		pid_t pid = consume_start(cs, &b.rm, &b.o.b, &e);
		if (pid < 0) {
			rc = -1;
			break;
		}
		int st = 0, killed = 0;
		int64_t deadline = cs->timeout_ms >= 0 ? mono_ms() + cs->timeout_ms : INT64_MAX;
		for (;;) {
			pid_t k = waitpid(pid, &st, cs->timeout_ms >= 0 ? WNOHANG : 0);
			if (k == pid || (k < 0 && errno != EINTR))
				break;
			if (k == 0 && !killed && mono_ms() >= deadline) {
				kill(pid, SIGKILL);
				killed = 1;
			}
			if (k == 0)
				poll(NULL, 0, 5);
		}
		int ok = !killed && WIFEXITED(st) && WEXITSTATUS(st) == 0;
		if (!ok && (int64_t)b.rm.attempt <= fake.conf.retries) {
			/* the notice a local consume prints (that of a dead letter comes
			 * from the server, as a NOTICE line of the NACK's answer) */
			char w[64], d[32];
			why_text(run_why(st, killed), w, sizeof w);
			fmt_duration(d, sizeof d, backoff_ms(&fake.conf, b.rm.attempt));
			fprintf(stderr, "%s: '%s' failed on %s/%d offset %" PRIu64 " (%s, attempt %u of %"
			        PRId64 "); retry in %s\n", progname, cs->argv[0], a->queue, b.rm.part,
			        b.rm.offset, w, b.rm.attempt, fake.conf.retries + 1, d);
		}
		req.len = 0;
		buf_adds(&req, ok ? "ACK " : "NACK ");
		proto_esc(&req, a->queue, strlen(a->queue));
		if (!ok) {
			rmt_retry_opts(a, &req);
			buf_printf(&req, " why=%" PRIu32, run_why(st, killed)); /* for the dead letter */
		}
		buf_add(&req, b.receipts.p, b.receipts.len);
		if ((rc = rmt_call(&c, &req, NULL, NULL, NULL, &e)) < 0)
			break;
		*(ok ? &cs->done : &cs->failed) += b.n;
	}
	rc_close(&c);
	buf_free(&req);
	buf_free(&b.o.b);
	buf_free(&b.receipts);
	buf_free(&b.hb);
	buf_free(&b.rm.key);
	buf_free(&b.rm.tag);
	cs->q = NULL;
	return rc < 0 ? fail(a, &e) : MQ_EX_OK;
}

static int cmd_consume(struct args *a)
{
	struct mq_err e = {0};
	struct consume c = {0};
	const char *t = opt_val(a, "timeout");
	int64_t wait_ms;
	struct kv set[2];
	int nset = opt_retry_settings(a, set);
	a->queue = a->pos[0];
	c.group = opt_val(a, "group");
	c.argv = a->pos + 1;
	c.timeout_ms = -1;
	c.ordered = opt_has(a, "ordered");
	uint64_t par;
	if (opt_u64(a, "parallel", 1, &par) < 0)
		return MQ_EX_USAGE;
	if (par == 0 || par > 1024)
		return usage_error(a->cmd, "--parallel must be 1 to 1024");
	if (par > 1 && c.ordered)
		return usage_error(a->cmd, "--ordered runs one command at a time; it excludes --parallel");
	c.parallel = (int)par;
	if (!c.group)
		return usage_error(a->cmd, "-g GROUP is required");
	if (opt_u64(a, "batch", 1, &c.batch) < 0 || opt_u64(a, "max", 0, &c.max) < 0)
		return MQ_EX_USAGE;
	if (c.batch == 0)
		return usage_error(a->cmd, "--batch must be at least 1");
	if (t && (parse_duration_ms(t, &c.timeout_ms) < 0 || c.timeout_ms == 0))
		return usage_error(a->cmd, "bad duration '%s' for --timeout", t);
	if (opt_wait(a, &wait_ms) < 0)
		return MQ_EX_USAGE;
	struct tagset tsbuf;
	if (opt_tags(a, &tsbuf, &c.tags) < 0)
		return MQ_EX_USAGE;
	if (a->server) {
		tagset_free(&tsbuf);
		if (c.parallel > 1 || c.ordered)
			return usage_error(a->cmd, "--parallel and --ordered need the spool: not through "
			                   "a server yet");
		if (q_check_name("group", c.group, &e) < 0)
			return fail(a, &e);
		return consume_remote(a, &c, wait_ms);
	}
	if (q_check_name("group", c.group, &e) < 0 || spool_init(a, 0, &e) < 0 ||
	    q_open(&a->sp, a->queue, 0, set, nset, &c.q, &e) < 0) {
		tagset_free(&tsbuf);
		return fail(a, &e);
	}
	signal(SIGPIPE, SIG_IGN);
	struct cpass cp = {consume_pass_part, consume_pass_more, &c};
	int64_t got = consumer_loop(c.q, &cp, wait_ms, &e);
	q_close(c.q);
	tagset_free(&tsbuf);
	if (got < 0)
		return fail(a, &e);
	return MQ_EX_OK;
}

/* ----- mq pipe ----- */

struct pipe {
	struct queue *src, *dst;
	const char *group;
	char **argv;
	uint64_t batch, max;
	uint64_t done, out; /* source messages consumed, destination messages written */
};

/*
 * Run the filter once: in on its stdin, its stdout into out, metadata in
 * MQ_* variables.  Returns 0 if it exited 0, else -1 with why (75: the
 * batch is not consumed, and comes again).
 */
static int pipe_filter(struct pipe *pp, int part, uint64_t lo, uint64_t n, const struct buf *in,
                       struct buf *out, struct mq_err *e)
{
	int ip[2], op[2];
	if (pipe(ip) < 0)
		return err_sys(e, MQ_EX_IOERR, "cannot make a pipe");
	if (pipe(op) < 0) {
		close(ip[0]);
		close(ip[1]);
		return err_sys(e, MQ_EX_IOERR, "cannot make a pipe");
	}
	pid_t pid = fork();
	if (pid < 0) {
		close(ip[0]), close(ip[1]), close(op[0]), close(op[1]);
		return err_sys(e, MQ_EX_IOERR, "cannot fork");
	}
	if (pid == 0) {
		char num[32];
		dup2(ip[0], 0);
		dup2(op[1], 1);
		close(ip[0]), close(ip[1]), close(op[0]), close(op[1]);
		setenv("MQ_QUEUE", pp->src->name, 1);
		strfmt(num, sizeof num, "%d", part);
		setenv("MQ_PARTITION", num, 1);
		strfmt(num, sizeof num, "%" PRIu64, lo);
		setenv("MQ_OFFSET", num, 1);
		strfmt(num, sizeof num, "%" PRIu64, n);
		setenv("MQ_COUNT", num, 1);
		signal(SIGPIPE, SIG_DFL);
		execvp(pp->argv[0], pp->argv);
		fprintf(stderr, "%s: pipe: cannot run '%s': %s\n", progname, pp->argv[0], strerror(errno));
		_exit(127);
	}
	close(ip[0]);
	close(op[1]);
	fcntl(ip[1], F_SETFL, O_NONBLOCK);
	size_t sent = 0;
	int wfd = ip[1], rfd = op[0];
	if (in->len == 0)
		dur_close(&wfd);
	out->len = 0;
	while (rfd >= 0) { /* feed and drain at once: neither side can block the other */
		struct pollfd pf[2] = {{rfd, POLLIN, 0}, {wfd, POLLOUT, 0}};
		if (poll(pf, wfd >= 0 ? 2 : 1, -1) < 0 && errno != EINTR)
			break;
		if (wfd >= 0 && (pf[1].revents & (POLLOUT | POLLERR | POLLHUP))) {
			ssize_t w = write(wfd, in->p + sent, in->len - sent);
			if (w > 0)
				sent += (size_t)w;
			if ((w < 0 && errno != EAGAIN && errno != EINTR) || sent == in->len)
				dur_close(&wfd); /* done, or the filter closed its input */
		}
		if (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) {
			buf_reserve(out, 65536);
			ssize_t r = read(rfd, out->p + out->len, 65536);
			if (r > 0)
				out->len += (size_t)r;
			else if (r == 0 || errno != EINTR)
				dur_close(&rfd);
		}
	}
	dur_close(&wfd);
	dur_close(&rfd);
	int st;
	while (waitpid(pid, &st, 0) < 0)
		if (errno != EINTR)
			return err_sys(e, MQ_EX_IOERR, "cannot wait for '%s'", pp->argv[0]);
	if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
		return 0;
	char w[64];
	why_text(run_why(st, 0), w, sizeof w);
	return err_set(e, MQ_EX_TEMPFAIL, "'%s' failed on %s/%d offsets %" PRIu64 "-%" PRIu64
	               " (%s): nothing of that batch went to %s; it comes again on the next run",
	               pp->argv[0], pp->src->name, part, lo, lo + n - 1, w, pp->dst->name);
}

/* The filter's output lines as the step's messages for partition dp. */
static int pipe_output(struct pipe *pp, struct txn *t, int dp, const struct buf *out,
                       struct mq_err *e)
{
	struct rec_enc enc;
	int64_t now = now_ms();
	int r = 0;
	rec_enc_init(&enc, (int)pp->dst->conf.compression, MQ_BATCH_TARGET);
	for (size_t at = 0; r == 0 && at < out->len;) {
		const char *nl = memchr(out->p + at, '\n', out->len - at);
		size_t len = nl ? (size_t)(nl - (out->p + at)) : out->len - at;
		struct rec_msg m = {0};
		m.ts = now;
		m.body = (const unsigned char *)out->p + at;
		m.blen = len;
		if (len > (size_t)pp->dst->conf.max_message)
			r = err_set(e, MQ_EX_DATAERR, "an output line of %zu bytes is over %s's maximum of %"
			            PRId64 " (max-message-bytes): nothing of that batch was written", len,
			            pp->dst->name, pp->dst->conf.max_message);
		else
			rec_enc_add(&enc, &m);
		at += len + (nl != NULL);
		if (r == 0 && (enc.out.len >= MQ_FLUSH_BYTES || at >= out->len) && enc.nmsgs) {
			rec_enc_close(&enc);
			r = txn_add(t, dp, &enc, e);
			pp->out += enc.nmsgs;
			rec_enc_reset(&enc);
		}
	}
	rec_enc_free(&enc);
	return r;
}

/* pipe_take()'s emit: the filter's input, a message a line. */
static int pipe_in(void *ctx, int part, const struct rec_msg *m, unsigned attempt)
{
	(void)part, (void)attempt;
	buf_add(ctx, m->body, m->blen);
	buf_add(ctx, "\n", 1);
	return 0;
}

/* Pipe one partition of the source under the group's claim, a step at a
 * time, until it is drained.  Returns source messages consumed, or -1. */
static int64_t pipe_part(void *ctx, int part, int nonblock, int64_t total, int *busy,
                         struct mq_err *e)
{
	struct pipe *pp = ctx;
	struct claim c;
	struct txn t;
	struct buf in = {0}, out = {0};
	uint64_t done0 = pp->done;
	(void)total;
	int k = grp_claim(pp->src, pp->group, part, CL_ORDERED | (nonblock ? CL_NONBLOCK : 0), &c, e);
	*busy = k == 0;
	if (k <= 0)
		return k;
	int rc = pipe_open(&c, pp->dst, &t, e);
	while (rc == 0 && !stop_flag && (pp->max == 0 || pp->done < pp->max)) {
		struct ptake pt;
		uint64_t want = pp->batch;
		if (pp->max && pp->max - pp->done < want)
			want = pp->max - pp->done;
		in.len = 0;
		if (pipe_take(&c, want, pipe_in, &in, &pt, e) < 0)
			rc = -1;
		if (rc < 0 || pt.n == 0)
			break;
		if (pipe_filter(pp, part, pt.lo, pt.n, &in, &out, e) < 0 || pipe_begin(&t, e) < 0 ||
		    pipe_output(pp, &t, part % pp->dst->nparts, &out, e) < 0 ||
		    pipe_commit(&c, &t, pt.lo, pt.hi, e) < 0)
			rc = -1;
		else
			pp->done += pt.n;
	}
	txn_free(&t);
	buf_free(&in);
	buf_free(&out);
	struct mq_err re;
	if (grp_release(&c, &re) < 0 && rc == 0)
		rc = (*e = re, -1);
	return rc < 0 ? -1 : (int64_t)(pp->done - done0);
}

/* A PIPEGET answer's MSG frames: the filter's input. */
struct rpipe {
	struct rconn *c;
	struct buf in, hb;
};

static int rpipe_line(void *ctx, char *line, struct mq_err *e)
{
	struct rpipe *g = ctx;
	struct rec_msg m;
	int part;
	unsigned attempt;
	uint32_t lease;
	if (rc_msg(g->c, line, &m, &part, &attempt, &lease, &g->hb, e) < 0)
		return -1;
	return pipe_in(&g->in, part, &m, attempt);
}

/* Read the answer to one request sent before: 0, or -1 with the error. */
static int rmt_answer(struct rconn *c, struct mq_err *e)
{
	char *line;
	int k;
	while ((k = rc_next(c, &line, e)) == 1)
		;
	return k;
}

/*
 * mq pipe through a server: PIPEGET the next step, run the filter here,
 * then PIPEBEGIN, PUT DEST COUNT txn=1 and PIPECOMMIT in one round trip.
 * The server commits output and offsets together, and only if the step's
 * messages are still the group's next ones; if they are not (another
 * pipe of the group got there first), the output is dropped and the
 * step taken again.
 */
static int pipe_remote(struct args *a, struct pipe *pp, int64_t wait_ms)
{
	struct mq_err e = {0};
	struct rput rp;
	struct rpipe g = {&rp.c, {0}, {0}};
	struct buf req = {0}, out = {0};
	struct queue *names = calloc(2, sizeof *names); /* only their names, for messages */
	const char *src = a->pos[0], *dst = a->pos[1];
	int rc = 0;
	if (!names)
		abort();
	strfmt(names[0].name, sizeof names[0].name, "%s", src);
	strfmt(names[1].name, sizeof names[1].name, "%s", dst);
	pp->src = &names[0];
	pp->dst = &names[1];
	memset(&rp, 0, sizeof rp);
	rp.queue = dst;
	buf_adds(&rp.opts, " txn=1");
	rp.c.fd = -1;
	if (rmt_open(a, &rp.c, &e) < 0) {
		free(names);
		return fail(a, &e);
	}
	signal(SIGPIPE, SIG_IGN);
	while (!stop_flag && (pp->max == 0 || pp->done < pp->max)) {
		uint64_t want = pp->batch, n, lo, hi;
		uint32_t sum;
		int part;
		char *rest;
		if (pp->max && pp->max - pp->done < want)
			want = pp->max - pp->done;
		req.len = g.in.len = 0;
		buf_adds(&req, "PIPEGET ");
		proto_esc(&req, src, strlen(src));
		buf_add(&req, " ", 1);
		proto_esc(&req, dst, strlen(dst));
		buf_add(&req, " ", 1);
		proto_esc(&req, pp->group, strlen(pp->group));
		buf_printf(&req, " count=%" PRIu64, want);
		if (wait_ms != -2)
			rmt_ms(&req, "wait", wait_ms < 0 ? 0 : wait_ms ? wait_ms : 1);
		rp.c.stop = &stop_flag; /* a signal ends a wait for messages */
		if ((rc = rmt_call(&rp.c, &req, rpipe_line, &g, &rest, &e)) < 0) {
			if (stop_flag && rp.c.broken && g.in.len == 0)
				rc = 0; /* a signal while waiting: done, as locally */
			break;
		}
		rp.c.stop = NULL;
		if (sscanf(rest, "%" SCNu64 " partition=%d lo=%" SCNu64 " hi=%" SCNu64 " sum=%" SCNu32,
		           &n, &part, &lo, &hi, &sum) != 5) {
			const char *b = strstr(rest, "busy=");
			if (strtoull(rest, NULL, 10) == 0 && b && atoi(b + 5) > 0) {
				poll(NULL, 0, 10); /* another consumer holds a partition: as a local
				                      pipe waits for it */
				continue;
			}
			if (rest[0] == '0' && (!rest[1] || rest[1] == ' '))
				break; /* empty (after the wait, if any; a stopping server says
				          just "OK 0") */
			rc = err_set(&e, MQ_EX_UNAVAILABLE, "server '%s' answered '%s' to PIPEGET",
			             a->server, rest);
			break;
		}
		if ((rc = pipe_filter(pp, part, lo, n, &g.in, &out, &e)) < 0)
			break;
		req.len = 0;
		buf_adds(&req, "PIPEBEGIN ");
		proto_esc(&req, src, strlen(src));
		buf_add(&req, " ", 1);
		proto_esc(&req, dst, strlen(dst));
		buf_add(&req, " ", 1);
		proto_esc(&req, pp->group, strlen(pp->group));
		buf_printf(&req, " %d n=%" PRIu64 " lo=%" PRIu64 " hi=%" PRIu64 " sum=%" PRIu32 "\n",
		           part, n, lo, hi, sum);
		uint64_t lines = 0;
		for (size_t at = 0; at < out.len; lines++) {
			const char *nl = memchr(out.p + at, '\n', out.len - at);
			size_t len = nl ? (size_t)(nl - (out.p + at)) : out.len - at;
			buf_printf(&rp.frames, "%zu\n", len);
			buf_add(&rp.frames, out.p + at, len);
			buf_add(&rp.frames, "\n", 1);
			at += len + (nl != NULL);
		}
		if (lines) {
			buf_adds(&req, "PUT ");
			proto_esc(&req, dst, strlen(dst));
			buf_printf(&req, " %" PRIu64 " txn=1\n", lines);
		}
		struct buf tail = {0};
		buf_adds(&tail, "PIPECOMMIT ");
		proto_esc(&tail, dst, strlen(dst));
		buf_add(&tail, "\n", 1);
		rc = rc_send(&rp.c, req.p, req.len, &e) < 0 ||
		     rc_send(&rp.c, rp.frames.p, rp.frames.len, &e) < 0 ||
		     rc_send(&rp.c, tail.p, tail.len, &e) < 0 ? -1 : 0;
		buf_free(&tail);
		rp.frames.len = 0;
		/* the first failure tells why: a busy or moved step (75) is taken again */
		struct mq_err be = {0}, pe = {0}, ce = {0};
		int kb = rc < 0 ? -1 : rmt_answer(&rp.c, &be);
		int kp = rc < 0 || !lines ? 0 : rmt_answer(&rp.c, &pe);
		int kc = rc < 0 ? -1 : rmt_answer(&rp.c, &ce);
		if (rc < 0 || rp.c.broken)
			rc = rc < 0 ? -1 : (e = kc < 0 ? ce : kp < 0 ? pe : be, -1);
		else if ((kb < 0 && be.code == MQ_EX_TEMPFAIL) || (kb == 0 && kp == 0 && kc < 0 &&
		                                                    rmt_locked(&ce)))
			continue; /* nothing of the step was done: take it again */
		else if (kb < 0 || kp < 0 || kc < 0)
			rc = (e = kb < 0 ? be : kp < 0 ? pe : ce, -1);
		if (rc < 0 && kb == 0 && kp < 0 && pe.code == MQ_EX_DATAERR) /* output refused */
			err_set(&e, MQ_EX_DATAERR, "an output line was refused by %s (%s): nothing of "
			        "that batch was written", dst, pe.msg);
		if (rc < 0)
			break;
		pp->done += n;
		pp->out += lines;
	}
	rput_free(&rp);
	buf_free(&rp.opts);
	buf_free(&req);
	buf_free(&out);
	buf_free(&g.in);
	buf_free(&g.hb);
	free(names);
	return rc < 0 ? fail(a, &e) : MQ_EX_OK;
}

static int pipe_more(void *ctx, int64_t total)
{
	struct pipe *pp = ctx;
	(void)total;
	return !stop_flag && (pp->max == 0 || pp->done < pp->max);
}

/* mq pipe SOURCE DEST -g GROUP [--batch N] [-e | -w [TIMEOUT]] -- CMD */
static int cmd_pipe(struct args *a)
{
	struct mq_err e = {0};
	struct pipe pp = {0};
	int64_t wait_ms;
	a->queue = a->pos[0];
	pp.group = opt_val(a, "group");
	pp.argv = a->pos + 2;
	if (!pp.group)
		return usage_error(a->cmd, "-g GROUP is required");
	if (opt_u64(a, "batch", 100, &pp.batch) < 0 || opt_u64(a, "max", 0, &pp.max) < 0)
		return MQ_EX_USAGE;
	if (pp.batch == 0)
		return usage_error(a->cmd, "--batch must be at least 1");
	if (opt_wait(a, &wait_ms) < 0)
		return MQ_EX_USAGE;
	if (!strcmp(a->pos[0], a->pos[1]))
		return usage_error(a->cmd, "SOURCE and DEST must differ");
	if (a->namesrv)
		return usage_error(a->cmd, "not through nameservers: name the broker with -s");
	if (q_check_name("group", pp.group, &e) < 0 || q_check_name("queue", a->pos[1], &e) < 0)
		return fail(a, &e);
	if (a->server)
		return pipe_remote(a, &pp, wait_ms);
	if (spool_init(a, 0, &e) < 0 || q_open(&a->sp, a->pos[0], 0, NULL, 0, &pp.src, &e) < 0)
		return fail(a, &e);
	if (q_open(&a->sp, a->pos[1], 1, NULL, 0, &pp.dst, &e) < 0) {
		q_close(pp.src);
		a->queue = a->pos[1];
		return fail(a, &e);
	}
	signal(SIGPIPE, SIG_IGN);
	struct cpass cp = {pipe_part, pipe_more, &pp};
	int64_t got = consumer_loop(pp.src, &cp, wait_ms, &e);
	q_close(pp.src);
	q_close(pp.dst);
	if (got < 0)
		return fail(a, &e);
	return MQ_EX_OK;
}

/* ----- mq ack, mq nack ----- */

/* ack/nack through a server: ACK or NACK lines of up to 300 receipts;
 * the answer "OK N R1,R2,..." gives each receipt's result. */
static int ack_remote(struct args *a, struct receipt *rs, size_t nr, int nack, int64_t delay,
                      struct mq_err *e)
{
	struct rconn c;
	struct buf b = {0};
	int rc = 0;
	if (rmt_open(a, &c, e) < 0)
		return -1;
	/* 300 receipts of the longest group name stay under MQ_LINE_MAX */
	for (size_t i = 0; i < nr && rc == 0; i += 300) {
		size_t n = nr - i < 300 ? nr - i : 300;
		char *rest;
		b.len = 0;
		buf_adds(&b, nack ? "NACK " : "ACK ");
		proto_esc(&b, a->queue, strlen(a->queue));
		if (nack && delay >= 0)
			rmt_ms(&b, "delay", delay);
		rmt_retry_opts(a, &b);
		for (size_t k = i; k < i + n; k++) {
			const struct receipt *r = &rs[k];
			buf_add(&b, " ", 1);
			proto_esc(&b, r->group, strlen(r->group));
			buf_printf(&b, ":%d:%" PRIu64 ":%" PRIu32, r->part, r->off, r->lease);
		}
		/* 75: a consumer holds the group's lock; wait for it as a local
		 * ack would, in 10 ms steps */
		for (int tries = 0; (rc = rmt_call(&c, &b, NULL, NULL, &rest, e)) < 0 &&
		                    e->code == MQ_EX_TEMPFAIL && tries < 6000 && !stop_flag; tries++) {
			b.len--; /* rmt_call appended a newline */
			poll(NULL, 0, 10);
		}
		if (rc < 0)
			break;
		char *p = strchr(rest, ' ');
		for (size_t k = i; k < i + n; k++) {
			rs[k].result = p ? (int)strtol(p + 1, &p, 10) : 0;
			if (rs[k].result < RC_OK || rs[k].result > RC_UNKNOWN)
				rc = err_set(e, MQ_EX_UNAVAILABLE, "server '%s' answered '%s'", a->server, rest);
		}
	}
	rc_close(&c);
	buf_free(&b);
	return rc;
}

/* mq ack QUEUE RECEIPT... / mq nack [--delay DURATION] QUEUE RECEIPT...:
 * receipts from the arguments, else whitespace-separated on stdin. */
static int cmd_ack(struct args *a)
{
	struct mq_err e = {0};
	struct queue *q = NULL;
	int nack = !strcmp(a->cmd->name, "nack"), rc = MQ_EX_OK;
	int64_t delay = -1;
	const char *d = nack ? opt_val(a, "delay") : NULL;
	struct buf in = {0};
	struct kv set[2];
	int nset = opt_retry_settings(a, set);
	a->queue = a->pos[0];
	if (d && parse_duration_ms(d, &delay) < 0)
		return usage_error(a->cmd, "bad duration '%s' for --delay", d);
	if (a->npos == 1) { /* receipts on stdin */
		char chunk[65536];
		ssize_t n;
		while ((n = read(0, chunk, sizeof chunk)) != 0) {
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				err_sys(&e, MQ_EX_IOERR, "cannot read receipts from stdin");
				return fail(a, &e);
			}
			buf_add(&in, chunk, (size_t)n);
		}
		buf_addc0(&in);
	}
	size_t nr = 0, cap = 16;
	struct receipt *rs = malloc(cap * sizeof *rs);
	const char **at = malloc(cap * sizeof *at); /* "@BROKER" of each, or NULL */
	char *save = NULL, *w = in.p ? strtok_r(in.p, " \t\r\n", &save) : NULL;
	if (!rs || !at)
		abort();
	for (int i = 1; a->npos > 1 ? i < a->npos : w != NULL; i++) {
		char *text = a->npos > 1 ? a->pos[i] : w, *sign = strchr(text, '@');
		if (nr == cap && (!(rs = realloc(rs, (cap * 2) * sizeof *rs)) ||
		                  !(at = realloc(at, (cap * 2) * sizeof *at))))
			abort();
		if (nr == cap)
			cap *= 2;
		at[nr] = sign ? sign + 1 : NULL;
		if (sign)
			*sign = 0; /* (and put back below, for messages) */
		int bad = receipt_parse(text, &rs[nr]) < 0 || (a->namesrv ? !sign || !sign[1] : !!sign);
		if (sign)
			*sign = '@';
		if (bad) {
			rc = usage_error(a->cmd, "bad receipt '%s' (GROUP:PARTITION:OFFSET:LEASE%s, as get "
			                 "--lease -f '%%r' prints%s)", text, a->namesrv ? "@BROKER" : "",
			                 sign && !a->namesrv ? "; @BROKER needs -n" : "");
			goto out;
		}
		nr++;
		if (a->npos == 1)
			w = strtok_r(NULL, " \t\r\n", &save);
	}
	if (nr == 0 && a->npos > 1) {
		rc = usage_error(a->cmd, "no receipts given");
		goto out;
	}
	if (nr == 0) /* an empty stdin: nothing to answer (get | ack when drained) */
		goto out;
	if (a->namesrv) { /* to each receipt's broker, those of one broker together */
		struct receipt *sub = malloc(nr * sizeof *sub);
		size_t *idx = malloc(nr * sizeof *idx);
		if (!sub || !idx)
			abort();
		for (size_t i = 0; i < nr; i++) { /* a broker failing stops no other */
			size_t n = 0;
			if (i && at[i] == NULL)
				continue; /* done with an earlier broker */
			for (size_t k = i; k < nr; k++)
				if (at[k] && !strcmp(at[k], at[i])) {
					sub[n] = rs[k];
					idx[n++] = k;
				}
			a->server = at[i];
			if (ack_remote(a, sub, n, nack, delay, &e) < 0 && rc == MQ_EX_OK)
				rc = fail(a, &e);
			a->server = NULL;
			for (size_t k = 0; k < n; k++) {
				rs[idx[k]].result = sub[k].result;
				if (idx[k] != i)
					at[idx[k]] = NULL;
			}
		}
		free(sub);
		free(idx);
	} else if (a->server) {
		if (ack_remote(a, rs, nr, nack, delay, &e) < 0)
			rc = fail(a, &e);
	} else if (spool_init(a, 0, &e) < 0 ||
	           q_open(&a->sp, a->queue, 0, set, nset, &q, &e) < 0) {
		rc = fail(a, &e);
		goto out;
	} else if (grp_answer_all(q, rs, nr, nack ? MQ_WHY_NACK : 0, delay, 0, &e) < 0) {
		rc = fail(a, &e);
	}
	int failed = rc != MQ_EX_OK;
	for (size_t i = 0; i < nr && !failed; i++) {
		struct receipt *r = &rs[i];
		if (r->result == RC_STALE) {
			fprintf(stderr, "%s: %s: %s: receipt %s:%d:%" PRIu64 ":%u is stale: its lease expired "
			        "and the message will be or was delivered again\n", progname, a->cmd->name,
			        a->queue, r->group, r->part, r->off, r->lease);
			if (rc == MQ_EX_OK)
				rc = MQ_EX_TEMPFAIL;
		} else if (r->result == RC_UNKNOWN) {
			fprintf(stderr, "%s: %s: %s: receipt %s:%d:%" PRIu64 ":%u names a message never "
			        "delivered to group '%s'\n", progname, a->cmd->name, a->queue, r->group,
			        r->part, r->off, r->lease, r->group);
			rc = MQ_EX_DATAERR;
		}
	}
out:
	free(rs);
	free(at);
	buf_free(&in);
	q_close(q);
	return rc;
}

/* ----- mq move ----- */

/* MOVE through a server: "OK MOVED busy=B"; a busy partition (another
 * consumer of the group holds it) is asked for again, as a local move
 * waits for it. */
static int move_remote(struct args *a, const char *g, uint64_t want, uint64_t *moved,
                       struct mq_err *e)
{
	struct rconn c;
	struct buf b = {0};
	int rc = 0;
	*moved = 0;
	if (rmt_open(a, &c, e) < 0)
		return -1;
	while (rc == 0 && !stop_flag) {
		char *rest;
		b.len = 0;
		buf_adds(&b, "MOVE ");
		proto_esc(&b, a->pos[0], strlen(a->pos[0]));
		buf_add(&b, " ", 1);
		proto_esc(&b, a->pos[1], strlen(a->pos[1]));
		proto_opt(&b, "group", g, strlen(g));
		uint64_t ask = want && want - *moved < MQ_ANSWER_MSGS ? want - *moved : MQ_ANSWER_MSGS;
		buf_printf(&b, " count=%" PRIu64, ask);
		if ((rc = rmt_call(&c, &b, NULL, NULL, &rest, e)) < 0)
			break;
		const char *busy = strstr(rest, "busy=");
		uint64_t got = strtoull(rest, NULL, 10);
		*moved += got;
		if (want && *moved >= want)
			break;
		if (got == ask) /* (the server moves at most MQ_ANSWER_MSGS at a time) */
			continue;
		if (!busy || atoi(busy + 5) == 0)
			break;
		poll(NULL, 0, 10);
	}
	rc_close(&c);
	buf_free(&b);
	return rc;
}

/* mq move [-g GROUP] [-n COUNT] SRC DST: q_move(), dead letters back. */
static int cmd_move(struct args *a)
{
	struct mq_err e = {0};
	struct queue *src = NULL, *dst = NULL;
	const char *g = opt_val(a, "group") ? opt_val(a, "group") : "move";
	uint64_t want, moved = 0;
	int rc = 0;
	a->queue = a->pos[0];
	if (opt_u64(a, "count", 0, &want) < 0)
		return MQ_EX_USAGE;
	if (!strcmp(a->pos[0], a->pos[1]))
		return usage_error(a->cmd, "source and destination are the same queue");
	if (a->namesrv)
		return usage_error(a->cmd, "not through nameservers: name the broker with -s");
	if (a->server) {
		if (q_check_name("group", g, &e) < 0 || q_check_name("queue", a->pos[1], &e) < 0 ||
		    move_remote(a, g, want, &moved, &e) < 0)
			return fail(a, &e);
		return moved ? MQ_EX_OK : MQ_EX_EMPTY;
	}
	if (q_check_name("group", g, &e) < 0 || spool_init(a, 0, &e) < 0 ||
	    q_open(&a->sp, a->pos[0], 0, NULL, 0, &src, &e) < 0 ||
	    q_open(&a->sp, a->pos[1], 1, NULL, 0, &dst, &e) < 0) {
		q_close(src);
		return fail(a, &e);
	}
	rc = q_move(src, dst, g, want, 0, &moved, NULL, &e);
	q_close(src);
	q_close(dst);
	if (rc < 0)
		return fail(a, &e);
	return moved ? MQ_EX_OK : MQ_EX_EMPTY;
}

/* ----- mq peek, mq tail ----- */

/* Read without consuming: each partition from a start point, then (tail
 * -F) follow new messages until interrupted. */
/* peek and tail through a server: partition by partition, as locally,
 * in PEEK requests that go on from where the last one stopped. */
static int peek_remote(struct args *a, const struct msgfmt *f, uint64_t n, uint64_t from,
                       uint64_t last, int64_t since, int tail)
{
	struct mq_err e = {0};
	struct rconn c;
	struct out o = {1, {0}, 0};
	struct rmsgs r = {&c, &o, f, a->pos[0], NULL, 0, {0}, {0}, 0, 0};
	struct buf b = {0};
	uint64_t part = 0, printed = 0, *nx = NULL; /* -F: the next offset of each partition */
	int rc = 0, nparts = 1, one = opt_has(a, "partition"), follow = tail && opt_has(a, "follow");
	if (one && opt_u64(a, "partition", 0, &part) < 0)
		return MQ_EX_USAGE;
	if (rmt_open(a, &c, &e) < 0)
		return fail(a, &e);
	c.stop = &stop_flag; /* -F: a signal ends the following, as locally */
again:
	for (int p = one ? (int)part : 0; p < (one ? (int)part + 1 : nparts) && rc == 0; p++) {
		for (int req = 0; rc == 0 && (n == 0 || printed < n); req++) {
			char *rest, *x;
			b.len = 0;
			buf_adds(&b, "PEEK ");
			proto_esc(&b, a->pos[0], strlen(a->pos[0]));
			buf_printf(&b, " partition=%d count=%" PRIu64, p, n ? n - printed : 0);
			if (req || (!tail && opt_has(a, "from")))
				buf_printf(&b, " from=%" PRIu64, req ? r.next : from);
			if (since != INT64_MIN)
				rmt_ms(&b, "since", since);
			if (!req && nx) /* following: from where the last round ended */
				buf_printf(&b, " from=%" PRIu64, nx[p]);
			else if (!req && (tail || opt_has(a, "last")))
				buf_printf(&b, " last=%" PRIu64, last);
			if (opt_val(a, "tag"))
				proto_opt(&b, "tag", opt_val(a, "tag"), strlen(opt_val(a, "tag")));
			r.n = 0;
			if ((rc = rmt_call(&c, &b, rmsgs_line, &r, &rest, &e)) < 0)
				break;
			if ((x = strstr(rest, "next=")))
				r.next = strtoull(x + 5, NULL, 10);
			if ((x = strstr(rest, "partitions=")))
				nparts = atoi(x + 11);
			if (follow && !nx && !(nx = calloc((size_t)nparts, sizeof *nx)))
				abort();
			if (nx && p < nparts)
				nx[p] = r.next;
			printed += r.n;
			if (out_flush(&o) < 0)
				rc = err_set(&e, MQ_EX_IOERR, "cannot write to stdout: %s", strerror(o.err));
			if (r.n == 0)
				break;
		}
	}
	/* -F: wait on the server until a partition grows, a second at a time
	 * (so a signal is seen), then print what came */
	while (follow && rc == 0 && !stop_flag) {
		char *rest;
		b.len = 0;
		buf_adds(&b, "WATCH ");
		proto_esc(&b, a->pos[0], strlen(a->pos[0]));
		for (int p = 0; p < nparts; p++)
			buf_printf(&b, "%c%" PRIu64, p ? ',' : ' ', nx[p]);
		if (one)
			buf_printf(&b, " partition=%" PRIu64, part);
		buf_adds(&b, " wait=1000");
		if ((rc = rmt_call(&c, &b, NULL, NULL, &rest, &e)) == 0 && !strcmp(rest, "1"))
			goto again;
	}
	if (rc < 0 && follow && stop_flag && c.broken)
		rc = 0; /* a signal, waiting or reading what came: done, as locally */
	free(nx);
	rc_close(&c);
	buf_free(&b);
	buf_free(&o.b);
	buf_free(&r.hb);
	if (rc < 0)
		return fail(a, &e);
	return printed > 0 || tail ? MQ_EX_OK : MQ_EX_EMPTY;
}

static int peek_run(struct args *a, int tail)
{
	struct mq_err e = {0};
	struct queue *q = NULL;
	struct out o = {1, {0}, 0};
	struct msgfmt f;
	uint64_t n, from = 0, last = 0;
	int64_t since = INT64_MIN;
	int part, rc = 0, nstart = 0;
	a->queue = a->pos[0];
	if (opt_u64(a, "count", tail ? 10 : 0, &n) < 0)
		return MQ_EX_USAGE;
	if (!tail) {
		if (opt_u64(a, "from", 0, &from) < 0 || opt_u64(a, "last", 0, &last) < 0)
			return MQ_EX_USAGE;
		nstart = opt_has(a, "from") + opt_has(a, "since") + opt_has(a, "last");
		if (nstart > 1)
			return usage_error(a->cmd, "use only one of --from, --since and --last");
		if (opt_has(a, "since") && parse_time_ms(opt_val(a, "since"), &since) < 0)
			return usage_error(a->cmd, "bad time '%s' (use RFC 3339, epoch seconds or a "
			                   "duration ago)", opt_val(a, "since"));
	} else {
		last = n;
		n = 0;
	}
	struct tagset tsbuf;
	const struct tagset *tags;
	if (opt_output(a, &f, &tsbuf, &tags) < 0)
		return MQ_EX_USAGE;
	if (a->server) {
		tagset_free(&tsbuf);
		return peek_remote(a, &f, n, from, last, since, tail);
	}
	if (spool_init(a, 0, &e) < 0 || q_open(&a->sp, a->pos[0], 0, NULL, 0, &q, &e) < 0) {
		tagset_free(&tsbuf);
		return fail(a, &e);
	}
	if (opt_partition(a, q, &part) < 0) {
		q_close(q);
		tagset_free(&tsbuf);
		return MQ_EX_USAGE;
	}
	struct reader *rd = calloc((size_t)q->nparts, sizeof *rd);
	uint64_t printed = 0;
	int follow = tail && opt_has(a, "follow");
	struct waiter wt = {-1};
	if (follow)
		wait_init(&wt, q);
	for (int i = 0; i < q->nparts; i++)
		rd[i].fd = -1;
	for (int i = 0; i < q->nparts && rc == 0; i++) {
		if (part >= 0 && i != part)
			continue;
		struct reader *r = &rd[i];
		uint64_t start = from;
		if (since != INT64_MIN && part_offset_for_time(&q->parts[i], since, &start, &e) < 0)
			rc = -1;
		if (rc == 0 && rd_open(r, &q->parts[i], start, &e) < 0)
			rc = -1;
		if (rc == 0 && (tail || opt_has(a, "last")))
			rc = rd_seek(r, r->h.next > last ? r->h.next - last : 0, &e);
		r->min_ts = since;
		r->tags = tags;
	}
	do {
		for (int i = 0; i < q->nparts && rc == 0; i++) {
			struct rec_msg m;
			int k = 0;
			if (rd[i].p == NULL)
				continue;
			while ((n == 0 || printed < n) && (k = rd_next(&rd[i], &m, &e)) == 1) {
				fmt_msg(&o, &f, q->name, i, &m, NULL);
				printed++;
			}
			if (k < 0)
				rc = -1;
		}
		if (out_flush(&o) < 0 && rc == 0)
			rc = err_set(&e, MQ_EX_IOERR, "cannot write to stdout: %s", strerror(o.err));
		if (follow && rc == 0 && !stop_flag)
			wait_change(&wt, -1);
	} while (follow && rc == 0 && !stop_flag);
	for (int i = 0; i < q->nparts; i++)
		if (rd[i].p)
			rd_close(&rd[i]);
	free(rd);
	wait_free(&wt);
	q_close(q);
	buf_free(&o.b);
	tagset_free(&tsbuf);
	if (rc < 0)
		return fail(a, &e);
	return printed > 0 || tail ? MQ_EX_OK : MQ_EX_EMPTY;
}

static int cmd_peek(struct args *a) { return peek_run(a, 0); }
static int cmd_tail(struct args *a) { return peek_run(a, 1); }

/* ----- listing and admin commands through a server ----- */

/* Run one request built from the verb and the queue names of a (from
 * position `from`), with no data lines expected. */
static int rmt_simple(struct args *a, const char *verb, int from, struct buf *opts)
{
	struct mq_err e = {0};
	struct rconn c;
	struct buf b = {0};
	buf_adds(&b, verb);
	for (int i = from; i < a->npos; i++) {
		buf_add(&b, " ", 1);
		proto_esc(&b, a->pos[i], strlen(a->pos[i]));
	}
	if (opts)
		buf_add(&b, opts->p, opts->len);
	int rc = rmt_open(a, &c, &e) < 0 ? -1 : rmt_call(&c, &b, NULL, NULL, NULL, &e);
	if (c.fd >= 0)
		rc_close(&c);
	buf_free(&b);
	return rc < 0 ? fail(a, &e) : MQ_EX_OK;
}

/* "LINE TEXT" data lines of an answer, printed as TEXT. */
static int rlines_line(void *ctx, char *line, struct mq_err *e)
{
	(void)ctx, (void)e;
	if (!strncmp(line, "LINE ", 5)) {
		ssize_t n = proto_unesc(line + 5, strlen(line + 5));
		fwrite(line + 5, 1, n < 0 ? 0 : (size_t)n, stdout);
		putchar('\n');
	}
	return 0;
}

/* VERB QUEUE... OPTS whose answer is lines to print; *rest gets the OK
 * line's rest (copied into rest[256]) when rest is not NULL. */
static int rmt_lines(struct args *a, const char *verb, struct buf *opts, char *rest)
{
	struct mq_err e = {0};
	struct rconn c;
	struct buf b = {0};
	char *r = NULL;
	buf_adds(&b, verb);
	for (int i = 0; i < a->npos; i++) {
		buf_add(&b, " ", 1);
		proto_esc(&b, a->pos[i], strlen(a->pos[i]));
	}
	if (opts)
		buf_add(&b, opts->p, opts->len);
	int rc = rmt_open(a, &c, &e) < 0 ? -1 : rmt_call(&c, &b, rlines_line, NULL, &r, &e);
	if (rc == 0 && rest)
		strfmt(rest, 256, "%s", r);
	if (c.fd >= 0)
		rc_close(&c);
	buf_free(&b);
	return rc < 0 ? fail(a, &e) : stdout_done(a);
}

struct rnames {
	char **v;
	size_t n;
};

static int rnames_line(void *ctx, char *line, struct mq_err *e)
{
	struct rnames *r = ctx;
	(void)e;
	if (strncmp(line, "QUEUE ", 6))
		return 0;
	if (!(r->v = realloc(r->v, (r->n + 1) * sizeof *r->v)) || !(r->v[r->n] = strdup(line + 6)))
		abort();
	r->n++;
	return 0;
}

/* The server's queue names (LS). */
static int rmt_names(struct rconn *c, char ***names, size_t *n, struct mq_err *e)
{
	struct rnames r = {NULL, 0};
	struct buf b = {0};
	buf_adds(&b, "LS");
	int k = rmt_call(c, &b, rnames_line, &r, NULL, e);
	buf_free(&b);
	*names = r.v;
	*n = r.n;
	return k;
}

/* Comma-separated numbers into a new array of n. */
static uint64_t *csv_u64(const char *s, int n)
{
	uint64_t *v = calloc((size_t)(n > 0 ? n : 1), sizeof *v);
	if (!v)
		abort();
	for (int i = 0; i < n && s && *s; i++) {
		v[i] = strtoull(s, (char **)&s, 10);
		if (*s == ',')
			s++;
	}
	return v;
}

/* STAT and GROUP lines back into a struct qstat (see v_stat()). */
static int rstat_line(void *ctx, char *line, struct mq_err *e)
{
	struct qstat *st = ctx;
	char name[MQ_NAME_MAX + 1], old[32], list[MQ_LINE_MAX];
	(void)e;
	if (!strncmp(line, "STAT ", 5) &&
	    sscanf(line + 5, "%128s %d %" SCNu64 " %" SCNu64 " %" SCNu64 " %31s %65535s", name,
	           &st->nparts, &st->messages, &st->bytes, &st->segments, old, list) == 7) {
		st->oldest_ts = *old == '-' ? INT64_MAX : strtoll(old, NULL, 10);
		st->next = csv_u64(list, st->nparts);
		st->earliest = csv_u64(NULL, st->nparts);
	} else if (!strncmp(line, "GROUP ", 6)) {
		struct gstat g = {0};
		if (sscanf(line + 6, "%128s %" SCNu64 " %" SCNu64 " %" SCNu64 " %31s %65535s", name,
		           &g.lag, &g.leased, &g.waiting, old, list) != 6)
			return 0;
		if (!(g.name = strdup(name)) || !(st->g = realloc(st->g, (st->ngroups + 1) * sizeof g)))
			abort();
		g.oldest_ts = *old == '-' ? INT64_MAX : strtoll(old, NULL, 10);
		g.off = csv_u64(list, st->nparts);
		st->g[st->ngroups++] = g;
	}
	return 0;
}

/* STAT QUEUE into st. */
static int rmt_stat(struct rconn *c, const char *q, struct qstat *st, struct mq_err *e)
{
	memset(st, 0, sizeof *st);
	return rmt_qcall(c, "STAT", q, rstat_line, st, e);
}

/* ----- mq serve ----- */

/* The server's log: one line per event on stderr, with a timestamp. */
static void serve_log(void *ctx, const char *line)
{
	char ts[40];
	int64_t ms = now_ms();
	time_t t = (time_t)(ms / 1000);
	struct tm tm;
	(void)ctx;
	gmtime_r(&t, &tm);
	size_t n = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
	strfmt(ts + n, sizeof ts - n, ".%03dZ", (int)(ms % 1000));
	fprintf(stderr, "ts=%s %s\n", ts, line);
}

static void serve_notice(void *ctx, const char *msg)
{
	char line[1100], q[1040];
	size_t o = 0;
	for (const char *m = msg; *m && o + 2 < sizeof q; m++) {
		if (*m == '"' || *m == '\\')
			q[o++] = '\\';
		q[o++] = *m;
	}
	q[o] = 0;
	strfmt(line, sizeof line, "level=warn event=notice msg=\"%s\"", q);
	serve_log(ctx, line);
}

/* A spool notice (a recovery, a warning): logged, and when it comes from
 * a request, also sent in its answer as a NOTICE line, which mq prints on
 * stderr as the local command would. */
static void srv_spool_notice(void *ctx, const char *msg)
{
	struct srv *s = ctx;
	serve_notice(NULL, msg);
	if (s->cur && s->cur->c) {
		buf_adds(&s->cur->resp, "NOTICE ");
		proto_esc(&s->cur->resp, msg, strlen(msg));
		buf_add(&s->cur->resp, "\n", 1);
	}
}

/* What mq serve and mq nameserver do alike with signals. */
static void serve_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGPIPE, &sa, NULL);
	sigaction(SIGINT, NULL, &sa); /* the handler main() set: it sets stop_flag */
	sigaction(SIGHUP, &sa, NULL);
}

/* -l flags (all of them, in order) over o's listen addresses; none, and
 * o has none either: 127.0.0.1:defport. */
static int opt_listen(struct args *a, struct srv_opts *o, const char *defport, struct mq_err *e)
{
	int k = opt_index(a, "listen");
	if (opt_has(a, "listen"))
		o->nlisten = 0;
	for (int i = 0; i < a->nall; i++)
		if (a->all[i].i == k) {
			if (o->nlisten == 8)
				return err_set(e, MQ_EX_USAGE, "at most 8 listen addresses");
			strfmt(o->listen[o->nlisten++], sizeof o->listen[0], "%s", a->all[i].v);
		}
	if (o->nlisten == 0)
		strfmt(o->listen[o->nlisten++], sizeof o->listen[0], "127.0.0.1:%s", defport);
	return 0;
}

/*
 * mq serve's settings: built-in defaults, then the "server:" section of
 * --config FILE (else of SPOOL/mq.yaml), then the flags.  cfg gets the
 * whole file: with --config it stands in for SPOOL/mq.yaml.
 */
static int serve_load(struct args *a, struct cfg *cfg, struct srv_opts *o, struct mq_err *e)
{
	const char *file = opt_val(a, "config");
	char path[PATH_MAX];
	srvconf_defaults(o);
	strfmt(path, sizeof path, file ? "%s" : "%s/mq.yaml", file ? file : a->sp.dir);
	if (cfg_load_file(cfg, path, e) < 0 || cfg_server(cfg, o, e) < 0)
		goto fail;
	if (file && !cfg->loaded) {
		err_set(e, MQ_EX_NOINPUT, "config file '%s' does not exist", file);
		goto fail;
	}
	static const char *const durs[] = {"idle-timeout", "request-timeout"};
	int64_t *targets[] = {&o->idle_ms, &o->request_ms};
	for (size_t i = 0; i < 2; i++) {
		const char *v = opt_val(a, durs[i]);
		if (v && (parse_duration_ms(v, targets[i]) < 0 || *targets[i] == 0)) {
			err_set(e, MQ_EX_USAGE, "bad duration '%s' for --%s", v, durs[i]);
			goto fail;
		}
	}
	const char *v = opt_val(a, "max-connections");
	uint64_t mc = 0;
	if (v && (parse_u64(v, &mc) < 0 || mc == 0 || mc > INT_MAX)) {
		err_set(e, MQ_EX_USAGE, "bad number '%s' for --max-connections", v);
		goto fail;
	}
	if (v)
		o->max_conns = (int)mc;
	if ((v = opt_val(a, "metrics-listen")))
		strfmt(o->metrics, sizeof o->metrics, "%s", v);
	if (opt_listen(a, o, MQ_DEFAULT_PORT, e) == 0)
		return 0;
fail:
	cfg_free(cfg);
	srvconf_free(o);
	return -1;
}

static int cmd_serve(struct args *a)
{
#ifdef __linux__
	struct mq_err e = {0};
	struct srv_opts o;
	struct cfg cfg;
	const char *file = opt_val(a, "config");
	if (file) { /* the spool may be named there: find it first */
		strfmt(a->sp.dir, sizeof a->sp.dir, ".");
		if (serve_load(a, &cfg, &o, &e) < 0)
			return fail(a, &e);
		if (o.spool[0] && !opt_has(a, "spool")) {
			int si = opt_index(a, "spool");
			a->val[si] = o.spool;
			a->count[si] = 1;
		}
		cfg_free(&cfg);
		a->cfg_file = file; /* it stands in for SPOOL/mq.yaml */
	}
	if (spool_init(a, 1, &e) < 0) {
		if (file)
			srvconf_free(&o);
		return fail(a, &e);
	}
	if (!file && (cfg_free(&a->sp.cfg), serve_load(a, &a->sp.cfg, &o, &e) < 0))
		return fail(a, &e);
	a->sp.notice = serve_notice; /* recoveries and warnings as log lines */
	struct srv s;
	if (srv_init(&s, &a->sp, &o, &e) < 0) {
		srvconf_free(&o);
		return fail(a, &e);
	}
	s.log = serve_log;
	a->sp.notice = srv_spool_notice;
	a->sp.notice_ctx = &s;
	serve_signals();
	int rc = 0;
	for (int i = 0; i < o.nlisten && rc == 0; i++)
		rc = srv_listen(&s, o.listen[i], 0, &e);
	if (rc == 0 && o.metrics[0])
		rc = srv_listen(&s, o.metrics, 1, &e);
	if (rc == 0) {
		srv_log(&s, "level=info event=ready spool=%s pid=%ld tokens=%d", a->sp.dir,
		        (long)getpid(), s.o.ntok);
		while ((rc = srv_run(&s, &stop_flag, &e)) == 1) {
			struct cfg nc;
			struct srv_opts no;
			struct mq_err re;
			if (serve_load(a, &nc, &no, &re) < 0) {
				srv_log(&s, "level=error event=reload error=\"%s\" msg=\"kept the old "
				        "settings\"", re.msg);
				continue;
			}
			cfg_free(&a->sp.cfg);
			a->sp.cfg = nc;
			srv_reconf(&s, &no);
		}
	}
	srv_free(&s);
	srvconf_free(&s.o);
	return rc < 0 ? fail(a, &e) : MQ_EX_OK;
#else
	return usage_error(a->cmd, "mq serve needs Linux (epoll) for now");
#endif
}

/* ----- mq nameserver, mq route ----- */

static int cmd_nameserver(struct args *a)
{
#ifdef __linux__
	struct mq_err e = {0};
	struct srv_opts o;
	struct nsreg ns = {.scan_ms = 10000, .expire_ms = 120000, .scanned_ms = mono_ms()};
	static const char *const durs[] = {"scan-interval", "expire"};
	int64_t *targets[] = {&ns.scan_ms, &ns.expire_ms};
	for (size_t i = 0; i < 2; i++) {
		const char *v = opt_val(a, durs[i]);
		if (v && (parse_duration_ms(v, targets[i]) < 0 || *targets[i] == 0))
			return usage_error(a->cmd, "bad duration '%s' for --%s", v, durs[i]);
	}
	srvconf_defaults(&o);
	if (opt_listen(a, &o, MQ_NAMESRV_PORT, &e) < 0)
		return usage_error(a->cmd, "%s", e.msg);
	struct srv s;
	if (srv_init(&s, NULL, &o, &e) < 0)
		return fail(a, &e);
	s.verbs = ns_verbs;
	s.nverbs = sizeof ns_verbs / sizeof *ns_verbs;
	s.nsr = &ns;
	s.log = serve_log;
	serve_signals();
	int rc = 0;
	for (int i = 0; i < o.nlisten && rc == 0; i++)
		rc = srv_listen(&s, o.listen[i], 0, &e);
	if (rc == 0) {
		srv_log(&s, "level=info event=ready role=nameserver pid=%ld scan_ms=%" PRId64
		        " expire_ms=%" PRId64, (long)getpid(), ns.scan_ms, ns.expire_ms);
		while ((rc = srv_run(&s, &stop_flag, &e)) == 1)
			srv_log(&s, "level=info event=reload msg=\"a nameserver has no settings to read\"");
	}
	srv_free(&s);
	return rc < 0 ? fail(a, &e) : MQ_EX_OK;
#else
	return usage_error(a->cmd, "mq nameserver needs Linux (epoll) for now");
#endif
}

static int cmd_route(struct args *a)
{
	struct mq_err e = {0};
	struct route rt;
	const char *q = a->npos ? a->pos[0] : NULL;
	if (!a->namesrv)
		return usage_error(a->cmd, "route needs nameservers: -n HOST:PORT[,...] or $MQ_NAMESRV");
	if (q && !name_valid(q))
		return usage_error(a->cmd, "bad queue name '%s'", q);
	if (ns_ask(a->namesrv, q, &rt, &e) < 0)
		return fail(a, &e);
	if (q && !rt.n) {
		err_set(&e, MQ_EX_NOINPUT, "no live broker holds queue '%s'", q);
		return fail(a, &e);
	}
	for (int i = 0; i < rt.n; i++)
		if (q)
			printf("%s\t%d\t%s\n", rt.b[i].addr, rt.b[i].parts, rt.b[i].role);
		else
			printf("%s\t%d\t%s\t%" PRId64 "\n", rt.b[i].addr, rt.b[i].parts, rt.b[i].role,
			       rt.b[i].age_ms / 1000);
	return fflush(stdout) == 0 ? MQ_EX_OK : MQ_EX_IOERR;
}

/* ----- mq ls, mq stat ----- */

static int cmd_ls(struct args *a)
{
	struct mq_err e = {0};
	char **names;
	size_t n;
	if (a->server) {
		struct rconn c;
		int k = rmt_open(a, &c, &e) < 0 ? -1 : rmt_names(&c, &names, &n, &e);
		if (c.fd >= 0)
			rc_close(&c);
		if (k < 0)
			return fail(a, &e);
	} else if (spool_init(a, 0, &e) < 0 || q_list(&a->sp, &names, &n, &e) < 0) {
		return fail(a, &e);
	}
	int json = opt_has(a, "json");
	/* Queue names are [A-Za-z0-9._-]: nothing in them needs JSON escaping. */
	if (json)
		printf("[");
	for (size_t i = 0; i < n; i++)
		printf(json ? "%s\"%s\"" : "%.0s%s\n", json && i ? "," : "", names[i]);
	if (json)
		printf("]\n");
	names_free(names, n);
	return stdout_done(a);
}

/* One group as a JSON object (shared by stat --json and groups --json). */
static void gstat_json(const struct gstat *gs, int nparts, int64_t now)
{
	printf("{\"group\":\"%s\",\"lag\":%" PRIu64 ",\"leased\":%" PRIu64 ",\"retrying\":%"
	       PRIu64 ",\"oldest_unconsumed_age_ms\":", gs->name, gs->lag, gs->leased, gs->waiting);
	if (gs->oldest_ts == INT64_MAX)
		printf("null");
	else
		printf("%" PRId64, now - gs->oldest_ts);
	printf(",\"offsets\":[");
	for (int i = 0; i < nparts; i++)
		printf("%s%" PRIu64, i ? "," : "", gs->off[i]);
	printf("]}");
}

static void stat_print(const char *name, const struct qstat *st, int json, int first)
{
	int64_t now = now_ms();
	char age[32];
	if (json) {
		printf("%s{\"queue\":\"%s\",\"partitions\":%d,\"messages\":%" PRIu64 ",\"bytes\":%" PRIu64
		       ",\"segments\":%" PRIu64 ",\"oldest_age_ms\":", first ? "" : ",", name,
		       st->nparts, st->messages, st->bytes, st->segments);
		if (st->oldest_ts == INT64_MAX)
			printf("null");
		else
			printf("%" PRId64, now - st->oldest_ts);
		printf(",\"next\":[");
		for (int i = 0; i < st->nparts; i++)
			printf("%s%" PRIu64, i ? "," : "", st->next[i]);
		printf("],\"groups\":[");
		for (size_t g = 0; g < st->ngroups; g++) {
			fputs(g ? "," : "", stdout);
			gstat_json(&st->g[g], st->nparts, now);
		}
		printf("]}");
		return;
	}
	printf("%s\n  partitions  %d\n  messages    %" PRIu64 "\n  bytes       %" PRIu64
	       "\n  segments    %" PRIu64 "\n", name, st->nparts, st->messages, st->bytes,
	       st->segments);
	if (st->oldest_ts != INT64_MAX) {
		fmt_duration(age, sizeof age, now - st->oldest_ts);
		printf("  oldest      %s\n", age);
	}
	for (size_t g = 0; g < st->ngroups; g++) {
		const struct gstat *gs = &st->g[g];
		printf("  group %s: lag %" PRIu64, gs->name, gs->lag);
		if (gs->oldest_ts != INT64_MAX) {
			fmt_duration(age, sizeof age, now - gs->oldest_ts);
			printf(", oldest unconsumed %s", age);
		}
		printf(", offsets");
		for (int i = 0; i < st->nparts; i++)
			printf(" %d:%" PRIu64, i, gs->off[i]);
		printf("\n");
	}
}

static int cmd_stat(struct args *a)
{
	struct mq_err e = {0};
	char **names = NULL;
	size_t n = 0;
	int json = opt_has(a, "json"), rc = 0;
	struct rconn c = {.fd = -1};
	if (a->server ? rmt_open(a, &c, &e) < 0 : spool_init(a, 0, &e) < 0)
		return fail(a, &e);
	if (a->npos == 0 && (a->server ? rmt_names(&c, &names, &n, &e) : q_list(&a->sp, &names, &n,
	                                                                        &e)) < 0) {
		rc_close(&c);
		return fail(a, &e);
	}
	size_t total = a->npos ? (size_t)a->npos : n;
	if (json && (a->npos != 1))
		printf("[");
	size_t shown = 0;
	for (size_t i = 0; i < total && rc == 0; i++) {
		struct queue *q;
		struct qstat st;
		a->queue = a->npos ? a->pos[i] : names[i];
		if (a->server ? rmt_stat(&c, a->queue, &st, &e) < 0
		              : q_open(&a->sp, a->queue, 0, NULL, 0, &q, &e) < 0 || q_stat(q, &st, &e) < 0) {
			if (!a->npos && a->server && e.code == MQ_EX_NOPERM)
				continue; /* listed for a token that may write it, not read it */
			rc = fail(a, &e);
			break;
		}
		stat_print(a->queue, &st, json, shown++ == 0);
		q_stat_free(&st);
		if (!a->server)
			q_close(q);
	}
	if (json && (a->npos != 1))
		printf("]");
	if (json)
		printf("\n");
	names_free(names, n);
	rc_close(&c);
	int wr = stdout_done(a);
	return rc ? rc : wr;
}

/* ----- mq groups, mq seek ----- */

/* mq groups QUEUE: each group's offsets, lag and oldest unconsumed age;
 * mq groups rm QUEUE GROUP: forget a group. */
static int cmd_groups(struct args *a)
{
	struct mq_err e = {0};
	struct queue *q = NULL;
	struct qstat st;
	int rm = a->npos == 3 && !strcmp(a->pos[0], "rm");
	if (a->npos != 1 && !rm)
		return usage_error(a->cmd, "use 'mq groups QUEUE' or 'mq groups rm QUEUE GROUP'");
	a->queue = a->pos[rm];
	if (a->server && rm)
		return rmt_simple(a, "DELGROUP", 1, NULL);
	memset(&st, 0, sizeof st);
	if (a->server) {
		struct rconn c;
		int k = rmt_open(a, &c, &e) < 0 ? -1 : rmt_stat(&c, a->queue, &st, &e);
		if (c.fd >= 0)
			rc_close(&c);
		if (k < 0) {
			q_stat_free(&st);
			return fail(a, &e);
		}
	} else if (spool_init(a, 0, &e) < 0 || q_open(&a->sp, a->queue, 0, NULL, 0, &q, &e) < 0) {
		return fail(a, &e);
	} else if (rm) {
		int r = grp_remove(q, a->pos[2], &e);
		q_close(q);
		return r < 0 ? fail(a, &e) : MQ_EX_OK;
	} else if (q_stat(q, &st, &e) < 0) {
		q_stat_free(&st);
		q_close(q);
		return fail(a, &e);
	}
	int json = opt_has(a, "json");
	int64_t now = now_ms();
	if (json)
		printf("[");
	else if (st.ngroups)
		printf("%-20s %10s %8s %8s %10s  %s\n", "GROUP", "LAG", "LEASED", "RETRYING", "OLDEST",
		       "OFFSETS");
	for (size_t g = 0; g < st.ngroups; g++) {
		const struct gstat *gs = &st.g[g];
		char age[32] = "-";
		if (json) {
			fputs(g ? "," : "", stdout);
			gstat_json(gs, st.nparts, now);
			continue;
		}
		if (gs->oldest_ts != INT64_MAX)
			fmt_duration(age, sizeof age, now - gs->oldest_ts);
		printf("%-20s %10" PRIu64 " %8" PRIu64 " %8" PRIu64 " %10s  ", gs->name, gs->lag,
		       gs->leased, gs->waiting, age);
		for (int i = 0; i < st.nparts; i++)
			printf("%s%d:%" PRIu64, i ? " " : "", i, gs->off[i]);
		printf("\n");
	}
	if (json)
		printf("]\n");
	q_stat_free(&st);
	q_close(q);
	return stdout_done(a);
}

static int seek_line(void *ctx, char *line, struct mq_err *e)
{
	unsigned p;
	uint64_t off;
	(void)ctx, (void)e;
	if (sscanf(line, "OFFSET %u %" SCNu64, &p, &off) == 2)
		printf("%u:%" PRIu64 "\n", p, off);
	return 0;
}

static int seek_remote(struct args *a, struct buf *opts)
{
	struct mq_err e = {0};
	struct rconn c;
	struct buf b = {0};
	buf_adds(&b, "SEEK ");
	proto_esc(&b, a->pos[0], strlen(a->pos[0]));
	buf_add(&b, opts->p, opts->len);
	int rc = rmt_open(a, &c, &e) < 0 ? -1 : rmt_call(&c, &b, seek_line, NULL, NULL, &e);
	if (c.fd >= 0)
		rc_close(&c);
	buf_free(&b);
	return rc < 0 ? fail(a, &e) : stdout_done(a);
}

/* mq seek QUEUE -g GROUP --to earliest|latest|OFFSET|TIME [-p P] */
static int cmd_seek(struct args *a)
{
	struct mq_err e = {0};
	struct queue *q = NULL;
	const char *g = opt_val(a, "group"), *to = opt_val(a, "to");
	int part;
	a->queue = a->pos[0];
	if (!g || !to)
		return usage_error(a->cmd, "-g GROUP and --to are required");
	if (seek_check(to, &e) < 0)
		return usage_error(a->cmd, "%s", e.msg);
	if (a->server) {
		struct buf o = {0};
		proto_opt(&o, "group", g, strlen(g));
		proto_opt(&o, "to", to, strlen(to));
		if (opt_val(a, "partition"))
			proto_opt(&o, "partition", opt_val(a, "partition"), strlen(opt_val(a, "partition")));
		int rc = seek_remote(a, &o);
		buf_free(&o);
		return rc;
	}
	if (q_check_name("group", g, &e) < 0 || spool_init(a, 0, &e) < 0 ||
	    q_open(&a->sp, a->queue, 0, NULL, 0, &q, &e) < 0)
		return fail(a, &e);
	if (opt_partition(a, q, &part) < 0) {
		q_close(q);
		return MQ_EX_USAGE;
	}
	uint64_t *now = calloc((size_t)q->nparts, sizeof *now);
	if (!now)
		abort();
	int n = grp_seek_to(q, g, part, to, now, &e);
	for (int i = 0; i < n; i++)
		printf("%d:%" PRIu64 "\n", part >= 0 ? part : i, now[i]);
	int want = part >= 0 ? 1 : q->nparts;
	free(now);
	q_close(q);
	if (n < want)
		return fail(a, &e);
	return stdout_done(a);
}

/* ----- mq create, rm, purge ----- */

static int cmd_create(struct args *a)
{
	struct mq_err e = {0};
	struct kv set[NSETTINGS];
	int nset = 0;
	a->queue = a->pos[0];
	for (size_t i = 0; i < NSETTINGS; i++)
		if (opt_has(a, settings[i].name))
			set[nset++] = (struct kv){settings[i].name, opt_val(a, settings[i].name)};
	if (a->server) {
		struct buf o = {0};
		for (int i = 0; i < nset; i++)
			proto_opt(&o, set[i].k, set[i].v, strlen(set[i].v));
		if (opt_has(a, "if-not-exists"))
			buf_adds(&o, " if-not-exists=1");
		int rc = rmt_simple(a, "CREATE", 0, &o);
		buf_free(&o);
		return rc;
	}
	if (q_check_name("queue", a->pos[0], &e) < 0 || spool_init(a, 1, &e) < 0)
		return fail(a, &e);
	int r = q_exists(&a->sp, a->pos[0]) ? 0 : q_create(&a->sp, a->pos[0], set, nset, &e);
	if (r < 0)
		return fail(a, &e);
	if (r == 0 && !opt_has(a, "if-not-exists")) {
		err_set(&e, MQ_EX_DATAERR, "queue already exists (use --if-not-exists to accept that)");
		return fail(a, &e);
	}
	return MQ_EX_OK;
}

static int cmd_rm(struct args *a)
{
	struct mq_err e = {0};
	if (a->server)
		return rmt_simple(a, "RM", 0, NULL);
	if (spool_init(a, 0, &e) < 0)
		return fail(a, &e);
	for (int i = 0; i < a->npos; i++) {
		a->queue = a->pos[i];
		if (q_remove(&a->sp, a->pos[i], &e) < 0)
			return fail(a, &e);
	}
	return MQ_EX_OK;
}

static int cmd_purge(struct args *a)
{
	struct mq_err e = {0};
	if (a->server)
		return rmt_simple(a, "PURGE", 0, NULL);
	if (spool_init(a, 0, &e) < 0)
		return fail(a, &e);
	for (int i = 0; i < a->npos; i++) {
		a->queue = a->pos[i];
		if (q_purge(&a->sp, a->pos[i], &e) < 0)
			return fail(a, &e);
	}
	return MQ_EX_OK;
}

/* ----- mq verify ----- */

static void verify_line(void *ctx, const char *msg)
{
	progress_clear(ctx);
	printf("%s\n", msg);
	fflush(stdout);
}

static void verify_progress(void *ctx, const char *queue, int part, size_t seg, size_t nsegs)
{
	progress_draw(ctx, "mq: verify: %s/%d: segment %zu of %zu", queue, part, seg + 1, nsegs);
}

static int cmd_verify(struct args *a)
{
	struct mq_err e = {0};
	char **names = NULL;
	size_t n = 0;
	int repair = opt_has(a, "repair");
	struct progress pg = {isatty(2), 0, 0}; /* first frame at once */
	struct vrep vr = {verify_line, &pg, 0, 0, verify_progress};
	size_t total, parts = 0;
	if (a->server) {
		char rest[256] = "";
		struct buf o = {0};
		if (repair)
			buf_adds(&o, " repair=1");
		int rc = rmt_lines(a, "VERIFY", &o, rest);
		buf_free(&o);
		if (rc)
			return rc;
		if (sscanf(rest, "%d %d %zu %zu", &vr.damaged, &vr.repaired, &total, &parts) != 4) {
			err_set(&e, MQ_EX_UNAVAILABLE, "server '%s' answered '%s'", a->server, rest);
			return fail(a, &e);
		}
		goto summary;
	}
	if (spool_init(a, 0, &e) < 0)
		return fail(a, &e);
	if (a->npos == 0 && q_list(&a->sp, &names, &n, &e) < 0)
		return fail(a, &e);
	total = a->npos ? (size_t)a->npos : n;
	for (size_t i = 0; i < total; i++) {
		struct queue *q;
		a->queue = a->npos ? a->pos[i] : names[i];
		if (q_open(&a->sp, a->queue, 0, NULL, 0, &q, &e) < 0 || verify_queue(q, repair, &vr, &e) < 0) {
			progress_clear(&pg);
			fflush(stdout);
			int rc = fail(a, &e); /* before a->queue's name is freed */
			q_close(q);
			names_free(names, n);
			return rc;
		}
		parts += (size_t)q->nparts;
		q_close(q);
	}
	names_free(names, n);
	progress_clear(&pg);
summary:
	if (vr.damaged == 0)
		printf("ok: %zu queues, %zu partitions, no damage\n", total, parts);
	else if (repair)
		printf("repaired %d of %d problems in %zu queues\n", vr.repaired, vr.damaged, total);
	else
		printf("%d problems in %zu queues; 'mq verify --repair' mends them\n", vr.damaged, total);
	int wr = stdout_done(a);
	if (wr)
		return wr;
	return vr.damaged > vr.repaired ? MQ_EX_DATAERR : MQ_EX_OK;
}

/* ----- mq config ----- */

static void print_line(void *ctx, const char *text)
{
	(void)ctx;
	printf("%s\n", text);
}

static int cmd_config(struct args *a)
{
	struct mq_err e = {0};
	a->queue = a->npos ? a->pos[0] : NULL;
	if (a->server)
		return rmt_lines(a, "CONFIG", NULL, NULL);
	if (spool_init(a, 0, &e) < 0 || conf_report(&a->sp, a->queue, print_line, NULL, &e) < 0)
		return fail(a, &e);
	return stdout_done(a);
}

/* ----- the command table ----- */

static int cmd_help(struct args *a);
static int cmd_txn(struct args *a);

static const struct opt put_opts[] = {
	{'0', "null", A_NONE, NULL, "read NUL-separated messages from stdin"},
	{0, "whole", A_NONE, NULL, "all of stdin is one message"},
	{'k', "key", A_REQ, "KEY", "key of every message (picks the partition)"},
	{'K', "key-delim", A_REQ, "DELIM", "each line is KEY DELIM BODY"},
	{'t', "tag", A_REQ, "TAG", "tag of every message"},
	{'H', "header", A_REQ, "NAME=VALUE", "add a header (repeatable)"},
	{'p', "partition", A_REQ, "N", "write to partition N (not with -n)"},
	{0, "fsync", A_REQ, "MODE", "always, batch, interval:MS or never (default: the queue's)"},
	{0, "print-offsets", A_NONE, NULL, "print PARTITION:OFFSET of each message once durable"},
	{0, "no-create", A_NONE, NULL, "fail (66) instead of creating a missing queue"},
	{0, "id", A_REQ, "ID", "store nothing if ID was put in the dedupe window (default 2m)"},
	{0, "delay", A_REQ, "DURATION", "deliver no earlier than DURATION from now"},
	{0, "at", A_REQ, "TIME", "deliver no earlier than TIME (RFC 3339 or epoch seconds)"},
	{0, "txn", A_NONE, NULL, "store as a new transaction's half messages; print its id"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt txn_opts[] = {
	{0, "older", A_REQ, "DURATION", "check: transactions open this long (default: the "
	 "queue's txn-check-after, 1m)"},
	{0, "max-checks", A_REQ, "N", "check: roll back after N unknown answers (default: "
	 "txn-max-checks, 15)"},
	{0, "json", A_NONE, NULL, "ls: print JSON"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt get_opts[] = {
	{'g', "group", A_REQ, "GROUP", "consumer group (default: default)"},
	{'n', "count", A_REQ, "COUNT", "messages to get (default 1; 0 = all there are)"},
	{'w', "wait", A_OPTDUR, "TIMEOUT", "wait for a message (for ever, or TIMEOUT)"},
	{'f', "format", A_REQ, "FORMAT", "output: %s %k %o %p %t %T %h %q %a %r, or json"},
	{'0', "null", A_NONE, NULL, "end each message with NUL instead of newline"},
	{0, "commit-first", A_NONE, NULL, "commit before writing out (at-most-once)"},
	{0, "tag", A_REQ, "EXPR", "only messages tagged so: TAG or 'TAG1||TAG2'"},
	{0, "lease", A_REQ, "DURATION", "lease the messages for DURATION; ack them by receipt (%r)"},
	{0, "retries", A_REQ, "N", "retries before a message goes to QUEUE.dlq (default 16)"},
	{0, "backoff", A_REQ, "DELAYS", "delays before each retry (default 10s 30s 1m ... 2h)"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt peek_opts[] = {
	{'n', "count", A_REQ, "COUNT", "print at most COUNT messages (default: all)"},
	{0, "from", A_REQ, "OFFSET", "start at OFFSET in each partition"},
	{0, "since", A_REQ, "TIME", "start at TIME (RFC 3339, epoch seconds, or a duration ago)"},
	{0, "last", A_REQ, "N", "start N messages before the end of each partition"},
	{'p', "partition", A_REQ, "P", "read partition P only"},
	{'f', "format", A_REQ, "FORMAT", "output format (see get)"},
	{'0', "null", A_NONE, NULL, "end each message with NUL instead of newline"},
	{0, "tag", A_REQ, "EXPR", "only messages tagged so: TAG or 'TAG1||TAG2'"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt tail_opts[] = {
	{'F', "follow", A_NONE, NULL, "keep printing new messages until interrupted"},
	{'n', "count", A_REQ, "N", "last N messages of each partition (default 10)"},
	{'p', "partition", A_REQ, "P", "read partition P only"},
	{'f', "format", A_REQ, "FORMAT", "output format (see get)"},
	{'0', "null", A_NONE, NULL, "end each message with NUL instead of newline"},
	{0, "tag", A_REQ, "EXPR", "only messages tagged so: TAG or 'TAG1||TAG2'"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt consume_opts[] = {
	{'g', "group", A_REQ, "GROUP", "consumer group (required)"},
	{'e', "until-empty", A_NONE, NULL, "stop when nothing is left (the default without -w)"},
	{'w', "wait", A_OPTDUR, "TIMEOUT", "when idle, wait for new messages (for ever, or TIMEOUT)"},
	{0, "max", A_REQ, "N", "stop after N messages"},
	{0, "batch", A_REQ, "N", "up to N messages per run of the command (default 1)"},
	{0, "timeout", A_REQ, "DURATION", "kill a run after DURATION (it counts as failed)"},
	{0, "tag", A_REQ, "EXPR", "only messages tagged so: TAG or 'TAG1||TAG2'"},
	{0, "parallel", A_REQ, "N", "up to N runs at once, never two with the same key"},
	{0, "ordered", A_NONE, NULL, "retry a failed message in place: nothing after it runs first"},
	{0, "retries", A_REQ, "N", "retries before a message goes to QUEUE.dlq (default 16)"},
	{0, "backoff", A_REQ, "DELAYS", "delays before each retry (default 10s 30s 1m ... 2h)"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt pipe_opts[] = {
	{'g', "group", A_REQ, "GROUP", "consumer group reading SOURCE (required)"},
	{'e', "until-empty", A_NONE, NULL, "stop when nothing is left (the default without -w)"},
	{'w', "wait", A_OPTDUR, "TIMEOUT", "when idle, wait for new messages (for ever, or TIMEOUT)"},
	{0, "batch", A_REQ, "N", "up to N messages per run of the command (default 100)"},
	{0, "max", A_REQ, "N", "stop after N source messages"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt ack_opts[] = {{0, NULL, 0, NULL, NULL}};

static const struct opt nack_opts[] = {
	{0, "delay", A_REQ, "DURATION", "come again after DURATION (default: the backoff)"},
	{0, "retries", A_REQ, "N", "retries before a message goes to QUEUE.dlq (default 16)"},
	{0, "backoff", A_REQ, "DELAYS", "delays before each retry (default 10s 30s 1m ... 2h)"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt move_opts[] = {
	{'g', "group", A_REQ, "GROUP", "consumer group reading SOURCE (default: move)"},
	{'n', "count", A_REQ, "COUNT", "move at most COUNT messages (default: all)"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt json_opts[] = {
	{0, "json", A_NONE, NULL, "print JSON"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt create_opts[] = {
	{0, "partitions", A_REQ, "N", "number of partitions (default 1)"},
	{0, "fsync", A_REQ, "MODE", "always, batch, interval:MS or never (default batch)"},
	{0, "segment-bytes", A_REQ, "SIZE", "roll segments at SIZE (default 64M)"},
	{0, "retain-age", A_REQ, "DURATION", "remove sealed segments older than this"},
	{0, "retain-bytes", A_REQ, "SIZE", "keep at most SIZE per partition"},
	{0, "compression", A_REQ, "ALGO", "none or zlib (per batch)"},
	{0, "max-message-bytes", A_REQ, "SIZE", "largest message accepted (default 4M)"},
	{0, "retries", A_REQ, "N", "retries of a failed message before QUEUE.dlq (default 16)"},
	{0, "backoff", A_REQ, "DELAYS", "delays before each retry (default 10s 30s 1m ... 2h)"},
	{0, "dedupe-window", A_REQ, "DURATION", "put --id drops duplicates this recent (default 2m)"},
	{0, "txn-check", A_REQ, "COMMAND", "mq serve checks open transactions with this"},
	{0, "txn-check-after", A_REQ, "DURATION", "check transactions open this long (default 1m)"},
	{0, "txn-max-checks", A_REQ, "N", "roll back after N unknown checks (default 15)"},
	{0, "if-not-exists", A_NONE, NULL, "an existing queue is not an error"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt seek_opts[] = {
	{'g', "group", A_REQ, "GROUP", "the consumer group to move"},
	{0, "to", A_REQ, "WHERE", "earliest, latest, an OFFSET, or a TIME"},
	{'p', "partition", A_REQ, "P", "move partition P only (default: all)"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt verify_opts[] = {
	{0, "repair", A_NONE, NULL, "cut damaged data out into quarantine, rebuild indexes"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt no_opts[] = {{0, NULL, 0, NULL, NULL}};

static const struct opt serve_opts[] = {
	{'c', "config", A_REQ, "FILE", "settings from FILE instead of SPOOL/mq.yaml "
	 "(man mq.yaml(5))"},
	{'l', "listen", A_REQ, "ADDR:PORT", "listen here (repeatable; default 127.0.0.1:7411)"},
	{0, "metrics-listen", A_REQ, "ADDR:PORT", "serve Prometheus metrics at "
	 "http://ADDR:PORT/metrics"},
	{0, "idle-timeout", A_REQ, "DURATION", "close a client silent this long (default 5m)"},
	{0, "request-timeout", A_REQ, "DURATION", "drop a client whose request stalls this long "
	 "(default 30s)"},
	{0, "max-connections", A_REQ, "N", "refuse clients past N at once (default 100000)"},
	{0, NULL, 0, NULL, NULL}};

static const struct opt nameserver_opts[] = {
	{'l', "listen", A_REQ, "ADDR:PORT", "listen here (repeatable; default 127.0.0.1:7412)"},
	{0, "scan-interval", A_REQ, "DURATION", "look for silent brokers this often (default 10s)"},
	{0, "expire", A_REQ, "DURATION", "forget a broker silent this long (default 2m)"},
	{0, NULL, 0, NULL, NULL}};

static const struct cmd cmds[] = {
	{"put", cmd_put, "[-0 | --whole] [-k KEY | -K DELIM] [-t TAG] [-H NAME=VALUE]... "
	 "[-p N] [--fsync MODE] [--print-offsets] [--no-create] [--id ID] "
	 "[--delay DURATION | --at TIME | --txn] QUEUE [MSG...]",
	 "Append messages: the arguments, else stdin, one per line.  Exits 0 only once\n"
	 "they are durable (fsync batch/always).  Creates the queue on first use.  With\n"
	 "--txn they are stored invisible, as one transaction whose id is printed: see\n"
	 "'mq txn'.",
	 put_opts, 1, -1, 1},
	{"txn", cmd_txn, "commit ID | rollback ID | ls [--json] [QUEUE] | check [--older DURATION] "
	 "[--max-checks N] QUEUE -- CMD [ARG...]",
	 "End transactions begun with 'mq put --txn': commit makes their messages\n"
	 "visible, all at once and in order; rollback discards them.  Both are\n"
	 "idempotent; the one that comes second exits 65.  'ls' lists open\n"
	 "transactions; 'check' runs CMD for each one open longer than DURATION, with\n"
	 "its messages on stdin: exit 0 commits, 1 rolls back, else ask again later;\n"
	 "after N unknown answers it is rolled back.",
	 txn_opts, 1, -1, 1},
	{"get", cmd_get, "[-g GROUP] [-n COUNT] [-w [TIMEOUT]] [-f FORMAT] [-0] [--commit-first] "
	 "[--tag EXPR] [--lease DURATION] [--retries N] [--backoff DELAYS] QUEUE",
	 "Print the group's next messages (retries that are due first) and commit them\n"
	 "after they are written out (at-least-once).  With --lease, hand them out until\n"
	 "acked instead.  Exits 1 when there is nothing (after the wait, if any).",
	 get_opts, 1, 1, 1},
	{"pipe", cmd_pipe, "-g GROUP [-e | -w [TIMEOUT]] [--batch N] [--max N] SOURCE DEST -- CMD "
	 "[ARG...]",
	 "Run CMD on batches of SOURCE's messages (bodies on stdin, one per line) and\n"
	 "append its output lines to DEST, exactly once: each batch's output and the\n"
	 "group's offsets are committed together as one transaction, so a pipe killed\n"
	 "at any instant and run again neither loses nor doubles a message.  Partition\n"
	 "P of SOURCE goes to partition P mod N of DEST.  A failed run of CMD stops the\n"
	 "pipe (75) with nothing of its batch written.",
	 pipe_opts, 3, -1, 1},
	{"ack", cmd_ack, "QUEUE [RECEIPT...]",
	 "Acknowledge leased messages by receipt (from the arguments, else stdin): they\n"
	 "are done.  Exits 75 if a lease had expired and the message was handed out\n"
	 "again, 65 for a receipt of a message never delivered.  Through nameservers\n"
	 "(-n), each RECEIPT ends in @BROKER and goes to that broker.",
	 ack_opts, 1, -1, 1},
	{"nack", cmd_ack, "[--delay DURATION] [--retries N] [--backoff DELAYS] QUEUE [RECEIPT...]",
	 "Give leased messages back: each comes again after DURATION (default: the\n"
	 "queue's backoff) with its attempt count raised, or goes to QUEUE.dlq after\n"
	 "the last retry.",
	 nack_opts, 1, -1, 1},
	{"move", cmd_move, "[-g GROUP] [-n COUNT] SOURCE DEST",
	 "Move messages from SOURCE to DEST: dead letters back with\n"
	 "'mq move jobs.dlq jobs'.  SOURCE is read as consumer group GROUP (default\n"
	 "move), so a second run moves only what came since.  Exits 1 if nothing moved.",
	 move_opts, 2, 2, 1},
	{"peek", cmd_peek, "[-n COUNT] [--from OFFSET | --since TIME | --last N] [-p P] "
	 "[-f FORMAT] [-0] [--tag EXPR] QUEUE",
	 "Print messages without consuming them.  Exits 1 when it printed nothing.",
	 peek_opts, 1, 1, 1},
	{"tail", cmd_tail, "[-F] [-n N] [-p P] [-f FORMAT] [-0] [--tag EXPR] QUEUE",
	 "Print the last messages; with -F keep following like tail -f.", tail_opts, 1, 1, 1},
	{"consume", cmd_consume, "-g GROUP [-e | -w [TIMEOUT]] [--max N] [--batch N] "
	 "[--timeout DURATION] [--tag EXPR] [--parallel N | --ordered] [--retries N] "
	 "[--backoff DELAYS] "
	 "QUEUE -- CMD [ARG...]",
	 "Run CMD for each message (or --batch of them) with the body on stdin and its\n"
	 "metadata in MQ_* variables; commit when CMD exits 0.  A failed run's messages\n"
	 "come again after the backoff, and go to QUEUE.dlq after the last retry.",
	 consume_opts, 2, -1, 1},
	{"serve", cmd_serve, "[-c FILE] [-l ADDR:PORT]... [--metrics-listen ADDR:PORT] "
	 "[--idle-timeout DURATION] [--request-timeout DURATION] [--max-connections N]",
	 "Serve the spool over TCP (man mq-protocol(7)); every other command runs\n"
	 "there with -s HOST:PORT or $MQ_SERVER.  SIGTERM finishes what clients sent,\n"
	 "commits, answers and exits 0; SIGHUP reads the settings again.",
	 serve_opts, 0, 0, 0},
	{"nameserver", cmd_nameserver, "[-l ADDR:PORT]... [--scan-interval DURATION] "
	 "[--expire DURATION]",
	 "Keep the registry of brokers: each mq serve with nameservers: set registers\n"
	 "its queues there, and mq -n asks it where a queue lives.",
	 nameserver_opts, 0, 0, 0},
	{"route", cmd_route, "[QUEUE]",
	 "Print the brokers holding QUEUE (address, partitions, role), as the first\n"
	 "nameserver of -n or $MQ_NAMESRV that answers sees them; without QUEUE, every\n"
	 "live broker (address, queues, role, seconds since its last registration).\n"
	 "Exits 66 if no live broker holds QUEUE.",
	 no_opts, 0, 1, 0},
	{"ls", cmd_ls, "[--json]", "List the queues of the spool.", json_opts, 0, 0, 1},
	{"stat", cmd_stat, "[--json] [QUEUE...]",
	 "Show messages, bytes, segments and per-group lag and oldest unconsumed age.",
	 json_opts, 0, -1, 1},
	{"groups", cmd_groups, "[--json] QUEUE | rm QUEUE GROUP",
	 "List the consumer groups of a queue with lag, oldest unconsumed age and\n"
	 "offsets; 'groups rm' forgets a group, so retention can reclaim its share.",
	 json_opts, 1, 3, 1},
	{"seek", cmd_seek, "-g GROUP --to earliest|latest|OFFSET|TIME [-p P] QUEUE",
	 "Move a group to the first message, past the last one, to OFFSET, or to the\n"
	 "first message at or after TIME; prints PARTITION:OFFSET for each partition.",
	 seek_opts, 1, 1, 1},
	{"create", cmd_create, "[--partitions N] [--fsync MODE] [--segment-bytes SIZE] "
	 "[--retain-age DURATION] [--retain-bytes SIZE] [--compression ALGO] "
	 "[--max-message-bytes SIZE] [--retries N] [--backoff DELAYS] [--dedupe-window DURATION] "
	 "[--txn-check COMMAND] [--txn-check-after DURATION] [--txn-max-checks N] "
	 "[--if-not-exists] QUEUE",
	 "Create a queue; the settings given are stored with it.", create_opts, 1, 1, 1},
	{"rm", cmd_rm, "QUEUE...", "Remove queues with all their messages and groups.", no_opts, 1, -1, 1},
	{"purge", cmd_purge, "QUEUE...", "Remove every message of the queues, keeping them and "
	 "their settings.", no_opts, 1, -1, 1},
	{"verify", cmd_verify, "[--repair] [QUEUE...]",
	 "Check every checksum, index, head and offset file; report damage by queue,\n"
	 "partition and offset range.  Exits 65 if damage remains.", verify_opts, 0, -1, 1},
	{"config", cmd_config, "[QUEUE]",
	 "Print the effective settings (of QUEUE) and where each one comes from.", no_opts, 0, 1, 1},
	{"help", cmd_help, "[COMMAND]", "Show help for mq or one command.", no_opts, 0, 1, 0},
};
#define NCMDS (sizeof cmds / sizeof cmds[0])

static const struct cmd *cmd_find(const char *name)
{
	for (size_t i = 0; i < NCMDS; i++)
		if (!strcmp(cmds[i].name, name))
			return &cmds[i];
	return NULL;
}

static void help_main(FILE *f)
{
	fprintf(f, "usage: mq [-d DIR | -s HOST:PORT | -n HOST:PORT[,...]] COMMAND [ARGS...]\n"
	           "       mq --version | --help | help COMMAND\n\n"
	           "mq keeps durable message queues in a spool directory; with -s (or\n"
	           "$MQ_SERVER) the command runs on that mq serve instead, and with -n (or\n"
	           "$MQ_NAMESRV) on the brokers those nameservers name for its queue.\n\n"
	           "commands:\n");
	for (size_t i = 0; i < NCMDS; i++) { /* the first sentence of each summary */
		fprintf(f, "  %-10s ", cmds[i].name);
		for (const char *s = cmds[i].summary; *s; s++) {
			fputc(*s == '\n' ? ' ' : *s, f);
			if (*s == '.' && (s[1] == ' ' || s[1] == '\n' || !s[1]))
				break;
		}
		fputc('\n', f);
	}
	fprintf(f, "\nexit status: 0 ok, 1 nothing to get, 64 usage, 65 bad data, 66 no such queue,\n"
	           "69 unavailable, 74 I/O error, 75 try again, 77 not permitted.  See mq(1).\n");
}

static int cmd_help(struct args *a)
{
	if (a->npos == 0) {
		help_main(stdout);
		return MQ_EX_OK;
	}
	const struct cmd *c = cmd_find(a->pos[0]);
	if (!c) {
		fprintf(stderr, "%s: help: unknown command '%s'\n", progname, a->pos[0]);
		return MQ_EX_USAGE;
	}
	help_cmd(stdout, c);
	return MQ_EX_OK;
}

/* ===================================================================
 * 15. main: global options, signals, dispatch
 * =================================================================== */

#ifndef MQ_TEST
static void on_signal(int sig)
{
	stop_flag = sig;
}

/* Run one command with its arguments (argv[0] is the command name). */
/* Commands that print nothing and exit 1 on a broker with nothing for
 * them: through nameservers, the next broker is asked. */
static int cmd_get(struct args *a);
static int cmd_peek(struct args *a);
static int cmd_tail(struct args *a);

/* Run c through nameservers: on each broker the route gives, until one
 * is reachable (and, for get, peek and tail, has something). */
static int ns_run(const struct cmd *c, struct args *a)
{
	struct route rt;
	struct mq_err e = {0};
	const char *q = a->npos && c->fn != cmd_ls ? a->pos[0] : NULL;
	if (q && c->fn == cmd_groups && !strcmp(q, "rm"))
		q = a->npos > 1 ? a->pos[1] : NULL; /* groups rm QUEUE GROUP */
	if (q && !name_valid(q))
		q = NULL; /* the command says what is wrong with it */
	if (ns_brokers(a->namesrv, q, &rt, &e) < 0) {
		fprintf(stderr, "%s: %s: %s\n", progname, c->name, e.msg);
		return e.code;
	}
	int rc = MQ_EX_UNAVAILABLE, waits = c->fn == cmd_get && opt_has(a, "wait");
	a->connect_ms = 5000; /* a broker that does not answer: on to the next */
	if (c->fn == cmd_tail && opt_has(a, "follow"))
		return usage_error(c, "-F follows one server: use -s HOST:PORT, not -n");
	if (c->fn == cmd_tail) { /* the last messages of each broker */
		int ok = 0;
		for (int i = 0; i < rt.n; i++) {
			a->server = rt.b[i].addr;
			int r = c->fn(a);
			ok |= r == MQ_EX_OK;
			rc = ok ? MQ_EX_OK : r;
		}
		a->server = NULL;
		return rc;
	}
	for (int i = 0; i < rt.n; i++) {
		a->server = receipt_broker = rt.b[i].addr;
		rc = c->fn(a);
		receipt_broker = NULL;
		if (rc != MQ_EX_UNAVAILABLE && (rc != MQ_EX_EMPTY || waits ||
		    (c->fn != cmd_get && c->fn != cmd_peek && c->fn != cmd_tail)))
			break;
	}
	a->server = NULL;
	return rc;
}

static int mq_run(int argc, char **argv, const char *spool, const char *server,
                  const char *namesrv)
{
	const struct cmd *c = cmd_find(argv[0]);
	if (!c) {
		fprintf(stderr, "%s: unknown command '%s' (see 'mq --help')\n", progname, argv[0]);
		return MQ_EX_USAGE;
	}
	struct args a;
	memset(&a, 0, sizeof a);
	int rc = args_parse(&a, c, argc - 1, argv + 1);
	if (rc == 0 && spool && !opt_has(&a, "spool")) {
		int k = opt_index(&a, "spool");
		a.val[k] = spool;
		a.count[k] = 1;
	}
	/* -d names a local spool: it wins over $MQ_SERVER */
	int here = c->fn == cmd_serve || c->fn == cmd_nameserver || c->fn == cmd_help;
	a.server = server && *server && !here && !opt_has(&a, "spool") ? server : NULL;
	a.namesrv = namesrv && !here && !opt_has(&a, "spool") && !a.server ? namesrv : NULL;
	if (rc == 0 && (a.server || a.namesrv) && !c->remote && c->fn != cmd_help &&
	    c->fn != cmd_route && !opt_has(&a, "help")) {
		fprintf(stderr, "%s: %s does not work through a server or nameservers yet (unset "
		        "MQ_SERVER and MQ_NAMESRV, drop -s and -n, or give -d)\n", progname, c->name);
		rc = MQ_EX_USAGE;
	}
	if (rc == 0 && opt_has(&a, "help")) {
		help_cmd(stdout, c);
	} else if (rc == 0 && (a.npos < c->min_pos || (c->max_pos >= 0 && a.npos > c->max_pos))) {
		rc = usage_error(c, a.npos < c->min_pos ? "missing arguments" : "too many arguments");
	} else if (rc == 0 && a.namesrv && c->fn != cmd_route && c->fn != cmd_put &&
	           c->fn != cmd_ack && c->fn != cmd_txn && c->fn != cmd_pipe &&
	           c->fn != cmd_move) { /* these find their brokers, or refuse -n, themselves */
		rc = ns_run(c, &a);
	} else if (rc == 0) {
		rc = c->fn(&a);
	}
	cfg_free(&a.sp.cfg);
	free(a.pos);
	return rc;
}

int main(int argc, char **argv)
{
	const char *spool = NULL, *server = NULL, *namesrv = NULL;
	int i = 1;
	dur_fault_init();
	/* A closed stdin/stdout/stderr would be reused by the next open() and
	 * "stdout" would write into a spool file.  Park /dev/null there,
	 * read-only, so reads see EOF and writes fail (get then commits
	 * nothing). */
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDONLY) != fd)
			return MQ_EX_IOERR;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	for (; i < argc && argv[i][0] == '-'; i++) {
		const char *s = argv[i];
		if (!strcmp(s, "--version") || !strcmp(s, "-V")) {
			printf("mq %s\n", MQ_VERSION);
			return MQ_EX_OK;
		} else if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
			help_main(stdout);
			return MQ_EX_OK;
		} else if ((!strcmp(s, "-d") || !strcmp(s, "--spool")) && i + 1 < argc) {
			spool = argv[++i];
		} else if ((!strcmp(s, "-s") || !strcmp(s, "--server")) && i + 1 < argc) {
			server = argv[++i];
		} else if (!strncmp(s, "--server=", 9)) {
			server = s + 9;
		} else if ((!strcmp(s, "-n") || !strcmp(s, "--namesrv")) && i + 1 < argc) {
			namesrv = argv[++i];
		} else if (!strncmp(s, "--namesrv=", 10)) {
			namesrv = s + 10;
		} else if (!strncmp(s, "--spool=", 8)) {
			spool = s + 8;
		} else if (!strncmp(s, "-d", 2) && s[2]) {
			spool = s + 2;
		} else {
			fprintf(stderr, "%s: unknown option '%s' (see 'mq --help')\n", progname, s);
			return MQ_EX_USAGE;
		}
	}
	if (i >= argc) {
		help_main(stderr);
		return MQ_EX_USAGE;
	}
	/* flags before the environment; -d names a local spool, -s one
	 * server, -n nameservers that know the servers */
	if (!spool && !server && !namesrv) {
		server = getenv("MQ_SERVER");
		namesrv = server && *server ? NULL : getenv("MQ_NAMESRV");
	}
	if (spool || (server && *server))
		namesrv = NULL;
	if (spool)
		server = NULL;
	return mq_run(argc - i, argv + i, spool, server, namesrv && *namesrv ? namesrv : NULL);
}
#endif
