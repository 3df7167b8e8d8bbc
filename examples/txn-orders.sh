#!/bin/sh
# txn-orders.sh - transactional messages ("half messages"): save an order
# in a database and announce it on a queue, both or neither.
#
#	sh examples/txn-orders.sh [MQ] [WORKDIR]
#
# MQ is the mq binary (default: $MQ, else mq on the PATH); WORKDIR (default:
# a new temporary directory, removed at the end) gets the spool and the
# SQLite database orders.db.  Needs sqlite3.
#
# The problem: an order service writes the order to its database and puts
# "order 7 created" on a queue for the mailer, the warehouse, ...  Put
# first and the database may then refuse the order: the mailer announces an
# order that does not exist.  Write the database first and the process may
# die before the put: an order nobody hears of.
#
# The pattern (RocketMQ's transactional messages):
#   1. mq put --txn stores the event as a half message: durable, but no
#      reader sees it; it prints a transaction id.
#   2. The database transaction runs (here it also stores the txn id).
#   3. mq txn commit ID makes the event visible if the database committed;
#      mq txn rollback ID discards it if not.
#   4. If the producer dies between 2 and 3, the transaction stays open.
#      mq txn check (from cron, or mq serve with create --txn-check) asks a
#      check-back command, here txn-check.sh, for each transaction open too
#      long: it looks in the database whether the order is there, and mq
#      commits or rolls back by its answer.
set -eu

MQ=${1:-${MQ:-mq}}
HERE=$(cd "$(dirname "$0")" && pwd)
if [ -n "${2:-}" ]; then
	WORKDIR=$2
	mkdir -p "$WORKDIR"
else
	WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/mq-txn.XXXXXX")
	trap 'rm -rf "$WORKDIR"' EXIT
	trap 'exit 130' INT TERM
fi
if [ -e "$WORKDIR/spool" ] || [ -e "$WORKDIR/orders.db" ]; then
	echo "txn-orders.sh: $WORKDIR was used before; give a new WORKDIR" >&2
	exit 64
fi
MQ_SPOOL=$WORKDIR/spool
ORDERS_DB=$WORKDIR/orders.db
export MQ_SPOOL ORDERS_DB

say() { printf '\n== %s\n' "$*"; }

# SQL string literal: quotes doubled.
sql_str() { printf "'%s'" "$(printf %s "$1" | sed "s/'/''/g")"; }

sqlite3 "$ORDERS_DB" 'CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, txn TEXT)'

# Steps 1 and 2 of the pattern for order $1 of item $2: the half message,
# then the database transaction.  Sets $txn; fails if the database did not
# commit.
save_order() {
	txn=$("$MQ" put --txn order-events -H order="$1" "order $1 created: $2") || exit
	echo "half message stored, not visible yet: $txn"
	# A real service would write the order lines, the stock, ... in this
	# same transaction.
	if err=$(sqlite3 -bail "$ORDERS_DB" "BEGIN;
		INSERT INTO orders (id, item, txn) VALUES ($1, $(sql_str "$2"), $(sql_str "$txn"));
		COMMIT;" 2>&1); then
		echo "database: order $1 committed"
	else
		echo "database: order $1 failed: $err"
		return 1
	fi
}

# All three steps: the event goes out if and only if the order was saved.
place_order() {
	if save_order "$1" "$2"; then
		"$MQ" txn commit "$txn"
		echo "event committed"
	else
		"$MQ" txn rollback "$txn"
		echo "event rolled back"
	fi
}

say "order 1, a blue teapot: saved, so its event is committed"
place_order 1 "blue teapot"

say "order 1 again, a red kettle: the database refuses it, so its event is rolled back"
place_order 1 "red kettle"

say "order 2, a green mug: saved, then the producer crashes before mq txn commit"
save_order 2 "green mug"
# Simulated crash: this process "dies" here, so no commit.  The event stays
# a half message, invisible, until the check-back decides.

say "open transactions: the crashed one"
"$MQ" txn ls order-events

# In production this runs from cron or a timer, for transactions open a
# minute or more:
#	ORDERS_DB=... mq txn check order-events -- sh txn-check.sh
# --older 0 checks them now.
say "check-back: mq txn check asks txn-check.sh whether each order was saved"
"$MQ" txn check order-events --older 0 -- sh "$HERE/txn-check.sh"

say "what a consumer sees"
"$MQ" get order-events -g mailer -n 0

say "open transactions now: none"
"$MQ" txn ls order-events
