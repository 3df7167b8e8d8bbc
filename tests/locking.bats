#!/usr/bin/env bats
# Concurrency through flock(2) (DESIGN.md §2, §5): competing consumers of
# one group each get a message exactly once, whatever the partitions; and
# concurrent writers of one partition never interleave inside a batch nor
# reorder their own messages.
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

# Messages for the competing consumers: 2000, one mq process per message.
# Under the sanitizer build (MQ_ASAN=1, `make bats-asan`) a process costs
# ~20 ms, so there 400 keep the file within its time budget; the same
# locking paths run, and the full count runs on the normal build.
NMSG=2000
[ -z "${MQ_ASAN:-}" ] || NMSG=400

# 8 processes, each looping `mq get -g G -n 1` until it exits 1 (nothing
# left), appending to its own file; then every message exactly once.
competing_consumers() {
	local t=$BATS_TEST_TMPDIR k pids=() end=$((SECONDS + 45))
	for k in 1 2 3 4 5 6 7 8; do
		(
			while [ "$SECONDS" -lt "$end" ]; do
				rc=0
				"$MQ" get q -g G -n 1 >>"$t/got.$k" 2>>"$t/err.$k" || rc=$?
				[ "$rc" = 0 ] || break
			done
			echo "${rc:-timeout}" >"$t/rc.$k"
		) >/dev/null 2>&1 &
		pids+=("$!")
	done
	BG_PIDS+=("${pids[@]}")
	wait "${pids[@]}" # each loop ends by itself, by the deadline at the latest
	# Each loop ended on "nothing to get" (1), not on an error.
	for k in 1 2 3 4 5 6 7 8; do
		if [ "$(cat "$t/rc.$k")" != 1 ] || [ -s "$t/err.$k" ]; then
			echo "consumer $k: exit $(cat "$t/rc.$k"): $(cat "$t/err.$k")"
			return 1
		fi
	done
	cat "$t"/got.* >"$t/all"
	echo "per consumer: $(wc -l "$t"/got.* | head -n 8 | awk '{ printf "%s ", $1 }')"
	run -0 bash -c "sort '$t/all' | uniq -d"
	assert_eq "$output" ""
	run -0 diff <(sort -n "$t/all") <(seq 1 "$NMSG")
	# More than one consumer got work (they really competed).
	[ "$(for f in "$t"/got.*; do [ -s "$f" ] && echo; done | wc -l)" -ge 2 ]
	run -1 mq get q -g G
}

@test "locking: 8 competing consumers of one group on 1 partition get every message exactly once (2000; 400 under ASan)" {
	mq create q
	seq 1 "$NMSG" | mq put q
	competing_consumers
}

@test "locking: 8 competing consumers of one group on 4 partitions get every message exactly once (2000; 400 under ASan)" {
	mq create q --partitions 4
	seq 1 "$NMSG" | awk '{ print $1 ":" $1 }' | mq put q -K :
	for p in 0 1 2 3; do
		[ "$(mq peek q -p $p | wc -l)" -gt 0 ] # the keys spread over all 4
	done
	competing_consumers
}

# 4 writers of 5000 lines each at once; within a partition each writer's
# lines keep their order, nothing lost, nothing doubled.
concurrent_writers() {
	local t=$BATS_TEST_TMPDIR w pids=()
	for w in a b c d; do
		seq -f "$w-%g" 1 5000 | "$MQ" put q >"$t/put.$w" 2>&1 &
		pids+=("$!")
	done
	BG_PIDS+=("${pids[@]}")
	for w in "${pids[@]}"; do
		wait "$w"
	done
	local p n=$1
	: >"$t/all"
	for p in $(seq 0 $((n - 1))); do
		rc=0
		"$MQ" peek q -p "$p" >"$t/p$p" || rc=$?
		[ "$rc" = 0 ] || { [ "$rc" = 1 ] && [ ! -s "$t/p$p" ]; } # 1: an empty partition
		cat "$t/p$p" >>"$t/all"
		# Order: each writer's numbers increase within the partition.
		run -0 awk -F- '$2 + 0 <= last[$1] { print "partition '"$p"': " $0 " after " $1 "-" last[$1]; exit 1 } { last[$1] = $2 + 0 }' "$t/p$p"
	done
	assert_eq "$(wc -l <"$t/all")" 20000
	run -0 bash -c "sort '$t/all' | uniq -d"
	assert_eq "$output" ""
	run -0 diff <(sort "$t/all") <(for w in a b c d; do seq -f "$w-%g" 1 5000; done | sort)
	run -0 mq verify
}

@test "locking: 4 concurrent writers of 5000 lines to 1 partition: 20000, each writer in order" {
	mq create q
	concurrent_writers 1
}

@test "locking: 4 concurrent writers of 5000 lines to 4 partitions: 20000, each writer in order per partition" {
	mq create q --partitions 4
	concurrent_writers 4
}

# Hold lock file $1 (flock, as mq does) in a background subshell until $2
# exists, 30 s at most.  Its output goes nowhere, so a straggler can never
# keep bats waiting.
hold_lock() {
	(
		exec 9>>"$1"
		flock -x 9
		touch "$2.held"
		end=$((SECONDS + 30))
		while [ ! -e "$2" ] && [ "$SECONDS" -lt "$end" ]; do sleep 0.02; done
	) >/dev/null 2>&1 &
	BG_PIDS+=("$!")
	wait_for "[ -e '$2.held' ]"
}

@test "locking: a consumer of a group waits while another holds its partition; other groups do not" {
	mq create q
	seq 1 100 | mq put q
	run -0 mq get q -g G
	assert_eq "$output" "1"
	hold_lock "$MQ_SPOOL/q/groups/G/0.off" "$BATS_TEST_TMPDIR/release"
	"$MQ" get q -g G >"$BATS_TEST_TMPDIR/waiting" &
	local pid=$!
	BG_PIDS+=("$pid")
	# Another group is not held up, and the waiting get is still waiting.
	run -0 mq get q -g other -n 3
	assert_eq "$output" "$(seq 1 3)"
	kill -0 "$pid"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/waiting")" ""
	touch "$BATS_TEST_TMPDIR/release"
	wait "$pid"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/waiting")" "2"
	run -0 mq get q -g G
	assert_eq "$output" "3"
}

@test "locking: a writer waits for the partition lock; readers take no lock and are never blocked" {
	mq create q
	seq 1 10 | mq put q
	hold_lock "$(part_dir q)/lock" "$BATS_TEST_TMPDIR/release"
	"$MQ" put q --print-offsets 11 >"$BATS_TEST_TMPDIR/put" &
	local pid=$!
	BG_PIDS+=("$pid")
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 10)"
	run -0 mq get q -g g -n 10
	assert_eq "$output" "$(seq 1 10)"
	kill -0 "$pid"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/put")" ""
	touch "$BATS_TEST_TMPDIR/release"
	wait "$pid"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/put")" "0:10"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 11)"
}
