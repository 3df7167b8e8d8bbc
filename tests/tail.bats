#!/usr/bin/env bats
# mq tail: the last messages, and -F following new ones.
bats_require_minimum_version 1.5.0
load helper

# Start `mq tail -F ARGS...` in the background writing to $BATS_TEST_TMPDIR/out;
# its pid is in $TAIL_PID.
start_tail() {
	: >"$BATS_TEST_TMPDIR/out"
	"$MQ" tail -F "$@" >"$BATS_TEST_TMPDIR/out" &
	TAIL_PID=$!
	BG_PIDS+=("$TAIL_PID")
}

# The tail's output equals $1 (waits for it).
tail_shows() {
	wait_for "[ \"\$(cat '$BATS_TEST_TMPDIR/out')\" = '$1' ]" 10 || {
		echo "tail output:" >&2
		cat "$BATS_TEST_TMPDIR/out" >&2
		return 1
	}
}

# Stop the tail with signal $1 and check that it exits 0.
stop_tail() {
	kill "-$1" "$TAIL_PID"
	local rc=0
	wait "$TAIL_PID" || rc=$?
	assert_eq "$rc" 0
}

@test "tail -n 3: the last three messages" {
	seq 20 | mq put q
	run -0 --separate-stderr mq tail -n 3 q
	assert_eq "$output" "$(seq 18 20)"
	assert_eq "$stderr" ""
	run -0 mq tail --count 1 q
	assert_eq "$output" 20
	run -0 mq tail -n 100 q
	assert_eq "$output" "$(seq 20)"
}

@test "tail: ten messages by default" {
	seq 25 | mq put q
	run -0 mq tail q
	assert_eq "$output" "$(seq 16 25)"
}

@test "tail: consumes nothing" {
	seq 5 | mq put q
	mq tail -n 2 q
	run -0 mq get q -n 0
	assert_eq "$output" "$(seq 5)"
}

@test "tail -n: per partition; -p picks one" {
	mq create q --partitions 2
	seq 10 | mq put q -p 0
	seq 101 110 | mq put q -p 1
	run -0 mq tail -n 2 q -f '%p:%s\n'
	assert_eq "$(sort <<<"$output")" "$(printf '0:10\n0:9\n1:109\n1:110')"
	run -0 mq tail -n 2 -p 1 q
	assert_eq "$output" "$(printf '109\n110')"
	run -64 mq tail -p 2 q
}

@test "tail: an empty queue prints nothing; a missing one is 66" {
	mq create q
	run -0 mq tail q
	assert_eq "$output" ""
	run -66 --separate-stderr mq tail nosuch
	[[ "$stderr" == "mq: tail: nosuch: "* ]]
}

@test "tail -F: prints the last messages, then follows new puts; SIGTERM exits 0" {
	seq 12 | mq put q
	start_tail q
	tail_shows "$(seq 3 12)"
	mq put q new1
	tail_shows "$(seq 3 12; echo new1)"
	seq 3 | mq put q
	mq put q last
	tail_shows "$(seq 3 12; echo new1; seq 3; echo last)"
	stop_tail TERM
}

@test "tail -F: SIGINT also exits 0" {
	mq create q
	start_tail q
	wait_waiting "$TAIL_PID"
	mq put q only
	tail_shows only
	stop_tail INT
}

@test "tail -F -n 0: only messages put after it started" {
	seq 5 | mq put q
	start_tail -n 0 q
	wait_waiting "$TAIL_PID"
	mq put q fresh
	tail_shows fresh
	stop_tail TERM
}

@test "tail -F: follows every partition and keeps per-partition order" {
	mq create q --partitions 3
	start_tail -n 0 -f '%p %s\n' q
	wait_waiting "$TAIL_PID"
	local p
	for p in 0 1 2; do
		seq 50 | mq put q -p "$p"
	done
	wait_for "[ \$(wc -l <'$BATS_TEST_TMPDIR/out') -ge 150 ]" 10
	for p in 0 1 2; do
		assert_eq "$(grep "^$p " "$BATS_TEST_TMPDIR/out" | cut -d' ' -f2)" "$(seq 50)"
	done
	stop_tail TERM
	[ "$(wc -l <"$BATS_TEST_TMPDIR/out")" -eq 150 ]
}

@test "tail -F: follows a long stream across segment rolls" {
	mq create q --segment-bytes 4k
	start_tail -n 0 q
	wait_waiting "$TAIL_PID"
	local i
	for i in $(seq 0 9); do
		seq $((i * 500 + 1)) $((i * 500 + 500)) | mq put q
	done
	wait_for "[ \$(wc -l <'$BATS_TEST_TMPDIR/out') -ge 5000 ]" 15
	stop_tail TERM
	cmp "$BATS_TEST_TMPDIR/out" <(seq 5000)
	[ "$(ls "$MQ_SPOOL"/q/0/*.log | wc -l)" -ge 2 ]
}

@test "tail -F: output reaches a pipe as messages arrive" {
	mq create q
	mkfifo "$BATS_TEST_TMPDIR/fifo"
	(while read -r line; do echo "got $line" >>"$BATS_TEST_TMPDIR/piped"; done <"$BATS_TEST_TMPDIR/fifo") 3>&- &
	BG_PIDS+=($!)
	"$MQ" tail -F -n 0 q >"$BATS_TEST_TMPDIR/fifo" &
	TAIL_PID=$!
	BG_PIDS+=("$TAIL_PID")
	wait_waiting "$TAIL_PID"
	mq put q one
	wait_for "grep -qx 'got one' '$BATS_TEST_TMPDIR/piped'" 10
	mq put q two
	wait_for "grep -qx 'got two' '$BATS_TEST_TMPDIR/piped'" 10
	stop_tail TERM
}
