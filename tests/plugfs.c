/*
 * plugfs: an in-memory FUSE file system that forgets, on demand, everything
 * that was not made durable -- a power loss you can trigger from a shell.
 * Used by tests/powerloss.bats to check mq's durability promises.
 *
 *   tests/plugfs MOUNTPOINT -f -s -o auto_unmount &
 *   echo plug >MOUNTPOINT/.plugfs      # pull the plug (synchronous)
 *   echo sync >MOUNTPOINT/.plugfs      # make everything durable (sync(2))
 *   cat MOUNTPOINT/.plugfs             # counters, one "name value" a line
 *
 * The crash model (the strictest reasonable POSIX/ext4-like one that a
 * program which says "acknowledged means durable" must survive):
 *
 *  - Every file has a volatile content (what reads see) and a durable
 *    content.  fsync(2) and fdatasync(2) of a file copy its volatile
 *    content, size included, to its durable content: both are treated
 *    alike (fdatasync syncs the size, which is all mq needs of the
 *    metadata).  Nothing else ever makes data durable: no writeback, no
 *    "auto_da_alloc" replace-via-rename heuristics, no journal ordering.
 *
 *  - Every directory has volatile entries (name -> file or directory, what
 *    lookups see) and durable entries.  fsync of the directory (open it
 *    O_RDONLY|O_DIRECTORY and fsync: FUSE's fsyncdir) copies the volatile
 *    entries to the durable ones.  So a create, mkdir, unlink, rmdir or
 *    rename is durable only once the directory that holds the name has
 *    been fsynced afterwards; fsyncing the file itself does NOT make its
 *    name durable.  A rename between two directories touches two
 *    directories, each durable on its own fsync (a power loss in between
 *    can leave the object under both names, or neither).  A directory's
 *    durable entries name objects, not their contents: a durable name of a
 *    file whose data was never synced comes back as an empty file, like a
 *    zero-length file after a crash on ext4.
 *
 *  - Pulling the plug reverts every file and directory to its durable
 *    state at once: unsynced writes, truncates and namespace changes are
 *    dropped entirely (never partly kept: no torn writes), and whatever is
 *    not reachable from the root through durable entries is gone.  The
 *    test must kill every process using the mount (SIGKILL, and wait until
 *    they are gone) before it pulls the plug, as a real power loss would:
 *    a write that lands after the revert would be a write after the
 *    power came back.
 *
 *  - Not modelled: modes, owners and times (kept as they are, never
 *    reverted), hard links and symlinks (refused), xattrs, mmap (every file
 *    is opened direct_io, so the kernel keeps no page cache that could
 *    outlive a revert; mq does not mmap).  flock(2) and POSIX locks are
 *    left to the kernel (no flock/lock operations here, so the kernel
 *    handles them locally on the mount, which is what mq's processes need).
 *
 * The control file "/.plugfs" is not listed by readdir; any write to it
 * runs the commands written ("plug", "sync"; one per line) before the
 * write returns, so once `echo plug >MNT/.plugfs` has exited the revert is
 * complete.  Reading it gives counters.
 *
 * Mount options set in init(): zero entry/attr/negative timeouts and
 * direct_io (the kernel caches nothing that a revert could make stale),
 * hard_remove and nullpath_ok (unlinked open files work through their
 * handle), no writeback cache.  Run single-threaded (-s): there is no
 * locking here.
 *
 * Build: cc -o tests/plugfs tests/plugfs.c $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <fuse.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

#define CTL_NAME "/.plugfs"

struct node;

struct dent {
	char *name;
	struct node *node;
};

struct dents {
	struct dent *v;
	size_t n, cap;
};

struct node {
	int isdir;
	mode_t mode;
	uint64_t ino;
	/* file: volatile and durable content */
	char *data;
	size_t len, cap;
	char *ddata;
	size_t dlen, dcap;
	size_t dirty;              /* data[dirty, len) may differ from ddata */
	/* directory: volatile and durable entries */
	struct dents ents, dents;
	int nopen;                 /* open handles (files and directories) */
	int mark;                  /* reachable, for the collector */
	struct timespec atime, mtime, ctime;
	struct node *next, *prev;  /* every node */
};

static struct node *root, *all;
static uint64_t next_ino = 1;
static struct {
	uint64_t plugs, syncs, fsyncs, fsyncdirs, dropped_bytes, dropped_names, freed;
} stat_;

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (!p)
		abort();
	return p;
}

static char *xstrdup(const char *s)
{
	char *p = strdup(s);
	if (!p)
		abort();
	return p;
}

static void now(struct timespec *t) { clock_gettime(CLOCK_REALTIME, t); }

static struct node *node_new(int isdir, mode_t mode)
{
	struct node *n = calloc(1, sizeof *n);
	if (!n)
		abort();
	n->isdir = isdir;
	n->mode = (isdir ? S_IFDIR : S_IFREG) | (mode & 07777);
	n->ino = next_ino++;
	now(&n->mtime);
	n->atime = n->ctime = n->mtime;
	n->next = all;
	if (all)
		all->prev = n;
	all = n;
	return n;
}

static void dents_clear(struct dents *d)
{
	for (size_t i = 0; i < d->n; i++)
		free(d->v[i].name);
	d->n = 0;
}

static void dents_copy(struct dents *to, const struct dents *from)
{
	dents_clear(to);
	if (to->cap < from->n) {
		to->cap = from->n;
		to->v = xrealloc(to->v, to->cap * sizeof *to->v);
	}
	for (size_t i = 0; i < from->n; i++)
		to->v[i] = (struct dent){xstrdup(from->v[i].name), from->v[i].node};
	to->n = from->n;
}

static struct dent *dents_find(struct dents *d, const char *name)
{
	for (size_t i = 0; i < d->n; i++)
		if (!strcmp(d->v[i].name, name))
			return &d->v[i];
	return NULL;
}

static void dents_add(struct dents *d, const char *name, struct node *n)
{
	if (d->n == d->cap) {
		d->cap = d->cap ? 2 * d->cap : 8;
		d->v = xrealloc(d->v, d->cap * sizeof *d->v);
	}
	d->v[d->n++] = (struct dent){xstrdup(name), n};
}

static void dents_del(struct dents *d, struct dent *e)
{
	free(e->name);
	*e = d->v[--d->n];
}

static void node_free(struct node *n)
{
	if (n->prev)
		n->prev->next = n->next;
	else
		all = n->next;
	if (n->next)
		n->next->prev = n->prev;
	free(n->data);
	free(n->ddata);
	dents_clear(&n->ents);
	dents_clear(&n->dents);
	free(n->ents.v);
	free(n->dents.v);
	free(n);
	stat_.freed++;
}

static void mark(struct node *n)
{
	if (n->mark)
		return;
	n->mark = 1;
	for (size_t i = 0; i < n->ents.n; i++)
		mark(n->ents.v[i].node);
	for (size_t i = 0; i < n->dents.n; i++)
		mark(n->dents.v[i].node);
}

/* Free every node that no name (volatile or durable) reaches from the
 * root or from an open node, and that no handle holds open. */
static void collect(void)
{
	for (struct node *n = all; n; n = n->next)
		n->mark = 0;
	mark(root);
	for (struct node *o = all; o; o = o->next)
		if (o->nopen)
			mark(o); /* and what an open directory still names */
	struct node *n = all, *nx;
	for (; n; n = nx) {
		nx = n->next;
		if (!n->mark && n->nopen == 0)
			node_free(n);
	}
}

static void file_reserve(struct node *n, size_t len)
{
	if (len <= n->cap)
		return;
	size_t c = n->cap ? n->cap : 4096;
	while (c < len)
		c *= 2;
	n->data = xrealloc(n->data, c);
	n->cap = c;
}

static void file_dirty(struct node *n, size_t from)
{
	if (from < n->dirty)
		n->dirty = from;
}

static void file_resize(struct node *n, size_t len)
{
	file_reserve(n, len);
	file_dirty(n, len < n->len ? len : n->len);
	if (len > n->len)
		memset(n->data + n->len, 0, len - n->len);
	n->len = len;
	now(&n->mtime);
	n->ctime = n->mtime;
}

/* Make the volatile content durable: copy what changed since the last
 * sync (data[dirty, len)). */
static void file_sync(struct node *n)
{
	if (n->len > n->dcap) {
		n->dcap = n->cap;
		n->ddata = xrealloc(n->ddata, n->dcap);
	}
	if (n->dirty < n->len)
		memcpy(n->ddata + n->dirty, n->data + n->dirty, n->len - n->dirty);
	n->dlen = n->len;
	n->dirty = n->len;
}

static void sync_all(void)
{
	for (struct node *n = all; n; n = n->next) {
		if (n->isdir)
			dents_copy(&n->dents, &n->ents);
		else
			file_sync(n);
	}
	stat_.syncs++;
}

static void plug(void)
{
	for (struct node *n = all; n; n = n->next) {
		if (n->isdir) {
			for (size_t i = 0; i < n->ents.n; i++) {
				struct dent *d = dents_find(&n->dents, n->ents.v[i].name);
				stat_.dropped_names += !d || d->node != n->ents.v[i].node;
			}
			dents_copy(&n->ents, &n->dents);
		} else {
			if (n->len != n->dlen || n->dirty < n->len)
				stat_.dropped_bytes += n->len > n->dirty ? n->len - n->dirty : 1;
			file_reserve(n, n->dlen);
			if (n->dlen)
				memcpy(n->data, n->ddata, n->dlen);
			n->len = n->dirty = n->dlen;
		}
	}
	stat_.plugs++;
	collect();
}

/* Split path into parent directory node and last name; NULL if a
 * component is missing or not a directory. */
static struct node *lookup(const char *path)
{
	if (!path)
		return NULL;
	struct node *n = root;
	const char *p = path;
	char name[256];
	while (*p) {
		while (*p == '/')
			p++;
		if (!*p)
			break;
		size_t k = strcspn(p, "/");
		if (k >= sizeof name || !n->isdir)
			return NULL;
		memcpy(name, p, k);
		name[k] = 0;
		struct dent *d = dents_find(&n->ents, name);
		if (!d)
			return NULL;
		n = d->node;
		p += k;
	}
	return n;
}

/* Parent of path (which must not be "/") and a pointer to its last name. */
static struct node *parent_of(const char *path, const char **base, int *err)
{
	const char *slash = strrchr(path, '/');
	char dir[4096];
	size_t k = (size_t)(slash - path);
	if (!slash || k >= sizeof dir) {
		*err = -EINVAL;
		return NULL;
	}
	memcpy(dir, path, k);
	dir[k] = 0;
	*base = slash + 1;
	if (strlen(*base) > 255) {
		*err = -ENAMETOOLONG;
		return NULL;
	}
	struct node *p = lookup(k ? dir : "/");
	if (!p)
		*err = -ENOENT;
	else if (!p->isdir)
		*err = -ENOTDIR, p = NULL;
	return p;
}

/* The control file's handle (with nullpath_ok, reads and writes through a
 * handle get no path). */
static char ctl_handle;
#define CTL_FH ((uint64_t)(uintptr_t)&ctl_handle)

static int is_ctl(const char *path) { return path && !strcmp(path, CTL_NAME); }
static int is_ctl_fh(const struct fuse_file_info *fi) { return fi && fi->fh == CTL_FH; }

static struct node *fh_node(const char *path, struct fuse_file_info *fi)
{
	if (fi && fi->fh && !is_ctl_fh(fi))
		return (struct node *)(uintptr_t)fi->fh;
	return lookup(path);
}


static int ctl_text(char *buf, size_t n)
{
	return snprintf(buf, n,
	                "plugs %llu\nsyncs %llu\nfsyncs %llu\nfsyncdirs %llu\n"
	                "dropped_bytes %llu\ndropped_names %llu\nfreed %llu\n",
	                (unsigned long long)stat_.plugs, (unsigned long long)stat_.syncs,
	                (unsigned long long)stat_.fsyncs, (unsigned long long)stat_.fsyncdirs,
	                (unsigned long long)stat_.dropped_bytes,
	                (unsigned long long)stat_.dropped_names, (unsigned long long)stat_.freed);
}

static void *pf_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
	conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
	cfg->entry_timeout = 0;
	cfg->attr_timeout = 0;
	cfg->negative_timeout = 0;
	cfg->direct_io = 1;
	cfg->kernel_cache = 0;
	cfg->auto_cache = 0;
	cfg->hard_remove = 1;
	cfg->nullpath_ok = 1;
	cfg->use_ino = 1;
	return NULL;
}

static int pf_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
	memset(st, 0, sizeof *st);
	if (is_ctl(path) || is_ctl_fh(fi)) {
		char b[512];
		st->st_mode = S_IFREG | 0600;
		st->st_nlink = 1;
		st->st_size = ctl_text(b, sizeof b);
		st->st_ino = (ino_t)-2;
		return 0;
	}
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	st->st_mode = n->mode;
	st->st_nlink = n->isdir ? 2 : 1;
	st->st_ino = n->ino;
	st->st_uid = getuid();
	st->st_gid = getgid();
	st->st_size = n->isdir ? 4096 : (off_t)n->len;
	st->st_blksize = 4096;
	st->st_blocks = (blkcnt_t)((st->st_size + 511) / 512);
	st->st_atim = n->atime;
	st->st_mtim = n->mtime;
	st->st_ctim = n->ctime;
	return 0;
}

static int pf_opendir(const char *path, struct fuse_file_info *fi)
{
	struct node *n = lookup(path);
	if (!n)
		return -ENOENT;
	if (!n->isdir)
		return -ENOTDIR;
	n->nopen++;
	fi->fh = (uintptr_t)n;
	return 0;
}

static int pf_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
	(void)off;
	(void)flags;
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	fill(buf, ".", NULL, 0, 0);
	fill(buf, "..", NULL, 0, 0);
	for (size_t i = 0; i < n->ents.n; i++)
		fill(buf, n->ents.v[i].name, NULL, 0, 0);
	return 0;
}

static int pf_releasedir(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	struct node *n = (struct node *)(uintptr_t)fi->fh;
	if (n && --n->nopen == 0)
		collect();
	return 0;
}

static int pf_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)datasync;
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	dents_copy(&n->dents, &n->ents);
	stat_.fsyncdirs++;
	collect();
	return 0;
}

static int pf_mkdir(const char *path, mode_t mode)
{
	const char *base;
	int err = 0;
	struct node *p = parent_of(path, &base, &err);
	if (!p)
		return err;
	if (dents_find(&p->ents, base))
		return -EEXIST;
	dents_add(&p->ents, base, node_new(1, mode));
	now(&p->mtime);
	return 0;
}

static int pf_rmdir(const char *path)
{
	const char *base;
	int err = 0;
	struct node *p = parent_of(path, &base, &err);
	if (!p)
		return err;
	struct dent *d = dents_find(&p->ents, base);
	if (!d)
		return -ENOENT;
	if (!d->node->isdir)
		return -ENOTDIR;
	if (d->node->ents.n)
		return -ENOTEMPTY;
	dents_del(&p->ents, d);
	now(&p->mtime);
	collect();
	return 0;
}

static int pf_unlink(const char *path)
{
	if (is_ctl(path))
		return -EPERM;
	const char *base;
	int err = 0;
	struct node *p = parent_of(path, &base, &err);
	if (!p)
		return err;
	struct dent *d = dents_find(&p->ents, base);
	if (!d)
		return -ENOENT;
	if (d->node->isdir)
		return -EISDIR;
	dents_del(&p->ents, d);
	now(&p->mtime);
	collect();
	return 0;
}

static int pf_open(const char *path, struct fuse_file_info *fi)
{
	fi->direct_io = 1;
	fi->keep_cache = 0;
	if (is_ctl(path)) {
		fi->fh = CTL_FH;
		return 0;
	}
	struct node *n = lookup(path);
	if (!n)
		return -ENOENT;
	if (n->isdir)
		return -EISDIR;
	if ((fi->flags & O_TRUNC) && (fi->flags & O_ACCMODE) != O_RDONLY)
		file_resize(n, 0);
	n->nopen++;
	fi->fh = (uintptr_t)n;
	return 0;
}

static int pf_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	if (is_ctl(path))
		return pf_open(path, fi);
	const char *base;
	int err = 0;
	struct node *p = parent_of(path, &base, &err);
	if (!p)
		return err;
	struct dent *d = dents_find(&p->ents, base);
	if (d) {
		if (fi->flags & O_EXCL)
			return -EEXIST;
		return pf_open(path, fi);
	}
	struct node *n = node_new(0, mode);
	dents_add(&p->ents, base, n);
	now(&p->mtime);
	fi->direct_io = 1;
	fi->keep_cache = 0;
	n->nopen++;
	fi->fh = (uintptr_t)n;
	return 0;
}

static int pf_read(const char *path, char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
	if (is_ctl_fh(fi)) {
		char b[512];
		int k = ctl_text(b, sizeof b);
		if (off >= k)
			return 0;
		if (size > (size_t)(k - off))
			size = (size_t)(k - off);
		memcpy(buf, b + off, size);
		return (int)size;
	}
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	if (off < 0)
		return -EINVAL;
	if ((size_t)off >= n->len)
		return 0;
	if (size > n->len - (size_t)off)
		size = n->len - (size_t)off;
	memcpy(buf, n->data + off, size);
	return (int)size;
}

static int ctl_write(const char *buf, size_t size)
{
	char cmd[64];
	size_t i = 0;
	while (i < size) {
		size_t k = 0;
		while (i < size && buf[i] != '\n' && k < sizeof cmd - 1)
			cmd[k++] = buf[i++];
		cmd[k] = 0;
		i++;
		if (!strcmp(cmd, "plug"))
			plug();
		else if (!strcmp(cmd, "sync"))
			sync_all();
		else if (k)
			return -EINVAL;
	}
	return (int)size;
}

static int pf_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
	if (is_ctl_fh(fi))
		return ctl_write(buf, size);
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	if (fi && (fi->flags & O_APPEND))
		off = (off_t)n->len; /* the kernel's idea of the size may be stale */
	if (off < 0)
		return -EINVAL;
	size_t end = (size_t)off + size;
	if (end > n->len)
		file_resize(n, end);
	memcpy(n->data + off, buf, size);
	file_dirty(n, (size_t)off);
	now(&n->mtime);
	n->ctime = n->mtime;
	return (int)size;
}

static int pf_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
	if (is_ctl(path) || is_ctl_fh(fi))
		return 0;
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	if (n->isdir)
		return -EISDIR;
	if (size < 0)
		return -EINVAL;
	file_resize(n, (size_t)size);
	return 0;
}

static int pf_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
	(void)datasync;
	if (is_ctl(path) || is_ctl_fh(fi))
		return 0;
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	file_sync(n);
	stat_.fsyncs++;
	return 0;
}

static int pf_release(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	if (is_ctl_fh(fi))
		return 0;
	struct node *n = (struct node *)(uintptr_t)fi->fh;
	if (n && --n->nopen == 0)
		collect();
	return 0;
}

static int within(const char *dir, const char *path)
{
	size_t k = strlen(dir);
	return !strncmp(dir, path, k) && path[k] == '/';
}

static int pf_rename(const char *from, const char *to, unsigned int flags)
{
	if (is_ctl(from) || is_ctl(to))
		return -EPERM;
	if (flags & ~RENAME_NOREPLACE)
		return -EINVAL; /* RENAME_EXCHANGE, RENAME_WHITEOUT: mq uses neither */
	const char *fb, *tb;
	int err = 0;
	struct node *fp = parent_of(from, &fb, &err);
	if (!fp)
		return err;
	struct node *tp = parent_of(to, &tb, &err);
	if (!tp)
		return err;
	struct dent *fd = dents_find(&fp->ents, fb);
	if (!fd)
		return -ENOENT;
	struct node *n = fd->node;
	if (!strcmp(from, to))
		return 0;
	if (n->isdir && within(from, to))
		return -EINVAL;
	struct dent *td = dents_find(&tp->ents, tb);
	if (td) {
		if (flags & RENAME_NOREPLACE)
			return -EEXIST;
		if (td->node == n)
			return 0;
		if (n->isdir && !td->node->isdir)
			return -ENOTDIR;
		if (!n->isdir && td->node->isdir)
			return -EISDIR;
		if (td->node->isdir && td->node->ents.n)
			return -ENOTEMPTY;
		td->node = n;
	} else {
		dents_add(&tp->ents, tb, n);
	}
	fd = dents_find(&fp->ents, fb); /* dents_add may have moved it */
	dents_del(&fp->ents, fd);
	now(&fp->mtime);
	tp->mtime = fp->mtime;
	n->ctime = fp->mtime;
	collect();
	return 0;
}

static int pf_statfs(const char *path, struct statvfs *st)
{
	(void)path;
	memset(st, 0, sizeof *st);
	st->f_bsize = st->f_frsize = 4096;
	st->f_blocks = st->f_bfree = st->f_bavail = 1u << 24; /* 64 GiB */
	st->f_files = st->f_ffree = st->f_favail = 1u << 20;
	st->f_namemax = 255;
	return 0;
}

static int pf_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
	if (is_ctl(path) || is_ctl_fh(fi))
		return 0;
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	struct timespec t;
	now(&t);
	n->atime = tv[0].tv_nsec == UTIME_NOW ? t : tv[0].tv_nsec == UTIME_OMIT ? n->atime : tv[0];
	n->mtime = tv[1].tv_nsec == UTIME_NOW ? t : tv[1].tv_nsec == UTIME_OMIT ? n->mtime : tv[1];
	n->ctime = t;
	return 0;
}

static int pf_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
	if (is_ctl(path) || is_ctl_fh(fi))
		return 0;
	struct node *n = fh_node(path, fi);
	if (!n)
		return -ENOENT;
	n->mode = (n->mode & S_IFMT) | (mode & 07777);
	return 0;
}

static int pf_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
	(void)uid;
	(void)gid;
	return is_ctl(path) || is_ctl_fh(fi) || fh_node(path, fi) ? 0 : -ENOENT;
}

static int pf_flush(const char *path, struct fuse_file_info *fi)
{
	(void)path;
	(void)fi;
	return 0;
}

static const struct fuse_operations ops = {
	.init = pf_init,
	.getattr = pf_getattr,
	.opendir = pf_opendir,
	.readdir = pf_readdir,
	.releasedir = pf_releasedir,
	.fsyncdir = pf_fsyncdir,
	.mkdir = pf_mkdir,
	.rmdir = pf_rmdir,
	.unlink = pf_unlink,
	.open = pf_open,
	.create = pf_create,
	.read = pf_read,
	.write = pf_write,
	.truncate = pf_truncate,
	.fsync = pf_fsync,
	.flush = pf_flush,
	.release = pf_release,
	.rename = pf_rename,
	.statfs = pf_statfs,
	.utimens = pf_utimens,
	.chmod = pf_chmod,
	.chown = pf_chown,
};

int main(int argc, char *argv[])
{
	root = node_new(1, 0755);
	return fuse_main(argc, argv, &ops, NULL);
}
