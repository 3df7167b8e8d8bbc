#!/usr/bin/env bats
# mq pipe: exactly-once queue-to-queue through a filter.

load helper

# SRC with $1 keyed messages over 2 partitions, and what each partition
# holds saved in $BATS_TEST_TMPDIR/src.P (consumption-driven retention may
# remove them from SRC once piped).
fill_src() {
	mq create --partitions 2 src
	mq create --partitions 2 dst
	seq 1 "$1" | sed 's/.*/k&:m&/' | mq put -K: src
	mq peek src -p 0 >"$BATS_TEST_TMPDIR/src.0"
	mq peek src -p 1 >"$BATS_TEST_TMPDIR/src.1"
}

# DST holds exactly one output per source message, in order per partition.
assert_piped() {
	local p
	for p in 0 1; do
		mq peek dst -p "$p" >"$BATS_TEST_TMPDIR/dst.$p" || true
		cmp "$BATS_TEST_TMPDIR/src.$p" "$BATS_TEST_TMPDIR/dst.$p" || {
			diff "$BATS_TEST_TMPDIR/src.$p" "$BATS_TEST_TMPDIR/dst.$p" | head -20 >&2
			return 1
		}
	done
}

@test "pipe: each batch goes through the filter once; output lines land in DEST, in order, and the group's offsets follow" {
	mq put src a b c d e
	run -0 mq pipe src dst -g up --batch 2 -- tr a-z A-Z
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' A B C D E)"
	run -0 mq groups src
	[[ "$output" == *"up "*" 0 "*"0:5"* ]]
	# a second run finds nothing new and writes nothing
	run -0 mq pipe src dst -g up -- tr a-z A-Z
	run -0 mq stat dst
	[[ "$output" == *"messages    5"* ]]
	# the filter may drop or multiply lines; the batch is still done once
	mq put src x y
	run -0 mq pipe src dst -g up --batch 10 -- sh -c 'while read -r l; do echo "$l-1"; echo "$l-2"; done'
	run -0 mq peek dst --from 5
	assert_eq "$output" "$(printf '%s\n' x-1 x-2 y-1 y-2)"
	mq put src z
	run -0 mq pipe src dst -g up -- sed /z/d
	run -0 mq stat dst
	[[ "$output" == *"messages    9"* ]]
	run -1 mq get src -g up
}

@test "pipe: the filter gets each batch's metadata in MQ_* variables" {
	mq put src a b c
	run -0 mq pipe src dst -g g --batch 2 -- sh -c 'cat >/dev/null; echo "$MQ_QUEUE $MQ_PARTITION $MQ_OFFSET $MQ_COUNT"'
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' 'src 0 0 2' 'src 0 2 1')"
}

@test "pipe: a failing filter stops the pipe (75) with nothing of its batch written; the next run does it" {
	mq put src a b c d
	run -75 --separate-stderr mq pipe src dst -g g --batch 2 -- sh -c 'read -r l; [ "$l" != c ] || exit 3; echo "$l"; cat'
	[[ "$stderr" == *"offsets 2-3"*"exit status 3"*"nothing of that batch went to dst"* ]]
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b)"
	run -0 mq pipe src dst -g g --batch 2 -- cat
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b c d)"
	# a filter that cannot be run at all is a failure too
	mq put src e
	run -75 --separate-stderr mq pipe src dst -g g -- /nonexistent/filter
	[[ "$stderr" == *"cannot run '/nonexistent/filter'"* ]]
	run -0 mq stat dst
	[[ "$output" == *"messages    4"* ]]
}

@test "pipe: an output line over DEST's max-message-bytes fails the batch (65), nothing written" {
	mq create --max-message-bytes 10 dst
	mq put src short longer-than-ten
	run -65 --separate-stderr mq pipe src dst -g g --batch 1 -- cat
	[[ "$stderr" == *"over dst's maximum of 10"* ]]
	run -0 mq peek dst
	assert_eq "$output" short
}

@test "pipe: bad usage is 64, a missing source 66; DEST is created" {
	run -64 mq pipe src src -g g -- cat
	run -64 mq pipe src dst -- cat
	run -64 mq pipe src dst -g ../x -- cat
	run -64 mq pipe src ../x -g g -- cat
	run -64 mq pipe src dst -g g --batch 0 -- cat
	run -66 mq pipe nope dst -g g -- cat
	mq put src a
	run -0 mq pipe src newdst -g g -- cat
	run -0 mq peek newdst
	assert_eq "$output" a
}

@test "pipe: -w waits for new source messages" {
	mq put src a
	bg "$MQ" pipe src dst -g g -w -- cat
	wait_for '[ "$(mq peek dst)" = a ]'
	mq put src b
	wait_for '[ "$(mq peek dst | tail -n 1)" = b ]'
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b)"
}

@test "pipe: killed with SIGKILL 100 times at random instants, DEST still gets exactly one output per message, in order per partition" {
	mq create --partitions 2 src
	mq create --partitions 2 dst
	local i p decided=0 d=$BATS_TEST_TMPDIR
	for ((i = 0; i < 100; i++)); do
		# a backlog for each round; -w keeps the pipe running when it is
		# drained, so every kill hits a live pipe, busy or waiting
		for p in 0 1; do
			seq -f "p$p-r$i-%g" 1 150 | tee -a "$d/src.$p" | mq put -p "$p" src
		done
		"$MQ" pipe src dst -g g --batch 10 -w -- cat &
		sleep "0.0$((RANDOM % 50 + 10))"
		kill -9 $!
		wait $! 2>/dev/null || true
		! mq txn ls dst | grep -q ' pipe$' || decided=$((decided + 1))
	done
	echo "$decided of 100 kills came after a step's decision" >&3
	run -0 mq pipe src dst -g g --batch 100 -- cat
	assert_piped
	run -1 mq get src -g g
	run -0 mq verify
	run -0 mq txn ls
	assert_eq "$output" ""
}

@test "pipe: killed at each write, sync, rename, open and truncate of a step, the next run finishes it exactly once" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	fill_src 40
	local call n rc
	for call in pwrite fdatasync fsync rename open ftruncate unlink; do
		for ((n = 1; n <= 12; n++)); do
			rc=0
			{ MQ_FAULT=$call:$n:kill "$MQ_FAULT_BIN" pipe src dst -g g --batch 3 --max 6 -- cat 2>&3; } 3>&2 2>/dev/null || rc=$?
			[ "$rc" -eq 0 ] || [ "$rc" -eq 137 ] || { echo "$call:$n: pipe exited $rc" >&2; return 1; }
		done
	done
	run -0 mq pipe src dst -g g -- cat
	assert_piped
	run -0 mq verify
}
