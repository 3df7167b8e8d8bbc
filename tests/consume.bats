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
	[[ "$(mq groups q)" == *"w                             0        0        0          -  0:4"* ]]
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

@test "consume: a failing command does not stop it; the message comes back after the backoff with attempt 2" {
	printf '%s\n' x y z | mq put q
	cmd=(sh -c 'read l; echo "got $l $MQ_ATTEMPT"; [ "$l" != y ]')
	run -0 --separate-stderr mq consume q -g w --backoff 1s -- "${cmd[@]}"
	assert_eq "$output" "$(printf 'got x 1\ngot y 1\ngot z 1')"
	assert_eq "$stderr" "mq: 'sh' failed on q/0 offset 1 (exit status 1, attempt 1 of 17); retry in 1s"
	# x and z are committed around y, which waits out the backoff.
	[[ "$(mq groups q)" =~ $'\n'w\ +1\ +0\ +1\ +[0-9][0-9a-z]*\ +0:1$ ]]
	run -0 mq consume q -g w --backoff 1s -- "${cmd[@]}"
	assert_eq "$output" ""
	t=$(now_ms)
	wait_for "[ \$(now_ms) -ge $((t + 1000)) ]"
	run -0 mq consume q -g w --backoff 1s -- sh -c 'echo "$(cat) $MQ_ATTEMPT"'
	assert_eq "$output" "y 2"
	[[ "$(mq groups q)" =~ $'\n'w\ +0\ +0\ +0\ +-\ +0:3$ ]]
	# A command that cannot be run fails the same way.
	mq put q w
	run -0 --separate-stderr mq consume q -g w --backoff 300ms -- /nonexistent/cmd
	[[ "$stderr" == *"cannot run '/nonexistent/cmd'"*"(exit status 127, attempt 1 of 17); retry in 300ms" ]]
	run -1 mq get q -g w
	run -0 poll_get q -g w -f '%a %s'
	assert_eq "$output" "2 w"
}

@test "consume --timeout: a run over the limit is killed; the message comes back after the backoff" {
	mq put q slow
	run -0 --separate-stderr mq consume q -g w --timeout 300ms --backoff 500ms -- sleep 30
	[[ "$stderr" == *"'sleep' failed on q/0 offset 0 (timed out, attempt 1 of 17); retry in 500ms" ]]
	run -0 poll_get q -g w -f '%a %s'
	assert_eq "$output" "2 slow"
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
	wait_jobs
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

@test "consume --parallel: runs at once, never two of one key at once, each message once" {
	local_only "consume --parallel exits 64 through a server"
	local k
	for k in a b c; do seq 1 6 | mq put q -k "$k"; done
	seq 1 6 | mq put q
	mkdir "$BATS_TEST_TMPDIR/run"
	cat >"$BATS_TEST_TMPDIR/job.sh" <<'JOB'
#!/bin/sh
d=$(dirname "$0")/run
if [ -n "$MQ_KEY" ]; then mkdir "$d/key-$MQ_KEY" 2>/dev/null || { echo "two of $MQ_KEY" >>"$d/../conflicts"; exit 0; }; fi
mkdir "$d/$MQ_OFFSET" # live runs, counted by the test's watcher
sleep 0.2
printf '%s %s\n' "$MQ_KEY" "$(cat)" >>"$d/../done"
rmdir "$d/$MQ_OFFSET"
[ -z "$MQ_KEY" ] || rmdir "$d/key-$MQ_KEY"
JOB
	chmod +x "$BATS_TEST_TMPDIR/job.sh"
	( max=0; while [ ! -e "$BATS_TEST_TMPDIR/stop" ]; do
		n=$(find "$BATS_TEST_TMPDIR/run" -mindepth 1 -maxdepth 1 -name '[0-9]*' | wc -l)
		[ "$n" -gt "$max" ] && max=$n && echo "$max" >"$BATS_TEST_TMPDIR/max"
		sleep 0.02
	done ) &
	run -0 mq consume q -g w --parallel 3 -- "$BATS_TEST_TMPDIR/job.sh"
	touch "$BATS_TEST_TMPDIR/stop"
	wait_jobs
	[ ! -e "$BATS_TEST_TMPDIR/conflicts" ]
	[ "$(wc -l <"$BATS_TEST_TMPDIR/done")" -eq 24 ]
	[ "$(sort "$BATS_TEST_TMPDIR/done" | uniq -d | wc -l)" -eq 0 ]
	# per-key order is kept
	for k in a b c; do
		assert_eq "$(grep "^$k " "$BATS_TEST_TMPDIR/done" | cut -d' ' -f2 | tr '\n' ' ')" "1 2 3 4 5 6 "
	done
	[ "$(cat "$BATS_TEST_TMPDIR/max")" -ge 2 ]
	[ "$(cat "$BATS_TEST_TMPDIR/max")" -le 3 ]
	run -0 mq groups q
	[[ "${lines[1]}" =~ ^w\ +0\ +0\ +0\ +-\ +0:24$ ]]
}

@test "consume --parallel: usage errors" {
	mq put q x
	run -64 --separate-stderr mq consume q -g w --parallel 0 -- true
	run -64 --separate-stderr mq consume q -g w --parallel 2 --ordered -- true
}
