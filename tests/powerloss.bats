#!/usr/bin/env bats
# Power-loss test (DESIGN.md §4, "Durability: the ladder").  The spool
# lives on tests/plugfs, a FUSE file system that keeps every write in
# memory until fsync/fdatasync and every create, rename and unlink until
# its directory is fsynced (the model is at the top of tests/plugfs.c).
# Each round runs, in a process group of its own:
#  - a streaming producer (`mq put -p 0 --print-offsets` fed at a steady
#    pace; each offset line is stamped with the time it was read);
#  - a loop of short puts (`mq put -p 1 --print-offsets` of 1-20 messages;
#    a partition of their own, so that their syncs at exit do not sync
#    the streaming put's data and hide its interval);
#  - a loop of group consumers (`mq get -g g -n 20`);
# then, at a random moment, kills the whole group with SIGKILL, waits until
# every process of it is gone and "pulls the plug" (plugfs drops whatever
# was not synced), and checks the spool as the next boot would find it:
#  - `mq verify` exits 0 and `mq peek` reads every message, offsets dense,
#    nothing twice, each producer's survivors a prefix of what it sent;
#  - whatever survived an earlier plug is still there, at its offset;
#  - fsync always/batch: every acknowledged message is there, at the offset
#    put printed; everything a consumer was given is there; the group's
#    committed offset covers every get that exited 0;
#  - fsync interval:MS: a put that exited 0 lost nothing; an acknowledged
#    message lost was acknowledged at most MS (+ PLUG_SLACK_MS) before the
#    plug;
#  - fsync never: only that the spool opens and verifies clean.
# At the end the group drains what is stored (at-least-once).  A summary
# line per mode (plugs, messages acknowledged, lost, the largest loss
# window measured) goes to fd 3.
#
# Each mode runs for PLUG_SECONDS (default 12) s of rounds; PLUG_ROUNDS=N
# (make torture) runs exactly N rounds per mode instead.  Needs root,
# /dev/fuse, fusermount3 and tests/plugfs (make plugfs; make deps installs
# libfuse3-dev); skips and says why without them.
bats_require_minimum_version 1.5.0
load helper
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

PLUGFS=$BATS_TEST_DIRNAME/plugfs
: "${PLUG_SLACK_MS:=100}"

# helper.bash's teardown, kept to be called from this file's.
eval "helper_$(declare -f teardown)"

# Emits "PREFIX-0000001", ... at about 4000 lines a second, for ever.
GEN='import sys, time
p, i = sys.argv[1], 0
while True:
    sys.stdout.write("".join("%s-%07d\n" % (p, i + k) for k in range(1, 21)))
    sys.stdout.flush()
    i += 20
    time.sleep(0.005)'

# Reads the fifo $1 until EOF; writes each line to $2 as "MS LINE", MS the
# time (epoch milliseconds) the line was read.
STAMP='import os, sys, time
fd, out, rest = os.open(sys.argv[1], os.O_RDONLY), open(sys.argv[2], "w"), b""
while True:
    b = os.read(fd, 65536)
    if not b:
        break
    t = time.time() * 1000
    rest += b
    *lines, rest = rest.split(b"\n")
    out.write("".join("%.1f %s\n" % (t, l.decode()) for l in lines))
    out.flush()'

setup() {
	local_only "mounts its own file system and kills its own processes"
	[ "$(id -u)" = 0 ] || skip "needs root (FUSE mount)"
	[ -c /dev/fuse ] || skip "no /dev/fuse"
	command -v fusermount3 >/dev/null || skip "no fusermount3 (apt-get install fuse3)"
	[ -x "$PLUGFS" ] || skip "tests/plugfs not built (make deps plugfs: needs libfuse3-dev)"
	MNT=$BATS_TEST_TMPDIR/mnt
	PG=
	PLUGFS_PID=
	mkdir -p "$MNT"
	"$PLUGFS" "$MNT" -f -s -o auto_unmount 2>"$BATS_TEST_TMPDIR/plugfs.log" &
	PLUGFS_PID=$!
	wait_for "grep -q ' $MNT fuse' /proc/self/mounts" 10 || { cat "$BATS_TEST_TMPDIR/plugfs.log"; return 1; }
	mkdir "$MNT/spool"
	echo sync >"$MNT/.plugfs" # the spool directory itself survives
	export MQ_SPOOL=$MNT/spool
	BG_PIDS=()
}

teardown() {
	[ -n "${PG:-}" ] && kill -9 -- "-$PG" 2>/dev/null
	[ -n "${PG:-}" ] && wait_for "group_gone $PG" 10
	if [ -n "${PLUGFS_PID:-}" ]; then
		fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
		wait_for "proc_gone $PLUGFS_PID" 10 || kill -9 "$PLUGFS_PID" 2>/dev/null
		wait "$PLUGFS_PID" 2>/dev/null || true
	fi
	helper_teardown
}

# Is no process left in process group $1?
group_gone() {
	# after the "(name) ": state, parent, process group; zombies are gone
	! cat /proc/[0-9]*/stat 2>/dev/null | sed 's/.*) //' | awk -v g="$1" '$3 == g && $1 != "Z" { f = 1 } END { exit !f }'
}

ms_now() { echo $((${EPOCHREALTIME/./} / 1000)); }

# The workload of one round, run by `setsid bash ROUND.sh R DIR` so that
# one kill reaches every process of it, including those starting then.
write_round_script() {
	cat >"$1" <<'EOF'
r=$1 t=$2
"$PY" -c "$GEN" "r${r}a" | "$MQ" put q -p 0 --print-offsets >"$t/r$r.a.fifo" 2>"$t/r$r.a.err" &
(
	i=0
	while :; do
		i=$((i + 1))
		echo $((${EPOCHREALTIME/./} / 1000)) >"$t/r$r.b$i.t"
		seq -f "r${r}b${i}-%07g" 1 $((RANDOM % 20 + 1)) |
			"$MQ" put q -p 1 --print-offsets >"$t/r$r.b$i.out" 2>"$t/r$r.b$i.err"
		echo $? >"$t/r$r.b$i.rc"
	done
) &
(
	i=0
	while :; do
		i=$((i + 1))
		"$MQ" get q -g g -n 20 --wait=200ms -f '%p:%o %s\n' >"$t/r$r.c$i.out" 2>"$t/r$r.c$i.err"
		echo $? >"$t/r$r.c$i.rc"
	done
) &
wait
EOF
}

# One round: run the workload, pull the plug at a random moment.  Sets
# PLUG_T (epoch ms, after the kill).
plug_round() {
	local r=$1 t=$2 stamp ms
	mkfifo "$t/r$r.a.fifo"
	"$PY" -c "$STAMP" "$t/r$r.a.fifo" "$t/r$r.a.acks" &
	stamp=$!
	BG_PIDS+=("$stamp")
	PY=$PY GEN=$GEN setsid bash "$t/round.sh" "$r" "$t" </dev/null >/dev/null 2>&1 &
	PG=$!
	BG_PIDS+=("$PG")
	# setsid did not fork (a background job is no group leader): $! leads
	# the new process group
	wait_for "[ \"\$(cut -d' ' -f5 /proc/$PG/stat)\" = $PG ]" 5
	ms=$((RANDOM % 1200 + 30))
	sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"
	kill -9 -- "-$PG"
	PLUG_T=$(ms_now)
	wait_for "group_gone $PG" 20
	wait "$PG" 2>/dev/null || true
	PG=
	# the stamper reads what the killed put wrote, then EOF
	wait "$stamp" || true
	echo plug >"$MNT/.plugfs"
}

# ACKED R DIR: prints "OFFSET ID MS SYNCED" for every message acknowledged
# in round R: the streaming put's (MS: when its offset was read) and the
# short puts' (MS: when the put started; SYNCED=1 if it exited 0, so it
# synced before).  Writes DIR/rR.delivered (what the round's gets printed)
# and appends what gets that exited 0 printed to DIR/delivered_ok.  A
# killed writer's output may end in a partial line: it is left out.
ACKED='import glob, os, re, sys
r, t = sys.argv[1], sys.argv[2]
def lines(path):
    try:
        s = open(path).read()
    except FileNotFoundError:
        return []
    return s[:s.rfind("\n") + 1].splitlines()
def first(path, default=""):
    l = lines(path)
    return l[0] if l else default
out = []
for n, l in enumerate(lines("%s/r%s.a.acks" % (t, r)), 1):
    ms, po = l.split()
    out.append("%s r%sa-%07d %s 0" % (po, r, n, ms))
for f in glob.glob("%s/r%s.b*.t" % (t, r)):
    b = f[:-2]
    i = b.rsplit(".b", 1)[1]
    ms, ok = first(f, "0"), first(b + ".rc") == "0"
    for n, l in enumerate(lines(b + ".out"), 1):
        out.append("%s r%sb%s-%07d %s %d" % (l, r, i, n, ms, ok))
sys.stdout.write("".join(x + "\n" for x in out))
dl, okl = [], []
for f in glob.glob("%s/r%s.c*.out" % (t, r)):
    got = lines(f)
    dl += got
    if first(f[:-4] + ".rc") == "0":
        okl += got
open("%s/r%s.delivered" % (t, r), "w").write("".join(x + "\n" for x in dl))
open("%s/delivered_ok" % t, "a").write("".join(x + "\n" for x in okl))'

# Run the power-loss rounds for fsync mode $1 (interval: $2 = MS).
run_mode() {
	local mode=$1 ms=${2:-} t=$BATS_TEST_TMPDIR r=0 deadline
	local plugs=0 nacked=0 nlost=0 maxwin=-1 lost_rows
	PY=python3
	[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
	write_round_script "$t/round.sh"
	mq create q --fsync "$mode${ms:+:$ms}" --segment-bytes 64k --partitions 2
	# A group that never reads keeps segments the consumers are done with
	# from being removed, so every message stays to be checked.  Made
	# durable here whatever the mode (a queue made long before the plug).
	run -1 mq get q -g keep
	echo sync >"$MNT/.plugfs"
	: >"$t/prev"
	: >"$t/delivered_ok"
	deadline=$((SECONDS + ${PLUG_SECONDS:-12}))
	while :; do
		if [ -n "${PLUG_ROUNDS:-}" ]; then
			[ "$r" -lt "$PLUG_ROUNDS" ] || break
		else
			[ "$SECONDS" -lt "$deadline" ] || break
		fi
		r=$((r + 1))
		plug_round "$r" "$t"
		plugs=$((plugs + 1))

		# PLUG_KEEP=1: a copy of each round's spool as the plug left it
		[ -z "${PLUG_KEEP:-}" ] || cp -a "$MNT/spool" "$t/spool.r$r"
		# The spool opens and verifies clean.
		run mq verify
		[ "$status" = 0 ] || { echo "round $r: mq verify exited $status: $output"; return 1; }
		run --separate-stderr mq peek q -f '%p:%o %s\n'
		[[ "$status" =~ ^(0|1)$ ]] || { echo "round $r: mq peek exited $status: $stderr"; return 1; }
		printf '%s\n' "${lines[@]}" | sed '/^$/d' >"$t/stored"
		awk '{ split($1, a, ":") } a[2] != n[a[1]]++ { print "round '"$r"': offsets not dense at line " NR ": " $0; exit 1 }' "$t/stored"
		run -0 bash -c "cut -d' ' -f2 '$t/stored' | sort | uniq -d"
		assert_eq "$output" ""
		# each producer's survivors are a prefix of what it sent, in order
		run -0 awk '{ n = split($2, a, "-"); if (a[2] + 0 != ++seen[a[1]]) { print "round '"$r"': gap or disorder: " $0; exit 1 } }' "$t/stored"
		# what survived the last plug is still there
		run -0 comm -23 <(sort "$t/prev") <(sort "$t/stored")
		[ -z "$output" ] || { echo "round $r: lost what survived an earlier plug:"; echo "$output" | head; return 1; }

		"$PY" -c "$ACKED" "$r" "$t" >"$t/r$r.acked"
		nacked=$((nacked + $(wc -l <"$t/r$r.acked")))
		# acknowledged but not at its offset: "OFFSET ID MS SYNCED"
		awk 'FILENAME == ARGV[1] { have[$1 " " $2] = 1; next } !(($1 " " $2) in have)' \
			"$t/stored" "$t/r$r.acked" >"$t/r$r.lost"
		nlost=$((nlost + $(wc -l <"$t/r$r.lost")))
		# an acknowledged offset holds its message or nothing
		run -0 awk 'FILENAME == ARGV[1] { at[$1] = $2; next } ($1 in at) && at[$1] != $2 { print "offset " $1 " holds " at[$1] ", acked " $2 }' \
			"$t/stored" "$t/r$r.acked"
		assert_eq "$output" ""
		if [ -s "$t/r$r.lost" ]; then
			local w
			w=$(awk -v T="$PLUG_T" 'BEGIN { m = -1 } { d = T - $3; if (d > m) m = d } END { printf "%d", m }' "$t/r$r.lost")
			[ "$w" -gt "$maxwin" ] && maxwin=$w
		fi
		case $mode in
		always | batch)
			if [ -s "$t/r$r.lost" ]; then
				echo "round $r ($mode): acknowledged messages lost (offset id ack-ms synced), plug at $PLUG_T:"
				head "$t/r$r.lost"
				return 1
			fi
			;;
		interval)
			if awk '$4 == 1' "$t/r$r.lost" | grep -q .; then
				echo "round $r: messages of a put that exited 0 lost:"
				awk '$4 == 1' "$t/r$r.lost" | head
				return 1
			fi
			if [ "$maxwin" -gt $((ms + PLUG_SLACK_MS)) ]; then
				echo "round $r: lost a message acknowledged $maxwin ms before the plug (interval:$ms, slack $PLUG_SLACK_MS ms)"
				head "$t/r$r.lost"
				return 1
			fi
			;;
		esac

		# Consumers: what a get printed is stored (always/batch: readers see
		# only durable data) and a get that exited 0 committed durably.
		if [ "$mode" = always ] || [ "$mode" = batch ]; then
			run -0 comm -13 <(sort "$t/stored") <(sort "$t/r$r.delivered")
			[ -z "$output" ] || { echo "round $r: delivered but not stored:"; echo "$output" | head; return 1; }
			run -0 mq groups --json q
			local committed p okmax
			committed=$(json_eval "' '.join(map(str, [g['offsets'] for g in d if g['group'] == 'g'][0]))" <<<"$output")
			for p in 0 1; do
				okmax=$(awk -F'[: ]' -v p=$p 'BEGIN { m = -1 } $1 == p && $2 > m { m = $2 } END { print m }' "$t/delivered_ok")
				set -- $committed
				shift "$p"
				[ "$1" -gt "$okmax" ] ||
					{ echo "round $r: group g committed $1 in partition $p, but a get that exited 0 had offset $okmax"; return 1; }
			done
		fi
		cp "$t/stored" "$t/prev"
	done

	# At-least-once: drained, the group skipped nothing stored.
	run mq get q -g g -n 0 -f '%p:%o %s\n'
	[[ "$status" =~ ^(0|1)$ ]]
	if [ "$mode" = always ] || [ "$mode" = batch ]; then
		run -0 comm -23 <(sort "$t/stored") <(sort -u <(printf '%s\n' "${lines[@]}") "$t"/r*.delivered)
		[ -z "$output" ] || { echo "never delivered to the group:"; echo "$output" | head; return 1; }
	fi
	run mq verify
	assert_eq "$status" 0
	local summary
	summary="# powerloss fsync $mode${ms:+:$ms}: $plugs plugs survived, $nacked acknowledged, $nlost of them lost"
	[ "$maxwin" -ge 0 ] && summary+=", acknowledged at most ${maxwin} ms before the plug"
	summary+=", $(wc -l <"$t/stored") stored, plugfs: $(tr '\n' ' ' <"$MNT/.plugfs")"
	echo "$summary" >&3
	echo "$summary"
	[ "$plugs" -gt 0 ]
}

@test "powerloss: fsync always keeps every acknowledged message" {
	run_mode always
}

@test "powerloss: fsync batch keeps every acknowledged message" {
	run_mode batch
}

@test "powerloss: fsync interval:500 loses at most the last 500 ms of acknowledged messages" {
	run_mode interval 500
}

@test "powerloss: fsync never: the spool opens and verifies clean" {
	run_mode never
}
