/*
 * Unit tests of mq's layers, built from mq.c itself (MQ_TEST leaves out
 * main; MQ_FAULTS gives the fault-injecting syscall table), so static
 * functions are reachable.  Each test is a function in the table at the
 * bottom; the runner prints one line per test and a closing count.
 */
#define MQ_TEST
#include "../mq.c"

static int failures;
#define CHECK(c)                                                               \
	do {                                                                       \
		if (!(c)) {                                                            \
			fprintf(stderr, "    %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); \
			failures++;                                                        \
			return;                                                            \
		}                                                                      \
	} while (0)

/* A fresh spool directory per test. */
static char spool_dir[PATH_MAX];
static struct spool sp;
static int notices;
static char last_notice[1024];

static void count_notice(void *ctx, const char *msg)
{
	(void)ctx;
	notices++;
	strfmt(last_notice, sizeof last_notice, "%s", msg);
}

static void spool_fresh(void)
{
	struct mq_err e;
	if (spool_dir[0])
		dur_rmtree(spool_dir, &e);
	strfmt(spool_dir, sizeof spool_dir, "%s/mq-unit.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(spool_dir))
		abort();
	memset(&sp, 0, sizeof sp);
	strfmt(sp.dir, sizeof sp.dir, "%s", spool_dir);
	sp.notice = count_notice;
	notices = 0;
	cfg_load(&sp.cfg, sp.dir, &e);
}

static void fault_clear(void) { memset(&fault, 0, sizeof fault); }

static void fault_set(const char *call, long n, int what, int sticky)
{
	fault_clear();
	strfmt(fault.call, sizeof fault.call, "%s", call);
	fault.n = n;
	fault.what = what;
	fault.sticky = sticky;
}

/* Create queue name with settings (stored in its meta.yaml) and open it. */
static int q_new(const char *name, const struct kv *set, int nset, struct queue **q,
                 struct mq_err *e)
{
	if (q_create(&sp, name, set, nset, e) < 0)
		return -1;
	return q_open(&sp, name, 0, NULL, 0, q, e);
}

/* Put n messages "m<i>" to queue name; returns 0 or -1. */
static int put_n(struct queue *q, int from, int n, struct mq_err *e)
{
	struct prod pr;
	prod_init(&pr, q, 0);
	char body[32];
	int r = 0;
	for (int i = from; i < from + n && r >= 0; i++) {
		struct rec_msg m = {0};
		m.ts = now_ms();
		m.body = (const unsigned char *)body;
		m.blen = (size_t)strfmt(body, sizeof body, "m%d", i);
		r = prod_add(&pr, &m, e);
	}
	if (r >= 0)
		r = prod_flush(&pr, 1, e);
	prod_free(&pr);
	return r < 0 ? -1 : 0;
}

/* Read all of partition 0 from offset 0 into a count; checks bodies. */
static int read_all(struct queue *q, uint64_t *count, struct mq_err *e)
{
	struct reader r;
	struct rec_msg m;
	*count = 0;
	if (rd_open(&r, &q->parts[0], 0, e) < 0)
		return -1;
	int k;
	while ((k = rd_next(&r, &m, e)) == 1) {
		char want[32];
		int n = strfmt(want, sizeof want, "m%" PRIu64, m.offset);
		if ((size_t)n != m.blen || memcmp(want, m.body, m.blen)) {
			rd_close(&r);
			return err_set(e, 99, "body mismatch at %" PRIu64, m.offset);
		}
		(*count)++;
	}
	rd_close(&r);
	return k;
}

static void t_varint(void)
{
	unsigned char b[10];
	uint64_t vals[] = {0, 1, 127, 128, 300, 1ull << 35, UINT64_MAX};
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
		uint64_t v;
		size_t n = varint_put(b, vals[i]);
		CHECK(varint_get(b, b + n, &v) == n && v == vals[i]);
		CHECK(varint_get(b, b + n - 1, &v) == 0); /* cut short */
	}
	int64_t z[] = {0, -1, 1, INT64_MIN, INT64_MAX};
	for (size_t i = 0; i < 5; i++)
		CHECK(unzigzag(zigzag(z[i])) == z[i]);
	memset(b, 0xff, sizeof b);
	uint64_t v;
	CHECK(varint_get(b, b + 10, &v) == 0); /* overflows 64 bits */
}

static void t_names(void)
{
	CHECK(name_valid("jobs") && name_valid("a.b_c-d") && name_valid("9"));
	CHECK(!name_valid("") && !name_valid("../x") && !name_valid("a/b"));
	CHECK(!name_valid(".hidden") && !name_valid("-x") && !name_valid("a b") && !name_valid("a\nb"));
	char n[130];
	memset(n, 'a', 129);
	n[129] = 0;
	CHECK(!name_valid(n));
	n[128] = 0;
	CHECK(name_valid(n));
}

static void t_parse(void)
{
	int64_t v;
	CHECK(parse_duration_ms("500ms", &v) == 0 && v == 500);
	CHECK(parse_duration_ms("10", &v) == 0 && v == 10000);
	CHECK(parse_duration_ms("2d", &v) == 0 && v == 172800000);
	CHECK(parse_duration_ms("-1s", &v) < 0 && parse_duration_ms("1x", &v) < 0);
	CHECK(parse_duration_ms("99999999999999999999", &v) < 0);
	CHECK(parse_size("4k", &v) == 0 && v == 4096);
	CHECK(parse_size("64M", &v) == 0 && v == 64 << 20);
	CHECK(parse_size("abc", &v) < 0 && parse_size("", &v) < 0);
	CHECK(parse_time_ms("2026-12-01T09:00:00Z", &v) == 0 && v == 1796115600000);
	CHECK(parse_time_ms("2026-12-01T10:00:00+01:00", &v) == 0 && v == 1796115600000);
	CHECK(parse_time_ms("2026-12-01T09:00:00.250Z", &v) == 0 && v == 1796115600250);
	CHECK(parse_time_ms("1796115600", &v) == 0 && v == 1796115600000);
	CHECK(parse_time_ms("@1796115600", &v) == 0 && v == 1796115600000);
	CHECK(parse_time_ms("yesterday", &v) < 0 && parse_time_ms("2026-13", &v) < 0);
	uint64_t u;
	CHECK(parse_u64("18446744073709551615", &u) == 0 && u == UINT64_MAX);
	CHECK(parse_u64("18446744073709551616", &u) < 0 && parse_u64("-1", &u) < 0);
}

static void t_conf(void)
{
	struct qconf c;
	struct mq_err e;
	conf_defaults(&c);
	CHECK(conf_set(&c, "fsync", "interval:250ms", "t", &e) == 0);
	CHECK(c.fsync == MQ_FSYNC_INTERVAL && c.fsync_ms == 250);
	CHECK(conf_set(&c, "fsync", "sometimes", "t", &e) < 0 && e.code == MQ_EX_USAGE);
	CHECK(conf_set(&c, "segment-bytes", "1k", "t", &e) < 0); /* below 4k */
	CHECK(conf_set(&c, "partitions", "0", "t", &e) < 0);
	CHECK(conf_set(&c, "colour", "red", "t", &e) < 0 && strstr(e.msg, "unknown key 'colour'"));
}

/* Encode messages with every field, decode them back. */
static void roundtrip(int compress)
{
	struct rec_enc enc;
	struct buf hb = {0}, scratch = {0};
	unsigned char tmp[10];
	rec_enc_init(&enc, compress, MQ_BATCH_TARGET);
	buf_add(&hb, tmp, varint_put(tmp, 1));
	buf_add(&hb, tmp, varint_put(tmp, 1));
	buf_adds(&hb, "h");
	buf_add(&hb, tmp, varint_put(tmp, 2));
	buf_adds(&hb, "hv");
	for (int i = 0; i < 1000; i++) {
		char body[64];
		struct rec_msg m = {0};
		m.ts = 1000 + i;
		m.body = (const unsigned char *)body;
		m.blen = (size_t)strfmt(body, sizeof body, "body %d padding padding padding", i);
		m.has_key = i % 2;
		m.key = (const unsigned char *)"k";
		m.klen = m.has_key;
		m.has_tag = i % 3 == 0;
		m.tag = (const unsigned char *)"tag";
		m.tlen = m.has_tag ? 3 : 0;
		m.hdrs = (const unsigned char *)hb.p;
		m.hlen = i % 5 ? 0 : hb.len;
		rec_enc_add(&enc, &m);
	}
	rec_enc_close(&enc);
	size_t at = 0;
	uint64_t base = 500, off = 500;
	int batches = 0;
	while (at < enc.out.len) {
		unsigned char *b = (unsigned char *)enc.out.p + at;
		struct rec_hdr h;
		struct mq_err e;
		rec_finish(b, base);
		CHECK(rec_parse_hdr(b, enc.out.len - at, &h, &e) == 0);
		CHECK(rec_check_crc(b, &h, &e) == 0);
		CHECK(!!(h.flags & MQ_BF_ZLIB) == !!compress);
		struct rec_iter it;
		struct rec_msg m;
		CHECK(rec_iter_init(&it, b, &h, &scratch, &e) == 0);
		while (rec_next(&it, &m, &e) == 1) {
			int i = (int)(off - 500);
			char body[64];
			int n = strfmt(body, sizeof body, "body %d padding padding padding", i);
			CHECK(m.offset == off && m.ts == 1000 + i);
			CHECK(m.blen == (size_t)n && !memcmp(m.body, body, m.blen));
			CHECK(m.has_key == i % 2 && m.has_tag == (i % 3 == 0));
			CHECK(m.nhdrs == (i % 5 ? 0u : 1u));
			off++;
		}
		/* Every single-bit flip in the batch is caught by the crc. */
		for (uint32_t bit = 0; bit < h.len * 8; bit += 97) {
			if (bit / 8 >= 12 && bit / 8 < 16)
				continue; /* the crc field itself */
			b[bit / 8] ^= (unsigned char)(1 << (bit % 8));
			struct rec_hdr h2;
			int bad = rec_parse_hdr(b, h.len, &h2, &e) < 0 || h2.len > h.len ||
			          rec_check_crc(b, &h2, &e) < 0;
			b[bit / 8] ^= (unsigned char)(1 << (bit % 8));
			CHECK(bad);
		}
		base += h.count;
		at += h.len;
		batches++;
	}
	CHECK(off == 1500 && batches >= 1);
	rec_enc_free(&enc);
	buf_free(&hb);
	buf_free(&scratch);
}

static void t_codec_plain(void) { roundtrip(0); }
static void t_codec_zlib(void) { roundtrip(1); }

static void t_header_errors(void)
{
	unsigned char b[MQ_BATCH_HDR] = {0};
	struct rec_hdr h;
	struct mq_err e;
	CHECK(rec_parse_hdr(b, 10, &h, &e) < 0 && strstr(e.msg, "truncated"));
	CHECK(rec_parse_hdr(b, sizeof b, &h, &e) < 0 && strstr(e.msg, "magic"));
	le32_put(b, MQ_BATCH_MAGIC);
	b[4] = 9;
	CHECK(rec_parse_hdr(b, sizeof b, &h, &e) < 0 && strstr(e.msg, "version"));
	b[4] = MQ_BATCH_VERSION;
	le16_put(b + 6, MQ_BATCH_HDR);
	le32_put(b + 8, MQ_BATCH_MAX + 1);
	CHECK(rec_parse_hdr(b, sizeof b, &h, &e) < 0 && strstr(e.msg, "length"));
}

static void t_head_and_offsets(void)
{
	unsigned char b[MQ_HEAD_SIZE];
	struct head h = {42, 40, 1234, 99}, g;
	head_encode(b, &h);
	CHECK(head_decode(b, &g) == 0 && g.next == 42 && g.seg_base == 40 && g.seg_len == 1234);
	b[20] ^= 1;
	CHECK(head_decode(b, &g) < 0);

	spool_fresh();
	char path[PATH_MAX + 16];
	strfmt(path, sizeof path, "%s/off", spool_dir);
	int fd = open(path, O_RDWR | O_CREAT, 0644);
	struct mq_err e;
	struct gstate gs;
	CHECK(gs_read(fd, path, &gs, &e) == 0 && gs.off == 0 && gs.seq == 0 && !gs.damaged);
	gs.off = gs.next = 10;
	CHECK(gs_write(fd, path, &gs, 1, &e) == 0);
	gs.off = gs.next = 20;
	CHECK(gs_write(fd, path, &gs, 1, &e) == 0);
	uint64_t at20 = gs.at;
	gs_free(&gs);
	CHECK(gs_read(fd, path, &gs, &e) == 0 && gs.off == 20 && gs.seq == 2);
	/* A torn write of the next record leaves the newest in force. */
	gs.off = gs.next = 30;
	CHECK(gs_write(fd, path, &gs, 1, &e) == 0 && gs.at != at20);
	CHECK(pwrite(fd, "\xff\xff\xff\xff", 4, (off_t)gs.at + 20) == 4);
	gs_free(&gs);
	CHECK(gs_read(fd, path, &gs, &e) == 0 && gs.off == 20 && gs.seq == 2);
	/* Entries: leases split by acks, the committed offset is the low
	 * watermark, and thousands of writes wrap without ever losing it. */
	struct gent ge = {20, 10, 1, 0, 1, GE_LEASED, 1000};
	gs_set(&gs, &ge);
	gs_done(&gs, 22, 1);
	gs_done(&gs, 20, 1);
	CHECK(gs.n == 2 && gs.off == 21 && gs.next == 30);
	for (int i = 0; i < 5000; i++) {
		gs_done(&gs, 21, 1);
		gs.lease++;
		CHECK(gs_write(fd, path, &gs, 0, &e) == 0);
	}
	struct stat st;
	CHECK(fstat(fd, &st) == 0 && st.st_size < 2 * MQ_OFF_WRAP);
	uint32_t lease = gs.lease;
	gs_free(&gs);
	CHECK(gs_read(fd, path, &gs, &e) == 0 && gs.off == 23 && gs.n == 1 && gs.lease == lease);
	CHECK(gs.e[0].lo == 23 && gs.e[0].n == 7 && gs.e[0].kind == GE_LEASED);
	gs_free(&gs);
	/* Everything damaged reads as offset 0, flagged for verify. */
	char junk[4096];
	memset(junk, 0x5a, sizeof junk);
	CHECK(ftruncate(fd, 0) == 0 && pwrite(fd, junk, sizeof junk, 0) == (ssize_t)sizeof junk);
	CHECK(gs_read(fd, path, &gs, &e) == 0 && gs.off == 0 && gs.damaged);
	gs_free(&gs);
	close(fd);
}

static void t_put_read(void)
{
	struct queue *q;
	struct mq_err e;
	uint64_t n;
	struct kv set[] = {{"segment-bytes", "4k"}};
	spool_fresh();
	CHECK(q_new("q", set, 1, &q, &e) == 0);
	CHECK(put_n(q, 0, 3000, &e) == 0);
	CHECK(read_all(q, &n, &e) == 0 && n == 3000);
	uint64_t *segs;
	size_t ns;
	CHECK(seg_list(q->parts[0].dir, &segs, &ns, &e) == 0 && ns > 3);
	/* Seeking into the middle of a later segment uses the index. */
	struct reader r;
	struct rec_msg m;
	CHECK(rd_open(&r, &q->parts[0], 2500, &e) == 0 && rd_next(&r, &m, &e) == 1);
	CHECK(m.offset == 2500 && r.check_idx == 0);
	rd_close(&r);
	free(segs);
	q_close(q);
}

/* A torn tail (half a batch) is cut on the next open, with one notice. */
static void t_torn_tail(void)
{
	struct queue *q;
	struct mq_err e;
	uint64_t n;
	spool_fresh();
	CHECK(q_new("q", NULL, 0, &q, &e) == 0);
	CHECK(put_n(q, 0, 100, &e) == 0);
	char path[PATH_MAX + 64];
	seg_path(path, sizeof path, q->parts[0].dir, 0, MQ_LOG_SUFFIX);
	int64_t size = file_size(path);
	q_close(q);
	/* Append the first 40 bytes of a copy of the first batch. */
	int fd = open(path, O_RDWR);
	unsigned char b[40];
	CHECK(pread(fd, b, sizeof b, 0) == sizeof b && pwrite(fd, b, sizeof b, size) == sizeof b);
	close(fd);
	CHECK(q_open(&sp, "q", 0, NULL, 0, &q, &e) == 0);
	CHECK(read_all(q, &n, &e) == 0 && n == 100);
	CHECK(notices == 1 && strstr(last_notice, "torn tail"));
	CHECK(file_size(path) == size);
	CHECK(put_n(q, 100, 10, &e) == 0 && read_all(q, &n, &e) == 0 && n == 110);
	q_close(q);
}

/* Unpublished but complete batches of a dead writer are kept (synced
 * and published), and the index is rebuilt when it was lost. */
static void t_dead_writer(void)
{
	struct queue *q;
	struct mq_err e;
	uint64_t n;
	spool_fresh();
	CHECK(q_new("q", NULL, 0, &q, &e) == 0);
	CHECK(put_n(q, 0, 50, &e) == 0);
	struct part *p = &q->parts[0];
	struct head h0 = p->h;
	CHECK(put_n(q, 50, 50, &e) == 0);
	/* Roll the head back, as if the writer died before publishing, and
	 * lose the index too. */
	p->next = h0.next, p->seg_len = h0.seg_len, p->log_base = h0.seg_base;
	CHECK(part_publish(p, 0, &e) == 0);
	char path[PATH_MAX + 64];
	seg_path(path, sizeof path, p->dir, 0, MQ_IDX_SUFFIX);
	CHECK(truncate(path, 0) == 0);
	q_close(q);
	CHECK(q_open(&sp, "q", 0, NULL, 0, &q, &e) == 0);
	CHECK(read_all(q, &n, &e) == 0 && n == 100);
	CHECK(file_size(path) == 100 * MQ_IDX_ENTRY);
	q_close(q);
}

/* fdatasync EIO: the put fails (74), its bytes are cut, the partition is
 * not written again by this process, and earlier data is intact. */
static void t_fsync_eio(void)
{
	struct queue *q;
	struct mq_err e;
	uint64_t n;
	spool_fresh();
	CHECK(q_new("q", NULL, 0, &q, &e) == 0);
	CHECK(put_n(q, 0, 20, &e) == 0);
	fault_set("fdatasync", 1, EIO, 0);
	CHECK(put_n(q, 20, 20, &e) < 0 && e.code == MQ_EX_IOERR && strstr(e.msg, "fsync"));
	fault_clear();
	CHECK(q->parts[0].broken);
	CHECK(put_n(q, 20, 1, &e) < 0); /* never carries on after a failed sync */
	q_close(q);
	CHECK(q_open(&sp, "q", 0, NULL, 0, &q, &e) == 0);
	CHECK(read_all(q, &n, &e) == 0 && n == 20);
	CHECK(put_n(q, 20, 5, &e) == 0 && read_all(q, &n, &e) == 0 && n == 25);
	q_close(q);
}

/* ENOSPC and short writes leave nothing partial behind. */
static void t_write_errors(void)
{
	int kinds[] = {ENOSPC, -1};
	for (int k = 0; k < 2; k++) {
		struct queue *q;
		struct mq_err e;
		uint64_t n;
		spool_fresh();
		CHECK(q_new("q", NULL, 0, &q, &e) == 0);
		CHECK(put_n(q, 0, 30, &e) == 0);
		fault_set("pwrite", 1, kinds[k], 1);
		CHECK(put_n(q, 30, 30, &e) < 0 && e.code == MQ_EX_IOERR);
		fault_clear();
		q_close(q);
		CHECK(q_open(&sp, "q", 0, NULL, 0, &q, &e) == 0);
		CHECK(read_all(q, &n, &e) == 0 && n == 30);
		CHECK(notices == 0); /* truncated at once: no torn tail left */
		q_close(q);
	}
}

static void vr_print(void *ctx, const char *msg)
{
	(void)ctx;
	if (getenv("UNIT_VERBOSE"))
		fprintf(stderr, "    verify: %s\n", msg);
}

/* Damage in the middle of a sealed segment: readers stop with 65 at the
 * bad batch; verify --repair quarantines it and keeps what follows. */
static void t_corrupt_repair(void)
{
	struct queue *q;
	struct mq_err e;
	uint64_t n;
	struct kv set[] = {{"segment-bytes", "64k"}};
	spool_fresh();
	CHECK(q_new("q", set, 1, &q, &e) == 0);
	for (int i = 0; i < 40; i++) /* many small batches */
		CHECK(put_n(q, i * 100, 100, &e) == 0);
	char path[PATH_MAX + 64];
	seg_path(path, sizeof path, q->parts[0].dir, 0, MQ_LOG_SUFFIX);
	int fd = open(path, O_RDWR);
	unsigned char c;
	CHECK(pread(fd, &c, 1, 3000) == 1);
	c ^= 0x40;
	CHECK(pwrite(fd, &c, 1, 3000) == 1);
	close(fd);
	CHECK(read_all(q, &n, &e) < 0 && e.code == MQ_EX_DATAERR && strstr(e.msg, ":"));
	struct vrep vr = {vr_print, NULL, 0, 0, NULL};
	CHECK(verify_queue(q, 0, &vr, &e) == 0 && vr.damaged == 1);
	vr = (struct vrep){vr_print, NULL, 0, 0, NULL};
	CHECK(verify_queue(q, 1, &vr, &e) == 0 && vr.damaged == 1 && vr.repaired == 1);
	vr = (struct vrep){vr_print, NULL, 0, 0, NULL};
	CHECK(verify_queue(q, 0, &vr, &e) == 0 && vr.damaged == 0);
	/* Exactly one batch of 100 messages is gone; the rest reads back. */
	struct reader r;
	struct rec_msg m;
	uint64_t got = 0;
	CHECK(rd_open(&r, &q->parts[0], 0, &e) == 0);
	while (rd_next(&r, &m, &e) == 1)
		got++;
	CHECK(got == 3900 && r.skip_to - r.skip_from == 100);
	rd_close(&r);
	q_close(q);
}

static void t_time_seek(void)
{
	struct queue *q;
	struct mq_err e;
	struct kv set[] = {{"segment-bytes", "8k"}};
	spool_fresh();
	CHECK(q_new("q", set, 1, &q, &e) == 0);
	struct prod pr;
	prod_init(&pr, q, 0);
	for (int i = 0; i < 5000; i++) {
		char body[32];
		struct rec_msg m = {0};
		m.ts = 1000000 + i * 10; /* message i at time 1000000 + 10 i */
		m.body = (const unsigned char *)body;
		m.blen = (size_t)strfmt(body, sizeof body, "m%d", i);
		CHECK(prod_add(&pr, &m, &e) >= 0);
		if (i % 50 == 49)
			CHECK(prod_flush(&pr, 1, &e) == 0);
	}
	CHECK(prod_flush(&pr, 1, &e) == 0);
	prod_free(&pr);
	int64_t targets[] = {0, 1000000, 1012345, 1030000, 1049990, 2000000};
	for (size_t t = 0; t < 6; t++) {
		uint64_t off;
		struct reader r;
		struct rec_msg m;
		CHECK(part_offset_for_time(&q->parts[0], targets[t], &off, &e) == 0);
		CHECK(rd_open(&r, &q->parts[0], off, &e) == 0);
		r.min_ts = targets[t];
		int k = rd_next(&r, &m, &e);
		int64_t want = (targets[t] - 1000000 + 9) / 10;
		if (want < 0)
			want = 0;
		if (want >= 5000)
			CHECK(k == 0);
		else
			CHECK(k == 1 && m.offset == (uint64_t)want);
		rd_close(&r);
	}
	q_close(q);
}

static void t_retention(void)
{
	struct queue *q;
	struct mq_err e;
	struct kv set[] = {{"segment-bytes", "4k"}};
	spool_fresh();
	CHECK(q_new("q", set, 1, &q, &e) == 0);
	CHECK(put_n(q, 0, 3000, &e) == 0);
	struct part *p = &q->parts[0];
	CHECK(part_lock(p, 0, &e) == 0);
	CHECK(part_retain(p, 0, MQ_DRAINED_ROLL, &e) == 0); /* nothing consumed */
	int removed = part_retain(p, 1500, MQ_DRAINED_ROLL, &e);
	CHECK(removed > 0);
	uint64_t *segs;
	size_t n;
	CHECK(seg_list(p->dir, &segs, &n, &e) == 0 && segs[0] <= 1500);
	free(segs);
	CHECK(part_retain(p, UINT64_MAX, 1, &e) > 0); /* purge */
	CHECK(seg_list(p->dir, &segs, &n, &e) == 0 && n == 1 && segs[0] == 3000);
	free(segs);
	part_unlock(p);
	uint64_t cnt;
	struct reader r;
	struct rec_msg m;
	CHECK(rd_open(&r, p, 0, &e) == 0 && rd_next(&r, &m, &e) == 0 && r.skip_to == 3000);
	rd_close(&r);
	CHECK(put_n(q, 3000, 5, &e) == 0);
	CHECK(rd_open(&r, p, 0, &e) == 0);
	for (cnt = 0; rd_next(&r, &m, &e) == 1; cnt++)
		;
	CHECK(cnt == 5);
	rd_close(&r);
	q_close(q);
}

static void t_config_file(void)
{
	struct mq_err e;
	char path[PATH_MAX + 16];
	spool_fresh();
	strfmt(path, sizeof path, "%s/mq.yaml", spool_dir);
	FILE *f = fopen(path, "w");
	fputs("defaults:\n  fsync: always\nqueues:\n  q:\n    partitions: 3\n", f);
	fclose(f);
	struct cfg cfg;
	struct qconf c;
	CHECK(cfg_load(&cfg, spool_dir, &e) == 0);
	CHECK(cfg_queue(&cfg, "q", &c, &e) == 0 && c.partitions == 3 && c.fsync == MQ_FSYNC_ALWAYS);
	CHECK(strstr(c.src[0], "mq.yaml:5"));
	cfg_free(&cfg);
	f = fopen(path, "w");
	fputs("defaults:\n  fsync: always\n  colour: red\n", f);
	fclose(f);
	CHECK(cfg_load(&cfg, spool_dir, &e) < 0 && strstr(e.msg, "mq.yaml:3") &&
	      strstr(e.msg, "colour"));
	cfg_free(&cfg);
}

/* A record claiming 2^63 headers, or an offset delta that is not its
 * index, is rejected by the decoder (crc-valid hostile bytes). */
static void t_hostile_record(void)
{
	for (int kind = 0; kind < 2; kind++) {
		unsigned char b[MQ_BATCH_HDR + 64] = {0}, *p = b + MQ_BATCH_HDR;
		size_t n = 0;
		unsigned char rec[40];
		size_t r = 0;
		r += varint_put(rec + r, kind ? 1 : 0);             /* offset delta */
		r += varint_put(rec + r, 0);                        /* ts delta */
		r += varint_put(rec + r, 0);                        /* no key */
		r += varint_put(rec + r, 0);                        /* no tag */
		r += varint_put(rec + r, kind ? 0 : (1ull << 63));  /* headers */
		rec[r++] = 'x';
		n += varint_put(p, r);
		memcpy(p + n, rec, r);
		n += r;
		le32_put(b, MQ_BATCH_MAGIC);
		b[4] = MQ_BATCH_VERSION;
		le16_put(b + 6, MQ_BATCH_HDR);
		le32_put(b + 8, (uint32_t)(MQ_BATCH_HDR + n));
		le32_put(b + 24, 1);
		le32_put(b + 28, (uint32_t)n);
		rec_finish(b, 0);
		struct rec_hdr h;
		struct rec_iter it;
		struct rec_msg m;
		struct mq_err e;
		struct buf scratch = {0};
		CHECK(rec_parse_hdr(b, sizeof b, &h, &e) == 0 && rec_check_crc(b, &h, &e) == 0);
		CHECK(rec_iter_init(&it, b, &h, &scratch, &e) == 0);
		CHECK(rec_next(&it, &m, &e) < 0);
		buf_free(&scratch);
	}
}

/* A head older than the segments (a roll's head fsync failed, then a
 * power loss): recovery adopts the newest segment, loses nothing. */
static void t_stale_head(void)
{
	struct queue *q;
	struct mq_err e;
	uint64_t n;
	struct kv set[] = {{"segment-bytes", "4k"}};
	spool_fresh();
	CHECK(q_new("q", set, 1, &q, &e) == 0);
	CHECK(put_n(q, 0, 1, &e) == 0);
	char path[PATH_MAX + 16];
	unsigned char old[MQ_HEAD_SIZE];
	strfmt(path, sizeof path, "%s/head", q->parts[0].dir);
	int fd = open(path, O_RDWR);
	CHECK(pread(fd, old, sizeof old, 0) == sizeof old);
	CHECK(put_n(q, 1, 2000, &e) == 0);
	q_close(q);
	CHECK(pwrite(fd, old, sizeof old, 0) == sizeof old);
	close(fd);
	CHECK(q_open(&sp, "q", 0, NULL, 0, &q, &e) == 0);
	CHECK(put_n(q, 2001, 1, &e) == 0);
	CHECK(read_all(q, &n, &e) == 0 && n == 2002);
	struct vrep vr = {vr_print, NULL, 0, 0, NULL};
	CHECK(verify_queue(q, 0, &vr, &e) == 0 && vr.damaged == 0);
	q_close(q);
}

/* A flush that fails on its second partition writes nothing twice, and
 * the producer refuses to go on. */
static void t_failed_flush_no_dup(void)
{
	struct queue *q;
	struct mq_err e;
	struct kv set[] = {{"partitions", "2"}};
	spool_fresh();
	CHECK(q_new("q", set, 1, &q, &e) == 0);
	struct prod pr;
	prod_init(&pr, q, -1);
	for (int i = 0; i < 200; i++) {
		char key[8], body[16];
		struct rec_msg m = {0};
		m.ts = now_ms();
		m.has_key = 1;
		m.key = (const unsigned char *)key;
		m.klen = (size_t)strfmt(key, sizeof key, "k%d", i % 7);
		m.body = (const unsigned char *)body;
		m.blen = (size_t)strfmt(body, sizeof body, "b%d", i);
		CHECK(prod_add(&pr, &m, &e) == 0);
	}
	fault_set("pwrite", 5, ENOSPC, 1); /* partition 0 goes through, 1 fails */
	CHECK(prod_flush(&pr, 1, &e) < 0);
	fault_clear();
	CHECK(pr.failed && prod_flush(&pr, 1, &e) < 0);
	prod_free(&pr);
	uint64_t total = 0;
	for (int p = 0; p < 2; p++) {
		struct reader r;
		struct rec_msg m;
		CHECK(rd_open(&r, &q->parts[p], 0, &e) == 0);
		while (rd_next(&r, &m, &e) == 1)
			total++;
		rd_close(&r);
	}
	CHECK(total < 200); /* one partition's share, once */
	q_close(q);
}

/* Options anywhere, bundled flags, and -w taking a duration only when a
 * positional argument remains or was seen. */
static void t_args(void)
{
	const struct cmd *get = cmd_find("get");
	struct {
		const char *argv[6];
		const char *wait, *queue;
	} cases[] = {
		{{"-w", "5s", "q"}, "5s", "q"},
		{{"q", "-w", "5s"}, "5s", "q"},
		{{"-w", "q"}, "", "q"},
		{{"-w", "5s"}, "", "5s"}, /* a queue named 5s, waiting for ever */
		{{"--wait=2m", "q"}, "2m", "q"},
		{{"-w3s", "q", "-n", "4"}, "3s", "q"},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		struct args a;
		int argc = 0;
		char *argv[6];
		while (argc < 6 && cases[i].argv[argc])
			argv[argc] = (char *)cases[i].argv[argc], argc++;
		memset(&a, 0, sizeof a);
		CHECK(args_parse(&a, get, argc, argv) == 0);
		CHECK(a.npos == 1 && !strcmp(a.pos[0], cases[i].queue));
		CHECK(!strcmp(opt_val(&a, "wait"), cases[i].wait));
		free(a.pos);
	}
	const struct cmd *put = cmd_find("put");
	struct args a;
	char *argv[] = {"-0k", "key", "q", "--", "-not-an-option"};
	memset(&a, 0, sizeof a);
	CHECK(args_parse(&a, put, 5, argv) == 0);
	CHECK(opt_has(&a, "null") && !strcmp(opt_val(&a, "key"), "key"));
	CHECK(a.npos == 2 && !strcmp(a.pos[1], "-not-an-option"));
	free(a.pos);
}

static const struct {
	const char *name;
	void (*fn)(void);
} tests[] = {
	{"option parsing", t_args},
	{"varint and zigzag", t_varint},
	{"queue name validation", t_names},
	{"durations, sizes, times, numbers", t_parse},
	{"settings", t_conf},
	{"codec round trip, crc catches bit flips", t_codec_plain},
	{"codec round trip with zlib", t_codec_zlib},
	{"batch header errors", t_header_errors},
	{"head and two-slot offset files", t_head_and_offsets},
	{"put, read, index seek across segments", t_put_read},
	{"torn tail is cut with one notice", t_torn_tail},
	{"dead writer's tail published, index rebuilt", t_dead_writer},
	{"fdatasync EIO fails and is never retried", t_fsync_eio},
	{"ENOSPC and short writes leave nothing partial", t_write_errors},
	{"corruption: reader stops, repair quarantines", t_corrupt_repair},
	{"seek by time", t_time_seek},
	{"retention and purge", t_retention},
	{"mq.yaml loading and errors", t_config_file},
	{"hostile records: header count, offset delta", t_hostile_record},
	{"stale head: recovery adopts the newest segment", t_stale_head},
	{"a failed flush writes nothing twice", t_failed_flush_no_dup},
};

int main(void)
{
	int passed = 0, failed = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGPIPE, SIG_IGN);
	dur_fault_init();
	for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
		int before = failures;
		fault_clear();
		tests[i].fn();
		int ok = failures == before;
		printf("%s %s\n", ok ? "ok  " : "FAIL", tests[i].name);
		ok ? passed++ : failed++;
	}
	struct mq_err e;
	if (spool_dir[0])
		dur_rmtree(spool_dir, &e);
	cfg_free(&sp.cfg);
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
