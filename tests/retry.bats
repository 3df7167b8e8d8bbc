#!/usr/bin/env bats
# Retries and dead letters: --retries and --backoff (command line, mq
# create, mq.yaml); after the last retry a message goes to QUEUE.dlq with
# mq-dlq-* headers; mq consume goes on past failed runs (--ordered keeps
# a partition's order); mq move brings dead letters back; kill -9 of a
# consumer loses nothing.
bats_require_minimum_version 1.5.0
load helper

CRASH_N=300
[ -z "${MQ_ASAN:-}" ] || CRASH_N=100


wait_until() { wait_for "[ \$(now_ms) -ge $1 ]" 30; }

# [lag, leased, retrying, offsets] of group $2 of queue $1.
gstate() {
	"$MQ" groups --json "$1" |
		json_eval "[[g[k] for k in ('lag', 'leased', 'retrying', 'offsets')] for g in d if g['group'] == '$2'][0]"
}

# Header $2 of the dead letter at offset $1 of q.dlq (null if missing).
dlq_hdr() {
	"$MQ" peek q.dlq --from "$1" -n 1 -f json | json_eval "d['headers'].get('$2')"
}

@test "retries: a message nacked past --retries goes to Q.dlq with its key, tag, headers and mq-dlq-* headers" {
	mq create q --retries 2 --backoff 1s
	mq put q -k K1 -t T1 -H src=web -H n=1 first
	mq put q second
	ts=$(mq peek q -n 1 -f json | json_eval 'd["timestamp"]')
	for a in 1 2 3; do
		run -0 --separate-stderr mq get q -g G --lease 60s -f '%r %a %s\n'
		[[ "$output" =~ ^(G:0:0:[0-9]+)\ $a\ first$ ]]
		run -0 --separate-stderr mq nack q --delay 0 "${BASH_REMATCH[1]}"
	done
	[[ "$stderr" == *"q/0: group 'G': offsets 0-0 failed 3 times (last: nack); moved to q.dlq"* ]]
	run -0 mq get q -g G --lease 60s -f '%r %a %s\n'
	[[ "$output" =~ ^(G:0:1:[0-9]+)\ 1\ second$ ]]
	mq ack q "${BASH_REMATCH[1]}"
	assert_eq "$(gstate q G)" "[0, 0, 0, [2]]"
	run -1 mq get q -g G --lease 60s
	# The dead letter, once.
	run -0 mq peek q.dlq -f json
	assert_eq "${#lines[@]}" 1
	assert_eq "$(json_eval '[d["key"], d["tag"], d["body"]]' <<<"$output")" '["K1", "T1", "first"]'
	assert_eq "$(json_eval 'd["headers"]' <<<"$output")" \
		"{\"src\": \"web\", \"n\": \"1\", \"mq-dlq-queue\": \"q\", \"mq-dlq-group\": \"G\", \"mq-dlq-partition\": \"0\", \"mq-dlq-offset\": \"0\", \"mq-dlq-attempts\": \"3\", \"mq-dlq-reason\": \"nack\", \"mq-dlq-timestamp\": \"$ts\"}"
}

@test "retries: the backoff list gives each retry its delay and the last one repeats" {
	mq create q --backoff 300ms,1500ms
	mq put q a
	r=$(mq get q -g G --lease 60s -f '%r')
	# Retry 1 after 300ms.
	t=$(now_ms)
	mq nack q "$r"
	run -0 poll_get q -g G --lease 60s -f '%r %a'
	[ "$(now_ms)" -lt $((t + 1400)) ]
	[[ "$output" =~ ^(G:0:0:[0-9]+)\ 2$ ]]
	# Retry 2 after 1500ms, and retry 3 after 1500ms again.
	for a in 3 4; do
		t=$(now_ms)
		mq nack q "${BASH_REMATCH[1]}"
		wait_until $((t + 800))
		run -1 mq get q -g G --lease 60s
		run -0 poll_get q -g G --lease 60s -f '%r %a'
		[ "$(now_ms)" -ge $((t + 1500)) ]
		[[ "$output" =~ ^(G:0:0:[0-9]+)\ $a$ ]]
	done
	# Space-separated on the command line too: nack --backoff.
	t=$(now_ms)
	mq nack q --backoff '100ms 200ms' "${BASH_REMATCH[1]}"
	run -0 poll_get q -g G --lease 60s -f '%a'
	[ "$(now_ms)" -lt $((t + 1200)) ]
	assert_eq "$output" 5
	run -64 --separate-stderr mq create q2 --backoff '1s soon'
	run -64 --separate-stderr mq get q -g G --backoff ''
	run -64 --separate-stderr mq get q -g G --retries -1
	run -64 --separate-stderr mq consume q -g G --retries x -- true
}

@test "retries: get --retries 0 buries an expired lease (reason 'lease expired'); nack --retries 0 buries at once" {
	mq put q -H h=v a b
	r=$(mq get q -g G --lease 1s -f '%r')
	t=$(now_ms)
	r_b=$(mq get q -g G --lease 60s -f '%r')
	wait_until $((t + 1100))
	run -1 --separate-stderr mq get q -g G --lease 60s --retries 0
	[[ "$stderr" == *"offsets 0-0 failed 1 times (last: lease expired); moved to q.dlq"* ]]
	assert_eq "$(dlq_hdr 0 mq-dlq-reason)" "lease expired"
	assert_eq "$(dlq_hdr 0 mq-dlq-attempts)" 1
	assert_eq "$(dlq_hdr 0 h)" v
	run -0 --separate-stderr mq nack q --retries 0 "$r_b"
	assert_eq "$(dlq_hdr 1 mq-dlq-reason)" nack
	assert_eq "$(dlq_hdr 1 mq-dlq-offset)" 1
	assert_eq "$(mq peek q.dlq -f '%s\n' | tr '\n' ' ')" "a b "
	assert_eq "$(gstate q G)" "[0, 0, 0, [2]]"
	# The old receipt's message is done (buried): acking it is fine.
	run -0 mq ack q "$r"
}

@test "retries: mq.yaml sets them per queue; mq create's and the command line's win" {
	cat >"$MQ_SPOOL/mq.yaml" <<'EOF'
defaults:
  retries: 5
queues:
  q:
    retries: 1
    backoff: 200ms
EOF
	reload_config
	run -0 mq config q
	[[ "$output" == *"retries: 1 "* && "$output" == *"backoff: 200ms "* ]]
	mq put q x
	log=$BATS_TEST_TMPDIR/log
	cmd=(sh -c 'echo "$(cat) $MQ_ATTEMPT" >>"$0"; exit 4' "$log")
	run -0 --separate-stderr mq consume q -g w -- "${cmd[@]}"
	[[ "$stderr" == *"(exit status 4, attempt 1 of 2); retry in 200ms"* ]]
	wait_for "mq consume q -g w -- ${cmd[*]@Q} 2>/dev/null; grep -qx 'x 2' '$log'"
	assert_eq "$(cat "$log")" "$(printf 'x 1\nx 2')"
	assert_eq "$(dlq_hdr 0 mq-dlq-attempts)" 2
	assert_eq "$(dlq_hdr 0 mq-dlq-reason)" "exit status 4"
	# --retries on the command line overrides mq.yaml (1) for this run.
	mq put q y
	run -0 --separate-stderr mq consume q -g w --retries 0 -- "${cmd[@]}"
	assert_eq "$(mq peek q.dlq -f '%s\n' | tr '\n' ' ')" "x y "
	# mq create's setting overrides mq.yaml defaults.
	mq create q3 --retries 0
	mq put q3 z
	run -0 --separate-stderr mq consume q3 -g w -- false
	[[ "$stderr" == *"moved to q3.dlq"* ]]
	run -0 mq peek q3.dlq
	assert_eq "$output" z
}

@test "consume: a failing run doesn't stop it; the message comes back with MQ_ATTEMPT 2, 3, then goes to Q.dlq" {
	mq create q --retries 2 --backoff 1s
	mq put q -k K -H h=v bad
	mq put q ok1 ok2
	log=$BATS_TEST_TMPDIR/log
	cmd=(sh -c 'b=$(cat); echo "$b $MQ_ATTEMPT" >>"$0"; [ "$b" != bad ] || exit 3' "$log")
	run -0 --separate-stderr mq consume q -g w -- "${cmd[@]}"
	assert_eq "$output" ""
	assert_eq "$stderr" "mq: 'sh' failed on q/0 offset 0 (exit status 3, attempt 1 of 3); retry in 1s"
	assert_eq "$(cat "$log")" "$(printf 'bad 1\nok1 1\nok2 1')"
	assert_eq "$(gstate q w)" "[1, 0, 1, [0]]"
	# Not before the backoff.
	run -0 mq consume q -g w -- "${cmd[@]}"
	assert_eq "$(wc -l <"$log")" 3
	wait_for "mq consume q -g w -- ${cmd[*]@Q} 2>>'$BATS_TEST_TMPDIR/err'; grep -qx 'bad 3' '$log'"
	assert_eq "$(cat "$log")" "$(printf 'bad 1\nok1 1\nok2 1\nbad 2\nbad 3')"
	[[ "$(cat "$BATS_TEST_TMPDIR/err")" == *"(exit status 3, attempt 2 of 3); retry in 1s"*"q/0: group 'w': offsets 0-0 failed 3 times (last: exit status 3); moved to q.dlq"* ]]
	assert_eq "$(gstate q w)" "[0, 0, 0, [3]]"
	run -0 mq peek q.dlq -f '%k %s\n'
	assert_eq "$output" "K bad"
	assert_eq "$(dlq_hdr 0 h)" v
	assert_eq "$(dlq_hdr 0 mq-dlq-group)" w
	assert_eq "$(dlq_hdr 0 mq-dlq-attempts)" 3
	run -0 mq consume q -g w -- "${cmd[@]}"
	assert_eq "$(wc -l <"$log")" 5
}

@test "consume: reasons of dead letters: exit status, killed by signal 9, timed out" {
	mq put q -k e exit
	mq put q -k k kill
	mq put q -k t slow
	mq put q -k o fine
	run -0 --separate-stderr mq consume q -g w --retries 0 --timeout 500ms -- \
		sh -c 'case $(cat) in exit) exit 3;; kill) kill -9 $$;; slow) exec sleep 10;; esac'
	[[ "$stderr" == *"moved to q.dlq"* ]]
	run -0 mq peek q.dlq -f json
	assert_eq "${#lines[@]}" 3
	for l in "${lines[@]}"; do
		json_eval '"%s=%s/%s/%s" % (d["key"], d["headers"]["mq-dlq-reason"], d["headers"]["mq-dlq-attempts"], d["headers"]["mq-dlq-offset"])' <<<"$l"
	done >"$BATS_TEST_TMPDIR/reasons"
	assert_eq "$(sort "$BATS_TEST_TMPDIR/reasons")" \
		"$(printf 'e=exit status 3/1/0\nk=killed by signal 9/1/1\nt=timed out/1/2')"
	assert_eq "$(gstate q w)" "[0, 0, 0, [4]]"
}

@test "consume -w: a waiting consumer runs the retry once it is due" {
	mq create q --backoff 300ms
	mq put q x
	log=$BATS_TEST_TMPDIR/log
	run -0 --separate-stderr mq consume q -g w -w 2s -- \
		sh -c 'echo "$(cat) $MQ_ATTEMPT" >>"$0"; [ "$MQ_ATTEMPT" -ge 2 ]' "$log"
	assert_eq "$(cat "$log")" "$(printf 'x 1\nx 2')"
	assert_eq "$(gstate q w)" "[0, 0, 0, [1]]"
}

@test "consume --ordered: a failed message blocks its partition until its retry is done; order is kept" {
	local_only "consume --ordered exits 64 through a server"
	mq create q --partitions 2 --retries 1 --backoff 1s
	mq put q -p 0 a1 a2 a3
	mq put q -p 1 b1 b2 b3
	log=$BATS_TEST_TMPDIR/log
	# a2 fails once; b2 always (to q.dlq after its retry).
	cmd=(sh -c 'b=$(cat); echo "$b $MQ_ATTEMPT" >>"$0"
		case $b in a2) [ "$MQ_ATTEMPT" -gt 1 ];; b2) exit 1;; esac' "$log")
	run -0 --separate-stderr mq consume q -g w --ordered -- "${cmd[@]}"
	assert_eq "$(grep '^a' "$log")" "$(printf 'a1 1\na2 1')"
	assert_eq "$(grep '^b' "$log")" "$(printf 'b1 1\nb2 1')"
	assert_eq "$(gstate q w)" "[4, 0, 2, [1, 1]]"
	# Nothing runs while the retries wait.
	run -0 --separate-stderr mq consume q -g w --ordered -- "${cmd[@]}"
	assert_eq "$(wc -l <"$log")" 4
	wait_for "mq consume q -g w --ordered -- ${cmd[*]@Q} 2>/dev/null; grep -q a3 '$log' && grep -q b3 '$log'"
	assert_eq "$(grep '^a' "$log")" "$(printf 'a1 1\na2 1\na2 2\na3 1')"
	assert_eq "$(grep '^b' "$log")" "$(printf 'b1 1\nb2 1\nb2 2\nb3 1')"
	assert_eq "$(mq peek q.dlq)" b2
	assert_eq "$(gstate q w)" "[0, 0, 0, [3, 3]]"
	# Without --ordered the messages after a failed one go on at once.
	mq create u --backoff 1h
	mq put u a1 a2 a3
	run -0 --separate-stderr mq consume u -g w -- "${cmd[@]}"
	assert_eq "$(tail -n 3 "$log")" "$(printf 'a1 1\na2 1\na3 1')"
}

@test "move: dead letters back to the queue without mq-dlq-* headers; again only new ones; -n, -g" {
	local_only "move exits 64 through a server"
	mq create q --retries 0
	mq put q -k K -t T -H h=v m1
	mq put q m2
	run -0 --separate-stderr mq consume q -g w -- false
	assert_eq "$(mq peek q.dlq -f '%s\n' | tr '\n' ' ')" "m1 m2 "
	run -0 --separate-stderr mq move q.dlq q
	run -0 mq peek q --from 2 -f json
	assert_eq "${#lines[@]}" 2
	assert_eq "$(json_eval '[d["key"], d["tag"], d["headers"], d["body"]]' <<<"${lines[0]}")" \
		'["K", "T", {"h": "v"}, "m1"]'
	assert_eq "$(json_eval '[d["key"], d["tag"], d["headers"], d["body"]]' <<<"${lines[1]}")" \
		'[null, null, {}, "m2"]'
	# Nothing new: 1, and nothing moved twice.
	run -1 --separate-stderr mq move q.dlq q
	assert_eq "$(mq peek q | wc -l)" 4
	# The moved messages are new ones: attempt 1, and they can succeed now.
	run -0 mq consume q -g w -- sh -c 'echo "$(cat) $MQ_ATTEMPT"'
	assert_eq "$output" "$(printf 'm1 1\nm2 1')"
	# New dead letters: only they move; -n limits how many.
	mq put q m3 m4 m5
	run -0 --separate-stderr mq consume q -g w -- false
	run -0 --separate-stderr mq move -n 2 q.dlq q
	assert_eq "$(mq peek q --from 7 -f '%s\n' | tr '\n' ' ')" "m3 m4 "
	run -0 --separate-stderr mq move q.dlq q
	assert_eq "$(mq peek q --from 7 -f '%s\n' | tr '\n' ' ')" "m3 m4 m5 "
	run -1 --separate-stderr mq move q.dlq q
	# Another group reads the source from the start.
	run -0 --separate-stderr mq move -g again q.dlq other
	assert_eq "$(mq peek other -f '%s\n' | tr '\n' ' ')" "m1 m2 m3 m4 m5 "
	run -0 mq peek other -f '%h'
	assert_eq "$(tr -d '\n' <<<"$output")" "h=v"
	run -64 --separate-stderr mq move q q
	run -64 --separate-stderr mq move q
	run -66 --separate-stderr mq move nosuch q
	run -64 --separate-stderr mq move -g ../x q.dlq q
}

@test "crash: kill -9 of mq consume while its command runs: the message is delivered again" {
	mq put q a b
	t=$BATS_TEST_TMPDIR
	"$MQ" consume q -g w -- sh -c 'cat >>"$0"; echo $$ >"$0.pid"; exec sleep 30' "$t/out" &
	pid=$!
	BG_PIDS+=("$pid")
	wait_for "[ -s '$t/out.pid' ]"
	BG_PIDS+=("$(cat "$t/out.pid")")
	kill -9 "$pid"
	wait "$pid" || true
	kill -9 "$(cat "$t/out.pid")"
	assert_eq "$(cat "$t/out")" a
	run -0 mq consume q -g w -- sh -c 'echo "$(cat) $MQ_ATTEMPT"'
	if via_server; then
		# through a server consume leased a for an hour (no --timeout):
		# it comes again when that lease runs out (mq(1), "Through a server")
		assert_eq "$output" "b 1"
		run -1 mq get q -g w
		assert_lease_held q w 1
		return 0
	fi
	[[ "$output" == "a "[12]$'\n'"b 1" ]]
	run -1 mq get q -g w
}

@test "crash: mq consume killed at random over and over: every message is run, none lost" {
	local_only "through a server a killed consume's batch stays leased for an hour (--timeout plus a minute)"
	local t=$BATS_TEST_TMPDIR N=$CRASH_N rounds=0 rc killed=0
	seq 1 "$N" | mq put q
	mkdir "$t/runs"
	while :; do
		rounds=$((rounds + 1))
		[ "$rounds" -le 400 ] || { echo "not done after 400 rounds" >&2; return 1; }
		rc=0
		timeout -s KILL "0.0$((RANDOM % 60 + 10))" \
			"$MQ" consume q -g w --batch 7 -- sh -c 'cat >"$0/$$"' "$t/runs" 2>>"$t/err" || rc=$?
		case $rc in
		0) [ "$(mq groups --json q | json_eval 'd[0]["lag"]')" = 0 ] && break ;;
		137) killed=$((killed + 1)) ;;
		*) echo "consume exited $rc" >&2; return 1 ;;
		esac
	done
	echo "$rounds rounds, $killed killed"
	[ "$killed" -gt 0 ]
	# A run's input may be cut short by the kill: only whole lines count.
	for f in "$t"/runs/*; do complete_lines "$f"; done | sort -n -u >"$t/all"
	assert_eq "$(cat "$t/all")" "$(seq 1 "$N")"
	assert_eq "$(mq groups --json q | json_eval 'd[0]["offsets"]')" "[$N]"
	run -66 --separate-stderr mq peek q.dlq
}
