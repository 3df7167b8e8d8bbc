#!/usr/bin/env bats
# mq ls, mq stat and mq config: listing, counters, lag, settings and
# their sources, and mq.yaml checking.
bats_require_minimum_version 1.5.0
load helper

# ----- ls -----

@test "ls: an empty or missing spool lists nothing" {
	run -0 --separate-stderr mq ls
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	run -0 mq ls --json
	assert_eq "$output" "[]"
	MQ_SPOOL="$BATS_TEST_TMPDIR/none" run -0 mq ls
	assert_eq "$output" ""
	[ ! -e "$BATS_TEST_TMPDIR/none" ]
}

@test "ls: queues sorted, one per line, hidden entries left out" {
	mq create zeta
	mq put alpha x
	mq create Mid
	mq create b.2
	mq create b-1
	mkdir "$MQ_SPOOL/.new-half.123"
	touch "$MQ_SPOOL/stray-file"
	run -0 mq ls
	assert_eq "$output" "$(printf 'Mid\nalpha\nb-1\nb.2\nzeta')"
	run -0 mq ls --json
	assert_eq "$output" '["Mid","alpha","b-1","b.2","zeta"]'
	assert_eq "$(json_eval 'len(d)' <<<"$output")" 5
}

@test "ls: a removed queue is no longer listed" {
	mq create a
	mq create b
	mq rm a
	run -0 mq ls
	assert_eq "$output" b
}

@test "ls: takes no arguments" {
	run -64 mq ls q
}

# ----- stat -----

@test "stat: partitions, messages, bytes, segments and group lag" {
	mq create q --partitions 2
	seq 5 | mq put q -p 0
	seq 3 | mq put q -p 1
	mq get q -g g1 -n 0 >/dev/null
	mq get q -g g2 -n 1 >/dev/null
	run -0 --separate-stderr mq stat q
	assert_eq "$stderr" ""
	assert_eq "${lines[0]}" q
	grep -Eqx '  partitions +2' <<<"$output"
	grep -Eqx '  messages +8' <<<"$output"
	grep -Eqx '  segments +2' <<<"$output"
	local bytes
	bytes=$(grep -E '^  bytes' <<<"$output" | awk '{print $2}')
	# bytes: segment logs and their indexes
	assert_eq "$bytes" "$(cat "$MQ_SPOOL"/q/*/*.{log,idx,tix} | wc -c)"
	grep -Eqx '  group g1: lag 0, offsets 0:5 1:3' <<<"$output"
	grep -Eq '^  group g2: lag 7, oldest unconsumed [0-9]+(ms|s), offsets 0:(1 1:0|0 1:1)$' <<<"$output"
}

@test "stat --json: fields for one queue" {
	mq create q --partitions 2
	seq 5 | mq put q -p 0
	seq 3 | mq put q -p 1
	mq get q -n 0 >/dev/null
	mq put q -p 1 late
	mq get q -g other -n 2 >/dev/null
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["queue"]' <<<"$output")" q
	assert_eq "$(json_eval 'd["partitions"]' <<<"$output")" 2
	assert_eq "$(json_eval 'd["messages"]' <<<"$output")" 9
	assert_eq "$(json_eval 'd["segments"]' <<<"$output")" 2
	assert_eq "$(json_eval 'd["next"]' <<<"$output")" "[5, 4]"
	assert_eq "$(json_eval 'd["bytes"]' <<<"$output")" "$(cat "$MQ_SPOOL"/q/*/*.{log,idx,tix} | wc -c)"
	assert_eq "$(json_eval '[g["group"] for g in d["groups"]]' <<<"$output")" '["default", "other"]'
	assert_eq "$(json_eval 'd["groups"][0]["lag"]' <<<"$output")" 1
	assert_eq "$(json_eval 'd["groups"][0]["offsets"]' <<<"$output")" "[5, 3]"
	assert_eq "$(json_eval 'd["groups"][1]["lag"]' <<<"$output")" 7
	assert_eq "$(json_eval 'sum(d["groups"][1]["offsets"])' <<<"$output")" 2
	assert_eq "$(json_eval 'd["groups"][0]["oldest_unconsumed_age_ms"] >= 0' <<<"$output")" true
	assert_eq "$(json_eval 'd["oldest_age_ms"] >= 0' <<<"$output")" true
}

@test "stat --json: an empty queue has null ages and no groups" {
	mq create q
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["messages"], d["bytes"], d["oldest_age_ms"], d["groups"]]' <<<"$output")" \
		'[0, 0, null, []]'
	mq put q x
	mq get q >/dev/null
	run -0 mq stat --json q
	assert_eq "$(json_eval '[d["groups"][0]["lag"], d["groups"][0]["oldest_unconsumed_age_ms"]]' <<<"$output")" \
		'[0, null]'
}

@test "stat: lag follows puts and gets" {
	mq create q
	local round
	for round in 1 2 3; do
		seq 10 | mq put q
		mq get q -n 4 >/dev/null
		run -0 mq stat --json q
		assert_eq "$(json_eval 'd["groups"][0]["lag"]' <<<"$output")" $((round * 6))
		assert_eq "$(json_eval 'd["groups"][0]["offsets"]' <<<"$output")" "[$((round * 4))]"
	done
}

@test "stat: every queue without arguments; several with arguments" {
	mq put a x
	mq put b y z
	mq put c w
	run -0 mq stat --json
	assert_eq "$(json_eval '[(s["queue"], s["messages"]) for s in d]' <<<"$output")" \
		'[["a", 1], ["b", 2], ["c", 1]]'
	run -0 mq stat --json c a
	assert_eq "$(json_eval '[s["queue"] for s in d]' <<<"$output")" '["c", "a"]'
	run -0 mq stat
	assert_eq "$(grep -c '^[a-z]' <<<"$output")" 3
}

@test "stat: a missing queue is 66" {
	run -66 --separate-stderr mq stat nosuch
	[[ "$stderr" == "mq: stat: nosuch: "* ]]
	run -64 mq stat ../x
}

# ----- config -----

@test "config: built-in defaults for a queue not created yet" {
	run -0 --separate-stderr mq config q
	assert_eq "$stderr" ""
	assert_eq "${lines[0]}" "# spool: $MQ_SPOOL"
	assert_eq "${lines[1]}" "# config: $MQ_SPOOL/mq.yaml (not present)"
	assert_eq "${lines[2]}" "# queue: q (not created yet)"
	local s
	for s in 'partitions: 1' 'fsync: batch' 'segment-bytes: 64M' 'retain-age: 0' \
		'retain-bytes: 0' 'compression: none' 'max-message-bytes: 4M' 'retries: 16' \
		'backoff: 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h' 'dedupe-window: 2m' \
		"txn-check: ''" 'txn-check-after: 1m' 'txn-max-checks: 15'; do
		grep -Eqx "$s +# built-in default" <<<"$output" || {
			echo "missing: $s"
			return 1
		}
	done
	[ "${#lines[@]}" -eq 16 ]
	[ ! -e "$MQ_SPOOL/q" ]
}

@test "config: without a queue shows the spool defaults" {
	run -0 mq config
	assert_eq "${lines[0]}" "# spool: $MQ_SPOOL"
	grep -Eqx 'fsync: batch +# built-in default' <<<"$output"
	run -64 mq config ../x
	run -64 mq config a b
}

@test "config: mq.yaml defaults and per-queue settings, with file:line sources" {
	cat >"$MQ_SPOOL/mq.yaml" <<-EOF
		defaults: {fsync: always}
		queues:
		  q:
		    partitions: 3
		    segment-bytes: 1M
	EOF
	reload_config
	run -0 mq config q
	assert_eq "${lines[1]}" "# config: $MQ_SPOOL/mq.yaml"
	grep -Eqx "partitions: 3 +# $MQ_SPOOL/mq.yaml:4" <<<"$output"
	grep -Eqx "fsync: always +# $MQ_SPOOL/mq.yaml:1" <<<"$output"
	grep -Eqx "segment-bytes: 1M +# $MQ_SPOOL/mq.yaml:5" <<<"$output"
	grep -Eqx "compression: none +# built-in default" <<<"$output"
	# a new queue q gets 3 partitions; another queue only the defaults
	mq put q x
	mq put r y
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["partitions"]' <<<"$output")" 3
	[ -d "$MQ_SPOOL/q/2" ] && [ ! -e "$MQ_SPOOL/q/3" ]
	run -0 mq config r
	grep -Eqx "partitions: 1 +# .*" <<<"$output"
	grep -Eqx "fsync: always +# $MQ_SPOOL/mq.yaml:1" <<<"$output"
	grep -Eqx "segment-bytes: 64M +# built-in default" <<<"$output"
}

@test "config: the partition count is fixed when a queue is created" {
	mq put q x
	printf 'queues:\n  q:\n    partitions: 5\n' >"$MQ_SPOOL/mq.yaml"
	reload_config
	run -0 mq stat --json q
	assert_eq "$(json_eval 'd["partitions"]' <<<"$output")" 1
	run -0 mq config q
	grep -Eqx "partitions: 1 +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
	run -0 mq peek q
	assert_eq "$output" x
}

@test "config: command-line settings at create win over mq.yaml" {
	printf 'defaults:\n  segment-bytes: 8M\n  compression: zlib\n' >"$MQ_SPOOL/mq.yaml"
	reload_config
	mq create q --segment-bytes 1M
	run -0 mq config q
	grep -Eqx "segment-bytes: 1M +# $MQ_SPOOL/q/meta.yaml:[0-9]+" <<<"$output"
	grep -Eqx "compression: zlib +# $MQ_SPOOL/mq.yaml:3" <<<"$output"
}

@test "config: an unknown key in mq.yaml is 64 naming file, line and key" {
	local_only "a server reads mq.yaml at start and on SIGHUP, and keeps its old settings when the file is bad"
	printf 'defaults:\n  fsync: always\n  fsnyc: never\n' >"$MQ_SPOOL/mq.yaml"
	run -64 --separate-stderr mq config
	assert_eq "$output" ""
	assert_eq "$stderr" "mq: config: $MQ_SPOOL/mq.yaml:3: unknown key 'fsnyc'"
	# every command checks it, not only config
	run -64 --separate-stderr mq ls
	[[ "$stderr" == *"$MQ_SPOOL/mq.yaml:3: unknown key 'fsnyc'"* ]]
	run -64 mq put q x
	[ ! -e "$MQ_SPOOL/q" ]
}

@test "config: unknown keys at the top level and in a queue section" {
	local_only "a server reads mq.yaml at start and on SIGHUP, and keeps its old settings when the file is bad"
	printf 'defaults:\n  fsync: batch\nqueue:\n  q: {}\n' >"$MQ_SPOOL/mq.yaml"
	run -64 --separate-stderr mq config
	assert_eq "$stderr" "mq: config: $MQ_SPOOL/mq.yaml:3: unknown key 'queue'"
	printf 'queues:\n  q:\n    partitions: 2\n  r:\n    partitons: 3\n' >"$MQ_SPOOL/mq.yaml"
	run -64 --separate-stderr mq config q
	[[ "$stderr" == "mq: config: "*"$MQ_SPOOL/mq.yaml:5: unknown key 'partitons'" ]]
}

@test "config: a bad value in mq.yaml is 64 naming file:line" {
	local_only "a server reads mq.yaml at start and on SIGHUP, and keeps its old settings when the file is bad"
	printf '# sizes\ndefaults:\n  segment-bytes: 12x\n' >"$MQ_SPOOL/mq.yaml"
	run -64 --separate-stderr mq config
	[[ "$stderr" == "mq: config: $MQ_SPOOL/mq.yaml:3: "*"12x"*"segment-bytes"* ]]
	[ "$(wc -l <<<"$stderr")" -eq 1 ]
	local v
	for v in 'partitions: 0' 'partitions: 1025' 'fsync: sometimes' 'segment-bytes: 1k' \
		'compression: lz4' 'retain-age: 5 minutes' 'max-message-bytes: 1G'; do
		printf 'defaults:\n  %s\n' "$v" >"$MQ_SPOOL/mq.yaml"
		run -64 --separate-stderr mq config
		[[ "$stderr" == "mq: config: $MQ_SPOOL/mq.yaml:2: "* ]] || {
			echo "$v: $stderr"
			return 1
		}
	done
}

@test "config: broken YAML is 64 naming file:line" {
	local_only "a server reads mq.yaml at start and on SIGHUP, and keeps its old settings when the file is bad"
	printf 'defaults:\n  fsync: "always\n' >"$MQ_SPOOL/mq.yaml"
	run -64 --separate-stderr mq config
	[[ "$stderr" == "mq: config: $MQ_SPOOL/mq.yaml:"[0-9]* ]]
	printf 'defaults: [1, 2]\n' >"$MQ_SPOOL/mq.yaml"
	run -64 --separate-stderr mq config
	[[ "$stderr" == "mq: config: $MQ_SPOOL/mq.yaml:1: "* ]]
}

@test "config: an empty mq.yaml is an empty configuration" {
	: >"$MQ_SPOOL/mq.yaml"
	reload_config
	run -0 mq config
	assert_eq "${lines[1]}" "# config: $MQ_SPOOL/mq.yaml"
	grep -Eqx 'fsync: batch +# built-in default' <<<"$output"
}

@test "config: every value it prints is accepted back in mq.yaml" {
	mq create q --partitions 2 --fsync interval:1500ms --segment-bytes 1536k \
		--retain-age 90s --retain-bytes 10M --compression zlib --max-message-bytes 64k
	run -0 mq config q
	grep -Eqx 'retain-age: [^ ]+ +# .*' <<<"$output"
	{
		echo "defaults:"
		grep -v '^#' <<<"$output" | sed -E 's/ +#.*//; s/^/  /'
	} >"$MQ_SPOOL/mq.yaml"
	reload_config
	run --separate-stderr mq config r
	assert_eq "$stderr" ""
	assert_eq "$status" 0
	# and means the same
	run -0 mq config r
	local a b
	a=$(mq config q | grep -v '^#' | sed -E 's/ +#.*//')
	b=$(grep -v '^#' <<<"$output" | sed -E 's/ +#.*//')
	assert_eq "$b" "$a"
}

@test "config: a duration of 2d is shown as a value mq accepts" {
	mq create q --retain-age 2d
	run -0 mq config q
	local v
	v=$(grep '^retain-age:' <<<"$output" | awk '{print $2}')
	run --separate-stderr mq create r --retain-age "$v"
	assert_eq "$stderr" ""
	assert_eq "$status" 0
	run -0 mq config r
	grep -Eq "^retain-age: $v " <<<"$output"
}
