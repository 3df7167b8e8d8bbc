#!/usr/bin/env bats
# mq get: consumer groups, counts, formats, waiting, at-least-once
# delivery, and name checking (shared by put, create and peek).
bats_require_minimum_version 1.5.0
load helper

# A name of $1 characters, all 'n'.
long_name() { head -c "$1" /dev/zero | tr '\0' n; }

@test "get: the default group is 'default'; one message per call" {
	mq put q one two three
	run -0 --separate-stderr mq get q
	assert_eq "$output" one
	assert_eq "$stderr" ""
	run -0 mq get q -g default
	assert_eq "$output" two
	run -0 mq stat --json q
	assert_eq "$(json_eval '[(g["group"], g["offsets"]) for g in d["groups"]]' <<<"$output")" \
		'[["default", [2]]]'
	[ -d "$MQ_SPOOL/q/groups/default" ]
}

@test "get -n: COUNT messages; fewer if fewer are left" {
	seq 10 | mq put q
	run -0 mq get q -n 3
	assert_eq "$output" "$(seq 3)"
	run -0 mq get q --count 4
	assert_eq "$output" "$(seq 4 7)"
	run -0 mq get q -n 100
	assert_eq "$output" "$(seq 8 10)"
	run -1 mq get q -n 100
	assert_eq "$output" ""
}

@test "get -n 0: everything there is" {
	seq 2500 | mq put q
	run -0 mq get q -n 0
	assert_eq "$output" "$(seq 2500)"
	run -1 mq get q -n 0
}

@test "get -n: a bad count is a usage error" {
	mq put q x
	run -64 mq get q -n -1
	run -64 mq get q -n abc
	run -64 mq get q -n 3x
	run -0 mq get q
	assert_eq "$output" x
}

@test "get: exit 1 and no output when the queue is empty" {
	mq create q
	run -1 --separate-stderr mq get q
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	mq put q a
	run -0 mq get q
	run -1 mq get q
	assert_eq "$output" ""
}

@test "get: groups are independent; each sees every message" {
	seq 5 | mq put q
	run -0 mq get q -g a -n 2
	assert_eq "$output" "$(seq 2)"
	run -0 mq get q -g b -n 0
	assert_eq "$output" "$(seq 5)"
	run -0 mq get q -g a -n 0
	assert_eq "$output" "$(seq 3 5)"
	run -1 mq get q -g a
	run -1 mq get q -g b
	run -0 mq get q -g c -n 0
	assert_eq "$output" "$(seq 5)"
}

@test "get: consumed messages are not returned again; new ones are" {
	mq put q a b c
	run -0 mq get q -n 2
	assert_eq "$output" "$(printf 'a\nb')"
	mq put q d
	run -0 mq get q -n 0
	assert_eq "$output" "$(printf 'c\nd')"
	run -1 mq get q -n 0
	run -0 mq peek q
	assert_eq "$output" "$(printf 'a\nb\nc\nd')"
}

@test "get: a multi-partition queue yields every message once, in order per partition" {
	mq create q --partitions 3
	local p
	for p in 0 1 2; do
		seq $((p * 100 + 1)) $((p * 100 + 100)) | mq put q -p "$p"
	done
	run -0 mq get q -n 0 -f '%p %s\n'
	[ "${#lines[@]}" -eq 300 ]
	for p in 0 1 2; do
		assert_eq "$(grep "^$p " <<<"$output" | cut -d' ' -f2)" "$(seq $((p * 100 + 1)) $((p * 100 + 100)))"
	done
	run -1 mq get q -n 0
}

@test "get: competing consumers of one group get each message exactly once" {
	seq 600 | mq put q
	local i
	for i in 1 2 3 4; do
		(while "$MQ" get q -n 7 >>"$BATS_TEST_TMPDIR/out.$i"; do :; done) &
	done
	wait_jobs
	sort -n "$BATS_TEST_TMPDIR"/out.* | cmp - <(seq 600)
	# each consumer's own output is in order
	for i in 1 2 3 4; do
		sort -n -c "$BATS_TEST_TMPDIR/out.$i"
	done
}

@test "get -f: every directive and escape" {
	local t0 t1
	t0=$(now_ms)
	mq put q -k K -t T -H a=b -H c=d 'he said "hi"'
	t1=$(now_ms)
	run -0 mq get q -g g1 -f '%s|%k|%o|%p|%t|%h|%q|%%|\t|\\|\n'
	assert_eq "$output" "$(printf 'he said "hi"|K|0|0|T|a=b,c=d|q|%%|\t|\\|')"
	run -0 mq get q -g g2 -f '%T'
	[[ "$output" =~ ^[0-9]+$ ]]
	[ "$output" -ge "$t0" ] && [ "$output" -le "$t1" ]
	run -0 mq get q -g g3 -f 'no newline'
	assert_eq "$output" "no newline"
}

@test "get -f: a message without key, tag or headers prints empty fields" {
	mq put q plain
	run -0 mq get q -f '[%k][%t][%h][%s]\n'
	assert_eq "$output" "[][][][plain]"
}

@test "get -f: offsets and partitions of later messages" {
	mq create q --partitions 2
	mq put q -p 1 a b c
	run -0 mq get q -n 0 -f '%p:%o:%s\n'
	assert_eq "$output" "$(printf '1:0:a\n1:1:b\n1:2:c')"
}

@test "get -f json: one exact object per message" {
	mq put q -k K -t T -H a=b -H c=d hello
	mq put q plain
	run -0 mq get q -n 0 -f json
	[ "${#lines[@]}" -eq 2 ]
	local norm
	norm=$(sed -E 's/"timestamp":[0-9]+,/"timestamp":TS,/' <<<"$output")
	assert_eq "$norm" "$(printf '%s\n%s' \
		'{"queue":"q","partition":0,"offset":0,"timestamp":TS,"key":"K","tag":"T","headers":{"a":"b","c":"d"},"attempt":1,"body":"hello"}' \
		'{"queue":"q","partition":0,"offset":1,"timestamp":TS,"key":null,"tag":null,"headers":{},"attempt":1,"body":"plain"}')"
}

@test "get -f json: quotes, backslashes and control characters are escaped" {
	printf 'a"b\\c\td\ne\001f' | mq put q --whole -k 'k"1'
	run -0 mq get q -f json
	[[ "$output" == *'"key":"k\"1"'* ]]
	[[ "$output" == *'"body":"a\"b\\c\td\ne\u0001f"}' ]]
	assert_eq "$(json_eval 'd["body"] == "a\"b\\c\td\ne\x01f"' <<<"$output")" true
}

@test "get -f json: the output is valid JSON (UTF-8) for any body bytes" {
	printf 'caf\303\251 \377\376 end' | mq put q --whole
	run -0 mq get q -f json
	# RFC 8259: JSON text exchanged between systems must be UTF-8
	python3 -c 'import json, sys; json.loads(sys.stdin.buffer.read().decode("utf-8"))' <<<"$output"
}

@test "get -0: each message ends with NUL" {
	printf 'a\nb\0c\0' | mq put -0 q
	mq get q -n 0 -0 >"$BATS_TEST_TMPDIR/out"
	printf 'a\nb\0c\0' >"$BATS_TEST_TMPDIR/want"
	cmp "$BATS_TEST_TMPDIR/out" "$BATS_TEST_TMPDIR/want"
}

@test "get -f: an unknown directive is a usage error (64) and consumes nothing" {
	mq put q a
	run -64 --separate-stderr mq get q -f '%z'
	[[ "$stderr" == "mq: get: "*"%z"* ]]
	run -64 mq get q -f 'x%'
	run -0 mq get q
	assert_eq "$output" a
}

@test "get -w 1s: an empty queue exits 1 after about a second" {
	mq create q
	local t0 t1
	t0=$(now_ms)
	run -1 mq get q -w 1s
	t1=$(now_ms)
	assert_eq "$output" ""
	[ $((t1 - t0)) -ge 950 ]
	[ $((t1 - t0)) -lt 5000 ]
}

@test "get -w: returns at once when a message is there" {
	mq put q ready
	local t0 t1
	t0=$(now_ms)
	run -0 mq get q -w 10s
	t1=$(now_ms)
	assert_eq "$output" ready
	[ $((t1 - t0)) -lt 5000 ]
}

@test "get -w: wakes when another process puts a message" {
	mq create q --partitions 3
	local f=$BATS_TEST_TMPDIR/out t0 t1
	t0=$(now_ms)
	bg "$MQ" get q -w 10s -f '%s\n' >"$f"
	# let it reach its wait
	wait_waiting "${BG_PIDS[-1]}"
	mq put q -p 2 woken
	wait_for "grep -qx woken '$f'" 10
	wait "${BG_PIDS[-1]}"
	t1=$(now_ms)
	[ $((t1 - t0)) -lt 8000 ]
	assert_eq "$(cat "$f")" woken
}

@test "get -w: a waiting get stops on SIGTERM with exit 1" {
	mq create q
	"$MQ" get q -w &
	local pid=$!
	BG_PIDS+=("$pid")
	wait_waiting "$pid"
	kill -TERM "$pid"
	wait_for "proc_gone $pid" 10
	local rc=0
	wait "$pid" || rc=$?
	assert_eq "$rc" 1
}

@test "get: at-least-once - output cut off early means the messages come again" {
	local i
	for i in 1 2 3 4 5; do
		head -c 100000 /dev/zero | tr '\0' "$i"
		echo
	done | mq put q
	run bash -c "'$MQ' get q -n 5 | head -c 1 >/dev/null"
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["groups"][0]["lag"]' <<<"$output")" 5
	if via_server; then
		assert_lease_held q default 5
		return 0
	fi
	run -0 mq get q -n 0
	[ "${#lines[@]}" -eq 5 ]
	assert_eq "$(cut -c1 <<<"$output" | tr -d '\n')" 12345
}

@test "get: at-least-once - with stdout closed it fails (74) and commits nothing" {
	mq put q a b c
	run -74 --separate-stderr bash -c "'$MQ' get q -n 3 >&-"
	[[ "$stderr" == "mq: get: q: "* ]]
	if via_server; then
		assert_lease_held q default 3
	else
		run -0 mq get q -n 0
		assert_eq "$output" "$(printf 'a\nb\nc')"
	fi
	run -0 mq verify q
}

@test "get: a missing queue is 66" {
	run -66 --separate-stderr mq get nosuch
	assert_eq "$output" ""
	[[ "$stderr" == "mq: get: nosuch: "* ]]
	[ -z "$(ls -A "$MQ_SPOOL")" ]
}

@test "bad queue names are refused (64) by put, get, create and peek; nothing is created" {
	local name cmd long
	long=$(long_name 129)
	mkdir -p "$BATS_TEST_TMPDIR/box/spool"
	use_spool "$BATS_TEST_TMPDIR/box/spool"
	local bad=""
	for name in ../x a/b .hidden '' "$long" '-' 'a b' 'x:y' 'é' '..' '.'; do
		for cmd in put get create peek; do
			if [ "$cmd" = put ]; then
				run --separate-stderr mq put -- "$name" msg
			else
				run --separate-stderr mq "$cmd" -- "$name"
			fi
			if [ "$status" -ne 64 ] || [[ "$stderr" != "mq: $cmd: "*"bad queue name"* ]]; then
				bad+="$cmd '$name': exit $status: $stderr"$'\n'
			fi
		done
	done
	assert_eq "$bad" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
	assert_eq "$(ls -A "$BATS_TEST_TMPDIR/box")" spool
}

@test "a queue name of 128 characters is accepted" {
	local name
	name=$(long_name 128)
	run -0 mq put "$name" x
	run -0 mq get "$name"
	assert_eq "$output" x
	run -0 mq ls
	assert_eq "$output" "$name"
}

@test "get: a bad group name is 64 and creates no group" {
	mq put q x
	local g bad=""
	for g in ../x a/b .hidden '' "$(long_name 129)" 'a b'; do
		run --separate-stderr mq get q -g "$g"
		if [ "$status" -ne 64 ] || [ "$stderr" != "mq: get: q: bad group name '$g': use 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit" ]; then
			bad+="-g '$g': exit $status: $stderr"$'\n'
		fi
	done
	assert_eq "$bad" ""
	assert_eq "$(ls -A "$MQ_SPOOL/q/groups")" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" q
	run -0 mq get q -g "$(long_name 128)"
	assert_eq "$output" x
}

@test "get: missing or extra arguments are usage errors" {
	run -64 mq get
	mq put q x
	run -64 --separate-stderr mq get q r
	[[ "$stderr" == "mq: get: too many arguments"* ]]
}

@test "get -n: the count spans partitions" {
	mq create q --partitions 3
	mq put q -p 0 a b c
	mq put q -p 1 d e
	mq put q -p 2 f
	run -0 mq get q -n 5
	[ "${#lines[@]}" -eq 5 ]
	local first=$output
	run -0 mq get q -n 5
	[ "${#lines[@]}" -eq 1 ]
	assert_eq "$(printf '%s\n%s\n' "$first" "$output" | sort | tr -d '\n')" abcdef
	run -1 mq get q -n 5
}

@test "get -w: a missing queue is 66 at once, not a wait" {
	local t0 t1
	t0=$(now_ms)
	run -66 mq get nosuch -w 10s
	t1=$(now_ms)
	[ $((t1 - t0)) -lt 5000 ]
	run -64 mq get q -w soon
}

@test "get: sealed segments go once every group has consumed them" {
	mq create q --segment-bytes 4k
	seq 2000 | mq put q
	mq get q -g b >/dev/null
	mq get q -g a -n 0 >/dev/null
	# group b still holds everything from offset 1
	run -0 mq stat --json q
	local segs
	segs=$(json_eval 'd["segments"]' <<<"$output")
	[ "$segs" -ge 5 ]
	mq peek q | cmp - <(seq 2000)
	run -0 mq get q -g b -n 0
	assert_eq "$output" "$(seq 2 2000)"
	# now only the active segment is left
	local logs base
	logs=$(ls "$MQ_SPOOL"/q/0/*.log)
	[ "$(wc -l <<<"$logs")" -eq 1 ]
	base=$(basename "$logs" .log)
	base=$((10#$base))
	[ "$base" -gt 0 ]
	mq peek q | cmp - <(seq $((base + 1)) 2000)
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["messages"], d["next"]]' <<<"$output")" "[$((2000 - base)), [2000]]"
	# a group that comes late starts at the first stored message and is told
	run -0 --separate-stderr mq get q -g late -n 0
	assert_eq "$output" "$(seq $((base + 1)) 2000)"
	[[ "$stderr" == *"offsets 0-$((base - 1)) were removed"*"'late'"* ]]
}
