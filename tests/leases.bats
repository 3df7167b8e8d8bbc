#!/usr/bin/env bats
# Leases: get --lease hands messages out until acked by receipt (mq ack),
# given back (mq nack) or expired; mq groups counts what is leased and
# what waits for a retry.  Then kill -9 of getters and ackers, and 8
# workers over 100,000 messages.
bats_require_minimum_version 1.5.0
load helper

# Under the sanitizer build a process costs ~10x: scale counts down.
SCALE_N=100000 CRASH_N=500 CRASH_ROUNDS=60 KILL_MS=30
[ -z "${MQ_ASAN:-}" ] || { SCALE_N=20000 CRASH_N=150 CRASH_ROUNDS=25 KILL_MS=100; }

HDR=$(printf '%-20s %10s %8s %8s %10s  %s' GROUP LAG LEASED RETRYING OLDEST OFFSETS)

# Wait until the clock reaches $1 (ms since the epoch).
wait_until() { wait_for "[ \$(now_ms) -ge $1 ]" 30; }


# Field $2 of the group in `mq groups --json` of queue $1 (group $3, else the first).
gfield() {
	"$MQ" groups --json "$1" | json_eval "[g for g in d if g['group'] == '${3:-}' or '${3:-}' == ''][0]['$2']"
}

@test "get --lease: receipts and attempts; leased messages are hidden from the group until acked" {
	mq put q a b c
	run -0 --separate-stderr mq get q -g G --lease 60s -n 2 -f '%r %a %s\n'
	assert_eq "${#lines[@]}" 2
	[[ "${lines[0]}" =~ ^G:0:0:([0-9]+)\ 1\ a$ ]]
	l1=${BASH_REMATCH[1]}
	assert_eq "${lines[1]}" "G:0:1:$l1 1 b"
	r1="G:0:0:$l1" r2="G:0:1:$l1"
	run -0 --separate-stderr mq get q -g G --lease 60s -f json
	assert_eq "$(json_eval 'd["attempt"]' <<<"$output")" 1
	assert_eq "$(json_eval 'd["body"]' <<<"$output")" c
	assert_eq "$(json_eval 'd["offset"]' <<<"$output")" 2
	r3=$(json_eval 'd["receipt"]' <<<"$output")
	[[ "$r3" =~ ^G:0:2:[0-9]+$ ]]
	[ "$r3" != "G:0:2:$l1" ] # each get leases under a new id
	# All three are out: the group has nothing to give, leased or not.
	run -1 --separate-stderr mq get q -g G --lease 60s
	run -1 --separate-stderr mq get q -g G
	run -1 --separate-stderr mq get q -g G -w 300ms
	# Another group is not affected.
	run -0 mq get q -g other -n 0
	assert_eq "$output" "$(printf 'a\nb\nc')"
	run -0 mq groups q
	assert_eq "${lines[0]}" "$HDR"
	[[ "${lines[1]}" =~ ^G\ +3\ +3\ +0\ +[0-9][0-9a-z]*\ +0:0$ ]]
	[[ "${lines[2]}" =~ ^other\ +0\ +0\ +0\ +-\ +0:3$ ]]
	run -0 mq ack q "$r1" "$r2" "$r3"
	assert_eq "$output" ""
	[[ "$(mq groups q)" =~ $'\n'G\ +0\ +0\ +0\ +-\ +0:3$'\n' ]]
	run -1 mq get q -g G --lease 60s
	# New messages are leased as before.
	mq put q d
	run -0 mq get q -g G --lease 60s -f '%o %a %s\n'
	assert_eq "$output" "3 1 d"
}

@test "ack: out of order; the committed offset advances only over the acked prefix; idempotent" {
	seq 1 6 | mq put q
	mq get q -g G --lease 60s -n 6 -f '%r\n' >"$BATS_TEST_TMPDIR/r"
	mapfile -t r <"$BATS_TEST_TMPDIR/r"
	assert_eq "${#r[@]}" 6
	run -0 mq ack q "${r[1]}" "${r[3]}"
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[4, 4, 0, [0]]"
	# Acking a done message again is fine, even above the committed offset.
	run -0 mq ack q "${r[1]}"
	run -0 mq ack q "${r[0]}"
	[[ "$(mq groups q)" =~ $'\n'G\ +3\ +3\ +0\ +[0-9][0-9a-z]*\ +0:2$ ]]
	# Receipts on stdin, separated by any white space.
	run -0 mq ack q <<<"${r[4]}"$'  \t'"${r[2]}"$'\n\n'"${r[5]} "
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[0, 0, 0, [6]]"
	run -0 mq ack q "${r[@]}"
	run -1 mq get q -g G --lease 60s
	run -1 mq get q -g G
}

@test "ack: statuses: never delivered 65, malformed 64 (nothing acked), missing partition 65, no queue 66" {
	mq put q a b
	r=$(mq get q -g G --lease 60s -f '%r')
	l=${r##*:}
	# Offsets never handed out, to this group or to any.
	run -65 --separate-stderr mq ack q "G:0:1:$l"
	[[ "$stderr" == *"G:0:1:$l names a message never delivered to group 'G'"* ]]
	run -65 --separate-stderr mq ack q "G:0:9:$l"
	run -65 --separate-stderr mq ack q "H:0:0:$l"
	# A partition the queue does not have.
	run -65 --separate-stderr mq ack q "G:1:0:$l"
	run -65 --separate-stderr mq ack q "G:7:0:1"
	# Malformed receipts, alone or next to a good one: nothing is acked.
	for bad in "" G G:0 G:0:0 "G:0:0:$l:1" G:a:0:1 G::0:1 G:0:-1:1 G:0:0:x ":0:0:$l" \
		"../x:0:0:1" "G:0:0:99999999999" "G:0:0: $l"; do
		run -64 --separate-stderr mq ack q "$r" "$bad"
		[[ "$stderr" == *"bad receipt"* || "$stderr" == *"no receipts"* ]]
	done
	run -64 --separate-stderr mq ack q <<<"$r junk"
	run -64 --separate-stderr mq nack q "$r" G:0:0
	run -0 --separate-stderr mq ack q </dev/null # nothing to answer (get | ack once drained)
	assert_eq "$stderr" ""
	run -64 --separate-stderr mq ack
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("leased", "offsets")]' <<<"$output")" "[1, [0]]"
	run -66 --separate-stderr mq ack nosuch "$r"
	run -0 mq ack q "$r"
	[[ "$(mq groups q)" =~ $'\n'G\ +1\ +0\ +0\ +[0-9][0-9a-z]*\ +0:1($'\n'|$) ]]
}

@test "ack: a receipt naming a group that never read the queue is 65 and creates no group" {
	mq put q a
	run -65 --separate-stderr mq ack q typo:0:0:1
	run -65 --separate-stderr mq nack q typo:0:0:1
	# A group would hold every message against retention: none was made.
	run -0 mq groups q
	assert_eq "$output" ""
	[ ! -e "$MQ_SPOOL/q/groups/typo" ]
}

@test "ack: a receipt whose lease expired is stale (75), waiting or handed out again" {
	mq create q --backoff 1s
	mq put q a b
	run -0 --separate-stderr mq get q -g G --lease 1s -n 2 -f '%r\n'
	t=$(now_ms)
	old_a=${lines[0]} old_b=${lines[1]}
	wait_until $((t + 1100))
	# Expired, waiting out the backoff.
	run -75 --separate-stderr mq ack q "$old_a"
	[[ "$stderr" == *"receipt $old_a is stale"* ]]
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[2, 0, 2, [0]]"
	# Handed out again (attempt 2) under a new lease: the old one is still stale.
	run -0 poll_get q -g G --lease 60s -n 2 -f '%r %a %s\n'
	[[ "${lines[0]}" =~ ^(G:0:0:[0-9]+)\ 2\ a$ ]]
	new_a=${BASH_REMATCH[1]}
	[[ "${lines[1]}" =~ ^(G:0:1:[0-9]+)\ 2\ b$ ]]
	new_b=${BASH_REMATCH[1]}
	[ "$new_a" != "$old_a" ]
	run -75 --separate-stderr mq ack q "$old_b"
	[[ "$stderr" == *"stale"* ]]
	run -75 --separate-stderr mq nack q "$old_b"
	# A stale receipt next to a good one: 75, and the good one is acked.
	run -75 --separate-stderr mq ack q "$new_a" "$old_b"
	[[ "$(mq groups q)" =~ $'\n'G\ +1\ +1\ +0\ +[0-9][0-9a-z]*\ +0:1$ ]]
	run -0 mq ack q "$new_b"
	# Once the message is done, an old receipt of it is merely done too.
	run -0 mq ack q "$old_a" "$old_b"
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[0, 0, 0, [2]]"
}

@test "an expired lease comes back with attempt 2 after the backoff, counted from the expiry" {
	mq put q a
	# Group A looks right after the expiry (backoff 2s): nothing yet.
	# Group B looks only once expiry + 1s has passed (backoff 1s): it is due.
	ts=$(now_ms)
	mq get q -g A --lease 1s -f '%a %s\n' >/dev/null
	mq get q -g B --lease 1s -f '%a %s\n' >/dev/null
	te=$(now_ms)
	wait_until $((te + 1100))
	now=$(now_ms)
	run -1 mq get q -g A --lease 60s --backoff 2s
	[ "$(now_ms)" -lt $((ts + 3000)) ] || skip "too slow to look between expiry and backoff"
	[ "$(gfield q retrying A)" = 1 ]
	[ "$(gfield q leased A)" = 0 ]
	run -0 poll_get q -g A --lease 60s --backoff 2s -f '%o %a %s\n'
	assert_eq "$output" "0 2 a"
	[ "$(now_ms)" -ge $((ts + 3000)) ]
	# B: the backoff ran from the expiry, not from when B looked.
	wait_until $((te + 2100))
	run -0 mq get q -g B --lease 60s --backoff 1s -f '%o %a %s\n'
	assert_eq "$output" "0 2 a"
}

@test "nack: the message comes back with attempt+1 after --delay, else after the queue's backoff" {
	mq create q --backoff 1s
	mq put q a b
	mapfile -t r < <(mq get q -g G --lease 60s -n 2 -f '%r\n')
	run -0 mq nack q --delay 0 "${r[0]}"
	assert_eq "$output" ""
	run -0 mq get q -g G --lease 60s -f '%r %a %s\n'
	[[ "$output" =~ ^(G:0:0:[0-9]+)\ 2\ a$ ]]
	a2=${BASH_REMATCH[1]}
	# No --delay: the queue's backoff (1s).
	t=$(now_ms)
	run -0 mq nack q "$a2"
	run -1 mq get q -g G --lease 60s
	[ "$(now_ms)" -lt $((t + 1000)) ] || skip "too slow to look before the backoff"
	[ "$(gfield q retrying)" = 1 ]
	[ "$(gfield q leased)" = 1 ]
	run -0 poll_get q -g G --lease 60s -f '%r %a %s\n'
	[ "$(now_ms)" -ge $((t + 1000)) ]
	[[ "$output" =~ ^(G:0:0:[0-9]+)\ 3\ a$ ]]
	a3=${BASH_REMATCH[1]}
	# nack answers like ack: stale, never delivered.
	run -75 --separate-stderr mq nack q "${r[0]}"
	run -65 --separate-stderr mq nack q "G:0:5:1"
	run -64 --separate-stderr mq nack q --delay soon "$a3"
	run -0 mq ack q "$a3" "${r[1]}"
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[0, 0, 0, [2]]"
	run -1 mq get q -g G --lease 60s
}

@test "groups: LEASED and RETRYING columns and --json fields, per group" {
	mq create q --partitions 2
	mq put q -p 0 a b c d
	mq put q -p 1 e
	mapfile -t r < <(mq get q -g G --lease 60s -n 0 -f '%r\n')
	assert_eq "${#r[@]}" 5
	pick() { printf '%s\n' "${r[@]}" | grep "^G:$1:"; }
	# Give back offsets 1 and 2 of partition 0 for a while; ack partition 1's.
	run -0 mq nack q --delay 1h "$(pick 0:1)" "$(pick 0:2)"
	run -0 mq ack q "$(pick 1:0)"
	mq get q -g H -n 0 >/dev/null
	run -0 mq groups q
	assert_eq "${lines[0]}" "$HDR"
	[[ "${lines[1]}" =~ ^G\ +4\ +2\ +2\ +[0-9][0-9a-z]*\ +0:0\ 1:1$ ]]
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("group", "lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		'["G", 4, 2, 2, [0, 1]]'
	assert_eq "$(json_eval 'list(d[0].keys())' <<<"$output")" \
		'["group", "lag", "leased", "retrying", "oldest_unconsumed_age_ms", "offsets"]'
	assert_eq "$(json_eval '[g["leased"] + g["retrying"] for g in d[1:]]' <<<"$output")" "[0]"
}

# ----- kill -9 of getters and ackers -----

# Half the time, K=(a prefix that SIGKILLs the command 1-$KILL_MS ms after its start).
killer() {
	local d
	K=()
	if [ $((RANDOM % 2)) = 0 ]; then
		printf -v d '0.%03d' $((RANDOM % KILL_MS + 1))
		K=(timeout -s KILL "$d")
	fi
}

# One worker: get a batch under a lease, ack it; either may be killed.
# Logs "get|ack START END STATUS FILE" (times in us) per run to $t/log.$w;
# no forks but the commands', to keep the rounds quick.
crash_worker() {
	local t=$1 w=$2 rounds=$3 it s e rc f r x rs K
	for ((it = 0; it < rounds; it++)); do
		f=$t/g.$w.$it
		killer
		s=${EPOCHREALTIME/./}
		rc=0
		"${K[@]}" "$MQ" get q -g G -n 5 --lease 1s -f '%r %s\n' >"$f" 2>"$f.err" || rc=$?
		e=${EPOCHREALTIME/./}
		echo "get $s $e $rc $f" >>"$t/log.$w"
		rs=()
		while read -r r x; do rs+=("$r"); done <"$f" # whole lines only
		[ "${#rs[@]}" -gt 0 ] || continue
		printf '%s\n' "${rs[@]}" >"$f.r"
		killer
		s=${EPOCHREALTIME/./}
		rc=0
		"${K[@]}" "$MQ" ack q "${rs[@]}" 2>"$f.aerr" || rc=$?
		e=${EPOCHREALTIME/./}
		echo "ack $s $e $rc $f.r" >>"$t/log.$w"
	done
}

@test "crash: getters and ackers killed at random: nothing lost, nothing handed out while leased or once acked" {
	local t=$BATS_TEST_TMPDIR N=$CRASH_N w k
	mq create q --retries 1000 --backoff 100ms
	seq 1 "$N" | mq put q
	for w in 1 2 3 4; do
		crash_worker "$t" "$w" "$CRASH_ROUNDS" &
		BG_PIDS+=("$!")
	done
	wait_jobs
	# Drain without kills: expired leases come back after 1s + 100ms.
	local deadline=$((SECONDS + 25))
	for ((k = 0; ; k++)); do
		[ "$(gfield q lag)" = 0 ] && break
		[ "$SECONDS" -lt "$deadline" ] || { mq groups q; echo "not drained" >&2; return 1; }
		f=$t/g.d.$k
		s=${EPOCHREALTIME/./}
		rc=0
		"$MQ" get q -g G -n 200 --lease 30s -w 1s -f '%r %s\n' >"$f" || rc=$?
		echo "get $s ${EPOCHREALTIME/./} $rc $f" >>"$t/log.d"
		[ "$rc" = 0 ] || [ "$rc" = 1 ]
		[ "$rc" = 0 ] || continue
		cut -d' ' -f1 "$f" >"$f.r"
		s=${EPOCHREALTIME/./}
		rc=0
		"$MQ" ack q <"$f.r" || rc=$?
		echo "ack $s ${EPOCHREALTIME/./} $rc $f.r" >>"$t/log.d"
		assert_eq "$rc" 0
	done
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[0, 0, 0, [$N]]"
	run -66 --separate-stderr mq peek q.dlq
	# Every run exited as it may; every message was handed out; none was
	# handed out again while leased (1s) or after an ack of it exited 0.
	cat "$t"/log.* >"$t/log"
	run -0 /usr/bin/env python3 - "$t/log" "$N" 1000 <<'EOF'
import sys
log, n, lease = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dl = {}       # offset -> [(lease id, get start, get end)]
acked = {}    # offset -> earliest end of an ack that exited 0
bad = []
stats = {}
for line in open(log):
    kind, s, e, rc, f = line.split()
    s, e = int(s) // 1000, (int(e) + 999) // 1000  # us -> ms, widened
    stats[(kind, rc)] = stats.get((kind, rc), 0) + 1
    ok = {"get": ("0", "1", "137"), "ack": ("0", "75", "137")}[kind]
    if rc not in ok:
        bad.append("%s exited %s (%s)" % (kind, rc, f))
    if kind == "get":
        data = open(f).read()
        if not data.endswith("\n"):
            data = data[:data.rfind("\n") + 1]
        for l in data.splitlines():
            r, body = l.split(" ")
            g, p, off, lid = r.split(":")
            if g != "G" or p != "0" or int(body) != int(off) + 1:
                bad.append("bad line %r in %s" % (l, f))
                continue
            dl.setdefault(int(off), []).append((int(lid), s, e))
    elif rc == "0":
        for r in open(f).read().split():
            off = int(r.split(":")[2])
            acked[off] = min(acked.get(off, e), e)
missing = [o for o in range(n) if o not in dl]
if missing:
    bad.append("%d never handed out, e.g. %s" % (len(missing), missing[:5]))
for off, ds in dl.items():
    ds.sort()
    for i in range(1, len(ds)):
        (l1, s1, e1), (l2, s2, e2) = ds[i - 1], ds[i]
        if l1 == l2:
            bad.append("offset %d handed out twice under lease %d" % (off, l1))
        elif e2 < s1 + lease:
            bad.append("offset %d handed out under lease %d at %d-%d while leased (%d from %d)"
                       % (off, l2, s2, e2, l1, s1))
    if off in acked:
        for (l, s, e) in ds:
            if s > acked[off]:
                bad.append("offset %d handed out (lease %d, at %d) after an ack ended at %d"
                           % (off, l, s, acked[off]))
print(sorted(stats.items()))
print("\n".join(bad[:20]))
sys.exit(1 if bad else 0)
EOF
	echo "$output"
	# The kills must have hit something, or this proves little.
	[[ "$output" == *"('get', '137')"* ]]
	[[ "$output" == *"('ack', '0')"* ]]
}

@test "scale: 8 workers lease and ack $SCALE_N messages of one partition, each exactly once" {
	local t=$BATS_TEST_TMPDIR N=$SCALE_N w
	seq 1 "$N" | mq put q
	for w in 1 2 3 4 5 6 7 8; do
		(
			k=0
			while :; do
				rc=0
				"$MQ" get q -g w -n 100 --lease 60s -f '%r %s\n' >"$t/b.$w.$k" || rc=$?
				[ "$rc" = 1 ] && break
				[ "$rc" = 0 ] || { echo "worker $w: get exited $rc" >>"$t/errors"; break; }
				cut -d' ' -f1 "$t/b.$w.$k" | "$MQ" ack q || echo "worker $w: ack exited $?" >>"$t/errors"
				k=$((k + 1))
			done
		) &
		BG_PIDS+=("$!")
	done
	wait_jobs
	[ ! -e "$t/errors" ] || { cat "$t/errors"; return 1; }
	cat "$t"/b.* >"$t/all"
	assert_eq "$(wc -l <"$t/all")" "$N"
	assert_eq "$(cut -d' ' -f1 "$t/all" | sort -u | wc -l)" "$N"
	cut -d' ' -f2 "$t/all" | sort -n >"$t/bodies"
	seq 1 "$N" | cmp - "$t/bodies"
	# Every worker got some.
	for w in 1 2 3 4 5 6 7 8; do
		[ -s "$t/b.$w.0" ]
	done
	run -0 mq groups --json q
	assert_eq "$(json_eval '[d[0][k] for k in ("lag", "leased", "retrying", "offsets")]' <<<"$output")" \
		"[0, 0, 0, [$N]]"
	[[ "$(mq groups q)" =~ $'\n'w\ +0\ +0\ +0\ +-\ +0:$N$ ]]
}
