#!/usr/bin/env bats
# mq consume: a command per message (or batch), commit on exit 0.
bats_require_minimum_version 1.5.0
load helper

@test "consume: runs the command per message with body and metadata, then commits" {
	seq 1 3 | mq put q
	mq put q -k user1 -t T hello
	run -0 --separate-stderr mq consume q -g w -- \
		sh -c 'printf "%s|%s|%s|%s|%s|%s|%s|" "$MQ_QUEUE" "$MQ_PARTITION" "$MQ_OFFSET" "$MQ_KEY" "$MQ_TAG" "$MQ_ATTEMPT" "$MQ_ID"; cat'
	assert_eq "$output" "$(printf 'q|0|0|||1|q/0/0|1\nq|0|1|||1|q/0/1|2\nq|0|2|||1|q/0/2|3\nq|0|3|user1|T|1|q/0/3|hello')"
	assert_eq "$stderr" ""
	[[ "$(mq groups q)" == *"w                             0          -  0:4"* ]]
	# Nothing left: exits 0 at once (cron-friendly), running nothing.
	run -0 mq consume q -g w -e -- sh -c 'echo ran'
	assert_eq "$output" ""
	[[ "$(printf '%s' "$MQ_TIMESTAMP")" == "" ]]
}

@test "consume --batch: N messages per run, separated as get prints them" {
	printf '%s\n' a b c d e | mq put q
	run -0 mq consume q -g w --batch 2 -- sh -c 'echo "[$MQ_OFFSET+$MQ_COUNT]"; cat'
	assert_eq "$output" "$(printf '[0+2]\na\nb\n[2+2]\nc\nd\n[4+1]\ne')"
	run -64 --separate-stderr mq consume q -g w --batch 0 -- true
}

@test "consume: a failing command stops it (75), uncommitted; the message comes again" {
	printf '%s\n' x y z | mq put q
	run -75 --separate-stderr mq consume q -g w -- sh -c 'read l; echo "got $l"; [ "$l" != y ]'
	assert_eq "$output" "$(printf 'got x\ngot y')"
	[[ "$stderr" == "mq: consume: q: 'sh' failed on q/0 offset 1 (exit status 1); not committed, it will be delivered again" ]]
	run -0 mq consume q -g w -- cat
	assert_eq "$output" "$(printf 'y\nz')"
	# A command that cannot be run fails the same way.
	mq put q w
	run -75 --separate-stderr mq consume q -g w -- /nonexistent/cmd
	run -0 mq get q -g w
	assert_eq "$output" "w"
}

@test "consume --timeout: a run over the limit is killed and not committed" {
	mq put q slow
	run -75 --separate-stderr mq consume q -g w --timeout 300ms -- sleep 30
	[[ "$stderr" == *"killed by signal 9"* ]]
	run -0 mq get q -g w
	assert_eq "$output" "slow"
}

@test "consume --max and --tag" {
	mq put q -t A a1
	mq put q -t B b1
	mq put q -t A a2 a3
	run -0 mq consume q -g w --tag A --max 2 -- cat
	assert_eq "$output" "$(printf 'a1\na2')"
	run -0 mq consume q -g w --tag A -- cat
	assert_eq "$output" "a3"
	run -0 mq consume q -g all -- cat
	assert_eq "${#lines[@]}" 4
}

@test "consume -w: waits for new messages; SIGTERM lets the running command finish, commits, exits 0" {
	mq create q
	out=$BATS_TEST_TMPDIR/out
	"$MQ" consume q -g w -w -- sh -c "cat >>'$out'; sleep 1" &
	pid=$!
	BG_PIDS+=("$pid")
	mq put q one two
	wait_for "[ -s '$out' ]"
	kill -TERM "$pid"
	rc=0
	wait "$pid" || rc=$?
	assert_eq "$rc" 0
	assert_eq "$(cat "$out")" "one"
	# 'one' was committed; 'two' was never taken.
	run -0 mq get q -g w -n 0
	assert_eq "$output" "two"
}

@test "consume -w TIMEOUT stops after that long idle" {
	mq put q a
	run -0 mq consume q -g w -w 500ms -- cat
	assert_eq "$output" "a"
}

@test "consume: two consumers of one group never run the same message" {
	seq 1 200 | mq put q
	touch "$BATS_TEST_TMPDIR/c1" "$BATS_TEST_TMPDIR/c2"
	for c in 1 2; do
		"$MQ" consume q -g w -- sh -c "cat >>'$BATS_TEST_TMPDIR/c$c'" &
		BG_PIDS+=("$!")
	done
	wait
	run -0 bash -c "cat '$BATS_TEST_TMPDIR'/c1 '$BATS_TEST_TMPDIR'/c2 | sort -n"
	assert_eq "$output" "$(seq 1 200)"
}

@test "consume: usage errors" {
	mq put q a
	run -64 --separate-stderr mq consume q -- true
	run -64 --separate-stderr mq consume q -g w
	run -64 --separate-stderr mq consume q -g w -e -w -- true
	run -64 --separate-stderr mq consume q -g w --timeout 0 -- true
	run -66 --separate-stderr mq consume nosuch -g w -- true
	run -0 mq get q -g w
}
