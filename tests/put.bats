#!/usr/bin/env bats
# mq put: message sources (arguments, lines, NUL, whole), keys and
# partitions, tags, headers, offsets, durability modes and size limits.
bats_require_minimum_version 1.5.0
load helper

# FNV-1a 32-bit of $1 modulo $2: the partition mq.h promises for a key.
key_partition() {
	python3 -c 'import sys
h = 2166136261
for b in sys.argv[1].encode():
    h = ((h ^ b) * 16777619) & 0xffffffff
print(h % int(sys.argv[2]))' "$1" "$2"
}

@test "put: each argument is one message, in order; nothing on stdout" {
	run -0 --separate-stderr mq put q a 'b c' '' d
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	run -0 mq peek q -f '[%s]\n'
	assert_eq "$output" "$(printf '[a]\n[b c]\n[]\n[d]')"
	run -0 mq peek q -f '%o '
	assert_eq "$output" "0 1 2 3 "
}

@test "put: stdin is one message per line; empty lines are empty messages" {
	run -0 mq put q < <(printf 'one\n\ntwo\n\n')
	run -0 mq peek q -f '[%s]\n'
	assert_eq "$output" "$(printf '[one]\n[]\n[two]\n[]')"
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 4
}

@test "put: a last line without a newline is a message" {
	printf 'a\nb\nlast' | mq put q
	run -0 mq peek q -f '[%s]\n'
	assert_eq "$output" "$(printf '[a]\n[b]\n[last]')"
}

@test "put: a trailing newline does not make an extra empty message" {
	printf 'a\nb\n' | mq put q
	run -0 mq peek q -f '[%s]\n'
	assert_eq "$output" "$(printf '[a]\n[b]')"
}

@test "put -0: NUL-separated messages may hold newlines" {
	printf 'a\0b c\nd\0\0e' | mq put -0 q
	run -0 mq peek q -f '[%s]\n'
	assert_eq "$output" "$(printf '[a]\n[b c\nd]\n[]\n[e]')"
	mq peek -0 q >"$BATS_TEST_TMPDIR/out"
	printf 'a\0b c\nd\0\0e\0' >"$BATS_TEST_TMPDIR/want"
	cmp "$BATS_TEST_TMPDIR/out" "$BATS_TEST_TMPDIR/want"
}

@test "put -0: a trailing NUL does not make an extra empty message" {
	printf 'x\0y\0' | mq put --null q
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 2
}

@test "put --whole: all of stdin is one message, newlines included" {
	printf 'a\nb\n\nc\n' | mq put --whole q
	run -0 mq peek q -f json
	[ "${#lines[@]}" -eq 1 ]
	assert_eq "$(json_eval 'd["body"] == "a\nb\n\nc\n"' <<<"$output")" true
	mq peek q >"$BATS_TEST_TMPDIR/out"
	printf 'a\nb\n\nc\n\n' >"$BATS_TEST_TMPDIR/want"
	cmp "$BATS_TEST_TMPDIR/out" "$BATS_TEST_TMPDIR/want"
}

@test "put --whole: binary stdin is stored byte for byte" {
	head -c 100000 /dev/urandom >"$BATS_TEST_TMPDIR/blob"
	mq put --whole q <"$BATS_TEST_TMPDIR/blob"
	mq peek q -f '%s' >"$BATS_TEST_TMPDIR/out"
	cmp "$BATS_TEST_TMPDIR/blob" "$BATS_TEST_TMPDIR/out"
}

@test "put --whole excludes -0, -K and message arguments" {
	run -64 mq put --whole -0 q </dev/null
	run -64 mq put --whole -K : q </dev/null
	run -64 mq put --whole q msg </dev/null
	[ -z "$(ls -A "$MQ_SPOOL")" ]
}

@test "put -k: the key is stored and the same key always lands in the same partition" {
	mq create q --partitions 4
	for round in 1 2 3; do
		for k in a b c d alpha gamma; do
			mq put q -k "$k" "$k-$round"
		done
	done
	run -0 mq peek q -f '%p %k\n'
	[ "${#lines[@]}" -eq 18 ]
	# every key in exactly one partition, the one mq.h defines (FNV-1a % N)
	run -0 bash -c "'$MQ' peek q -f '%k %p\n' | sort -u"
	local want="" k
	for k in a alpha b c d gamma; do
		want+="$k $(key_partition "$k" 4)"$'\n'
	done
	assert_eq "$output" "${want%$'\n'}"
	# a b c d hash to 0 1 2 3: all four partitions are used
	assert_eq "$(mq peek q -p 2 -f '%s\n' | sort | tr '\n' ' ')" "c-1 c-2 c-3 gamma-1 gamma-2 gamma-3 "
}

@test "put -k: key order is kept within its partition" {
	mq create q --partitions 4
	seq 200 | mq put q -k order-key
	local p
	p=$(key_partition order-key 4)
	run -0 mq peek q -p "$p"
	assert_eq "$output" "$(seq 200)"
}

@test "put -K: each line is KEY DELIM BODY; a line without the delimiter has no key" {
	printf 'k1:v1\nk2:v2\nnokey\nk3:a:b\n:empty-key\n' | mq put q -K :
	run -0 mq peek q -f json
	[ "${#lines[@]}" -eq 5 ]
	assert_eq "$(json_eval '[d["key"], d["body"]]' <<<"${lines[0]}")" '["k1", "v1"]'
	assert_eq "$(json_eval '[d["key"], d["body"]]' <<<"${lines[1]}")" '["k2", "v2"]'
	assert_eq "$(json_eval '[d["key"], d["body"]]' <<<"${lines[2]}")" '[null, "nokey"]'
	assert_eq "$(json_eval '[d["key"], d["body"]]' <<<"${lines[3]}")" '["k3", "a:b"]'
	assert_eq "$(json_eval '[d["key"], d["body"]]' <<<"${lines[4]}")" '["", "empty-key"]'
}

@test "put -K: a multi-byte delimiter, and keys choose partitions" {
	mq create q --partitions 4
	printf 'a=>1\nb=>2\nc=>3\nd=>4\n' | mq put q -K '=>'
	run -0 mq peek q -f '%k %s %p\n'
	assert_eq "$(sort <<<"$output")" "$(printf 'a 1 %s\nb 2 %s\nc 3 %s\nd 4 %s' \
		"$(key_partition a 4)" "$(key_partition b 4)" "$(key_partition c 4)" "$(key_partition d 4)")"
}

@test "put -K needs a non-empty delimiter and excludes -k" {
	run -64 --separate-stderr mq put q -K '' x
	[[ "$stderr" == "mq: put: "* ]]
	run -64 mq put q -K : -k key x
	[ -z "$(ls -A "$MQ_SPOOL")" ]
}

@test "put -t: the tag is stored with every message" {
	mq put q -t red one two
	mq put q three
	run -0 mq peek q -f '%t|%s\n'
	assert_eq "$output" "$(printf 'red|one\nred|two\n|three')"
	run -0 mq peek q -f json
	assert_eq "$(json_eval 'd["tag"]' <<<"${lines[0]}")" red
	assert_eq "$(json_eval 'd["tag"]' <<<"${lines[2]}")" null
}

@test "put -H: headers in order, shown by %h and in json" {
	mq put q -H a=b -H c=d -H 'e=x=y' msg
	run -0 mq peek q -f '%h'
	assert_eq "$output" "a=b,c=d,e=x=y"
	run -0 mq peek q -f json
	assert_eq "$(json_eval 'd["headers"]' <<<"$output")" '{"a": "b", "c": "d", "e": "x=y"}'
	[[ "$output" == *'"headers":{"a":"b","c":"d","e":"x=y"}'* ]]
}

@test "put -H: an empty value is allowed; a header without NAME= is a usage error" {
	mq put q -H 'a=' msg
	run -0 mq peek q -f '[%h]'
	assert_eq "$output" "[a=]"
	run -64 --separate-stderr mq put q -H novalue msg
	[[ "$stderr" == *"novalue"* ]]
	run -64 mq put q -H =v msg
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 1
}

@test "put -p: writes to the given partition" {
	mq create q --partitions 3
	mq put q -p 2 x y
	seq 5 | mq put q --partition 1
	run -0 mq peek q -f '%p:%o:%s\n'
	assert_eq "$(sort <<<"$output")" "$(printf '1:0:1\n1:1:2\n1:2:3\n1:3:4\n1:4:5\n2:0:x\n2:1:y')"
}

@test "put -p: a partition the queue does not have is a usage error (64), nothing stored" {
	mq create q
	run -64 --separate-stderr mq put q -p 9 x
	[[ "$stderr" == *"partition 9"* ]]
	run -64 mq put q -p x x
	run -1 mq peek q
	mq create q4 --partitions 4
	run -64 mq put q4 -p 4 x
	run -1 mq peek q4
}

@test "put --print-offsets: PARTITION:OFFSET per message in input order" {
	mq create q --partitions 4
	# a b c d hash to partitions 0 1 2 3
	run -0 --separate-stderr mq put q --print-offsets -K : < <(printf 'a:1\nb:2\na:3\nc:4\nd:5\n')
	assert_eq "$output" "$(printf '0:0\n1:0\n0:1\n2:0\n3:0')"
	run -0 mq put q --print-offsets -k d six seven
	assert_eq "$output" "$(printf '3:1\n3:2')"
	run -0 mq put q --print-offsets -p 0 eight
	assert_eq "$output" "0:2"
	run -0 mq peek q -p 0 -f '%o=%s '
	assert_eq "$output" "0=1 1=3 2=eight "
}

@test "put --print-offsets: one line per message for a long input" {
	run -0 mq put q --print-offsets < <(seq 3000)
	assert_eq "$output" "$(seq 0 2999 | sed 's/^/0:/')"
}

@test "put --no-create: a missing queue is 66 and nothing is created" {
	run -66 --separate-stderr mq put --no-create q x
	[[ "$stderr" == "mq: put: q: "* ]]
	[ -z "$(ls -A "$MQ_SPOOL")" ]
	mq create q
	run -0 mq put --no-create q x
	run -0 mq peek q
	assert_eq "$output" x
}

@test "put: the queue is created on first use with the default settings" {
	[ ! -e "$MQ_SPOOL/q" ]
	run -0 mq put q hello
	[ -d "$MQ_SPOOL/q" ]
	[ -f "$MQ_SPOOL/q/meta.yaml" ]
	run -0 mq ls
	assert_eq "$output" q
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["partitions"]' <<<"$output")" 1
}

@test "put: the spool directory itself is created on first use" {
	local_only "\$MQ_SPOOL names the spool of local commands; a server has made its own"
	export MQ_SPOOL="$BATS_TEST_TMPDIR/new/deeper/spool"
	run -0 mq put q x
	run -0 mq peek q
	assert_eq "$output" x
}

@test "put --fsync: always, batch, interval and never all store the messages" {
	local m
	for m in always batch interval:100ms never; do
		run -0 mq put "new-${m%%:*}" --fsync "$m" a b
		seq 3 | mq put shared --fsync "$m"
	done
	for m in always batch interval never; do
		run -0 mq peek "new-$m"
		assert_eq "$output" "$(printf 'a\nb')"
	done
	run -0 mq peek shared
	assert_eq "$output" "$(printf '1\n2\n3\n1\n2\n3\n1\n2\n3\n1\n2\n3')"
}

@test "put --fsync interval: a slow stream is visible before the put ends" {
	mq create q
	exec {w}> >(mq put q --fsync interval:50ms)
	local p=$!
	echo first >&$w
	wait_for '[ "$(mq peek q)" = first ]' 10
	echo second >&$w
	exec {w}>&-
	wait "$p"
	run -0 mq peek q
	assert_eq "$output" "$(printf 'first\nsecond')"
}

@test "put --fsync: a bad mode is a usage error (64) and creates nothing" {
	local m bad=""
	for m in foo interval: interval:0ms ALWAYS; do
		run --separate-stderr mq put q --fsync "$m" x
		[ "$status" -eq 64 ] && [[ "$stderr" == "mq: put: "*"$m"* ]] ||
			bad+="--fsync '$m': exit $status: $stderr"$'\n'
		[ ! -e "$MQ_SPOOL/q" ] || bad+="--fsync '$m' created the queue"$'\n'
		rm -rf "${MQ_SPOOL:?}/q"
	done
	assert_eq "$bad" ""
}

@test "put --fsync applies to this command only; it is not stored with a queue it creates" {
	mq put q --fsync never x
	run -0 mq config q
	grep -E '^fsync: batch +# built-in default$' <<<"$output"
	! grep -q fsync "$MQ_SPOOL/q/meta.yaml"
}

@test "put: a message over max-message-bytes is 65; the earlier lines are stored" {
	mq create big --max-message-bytes 1k
	{
		echo one
		echo two
		head -c 2000 /dev/zero | tr '\0' a
		echo
		echo four
	} >"$BATS_TEST_TMPDIR/in"
	run -65 --separate-stderr mq put big <"$BATS_TEST_TMPDIR/in"
	[[ "$stderr" == "mq: put: big: "* ]]
	[[ "$stderr" == *"message 3"* ]]
	[[ "$stderr" == *"1024"* ]]
	[ "$(wc -l <<<"$stderr")" -eq 1 ]
	run -0 mq peek big
	assert_eq "$output" "$(printf 'one\ntwo')"
}

@test "put: max-message-bytes is inclusive: 1024 bytes pass, 1025 do not" {
	mq create big --max-message-bytes 1k
	run -0 mq put big "$(head -c 1024 /dev/zero | tr '\0' b)"
	run -65 --separate-stderr mq put big "$(head -c 1025 /dev/zero | tr '\0' c)"
	[[ "$stderr" == *"1024"* ]]
	run -0 mq stat --json big
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 1
	run -0 mq peek big -f '%s'
	[ "${#output}" -eq 1024 ]
}

@test "put: a 50 MB line on a default queue fails 65 at once and stores nothing of it" {
	local t0 t1
	t0=$(now_ms)
	run -65 --separate-stderr bash -c "head -c 50000000 /dev/zero | tr '\0' a | '$MQ' put q"
	t1=$(now_ms)
	[[ "$stderr" == *"mq: put: q: message 1 "*"4194304"* ]]
	# refused as soon as the limit is passed, not after reading 50 MB
	[ $((t1 - t0)) -lt 5000 ]
	run -1 mq peek q
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 0
	[ "$(du -sk "$MQ_SPOOL/q" | cut -f1)" -lt 1024 ]
}

@test "put: lines before a 50 MB line are stored, the rest is not" {
	run -65 bash -c "{ echo before; head -c 50000000 /dev/zero | tr '\0' a; echo; echo after; } | '$MQ' put q"
	run -0 mq peek q
	if via_server; then
		# through a server the requests sent after the refused message may
		# have stored what followed it (mq(1), "Through a server")
		[[ "$output" == before || "$output" == $'before\nafter' ]]
	else
		assert_eq "$output" before
	fi
}

@test "put: order is preserved for 10000 lines" {
	seq 10000 | mq put q
	mq peek q | cmp - <(seq 10000)
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 10000
}

@test "put: two concurrent writers lose nothing and keep their own order" {
	mq create q
	seq 1 5000 | sed 's/^/a/' | mq put q &
	local p1=$!
	seq 1 5000 | sed 's/^/b/' | mq put q
	wait "$p1"
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 10000
	cmp <(mq peek q | grep '^a') <(seq 1 5000 | sed 's/^/a/')
	cmp <(mq peek q | grep '^b') <(seq 1 5000 | sed 's/^/b/')
	mq peek q -f '%o\n' | cmp - <(seq 0 9999)
}

@test "put: missing queue argument is a usage error" {
	run -64 --separate-stderr mq put
	[[ "$stderr" == "mq: put: missing arguments"* ]]
}

@test "put --print-offsets: with stdout closed it fails (74) and writes nothing into the spool" {
	mq put q a
	run -74 --separate-stderr bash -c "'$MQ' put q --print-offsets b c >&-"
	[[ "$stderr" == "mq: put: q: "* ]]
	# the messages themselves are stored; no offsets landed in a spool file
	run -0 mq peek q
	assert_eq "$output" "$(printf 'a\nb\nc')"
	assert_eq "$(find "$MQ_SPOOL" -name lock -size +0 | wc -l)" 0
	run -0 mq verify q
}

@test "put: SIGTERM stops reading, stores what was read and exits 143" {
	mq create q
	mkfifo "$BATS_TEST_TMPDIR/fifo"
	"$MQ" put q <"$BATS_TEST_TMPDIR/fifo" &
	local p=$!
	BG_PIDS+=("$p")
	exec {w}>"$BATS_TEST_TMPDIR/fifo"
	printf 'one\ntwo\n' >&$w
	wait_for '[ "$(mq peek q | wc -l)" -eq 2 ]' 10
	kill -TERM "$p"
	local rc=0
	wait "$p" || rc=$?
	exec {w}>&-
	assert_eq "$rc" 143
	run -0 mq peek q
	assert_eq "$output" "$(printf 'one\ntwo')"
}

@test "put: SIGINT stops reading, stores what was read and exits 130" {
	mq create q
	mkfifo "$BATS_TEST_TMPDIR/fifo"
	"$MQ" put q <"$BATS_TEST_TMPDIR/fifo" &
	local p=$!
	BG_PIDS+=("$p")
	exec {w}>"$BATS_TEST_TMPDIR/fifo"
	printf 'whole\npart' >&$w
	wait_for '[ "$(mq peek q)" = whole ]' 10
	kill -INT "$p"
	local rc=0
	wait "$p" || rc=$?
	exec {w}>&-
	assert_eq "$rc" 130
	run -0 mq stat --json q
	[ "$(json_eval 'd["messages"]' <<<"$output")" -ge 1 ]
	run -0 mq peek q -n 1
	assert_eq "$output" whole
}

@test "put -0 -K: keys with NUL-separated messages" {
	printf 'k1:v1\0k2:v\n2\0' | mq put q -0 -K :
	run -0 mq peek q -f '[%k][%s]\n'
	assert_eq "$output" "$(printf '[k1][v1]\n[k2][v\n2]')"
}

@test "put --whole: the default limit is 4 MiB exactly" {
	head -c 4194304 /dev/zero | mq put q --whole
	run -65 --separate-stderr bash -c "head -c 4194305 /dev/zero | '$MQ' put q --whole"
	[[ "$stderr" == *"4194304"* ]]
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 1
	assert_eq "$(mq peek q -f '%s' | wc -c)" 4194304
}

@test "put --print-offsets: offsets of a slow stream appear before the input ends" {
	mq create q
	mkfifo "$BATS_TEST_TMPDIR/fifo"
	"$MQ" put q --print-offsets <"$BATS_TEST_TMPDIR/fifo" >"$BATS_TEST_TMPDIR/offsets" &
	local p=$!
	BG_PIDS+=("$p")
	exec {w}>"$BATS_TEST_TMPDIR/fifo"
	echo one >&$w
	wait_for "[ \"\$(cat '$BATS_TEST_TMPDIR/offsets')\" = 0:0 ]" 10
	echo two >&$w
	wait_for "[ \"\$(cat '$BATS_TEST_TMPDIR/offsets')\" = '$(printf '0:0\n0:1')' ]" 10
	exec {w}>&-
	wait "$p"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/offsets")" "$(printf '0:0\n0:1')"
}

# ----- put --id: idempotent producers -----

@test "put --id: a retried put of the same id stores nothing and says so (exit 0)" {
	mq create q --partitions 4
	run -0 --separate-stderr mq put q --id order-42 --print-offsets hello
	local first=$output
	run -0 --separate-stderr mq put q --id order-42 --print-offsets hello
	assert_eq "$output" ""
	[[ "$stderr" == *"id 'order-42' is already stored (partition ${first%%:*} offset ${first#*:}"*"nothing stored"* ]]
	run -0 mq peek q -f '%s %h\n'
	assert_eq "$output" "hello mq-id=order-42"
	# Without a key the partition is the id's hash: a retry lands in the same one.
	assert_eq "${first%%:*}" "$(key_partition order-42 4)"
	# Another id is stored.
	mq put q --id order-43 hello
	[ "$(mq peek q | wc -l)" -eq 2 ]
}

@test "put --id: a whole multi-line put is one unit in one partition" {
	mq create q --partitions 3
	seq 1 5 | mq put q --id batch-1
	seq 1 5 | mq put q --id batch-1
	run -0 mq peek q -f '%p %s\n'
	[ "${#lines[@]}" -eq 5 ]
	[ "$(cut -d' ' -f1 <<<"$output" | sort -u | wc -l)" -eq 1 ]
}

@test "put --id: only within dedupe-window" {
	mq create q --dedupe-window 1s
	mq put q --id x one
	mq put q --id x two
	sleep 1.2
	mq put q --id x three
	run -0 mq peek q
	assert_eq "$output" "$(printf 'one\nthree')"
}

@test "put --id: concurrent puts of one id store it once" {
	mq create q --partitions 2
	for n in 1 2 3 4 5 6 7 8; do mq put q --id same "v$n" 2>/dev/null & done
	wait_jobs
	[ "$(mq peek q | wc -l)" -eq 1 ]
}

@test "put --id: usage errors" {
	run -64 --separate-stderr mq put q --id '' x
	run -64 --separate-stderr mq put q --id a -K : k:x
	run -64 --separate-stderr mq put q --id a --delay 1s x
	[ ! -e "$MQ_SPOOL/q/0/head" ] || [ "$(mq peek q | wc -l)" -eq 0 ]
}
