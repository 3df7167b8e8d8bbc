#!/usr/bin/env bats
# Crash test: writers, stream readers and group consumers run together on
# one partition while random ones are killed with SIGKILL at random
# moments (by timeout(1) a random 1-30 ms after they start, and by kill -9
# after a random delay).  Afterwards (DESIGN.md §3-5):
#  - every message whose offset a writer printed (--print-offsets, only
#    after the sync) is at that offset, exactly once;
#  - what survives of each writer is a prefix of its input, in order
#    (a crash may lose only unacknowledged messages at the end);
#  - no reader ever printed anything but whole messages it was given;
#  - no get that exited 0 delivered a message another such get delivered
#    (a killed get may be redelivered: at-least-once);
#  - readers and consumers exit only 0, 1 (nothing) or 137 (killed);
#  - `mq verify` exits 0.
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

ID_RE='^w[0-9]+x[0-9]-[0-9][0-9][0-9][0-9][0-9][0-9][0-9]$' # no {7}: mawk

# Start a job in the background: "$2..." is a command line (eval'd, so it
# may be a pipeline) whose last process's pid goes to $1.pid and exit
# status to $1.rc.  The wrapper keeps bash's "Killed" reports quiet.
spawn() {
	local j=$1
	shift
	{
		eval "$* &"
		echo $! >"$j.pid"
		local rc=0
		wait $! || rc=$?
		echo "$rc" >"$j.rc"
	} >/dev/null 2>&1 &
	BG_PIDS+=("$!")
}

# Half the time, a prefix that SIGKILLs the command 1-30 ms after its
# own start: kills land while it works, not after it is done.
killer() {
	[ $((RANDOM % 2)) = 0 ] && printf 'timeout -s KILL 0.%03d' $((RANDOM % 30 + 1))
}

# Exit status of job $1 once it ends (bounded: a hang is killed, "hung").
reap() {
	if ! wait_for "[ -s '$1.rc' ]" 30; then
		kill -9 "$(cat "$1.pid" 2>/dev/null)" 2>/dev/null
		echo hung
		return
	fi
	cat "$1.rc"
}

@test "crash: 25 rounds of writers, readers and consumers killed at random keep every acknowledged message" {
	local t=$BATS_TEST_TMPDIR it k j pid rc bad=""
	mkdir -p "$t/acked" "$t/reads" "$t/gets"
	mq create q --segment-bytes 16k
	# A group that never reads keeps retention from removing anything, so
	# the final peek can account for every message.
	run -1 mq get q -g keep
	local deadline=$((SECONDS + 40))
	for it in $(seq 1 25); do
		[ "$SECONDS" -lt "$deadline" ] || { echo "stopped after $((it - 1)) rounds (time)"; break; }
		local js=()
		for k in 1 2 3; do
			spawn "$t/acked/$it.$k" "seq -f 'w${it}x${k}-%07g' 1 $((RANDOM % 3000 + 1)) |" \
				"$(killer)" '"$MQ" put q --print-offsets' ">'$t/acked/$it.$k' 2>'$t/acked/$it.$k.err'"
			js+=("$t/acked/$it.$k")
		done
		local from=""
		[ $((it % 5)) = 0 ] || from="--last 3000"
		spawn "$t/reads/$it" "$(killer)" '"$MQ" peek q' "$from" '-f "%s\n"' \
			">'$t/reads/$it.out' 2>'$t/reads/$it.err'"
		js+=("$t/reads/$it")
		for j in 1 2 3; do
			spawn "$t/gets/$it.$j" "$(killer)" '"$MQ" get q -g g -n 50 -f "%s\n"' \
				">'$t/gets/$it.$j.out' 2>'$t/gets/$it.$j.err'"
			js+=("$t/gets/$it.$j")
		done

		# And kill -9 a few more at one random moment.
		sleep "0.00$RANDOM"
		for j in "${js[@]}"; do
			if [ $((RANDOM % 4)) = 0 ]; then
				wait_for "[ -s '$j.pid' ]"
				kill -9 "$(cat "$j.pid")" 2>/dev/null || true
			fi
		done
		for j in "${js[@]}"; do
			rc=$(reap "$j")
			case "$j" in
			*/acked/*) [[ "$rc" =~ ^(0|137)$ ]] ;;
			*) [[ "$rc" =~ ^(0|1|137)$ ]] ;;
			esac || bad+="${j#$t/}: exit $rc: $(cat "$j.err" 2>/dev/null)"$'\n'
		done
	done
	wait
	printf '%s' "$bad"
	[ -z "$bad" ]

	# Everything acknowledged is at its offset.
	for f in "$t"/acked/*.[0-9]; do
		w=${f##*/}
		complete_lines "$f" | awk -F: -v p="w${w%.*}x${w#*.}-" '{ printf "%s %s%07d\n", $2, p, NR }'
	done | sort >"$t/expected"
	run -0 --separate-stderr mq peek q -f '%o %s\n'
	printf '%s\n' "${lines[@]}" >"$t/all"
	echo "$(wc -l <"$t/expected") acknowledged, $(wc -l <"$t/all") stored"
	[ "$(wc -l <"$t/expected")" -gt 0 ]
	run -0 comm -23 "$t/expected" <(sort "$t/all")
	assert_eq "$output" ""

	# Nothing twice, nothing unparseable, offsets dense.
	run -0 bash -c "cut -d' ' -f2 '$t/all' | sort | uniq -d"
	assert_eq "$output" ""
	run -0 awk -v re="$ID_RE" 'NR - 1 != $1 || $2 !~ re { print NR ": " $0; exit 1 }' "$t/all"

	# Each writer's survivors are a prefix of its input, in order.
	run -0 awk '{ split($2, a, "-"); if (a[2] + 0 != ++n[a[1]]) { print "out of order or gap: " $0; exit 1 } }' "$t/all"

	# Readers printed only whole messages (a killed one may end mid-line).
	for f in "$t"/reads/*.out "$t"/gets/*.out; do
		complete_lines "$f" | grep -Ev "$ID_RE" | sed "s|^|${f##*/}: |" || true
	done >"$t/garbage"
	assert_eq "$(cat "$t/garbage")" ""

	# No message delivered twice to the group by gets that succeeded.
	local ok=0
	for f in "$t"/gets/*.rc; do
		[ "$(cat "$f")" = 0 ] || continue
		ok=$((ok + 1))
		cat "${f%.rc}.out"
	done >"$t/delivered"
	echo "$ok gets succeeded, $(wc -l <"$t/delivered") messages delivered"
	[ "$ok" -gt 0 ]
	run -0 bash -c "sort '$t/delivered' | uniq -d"
	assert_eq "$output" ""
	# ... and everything delivered is stored.
	run -0 comm -13 <(cut -d' ' -f2 "$t/all" | sort) <(sort "$t/delivered")
	assert_eq "$output" ""

	# At-least-once: drained to the end, the group skipped nothing stored
	# (a killed get's output counts: it may have been printed, then lost
	# its commit, but never committed without printing).
	run mq get q -g g -n 0 -f '%s\n'
	[[ "$status" =~ ^(0|1)$ ]]
	printf '%s\n' "${lines[@]}" >"$t/drain"
	for f in "$t"/gets/*.out; do complete_lines "$f"; done | cat - "$t/drain" | sort -u >"$t/seen"
	run -0 comm -23 <(cut -d' ' -f2 "$t/all" | sort) "$t/seen"
	echo "${#lines[@]} stored messages never delivered to the group"
	assert_eq "$output" ""

	run mq verify
	echo "$output"
	assert_eq "$status" 0
	[[ "$output" == "ok: "* ]]
}
