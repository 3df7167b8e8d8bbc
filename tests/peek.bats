#!/usr/bin/env bats
# mq peek: reading without consuming, start points, partitions, counts.
bats_require_minimum_version 1.5.0
load helper

@test "peek: prints everything and consumes nothing" {
	seq 5 | mq put q
	run -0 --separate-stderr mq peek q
	assert_eq "$output" "$(seq 5)"
	assert_eq "$stderr" ""
	run -0 mq peek q
	assert_eq "$output" "$(seq 5)"
	run -0 mq get q -n 0
	assert_eq "$output" "$(seq 5)"
	# and peek still sees what the group consumed
	run -0 mq peek q
	assert_eq "$output" "$(seq 5)"
}

@test "peek: creates no group" {
	mq put q a
	mq peek q
	assert_eq "$(ls -A "$MQ_SPOOL/q/groups")" ""
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["groups"]' <<<"$output")" "[]"
}

@test "peek --from: starts at OFFSET" {
	seq 10 | mq put q
	run -0 mq peek q --from 7
	assert_eq "$output" "$(seq 8 10)"
	run -0 mq peek q --from 0
	assert_eq "$output" "$(seq 10)"
	run -0 mq peek q --from 9
	assert_eq "$output" 10
	run -1 mq peek q --from 10
	assert_eq "$output" ""
	run -1 mq peek q --from 1000
	run -64 mq peek q --from x
}

@test "peek --from: applies to each partition" {
	mq create q --partitions 2
	mq put q -p 0 a0 a1 a2
	mq put q -p 1 b0 b1 b2 b3
	run -0 mq peek q --from 2 -f '%p:%o:%s\n'
	assert_eq "$(sort <<<"$output")" "$(printf '0:2:a2\n1:2:b2\n1:3:b3')"
}

@test "peek --last: the last N of each partition" {
	seq 10 | mq put q
	run -0 mq peek q --last 3
	assert_eq "$output" "$(seq 8 10)"
	run -0 mq peek q --last 100
	assert_eq "$output" "$(seq 10)"
	run -1 mq peek q --last 0
	mq create q2 --partitions 2
	mq put q2 -p 0 a0 a1 a2
	mq put q2 -p 1 b0
	run -0 mq peek q2 --last 2 -f '%p:%s\n'
	assert_eq "$(sort <<<"$output")" "$(printf '0:a1\n0:a2\n1:b0')"
}

@test "peek --since: epoch seconds, RFC 3339 and a duration ago" {
	mq put q old1 old2
	local ts_old ts_new s
	ts_old=$(mq peek q -n 1 -f '%T')
	# the next messages get a timestamp at least a second later
	wait_for "[ \$(now_ms) -ge $((ts_old + 1000)) ]" 5
	mq put q new1 new2
	ts_new=$(mq peek q --from 2 -n 1 -f '%T')
	[ "$ts_new" -ge $((ts_old + 1000)) ]
	# epoch seconds: the first whole second after the old messages
	s=$(((ts_old / 1000) + 1))
	run -0 mq peek q --since "$s"
	assert_eq "$output" "$(printf 'new1\nnew2')"
	run -0 mq peek q --since "@$s"
	assert_eq "$output" "$(printf 'new1\nnew2')"
	run -0 mq peek q --since "$((ts_old / 1000))"
	assert_eq "$output" "$(printf 'old1\nold2\nnew1\nnew2')"
	# RFC 3339, in UTC and with an offset
	run -0 mq peek q --since "$(date -u -d "@$s" +%Y-%m-%dT%H:%M:%SZ)"
	assert_eq "$output" "$(printf 'new1\nnew2')"
	run -0 mq peek q --since "$(TZ=Etc/GMT-2 date -d "@$s" +%Y-%m-%dT%H:%M:%S+02:00)"
	assert_eq "$output" "$(printf 'new1\nnew2')"
	run -0 mq peek q --since "$(date -u -d "@$((s - 1))" +%Y-%m-%dT%H:%M:%S.000Z)"
	assert_eq "$output" "$(printf 'old1\nold2\nnew1\nnew2')"
	# a duration ago: half way between the old and the new messages
	local d=$(($(now_ms) - ts_new + (ts_new - ts_old) / 2))
	run -0 mq peek q --since "${d}ms"
	assert_eq "$output" "$(printf 'new1\nnew2')"
	run -0 mq peek q --since 1h
	assert_eq "$output" "$(printf 'old1\nold2\nnew1\nnew2')"
	# the future: nothing
	run -1 mq peek q --since "$(((ts_new / 1000) + 3600))"
	assert_eq "$output" ""
}

@test "peek --since: a bad time is a usage error; start options exclude each other" {
	mq put q a
	run -64 --separate-stderr mq peek q --since yesterday
	[[ "$stderr" == "mq: peek: "*"yesterday"* ]]
	run -64 mq peek q --since 2026-13-45T99:00
	run -64 mq peek q --from 0 --last 1
	run -64 mq peek q --from 0 --since 1h
	run -64 mq peek q --since 1h --last 1
}

@test "peek -p: one partition only" {
	mq create q --partitions 3
	mq put q -p 0 zero
	mq put q -p 1 one
	mq put q -p 2 two
	run -0 mq peek q -p 1 -f '%p:%s\n'
	assert_eq "$output" "1:one"
	run -0 mq peek q --partition 2
	assert_eq "$output" two
	run -64 --separate-stderr mq peek q -p 3
	[[ "$stderr" == *"partition 3"* ]]
	mq create e --partitions 2
	mq put e -p 0 x
	run -1 mq peek e -p 1
}

@test "peek -n: at most COUNT messages" {
	seq 10 | mq put q
	run -0 mq peek q -n 3
	assert_eq "$output" "$(seq 3)"
	run -0 mq peek q -n 3 --from 5
	assert_eq "$output" "$(seq 6 8)"
	run -0 mq peek q -n 0
	assert_eq "$output" "$(seq 10)"
	run -0 mq peek q -n 50
	assert_eq "$output" "$(seq 10)"
	mq create p --partitions 2
	mq put p -p 0 a b c
	mq put p -p 1 d e f
	run -0 mq peek p -n 4
	[ "${#lines[@]}" -eq 4 ]
}

@test "peek: exit 1 on an empty queue, 66 on a missing one" {
	mq create q
	run -1 --separate-stderr mq peek q
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	run -66 --separate-stderr mq peek nosuch
	[[ "$stderr" == "mq: peek: nosuch: "* ]]
	[ ! -e "$MQ_SPOOL/nosuch" ]
}

@test "peek -f json and -0 print like get" {
	mq put q -k K -t T -H h=v body
	run -0 mq peek q -f json
	assert_eq "$(sed -E 's/"timestamp":[0-9]+,/"timestamp":TS,/' <<<"$output")" \
		'{"queue":"q","partition":0,"offset":0,"timestamp":TS,"key":"K","tag":"T","headers":{"h":"v"},"body":"body"}'
	mq put q 'x y'
	mq peek q -0 >"$BATS_TEST_TMPDIR/out"
	printf 'body\0x y\0' | cmp - "$BATS_TEST_TMPDIR/out"
	run -64 mq peek q -f '%Q'
}

@test "peek: across segment rolls (segment-bytes 4k, 2000 lines in one put)" {
	mq create q --segment-bytes 4k
	seq 2000 | mq put q
	run -0 mq stat --json q
	local segs
	segs=$(json_eval 'd["segments"]' <<<"$output")
	[ "$segs" -ge 5 ]
	# a segment is rolled at segment-bytes: none is more than one batch past it
	local f
	for f in "$MQ_SPOOL"/q/0/*.log; do
		[ "$(stat -c %s "$f")" -le 8192 ]
	done
	mq peek q | cmp - <(seq 2000)
	run -0 mq peek q --from 1500
	assert_eq "$output" "$(seq 1501 2000)"
	run -0 mq peek q --last 5
	assert_eq "$output" "$(seq 1996 2000)"
	run -0 mq peek q --from 1 -n 3
	assert_eq "$output" "$(seq 2 4)"
}

@test "peek: across segment rolls made by many small puts" {
	mq create q --segment-bytes 4k
	local i
	for i in $(seq 0 19); do
		seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q
	done
	[ "$(ls "$MQ_SPOOL"/q/0/*.log | wc -l)" -ge 2 ]
	mq peek q | cmp - <(seq 2000)
	mq peek q -f '%o\n' | cmp - <(seq 0 1999)
	run -0 mq peek q --from 1234 -n 2
	assert_eq "$output" "$(printf '1235\n1236')"
}

@test "peek: a compressed queue reads back the same" {
	mq create q --compression zlib --segment-bytes 4k
	seq 3000 | mq put q
	mq peek q | cmp - <(seq 3000)
	run -0 mq peek q --from 2990 -n 2
	assert_eq "$output" "$(printf '2991\n2992')"
}

@test "peek: sees messages a concurrent writer has acknowledged" {
	mq create q
	mkfifo "$BATS_TEST_TMPDIR/fifo"
	"$MQ" put q <"$BATS_TEST_TMPDIR/fifo" &
	local p=$!
	BG_PIDS+=("$p")
	exec {w}>"$BATS_TEST_TMPDIR/fifo"
	echo first >&$w
	wait_for '[ "$(mq peek q)" = first ]' 10
	echo second >&$w
	exec {w}>&-
	wait "$p"
	run -0 mq peek q
	assert_eq "$output" "$(printf 'first\nsecond')"
}
