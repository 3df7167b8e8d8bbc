#!/usr/bin/env bats
# Transactions (half messages): put --txn stores messages in one file under
# QUEUE/txn/ (see "Transactions (half messages)" in mq.h and "Transactions:
# half messages" in mq.c), invisible to every reader, and prints the id
# QUEUE:HHHHHHHHHHHHHHHH; `mq txn commit ID` moves them into their
# partitions all at once, `mq txn rollback ID` discards them, `mq txn ls`
# lists the open ones and `mq txn check` asks a command about old ones.
#
# The rules checked:
#  - nothing of an open transaction is visible (get, peek, tail, stat,
#    a waiting get -w); a commit makes all of it visible at once (a reader
#    polling a partition sees none or all, also when the commit rolls
#    segments), in put order per partition, keys choosing partitions,
#    stamped with the moment of commit;
#  - commit and rollback are idempotent; the one that comes second exits
#    65 ("already committed" / "already rolled back"), also when both
#    race; an unknown id exits 66, a malformed one 64;
#  - --txn excludes --id, --delay, --at and --print-offsets (64, nothing
#    stored);
#  - ls: a header and one line per open transaction, nothing when none;
#    --json: an array;
#  - check runs its command for transactions older than --older (default
#    txn-check-after) with the bodies on stdin and the transaction in the
#    environment: 0 commits, 1 rolls back, anything else asks again, up to
#    --max-checks (default txn-max-checks) unknown answers, then rolls back;
#    the check count is kept; an end by the producer meanwhile stands; a
#    put still writing is left alone;
#  - a commit killed at any write, sync, truncate, unlink or open is
#    finished by the next commit: every message exactly once, in order, and
#    `mq verify` passes (also when the resumed commit is killed again, or an
#    ordinary put or another transaction's commit comes in between);
#  - a rollback killed anywhere is finished by the next one, nothing
#    visible; a put --txn killed anywhere prints no id and shows nothing,
#    and check removes what it left.
bats_require_minimum_version 1.5.0
load helper

# Under the sanitizer build a process costs much more: fewer of them.
# BIG_N: messages (~1 KiB) of the transaction the crash tests commit.
BIG_N=1500 RACE_ROUNDS=20
[ -z "${MQ_ASAN:-}" ] || { BIG_N=1200 RACE_ROUNDS=10; }

# The system interpreter starts faster than a pyenv shim.
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3

# Transaction files of queue $1 (their 16 hex digit names, sorted).
txn_files() {
	local d="$MQ_SPOOL/$1/txn"
	[ -d "$d" ] || return 0
	find "$d" -maxdepth 1 -type f -regextype posix-extended -regex '.*/[0-9a-f]{16}' -printf '%f\n' | sort
}

# put --txn "$@": must exit 0 with one valid id of queue $1 and nothing on
# stderr; the id goes to TXN.
put_txn() {
	local q=$1 err=$BATS_TEST_TMPDIR/put_txn.err
	shift
	TXN=$("$MQ" put --txn "$q" "$@" 2>"$err") || { echo "put --txn $q exited $?" >&2; cat "$err" >&2; return 1; }
	[ ! -s "$err" ] || { echo "put --txn $q wrote to stderr:" >&2; cat "$err" >&2; return 1; }
	[[ "$TXN" =~ ^$q:[0-9a-f]{16}$ ]] || { echo "put --txn $q printed [$TXN]" >&2; return 1; }
}

# Poll until the clock reaches $1 (ms since the epoch).
wait_until_ms() {
	wait_for "[ \$(now_ms) -ge $1 ]" $((($1 - $(now_ms)) / 1000 + 5))
}

# One line "PARTITION KEY TAG HEADERS TIMESTAMP BODY" per JSON message on
# stdin.
json_fields() {
	"$PY" -c 'import json, sys
for l in sys.stdin:
    d = json.loads(l)
    h = ",".join("%s=%s" % kv for kv in sorted(d["headers"].items()))
    print(d["partition"], d["key"] or "-", d["tag"] or "-", h or "-", d["timestamp"], d["body"])'
}

@test "txn: put --txn stores invisibly and prints one id; commit shows all at once, in order, stamped at the commit" {
	mq create q
	mq put q before
	t_put=$(now_ms)
	run -0 --separate-stderr mq put --txn q -k K -t T -H a=b -H 'c=d e' m1 m2 m3
	assert_eq "$stderr" ""
	assert_eq "${#lines[@]}" 1
	[[ "$output" =~ ^q:[0-9a-f]{16}$ ]]
	id=$output
	# stdin lines, a second transaction
	run -0 --separate-stderr mq put --txn q <<<$'s1\ns2'
	[[ "$output" =~ ^q:[0-9a-f]{16}$ ]]
	id2=$output
	[ "$id" != "$id2" ]
	assert_eq "$(txn_files q)" "$(printf '%s\n' "${id#q:}" "${id2#q:}" | sort)"

	# Invisible to every reader.
	run -0 mq peek q
	assert_eq "$output" before
	run -0 mq tail q
	assert_eq "$output" before
	run -0 mq stat --json q
	assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 1
	run -0 mq get q -g other -n 0
	assert_eq "$output" before
	run -0 mq get q -n 0
	assert_eq "$output" before
	run -1 mq get q -n 0

	# The commit time is later than the put's.
	wait_until_ms $((t_put + 50))
	tc0=$(now_ms)
	run -0 --separate-stderr mq txn commit "$id"
	tc1=$(now_ms)
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	run -0 mq stat --json q
	assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 4
	run -0 mq get q -n 0
	assert_eq "$output" "$(printf '%s\n' m1 m2 m3)"
	run -0 mq get q -g other -n 0
	assert_eq "$output" "$(printf '%s\n' m1 m2 m3)"
	run -0 mq tail q
	assert_eq "$output" "$(printf '%s\n' before m1 m2 m3)"
	# Key, tag and headers kept; one timestamp, the moment of commit.
	run -0 mq peek q --from 1 -f json
	run -0 json_fields <<<"$output"
	assert_eq "${#lines[@]}" 3
	ts=$(echo "${lines[0]}" | awk '{ print $(NF - 1) }')
	[ "$ts" -ge "$tc0" ] && [ "$ts" -le "$tc1" ]
	assert_eq "$output" "$(printf "0 K T a=b,c=d e $ts %s\n" m1 m2 m3)"

	# The other one is still invisible, and still listed.
	assert_eq "$(txn_files q)" "${id2#q:}"
	run -0 mq txn ls q
	assert_eq "${#lines[@]}" 2
	[[ "${lines[1]}" == "$id2 "* ]]
	run -1 mq get q -n 0
	run -0 mq txn commit "$id2"
	run -0 mq get q -n 0
	assert_eq "$output" "$(printf '%s\n' s1 s2)"

	# Idempotent, nothing more appears; nothing left open.
	run -0 --separate-stderr mq txn commit "$id"
	assert_eq "$output$stderr" ""
	run -0 mq txn commit "$id2"
	run -1 mq get q -n 0
	run -0 mq stat --json q
	assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 6
	run -0 mq txn ls
	assert_eq "$output" ""
	assert_eq "$(txn_files q)" ""
	run -0 mq verify
}

@test "txn: rollback discards; both ends are idempotent and the second of them exits 65; unknown ids 66, malformed 64" {
	mq create q
	mq create r
	put_txn q c1 c2
	committed=$TXN
	put_txn q r1 r2
	rolled=$TXN

	run -0 --separate-stderr mq txn rollback "$rolled"
	assert_eq "$output$stderr" ""
	run -1 mq peek q
	run -0 mq txn rollback "$rolled"
	run -65 --separate-stderr mq txn commit "$rolled"
	[[ "$stderr" == *"already rolled back"* ]]
	assert_eq "$output" ""

	run -0 mq txn commit "$committed"
	run -0 mq txn commit "$committed"
	run -65 --separate-stderr mq txn rollback "$committed"
	[[ "$stderr" == *"already committed"* ]]
	assert_eq "$output" ""
	# Still there, once.
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' c1 c2)"
	# And the outcomes are still known after more transactions.
	put_txn q later
	run -0 mq txn rollback "$TXN"
	run -65 mq txn commit "$rolled"
	run -65 mq txn rollback "$committed"
	run -0 mq txn commit "$committed"
	run -0 mq txn rollback "$rolled"
	assert_eq "$(txn_files q)" ""

	# Unknown but well-formed: 66, also for the right name in another
	# queue and for an unknown queue (which is not created).
	run -66 --separate-stderr mq txn commit q:0123456789abcdef
	[[ "$stderr" == *"no such transaction"* ]]
	run -66 mq txn rollback q:0123456789abcdef
	run -66 mq txn commit "r:${committed#q:}"
	run -66 mq txn rollback "r:${rolled#q:}"
	run -66 mq txn commit nope:0123456789abcdef
	run -66 mq txn rollback nope:0123456789abcdef
	[ ! -e "$MQ_SPOOL/nope" ]
	# Malformed: 64.
	for bad in foo q:xyz ../x:0123456789abcdef q:0123456789ABCDEF q:0123456789abcde \
		q:0123456789abcdef0 q: :0123456789abcdef "q:${committed#q:}/" 'a/b:0123456789abcdef'; do
		run -64 --separate-stderr mq txn commit "$bad"
		[[ "$stderr" == *"bad transaction id"* ]]
		run -64 mq txn rollback "$bad"
	done
	run -64 mq txn commit
	run -64 mq txn commit "$committed" "$rolled"
	run -64 mq txn frobnicate "$committed"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' c1 c2)"
	[ ! -e "$BATS_TEST_TMPDIR/x" ] && [ ! -e "$MQ_SPOOL/a" ]
}

@test "txn: --txn excludes --id, --delay, --at and --print-offsets (64), storing nothing; -0 and --whole work" {
	for opts in "--id x1" "--delay 5s" "--at $(($(date +%s) + 3600))" "--print-offsets" "--delay 0"; do
		run -64 --separate-stderr mq put --txn $opts u m
		[[ "$stderr" == *"--txn excludes"* ]]
		run -64 mq put --txn $opts q m
	done
	[ ! -e "$MQ_SPOOL/u" ] && [ ! -e "$MQ_SPOOL/q" ]
	mq create q
	run -64 mq put --txn --id x1 q m
	run -64 mq put --txn --print-offsets q m
	assert_eq "$(txn_files q)" ""
	run -0 mq txn ls
	assert_eq "$output" ""
	# --no-create on a missing queue: 66, nothing created
	run -66 mq put --txn --no-create u m
	[ ! -e "$MQ_SPOOL/u" ]

	# NUL-separated and whole input are one transaction each.
	put_txn q -0 < <(printf 'a\0b c\nd\0')
	run -0 mq txn commit "$TXN"
	put_txn q --whole < <(printf 'x\ny\n')
	run -0 mq txn commit "$TXN"
	assert_eq "$(mq get q -n 0 -0 | od -c)" "$(printf 'a\0b c\nd\0x\ny\n\0' | od -c)"
}

@test "txn: keyed messages go to their keys' partitions, in put order in each, as an ordinary put's would" {
	mq create q --partitions 3
	mq create ref --partitions 3
	seq 1 300 | awk '{ printf "k%d:b-%03d\n", $1 % 11, $1 }' >"$BATS_TEST_TMPDIR/in"
	mq put ref -K : <"$BATS_TEST_TMPDIR/in"
	put_txn q -K : -t tg <"$BATS_TEST_TMPDIR/in"
	keyed=$TXN
	put_txn q -p 2 pinned1 pinned2
	run -1 mq peek q
	run -0 mq txn ls --json q
	assert_eq "$(echo "$output" | json_eval 'sorted(t["messages"] for t in d)')" "[2, 300]"

	run -0 mq txn commit "$TXN"
	run -0 mq peek q -p 2
	assert_eq "$output" "$(printf '%s\n' pinned1 pinned2)"
	# the keyed transaction: still not visible in any partition
	run -0 mq stat --json q
	assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 2

	run -0 mq txn commit "$keyed"
	run -0 mq peek q -f '%p %k %s\n'
	grep -v pinned <<<"$output" >"$BATS_TEST_TMPDIR/got"
	mq peek ref -f '%p %k %s\n' >"$BATS_TEST_TMPDIR/want"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/got")" "$(cat "$BATS_TEST_TMPDIR/want")"
	[ "$(cut -d' ' -f1 "$BATS_TEST_TMPDIR/got" | sort -u | wc -l)" -ge 2 ]
	run -0 mq peek q --tag tg
	assert_eq "${#lines[@]}" 300
	run -0 mq verify
}

@test "txn: a waiting get -w receives a transaction's messages once committed, not before" {
	mq create q
	d=$BATS_TEST_TMPDIR
	bg sh -c '"$MQ" get q -n 0 -w 15s >"$1/get.out"; echo $? >"$1/get.rc"' _ "$d"
	put_txn q w1 w2 w3
	# A waiting get re-checks at least every second: give it a chance.
	wait_until_ms $(($(now_ms) + 1200))
	[ ! -e "$d/get.rc" ]
	assert_eq "$(cat "$d/get.out")" ""
	run -0 mq txn commit "$TXN"
	wait_for "[ -s '$d/get.rc' ]" 10
	assert_eq "$(cat "$d/get.rc")" 0
	assert_eq "$(cat "$d/get.out")" "$(printf '%s\n' w1 w2 w3)"
}

@test "txn: a reader polling during a commit sees none or all of it, also when its segment must roll for it" {
	mq create q --segment-bytes 64k
	mq put q first # the active segment has data: the commit rolls it first
	d=$BATS_TEST_TMPDIR
	pad=$(head -c 1000 /dev/zero | tr '\0' x)
	put_txn q < <(seq -f "%05g-$pad" 1 3000)
	bg sh -c 'while [ ! -e "$1/done" ]; do "$MQ" stat q | awk '"'"'$1 == "messages" { print $2 }'"'"'; done >"$1/counts"' _ "$d"
	wait_for "[ -s '$d/counts' ]" # the reader runs
	run -0 mq txn commit "$TXN"
	touch "$d/done"
	wait_for "proc_gone ${BG_PIDS[0]}"
	mq stat q | awk '$1 == "messages" { print $2 }' >>"$d/counts"
	echo "message counts seen: $(sort -n "$d/counts" | uniq -c | tr -s ' \n' ' ')" >&3
	assert_eq "$(tail -n 1 "$d/counts")" 3001
	assert_eq "$(sort -nu "$d/counts" | grep -vx -e 1 -e 3001 | tr '\n' ' ')" ""
	[ "$(ls "$MQ_SPOOL"/q/0/*.log | wc -l)" -eq 2 ] # rolled once, before
	run -0 mq verify
}

@test "txn: commit and rollback racing on one transaction: exactly one wins, the other exits 65; messages once or never" {
	mq create q --partitions 2
	d=$BATS_TEST_TMPDIR
	ids=()
	for ((i = 0; i < RACE_ROUNDS; i++)); do
		put_txn q -k "k$i" "r$i-a" "r$i-b" "r$i-c"
		ids+=("$TXN")
	done
	: >"$d/want"
	commits=0
	for ((i = 0; i < RACE_ROUNDS; i++)); do
		id=${ids[$i]}
		# alternate which one starts first
		for end in $([ $((i % 2)) = 0 ] && echo commit rollback || echo rollback commit); do
			sh -c '"$MQ" txn "$1" "$2" >"$3.out" 2>"$3.err"; echo $? >"$3.rc"' _ "$end" "$id" "$d/$end.$i" &
		done
		wait
		c=$(cat "$d/commit.$i.rc") r=$(cat "$d/rollback.$i.rc")
		assert_eq "$(cat "$d/commit.$i.out" "$d/rollback.$i.out")" ""
		case $c/$r in
		0/65)
			grep -q "already committed" "$d/rollback.$i.err"
			[ ! -s "$d/commit.$i.err" ]
			commits=$((commits + 1))
			printf 'r%d-%s\n' "$i" a "$i" b "$i" c >>"$d/want"
			;;
		65/0)
			grep -q "already rolled back" "$d/commit.$i.err"
			[ ! -s "$d/rollback.$i.err" ]
			;;
		*)
			echo "round $i: commit exited $c, rollback $r" >&2
			cat "$d/commit.$i.err" "$d/rollback.$i.err" >&2
			return 1
			;;
		esac
	done
	echo "commit won $commits of $RACE_ROUNDS" >&3
	# Exactly the winners' messages, once each, in order per transaction.
	run mq peek q
	[ "$status" -le 1 ]
	assert_eq "$(printf '%s\n' "${lines[@]}" | sort)" "$(sort "$d/want")"
	for ((i = 0; i < RACE_ROUNDS; i++)); do
		got=$(printf '%s\n' "${lines[@]}" | grep "^r$i-" | tr '\n' ' ')
		case $got in "" | "r$i-a r$i-b r$i-c ") ;; *) echo "round $i: [$got]" >&2; return 1 ;; esac
	done
	assert_eq "$(txn_files q)" ""
	run -0 mq txn ls q
	assert_eq "$output" ""
	run -0 mq verify
}

@test "txn: ls shows a header and one line per open transaction, nothing when none; --json is an array" {
	run -0 --separate-stderr mq txn ls
	assert_eq "$output$stderr" ""
	run -0 mq txn ls --json
	assert_eq "$(echo "$output" | json_eval 'd')" "[]"
	mq create q
	mq create r
	mq put q visible
	run -0 mq txn ls
	assert_eq "$output" ""
	run -0 mq txn ls q
	assert_eq "$output" ""
	run -66 mq txn ls nope
	run -64 mq txn ls q r

	t0=$(now_ms)
	put_txn q a1 a2 a3
	qa=$TXN
	put_txn q b1
	qb=$TXN
	put_txn r c1 c2
	rc=$TXN
	t1=$(now_ms)

	run -0 --separate-stderr mq txn ls
	assert_eq "$stderr" ""
	assert_eq "${#lines[@]}" 4
	assert_eq "$(echo "${lines[0]}" | tr -s ' ')" "ID AGE CHECKS MESSAGES STATE"
	assert_eq "$(printf '%s\n' "${lines[@]:1}" | awk '{ print $1, $3, $4, $5 }' | sort)" \
		"$(printf '%s\n' "$qa 0 3 open" "$qb 0 1 open" "$rc 0 2 open" | sort)"
	# AGE is a duration
	printf '%s\n' "${lines[@]:1}" | awk '{ print $2 }' | grep -Evq '^[0-9]+(ms|s)$' && return 1

	run -0 mq txn ls q
	assert_eq "${#lines[@]}" 3
	assert_eq "$(printf '%s\n' "${lines[@]:1}" | awk '{ print $1, $4 }' | sort)" \
		"$(printf '%s\n' "$qa 3" "$qb 1" | sort)"

	run -0 mq txn ls --json
	run -0 json_eval 'sorted((t["id"], t["queue"], t["checks"], t["messages"], t["state"]) for t in d)' <<<"$output"
	want=$(printf '["%s", "%s", 0, %d, "open"]\n' "$qa" q 3 "$qb" q 1 "$rc" r 2 | LC_ALL=C sort | paste -sd'|' - | sed 's/|/, /g')
	assert_eq "$output" "[$want]"
	run -0 mq txn ls --json r
	run -0 "$PY" -c '
import json, sys
d = json.loads(sys.argv[1])
t0, t1 = int(sys.argv[2]), int(sys.argv[3])
assert isinstance(d, list) and len(d) == 1, d
t = d[0]
assert t["id"] == sys.argv[4] and t["queue"] == "r" and t["messages"] == 2, t
assert t0 <= t["created"] <= t1, (t0, t, t1)
assert t["age_ms"] >= 0, t
' "$output" "$t0" "$t1" "$rc"

	# Ended ones disappear.
	run -0 mq txn commit "$qa"
	run -0 mq txn rollback "$qb"
	run -0 mq txn ls q
	assert_eq "$output" ""
	run -0 mq txn ls
	assert_eq "${#lines[@]}" 2
	[[ "${lines[1]}" == "$rc "* ]]
	run -0 mq txn rollback "$rc"
	run -0 mq txn ls
	assert_eq "$output" ""
	run -0 mq txn ls --json
	assert_eq "$(echo "$output" | json_eval 'd')" "[]"
}

@test "txn: check runs CMD only on transactions older than --older, with the bodies on stdin and the transaction in the environment" {
	mq create q
	d=$BATS_TEST_TMPDIR
	export D=$d
	put_txn q -k K1 -t T1 -H order-id=7 m1 'm 2'
	id=$TXN
	put_txn q plain
	plain=$TXN
	# Fresh: the default --older (1m) skips them, the command never runs.
	run -0 --separate-stderr mq txn check q -- sh -c 'touch "$D/ran"'
	assert_eq "$output$stderr" ""
	[ ! -e "$d/ran" ]
	run -0 mq txn check q --older 10m -- sh -c 'touch "$D/ran"'
	assert_eq "$output" ""
	[ ! -e "$d/ran" ]

	cmd='cat >"$D/in.$MQ_TXN_ID"; env | grep -E "^MQ_(HEADER_|KEY=|QUEUE=|TAG=|TXN_)" | sort >"$D/env.$MQ_TXN_ID"; exit 3'
	run -0 --separate-stderr mq txn check q --older 0 -- sh -c "$cmd"
	assert_eq "$stderr" ""
	assert_eq "$(printf '%s\n' "${lines[@]}" | sort)" \
		"$(printf '%s open (check 1 of 15)\n' "$id" "$plain" | sort)"
	assert_eq "$(cat "$d/in.$id")" "$(printf '%s\n' m1 'm 2')"
	assert_eq "$(cat "$d/in.$plain")" plain
	age=$(sed -n 's/^MQ_TXN_AGE=//p' "$d/env.$id")
	[ "$age" -ge 0 ] && [ "$age" -le 2 ]
	assert_eq "$(grep -v '^MQ_TXN_AGE=' "$d/env.$id")" "$(printf '%s\n' \
		MQ_HEADER_ORDER_ID=7 MQ_KEY=K1 MQ_QUEUE=q MQ_TAG=T1 MQ_TXN_CHECK=1 "MQ_TXN_ID=$id" MQ_TXN_MESSAGES=2)"
	# No key, tag or header: MQ_KEY and MQ_TAG empty, no MQ_HEADER_.
	assert_eq "$(grep -v '^MQ_TXN_AGE=' "$d/env.$plain")" "$(printf '%s\n' \
		MQ_KEY= MQ_QUEUE=q MQ_TAG= MQ_TXN_CHECK=1 "MQ_TXN_ID=$plain" MQ_TXN_MESSAGES=1)"

	# The count is kept: ls shows it, the next check is the second.
	run -0 mq txn ls q
	assert_eq "$(printf '%s\n' "${lines[@]:1}" | awk '{ print $1, $3 }' | sort)" \
		"$(printf '%s 1\n' "$id" "$plain" | sort)"
	run -0 mq txn check q --older 0 -- sh -c "$cmd"
	assert_eq "$(printf '%s\n' "${lines[@]}" | sort)" \
		"$(printf '%s open (check 2 of 15)\n' "$id" "$plain" | sort)"
	grep -qx MQ_TXN_CHECK=2 "$d/env.$id"
	run -0 mq txn ls --json q
	assert_eq "$(echo "$output" | json_eval '[t["checks"] for t in d]')" "[2, 2]"
	# Still invisible.
	run -1 mq peek q

	# --older is a duration: once they are that old, they are checked.
	created=$(mq txn ls --json q | json_eval 'min(t["created"] for t in d)')
	wait_until_ms $((created + 1100))
	run -0 mq txn check q --older 1s -- sh -c "$cmd"
	assert_eq "${#lines[@]}" 2
	age=$(sed -n 's/^MQ_TXN_AGE=//p' "$d/env.$id")
	[ "$age" -ge 1 ] && [ "$age" -le 3 ]
}

@test "txn: check passes every header of the first message as MQ_HEADER_<NAME>" {
	mq create q
	export D=$BATS_TEST_TMPDIR
	put_txn q -H order-id=7 -H 'x.y=a b' -H Trace=t1 m1 m2
	run -0 mq txn check q --older 0 -- sh -c 'env | grep "^MQ_HEADER_" | sort >"$D/env"; exit 3'
	assert_eq "$output" "$TXN open (check 1 of 15)"
	assert_eq "$(cat "$D/env")" "$(printf '%s\n' MQ_HEADER_ORDER_ID=7 MQ_HEADER_TRACE=t1 'MQ_HEADER_X_Y=a b')"
}

@test "txn: check's answer: 0 commits, 1 rolls back, anything else leaves it open until the last check rolls it back" {
	mq create q
	put_txn q a1 a2
	a=$TXN
	put_txn q b1
	b=$TXN
	put_txn q c1
	c=$TXN
	answer='read -r l; case $l in a*) exit 0 ;; b*) exit 1 ;; *) exit 7 ;; esac'
	run -0 --separate-stderr mq txn check q --older 0 --max-checks 3 -- sh -c "$answer"
	assert_eq "$stderr" ""
	assert_eq "$(printf '%s\n' "${lines[@]}" | sort)" \
		"$(printf '%s\n' "$a committed" "$b rolled back" "$c open (check 1 of 3)" | sort)"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' a1 a2)"
	run -0 mq txn ls q
	assert_eq "${#lines[@]}" 2
	[[ "${lines[1]}" == "$c "* ]]

	run -0 --separate-stderr mq txn check q --older 0 --max-checks 3 -- sh -c "$answer"
	assert_eq "$output$stderr" "$c open (check 2 of 3)"
	# At the last unknown answer: rolled back, saying why.
	run -0 --separate-stderr mq txn check q --older 0 --max-checks 3 -- sh -c "$answer"
	assert_eq "$output" "$c rolled back (no answer after the last check)"
	[[ "$stderr" == *"$c"*"txn-max-checks"* ]]
	run -0 mq txn ls q
	assert_eq "$output" ""
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' a1 a2)"
	run -0 mq txn commit "$a"
	run -0 mq txn rollback "$b"
	run -0 mq txn rollback "$c"
	run -65 --separate-stderr mq txn commit "$c"
	[[ "$stderr" == *"already rolled back"* ]]

	# A command that cannot run, or dies of a signal, is an unknown answer.
	put_txn q d1
	d=$TXN
	run -0 --separate-stderr mq txn check q --older 0 -- "$BATS_TEST_TMPDIR/no-such-command"
	assert_eq "$output" "$d open (check 1 of 15)"
	[[ "$stderr" == *"cannot run"* ]]
	run -0 mq txn check q --older 0 -- sh -c 'kill -9 $$'
	assert_eq "$output" "$d open (check 2 of 15)"
	# A command that reads none of its input answers too.
	run -0 mq txn check q --older 0 -- true
	assert_eq "$output" "$d committed"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' a1 a2 d1)"
	assert_eq "$(txn_files q)" ""
}

@test "txn: a big transaction's check command may leave stdin unread; the answer still counts" {
	mq create q
	put_txn q < <(seq -f 'big-%06g' 1 200000)
	run -0 mq txn check q --older 0 -- sh -c 'exit 1'
	assert_eq "$output" "$TXN rolled back"
	put_txn q < <(seq -f 'big-%06g' 1 200000)
	run -0 mq txn check q --older 0 -- sh -c 'head -n 1 >/dev/null'
	assert_eq "$output" "$TXN committed"
	run -0 mq stat --json q
	assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 200000
}

@test "txn: txn-check-after and txn-max-checks (create options or mq.yaml) are check's defaults; bad check arguments" {
	mq create q --txn-check-after 0 --txn-max-checks 2
	put_txn q m
	run -0 mq txn check q -- sh -c 'exit 5'
	assert_eq "$output" "$TXN open (check 1 of 2)"
	run -0 --separate-stderr mq txn check q -- sh -c 'exit 5'
	assert_eq "$output" "$TXN rolled back (no answer after the last check)"
	[[ "$stderr" == *"txn-max-checks"* ]]

	printf 'queues:\n  y:\n    txn-check-after: 1s\n    txn-max-checks: 1\n' >"$MQ_SPOOL/mq.yaml"
	mq create y
	t0=$(now_ms)
	put_txn y m
	run -0 mq txn check y -- sh -c 'exit 5'
	[ "$(now_ms)" -lt $((t0 + 1000)) ] # (else the check above was not of a young one)
	assert_eq "$output" ""
	# --older and --max-checks win over the settings.
	run -0 mq txn check y --older 0 --max-checks 4 -- sh -c 'exit 5'
	assert_eq "$output" "$TXN open (check 1 of 4)"
	wait_until_ms $((t0 + 1100))
	run -0 --separate-stderr mq txn check y -- sh -c 'exit 5'
	assert_eq "$output" "$TXN rolled back (no answer after the last check)"
	run -1 mq peek y

	run -64 mq txn check y --max-checks 0 -- true
	run -64 mq txn check y --max-checks x -- true
	run -64 --separate-stderr mq txn check y --older soon -- true
	[[ "$stderr" == *"bad duration 'soon'"* ]]
	run -64 mq txn check y
	run -64 mq txn check y --
	run -64 mq txn check
	run -66 mq txn check nope -- true
	[ ! -e "$MQ_SPOOL/nope" ]
}

@test "txn: a commit or rollback by the producer while check's command runs stands against its answer" {
	mq create q
	put_txn q p1 p2
	run -0 mq txn check q --older 0 -- sh -c '"$MQ" txn commit "$MQ_TXN_ID" || exit 9; exit 1'
	assert_eq "$output" "$TXN committed"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' p1 p2)"
	put_txn q n1
	run -0 mq txn check q --older 0 -- sh -c '"$MQ" txn rollback "$MQ_TXN_ID" || exit 9; exit 0'
	assert_eq "$output" "$TXN rolled back"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' p1 p2)"
	put_txn q u1
	run -0 mq txn check q --older 0 --max-checks 1 -- sh -c '"$MQ" txn commit "$MQ_TXN_ID" || exit 9; exit 4'
	assert_eq "$output" "$TXN committed"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' p1 p2 u1)"
	assert_eq "$(txn_files q)" ""
}

@test "txn: a put --txn still reading its input is neither listed nor checked nor removed; it completes afterwards" {
	mq create q
	d=$BATS_TEST_TMPDIR
	mkfifo "$d/in"
	bg sh -c '"$MQ" put --txn q <"$1/in" >"$1/id"; echo $? >"$1/rc"' _ "$d"
	exec {w}>"$d/in"
	printf 'a\nb\n' >&"$w"
	wait_for '[ -n "$(txn_files q)" ]'
	f=$(txn_files q)
	run -0 mq txn ls
	assert_eq "$output" ""
	run -0 mq txn check q --older 0 -- sh -c 'touch "$1/ran"' _ "$d"
	assert_eq "$output" ""
	[ ! -e "$d/ran" ]
	assert_eq "$(txn_files q)" "$f"
	printf 'c\n' >&"$w"
	exec {w}>&-
	wait_for "[ -s '$d/rc' ]"
	assert_eq "$(cat "$d/rc")" 0
	assert_eq "$(cat "$d/id")" "q:$f"
	run -0 mq txn ls q
	assert_eq "$(echo "${lines[1]}" | awk '{ print $1, $4, $5 }')" "q:$f 3 open"
	run -0 mq txn commit "q:$f"
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' a b c)"
}

# ----- crashes -----

# A template spool: queue q (3 partitions, 64 KiB segments) with an open
# transaction T of BIG_N keyed ~1 KiB messages "KEY:t-NNNNN-xxx..." (a
# commit writes several batches per partition and rolls segments) and a
# small one T2 of 30 keyed messages "o-NNN"; TEMPLATE.exp lists T's
# messages as "P t-NNNNN" (P its partition), in order.  Each round copies it.
setup_file() {
	local t=$BATS_FILE_TMPDIR/template pad
	pad=$(head -c 1000 /dev/zero | tr '\0' x)
	mkdir -p "$t" "$t.ref"
	MQ_SPOOL=$t "$MQ" create q --partitions 3 --segment-bytes 64k
	seq -f '%05g' 1 "$BIG_N" | awk -v pad="$pad" '{ printf "k%d:t-%s-%s\n", $1 % 13, $1, pad }' |
		MQ_SPOOL=$t "$MQ" put --txn q -K : >"$t.id"
	seq 1 30 | awk '{ printf "k%d:o-%03d\n", $1 % 13, $1 }' |
		MQ_SPOOL=$t "$MQ" put --txn q -K : >"$t.id2"
	seq 1 30 | awk '{ printf "o-%03d\n", $1 }' >"$t.other"
	seq 1 60 | awk '{ printf "k%d:e-%03d\n", $1 % 13, $1 }' >"$t.extra_in"
	seq 1 60 | awk '{ printf "e-%03d\n", $1 }' >"$t.extra"
	# Each key's partition, as an ordinary put places it.
	MQ_SPOOL=$t.ref "$MQ" create ref --partitions 3
	seq 0 12 | awk '{ printf "k%d:x\n", $1 }' | MQ_SPOOL=$t.ref "$MQ" put ref -K :
	MQ_SPOOL=$t.ref "$MQ" peek ref -f '%k:%p\n' >"$t.parts"
	seq -f '%05g' 1 "$BIG_N" | awk -F: 'NR == FNR { part[$1] = $2; next }
		{ print part["k" ($1 % 13)], "t-" $1 }' "$t.parts" - >"$t.exp"
}

# The template: sets TEMPLATE, TID (T's id), TNAME (its file) and TID2.
crash_template() {
	TEMPLATE=$BATS_FILE_TMPDIR/template
	TID=$(cat "$TEMPLATE.id")
	TID2=$(cat "$TEMPLATE.id2")
	TNAME=${TID#q:}
	[[ "$TID" =~ ^q:[0-9a-f]{16}$ ]] && [[ "$TID2" =~ ^q:[0-9a-f]{16}$ ]]
	assert_eq "$(wc -l <"$TEMPLATE.exp")" "$BIG_N"
	assert_eq "$(cut -d' ' -f1 "$TEMPLATE.exp" | sort -u | tr -d '\n')" 012
}

# mq-fault with MQ_FAULT=$1 and the remaining arguments; FRC gets its
# status, which must be 0 or 137 (killed).
faulted() {
	local f=$1
	shift
	FRC=0
	{ MQ_FAULT=$f "$MQ_FAULT_BIN" "$@" >/dev/null 2>&3; } 3>&2 2>/dev/null || FRC=$?
	[ "$FRC" -eq 0 ] || [ "$FRC" -eq 137 ] || { echo "$f: mq-fault $* exited $FRC" >&2; return 1; }
}

# check_seen WHAT MODE [EXTRA]: what queue q shows of T.  MODE prefix:
# in each partition none or all of T's messages there (a partition shows
# a commit at once; PEEKED gets how many in all); MODE full: all of them in each partition, in order, and besides
# them exactly the lines of file EXTRA (if given), each once.
check_seen() {
	local what=$1 mode=$2 extra=${3:-/dev/null} rc=0 raw=$BATS_TEST_TMPDIR/seen
	"$MQ" peek q -f '%p %s\n' >"$raw" || rc=$?
	[ "$rc" -le 1 ] || { echo "$what: peek exited $rc" >&2; return 1; }
	PEEKED=$(awk -v mode="$mode" -v what="$what" '
		function bad(m) { if (nbad++ < 5) print what ": " m >"/dev/stderr" }
		FILENAME == ARGV[1] { want[$1, ++nwant[$1]] = $2; next }
		FILENAME == ARGV[2] { extra[$1]++; next }
		{ b = substr($2, 1, 7) }
		b ~ /^t-/ {
			k = ++seen[$1]
			if (want[$1, k] != b)
				bad("partition " $1 ": message " k " of T there is " b ", want " want[$1, k])
			n++
			next
		}
		{ other[b]++ }
		END {
			if (mode == "prefix")
				for (p in seen)
					if (seen[p] != nwant[p])
						bad("partition " p ": " seen[p] " of T'"'"'s " nwant[p] " messages: part of a commit")
			if (mode == "full") {
				for (p in nwant)
					if (seen[p] + 0 != nwant[p])
						bad("partition " p ": " seen[p] + 0 " of T'"'"'s " nwant[p] " messages")
				for (b in other)
					if (other[b] != extra[b])
						bad(b ": " other[b] " times, want " extra[b] + 0)
				for (b in extra)
					if (other[b] + 0 != extra[b])
						bad(b ": " other[b] + 0 " times, want " extra[b])
			}
			print n + 0
			exit nbad > 0
		}' "$TEMPLATE.exp" "$extra" "$raw")
}

# Sweep a kill at the N-th call of $1 in `txn commit T`, N = 1, 2, ...
# until the faulted commit completes.  After each kill, the transaction
# is still listed and the queue shows a prefix of it; hook $2 (if any)
# runs; then a normal commit finishes it: everything once, in order,
# `mq verify` passes, its file is gone.  SWEEP_PARTIAL gets how many
# rounds were killed after the decision (T listed as committing).
sweep() {
	local call=$1 hook=${2:-} n partial=0 st
	for ((n = 1; ; n++)); do
		[ "$n" -le 400 ] || { echo "$call: no commit completed after 400 calls" >&2; return 1; }
		rm -rf "$MQ_SPOOL"
		cp -a "$TEMPLATE" "$MQ_SPOOL"
		faulted "$call:$n:kill" txn commit "$TID" || return 1
		check_seen "$call:$n" prefix || return 1
		if [ "$FRC" -ne 0 ]; then
			st=$("$MQ" txn ls q | awk -v id="$TID" '$1 == id { print $5 }')
			[ "$st" != committing ] || partial=$((partial + 1))
			case $st in open | committing) ;; *)
				echo "$call:$n: after the kill, txn ls says [$st] of it" >&2
				return 1
				;;
			esac
		fi
		[ -z "$hook" ] || "$hook" "$call:$n" || return 1
		"$MQ" txn commit "$TID" || { echo "$call:$n: the commit after the kill exited $?" >&2; return 1; }
		check_seen "$call:$n" full "${EXTRA:-}" || return 1
		"$MQ" verify >/dev/null || { echo "$call:$n: mq verify exited $?" >&2; return 1; }
		[ ! -e "$MQ_SPOOL/q/txn/$TNAME" ] || { echo "$call:$n: its file is left" >&2; return 1; }
		[ "$FRC" -ne 0 ] || break
	done
	echo "$call: $n rounds, $partial killed after the decision" >&3
	SWEEP_PARTIAL=$partial
}

@test "txn: a commit killed at every pwrite, fdatasync, ftruncate, unlink and open is finished by the next: all once, in order" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	crash_template
	for call in pwrite fdatasync ftruncate unlink open; do
		sweep "$call"
		case $call in
		pwrite | fdatasync) [ "$SWEEP_PARTIAL" -ge 3 ] ;; # the kills did land mid-commit
		esac
	done
	# The last round's commit went whole into each partition's segment,
	# past segment-bytes: rolling mid-commit would publish part of it.
	[ "$(ls "$MQ_SPOOL"/q/*/*.log | wc -l)" -eq 3 ]
	run -0 mq txn commit "$TID"
	run -65 mq txn rollback "$TID"
	run -0 mq txn ls q
	assert_eq "$(echo "${lines[1]}" | awk '{ print $1, $4, $5 }')" "$TID2 30 open"
	assert_eq "${#lines[@]}" 2
}

# The resumed commit is killed again at the same call; then, before the
# next one, an ordinary put appends to every partition.
again_then_put() {
	local frc=$FRC
	faulted "$1:kill" txn commit "$TID" || return 1
	FRC=$frc # the sweep goes on until the first commit completes
	check_seen "$1 again" prefix || return 1
	"$MQ" put q -K : <"$TEMPLATE.extra_in" || { echo "$1: the put between exited $?" >&2; return 1; }
}

@test "txn: a commit killed, killed again while resuming, then an ordinary put before it resumes: nothing lost or doubled" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	crash_template
	EXTRA=$TEMPLATE.extra sweep fdatasync again_then_put
	[ "$SWEEP_PARTIAL" -ge 3 ]
}

# Another transaction (T2, keyed to the same partitions) is committed
# before T's interrupted commit resumes.
commit_between() {
	"$MQ" txn commit "$TID2" || { echo "$1: the commit of T2 between exited $?" >&2; return 1; }
}

@test "txn: a commit killed, then another transaction committed before it resumes: both complete, nothing lost or doubled" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	crash_template
	EXTRA=$TEMPLATE.other sweep fdatasync commit_between
	[ "$SWEEP_PARTIAL" -ge 3 ]
}

@test "txn: a rollback killed at every pwrite, fdatasync, open and unlink is finished by the next rollback; nothing visible" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	local tpl=$BATS_TEST_TMPDIR/tpl
	MQ_SPOOL=$tpl mq create q --partitions 3
	MQ_SPOOL=$tpl put_txn q -K : < <(seq 1 60 | awk '{ printf "k%d:r-%03d\n", $1 % 13, $1 }')
	id=$TXN
	for call in pwrite fdatasync open unlink; do
		for ((n = 1; ; n++)); do
			[ "$n" -le 50 ] || { echo "$call: no rollback completed after 50 calls" >&2; return 1; }
			rm -rf "$MQ_SPOOL"
			cp -a "$tpl" "$MQ_SPOOL"
			faulted "$call:$n:kill" txn rollback "$id"
			run -1 mq peek q
			run -0 mq txn rollback "$id"
			run -0 mq txn rollback "$id"
			run -65 --separate-stderr mq txn commit "$id"
			[[ "$stderr" == *"already rolled back"* ]]
			run -1 mq peek q
			run -0 mq txn ls
			assert_eq "$output" ""
			assert_eq "$(txn_files q)" ""
			[ "$FRC" -ne 0 ] || break
		done
		echo "$call: $n rounds" >&3
	done
	run -0 mq verify
}

@test "txn: a put --txn killed at any pwrite, fdatasync, fsync, ftruncate or open shows nothing and prints no id; check removes what it left" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	local pad in=$BATS_TEST_TMPDIR/in
	pad=$(head -c 1000 /dev/zero | tr '\0' x)
	seq -f '%03g' 1 300 | awk -v pad="$pad" '{ printf "k%d:m-%s-%s\n", $1 % 13, $1, pad }' >"$in"
	rounds=0 sealed=0
	for call in pwrite fdatasync fsync ftruncate open; do
		for ((n = 1; ; n++)); do
			[ "$n" -le 50 ] || { echo "$call: no put completed after 50 calls" >&2; return 1; }
			q=$call-$n
			mq create "$q" --partitions 3
			rc=0
			{ MQ_FAULT=$call:$n:kill "$MQ_FAULT_BIN" put --txn "$q" -K : <"$in" >"$BATS_TEST_TMPDIR/id" 2>&3; } 3>&2 2>/dev/null || rc=$?
			rounds=$((rounds + 1))
			if [ "$rc" -eq 0 ]; then
				id=$(cat "$BATS_TEST_TMPDIR/id")
				[[ "$id" =~ ^$q:[0-9a-f]{16}$ ]]
				run -1 mq peek "$q"
				run -0 mq txn commit "$id"
				run -0 mq stat --json "$q"
				assert_eq "$(echo "$output" | json_eval 'd["messages"]')" 300
				break
			fi
			assert_eq "$rc" 137
			assert_eq "$(cat "$BATS_TEST_TMPDIR/id")" "" # no id: never acknowledged
			run -1 mq peek "$q"
			# Listed only if its slot was written (then complete and open).
			run -0 mq txn ls --json "$q"
			n_ls=$(echo "$output" | json_eval 'len(d)')
			[ "$n_ls" -eq 0 ] || assert_eq "$(echo "$output" | json_eval '[(t["messages"], t["state"]) for t in d]')" '[[300, "open"]]'
			# check: a file without a slot is removed; a sealed one is
			# committed (the command says yes).
			run -0 mq txn check "$q" --older 0 -- true
			assert_eq "$(txn_files "$q")" ""
			run -0 mq txn ls "$q"
			assert_eq "$output" ""
			run -0 mq stat --json "$q"
			m=$(echo "$output" | json_eval 'd["messages"]')
			case $n_ls/$m in
			0/0) ;;
			1/300) sealed=$((sealed + 1)) ;;
			*)
				echo "$call:$n: listed $n_ls, then $m messages visible" >&2
				return 1
				;;
			esac
			# The next put --txn on the queue works.
			put_txn "$q" after
			run -0 mq txn commit "$TXN"
			run -0 mq peek "$q"
			assert_eq "${#lines[@]}" $((m + 1))
			assert_eq "$(printf '%s\n' "${lines[@]}" | grep -c '^after$')" 1
		done
		echo "$call: $n rounds" >&3
	done
	echo "$rounds rounds, $sealed killed after the slot was written" >&3
	run -0 mq verify
}
