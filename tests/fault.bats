#!/usr/bin/env bats
# Injected I/O errors and crashes through the syscall table of the
# MQ_FAULTS build ($MQ_FAULT_BIN, see "2. Durable files" in mq.c):
# MQ_FAULT=CALL:N:WHAT[:sticky] fails (eio, enospc, short) or SIGKILLs
# (kill) the process at the N-th call of CALL.  Everything after the
# fault runs the normal binary ($MQ), as a restarted system would.
#
# The rules checked (DESIGN.md §3-4, STYLE.md §6):
#  - a failed data write or sync fails the command with 74 and a message
#    naming the file; nothing it did not acknowledge becomes visible;
#  - what was acknowledged before (exit 0, or --print-offsets) survives;
#  - after a crash at any sync, write or open, the next command opens
#    the queue cleanly, `mq verify` exits 0, and a single writer's
#    messages are a prefix of its input (a crash loses only a suffix).
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

setup_file() {
	[ -x "$MQ_FAULT_BIN" ] || skip "no fault-injection build at $MQ_FAULT_BIN (make mq-fault)"
}

# mq-fault with MQ_FAULT=$1, the remaining arguments being the command.
# (The braces keep bash from reporting "Killed" for the kill faults.)
mqf() {
	local f=$1
	shift
	{ MQ_FAULT=$f "$MQ_FAULT_BIN" "$@" 2>&3; } 3>&2 2>/dev/null
}

# A queue q with 1..10 acknowledged.
ten_acked() {
	mq create q
	run -0 mq put q --print-offsets 1 2 3 4 5 6 7 8 9 10
	assert_eq "${lines[9]}" "0:9"
}

@test "fault: fdatasync EIO on the first data sync: put exits 74 naming the segment; nothing of it visible" {
	ten_acked
	log=$(part_dir q)/00000000000000000000.log
	run -74 --separate-stderr mqf fdatasync:1:eio put q --print-offsets 11 12 13
	assert_eq "$output" "" # nothing acknowledged
	assert_eq "$stderr" "mq: put: q: cannot fsync '$log': Input/output error"

	run -0 --separate-stderr mq peek q
	assert_eq "$output" "$(seq 1 10)"
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	# The failed offsets were never acknowledged, so they are given again.
	run -0 mq put q --print-offsets 11
	assert_eq "$output" "0:10"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 11)"
}

@test "fault: fdatasync EIO in the middle of a long put keeps exactly what was acknowledged" {
	mq create q
	out=$BATS_TEST_TMPDIR/acked
	# Two flushes: the first sync succeeds and is acknowledged, the second fails.
	two_flushes() {
		{ seq 1 1000; wait_for "[ -s '$out' ]"; seq 1001 2000; } |
			MQ_FAULT=fdatasync:2:eio "$MQ_FAULT_BIN" put q --print-offsets >"$out"
	}
	run -74 --separate-stderr two_flushes
	[[ "$stderr" == *"cannot fsync '"*".log': Input/output error"* ]]
	n=$(complete_lines "$out" | wc -l)
	[ "$n" -ge 1 ]
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 "$n")"
	run -0 mq verify
}

@test "fault: ENOSPC on the segment write: put exits 74 with 'No space left on device'; earlier data intact" {
	ten_acked
	log=$(part_dir q)/00000000000000000000.log
	size=$(stat -c %s "$log")
	run -74 --separate-stderr mqf pwrite:1:enospc put q 11 12
	assert_eq "$stderr" "mq: put: q: cannot write '$log': No space left on device"
	assert_eq "$(stat -c %s "$log")" "$size"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 10)"
	run -0 mq verify
	run -0 mq put q --print-offsets 11
	assert_eq "$output" "0:10"
}

@test "fault: write ENOSPC while a put creates its queue: 74 and no half-made queue" {
	run -74 --separate-stderr mqf write:1:enospc put newq 1
	[[ "$stderr" == "mq: put: newq: cannot write '"*"': No space left on device" ]]
	run -0 mq ls
	assert_eq "$output" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
	run -66 mq peek newq
	# Nothing to clean up by hand: the next put creates the queue.
	run -0 mq put --print-offsets newq 1
	assert_eq "$output" "0:0"
}

@test "fault: a short write that the loop finishes is no error" {
	ten_acked
	run -0 mqf pwrite:1:short put q --print-offsets 11 12 13
	assert_eq "${lines[2]}" "0:12"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 13)"
	run -0 mq verify
}

@test "fault: a short write followed by failures: 74 and nothing partial visible" {
	ten_acked
	run -74 --separate-stderr mqf pwrite:1:short:sticky put q 11 12 13
	[[ "$stderr" == *"No space left on device"* ]]
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 10)"
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	run -0 mq put q --print-offsets 11
	assert_eq "$output" "0:10"
}

# Every failure point of one small put (one batch, no roll), for each
# error: either the put succeeds with all of its messages, or it exits 74
# and none of them are ever visible, while 1..10 stay.  Each step runs
# on a fresh queue; N counts calls until the fault no longer fires.
@test "fault: every failing pwrite/fdatasync/open of a put: all or nothing, earlier data intact" {
	local call what n rc failures=0 bad=""
	for call in pwrite fdatasync open; do
		for what in eio enospc short:sticky; do
			[ "$call" != pwrite ] && [ "$what" = short:sticky ] && continue
			for n in $(seq 1 40); do
				rm -rf "${MQ_SPOOL:?}"/q
				mq create q
				mq put q 1 2 3 4 5 6 7 8 9 10
				rc=0
				mqf "$call:$n:$what" put q 11 12 13 2>"$BATS_TEST_TMPDIR/err" || rc=$?
				got=$(mq peek q | tr '\n' ' ')
				if [ "$rc" = 0 ]; then
					[ "$got" = "$(seq 1 13 | tr '\n' ' ')" ] || bad+="$call:$n:$what exit 0 but peek: $got"$'\n'
					break
				fi
				failures=$((failures + 1))
				[ "$rc" = 74 ] || bad+="$call:$n:$what: exit $rc, expected 74"$'\n'
				[ "$got" = "$(seq 1 10 | tr '\n' ' ')" ] ||
					bad+="$call:$n:$what: failed put (74: $(cat "$BATS_TEST_TMPDIR/err")) but peek shows: $got"$'\n'
				mq verify >/dev/null || bad+="$call:$n:$what: verify failed"$'\n'
			done
		done
	done
	printf '%s' "$bad"
	[ "$failures" -ge 8 ]
	[ -z "$bad" ]
}

@test "fault: every error message of a failed put names the file that failed" {
	local call n rc bad=""
	for call in pwrite fdatasync fsync open; do
		for n in $(seq 1 100); do
			rm -rf "${MQ_SPOOL:?}"/q
			mq create q --segment-bytes 4k
			seq 1 500 | mq put q
			rc=0
			# 1500 lines: several batches and segment rolls.
			seq 1 1500 | mqf "$call:$n:eio" put q 2>"$BATS_TEST_TMPDIR/err" || rc=$?
			[ "$rc" = 0 ] && break
			grep -q "'$MQ_SPOOL/q/[^']*': Input/output error" "$BATS_TEST_TMPDIR/err" ||
				bad+="$call:$n:eio: $(cat "$BATS_TEST_TMPDIR/err")"$'\n'
		done
	done
	printf '%s' "$bad"
	[ -z "$bad" ]
}

@test "fault: EIO on the group commit: get exits 74 and the messages are delivered again" {
	seq 1 20 | mq put q
	mq get q -g g -n 5 >/dev/null
	run -74 --separate-stderr mqf fdatasync:1:eio get q -g g -n 5
	[[ "$stderr" == *"cannot fsync"*"Input/output error"* ]]
	run -0 mq get q -g g -n 5
	assert_eq "$output" "$(seq 6 10)"
	run -74 mqf pwrite:1:eio get q -g g -n 3
	run -0 mq get q -g g -n 3
	assert_eq "$output" "$(seq 11 13)"
}

# ----- crashes: SIGKILL just before the N-th call -----

@test "fault: SIGKILL at the second sync of a long put keeps what the first acknowledged" {
	mq create q
	out=$BATS_TEST_TMPDIR/acked
	two_flushes() {
		{ seq 1 1000; wait_for "[ -s '$out' ]"; seq 1001 2000; } |
			MQ_FAULT=fdatasync:2:kill "$MQ_FAULT_BIN" put q --print-offsets >"$out"
	}
	run -137 two_flushes
	n=$(complete_lines "$out" | wc -l)
	[ "$n" -ge 1 ]
	run -0 --separate-stderr mq put q --print-offsets next
	k=${output#0:}
	[ "$k" -ge "$n" ]
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 "$k"; echo next)"
	run -0 mq verify
}

# A fresh queue with 4 KiB segments and a-1..a-500 acknowledged, then a
# put of b-1..b-1500 under MQ_FAULT=$1: one flush that rolls several
# segments.  Leaves rc, acked_b and err_b in BATS_TEST_TMPDIR.
crash_workload() {
	local t=$BATS_TEST_TMPDIR rc=0
	rm -rf "${MQ_SPOOL:?}"/q "$t/acked_b"
	mq create q --segment-bytes 4k
	seq -f 'a-%g' 1 500 | mq put q --print-offsets >"$t/acked_a"
	assert_eq "$(tail -n 1 "$t/acked_a")" "0:499"
	{ seq -f 'b-%g' 1 1500 | MQ_FAULT=$1 "$MQ_FAULT_BIN" put q --print-offsets >"$t/acked_b" 2>"$t/err_b"; } 2>/dev/null || rc=$?
	echo "$rc" >"$t/rc"
}

# After crash_workload: the next command opens cleanly, verify is clean,
# offsets are dense, a-1..a-500 then a prefix b-1..b-k (k >= what was
# acknowledged) then the next put.  Prints a diagnosis and fails if not.
crash_check() {
	local t=$BATS_TEST_TMPDIR x nb
	if ! x=$(mq put q --print-offsets after 2>"$t/err_next"); then
		echo "$1: the next put failed: $(cat "$t/err_next")"
		return 1
	fi
	x=${x#0:}
	mq peek q -f '%o %s\n' >"$t/all" 2>"$t/err_peek" || {
		echo "$1: peek failed: $(cat "$t/err_peek")"
		return 1
	}
	awk -v x="$x" -v f="$1" '
		NR - 1 != $1 { print f ": offset " $1 " at line " NR; bad = 1; exit }
		NR <= 500 && $2 != "a-" NR { print f ": offset " $1 " holds " $2; bad = 1; exit }
		NR > 500 && $1 < x && $2 != "b-" NR - 500 { print f ": offset " $1 " holds " $2; bad = 1; exit }
		$1 == x && $2 != "after" { print f ": offset " $1 " holds " $2; bad = 1; exit }
		END { if (!bad && NR != x + 1) { print f ": " NR " messages, next put got " x; bad = 1 }
		      exit bad }' "$t/all" || return 1
	nb=$(complete_lines "$t/acked_b" | wc -l)
	if [ $((x - 500)) -lt "$nb" ]; then
		echo "$1: $nb b-messages acknowledged, only $((x - 500)) survived"
		return 1
	fi
	complete_lines "$t/acked_b" | awk -v f="$1" '$0 != "0:" NR + 499 { print f ": ack " NR " is " $0; bad = 1; exit } END { exit bad }' ||
		return 1
	if ! mq verify >"$t/verify" 2>&1; then
		echo "$1: verify failed:"
		cat "$t/verify"
		return 1
	fi
}

# Kill at every call of kind $1 in turn until the workload completes.
kill_sweep() {
	local n kills=0 bad=0
	for n in $(seq 1 200); do
		crash_workload "$1:$n:kill"
		rc=$(cat "$BATS_TEST_TMPDIR/rc")
		if [ "$rc" = 0 ]; then
			crash_check "$1:$n (no kill)" || bad=1
			break
		fi
		[ "$rc" = 137 ] || { echo "$1:$n: put exited $rc, expected 137 (SIGKILL): $(cat "$BATS_TEST_TMPDIR/err_b")"; bad=1; }
		kills=$((kills + 1))
		crash_check "$1:$n:kill" || bad=1
	done
	echo "$1: $kills crash points"
	[ "$bad" = 0 ]
	[ "$kills" -ge "$2" ]
}

@test "fault: SIGKILL before each fdatasync of a put that rolls segments: clean reopen, acked data kept" {
	kill_sweep fdatasync 6
}

@test "fault: SIGKILL before each fsync (head, directory) of a put that rolls segments" {
	kill_sweep fsync 2
}

@test "fault: SIGKILL before each pwrite of a put that rolls segments" {
	kill_sweep pwrite 4
}

@test "fault: SIGKILL before each open of a put that rolls segments" {
	kill_sweep open 4
}

# A roll creates the next segment's files, then publishes a head naming
# them.  Killed in between, the new (empty) segment was never published;
# the next writer must not leave it standing inside the range it goes on
# appending to the old segment, or readers and retention take it for the
# start of those offsets.
@test "fault: a crash in the middle of a roll loses no later message (no orphan segment)" {
	mq create q --segment-bytes 4k
	seq -f 'a-%g' 1 500 | mq put q
	# Kill at the directory fsync of the first roll of this put.
	run -137 mqf fsync:1:kill put q --print-offsets < <(seq -f 'b-%g' 1 20000)
	run -0 --separate-stderr mq get q -g g -n 0
	n=${#lines[@]}
	# a-1..a-500, then whatever prefix of b- survived the crash.
	[ "$n" -ge 500 ]
	if [ "$n" = 500 ]; then last=a-500; else last=b-$((n - 500)); fi
	assert_eq "${lines[n - 1]}" "$last"
	# Recovery says once what it removed: the empty segment of the roll.
	[[ "$stderr" == *"left empty by an interrupted roll" ]]
	assert_eq "$(grep -c . <<<"$stderr")" 1
	# New acknowledged messages after the recovery, then more to roll.
	run -0 mq put q --print-offsets x1 x2 x3 x4 x5
	assert_eq "${lines[0]}" "0:$n"
	run -0 mq peek q --from "$n" -n 1
	assert_eq "$output" "x1"
	seq -f 'y-%g' 1 400 | mq put q
	run -0 --separate-stderr mq get q -g g -n 5
	assert_eq "$output" "$(printf 'x%s\n' 1 2 3 4 5)"
	assert_eq "$stderr" ""
	run mq verify
	echo "$output"
	assert_eq "$status" 0
}

# Retention removes consumed segments (3 files each) after a draining get;
# a crash between the removals must neither lose unconsumed messages nor
# leave files behind for ever.
@test "fault: SIGKILL before each unlink of retention: nothing unconsumed lost, no orphaned files" {
	local n kills=0 bad=""
	for n in $(seq 1 100); do
		rm -rf "${MQ_SPOOL:?}"/q
		mq create q --segment-bytes 4k
		seq 1 2000 | mq put q # several segments of several batches
		rc=0
		mqf "unlink:$n:kill" get q -g g -n 0 >"$BATS_TEST_TMPDIR/got" || rc=$?
		# The get printed all 2000 before retention ran.
		[ "$(wc -l <"$BATS_TEST_TMPDIR/got")" = 2000 ] || bad+="unlink:$n: get printed $(wc -l <"$BATS_TEST_TMPDIR/got")"$'\n'
		[ "$rc" = 0 ] && break
		kills=$((kills + 1))
		# Consumed stays consumed; new messages flow; retention runs again.
		mq get q -g g >/dev/null && bad+="unlink:$n: a consumed message came back"$'\n'
		seq 2001 2100 | mq put q
		got=$(mq get q -g g -n 0 | tr '\n' ' ')
		[ "$got" = "$(seq 2001 2100 | tr '\n' ' ')" ] || bad+="unlink:$n: next get: $got"$'\n'
		mq verify >/dev/null || bad+="unlink:$n: verify: $(mq verify)"$'\n'
		for f in "$(part_dir q)"/*.idx "$(part_dir q)"/*.tix; do
			[ -e "${f%.*}.log" ] || bad+="unlink:$n: orphaned ${f##*/} (its .log is gone)"$'\n'
		done
	done
	printf '%s' "$bad"
	[ "$kills" -ge 3 ]
	[ -z "$bad" ]
}

# `mq verify --repair` rewrites a damaged segment (quarantine, temporary,
# rename, indexes).  Killed at any step, readers never print damage or
# fail past it, and running the repair again finishes the job.
@test "fault: SIGKILL at each step of verify --repair: a second repair finishes, nothing lost" {
	local call n kills=0 bad=""
	for call in rename fsync write; do
		for n in $(seq 1 40); do
			rm -rf "${MQ_SPOOL:?}"/q
			mq create q --segment-bytes 4k
			seq 1 2000 | mq put q # several segments of several batches
			log=$(part_dir q)/00000000000000000000.log
			[ "$(seg_batches "$log" | wc -l)" -ge 3 ]
			read -r pos len base count < <(seg_batches "$log" | sed -n 2p)
			flip_byte "$log" $((pos + len / 2))
			rc=0
			mqf "$call:$n:kill" verify --repair >/dev/null 2>&1 || rc=$?
			[ "$rc" = 137 ] || break
			kills=$((kills + 1))
			# Past the damage, a reader works, whatever the repair got to.
			got=$(mq peek q --from $((base + count)) -n 2 2>&1 | tr '\n' ' ')
			[ "$got" = "$((base + count + 1)) $((base + count + 2)) " ] ||
				bad+="$call:$n: peek --from $((base + count)): $got"$'\n'
			mq peek q 2>/dev/null | grep -vxE '[0-9]+' && bad+="$call:$n: peek printed damage"$'\n'
			mq verify --repair >"$BATS_TEST_TMPDIR/v" 2>&1 ||
				bad+="$call:$n: second repair: $(cat "$BATS_TEST_TMPDIR/v")"$'\n'
			[ "$(mq peek q | md5sum)" = "$(seq 1 2000 | sed "$((base + 1)),$((base + count))d" | md5sum)" ] ||
				bad+="$call:$n: after the second repair peek is not everything but offsets $base-$((base + count - 1))"$'\n'
			mq verify >/dev/null || bad+="$call:$n: verify after repair: $(mq verify)"$'\n'
		done
	done
	printf '%s' "$bad"
	echo "$kills crash points"
	[ "$kills" -ge 5 ]
	[ -z "$bad" ]
}
