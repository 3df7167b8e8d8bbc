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
 *   QUEUE/groups/GROUP/P.off   GROUP's state in partition P: committed
 *                              offset, leases, retries, running batches
 *   QUEUE/delay/               delayed messages waiting (the timing wheel)
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
 *    48   8  producer id  0 = none; MQ_PRODUCER_DELAY: moved by the delay wheel;
 *                         MQ_PRODUCER_TXN: a transaction's messages
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
 * Offset file groups/GROUP/P.off: group GROUP's state in partition P.
 * Every offset below `committed` is done; every offset from `next` on was
 * never delivered; between the two, the entries name the offsets leased
 * out or waiting for a retry, and an offset no entry names is done.
 *
 * The file holds state records, each starting at a multiple of
 * MQ_OFF_ALIGN.  A reader takes the valid record with the highest
 * sequence; no valid record means committed = next = 0 (redelivery, never
 * a skipped message).  A writer puts the next record after the newest
 * one, or back at position 0 once the file would pass MQ_OFF_WRAP and the
 * record ends before the newest one starts: the newest record is never
 * overwritten, so a torn write leaves it in force.
 *
 *   off size field
 *     0   4  magic       MQ_OFF_MAGIC ("MQO2")
 *     4   4  crc         zlib crc32 of bytes 8..len-1
 *     8   4  len         MQ_OFF_HDR + entries * MQ_OFF_ENTRY
 *    12   4  entries
 *    16   8  sequence    1, 2, 3 ...
 *    24   8  committed   the low watermark: all below is done
 *    32   8  next        the first offset never delivered
 *    40   8  time        ms since the epoch of the write
 *    48   4  lease id    the last lease id handed out (receipts name it)
 *    52  12  reserved    zero
 *    64      entries, by offset, not overlapping, inside [committed, next):
 *     +0   8  first       first offset of the run
 *     +8   4  count       messages in the run (> 0)
 *    +12   2  attempt     leased: this delivery's attempt (1 = first);
 *                         waiting: the attempt the retry will be
 *    +14   2  kind        MQ_OFF_LEASED, MQ_OFF_WAITING or MQ_OFF_RUNNING
 *    +16   8  until       ms since the epoch: lease expiry, or retry due
 *    +24   4  lease id    of the lease (leased)
 *    +28   4  why         the last failure: MQ_WHY_* | detail << 8 (exit
 *                         status or signal number)
 * --------------------------------------------------------------------- */
#define MQ_OFF_MAGIC 0x324f514du /* "MQO2" */
#define MQ_OFF_HDR 64
#define MQ_OFF_ENTRY 32
#define MQ_OFF_ALIGN 64
#define MQ_OFF_WRAP (64 << 10)
#define MQ_OFF_FILE_MAX (64 << 20) /* a larger file is refused as damaged */
#define MQ_OFF_LEASED 1
#define MQ_OFF_WAITING 2
#define MQ_OFF_RUNNING 3 /* taken by the consumer holding the group's lock on
                          * the partition (consume --parallel); whoever gets
                          * the lock next finds it dead: due again, attempt + 1 */
#define MQ_WHY_EXIT 1    /* the command exited non-zero */
#define MQ_WHY_SIGNAL 2  /* the command was killed by a signal */
#define MQ_WHY_TIMEOUT 3 /* the command ran past --timeout */
#define MQ_WHY_NACK 4    /* mq nack */
#define MQ_WHY_EXPIRED 5 /* the lease expired without an ack */

/* ---------------------------------------------------------------------
 * Delayed messages: QUEUE/delay/ (the timing wheel).
 *
 *   delay/lock                     flock: one mover or delayed put at a time
 *   delay/next                     hint: the earliest due time waiting
 *   delay/moving                   the move intent, two slots
 *   delay/KKKKKKKKKKKK/SSSSSSSSSSSS.P
 *                                  bucket: messages for partition P due at
 *                                  second S (K = S / 1000), 12 digits each
 *
 * A bucket holds batches in the record format (base offset 0), appended
 * under the lock; a message is due at the bucket's second, which is its
 * requested time rounded up.  The hint (MQ_DELAY_HINT bytes):
 *     0   4  magic   MQ_DELAY_MAGIC
 *     4   4  crc     zlib crc32 of bytes 8..15
 *     8   8  due     ms since the epoch (INT64_MAX: nothing waits)
 * It is lowered (and synced) before a bucket is written, so it is never
 * later than the earliest bucket; unreadable means "look".  An intent slot
 * (MQ_DELAY_INTENT bytes, slot seq % 2; the valid one with the higher
 * sequence counts), written and synced before each chunk is appended:
 *     0   4  magic   MQ_DELAY_MAGIC
 *     4   4  crc     zlib crc32 of bytes 8..63
 *     8   8  seq     1, 2, 3 ...; its low 32 bits are the producer seq of
 *                    the chunk's batches (producer id MQ_PRODUCER_DELAY)
 *    16   8  second  the bucket
 *    24   4  part    the bucket's partition
 *    28   4  count   messages in the chunk
 *    32   8  from    the chunk is bucket bytes [from, to)
 *    40   8  to
 *    48   8  at      the partition offset of the chunk's first message
 * After a crash, the chunk landed iff offset at + count - 1 exists in a
 * batch stamped with seq; the move resumes at `to` if so, else at `from`.
 * --------------------------------------------------------------------- */
#define MQ_DELAY_DIR "delay"
#define MQ_DELAY_NEXT "next"
#define MQ_DELAY_MOVING "moving"
#define MQ_DELAY_MAGIC 0x3144514du /* "MQD1" */
#define MQ_DELAY_HINT 16
#define MQ_DELAY_INTENT 64
#define MQ_DELAY_DIGITS 12
#define MQ_PRODUCER_DELAY 1 /* producer id of batches the delay mover writes */

/* ---------------------------------------------------------------------
 * Transactions (half messages): QUEUE/txn/.
 *
 *   txn/lock                       flock: appends to and rotation of `done`
 *   txn/HHHHHHHHHHHHHHHH           one open transaction (16 hex digits: ms
 *                                  since the epoch << 16 | 16 random bits);
 *                                  its id is QUEUE:HHHHHHHHHHHHHHHH
 *   txn/pipe:SRC:GROUP:P           the step in flight of `mq pipe SRC` for
 *                                  GROUP's partition P (one file, reused)
 *   txn/done, txn/done.old         outcomes of finished transactions
 *
 * A transaction file is two state slots of MQ_TXN_SLOT(N) bytes each (N =
 * the queue's partitions) followed, from byte 2 * MQ_TXN_SLOT(N), by the
 * messages: batches in the record format with base offset 0, producer id
 * MQ_PRODUCER_TXN and producer seq = the target partition.  A pipe writes
 * each step's messages after the last step's, so the messages a decided
 * step names are never overwritten before the step is finished for sure.  Whoever
 * changes a transaction holds an exclusive flock on its file.  A slot
 * (little-endian; the valid one with the higher seq counts):
 *     0   4  magic     MQ_TXN_MAGIC
 *     4   4  crc       zlib crc32 of bytes 8..slot end
 *     8   8  seq       1, 2, 3 ...; slot seq % 2 is written
 *    16   4  state     MQ_TXN_OPEN, _COMMITTING, _COMMITTED, _ROLLEDBACK
 *    20   4  checks    check-backs run so far
 *    24   8  created   ms since the epoch
 *    32   8  data end  the messages are file bytes [data start, data end)
 *    40   4  tag       producer seq stamped on the batches the commit
 *                      appends (producer id MQ_PRODUCER_TXN): crc32 of the
 *                      file name xor (seq + 1) * 2654435761, seq before
 *                      the decision, so two commits' tags differ
 *    44   4  parts     N
 *    48   4  flags     1: a pipe step
 *    52   4  src part  pipe: the source partition
 *    56   8  src lo    pipe: source offsets [lo, hi) this step consumed
 *    64   8  src hi
 *    72   8  decided   ms since the epoch of the commit (its timestamp)
 *    80   8  data start
 *    88   8  reserved  0
 *    96 8*N  at        per partition: its next offset when the commit was
 *                      decided, or all ones if nothing goes there
 * A file without a valid slot is a put --txn that died before its slot
 * was written (no id was printed): `mq txn check` removes it.
 *
 * Commit: lock the file, then the target partitions in ascending order;
 * roll a segment that would not hold the messages; write the slot
 * COMMITTING with `at` (synced: this is the decision); append the
 * messages to each partition without rolling, sync, publish; then append
 * the outcome to `done` and remove the file.  A partition's recovery cuts
 * unpublished batches of producer id MQ_PRODUCER_TXN, so a partition
 * shows a commit's messages all at once or not at all.  After a crash a
 * COMMITTING transaction is finished by whoever touches it next: in each
 * partition the messages of batches stamped with `tag` from offset `at`
 * on have landed, and the rest are appended, so none is lost or doubled.
 * Rollback writes ROLLEDBACK (synced), then `done`, then removes the file.
 *
 * `done` holds MQ_TXN_DONE_REC-byte records, rotated to done.old past
 * MQ_TXN_DONE_MAX bytes, so a finished id is known for a while after:
 *     0   4  magic     MQ_TXN_MAGIC
 *     4   4  crc       zlib crc32 of bytes 8..31
 *     8   8  id        the 16 hex digits as a number
 *    16   4  state     MQ_TXN_COMMITTED or MQ_TXN_ROLLEDBACK
 *    20   4  reserved  0
 *    24   8  when      ms since the epoch
 * --------------------------------------------------------------------- */
#define MQ_TXN_DIR "txn"
#define MQ_TXN_DONE "done"
#define MQ_TXN_MAGIC 0x3154514du /* "MQT1" */
#define MQ_TXN_SLOT_HDR 96
#define MQ_TXN_SLOT(n) ((MQ_TXN_SLOT_HDR + 8 * (n) + 63) / 64 * 64)
#define MQ_TXN_OPEN 1
#define MQ_TXN_COMMITTING 2
#define MQ_TXN_COMMITTED 3
#define MQ_TXN_ROLLEDBACK 4
#define MQ_TXN_DONE_REC 32
#define MQ_TXN_DONE_MAX (1 << 20)
#define MQ_PRODUCER_TXN 2 /* producer id of transactional batches */
#define MQ_TXN_MAX_BYTES (512u << 20) /* messages of one transaction, bytes */
#define MQ_DEF_TXN_CHECK_AFTER_MS 60000 /* txn check: transactions older than this */
#define MQ_DEF_TXN_MAX_CHECKS 15        /* ... rolled back after this many checks */

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
#define MQ_DEF_RETRIES 16             /* retries before a message is dead */
#define MQ_DEF_BACKOFF "10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h"
#define MQ_BACKOFF_MAX 32             /* delays in a backoff list */
#define MQ_DEF_DEDUPE_MS (120 * 1000) /* put --id: duplicates within this */
#define MQ_DLQ_SUFFIX ".dlq"          /* dead letters of Q go to Q.dlq */
#define MQ_ID_HEADER "mq-id"          /* put --id: the header holding the id */
#define MQ_SYNC_EVERY_MS 200          /* fsync=batch: sync at least this often */
#define MQ_SYNC_EVERY_BYTES (8 << 20) /* ... or after this many bytes */
#define MQ_FLUSH_BYTES (2 << 20)      /* a producer buffers at most this much */

/* ---------------------------------------------------------------------
 * Wire protocol of mq serve (man/mq-protocol.7)
 *
 * Text lines with length-prefixed bodies.  HELLO answers
 * "OK mq MQ_PROTO_VERSION MQ_VERSION"; a later version adds verbs and
 * options, never changes the meaning of existing ones.
 * --------------------------------------------------------------------- */
#define MQ_PROTO_VERSION 1
#define MQ_DEFAULT_PORT "7411"        /* mq serve listens on 127.0.0.1:7411 */
#define MQ_NAMESRV_PORT "7412"        /* mq nameserver listens on 127.0.0.1:7412 */
#define MQ_LINE_MAX 65536             /* longest request or frame-header line */
#define MQ_ANSWER_MAX (4u << 20)      /* a GET or PEEK answer stops growing here */
#define MQ_ANSWER_MSGS 10000          /* ... or at this many messages */
#define MQ_REMOTE_LEASE_MS 60000      /* get -s: lease held until written out */
#define MQ_REMOTE_MSG_MAX (64u << 20) /* put -s: longest line the client buffers */

/* Exit codes (sysexits), also listed in mq(1) under EXIT STATUS. */
enum mq_exit {
	MQ_EX_OK = 0,
	MQ_EX_EMPTY = 1,        /* nothing to get (empty, or the wait ran out) */
	MQ_EX_USAGE = 64,       /* bad command line, bad name */
	MQ_EX_DATAERR = 65,     /* bad data: corrupt record, oversized message */
	MQ_EX_NOINPUT = 66,     /* no such queue */
	MQ_EX_UNAVAILABLE = 69, /* server unavailable */
	MQ_EX_IOERR = 74,       /* I/O error: full disk, failed fsync */
	MQ_EX_TEMPFAIL = 75,    /* try again: locked, busy */
	MQ_EX_NOPERM = 77       /* the server wants a token, or this one may not */
};

#endif /* MQ_H */
