#!/usr/bin/env bats
# The scripts in examples/ run as documented and print what they say.
# They are POSIX sh (`make demo` runs demo.sh with sh), so run them so.
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

EX=$BATS_TEST_DIRNAME/../examples

@test "examples: demo.sh runs in a throw-away spool, shows the flow, cleans up" {
	export TMPDIR=$BATS_TEST_TMPDIR/tmp
	mkdir "$TMPDIR"
	SECONDS=0
	run -0 --separate-stderr sh "$EX/demo.sh" "$MQ"
	[ "$SECONDS" -le 10 ]
	echo "$output"
	# The producer's acknowledgements (one partition picked for the whole
	# put), the consumer loop, the other group.
	p=$(grep -E '^[01]:0$' <<<"$output" | cut -d: -f1)
	[[ "$output" == *$'\n'"$p:0"$'\n'"$p:1"$'\n'*$'\n'"$p:9"$'\n'* ]]
	assert_eq "$(grep -cE '^[01]:[0-9]$' <<<"$output")" 10
	for i in $(seq 1 10); do
		[[ "$output" == *$'\n'"billing got: order-$i"$'\n'* ]]
	done
	[[ "$output" == *"billing handled 10 orders"* ]]
	for i in $(seq 1 10); do
		[[ "$output" == *$'\n'"$p:$((i - 1)) order-$i"$'\n'* ]]
	done
	# Keys: each customer's events in one partition, in order.
	alice=$(grep ' alice ' <<<"$output" | cut -d' ' -f3 | tr '\n' ' ')
	assert_eq "$alice" "login buy logout "
	assert_eq "$(grep -c ' alice ' <<<"$output")" 3
	[ "$(grep ' alice ' <<<"$output" | cut -d' ' -f1 | sort -u | wc -l)" = 1 ]
	[[ "$output" == *"exit status 1"* ]]
	[[ "$output" == *"ok: 2 queues, 4 partitions, no damage"* ]]
	# The spool it made is gone; the caller's spool was never touched.
	assert_eq "$(ls -A "$TMPDIR")" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "examples: demo.sh finds mq through \$MQ when given no argument" {
	export TMPDIR=$BATS_TEST_TMPDIR
	run -0 sh "$EX/demo.sh"
	[[ "$output" == *"billing handled 10 orders"* ]]
}

access_log() {
	cat <<'EOF'
127.0.0.1 - - [10/Oct/2026:13:55:36 +0000] "GET /a HTTP/1.1" 200 2326
127.0.0.1 - - [10/Oct/2026:13:55:37 +0000] "GET /missing HTTP/1.1" 404 10
10.0.0.2 - - [10/Oct/2026:13:55:38 +0000] "GET /a HTTP/1.1" 200 100
10.0.0.2 - - [10/Oct/2026:13:55:39 +0000] "POST /c HTTP/1.1" 500 -
10.0.0.3 - - [10/Oct/2026:13:55:40 +0000] "GET /b HTTP/1.1" 200 74
EOF
}

@test "examples: pipeline.sh puts log lines keyed by status and aggregates per key" {
	access_log >"$BATS_TEST_TMPDIR/access.log"
	run -0 --separate-stderr sh "$EX/pipeline.sh" "$BATS_TEST_TMPDIR/access.log"
	assert_eq "$output" "200 3 requests 2500 bytes
404 1 requests 10 bytes
500 1 requests 0 bytes"
	assert_eq "$stderr" ""
	# The messages are in the queue, keyed by status: one partition per key.
	run -0 mq peek weblog -f '%k %p\n'
	assert_eq "$(sort -u <<<"$output" | cut -d' ' -f1 | uniq -d)" ""
	assert_eq "${#lines[@]}" 5

	# Nothing new: said so, exit 0.
	run -0 sh "$EX/pipeline.sh" </dev/null
	assert_eq "$output" "no new log lines"
	# New lines from stdin: only they are counted.
	run -0 sh "$EX/pipeline.sh" < <(access_log | grep ' 404 ')
	assert_eq "$output" "404 1 requests 10 bytes"
	run -0 mq verify
}

@test "examples: pipeline.sh honours QUEUE and GROUP" {
	access_log >"$BATS_TEST_TMPDIR/access.log"
	QUEUE=web GROUP=one run -0 sh "$EX/pipeline.sh" "$BATS_TEST_TMPDIR/access.log"
	assert_eq "${lines[0]}" "200 3 requests 2500 bytes"
	# Another group of the same queue sees the lines again (and the new put).
	QUEUE=web GROUP=two run -0 sh "$EX/pipeline.sh" </dev/null
	assert_eq "${lines[0]}" "200 3 requests 2500 bytes"
	run -66 mq peek weblog
}

@test "examples: cron-drain.sh drains the jobs, keeps a failed one in jobs.dlq, goes on next run" {
	printf '%s\n' a@example.org b@example.org not-an-address c@example.org | mq put jobs
	run -1 --separate-stderr sh "$EX/cron-drain.sh"
	assert_eq "$output" "mailed a@example.org
mailed b@example.org"
	assert_eq "$stderr" "cannot mail not-an-address: not an address
moved the failed job to jobs.dlq after 2 done"
	run -0 mq peek jobs.dlq
	assert_eq "$output" "not-an-address"

	run -0 --separate-stderr sh "$EX/cron-drain.sh"
	assert_eq "$output" "mailed c@example.org
drained 1 jobs"
	assert_eq "$stderr" ""
	run -0 sh "$EX/cron-drain.sh"
	assert_eq "$output" "drained 0 jobs"
	# The group really consumed them; the queue still holds them for others.
	run -1 mq get jobs -g mailer
	run -0 mq get jobs -g other -n 0
	assert_eq "${#lines[@]}" 4
}

@test "examples: cron-drain.sh passes on mq's error (no such queue: 66)" {
	run -66 --separate-stderr sh "$EX/cron-drain.sh"
	assert_eq "$output" ""
	assert_eq "$stderr" "mq: get: jobs: no such queue 'jobs'"
}

@test "examples: two cron-drain.sh runs at once never mail a job twice" {
	for i in $(seq 1 200); do echo "user$i@example.org"; done | mq put jobs
	sh "$EX/cron-drain.sh" >"$BATS_TEST_TMPDIR/one" &
	local a=$!
	sh "$EX/cron-drain.sh" >"$BATS_TEST_TMPDIR/two" &
	local b=$!
	BG_PIDS+=("$a" "$b")
	wait "$a"
	wait "$b"
	cat "$BATS_TEST_TMPDIR/one" "$BATS_TEST_TMPDIR/two" | grep '^mailed' | sort >"$BATS_TEST_TMPDIR/all"
	assert_eq "$(wc -l <"$BATS_TEST_TMPDIR/all")" 200
	assert_eq "$(uniq -d "$BATS_TEST_TMPDIR/all")" ""
}

@test "examples: every example is POSIX sh (dash -n) and executable" {
	for f in "$EX"/*.sh; do
		[ -x "$f" ]
		if command -v dash >/dev/null; then dash -n "$f"; else sh -n "$f"; fi
	done
}
