#!/usr/bin/env bats
# Retention (DESIGN.md §2, mq.h): sealed segments go once every group has
# consumed them, when older than retain-age (by the .log mtime), or while
# the partition is over retain-bytes.  A reader or group that wanted
# removed offsets starts at the earliest one left; a group is told.
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

log_total() { bytes_of "$(part_dir "$1")"/*.log; }
nlogs() { ls "$(part_dir "$1")"/*.log | wc -l; }

@test "retention: a drained queue uses almost no disk" {
	mq create q --segment-bytes 64k
	seq 200000 | mq put q
	[ "$(log_total q)" -gt $((1024 * 1024)) ]
	run -0 --separate-stderr mq get q -n 0
	assert_eq "${#lines[@]}" 200000
	assert_eq "${lines[199999]}" 200000
	local total
	total=$(log_total q)
	echo "after draining: $total bytes of .log in $(nlogs q) segments"
	[ "$total" -lt $((100 * 1024)) ]
	# Still a working queue: new messages go on at the next offset.
	run -0 mq put q --print-offsets next
	assert_eq "$output" "0:200000"
	run -0 mq get q
	assert_eq "$output" "next"
	run -0 mq verify
}

@test "retention: segments stay until every group has consumed them" {
	mq create q --segment-bytes 4k
	for i in $(seq 0 19); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	local before
	before=$(nlogs q)
	[ "$before" -ge 4 ]
	run -0 mq get q -g a
	run -0 mq get q -g b
	assert_eq "$output" "1"
	run -0 mq get q -g a -n 0
	assert_eq "${#lines[@]}" 1999
	# b has read only offset 0: nothing may go.
	assert_eq "$(nlogs q)" "$before"
	run -0 mq peek q -n 1
	assert_eq "$output" "1"
	run -0 mq get q -g b -n 999
	assert_eq "${lines[998]}" "1000"
	# Only segments below offset 1000 may have gone; b's next is there.
	run -0 mq peek q -n 1 --from 1000
	assert_eq "$output" "1001"
	run -0 --separate-stderr mq get q -g b -n 0
	assert_eq "${lines[0]}" "1001"
	assert_eq "${#lines[@]}" 1000
	assert_eq "$stderr" ""
	# Both groups are done: only the active segment is left.
	assert_eq "$(nlogs q)" 1
	[ "$(log_total q)" -le $((8 * 1024)) ]
	run -0 mq verify
}

@test "retention: --retain-bytes 128k keeps a partition under 128k plus the active segment" {
	mq create q --segment-bytes 64k --retain-bytes 128k
	for i in $(seq 1 60); do
		seq -f "m$i-%g" 1 2000 | mq put q
		local d total=0 active last
		d=$(part_dir q)
		last=$(ls "$d"/*.log | sort | tail -n 1)
		active=$(bytes_of "${last%.log}".*)
		total=$(bytes_of "$d"/*.log "$d"/*.idx "$d"/*.tix)
		# Sealed segments (log + indexes, what retain-bytes counts) <= 128k.
		if [ $((total - active)) -gt $((128 * 1024)) ]; then
			echo "after put $i: $((total - active)) bytes in sealed segments"
			ls -l "$d"
			return 1
		fi
		[ "$(bytes_of "$last")" -le $((64 * 1024)) ]
	done
	# The newest messages are all there; the oldest are gone.
	run -0 mq peek q --last 2000
	assert_eq "${lines[0]}" "m60-1"
	assert_eq "${lines[1999]}" "m60-2000"
	run -0 mq peek q -n 1
	[[ "$output" != "m1-1" ]]
	run -0 mq verify
}

@test "retention: --retain-age removes sealed segments older than that at the next roll" {
	# 10 minutes, and segments aged by an hour with touch: no test step
	# can age anything by accident, however slow the machine.
	mq create q --segment-bytes 4k --retain-age 10m
	for i in $(seq 0 9); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	d=$(part_dir q)
	ls "$d"/*.log | sort >"$BATS_TEST_TMPDIR/old"
	[ "$(wc -l <"$BATS_TEST_TMPDIR/old")" -ge 3 ]
	# Age every segment but the active one by an hour (mq uses the mtime).
	head -n -1 "$BATS_TEST_TMPDIR/old" | xargs touch -d '1 hour ago'
	# A put that does not roll removes nothing ...
	run -0 mq put q small
	[ -e "$(head -n 1 "$BATS_TEST_TMPDIR/old")" ]
	# ... one that rolls removes every aged segment.
	seq 1001 1400 | mq put q
	while read -r f; do
		[ ! -e "$f" ] || { echo "still there: $f"; ls -l "$d"; return 1; }
	done < <(head -n -1 "$BATS_TEST_TMPDIR/old")
	first=$(basename "$(ls "$d"/*.log | sort | head -n 1)" .log)
	first=$((10#$first))
	[ "$first" -gt 0 ]

	# A stream read starts at the earliest message left.
	run -0 mq peek q -n 1 -f '%o'
	assert_eq "$output" "$first"
	run -0 mq peek q --from 0 -n 1 -f '%o'
	assert_eq "$output" "$first"
	# A group that never read them is told, and starts there too.
	run -0 --separate-stderr mq get q -g late -f '%o'
	assert_eq "$output" "$first"
	echo "stderr: $stderr"
	[[ "$stderr" == *"offsets 0-$((first - 1)) were removed"*"group 'late'"* ]]
	run -0 --separate-stderr mq get q -g late -f '%o'
	assert_eq "$output" "$((first + 1))"
	assert_eq "$stderr" ""
	run -0 mq verify
}

@test "retention: --retain-age by the real clock (no touch)" {
	mq create q --segment-bytes 4k --retain-age 1s
	for i in $(seq 0 9); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	oldest=$(ls "$(part_dir q)"/*.log | sort | head -n 1)
	# Rolling puts, until the first segment is more than a second old.
	wait_for "seq -f r%g 1 200 | '$MQ' put q && [ ! -e '$oldest' ]" 15
	run -0 mq peek q -n 1
	[[ "$output" != "1" ]]
	run -0 mq peek q --last 1
	assert_eq "$output" "r200"
	run -0 mq verify
}

@test "retention: retain-bytes removes unconsumed messages, and their group is told" {
	mq create q --segment-bytes 4k --retain-bytes 8k
	run -1 mq get q -g g
	for i in $(seq 0 19); do seq $((i * 100 + 1)) $((i * 100 + 100)) | mq put q; done
	run -0 mq peek q -n 1 -f '%o'
	first=$output
	[ "$first" -gt 0 ]
	run -0 --separate-stderr mq get q -g g -f '%o %s'
	assert_eq "$output" "$first $((first + 1))"
	[[ "$stderr" == *"offsets 0-$((first - 1)) were removed"* ]]
}
