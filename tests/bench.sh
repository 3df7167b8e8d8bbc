#!/usr/bin/env bash
# make bench: throughput and cost figures for one partition, each the
# median of $RUNS runs, with baselines measured in the same run so the
# ratios mean something on a shared, noisy machine.  Not a test: it
# never fails on a number.
#
# Usage: bash tests/bench.sh ./mq [./tests/leasebench]
set -eu
MQ=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
LB=
if [ $# -gt 1 ]; then LB=$(cd "$(dirname "$2")" && pwd)/$(basename "$2"); fi
RUNS=${RUNS:-3}
N100=${N100:-2000000}    # 100-byte lines for the pipe runs
N1K=${N1K:-200000}       # 1 KiB lines
NALWAYS=${NALWAYS:-3000} # messages for fsync=always
NCONS=${NCONS:-100000}   # messages for consume --batch 100
NCONS1=${NCONS1:-2000}   # messages for consume --batch 1
NLEASE=${NLEASE:-100000} # messages for lease get+ack
LEASEP=${LEASEP:-8}      # concurrent lease consumers
NWAKE=${NWAKE:-200}      # put -> waiting get -w round trips
KTXN1=${KTXN1:-200}      # transactions of 1 message (put --txn + commit)
KTXN100=${KTXN100:-50}   # transactions of 100 messages
KTXN10K=${KTXN10K:-10}   # transactions of 10000 messages
NPIPE=${NPIPE:-200000}   # 100-byte messages for mq pipe against get | put
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

# Consumer groups: consume with a no-op command, and lease get+ack by 8
# processes through the CLI and through the engine (tests/leasebench),
# the runs of each pair side by side.  The data is 100 B lines.
awk -v n="$NCONS" 'BEGIN { s = sprintf("%091d", 0); for (i = 0; i < n; i++) printf "%08d%s\n", i, s }' >"$work/c100"
head -n "$NCONS1" "$work/c100" >"$work/c1"
awk -v n="$NLEASE" 'BEGIN { s = sprintf("%091d", 0); for (i = 0; i < n; i++) printf "%08d%s\n", i, s }' >"$work/lease"

# drained QUEUE GROUP N: the group committed all N offsets and holds no
# lease or retry (mq groups: GROUP LAG LEASED RETRYING OLDEST OFFSETS).
drained() {
	local got
	got=$("$MQ" groups "$1" | awk -v g="$2" '$1 == g { print $2, $3, $4, $NF }')
	if [ "$got" != "0 0 0 0:$3" ]; then
		echo "bench: $1: group $2 should have acked all $3 messages; mq groups says: $got" >&2
		exit 1
	fi
}

# One of the CLI's lease consumers: get a lease on up to 100 messages,
# ack them by receipt, until get finds nothing (exit 1).
lease_worker() {
	set +e
	local st
	while :; do
		"$MQ" get "$1" -g w -n 100 --lease 60s -f '%r\n' | "$MQ" ack "$1" 2>"$2"
		st=("${PIPESTATUS[@]}")
		[ "${st[0]}" = 1 ] && return 0 # nothing left; ack got no receipts
		if [ "${st[0]}" != 0 ] || [ "${st[1]}" != 0 ]; then
			echo "bench: lease worker: get exited ${st[0]}, ack ${st[1]}: $(cat "$2")" >&2
			return 1
		fi
	done
}

# lease_cli QUEUE: LEASEP shell workers on a queue of NLEASE messages;
# prints elapsed microseconds.
lease_cli() {
	local s e p pids=() j=0
	s=${EPOCHREALTIME/[.,]/}
	while [ $j -lt "$LEASEP" ]; do
		j=$((j + 1))
		lease_worker "$1" "$work/ackerr$j" &
		pids+=($!)
	done
	for p in "${pids[@]}"; do wait "$p"; done
	e=${EPOCHREALTIME/[.,]/}
	echo $((e - s))
}

: >"$work/tc100"
: >"$work/tc1"
: >"$work/tlc"
: >"$work/tle"
i=0
while [ $i -lt "$RUNS" ]; do
	i=$((i + 1))
	"$MQ" create --partitions 1 "c100_$i"
	"$MQ" put "c100_$i" <"$work/c100"
	time_quiet "$MQ" consume "c100_$i" -g G -e --batch 100 -- true >>"$work/tc100"
	drained "c100_$i" G "$NCONS"
	"$MQ" create --partitions 1 "c1_$i"
	"$MQ" put "c1_$i" <"$work/c1"
	time_quiet "$MQ" consume "c1_$i" -g G -e --batch 1 -- true >>"$work/tc1"
	drained "c1_$i" G "$NCONS1"
	"$MQ" create --partitions 1 "lease_$i"
	"$MQ" put "lease_$i" <"$work/lease"
	lease_cli "lease_$i" >>"$work/tlc"
	drained "lease_$i" w "$NLEASE"
	"$MQ" rm "c100_$i" "c1_$i" "lease_$i"
	if [ -n "$LB" ]; then
		TMPDIR=$work "$LB" -q -p "$LEASEP" -n "$NLEASE" -b 100 >>"$work/tle"
	fi
done
tc100=$(median <"$work/tc100")
tc1=$(median <"$work/tc1")
tlc=$(median <"$work/tlc")
echo
printf '%-44s %12s %10s\n' "consumer groups, 100 B, 1 partition" "msgs/s" "MB/s"
line "consume --batch 100 -- true, $NCONS msgs" "$(rate "$NCONS" "$tc100")" "$(mbps $((NCONS * 100)) "$tc100")"
line "consume --batch 1 -- true, $NCONS1 msgs" "$(rate "$NCONS1" "$tc1")" "$(mbps $((NCONS1 * 100)) "$tc1")"
line "lease get -n 100 | ack, $LEASEP shell workers" "$(rate "$NLEASE" "$tlc")" "$(mbps $((NLEASE * 100)) "$tlc")"
if [ -n "$LB" ]; then
	tle=$(median <"$work/tle")
	line "lease+ack engine, $LEASEP procs (leasebench)" "$(rate "$NLEASE" "$tle")" "$(mbps $((NLEASE * 100)) "$tle")"
fi

# holds QUEUE N: mq stat counts N messages in QUEUE, and no transaction
# of it is open.
holds() {
	local got open
	got=$("$MQ" stat "$1" | awk '$1 == "messages" { print $2 }')
	open=$("$MQ" txn ls "$1")
	if [ "$got" != "$2" ] || [ -n "$open" ]; then
		echo "bench: $1 should hold $2 messages and no open transaction; mq stat says ${got:-?}${open:+; mq txn ls says: $open}" >&2
		exit 1
	fi
}

# Transactional puts: K transactions of N messages each (put --txn of N
# lines, then txn commit of the printed id) against K plain puts of the
# same N lines, for N = 1, 100 and 10000, the runs of each pair side by
# side.  Every mq is its own process: with N = 1 their starts (2 for a
# message in a transaction, put --txn and commit, against 1) dominate.
awk 'BEGIN { s = sprintf("%091d", 0); for (i = 0; i < 10000; i++) printf "%08d%s\n", i, s }' >"$work/t10000"
head -n 100 "$work/t10000" >"$work/t100"
head -n 1 "$work/t10000" >"$work/t1"

# txn_puts QUEUE K FILE: K transactions of FILE's lines, each committed
# before the next; prints elapsed microseconds.
txn_puts() {
	local s e id j=0
	s=${EPOCHREALTIME/[.,]/}
	while [ $j -lt "$2" ]; do
		j=$((j + 1))
		id=$("$MQ" put --txn "$1" <"$3")
		"$MQ" txn commit "$id"
	done
	e=${EPOCHREALTIME/[.,]/}
	echo $((e - s))
}

# plain_puts QUEUE K FILE: K puts of FILE's lines; prints elapsed
# microseconds.
plain_puts() {
	local s e j=0
	s=${EPOCHREALTIME/[.,]/}
	while [ $j -lt "$2" ]; do
		j=$((j + 1))
		"$MQ" put "$1" <"$3"
	done
	e=${EPOCHREALTIME/[.,]/}
	echo $((e - s))
}

for n in 1 100 10000; do
	: >"$work/ttxn$n"
	: >"$work/tplain$n"
done
i=0
while [ $i -lt "$RUNS" ]; do
	i=$((i + 1))
	for n in 1 100 10000; do
		case $n in 1) k=$KTXN1 ;; 100) k=$KTXN100 ;; *) k=$KTXN10K ;; esac
		"$MQ" create --partitions 1 "txn${n}_$i"
		"$MQ" create --partitions 1 "plain${n}_$i"
		txn_puts "txn${n}_$i" "$k" "$work/t$n" >>"$work/ttxn$n"
		holds "txn${n}_$i" $((k * n))
		plain_puts "plain${n}_$i" "$k" "$work/t$n" >>"$work/tplain$n"
		holds "plain${n}_$i" $((k * n))
		"$MQ" rm "txn${n}_$i" "plain${n}_$i"
	done
done
echo
printf '%-44s %12s %12s %10s\n' "transactional put, 100 B, 1 partition" "txn msgs/s" "plain msgs/s" "txn/plain"
# txn_line N K LABEL [NOTE]
txn_line() {
	local tt tp
	tt=$(median <"$work/ttxn$1")
	tp=$(median <"$work/tplain$1")
	printf '%-44s %12s %12s %10s%s\n' "$3" "$(rate $(($1 * $2)) "$tt")" "$(rate $(($1 * $2)) "$tp")" \
		"$(awk -v t="$tt" -v p="$tp" 'BEGIN { printf "%.2f", p / t }')" "${4:+  $4}"
}
txn_line 1 "$KTXN1" "put --txn + commit per 1 msg, x$KTXN1" \
	"(process starts dominate: 2 mq per msg, plain 1)"
txn_line 100 "$KTXN100" "put --txn + commit per 100 msgs, x$KTXN100"
txn_line 10000 "$KTXN10K" "put --txn + commit per 10000 msgs, x$KTXN10K"

# mq pipe against the plain at-least-once way of moving a queue: get -n
# 1000 | put, again until get finds nothing (exit 1).  Both drain a
# source of NPIPE 100 B messages into an empty queue, 1000 per round;
# pipe makes each round a transaction that also commits the group's
# offsets.  The issue's target: pipe --batch 1000 at >= 1/4 the msgs/s.
awk -v n="$NPIPE" 'BEGIN { s = sprintf("%091d", 0); for (i = 0; i < n; i++) printf "%08d%s\n", i, s }' >"$work/pipe"

# get_put SRC DST: move SRC to DST by get -g g -n 1000 | put until get
# finds nothing; prints elapsed microseconds.
get_put() {
	local s e st
	s=${EPOCHREALTIME/[.,]/}
	while :; do
		"$MQ" get "$1" -g g -n 1000 | "$MQ" put "$2"
		st=("${PIPESTATUS[@]}")
		[ "${st[0]}" = 1 ] && break # nothing left
		if [ "${st[0]}" != 0 ] || [ "${st[1]}" != 0 ]; then
			echo "bench: get | put: get exited ${st[0]}, put ${st[1]}" >&2
			exit 1
		fi
	done
	e=${EPOCHREALTIME/[.,]/}
	echo $((e - s))
}

: >"$work/tpipe"
: >"$work/tgetput"
i=0
while [ $i -lt "$RUNS" ]; do
	i=$((i + 1))
	for q in psrc pdst gsrc gdst; do "$MQ" create --partitions 1 "${q}_$i"; done
	"$MQ" put "psrc_$i" <"$work/pipe"
	"$MQ" put "gsrc_$i" <"$work/pipe"
	time_quiet "$MQ" pipe "psrc_$i" "pdst_$i" -g g --batch 1000 -- cat >>"$work/tpipe"
	drained "psrc_$i" g "$NPIPE"
	holds "pdst_$i" "$NPIPE"
	get_put "gsrc_$i" "gdst_$i" >>"$work/tgetput"
	drained "gsrc_$i" g "$NPIPE"
	holds "gdst_$i" "$NPIPE"
	"$MQ" rm "psrc_$i" "pdst_$i" "gsrc_$i" "gdst_$i"
done
tpipe=$(median <"$work/tpipe")
tgetput=$(median <"$work/tgetput")
echo
printf '%-44s %12s %10s\n' "queue to queue, 100 B, 1 partition" "msgs/s" "MB/s"
line "get -n 1000 | put until empty, $NPIPE msgs" "$(rate "$NPIPE" "$tgetput")" "$(mbps $((NPIPE * 100)) "$tgetput")"
line "pipe --batch 1000 -- cat, $NPIPE msgs" "$(rate "$NPIPE" "$tpipe")" "$(mbps $((NPIPE * 100)) "$tpipe")"
awk -v p="$tpipe" -v g="$tgetput" 'BEGIN { printf "pipe / (get | put): %.2f of the msgs/s (target: >= 0.25)\n", g / p }'

# Wake latency: a get -w waiting (started 50 ms before) against the put
# of one message; from put returning (durable) to get's line arriving,
# timed in python3.  Negative when the waiter printed before put had
# returned.  Also from put starting, which includes put's own cost.
echo
if command -v python3 >/dev/null; then
	cat >"$work/wake.py" <<'PY'
import subprocess, sys, threading, time
mq, q, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ret, start = [], []
for i in range(n):
    g = subprocess.Popen([mq, "get", q, "-g", "G", "-w", "5s", "-f", "%s\n"],
                         stdout=subprocess.PIPE)
    got = {}
    def reader():
        got["line"] = g.stdout.readline()
        got["t"] = time.monotonic_ns()
    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.05)  # get is waiting by now
    body = str(time.time_ns())
    t0 = time.monotonic_ns()
    subprocess.run([mq, "put", q, body], check=True)
    t1 = time.monotonic_ns()
    th.join()
    g.wait()
    if g.returncode != 0 or got["line"].decode().rstrip("\n") != body:
        sys.exit("bench: wake: get exited %d with %r; want %r" % (g.returncode, got["line"], body))
    ret.append((got["t"] - t1) / 1e6)
    start.append((got["t"] - t0) / 1e6)
def med(v): return sorted(v)[(len(v) - 1) // 2]
def p99(v): return sorted(v)[-(-len(v) * 99 // 100) - 1]
print("%.2f %.2f %.2f %.2f" % (med(ret), p99(ret), med(start), p99(start)))
PY
	"$MQ" create wake
	"$MQ" put wake warm
	"$MQ" get wake -g G >/dev/null
	read -r wmed wp99 wsmed wsp99 < <(python3 "$work/wake.py" "$MQ" wake "$NWAKE")
	printf '%-44s %12s %10s\n' "wake: put -> waiting get -w, $NWAKE runs" "median ms" "p99 ms"
	printf '%-44s %12s %10s\n' "put returned -> get's line arrived" "$wmed" "$wp99"
	printf '%-44s %12s %10s\n' "put started -> get's line arrived" "$wsmed" "$wsp99"
else
	echo "wake latency: skipped (no python3)"
fi
echo
awk -v a="$put100" -v b="$base100" 'BEGIN { printf "put 100 B (batch) takes %.2fx the time of cat | cat > file\n", a / b }'
awk -v a="$tc1" -v b="$tc100" -v n1="$NCONS1" -v n100="$NCONS" 'BEGIN {
	printf "consume --batch 100 handles %.0fx the msgs/s of --batch 1\n", (n100 / b) / (n1 / a) }'
if [ -n "$LB" ]; then
	awk -v c="$tlc" -v e="$tle" -v n="$NLEASE" 'BEGIN {
		printf "lease get+ack: the CLI at %.2fx the engine'"'"'s rate; of the 100000 msgs/s target: CLI %.0f%%, engine %.0f%%\n",
			e / c, n / (c / 1e6) / 1000, n / (e / 1e6) / 1000 }'
fi
