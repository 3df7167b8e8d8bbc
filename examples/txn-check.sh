#!/bin/sh
# txn-check.sh - check-back command for txn-orders.sh: was the order of an
# open transaction saved?
#
#	ORDERS_DB=orders.db mq txn check order-events -- sh txn-check.sh
#
# mq runs it for each transaction left open (its producer died between the
# database commit and mq txn commit), with the transaction's message
# bodies on stdin and in the environment MQ_TXN_ID, MQ_QUEUE, MQ_TXN_CHECK
# (1 on the first check), MQ_KEY, MQ_TAG and the first message's headers:
# put -H order=7 gives MQ_HEADER_ORDER=7.
#
# The answer is the exit status:
#   0  the order row exists: commit the messages
#   1  it does not: the database transaction never committed, roll back
#   2  cannot tell (database unreadable, ...): mq asks again later
#
# The row must also carry this transaction's id: an order id that exists
# from another attempt (a rolled-back resubmission) does not commit this one.

case ${MQ_HEADER_ORDER:-} in
'' | *[!0-9]*)
	echo "txn-check: ${MQ_TXN_ID:-?}: no numeric order header" >&2
	exit 2
	;;
esac
if [ -z "${ORDERS_DB:-}" ] || [ ! -r "$ORDERS_DB" ]; then
	echo "txn-check: cannot read database '${ORDERS_DB:-}'" >&2
	exit 2
fi
txn=$(printf %s "${MQ_TXN_ID:-}" | sed "s/'/''/g")

# -readonly: never create or change the database.
n=$(sqlite3 -readonly "$ORDERS_DB" \
	"SELECT count(*) FROM orders WHERE id=$MQ_HEADER_ORDER AND txn='$txn'") || exit 2
case $n in
0) exit 1 ;;
[1-9]*) exit 0 ;;
*) exit 2 ;;
esac
