#!/bin/sh
# pipeline.sh - web server log lines through a queue, keyed by HTTP status,
# and a consumer that sums them up.
#
#	sh examples/pipeline.sh [ACCESS_LOG...]      (default: stdin)
#
# The producer end is an ordinary pipe: each line becomes a message whose
# key (the status code, before the tab) picks the partition, so all lines
# of one status stay in order.  The consumer end reads everything its
# group has not seen yet (-n 0) as "KEY BODY" lines and aggregates them:
# per status, the number of requests and the bytes sent.  Run it again
# with more log lines and only the new ones are counted.
#
# Environment: MQ (default mq), MQ_SPOOL (default: mq's), QUEUE (weblog),
# GROUP (stats).  Input is the common/combined log format:
#	127.0.0.1 - - [10/Oct/2026:13:55:36 +0000] "GET /a HTTP/1.1" 200 2326
set -eu

MQ=${MQ:-mq}
QUEUE=${QUEUE:-weblog}
GROUP=${GROUP:-stats}
tab=$(printf '\t')

"$MQ" create "$QUEUE" --partitions 4 --if-not-exists

# Producer: "STATUS<TAB>whole line" -> mq put -K TAB.
awk '{ print $9 "\t" $0 }' "$@" | "$MQ" put "$QUEUE" -K "$tab"

# Consumer: everything new for the group, aggregated per key.  (The
# messages go through a file so that get's exit status is not lost in a
# pipe: 1 means nothing new.)
got=$(mktemp "${TMPDIR:-/tmp}/pipeline.XXXXXX")
trap 'rm -f "$got"' EXIT
status=0
"$MQ" get "$QUEUE" -g "$GROUP" -n 0 -f '%k %s\n' >"$got" || status=$?
case $status in
0) ;;
1) echo "no new log lines"; exit 0 ;;
*) exit "$status" ;;
esac
awk '
	{ n[$1]++; if ($NF ~ /^[0-9]+$/) bytes[$1] += $NF }
	END { for (k in n) printf "%s %d requests %d bytes\n", k, n[k], bytes[k] }
' "$got" | sort
