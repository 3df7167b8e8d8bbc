#!/usr/bin/env bash
# make bench, the server's part: msgs/s through `mq serve` for 100 B
# messages (1 and 8 producer connections, pipelined or each waiting for
# its ack, fsync batch and always), lease GET+ACK with 8 connections, and
# put-to-delivery latency; Redis measured in the same run beside it when
# redis-server and redis-benchmark are installed (Debian: redis-server,
# redis-tools).  Each figure is the median of $RUNS runs.  Not a test.
#
# Usage: bash tests/benchserve.sh ./mq ./tests/netbench
set -eu
MQ=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
NB=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
RUNS=${RUNS:-3}
NPIPE=${NPIPE:-1000000} # pipelined puts: 100 frames per PUT, 8 PUTs in flight
NSYNC=${NSYNC:-20000}   # puts that each wait for their ack
NLEASE=${NLEASE:-100000}
NLAT=${NLAT:-500}
work=$(mktemp -d "${TMPDIR:-/tmp}/mq-benchserve.XXXXXX")
spid= rpid=
cleanup() {
	[ -n "$spid" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
	[ -n "$rpid" ] && kill "$rpid" 2>/dev/null && wait "$rpid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT INT TERM
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# rate LINE: the msgs/s figure of a netbench line
rate() { awk '{print int($(NF-1))}'; }

"$MQ" -d "$work/spool" serve -l 127.0.0.1:0 2>"$work/log" &
spid=$!
for _ in $(seq 100); do grep -q 'event=listen' "$work/log" 2>/dev/null && break; sleep 0.05; done
port=$(sed -n 's/.*event=listen addr=127.0.0.1:\([0-9]*\).*/\1/p' "$work/log" | head -1)
[ -n "$port" ] || { echo "benchserve: the server did not start: $(cat "$work/log")" >&2; exit 1; }
mq() { "$MQ" -d "$work/spool" "$@"; }

have_redis=
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
	rport=$((20000 + RANDOM % 20000))
	mkdir "$work/redis"
	redis-server --port "$rport" --dir "$work/redis" --save '' --appendonly yes \
		--appendfsync always --daemonize no >"$work/redis.log" 2>&1 &
	rpid=$!
	for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
	redis-cli -p "$rport" ping >/dev/null 2>&1 && have_redis=1
fi
body=$(printf '%0100d' 0)
# redis_xadd CONNS PIPELINE N: XADD rate under appendfsync always
redis_xadd() {
	redis-benchmark -p "$rport" -c "$1" -P "$2" -n "$3" -q XADD s '*' f "$body" 2>/dev/null |
		tr '\r' '\n' | awk '/requests per second/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9.]+$/) {print int($i); exit}}'
}

for f in p1 p8 s8b s8a s1a lease lat r8 r8p64; do : >"$work/$f"; done
i=0
while [ $i -lt "$RUNS" ]; do
	i=$((i + 1))
	mq create "pipe$i"
	mq create "always$i" --fsync always
	mq create "lease$i"
	mq create "lat$i"
	"$NB" put 127.0.0.1 "$port" "pipe$i" -c 1 -n $((NPIPE / 4)) -b 100 -d 8 | rate >>"$work/p1"
	"$NB" put 127.0.0.1 "$port" "pipe$i" -c 8 -n "$NPIPE" -b 100 -d 8 | rate >>"$work/p8"
	"$NB" put 127.0.0.1 "$port" "pipe$i" -c 8 -n "$NSYNC" -b 1 -d 1 | rate >>"$work/s8b"
	"$NB" put 127.0.0.1 "$port" "always$i" -c 8 -n "$NSYNC" -b 1 -d 1 | rate >>"$work/s8a"
	"$NB" put 127.0.0.1 "$port" "always$i" -c 1 -n $((NSYNC / 8)) -b 1 -d 1 | rate >>"$work/s1a"
	"$NB" put 127.0.0.1 "$port" "lease$i" -c 1 -n "$NLEASE" -b 100 -d 8 >/dev/null
	"$NB" lease 127.0.0.1 "$port" "lease$i" -c 8 -b 100 | rate >>"$work/lease"
	"$NB" lat 127.0.0.1 "$port" "lat$i" -n "$NLAT" >>"$work/lat"
	if [ -n "$have_redis" ]; then
		redis_xadd 8 1 "$NSYNC" >>"$work/r8"
		redis_xadd 8 64 200000 >>"$work/r8p64"
	fi
	mq rm "pipe$i" "always$i" "lease$i" "lat$i"
done
line() { printf '%-58s %12s\n' "$1" "$2"; }
echo
line "mq serve, 100 B messages, 1 partition" "msgs/s"
line "put, 1 connection, 100 per PUT, 8 PUTs in flight" "$(median <"$work/p1")"
line "put, 8 connections, 100 per PUT, 8 PUTs in flight" "$(median <"$work/p8")"
line "put, 8 connections, each waits for its ack, fsync batch" "$(median <"$work/s8b")"
line "put, 8 connections, each waits for its ack, fsync always" "$(median <"$work/s8a")"
line "put, 1 connection, waits for each ack, fsync always" "$(median <"$work/s1a")"
"$NB" fsync "$work/spool" >"$work/fsync"
# what bounds producers that each wait for their ack: every round costs
# at least one fdatasync and one wake-up of a waiting process
"$NB" pingpong >"$work/pingpong"
awk '{ printf "%-58s %12s\n", "fdatasync of a 100 B append on this disk: median / p99", \
	$1 " / " $2 " us" }' "$work/fsync"
awk '{ printf "%-58s %12s\n", "round trip between two processes: median / p99", \
	$1 " / " $2 " us" }' "$work/pingpong"
awk -v f="$(cut -d' ' -f1 "$work/fsync")" -v p="$(cut -d' ' -f1 "$work/pingpong")" 'BEGIN {
	printf "%-58s %12d\n", "  so 8 connections waiting for each ack do at most", 8e6 / (f + p) }'
line "lease GET count=100 + ACK, 8 connections" "$(median <"$work/lease")"
if [ -n "$have_redis" ]; then
	line "redis XADD, appendfsync always, 8 connections" "$(median <"$work/r8")"
	line "redis XADD, appendfsync always, 8 conns, pipeline 64" "$(median <"$work/r8p64")"
else
	echo "redis: not installed (apt-get install redis-server redis-tools), not measured"
fi
lm=$(cut -d' ' -f1 "$work/lat" | median)
lp=$(cut -d' ' -f2 "$work/lat" | median)
line "put -> waiting GET: median / p99 (median of the runs)" \
	"$(awk -v m="$lm" -v p="$lp" 'BEGIN { printf "%.2f / %.2f ms", m / 1000, p / 1000 }')"
if [ -n "$have_redis" ]; then
	awk -v m="$(median <"$work/s8a")" -v r="$(median <"$work/r8")" 'BEGIN {
		printf "8 connections waiting for each ack, fsync always: mq at %.2fx Redis XADD\n", m / r }'
fi
kill "$spid"
wait "$spid" || { echo "benchserve: the server did not exit 0 on SIGTERM" >&2; exit 1; }
spid=
