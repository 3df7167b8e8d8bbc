#!/bin/sh
# demo.sh - a short tour of mq: a producer, two consumer groups, keys and
# partitions, in a throw-away spool.  `make demo` runs it as
#
#	sh examples/demo.sh ./mq
#
# $1 is the mq binary (default: $MQ, else mq on the PATH).  Finishes in a
# second or so and removes everything it made.
set -eu

MQ=${1:-${MQ:-mq}}
case $MQ in
*/*) MQ=$(cd "$(dirname "$MQ")" && pwd)/$(basename "$MQ") ;;
esac
MQ_SPOOL=$(mktemp -d "${TMPDIR:-/tmp}/mq-demo.XXXXXX")
export MQ MQ_SPOOL
trap 'rm -rf "$MQ_SPOOL"' EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "a spool is just a directory: $MQ_SPOOL"
run "$MQ" create orders --partitions 2

say "producer: ten orders from a pipe; --print-offsets acknowledges each once it is on disk"
seq 1 10 | sed 's/^/order-/' | run "$MQ" put orders --print-offsets

say "the queue now"
run "$MQ" stat orders

say "consumer: group 'billing' takes one message at a time until there is none (exit 1)"
n=0
while msg=$("$MQ" get orders -g billing); do
	n=$((n + 1))
	printf 'billing got: %s\n' "$msg"
done
printf 'billing handled %d orders\n' "$n"

say "another group sees every message again, independently"
run "$MQ" get orders -g audit -n 0 -f '%p:%o %s\n'

say "keys pick the partition, so one customer's events stay in order"
run "$MQ" create events --partitions 2
printf 'alice:login\nbob:login\nalice:buy\nbob:logout\nalice:logout\n' | run "$MQ" put events -K :
run "$MQ" peek events -f '%p %k %s\n'

say "nothing new for billing: get exits 1"
if "$MQ" get orders -g billing; then
	echo "unexpected: got a message" >&2
	exit 1
else
	echo "exit status $?"
fi

say "every checksum, index and offset file checks out"
run "$MQ" verify

say "done; removing $MQ_SPOOL"
