#!/usr/bin/env bats
# Recovery from what a crash or a bad disk leaves behind: torn tails, a
# writer killed mid-stream, damaged indexes, flipped bits in sealed
# segments, a damaged head file and damaged group offset files.  The log
# is the only source of truth (DESIGN.md §2-3): every case must end with
# every acknowledged message readable, nothing damaged ever printed, and
# `mq verify` clean.
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

# Lines of $1 that are not lines of $2 (both unsorted).
lines_not_in() { comm -23 <(sort "$1") <(sort "$2"); }

# ----- (a) torn tail -----

# Put 1..100, append $1 (a command writing bytes) to the active log, then
# check that peek cuts the tail with one notice and prints all 100.
torn_tail_case() {
	seq 1 100 | mq put q
	local log
	log=$(seg_logs "$(part_dir q)" | tail -n 1)
	local before
	before=$(stat -c %s "$log")
	eval "$1" >>"$log"
	[ "$(stat -c %s "$log")" -gt "$before" ]

	run -0 --separate-stderr mq peek q
	assert_eq "$output" "$(seq 1 100)"
	echo "stderr: $stderr"
	[ "${#stderr_lines[@]}" -eq 1 ]
	[[ "${stderr_lines[0]}" == *"cut a torn tail"*"$log:$before"* ]]
	assert_eq "$(stat -c %s "$log")" "$before"

	# Recovered once: the next reader says nothing.
	run -0 --separate-stderr mq peek q
	assert_eq "$output" "$(seq 1 100)"
	assert_eq "$stderr" ""
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	# And a writer continues at offset 100.
	run -0 mq put q --print-offsets after
	assert_eq "$output" "0:100"
}

@test "recovery: random garbage after the last batch is cut as a torn tail" {
	torn_tail_case 'head -c 37 /dev/urandom'
}

@test "recovery: a partial batch header (first 30 bytes of a batch) is cut" {
	torn_tail_case 'head -c 30 "$log"'
}

@test "recovery: a batch with a whole header but a cut body is cut" {
	torn_tail_case 'head -c 200 "$log"'
}

@test "recovery: a torn tail is cut by a writer too, which keeps offsets dense" {
	seq 1 100 | mq put q
	log=$(seg_logs "$(part_dir q)")
	head -c 300 "$log" >>"$log"
	run -0 --separate-stderr mq put q --print-offsets x
	assert_eq "$output" "0:100"
	[[ "$stderr" == *"cut a torn tail"* ]]
	run -0 mq peek q -f '%o %s\n'
	assert_eq "${lines[100]}" "100 x"
	assert_eq "${#lines[@]}" 101
	run -0 mq verify
}

# ----- (b) a writer killed mid-stream -----

@test "recovery: kill -9 of a writer mid-stream keeps every acknowledged message" {
	mq create q
	seq 1 100000000 | "$MQ" put q --print-offsets >"$BATS_TEST_TMPDIR/acked" &
	local pid=$!
	BG_PIDS+=("$pid")
	wait_for "[ \$(wc -l <'$BATS_TEST_TMPDIR/acked') -ge 1000 ]" 30
	kill -9 "$pid"
	wait "$pid" || true

	complete_lines "$BATS_TEST_TMPDIR/acked" >"$BATS_TEST_TMPDIR/ok"
	local nacked
	nacked=$(wc -l <"$BATS_TEST_TMPDIR/ok")
	[ "$nacked" -ge 1000 ]
	# One writer on an empty queue: the n-th acknowledgement is 0:n-1.
	run -0 awk '$0 != "0:" NR - 1 { print "line " NR ": " $0; bad = 1 } END { exit bad }' \
		"$BATS_TEST_TMPDIR/ok"

	# The next writer recovers and appends right after what survived.
	run -0 --separate-stderr mq put q --print-offsets x
	local xoff=${output#0:}
	[ "$xoff" -ge "$nacked" ]

	# Every offset holds the line number (offset + 1); offsets are dense,
	# so there are no duplicates and every acknowledged offset is there.
	mq peek q -f '%o %s\n' >"$BATS_TEST_TMPDIR/all"
	run -0 awk -v x="$xoff" '
		NR - 1 != $1 { print "offset gap at line " NR ": " $0; bad = 1; exit }
		$1 < x && $2 != $1 + 1 { print "bad body: " $0; bad = 1; exit }
		$1 == x && $2 != "x" { print "bad last: " $0; bad = 1; exit }
		END { if (NR != x + 1) { print NR " lines, expected " x + 1; bad = 1 } exit bad }' \
		"$BATS_TEST_TMPDIR/all"
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
}

# ----- (c) index damage -----

@test "recovery: a zeroed index of the active segment: peek is right, verify reports, repair rebuilds" {
	seq 1 1000 | mq put q
	seq 1001 2000 | mq put q
	idx=$(part_dir q)/00000000000000000000.idx
	dd if=/dev/zero of="$idx" bs="$(stat -c %s "$idx")" count=1 conv=notrunc status=none

	run -0 mq peek q
	assert_eq "$output" "$(seq 1 2000)"
	run -0 mq peek q --from 1500 -n 3
	assert_eq "$output" "$(seq 1501 1503)"
	run -0 mq peek q --from 1000 -n 1 -f '%o %s'
	assert_eq "$output" "1000 1001"

	run -65 mq verify
	[[ "$output" == *"q/0: index '$idx' disagrees with the log"* ]]
	run -0 mq verify --repair
	[[ "$output" == *"index '$idx'"*"rebuilt"* ]]
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	run -0 mq peek q --from 1500 -n 1
	assert_eq "$output" "1501"
}

@test "recovery: a truncated index of the active segment is rebuilt and reported" {
	seq 1 1000 | mq put q
	seq 1001 2000 | mq put q
	idx=$(part_dir q)/00000000000000000000.idx
	truncate -s 100 "$idx"

	run -0 mq peek q --from 1500 -n 2
	assert_eq "$output" "$(seq 1501 1502)"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 2000)"
	# Opening the partition for writing rebuilds the active index (with a
	# notice); verify must mention it either way.
	run mq verify
	echo "$output"
	[[ "$output" == *index* ]]
	run -0 mq verify --repair
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	assert_eq "$(stat -c %s "$idx")" 16000
}

@test "recovery: zeroed and truncated indexes of sealed segments are reported and rebuilt" {
	mq create q --segment-bytes 4k
	for i in $(seq 0 19); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	d=$(part_dir q)
	[ "$(ls "$d"/*.log | wc -l)" -ge 4 ]
	idx0=$(ls "$d"/*.idx | sort | sed -n 1p)
	idx1=$(ls "$d"/*.idx | sort | sed -n 2p)
	dd if=/dev/zero of="$idx0" bs="$(stat -c %s "$idx0")" count=1 conv=notrunc status=none
	truncate -s 0 "$idx1"
	base1=$(basename "$idx1" .idx)
	base1=$((10#$base1))

	run -0 mq peek q
	assert_eq "$output" "$(seq 1 2000)"
	run -0 mq peek q --from 150 -n 1
	assert_eq "$output" "151"
	run -0 mq peek q --from $((base1 + 5)) -n 1
	assert_eq "$output" "$((base1 + 6))"

	run -65 mq verify
	[[ "$output" == *"index '$idx0' disagrees"* ]]
	[[ "$output" == *"index '$idx1' disagrees"* ]]
	run -0 mq verify --repair
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	run -0 mq peek q --from 150 -n 1
	assert_eq "$output" "151"
}

@test "recovery: an index pointing inside batches (stale or damaged) never makes a read fail" {
	seq 1 1000 | mq put q
	seq 1001 2000 | mq put q
	idx=$(part_dir q)/00000000000000000000.idx
	# Every entry names position 100: inside the first batch, not a start.
	for i in $(seq 1 2000); do printf '\144\0\0\0\0\0\0\0'; done >"$idx"
	run --separate-stderr mq peek q --from 1500 -n 2
	echo "exit $status, stderr: $stderr"
	assert_eq "$status" 0
	assert_eq "$output" "$(seq 1501 1502)"
	run -0 --separate-stderr mq peek q --from 5 -n 2
	assert_eq "$output" "$(seq 6 7)"
	run -0 --separate-stderr mq get q -g g -n 3
	assert_eq "$output" "$(seq 1 3)"
	run -0 --separate-stderr mq get q -g g -n 3 # from offset 3: an index lookup
	assert_eq "$output" "$(seq 4 6)"
	run -65 mq verify
	[[ "$output" == *"index '$idx' disagrees"* ]]
	run -0 mq verify --repair
	run -0 mq verify
}

# ----- (d) a flipped bit inside a sealed segment -----

@test "recovery: a flipped byte in a sealed segment: peek stops (65), verify names it, repair quarantines only that batch" {
	mq create q --segment-bytes 4k
	for i in $(seq 0 19); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	seq 1 2000 >"$BATS_TEST_TMPDIR/input"
	d=$(part_dir q)
	log=$(seg_logs "$d" | head -n 1)
	[ "$(seg_logs "$d" | wc -l)" -ge 3 ] # the first segment is sealed
	seg_batches "$log" >"$BATS_TEST_TMPDIR/batches"
	[ "$(wc -l <"$BATS_TEST_TMPDIR/batches")" -ge 3 ] # damage has valid batches after it
	read -r pos len base count < <(sed -n 2p "$BATS_TEST_TMPDIR/batches")
	flip_byte "$log" $((pos + len / 2))

	run -65 --separate-stderr mq peek q
	echo "stderr: $stderr"
	[[ "$stderr" == *"$log:$pos"* ]]
	# Never anything that was not put: no damaged data printed.
	printf '%s\n' "${lines[@]}" >"$BATS_TEST_TMPDIR/printed"
	run -0 lines_not_in "$BATS_TEST_TMPDIR/printed" "$BATS_TEST_TMPDIR/input"
	assert_eq "$output" ""
	# A reader starting past the damage is not hurt by it.
	run -0 mq peek q --from $((base + count)) -n 1
	assert_eq "$output" "$((base + count + 1))"

	run -65 mq verify
	echo "$output"
	[[ "$output" == *"q/0: offsets $base-$((base + count - 1)):"* ]]
	[[ "$output" == *"$log:$pos"* ]]

	run -0 mq verify --repair
	echo "$output"
	[[ "$output" == *"q/0: offsets $base-$((base + count - 1)):"* ]]
	[[ "$output" == *"moved $len damaged bytes"*"quarantine/"* ]]
	q=$(ls "$d/quarantine")
	[ -n "$q" ]
	assert_eq "$(cat "$d"/quarantine/* | wc -c)" "$len"

	# Everything but the damaged batch, including the valid batches after it.
	run -0 mq peek q
	seq 1 2000 | sed "$((base + 1)),$((base + count))d" >"$BATS_TEST_TMPDIR/expect"
	assert_eq "$output" "$(cat "$BATS_TEST_TMPDIR/expect")"
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
	# The partition keeps working: offsets continue after the old end.
	run -0 mq put q --print-offsets more
	assert_eq "$output" "0:2000"
}

@test "recovery: a flipped byte in the active segment fails peek (65) and a later repair keeps the rest" {
	for i in 0 1 2 3; do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	log=$(seg_logs "$(part_dir q)")
	read -r pos len base count < <(seg_batches "$log" | sed -n 2p)
	flip_byte "$log" $((pos + len - 3))

	run -65 --separate-stderr mq peek q
	[[ "$stderr" == *"$log:$pos"* ]]
	run -0 lines_not_in <(printf '%s\n' "${lines[@]}") <(seq 1 400)
	assert_eq "$output" ""
	run -65 mq verify
	[[ "$output" == *"offsets 100-199"* ]]
	run -0 mq verify --repair
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 100; seq 201 400)"
	run -0 mq put q --print-offsets z
	assert_eq "$output" "0:400"
	run -0 mq verify
}

# ----- (e) a damaged head file -----

@test "recovery: a zeroed head file is rebuilt by the next reader" {
	mq create q --segment-bytes 4k
	for i in $(seq 0 9); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	head=$(part_dir q)/head
	dd if=/dev/zero of="$head" bs=40 count=1 conv=notrunc status=none
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 1000)"
	run -0 mq verify
	[[ "$output" == "ok: "* ]]
}

@test "recovery: a zeroed head file: the next writer continues at the right offset" {
	mq create q --segment-bytes 4k
	for i in $(seq 0 9); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	dd if=/dev/zero of="$(part_dir q)/head" bs=40 count=1 conv=notrunc status=none
	run -0 mq put q --print-offsets next
	assert_eq "$output" "0:1000"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 1000; echo next)"
	run -0 mq verify
}

@test "recovery: a head file that is empty, garbage or missing is recovered" {
	mq create q --segment-bytes 4k
	for i in $(seq 0 9); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	head=$(part_dir q)/head
	: >"$head"
	run -0 mq get q -g g -n 5
	assert_eq "$output" "$(seq 1 5)"
	head -c 40 /dev/urandom >"$head"
	run -0 mq peek q -n 1 --from 999
	assert_eq "$output" "1000"
	rm "$head"
	run -0 mq put q --print-offsets last
	assert_eq "$output" "0:1000"
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 1000; echo last)"
	run -0 mq verify
}

# ----- (f) a damaged group offset file -----

@test "recovery: a zeroed group offset file makes the group read again from the start" {
	seq 1 100 | mq put q
	run -0 mq get q -g g -n 30
	run -0 mq get q -g g -n 10
	assert_eq "${lines[9]}" "40"
	off=$MQ_SPOOL/q/groups/g/0.off
	dd if=/dev/zero of="$off" bs=1 count="$(stat -c %s "$off")" conv=notrunc status=none
	run -65 mq verify
	[[ "$output" == *"offset file '$off' of group 'g' is damaged"* ]]
	run -0 mq get q -g g -n 3
	assert_eq "$output" "$(seq 1 3)"
	run -0 mq verify
}

@test "recovery: a damaged newest record falls back to the older commit (redelivery, never a skip)" {
	seq 1 100 | mq put q
	mq get q -g g -n 30 >/dev/null # record 1: offset 30
	mq get q -g g -n 10 >/dev/null # record 2, the last 64 bytes of the file: offset 40
	off=$MQ_SPOOL/q/groups/g/0.off
	flip_byte "$off" $(($(stat -c %s "$off") - 64 + 24)) # inside record 2's committed offset
	run -0 mq get q -g g -n 2
	assert_eq "$output" "$(seq 31 32)"
	run -0 mq get q -g g -n 2
	assert_eq "$output" "$(seq 33 34)"
}

@test "recovery: a truncated or garbage group offset file reads as offset 0" {
	seq 1 100 | mq put q
	mq get q -g g -n 50 >/dev/null
	off=$MQ_SPOOL/q/groups/g/0.off
	truncate -s 7 "$off"
	run -0 mq get q -g g
	assert_eq "$output" "1"
	head -c 64 /dev/urandom >"$off"
	run -0 mq get q -g g
	assert_eq "$output" "1"
	run -0 mq get q -g g
	assert_eq "$output" "2"
}

@test "recovery: verify of the whole spool names the queue it cannot open" {
	mq put a 1
	mq put q 1
	echo 'partitions: [' >"$MQ_SPOOL/q/meta.yaml"
	run --separate-stderr mq verify
	echo "exit $status, stderr: $stderr"
	[ "$status" -ne 0 ]
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: verify: q: $MQ_SPOOL/q/meta.yaml"* ]]
	run -0 mq verify a
}
