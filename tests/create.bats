#!/usr/bin/env bats
# mq create, mq rm and mq purge.
bats_require_minimum_version 1.5.0
load helper

# ----- create -----

@test "create: the settings given are stored in meta.yaml and shown by config" {
	run -0 --separate-stderr mq create q --partitions 2 --fsync always --segment-bytes 1M \
		--retain-age 45s --retain-bytes 10M --compression zlib --max-message-bytes 64k
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	[ -f "$MQ_SPOOL/q/meta.yaml" ]
	run -0 mq config q
	assert_eq "${lines[2]}" "# queue: q"
	local s
	for s in 'partitions: 2' 'fsync: always' 'segment-bytes: 1M' 'retain-age: 45s' \
		'retain-bytes: 10M' 'compression: zlib' 'max-message-bytes: 64k'; do
		grep -Eqx "$s +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output" || {
			echo "not from meta.yaml: $s"
			echo "$output"
			return 1
		}
	done
	# the settings hold: 2 partitions, 64k limit
	[ -d "$MQ_SPOOL/q/0" ] && [ -d "$MQ_SPOOL/q/1" ] && [ ! -e "$MQ_SPOOL/q/2" ]
	run -65 mq put q "$(head -c 65537 /dev/zero | tr '\0' x)"
	run -0 mq put q "$(head -c 65536 /dev/zero | tr '\0' x)"
}

@test "create: settings not given follow mq.yaml later; given ones do not" {
	mq create q --segment-bytes 1M
	printf 'defaults:\n  segment-bytes: 2M\n  compression: zlib\n' >"$MQ_SPOOL/mq.yaml"
	reload_config
	run -0 mq config q
	grep -Eqx "segment-bytes: 1M +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
	grep -Eqx "compression: zlib +# $MQ_SPOOL/mq.yaml:3" <<<"$output"
}

@test "create: an empty queue, listed, with no leftovers" {
	run -0 mq create q
	run -0 mq ls
	assert_eq "$output" q
	assert_eq "$(ls -A "$MQ_SPOOL")" q
	run -1 mq peek q
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["partitions"], d["messages"]]' <<<"$output")" "[1, 0]"
}

@test "create: an existing queue is 65; --if-not-exists makes it 0 and changes nothing" {
	mq create q --partitions 2
	mq put q -p 1 keep
	run -65 --separate-stderr mq create q
	[[ "$stderr" == "mq: create: q: "*"exists"* ]]
	run -65 mq create q --partitions 2
	run -0 --separate-stderr mq create q --if-not-exists
	assert_eq "$stderr" ""
	run -0 mq create q --if-not-exists --partitions 5
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["partitions"], d["messages"]]' <<<"$output")" "[2, 1]"
	run -0 mq create fresh --if-not-exists
	run -0 mq ls
	assert_eq "$output" "$(printf 'fresh\nq')"
}

@test "create: bad settings are usage errors (64) and create nothing" {
	local bad=""
	local args
	for args in '--partitions 0' '--partitions 1025' '--partitions x' '--partitions -1' \
		'--fsync sometimes' '--segment-bytes 1k' '--segment-bytes 12x' '--segment-bytes 2G' \
		'--compression lz4' '--max-message-bytes 0' '--max-message-bytes 33M' \
		'--retain-age soon' '--retain-bytes -5'; do
		# shellcheck disable=SC2086
		run --separate-stderr mq create q $args
		if [ "$status" -ne 64 ] || [[ "$stderr" != "mq: create: "* ]]; then
			bad+="$args: exit $status: $stderr"$'\n'
		fi
	done
	assert_eq "$bad" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "create: the largest settings allowed" {
	run -0 mq create q --partitions 64 --segment-bytes 1G --max-message-bytes 32M
	[ -d "$MQ_SPOOL/q/63" ] && [ ! -e "$MQ_SPOOL/q/64" ]
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["partitions"]' <<<"$output")" 64
	run -0 mq config q
	grep -Eqx "segment-bytes: 1G +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
	grep -Eqx "max-message-bytes: 32M +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
	# 1024 partitions is the maximum (checked without creating them all)
	printf 'queues:\n  wide:\n    partitions: 1024\n' >"$MQ_SPOOL/mq.yaml"
	reload_config
	run -0 mq config wide
	grep -Eqx "partitions: 1024 +# $MQ_SPOOL/mq.yaml:3" <<<"$output"
}

@test "create: bad names are 64 even with --if-not-exists; nothing is created" {
	local bad="" name
	for name in '' . .. ../x a/b .hidden; do
		run --separate-stderr mq create -- "$name"
		[ "$status" -eq 64 ] || bad+="create '$name': exit $status: $stderr"$'\n'
		run --separate-stderr mq create --if-not-exists -- "$name"
		[ "$status" -eq 64 ] || bad+="create --if-not-exists '$name': exit $status: $stderr"$'\n'
	done
	assert_eq "$bad" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "create: needs exactly one queue" {
	run -64 mq create
	run -64 mq create a b
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "create: concurrent creates of one queue: one wins, the others see it exists" {
	local k
	for k in 1 2 3 4 5 6; do
		(
			rc=0
			"$MQ" create q --partitions 3 2>/dev/null || rc=$?
			echo "$rc" >"$BATS_TEST_TMPDIR/rc.$k"
		) &
	done
	wait_jobs
	assert_eq "$(cat "$BATS_TEST_TMPDIR"/rc.* | sort | tr '\n' ' ')" "0 65 65 65 65 65 "
	assert_eq "$(ls -A "$MQ_SPOOL")" q
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["partitions"]' <<<"$output")" 3
}

# ----- rm -----

@test "rm: removes the queue directory with its messages and groups" {
	seq 10 | mq put q
	mq get q -n 3 >/dev/null
	mq put other x
	run -0 --separate-stderr mq rm q
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	[ ! -e "$MQ_SPOOL/q" ]
	assert_eq "$(ls -A "$MQ_SPOOL")" other
	run -66 mq peek q
	run -66 mq get q
}

@test "rm: a missing queue is 66" {
	run -66 --separate-stderr mq rm nosuch
	[[ "$stderr" == "mq: rm: nosuch: "* ]]
	run -64 mq rm ../x
	run -64 mq rm
}

@test "rm: several queues at once" {
	mq create a
	mq create b
	mq create c
	run -0 mq rm a c
	run -0 mq ls
	assert_eq "$output" b
}

@test "rm: a queue put again afterwards starts fresh" {
	seq 5 | mq put q
	mq get q -n 2 >/dev/null
	mq rm q
	run -0 mq put q --print-offsets again
	assert_eq "$output" 0:0
	run -0 mq get q -n 0
	assert_eq "$output" again
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["messages"], [g["lag"] for g in d["groups"]]]' <<<"$output")" "[1, [0]]"
}

@test "rm: a reader that has the queue open is not disturbed" {
	seq 3 | mq put q
	"$MQ" tail -F -n 100 q >"$BATS_TEST_TMPDIR/out" &
	local p=$!
	BG_PIDS+=("$p")
	wait_for "[ \"\$(cat '$BATS_TEST_TMPDIR/out')\" = '$(seq 3)' ]" 10
	run -0 mq rm q
	[ ! -e "$MQ_SPOOL/q" ]
	kill -TERM "$p"
	local rc=0
	wait "$p" || rc=$?
	assert_eq "$rc" 0
}

# ----- purge -----

@test "purge: empties the queue but keeps it and its settings" {
	mq create q --partitions 2 --segment-bytes 64k --compression zlib
	seq 3000 | mq put q -p 0
	seq 500 | mq put q -p 1
	run -0 --separate-stderr mq purge q
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	run -1 mq peek q
	run -1 mq get q
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["partitions"], d["messages"]]' <<<"$output")" "[2, 0]"
	run -0 mq ls
	assert_eq "$output" q
	run -0 mq config q
	grep -Eqx "segment-bytes: 64k +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
	grep -Eqx "compression: zlib +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
}

@test "purge: later puts continue the offsets" {
	mq create q --partitions 2
	seq 7 | mq put q -p 0
	seq 3 | mq put q -p 1
	mq purge q
	run -0 mq put q -p 0 --print-offsets a b
	assert_eq "$output" "$(printf '0:7\n0:8')"
	run -0 mq put q -p 1 --print-offsets c
	assert_eq "$output" "1:3"
	run -0 mq peek q -f '%p:%o:%s\n'
	assert_eq "$(sort <<<"$output")" "$(printf '0:7:a\n0:8:b\n1:3:c')"
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["messages"], d["next"]]' <<<"$output")" "[3, [9, 4]]"
}

@test "purge: groups skip what was purged and get only new messages" {
	seq 10 | mq put q
	mq get q -n 3 >/dev/null
	mq get q -g other -n 0 >/dev/null
	mq purge q
	run -0 mq stat --json q
	assert_eq "$(json_eval '[g["lag"] for g in d["groups"]]' <<<"$output")" "[0, 0]"
	mq put q new
	run -0 --separate-stderr mq get q -n 0
	assert_eq "$output" new
	run -0 mq get q -g other -n 0
	assert_eq "$output" new
	run -0 --separate-stderr mq get q -g late -n 0
	assert_eq "$output" new
}

@test "purge: the queue's disk use becomes small" {
	mq create q --segment-bytes 1M
	head -c 6000000 /dev/urandom | base64 -w 100 | mq put q
	[ "$(du -sk "$MQ_SPOOL/q" | cut -f1)" -gt 7000 ]
	mq purge q
	local kb
	kb=$(du -sk "$MQ_SPOOL/q" | cut -f1)
	[ "$kb" -lt 100 ] || {
		echo "du after purge: ${kb}k"
		ls -la "$MQ_SPOOL/q/0"
		return 1
	}
	assert_eq "$(cat "$MQ_SPOOL"/q/0/*.log | wc -c)" 0
}

@test "purge: an empty queue, several queues, and a missing one" {
	mq create empty
	run -0 mq purge empty
	seq 3 | mq put a
	seq 3 | mq put b
	run -0 mq purge a b
	run -1 mq peek a
	run -1 mq peek b
	run -66 --separate-stderr mq purge nosuch
	[[ "$stderr" == "mq: purge: nosuch: "* ]]
	[ ! -e "$MQ_SPOOL/nosuch" ]
	run -64 mq purge
}

@test "purge: twice in a row, then puts still work" {
	seq 5 | mq put q
	mq purge q
	mq purge q
	run -0 mq put q --print-offsets x
	assert_eq "$output" 0:5
	run -0 mq peek q
	assert_eq "$output" x
}

@test "purge: tail, peek --last and peek --from count from what is left" {
	seq 10 | mq put q
	mq purge q
	mq put q a b
	run -0 mq tail -n 5 q
	assert_eq "$output" "$(printf 'a\nb')"
	run -0 mq peek q --last 5 -f '%o %s\n'
	assert_eq "$output" "$(printf '10 a\n11 b')"
	run -0 mq peek q --from 3
	assert_eq "$output" "$(printf 'a\nb')"
	run -0 mq peek q --from 11
	assert_eq "$output" b
}
