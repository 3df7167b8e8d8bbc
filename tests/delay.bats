#!/usr/bin/env bats
# Delayed messages: put --delay DURATION / --at TIME store messages in the
# queue's timing wheel (QUEUE/delay/, one bucket file per due second and
# partition, see "Delayed messages" in mq.h and "8. Delayed messages" in
# mq.c) until they are due; then whichever get/consume pass or put touches
# the queue moves them into their partitions, crash-safely.
#
# The rules checked:
#  - nothing is delivered before it is due, and it is delivered within
#    about a second after (a due time is rounded up to the second; a
#    waiting get or consume re-checks at least every second);
#  - keys still choose partitions, tags and headers are kept;
#  - a past time or --delay 0 is an ordinary put; bad options exit 64;
#  - due order across buckets is kept within a partition; every message
#    arrives exactly once and the wheel is left without buckets;
#  - a get with nothing due leaves the wheel alone, however much waits;
#  - a kill -9 at any sync, write, open or unlink of a move neither loses
#    nor duplicates a message, and `mq verify` passes afterwards;
#    (also when the resumed move is killed again, or when an ordinary put
#    takes the offsets the interrupted chunk was to get);
#  - a torn bucket append (a put that crashed, never acknowledged) is
#    skipped; the complete batches around it are delivered;
#  - a delayed put killed anywhere stores all of its messages or none,
#    and the next put to the wheel works.
bats_require_minimum_version 1.5.0
load helper

# Under the sanitizer build a process costs much more: fewer of them.
# WAKE_MS: how long after its due second a waiting reader may take.
BIG_N=100000 SPREAD_N=300 ROUND_MSGS=50 WAKE_MS=1700
[ -z "${MQ_ASAN:-}" ] || { BIG_N=20000 SPREAD_N=60 ROUND_MSGS=20 WAKE_MS=2200; }

# The system interpreter starts faster than a pyenv shim.
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

# Bucket files of queue $1 ("SSSSSSSSSSSS.P", sorted), none if no wheel.
buckets() {
	local d="$MQ_SPOOL/$1/delay"
	[ -d "$d" ] || return 0
	find "$d" -mindepth 2 -maxdepth 2 -type f -name '*.*' -printf '%f\n' | sort
}

# Poll until the clock reaches $1 (ms since the epoch).
wait_until_ms() {
	wait_for "[ \$(now_ms) -ge $1 ]" $((($1 - $(now_ms)) / 1000 + 5))
}

# Append `mq get QUEUE -n 0 [ARGS]` output to file $2 until it holds $3
# lines, polling for at most $4 seconds.  Sets FIRST_MS to the time the
# first message arrived.
collect() {
	local q=$1 f=$2 n=$3 limit=$4 end rc
	shift 4
	touch "$f"
	FIRST_MS=
	end=$(($(now_ms) + limit * 1000))
	while [ "$(wc -l <"$f")" -lt "$n" ]; do
		if [ "$(now_ms)" -ge "$end" ]; then
			echo "collect $q: $(wc -l <"$f") of $n messages after ${limit}s" >&2
			return 1
		fi
		rc=0
		"$MQ" get "$q" -n 0 "$@" >>"$f" || rc=$?
		[ "$rc" -eq 0 ] || [ "$rc" -eq 1 ] || { echo "collect $q: get exited $rc" >&2; return 1; }
		[ "$rc" -ne 0 ] || [ -n "$FIRST_MS" ] || FIRST_MS=$(now_ms)
		[ "$rc" -eq 0 ] || sleep 0.05
	done
}

# One line "PARTITION KEY TAG HEADERS BODY" per JSON message on stdin.
json_fields() {
	"$PY" -c 'import json, sys
for l in sys.stdin:
    d = json.loads(l)
    h = ",".join("%s=%s" % kv for kv in sorted(d["headers"].items()))
    print(d["partition"], d["key"] or "-", d["tag"] or "-", h or "-", d["body"])'
}

# The first whole second at least $1 ms from now (a due time with room
# for the puts that follow before it passes).
due_second() { echo $((($(now_ms) + $1 + 999) / 1000)); }

# The hint's due time (ms since the epoch), mq.h "Delayed messages".
hint_due() { le_at "$MQ_SPOOL/$1/delay/next" 8 8; }

@test "delay: --delay holds messages until due, then delivers them within about a second; key, tag and headers kept" {
	mq create q --partitions 4
	mq create ref --partitions 4
	# Where each key goes without a delay.
	mq put ref -k kk plain
	printf 'k%d:r%d\n' 1 1 2 2 3 3 4 4 5 5 6 6 7 7 8 8 | mq put ref -K :
	declare -A part_of
	while read -r p k; do part_of[$k]=$p; done < <(mq peek ref -f '%p %k\n')
	assert_eq "${#part_of[@]}" 9

	t0=$(now_ms)
	mq put q -k kk -t tg -H a=b -H 'c=d e' --delay 2s hello
	printf 'k%d:m%d\n' 1 1 2 2 3 3 4 4 5 5 6 6 7 7 8 8 | mq put q -K : -t t2 --delay 2000ms
	mq put q -p 3 --delay 2s pinned
	t1=$(now_ms)
	# Not delivered (nor visible in a partition) right after the put.
	run -1 mq get q -n 0
	assert_eq "$output" ""
	run -1 mq peek q
	# One bucket per partition used, due at the put time + 2 s rounded up.
	run -0 buckets q
	[ "${#lines[@]}" -ge 1 ]
	for b in "${lines[@]}"; do
		s=${b%%.*}
		s=$((10#$s))
		[ $((s * 1000)) -ge $((t0 + 2000)) ]
		[ $((s * 1000)) -lt $((t1 + 3000)) ]
	done
	parts=$(printf '%s\n' "${lines[@]}" | sed 's/.*\.//' | sort -u | tr '\n' ' ')
	want=$(printf '%s\n' 3 "${part_of[@]}" | sort -u | tr '\n' ' ')
	assert_eq "$parts" "$want"

	collect q "$BATS_TEST_TMPDIR/got" 10 8 -f json
	t2=$(now_ms)
	echo "first after $((FIRST_MS - t0)) ms, all $((t2 - t1)) ms after the last put" >&3
	[ $((FIRST_MS - t0)) -ge 2000 ] # never before due
	[ $((t2 - t1)) -le 4500 ]        # within ~2.5 s after due
	run -1 mq get q -n 0             # exactly once

	expected=$({
		echo "${part_of[kk]} kk tg a=b,c=d e hello"
		for i in 1 2 3 4 5 6 7 8; do echo "${part_of[k$i]} k$i t2 - m$i"; done
		echo "3 - - - pinned"
	} | sort)
	assert_eq "$(json_fields <"$BATS_TEST_TMPDIR/got" | sort)" "$expected"
	assert_eq "$(buckets q)" ""
	run -0 mq verify
}

@test "delay: --at takes epoch seconds and RFC 3339 (rounded up to the second); a later put moves what is due" {
	mq create q
	s=$(due_second 1500)
	mq put q --at "$s" epoch
	mq put q --at "@$s" epoch2
	mq put q --at "$(date -u -d "@$((s + 1))" +%Y-%m-%dT%H:%M:%SZ)" rfc
	mq put q --at "$(TZ=Etc/GMT-2 date -d "@$((s + 1))" +%Y-%m-%dT%H:%M:%S)+02:00" rfc-offset
	mq put q --at "$(date -u -d "@$s" +%Y-%m-%dT%H:%M:%S).250Z" rfc-frac
	mq put q --at "$(date -d "@$((s + 1))" '+%Y-%m-%d %H:%M:%S')" local
	run -1 mq get q -n 0
	run -0 buckets q
	assert_eq "$output" "$(printf '%012d.0\n%012d.0' "$s" $((s + 1)))"
	[ "$(hint_due q)" -eq $((s * 1000)) ]

	# Due: an ordinary put (no consumer at all) moves them.
	wait_until_ms $(((s + 1) * 1000))
	mq put q later
	run -0 mq peek q
	assert_eq "$(printf '%s\n' "${lines[@]}" | sort)" \
		"$(printf '%s\n' epoch epoch2 rfc rfc-offset rfc-frac local later | sort)"
	# Due order across buckets, put order within one.
	assert_eq "$(printf '%s\n' "${lines[@]}" | grep -v later)" \
		"$(printf '%s\n' epoch epoch2 rfc rfc-offset rfc-frac local)"
	assert_eq "$(buckets q)" ""
}

@test "delay: a past --at or --delay 0 is an ordinary put; bad or conflicting options exit 64 and store nothing" {
	mq create p
	mq put p --at 2020-01-01T00:00:00Z old1
	mq put p --at 1000000000 old2
	mq put p --at "$(date -u -d "@$(($(date +%s) - 5))" +%Y-%m-%dT%H:%M:%SZ)" old3
	mq put p --delay 0 now1
	mq put p --delay 0ms now2
	run -0 mq get p -n 0
	assert_eq "$output" "$(printf '%s\n' old1 old2 old3 now1 now2)"
	assert_eq "$(buckets p)" ""
	# An ordinary put has offsets to print.
	run -0 mq put p --print-offsets --delay 0 x
	assert_eq "$output" "0:5"
	run -0 mq put p --print-offsets --at 2020-01-01T00:00:00Z y
	assert_eq "$output" "0:6"
	run -0 mq get p -n 0
	assert_eq "$output" "$(printf '%s\n' x y)"

	future=$(($(date +%s) + 3600))
	run -64 --separate-stderr mq put u --delay 2s --at "$future" x
	[[ "$stderr" == *"--delay and --at exclude each other"* ]]
	run -64 --separate-stderr mq put u --delay soon x
	[[ "$stderr" == *"bad duration 'soon' for --delay"* ]]
	run -64 mq put u --delay -5s x
	run -64 mq put u --delay 5x x
	run -64 mq put u --delay '' x
	run -64 --separate-stderr mq put u --at tomorrow x
	[[ "$stderr" == *"bad time 'tomorrow' for --at"* ]]
	run -64 mq put u --at 2026-13-01T00:00:00Z x
	run -64 mq put u --at 2026-12-32T00:00:00Z x
	run -64 mq put u --at 10m x # a duration is not a time here
	run -64 mq put u --at '' x
	run -64 --separate-stderr mq put u --print-offsets --delay 5s x
	[[ "$stderr" == *"--print-offsets"* ]]
	run -64 mq put u --print-offsets --at "$future" x
	# Nothing was stored: not even the queue exists.
	[ ! -e "$MQ_SPOOL/u" ]
	# The same on an existing queue: no bucket, no message.
	run -64 mq put p --delay soon x
	run -64 mq put p --print-offsets --delay 5s x
	assert_eq "$(buckets p)" ""
	run -1 mq get p -n 0
}

@test "delay: a waiting get -w and consume -w receive a delayed message on their own" {
	mq create q
	mq create c
	d=$BATS_TEST_TMPDIR
	# Nobody else touches the queues: only the waiters can move the messages.
	bg sh -c '"$MQ" get q -w 10s >"$1/get.out"; echo $? >"$1/get.rc"; date +%s%3N >"$1/get.t"' _ "$d"
	bg sh -c '"$MQ" consume -g g -w 10s --max 1 c -- sh -c "cat >\"\$1/con.out\"; date +%s%3N >\"\$1/con.t\"" _ "$1"; echo $? >"$1/con.rc"' _ "$d"
	t0=$(now_ms)
	mq put q --delay 2s for-get
	mq put c --delay 2s for-consume
	t1=$(now_ms)
	sq=$(buckets q) sc=$(buckets c)
	sq=$((10#${sq%%.*})) sc=$((10#${sc%%.*}))
	wait_for "[ -s '$d/get.rc' ] && [ -s '$d/con.rc' ]" 15
	assert_eq "$(cat "$d/get.rc")" 0
	assert_eq "$(cat "$d/get.out")" for-get
	assert_eq "$(cat "$d/con.rc")" 0
	assert_eq "$(cat "$d/con.out")" for-consume
	tg=$(cat "$d/get.t") tc=$(cat "$d/con.t")
	echo "get: $((tg - sq * 1000)) ms, consume: $((tc - sc * 1000)) ms after the due second" >&3
	# Not before due; at most about a second after the due second.
	[ "$tg" -ge $((t0 + 2000)) ] && [ "$tg" -ge $((sq * 1000)) ] && [ "$tg" -le $((sq * 1000 + WAKE_MS)) ]
	[ "$tc" -ge $((t0 + 2000)) ] && [ "$tc" -ge $((sc * 1000)) ] && [ "$tc" -le $((sc * 1000 + WAKE_MS)) ]
	assert_eq "$(buckets q)$(buckets c)" ""
}

@test "delay: many messages over several due seconds arrive exactly once, in due order per partition" {
	mq create one
	mq create three --partitions 3
	s=$(due_second 1500)
	[ -z "${MQ_ASAN:-}" ] || s=$((s + 1))
	# Rounds of puts, each to the bucket due last first: a body is
	# RANK-SEQ, RANK the due order (1 at s, 2 at s+1, 3 at s+2), SEQ the put
	# order, so each partition must deliver them in ascending order.
	seq_no=0
	: >"$BATS_TEST_TMPDIR/all"
	for _ in 1 2 3 4; do
		for rank in 3 1 2; do
			batch=$(seq -f "$rank-%05g" $((seq_no + 1)) $((seq_no + ROUND_MSGS)))
			seq_no=$((seq_no + ROUND_MSGS))
			echo "$batch" >>"$BATS_TEST_TMPDIR/all"
			echo "$batch" | mq put one --at $((s + rank - 1))
			# keys k0..k6 by SEQ
			echo "$batch" | awk -F- '{ printf "k%d:%s\n", $2 % 7, $0 }' |
				mq put three -K : --at $((s + rank - 1))
		done
	done
	total=$((12 * ROUND_MSGS))
	run -0 buckets one
	assert_eq "$output" "$(printf '%012d.0\n' "$s" $((s + 1)) $((s + 2)))"
	run -0 buckets three
	[ "${#lines[@]}" -ge 3 ] && [ "${#lines[@]}" -le 9 ]
	run -1 mq get one
	run -1 mq get three

	collect one "$BATS_TEST_TMPDIR/one" "$total" 10
	collect three "$BATS_TEST_TMPDIR/three" "$total" 10 -f '%p %k %s\n'
	run -1 mq get one -n 0
	run -1 mq get three -n 0

	# One partition: exactly the due order, then the put order.
	assert_eq "$(cat "$BATS_TEST_TMPDIR/one")" "$(sort "$BATS_TEST_TMPDIR/all")"
	# Three partitions: every message once, each in ascending order, each
	# key in one partition.
	assert_eq "$(cut -d' ' -f3 "$BATS_TEST_TMPDIR/three" | sort)" "$(sort "$BATS_TEST_TMPDIR/all")"
	assert_eq "$(cut -d' ' -f3 "$BATS_TEST_TMPDIR/three" | sort | uniq -d)" ""
	for p in 0 1 2; do
		awk -v p="$p" '$1 == p { print $3 }' "$BATS_TEST_TMPDIR/three" | sort -c
	done
	assert_eq "$(cut -d' ' -f1,2 "$BATS_TEST_TMPDIR/three" | sort -u | cut -d' ' -f2 | sort | uniq -d)" ""
	[ "$(cut -d' ' -f1 "$BATS_TEST_TMPDIR/three" | sort -u | wc -l)" -ge 2 ]

	# The wheel is empty: no bucket, no directory left, the hint says "none".
	assert_eq "$(buckets one)$(buckets three)" ""
	assert_eq "$(find "$MQ_SPOOL/one/delay" "$MQ_SPOOL/three/delay" -mindepth 1 -type d)" ""
	assert_eq "$(hint_due one)" 9223372036854775807
	run -0 mq verify
}

@test "delay: with nothing due, a get leaves a large wheel untouched and the waiting messages undelivered" {
	mq create q
	seq -f 'later-%06g' 1 "$BIG_N" | mq put q --delay 1h
	run -0 buckets q
	assert_eq "${#lines[@]}" 1
	for n in $(seq 100 $((100 + SPREAD_N - 1))); do
		mq put q --delay "${n}s" "spread-$n"
	done
	# One bucket per distinct due second: each --delay Ns is a second apart.
	run -0 buckets q
	assert_eq "${#lines[@]}" $((SPREAD_N + 1))
	assert_eq "$(printf '%s\n' "${lines[@]}" | cut -d. -f1 | sort -u | wc -l)" $((SPREAD_N + 1))

	snap() { find "$MQ_SPOOL/q/delay" -printf '%p %s %T@ %C@\n' | sort; }
	before=$(snap)
	mq put q ordinary
	run -0 mq get q
	assert_eq "$output" ordinary
	run -1 mq get q -n 0
	run -0 mq get q -g other -n 0 # a new group: the same one message
	assert_eq "$output" ordinary
	run -0 mq peek q
	assert_eq "$output" ordinary
	# The buckets, their directories and the hint: not written, not moved
	# (by the put, the gets or the peek).
	assert_eq "$(snap)" "$before"
	run -0 mq stat --json q
	assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 1
}

# ----- crashes in the middle of a move -----

# A template spool holding queue q (one partition) with 3 puts of
# 1 KiB messages (~1 MB: several batches, and five chunks of a move) in one
# bucket.  Built before the first test, so it is long due when the crash
# tests run; each round copies it, so no round waits for the clock.
setup_file() {
	local body i s t=$BATS_FILE_TMPDIR/template
	mkdir -p "$t"
	body=$(head -c 1000 /dev/zero | tr '\0' x)
	s=$(due_second 1500)
	echo "$s" >"$t.due"
	: >"$t.expected"
	# Group check exists from the start, so consumption-driven retention
	# keeps everything it has not read, whoever else consumes.
	MQ_SPOOL=$t "$MQ" create q
	MQ_SPOOL=$t "$MQ" get q -g check || [ $? -eq 1 ]
	for i in 1 2 3; do
		seq -f "b$i-%05g" 1 350 >>"$t.expected"
		seq -f "b$i-%05g-$body" 1 350 | MQ_SPOOL=$t "$MQ" put q --at "$s"
	done
}

# The template, checked and due: sets TEMPLATE, EXPECTED (file of message
# ids, in put order) and TOTAL.
crash_template() {
	local s
	TEMPLATE=$BATS_FILE_TMPDIR/template
	EXPECTED=$TEMPLATE.expected
	TOTAL=$(wc -l <"$EXPECTED")
	s=$(cat "$TEMPLATE.due")
	assert_eq "$TOTAL" 1050
	assert_eq "$(MQ_SPOOL=$TEMPLATE buckets q)" "$(printf '%012d.0' "$s")"
	[ "$(stat -c %s "$TEMPLATE/q/delay/"*/*.0)" -gt $((1 << 20)) ]
	wait_until_ms $((s * 1000))
}

# Run the mover under MQ_FAULT=$1 (a get by group "other", whose pass
# moves first) in spool $MQ_SPOOL; sets FRC to its exit status.
faulted_move() {
	FRC=0
	{ MQ_FAULT=$1 "$MQ_FAULT_BIN" get q -g other -n 0 >/dev/null 2>&3; } 3>&2 2>/dev/null || FRC=$?
	[ "$FRC" -eq 0 ] || [ "$FRC" -eq 137 ] || { echo "$1: mq-fault exited $FRC" >&2; return 1; }
}

# What the partition holds now is a prefix of the expected ids.
check_prefix() {
	local n rc=0
	"$MQ" peek q >"$BATS_TEST_TMPDIR/peek" || rc=$?
	[ "$rc" -le 1 ] || { echo "$1: peek exited $rc" >&2; return 1; }
	cut -c1-8 "$BATS_TEST_TMPDIR/peek" | grep '^b' >"$BATS_TEST_TMPDIR/seen" || true
	n=$(wc -l <"$BATS_TEST_TMPDIR/seen")
	PEEKED=$n
	if ! cmp -s "$BATS_TEST_TMPDIR/seen" <(head -n "$n" "$EXPECTED"); then
		echo "$1: the partition holds $n delayed messages that are not a prefix of the input" >&2
		diff <(head -n "$n" "$EXPECTED") "$BATS_TEST_TMPDIR/seen" | head >&2
		return 1
	fi
}

# A clean get by group "check" must give every expected id exactly once
# (plus the lines of file $2, if given), in order; verify passes; no bucket.
check_clean() {
	local what=$1 extra=${2:-}
	"$MQ" get q -g check -n 0 | cut -c1-8 >"$BATS_TEST_TMPDIR/got" ||
		{ echo "$what: the clean get failed" >&2; return 1; }
	local dups
	dups=$(sort "$BATS_TEST_TMPDIR/got" | uniq -d | head -3)
	[ -z "$dups" ] || { echo "$what: duplicates: $dups" >&2; return 1; }
	if ! cmp -s <(sort "$BATS_TEST_TMPDIR/got") <(sort "$EXPECTED" ${extra:+"$extra"}); then
		echo "$what: got $(wc -l <"$BATS_TEST_TMPDIR/got") messages, want $(cat "$EXPECTED" ${extra:+"$extra"} | wc -l)" >&2
		diff <(sort "$EXPECTED" ${extra:+"$extra"}) <(sort "$BATS_TEST_TMPDIR/got") | head -5 >&2
		return 1
	fi
	cmp -s <(grep '^b' "$BATS_TEST_TMPDIR/got") "$EXPECTED" ||
		{ echo "$what: the delayed messages are out of order" >&2; return 1; }
	"$MQ" verify >/dev/null || { echo "$what: mq verify exited $?" >&2; return 1; }
	[ -z "$(buckets q)" ] || { echo "$what: buckets left: $(buckets q)" >&2; return 1; }
}

# Sweep a kill at the N-th call of $1, N = 1, 2, ... until the faulted run
# completes; before the clean check, run hook $2 (if any) after the kill.
# Sets SWEEP_PARTIAL to how many rounds left a partial move.
sweep() {
	local call=$1 hook=${2:-} n partial=0
	for ((n = 1; ; n++)); do
		[ "$n" -le 300 ] || { echo "$call: no run completed after 300 calls" >&2; return 1; }
		rm -rf "$MQ_SPOOL"
		cp -a "$TEMPLATE" "$MQ_SPOOL"
		faulted_move "$call:$n:kill" || return 1
		check_prefix "$call:$n" || return 1
		if [ "$PEEKED" -gt 0 ] && [ "$PEEKED" -lt "$TOTAL" ]; then partial=$((partial + 1)); fi
		[ -z "$hook" ] || "$hook" "$call:$n" || return 1
		check_clean "$call:$n" "${EXTRA:-}" || return 1
		[ "$FRC" -ne 0 ] || break
	done
	echo "$call: $n rounds, $partial left a partial move" >&3
	SWEEP_PARTIAL=$partial
}

@test "delay: kill -9 at every fdatasync, pwrite, open, unlink, fsync, rmdir of a move: no loss, no duplicate" {
	local_only "fault injection (mq-fault) and spool copies under the server"
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	crash_template
	for call in fdatasync pwrite open unlink fsync rmdir; do
		sweep "$call"
		case $call in
		fdatasync | pwrite) [ "$SWEEP_PARTIAL" -ge 3 ] ;; # the kills did land mid-move
		esac
	done
}

# After the first kill, the resumed move is killed again at the same call.
crash_again() {
	local rc=0
	{ MQ_FAULT=$1:kill "$MQ_FAULT_BIN" get q -g other2 -n 0 >/dev/null 2>&3; } 3>&2 2>/dev/null || rc=$?
	[ "$rc" -eq 0 ] || [ "$rc" -eq 137 ] || { echo "$1 again: exited $rc" >&2; return 1; }
	check_prefix "$1 again"
}

# Before anything resumes the move, an ordinary put appends more messages
# than a chunk holds, taking the offsets the interrupted chunk was to get
# (the put then runs the mover itself).
put_between() {
	"$MQ" put q <"$BATS_TEST_TMPDIR/extra" || { echo "$1: the put between exited $?" >&2; return 1; }
}

@test "delay: a move killed again while resuming, or with a put in between, still loses and duplicates nothing" {
	local_only "fault injection (mq-fault) and spool copies under the server"
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	crash_template
	sweep fdatasync crash_again
	[ "$SWEEP_PARTIAL" -ge 3 ]
	seq -f 'e-%05g' 1 600 >"$BATS_TEST_TMPDIR/extra"
	EXTRA=$BATS_TEST_TMPDIR/extra sweep fdatasync put_between
	[ "$SWEEP_PARTIAL" -ge 3 ]
}

@test "delay: a torn bucket append is skipped; the complete batches before and after it are delivered" {
	mq create q1
	mq create q2
	s=$(due_second 1500)
	for q in q1 q2; do
		mq put "$q" --at "$s" a1 a2 a3
		mq put "$q" --at "$s" -t T -H h=1 b1 b2
		f=$MQ_SPOOL/$q/delay/$(printf '%012d/%012d.0' $((s / 1000)) "$s")
		size=$(stat -c %s "$f")
		# A put that crashed mid-append (never acknowledged): its batch torn.
		mq put "$q" --at "$s" "torn-$(head -c 200 /dev/zero | tr '\0' t)"
		truncate -s -7 "$f"
		[ "$(stat -c %s "$f")" -gt "$size" ]
	done
	# A later put appends after the torn bytes.
	mq put q2 --at "$s" -k k d1 d2

	wait_until_ms $((s * 1000))
	run -0 mq get q1 -n 0 -f '%t %h %s\n'
	assert_eq "$output" "$(printf '%s\n' '  a1' '  a2' '  a3' 'T h=1 b1' 'T h=1 b2')"
	run -0 mq get q2 -n 0 -f '%k %s\n'
	assert_eq "$output" "$(printf '%s\n' ' a1' ' a2' ' a3' ' b1' ' b2' 'k d1' 'k d2')"
	run -1 mq get q1 -n 0
	run -1 mq get q2 -n 0
	assert_eq "$(buckets q1)$(buckets q2)" ""
	run -0 mq verify
}

@test "delay: a delayed put killed at any write, sync, open or mkdir stores all of its messages or none; the wheel goes on" {
	local_only "fault injection (mq-fault) in the client, not the server"
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	s=$(due_second 2000)
	[ -z "${MQ_ASAN:-}" ] || s=$((s + 2))
	rounds=0
	# One queue per round, all due at the same second: one wait for all.
	for call in pwrite fdatasync fsync open mkdir; do
		for ((n = 1; ; n++)); do
			[ "$n" -le 50 ] || { echo "$call: no put completed after 50 calls" >&2; return 1; }
			rc=0
			{ MQ_FAULT=$call:$n:kill "$MQ_FAULT_BIN" put "$call-$n" --at "$s" m1 m2 m3 2>&3; } 3>&2 2>/dev/null || rc=$?
			[ "$rc" -eq 0 ] || [ "$rc" -eq 137 ] || { echo "$call:$n: put exited $rc" >&2; return 1; }
			# The next put after the crash works (and is delivered).
			mq put "$call-$n" --at "$s" after
			rounds=$((rounds + 1))
			[ "$rc" -ne 0 ] || break
		done
	done
	[ "$(now_ms)" -lt $((s * 1000)) ] # all were delayed puts
	wait_until_ms $((s * 1000))
	for d in "$MQ_SPOOL"/*/; do
		q=$(basename "$d")
		run -0 mq get "$q" -n 0
		case "$output" in
		"$(printf 'm1\nm2\nm3\nafter')" | after) ;;
		*)
			echo "$q: got [$output]" >&2
			return 1
			;;
		esac
		assert_eq "$(buckets "$q")" ""
	done
	# (a put killed while creating its queue may leave a .new-* directory)
	assert_eq "$(find "$MQ_SPOOL" -mindepth 1 -maxdepth 1 -type d ! -name '.*' | wc -l)" "$rounds"
	run -0 mq verify
}

@test "delay: a due time past what a bucket name holds is a usage error, nothing stored" {
	run -64 --separate-stderr mq put q --at 1000000000000 x
	[[ "$stderr" == *"too far in the future"* ]]
	run -64 --separate-stderr mq put q --delay 99999999999d x
	[ ! -e "$MQ_SPOOL/q/delay" ]
}
