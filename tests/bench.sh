#!/usr/bin/env bash
# make bench: throughput and cost figures for one partition, each the
# median of $RUNS runs, with baselines measured in the same run so the
# ratios mean something on a shared, noisy machine.  Not a test: it
# never fails on a number.
set -eu
MQ=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
RUNS=${RUNS:-3}
N100=${N100:-2000000}    # 100-byte lines for the pipe runs
N1K=${N1K:-200000}       # 1 KiB lines
NALWAYS=${NALWAYS:-3000} # messages for fsync=always
work=$(mktemp -d "${TMPDIR:-/tmp}/mq-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
export MQ_SPOOL="$work/spool"

# now_us: microseconds, without forking (bash 5's EPOCHREALTIME).
now_us() { local t=${EPOCHREALTIME/[.,]/}; echo "$t"; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# time_us CMD...: run it, print elapsed microseconds.
time_us() {
	local s=${EPOCHREALTIME/[.,]/}
	"$@"
	local e=${EPOCHREALTIME/[.,]/}
	echo $((e - s))
}

# time_quiet CMD...: like time_us with the command's stdout discarded.
time_quiet() {
	local s=${EPOCHREALTIME/[.,]/}
	"$@" >/dev/null
	local e=${EPOCHREALTIME/[.,]/}
	echo $((e - s))
}

# run_med NAME CMD...: median elapsed microseconds over RUNS runs, with a
# fresh queue name per run in $Q.
run_med() {
	shift
	i=0
	while [ $i -lt "$RUNS" ]; do
		i=$((i + 1))
		Q="b$(now_us)"
		export Q
		time_us sh -c "$*"
	done | median
}

rate() { awk -v n="$1" -v us="$2" 'BEGIN { printf "%.0f", n / (us / 1e6) }'; }
mbps() { awk -v b="$1" -v us="$2" 'BEGIN { printf "%.1f", b / (us / 1e6) / 1048576 }'; }

# Peak RSS in KiB of a command (GNU time, else python3, else "?").
peak_rss() {
	if [ -x /usr/bin/time ]; then
		/usr/bin/time -f %M sh -c "$*" 2>&1 >/dev/null | tail -n 1
	elif command -v python3 >/dev/null; then
		python3 -c 'import resource,subprocess,sys
subprocess.run(["sh","-c",sys.argv[1]],stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)' "$*"
	else
		echo "?"
	fi
}

awk -v n="$N100" 'BEGIN { s = sprintf("%091d", 0); for (i = 0; i < n; i++) printf "%08d%s\n", i, s }' >"$work/l100"
awk -v n="$N1K" 'BEGIN { s = sprintf("%1015d", 0); for (i = 0; i < n; i++) printf "%08d%s\n", i, s }' >"$work/l1k"
head -n "$NALWAYS" "$work/l100" >"$work/a100"
head -n "$NALWAYS" "$work/l1k" >"$work/a1k"
b100=$(wc -c <"$work/l100")
b1k=$(wc -c <"$work/l1k")

echo "mq bench: one partition, median of $RUNS runs, $(nproc) cores, spool on $(df -P "$work" | awk 'NR==2 {print $1}')"
printf '%-44s %12s %10s\n' "what" "msgs/s" "MB/s"
line() { printf '%-44s %12s %10s\n' "$1" "$2" "$3"; }

t=$(run_med base "cat '$work/l100' | cat > '$work/plain'")
line "baseline: cat | cat > file, 100 B lines" "$(rate "$N100" "$t")" "$(mbps "$b100" "$t")"
base100=$t
t=$(run_med put "cat '$work/l100' | '$MQ' put \$Q")
line "put 100 B from a pipe, fsync batch" "$(rate "$N100" "$t")" "$(mbps "$b100" "$t")"
put100=$t
t=$(run_med put "cat '$work/l1k' | '$MQ' put \$Q")
line "put 1 KiB from a pipe, fsync batch" "$(rate "$N1K" "$t")" "$(mbps "$b1k" "$t")"
t=$(run_med put "cat '$work/a100' | '$MQ' put --fsync always \$Q")
line "put 100 B from a pipe, fsync always" "$(rate "$NALWAYS" "$t")" "$(mbps $((NALWAYS * 100)) "$t")"
t=$(run_med put "cat '$work/a1k' | '$MQ' put --fsync always \$Q")
line "put 1 KiB from a pipe, fsync always" "$(rate "$NALWAYS" "$t")" "$(mbps $((NALWAYS * 1024)) "$t")"

"$MQ" put full <"$work/l100"
t=$(run_med peek "'$MQ' peek full >/dev/null")
line "peek 100 B to /dev/null" "$(rate "$N100" "$t")" "$(mbps "$b100" "$t")"
t=$(run_med base "cat '$work/l100' >/dev/null")
line "baseline: cat file >/dev/null" "$(rate "$N100" "$t")" "$(mbps "$b100" "$t")"
i=0
while [ $i -lt "$RUNS" ]; do
	i=$((i + 1))
	"$MQ" put "g$i" <"$work/l100"
	time_quiet "$MQ" get "g$i" -n 0
done | median >"$work/t"
t=$(cat "$work/t")
line "get -n 0 (all) 100 B to /dev/null" "$(rate "$N100" "$t")" "$(mbps "$b100" "$t")"

# One-shot cost: many single invocations, medians side by side.
"$MQ" put one warm
one() {
	i=0
	while [ $i -lt 200 ]; do
		i=$((i + 1))
		time_quiet "$@"
	done | median
}
echo
printf '%-44s %12s\n' "one invocation" "median µs"
printf '%-44s %12s\n' "/bin/true (process start baseline)" "$(one /bin/true)"
printf '%-44s %12s\n' "mq put one msg (fsync batch: one fdatasync)" "$(one "$MQ" put one msg)"
printf '%-44s %12s\n' "mq put --fsync never one msg" "$(one "$MQ" put --fsync never one msg)"
printf '%-44s %12s\n' "mq get one" "$(one "$MQ" get one)"
printf '%-44s %12s\n' "mq put, queue holding $N100 messages" "$(one "$MQ" put full msg)"
printf '%-44s %12s\n' "mq peek -n 1 --from N/2 (index seek), same" "$(one "$MQ" peek full -n 1 --from $((N100 / 2)))"
printf '%-44s %12s\n' "mq peek -n 1 --from 5, queue of a few" "$(one "$MQ" peek one -n 1 --from 5)"

echo
printf '%-44s %12s\n' "peak RSS" "KiB"
printf '%-44s %12s\n' "put 100 B x $N100 from a pipe" "$(peak_rss "'$MQ' put rss1 <'$work/l100'")"
printf '%-44s %12s\n' "put 1 KiB x $N1K from a pipe" "$(peak_rss "'$MQ' put rss2 <'$work/l1k'")"
printf '%-44s %12s\n' "peek 100 B x $N100" "$(peak_rss "'$MQ' peek full")"
echo
awk -v a="$put100" -v b="$base100" 'BEGIN { printf "put 100 B (batch) takes %.2fx the time of cat | cat > file\n", a / b }'
