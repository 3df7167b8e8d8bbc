/*
 * mq.h - the stable surface of mq: on-disk format, limits, exit codes.
 *
 * mq keeps durable queues in a spool directory.  This header is the manual
 * for everything that outlives one process: the bytes in segment, index,
 * head and offset files, the file names, the limits and the exit codes.
 * mq.c encodes every field explicitly (little-endian, no raw structs), so
 * compiler padding or host byte order can never leak into the format.
 *
 * Changing a layout: bump the version constant next to it, keep a reader
 * for the old version in mq.c, add a golden file under tests/data/, and
 * describe the change in man/mq-format.5.
 */
#ifndef MQ_H
#define MQ_H

#include <stdint.h>

#define MQ_VERSION "0.1.0"

/* ---------------------------------------------------------------------
 * Spool layout (all names relative to the spool directory)
 *
 *   mq.yaml                    optional configuration (man/mq.yaml.5)
 *   QUEUE/meta.yaml            settings fixed at creation (partitions ...)
 *   QUEUE/P/                   partition P, P = 0 .. partitions-1
 *   QUEUE/P/lock               flock(LOCK_EX) by the one writer; never deleted
 *   QUEUE/P/head               end of published (durable) data, see below
 *   QUEUE/P/BASE.log           segment: batches, append-only
 *   QUEUE/P/BASE.idx           offset index of that segment (derived)
 *   QUEUE/P/BASE.tix           sparse time index of that segment (derived)
 *   QUEUE/groups/GROUP/P.off   committed offset of GROUP in partition P
 *
 * BASE is the segment's first offset, as MQ_SEG_DIGITS zero-padded decimal
 * digits, so names sort in offset order.  Files whose names start with '.'
 * are temporaries of a create/replace in progress and are ignored.
 * --------------------------------------------------------------------- */
#define MQ_SEG_DIGITS 20
#define MQ_LOG_SUFFIX ".log"
#define MQ_IDX_SUFFIX ".idx"
#define MQ_TIX_SUFFIX ".tix"
#define MQ_QUARANTINE_DIR "quarantine" /* QUEUE/P/quarantine/: cut-out damage */

/* Queue and group names: [A-Za-z0-9][A-Za-z0-9._-]{0,127}. */
#define MQ_NAME_MAX 128

/* ---------------------------------------------------------------------
 * Batch: the unit that is written, checksummed and compressed.
 *
 * A segment is a sequence of batches with nothing between them.  Every
 * integer is little-endian.  Header, MQ_BATCH_HDR bytes:
 *
 *   off size field
 *     0   4  magic        MQ_BATCH_MAGIC ("MQB1" read as bytes)
 *     4   1  version      MQ_BATCH_VERSION
 *     5   1  flags        bit 0: payload is a zlib stream (MQ_BF_ZLIB)
 *     6   2  header len   MQ_BATCH_HDR; a reader skips bytes it does not know
 *     8   4  batch len    bytes of the whole batch, header included
 *    12   4  crc          zlib crc32 of bytes 0..11 followed by 16..len-1,
 *                         i.e. of everything but this field
 *    16   8  base offset  offset of the first message
 *    24   4  count        number of messages, >= 1; offsets are dense:
 *                         base .. base+count-1
 *    28   4  raw len      payload length before compression
 *    32   8  first ts     timestamp of the first message, ms since the epoch
 *    40   8  max ts       largest message timestamp in the batch, ms
 *    48   8  producer id  0 = none (reserved for idempotent producers)
 *    56   4  producer seq 0 = none
 *    60   4  reserved     0
 *    64      payload      count message records (compressed if MQ_BF_ZLIB)
 *
 * The crc is checked before anything is inflated or decoded.  A batch is
 * never longer than MQ_BATCH_MAX; a torn write leaves a tail whose length
 * or crc does not match, which the next opener of the partition cuts off.
 *
 * Message record (inside the payload; varint = LEB128 unsigned, zigzag =
 * signed value z mapped to (z << 1) ^ (z >> 63) then varint):
 *
 *   varint  len          bytes of the rest of this record
 *   varint  offset delta from the batch base offset (== index in batch)
 *   zigzag  ts delta     timestamp minus the batch first ts, ms
 *   varint  key len + 1  0 = no key; then the key bytes
 *   varint  tag len + 1  0 = no tag; then the tag bytes
 *   varint  nheaders     then per header: varint name len, name,
 *                        varint value len, value
 *   bytes   body         the rest of the record
 * --------------------------------------------------------------------- */
#define MQ_BATCH_MAGIC 0x3142514du /* "MQB1" */
#define MQ_BATCH_VERSION 1
#define MQ_BATCH_HDR 64
#define MQ_BF_ZLIB 0x01
#define MQ_BATCH_MAX (64u << 20)   /* hard cap on one batch, bytes */
#define MQ_BATCH_TARGET (256u << 10) /* a writer closes a batch past this */

/* ---------------------------------------------------------------------
 * Offset index BASE.idx: one 8-byte entry per message, entry i for offset
 * BASE+i, so a lookup is one pread (O(1)).
 *
 *   off size field
 *     0   4  batch pos   file position of the batch holding the message
 *     4   4  tag hash    MQ_TAG_HASH of the message's tag, 0 = no tag
 *
 * The index is derived data: it is checked against the log on open and on
 * every lookup (the batch found must hold the offset), rebuilt from the log
 * when it disagrees, and synced only when its segment is sealed.
 * --------------------------------------------------------------------- */
#define MQ_IDX_ENTRY 8

/* ---------------------------------------------------------------------
 * Time index BASE.tix: sparse, one 16-byte entry per MQ_TIX_INTERVAL bytes
 * of log (and for the segment's first batch), in offset order.
 *
 *   off size field
 *     0   8  max ts      running maximum of message timestamps in this
 *                        segment up to and including this batch, ms: at
 *                        least the batch's own max ts, never more than the
 *                        true running maximum, never below the entry before
 *                        (a writer in a new process resumes the maximum
 *                        from the last entry)
 *     8   8  offset      base offset of the batch
 *
 * "Seek to time T": find the last entry whose max ts < T, scan forward
 * from its batch to the first message with timestamp >= T.  Exact when
 * timestamps rise with offsets (one clock); with several producers whose
 * clocks disagree it finds the first message at or after T from there.
 * --------------------------------------------------------------------- */
#define MQ_TIX_ENTRY 16
#define MQ_TIX_INTERVAL 4096

/* ---------------------------------------------------------------------
 * Head file P/head: where published data ends.  Rewritten in place by the
 * writer after each sync (the moment a message is acknowledged); readers
 * read up to it and never past it, so they never see unsynced bytes.
 *
 *   off size field
 *     0   4  magic       MQ_HEAD_MAGIC ("MQH1")
 *     4   4  crc         zlib crc32 of bytes 8..39
 *     8   8  next offset offset the next message will get
 *    16   8  seg base    base offset of the active (last) segment
 *    24   8  seg len     published bytes of the active segment
 *    32   8  time        ms since the epoch of this update
 *
 * A reader that meets a bad crc (a concurrent rewrite) reads again.  The
 * head is fsynced only when a segment is rolled, so after a power loss it
 * names the right active segment but may lag its end; the next opener
 * scans the tail past "seg len" and publishes what survived.
 * --------------------------------------------------------------------- */
#define MQ_HEAD_MAGIC 0x3148514du /* "MQH1" */
#define MQ_HEAD_SIZE 40

/* ---------------------------------------------------------------------
 * Offset file groups/GROUP/P.off: a group's committed offset in partition
 * P, the next offset the group will read.  Two MQ_OFF_SLOT-byte slots
 * written alternately (sequence s goes to slot s % 2), so a torn write can
 * damage only the slot being written and the other still holds the last
 * commit.  A reader takes the valid slot with the higher sequence; no valid
 * slot means offset 0 (redelivery, never a skipped message).
 *
 *   off size field
 *     0   4  magic       MQ_OFF_MAGIC ("MQO1")
 *     4   4  crc         zlib crc32 of bytes 8..31
 *     8   8  sequence    1, 2, 3 ...
 *    16   8  offset      committed offset
 *    24   8  time        ms since the epoch of the commit
 * --------------------------------------------------------------------- */
#define MQ_OFF_MAGIC 0x314f514du /* "MQO1" */
#define MQ_OFF_SLOT 32

/* ---------------------------------------------------------------------
 * Hashes.  MQ_KEY_HASH picks a partition: FNV-1a 32-bit over the key
 * bytes (offset basis 2166136261, prime 16777619), partition = hash % N.
 * It is stable across versions and hosts; changing it would move keys.
 * MQ_TAG_HASH is the same function with 0 mapped to 1 (0 means "no tag").
 * --------------------------------------------------------------------- */
#define MQ_FNV_BASIS 2166136261u
#define MQ_FNV_PRIME 16777619u

/* ---------------------------------------------------------------------
 * Defaults and limits (all overridable in mq.yaml or per queue)
 * --------------------------------------------------------------------- */
#define MQ_DEF_PARTITIONS 1
#define MQ_MAX_PARTITIONS 1024
#define MQ_DEF_SEGMENT_BYTES (64ll << 20)
#define MQ_MIN_SEGMENT_BYTES (4ll << 10)
#define MQ_MAX_SEGMENT_BYTES (1ll << 30) /* batch positions are u32 */
#define MQ_DEF_MAX_MESSAGE (4ll << 20)
#define MQ_MAX_MESSAGE_LIMIT (32ll << 20)
#define MQ_SYNC_EVERY_MS 200          /* fsync=batch: sync at least this often */
#define MQ_SYNC_EVERY_BYTES (8 << 20) /* ... or after this many bytes */
#define MQ_FLUSH_BYTES (2 << 20)      /* a producer buffers at most this much */

/* Exit codes (sysexits), also listed in mq(1) under EXIT STATUS. */
enum mq_exit {
	MQ_EX_OK = 0,
	MQ_EX_EMPTY = 1,        /* nothing to get (empty, or the wait ran out) */
	MQ_EX_USAGE = 64,       /* bad command line, bad name */
	MQ_EX_DATAERR = 65,     /* bad data: corrupt record, oversized message */
	MQ_EX_NOINPUT = 66,     /* no such queue */
	MQ_EX_UNAVAILABLE = 69, /* server unavailable */
	MQ_EX_IOERR = 74,       /* I/O error: full disk, failed fsync */
	MQ_EX_TEMPFAIL = 75     /* try again: locked, busy */
};

#endif /* MQ_H */
