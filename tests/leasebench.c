/*
 * Lease get+ack throughput through the engine, without the CLI's process
 * starts: the cost floor under `mq get --lease | mq ack`.  Built from
 * mq.c itself like tests/unit.c (MQ_TEST leaves out main), so layer 10's
 * static functions are reachable.  Run by `make bench`; not a test.
 *
 *   tests/leasebench [-p PROCS] [-n MSGS] [-b BATCH] [-q]
 *
 * Makes a spool under $TMPDIR (else /tmp) with a 1-partition queue of
 * MSGS 100-byte messages, then forks PROCS processes that each loop:
 * claim partition 0 of group "w", take up to BATCH messages, lease them
 * for 60 s, release the claim, and ack the offsets by receipt (one
 * grp_answer: one claim and one synced write), until nothing is left.
 * Each process writes the offsets it acked to a file; the parent checks
 * that every offset was acked exactly once and that the group ends with
 * its committed offset at MSGS and nothing leased or waiting.
 *
 * Prints "N msgs, P processes, batch B: R msgs/s (T s), every offset
 * acked once", or with -q the elapsed microseconds alone.  The clock runs
 * from the moment all processes have their queue open to the last exit.
 * Exits 0, or 1 on an error or a failed check.
 */
#define MQ_TEST
#include "../mq.c"

static char dir[PATH_MAX];
static struct spool sp;

static void quiet_notice(void *ctx, const char *msg)
{
	(void)ctx;
	fprintf(stderr, "leasebench: notice: %s\n", msg);
}

static void die_e(const char *what, const struct mq_err *e)
{
	fprintf(stderr, "leasebench[%ld]: %s: %s\n", (long)getpid(), what, e->msg);
	exit(1);
}

static int64_t mono_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Fill queue q with n 100-byte messages (99 bytes of body + newline in
 * the CLI bench's files; here the 100 bytes are the body). */
static void fill(struct queue *q, uint64_t n)
{
	struct mq_err e;
	struct prod pr;
	char body[101];
	prod_init(&pr, q, 0);
	for (uint64_t i = 0; i < n; i++) {
		struct rec_msg m = {0};
		strfmt(body, sizeof body, "%08" PRIu64 "%092d", i, 0);
		m.ts = now_ms();
		m.body = (const unsigned char *)body;
		m.blen = 100;
		if (prod_add(&pr, &m, &e) < 0)
			die_e("put", &e);
	}
	if (prod_flush(&pr, 1, &e) < 0)
		die_e("put", &e);
	prod_free(&pr);
}

/* One consumer process: lease and ack batches until nothing is left,
 * then write the acked offsets to dir/acked.ID. */
static void worker(int id, int go, uint64_t batch)
{
	struct mq_err e = {0};
	struct queue *q;
	if (q_open(&sp, "q", 0, NULL, 0, &q, &e) < 0)
		die_e("open", &e);
	uint64_t *offs = malloc(batch * sizeof *offs), *acked = NULL;
	struct receipt *rs = calloc(batch, sizeof *rs);
	size_t nacked = 0, cap = 0;
	if (!offs || !rs)
		abort();
	char c;
	while (read(go, &c, 1) < 0 && errno == EINTR) /* EOF: start */
		;
	close(go);
	for (;;) {
		struct claim cl;
		struct rec_msg m;
		unsigned attempt;
		uint32_t lease = 0;
		uint64_t n = 0;
		int k = 0;
		if (grp_claim(q, "w", 0, 0, &cl, &e) < 0)
			die_e("claim", &e);
		while (n < batch && (k = grp_take(&cl, &m, &attempt, &e)) == 1) {
			if (attempt != 1) {
				fprintf(stderr, "leasebench: offset %" PRIu64 " delivered as attempt %u\n",
				        m.offset, attempt);
				exit(1);
			}
			offs[n++] = m.offset;
		}
		if (k < 0)
			die_e("take", &e);
		if (n && grp_settle_lease(&cl, now_ms() + 60000, &lease, &e) < 0)
			die_e("lease", &e);
		if (grp_release(&cl, &e) < 0)
			die_e("release", &e);
		if (n == 0)
			break;
		for (uint64_t i = 0; i < n; i++) {
			strfmt(rs[i].group, sizeof rs[i].group, "w");
			rs[i].part = 0;
			rs[i].off = offs[i];
			rs[i].lease = lease;
			rs[i].result = 0;
		}
		if (grp_answer(q, "w", 0, rs, n, 0, -1, &e) < 0)
			die_e("ack", &e);
		for (uint64_t i = 0; i < n; i++) {
			if (rs[i].result != RC_OK) {
				fprintf(stderr, "leasebench: ack of offset %" PRIu64 " lease %u: result %d\n",
				        rs[i].off, rs[i].lease, rs[i].result);
				exit(1);
			}
			if (nacked == cap && !(acked = realloc(acked, (cap = cap ? cap * 2 : 1024) *
			                                                  sizeof *acked)))
				abort();
			acked[nacked++] = offs[i];
		}
	}
	q_close(q);
	char path[PATH_MAX + 32];
	strfmt(path, sizeof path, "%s/acked.%d", dir, id);
	FILE *f = fopen(path, "wb");
	if (!f || (nacked && fwrite(acked, sizeof *acked, nacked, f) != nacked) || fclose(f)) {
		fprintf(stderr, "leasebench: cannot write %s: %s\n", path, strerror(errno));
		exit(1);
	}
	exit(0);
}

static void usage(void)
{
	fprintf(stderr, "usage: leasebench [-p PROCS] [-n MSGS] [-b BATCH] [-q]\n");
	exit(64);
}

int main(int argc, char **argv)
{
	uint64_t nmsg = 100000, batch = 100;
	int procs = 8, terse = 0, bad = 0;
	struct mq_err e = {0};
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "-q"))
			terse = 1;
		else if (!strcmp(argv[i], "-p") && i + 1 < argc)
			procs = atoi(argv[++i]);
		else if (!strcmp(argv[i], "-n") && i + 1 < argc)
			nmsg = strtoull(argv[++i], NULL, 10);
		else if (!strcmp(argv[i], "-b") && i + 1 < argc)
			batch = strtoull(argv[++i], NULL, 10);
		else
			usage();
	}
	if (procs < 1 || procs > 1024 || nmsg < 1 || batch < 1)
		usage();

	const char *tmp = getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
	strfmt(dir, sizeof dir, "%s/mq-leasebench.XXXXXX", tmp);
	if (!mkdtemp(dir)) {
		fprintf(stderr, "leasebench: cannot make a directory in %s: %s\n", tmp, strerror(errno));
		return 1;
	}
	strfmt(sp.dir, sizeof sp.dir, "%s/spool", dir);
	sp.notice = quiet_notice;
	struct kv set[] = {{"partitions", "1"}};
	struct queue *q;
	if (dur_mkdir(sp.dir, &e) < 0 || cfg_load(&sp.cfg, sp.dir, &e) < 0 ||
	    q_create(&sp, "q", set, 1, &e) < 0 || q_open(&sp, "q", 0, NULL, 0, &q, &e) < 0)
		die_e("setup", &e);
	fill(q, nmsg);
	q_close(q);

	int go[2];
	if (pipe(go) < 0)
		abort();
	pid_t *pids = calloc((size_t)procs, sizeof *pids);
	if (!pids)
		abort();
	fflush(NULL);
	for (int i = 0; i < procs; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			perror("leasebench: fork");
			return 1;
		}
		if (pids[i] == 0) {
			close(go[1]);
			worker(i, go[0], batch);
		}
	}
	close(go[0]);
	poll(NULL, 0, 100); /* let every process open the queue */
	int64_t t0 = mono_us();
	close(go[1]); /* go */
	for (int i = 0; i < procs; i++) {
		int st;
		while (waitpid(pids[i], &st, 0) < 0)
			if (errno != EINTR)
				abort();
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
			fprintf(stderr, "leasebench: process %d failed (status %d)\n", i, st);
			bad = 1;
		}
	}
	int64_t us = mono_us() - t0;

	/* Every offset acked exactly once, and the group says so too. */
	unsigned char *seen = calloc(nmsg, 1);
	uint64_t total = 0;
	if (!seen)
		abort();
	for (int i = 0; i < procs && !bad; i++) {
		char path[PATH_MAX + 32];
		uint64_t off;
		strfmt(path, sizeof path, "%s/acked.%d", dir, i);
		FILE *f = fopen(path, "rb");
		if (!f) {
			fprintf(stderr, "leasebench: cannot read %s: %s\n", path, strerror(errno));
			bad = 1;
			break;
		}
		while (fread(&off, sizeof off, 1, f) == 1) {
			if (off >= nmsg || seen[off]++) {
				fprintf(stderr, "leasebench: offset %" PRIu64 " acked %s\n", off,
				        off >= nmsg ? "but never put" : "twice");
				bad = 1;
			}
			total++;
		}
		fclose(f);
	}
	if (!bad && total != nmsg) {
		fprintf(stderr, "leasebench: %" PRIu64 " of %" PRIu64 " offsets acked\n", total, nmsg);
		bad = 1;
	}
	if (!bad) {
		struct claim c;
		if (q_open(&sp, "q", 0, NULL, 0, &q, &e) < 0 || grp_claim(q, "w", 0, CL_NOREAD, &c, &e) < 0)
			die_e("check", &e);
		if (c.gs.off != nmsg || c.gs.n != 0) {
			fprintf(stderr, "leasebench: group 'w' ends at offset %" PRIu64 " with %zu entries "
			        "leased or waiting; want %" PRIu64 " and none\n", c.gs.off, c.gs.n, nmsg);
			bad = 1;
		}
		grp_release(&c, &e);
		q_close(q);
	}
	free(seen);
	free(pids);
	dur_rmtree(dir, &e);
	cfg_free(&sp.cfg);
	if (bad)
		return 1;
	if (terse)
		printf("%" PRId64 "\n", us);
	else
		printf("%" PRIu64 " msgs, %d processes, batch %" PRIu64 ": %.0f msgs/s (%.3f s), every "
		       "offset acked once\n", nmsg, procs, batch, (double)nmsg / ((double)us / 1e6),
		       (double)us / 1e6);
	return 0;
}
