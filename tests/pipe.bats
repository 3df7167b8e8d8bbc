#!/usr/bin/env bats
# mq pipe: exactly-once queue-to-queue through a filter.

load helper

teardown() { serve_teardown; }

# SRC with $1 keyed messages over 2 partitions, and what each partition
# holds saved in $BATS_TEST_TMPDIR/src.P (consumption-driven retention may
# remove them from SRC once piped).
fill_src() {
	mq create --partitions 2 src
	mq create --partitions 2 dst
	seq 1 "$1" | sed 's/.*/k&:m&/' | mq put -K: src
	mq peek src -p 0 >"$BATS_TEST_TMPDIR/src.0"
	mq peek src -p 1 >"$BATS_TEST_TMPDIR/src.1"
}

# DST holds exactly one output per source message, in order per partition.
assert_piped() {
	local p
	for p in 0 1; do
		mq peek dst -p "$p" >"$BATS_TEST_TMPDIR/dst.$p" || true
		cmp "$BATS_TEST_TMPDIR/src.$p" "$BATS_TEST_TMPDIR/dst.$p" || {
			diff "$BATS_TEST_TMPDIR/src.$p" "$BATS_TEST_TMPDIR/dst.$p" | head -20 >&2
			return 1
		}
	done
}

@test "pipe: each batch goes through the filter once; output lines land in DEST, in order, and the group's offsets follow" {
	mq put src a b c d e
	run -0 mq pipe src dst -g up --batch 2 -- tr a-z A-Z
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' A B C D E)"
	run -0 mq groups src
	[[ "$output" == *"up "*" 0 "*"0:5"* ]]
	# a second run finds nothing new and writes nothing
	run -0 mq pipe src dst -g up -- tr a-z A-Z
	run -0 mq stat dst
	[[ "$output" == *"messages    5"* ]]
	# the filter may drop or multiply lines; the batch is still done once
	mq put src x y
	run -0 mq pipe src dst -g up --batch 10 -- sh -c 'while read -r l; do echo "$l-1"; echo "$l-2"; done'
	run -0 mq peek dst --from 5
	assert_eq "$output" "$(printf '%s\n' x-1 x-2 y-1 y-2)"
	mq put src z
	run -0 mq pipe src dst -g up -- sed /z/d
	run -0 mq stat dst
	[[ "$output" == *"messages    9"* ]]
	run -1 mq get src -g up
}

@test "pipe: the filter gets each batch's metadata in MQ_* variables" {
	mq put src a b c
	run -0 mq pipe src dst -g g --batch 2 -- sh -c 'cat >/dev/null; echo "$MQ_QUEUE $MQ_PARTITION $MQ_OFFSET $MQ_COUNT"'
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' 'src 0 0 2' 'src 0 2 1')"
}

@test "pipe: a failing filter stops the pipe (75) with nothing of its batch written; the next run does it" {
	mq put src a b c d
	run -75 --separate-stderr mq pipe src dst -g g --batch 2 -- sh -c 'read -r l; [ "$l" != c ] || exit 3; echo "$l"; cat'
	[[ "$stderr" == *"offsets 2-3"*"exit status 3"*"nothing of that batch went to dst"* ]]
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b)"
	run -0 mq pipe src dst -g g --batch 2 -- cat
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b c d)"
	# a filter that cannot be run at all is a failure too
	mq put src e
	run -75 --separate-stderr mq pipe src dst -g g -- /nonexistent/filter
	[[ "$stderr" == *"cannot run '/nonexistent/filter'"* ]]
	run -0 mq stat dst
	[[ "$output" == *"messages    4"* ]]
}

@test "pipe: an output line over DEST's max-message-bytes fails the batch (65), nothing written" {
	mq create --max-message-bytes 10 dst
	mq put src short longer-than-ten
	run -65 --separate-stderr mq pipe src dst -g g --batch 1 -- cat
	[[ "$stderr" == *"over dst's maximum of 10"* ]]
	run -0 mq peek dst
	assert_eq "$output" short
}

@test "pipe: bad usage is 64, a missing source 66; DEST is created" {
	run -64 mq pipe src src -g g -- cat
	run -64 mq pipe src dst -- cat
	run -64 mq pipe src dst -g ../x -- cat
	run -64 mq pipe src ../x -g g -- cat
	run -64 mq pipe src dst -g g --batch 0 -- cat
	run -66 mq pipe nope dst -g g -- cat
	mq put src a
	run -0 mq pipe src newdst -g g -- cat
	run -0 mq peek newdst
	assert_eq "$output" a
}

@test "pipe: -w waits for new source messages" {
	mq put src a
	bg "$MQ" pipe src dst -g g -w -- cat
	wait_for '[ "$(mq peek dst)" = a ]'
	mq put src b
	wait_for '[ "$(mq peek dst | tail -n 1)" = b ]'
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b)"
}

@test "pipe: killed with SIGKILL 100 times at random instants, DEST still gets exactly one output per message, in order per partition" {
	mq create --partitions 2 src
	mq create --partitions 2 dst
	local i p decided=0 d=$BATS_TEST_TMPDIR
	for ((i = 0; i < 100; i++)); do
		# a backlog for each round; -w keeps the pipe running when it is
		# drained, so every kill hits a live pipe, busy or waiting
		for p in 0 1; do
			seq -f "p$p-r$i-%g" 1 150 | tee -a "$d/src.$p" | mq put -p "$p" src
		done
		"$MQ" pipe src dst -g g --batch 10 -w -- cat &
		sleep "0.0$((RANDOM % 50 + 10))"
		kill -9 $!
		wait $! 2>/dev/null || true
		! mq txn ls dst | grep -q ' pipe$' || decided=$((decided + 1))
	done
	echo "$decided of 100 kills came after a step's decision" >&3
	run -0 mq pipe src dst -g g --batch 100 -- cat
	assert_piped
	run -1 mq get src -g g
	run -0 mq verify
	run -0 mq txn ls
	assert_eq "$output" ""
}

@test "pipe: killed at each write, sync, rename, open and truncate of a step, the next run finishes it exactly once" {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN"
	fill_src 40
	local call n rc
	for call in pwrite fdatasync fsync rename open ftruncate unlink; do
		for ((n = 1; n <= 12; n++)); do
			rc=0
			{ MQ_FAULT=$call:$n:kill "$MQ_FAULT_BIN" pipe src dst -g g --batch 3 --max 6 -- cat 2>&3; } 3>&2 2>/dev/null || rc=$?
			[ "$rc" -eq 0 ] || [ "$rc" -eq 137 ] || { echo "$call:$n: pipe exited $rc" >&2; return 1; }
		done
	done
	run -0 mq pipe src dst -g g -- cat
	assert_piped
	run -0 mq verify
}

# ----- through a server (-s) -----

@test "pipe -s: the same steps through a server: output in DEST, P mod N, metadata, offsets" {
	serve_start
	fill_src 300
	run -0 mq pipe src dst -g g --batch 7 -- cat
	assert_piped
	run -1 mq get src -g g
	mq create --partitions 3 three
	run -0 mq pipe src three -g h --batch 100 -- sh -c 'cat >/dev/null; echo "$MQ_QUEUE $MQ_PARTITION $MQ_OFFSET $MQ_COUNT"'
	local p
	for p in 0 1; do # one output line per step of 100, from partition p into p mod 3
		run -0 mq peek three -p "$p"
		assert_eq "$output" "$(awk -v p="$p" 'END { for (o = 0; o < NR; o += 100)
			print "src", p, o, (NR - o < 100 ? NR - o : 100) }' "$BATS_TEST_TMPDIR/src.$p")"
	done
	run -1 mq peek three -p 2
	# the spool itself agrees: nothing left for either group, verify clean
	run -1 mq -d "$MQ_SPOOL" get src -g g
	run -1 mq -d "$MQ_SPOOL" get src -g h
	run -0 mq -d "$MQ_SPOOL" verify
}

@test "pipe -s: a failing filter is 75 and an over-long output line 65, nothing of the batch written; usage 64, missing source 66" {
	serve_start
	mq put src a b c d
	run -75 --separate-stderr mq pipe src dst -g g --batch 2 -- sh -c 'read -r l; [ "$l" != c ] || exit 3; echo "$l"; cat'
	[[ "$stderr" == *"offsets 2-3"*"exit status 3"*"nothing of that batch went to dst"* ]]
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b)"
	mq create --max-message-bytes 3 small
	run -65 --separate-stderr mq pipe src small -g s --batch 1 -- sed 's/^/xxx/'
	[[ "$stderr" == *"refused by small"*"maximum of 3"*"nothing of that batch was written"* ]]
	run -1 mq peek small
	run -0 mq pipe src dst -g g -- cat
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b c d)"
	run -64 mq pipe src src -g g -- cat
	run -64 mq pipe src dst -g ../x -- cat
	run -64 mq pipe src ../x -g g -- cat
	run -66 mq pipe nope dst -g g -- cat
	run -64 --separate-stderr mq -n "127.0.0.1:$PORT" pipe src dst -g g -- cat
	[[ "$stderr" == *"name the broker with -s"* ]]
}

@test "pipe -s: -w waits on the server for new messages; SIGTERM ends the wait with 0" {
	serve_start
	mq put src a
	"$MQ" pipe src dst -g g -w -- cat &
	local pid=$!
	wait_for '[ "$(mq peek dst)" = a ]'
	mq put src b
	wait_for '[ "$(mq peek dst | tail -n 1)" = b ]'
	kill -TERM "$pid"
	local rc=0
	wait "$pid" || rc=$?
	assert_eq "$rc" 0
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' a b)"
}

@test "pipe -s: three pipes of one group at once, two through the server and one local, give exactly one output per message" {
	serve_start
	fill_src 6000
	local p1 p2 p3 rc=0
	"$MQ" pipe src dst -g g --batch 50 -e -- cat & p1=$!
	"$MQ" pipe src dst -g g --batch 30 -e -- cat & p2=$!
	"$MQ" -d "$MQ_SPOOL" pipe src dst -g g --batch 40 -e -- cat & p3=$!
	wait "$p1" || rc=$?
	wait "$p2" || rc=$?
	wait "$p3" || rc=$?
	assert_eq "$rc" 0
	run -0 mq pipe src dst -g g -- cat
	assert_piped
	run -0 mq -d "$MQ_SPOOL" verify
}

@test "pipe -s: pipes killed with SIGKILL 40 times and the server 4 times, DEST still gets exactly one output per message, in order" {
	serve_start
	mq create --partitions 2 src
	mq create --partitions 2 dst
	local i p pid d=$BATS_TEST_TMPDIR
	for ((i = 0; i < 40; i++)); do
		for p in 0 1; do
			seq -f "p$p-r$i-%g" 1 100 | tee -a "$d/src.$p" | mq put -p "$p" src
		done
		"$MQ" pipe src dst -g g --batch 10 -w -- cat &
		pid=$!
		sleep "0.0$((RANDOM % 50 + 10))"
		if ((i % 10 == 9)); then
			kill -9 "$SERVE_PID"
			wait "$SERVE_PID" 2>/dev/null || true
			serve_start
		fi
		kill -9 "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	run -0 mq pipe src dst -g g --batch 100 -- cat
	assert_piped
	run -1 mq get src -g g
	run -0 mq -d "$MQ_SPOOL" verify
}

@test "pipe -s: a step whose messages moved is refused (75); a client gone mid-step leaves the source as it was" {
	serve_start
	mq put src a b c
	local line ok sum
	exec 5<>"/dev/tcp/127.0.0.1/$PORT"
	printf 'PIPEGET src dst g count=2\n' >&5
	for _ in 1 2 3 4; do read -r -t 10 line <&5; done # two MSG lines and their bodies
	read -r -t 10 ok <&5
	[[ "$ok" == "OK 2 partition=0 lo=0 hi=2 sum="* ]]
	sum=${ok##*sum=}
	printf 'PIPEBEGIN src dst g 0 n=2 lo=0 hi=2 sum=%s\n' "$((sum ^ 1))" >&5
	read -r -t 10 line <&5
	[[ "$line" == "ERR 75 "*"moved since PIPEGET"* ]]
	printf 'PIPEBEGIN src dst g 0 n=2 lo=0 hi=2 sum=%s\nPUT dst 1 txn=1\n1\nx\n' "$sum" >&5
	read -r -t 10 line <&5
	assert_eq "$line" OK
	read -r -t 10 line <&5
	[[ "$line" == OK* ]]
	# while the step is begun, the group's partition is held: a GET says so
	exec 6<>"/dev/tcp/127.0.0.1/$PORT"
	printf 'GET src group=g\n' >&6
	read -r -t 10 line <&6
	assert_eq "$line" "OK 0 busy=1"
	exec 6>&-
	exec 5>&-
	run -0 mq pipe src dst -g g -- tr a-z A-Z
	run -0 mq peek dst
	assert_eq "$output" "$(printf '%s\n' A B C)"
	run -0 mq -d "$MQ_SPOOL" txn ls
	assert_eq "$output" ""
}

@test "pipe -s: while a step holds the group, seek and groups rm through the server wait for it, and the server keeps serving" {
	serve_start
	mq put src a b c
	local ok sum fd seekpid rmpid
	srv_open fd
	srv_send "$fd" 'PIPEGET src dst g count=2\n'
	run -0 srv_answer "$fd"
	ok=${lines[${#lines[@]}-1]}
	[[ "$ok" == "OK 2 partition=0 lo=0 hi=2 sum="* ]]
	sum=${ok##*sum=}
	srv_send "$fd" 'PIPEBEGIN src dst g 0 n=2 lo=0 hi=2 sum=%s\n' "$sum"
	run -0 srv_answer "$fd"
	assert_eq "$output" OK
	# the group's lock is held by this connection's step: both wait for it
	bg mq seek src -g g --to 1
	seekpid=$!
	bg mq groups rm src g
	rmpid=$!
	sleep 0.5
	! proc_gone "$seekpid"
	! proc_gone "$rmpid"
	run -0 mq stat src # everything else is served meanwhile
	run -0 mq put src d
	# a PUT refused inside the step dooms it: PIPECOMMIT fails, nothing consumed
	srv_send "$fd" 'PUT dst 1 txn=1 partition=3\n1\nx\n'
	run -0 srv_answer "$fd"
	[[ "$output" == "ERR 64 "* ]]
	srv_send "$fd" 'PIPECOMMIT dst\n'
	run -0 srv_answer "$fd"
	[[ "$output" == "ERR 65 "* ]]
	wait_for "proc_gone $seekpid && proc_gone $rmpid" 10
	wait "$seekpid"
	wait "$rmpid"
	srv_shut "$fd"
	run -1 mq peek dst # nothing of the step
	assert_eq "$output" ""
	run -0 mq get src -g g -n 4
	[ "$output" = "$(printf '%s\n' a b c d)" ] || [ "$output" = "$(printf '%s\n' b c d)" ]
}
