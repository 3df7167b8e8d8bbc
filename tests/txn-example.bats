#!/usr/bin/env bats
# Transactional ("half") messages as the order-and-event example uses them:
# examples/txn-orders.sh with a real SQLite database, its check-back
# examples/txn-check.sh, and the put --txn / mq txn behaviour they rely on.
bats_require_minimum_version 1.5.0
load helper

EX=$BATS_TEST_DIRNAME/../examples

# The example needs sqlite3: install it once when we may (root with
# apt-get); the tests that need it skip when it is still missing.
setup_file() {
	command -v sqlite3 >/dev/null 2>&1 && return 0
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		export DEBIAN_FRONTEND=noninteractive
		apt-get install -y -q sqlite3 >/dev/null 2>&1 ||
			{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q sqlite3 >/dev/null 2>&1; } ||
			echo "# apt-get install sqlite3 failed" >&3
	fi
	return 0
}

need_sqlite3() {
	command -v sqlite3 >/dev/null 2>&1 || skip "sqlite3 not installed: apt-get install sqlite3"
}

# The lines of section "== $1" of the example's output $2 (up to the blank
# line before the next one).
section() {
	awk -v h="== $1" '$0 == h { f = 1; next } /^$/ { f = 0 } f' <<<"$2"
}

new_orders_db() {
	export ORDERS_DB=$BATS_TEST_TMPDIR/orders.db
	sqlite3 "$ORDERS_DB" 'CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT, txn TEXT)'
}

@test "txn example: txn-orders.sh announces exactly the orders the database saved" {
	need_sqlite3
	work=$BATS_TEST_TMPDIR/work
	run -0 --separate-stderr sh "$EX/txn-orders.sh" "$MQ" "$work"
	echo "$output"
	assert_eq "$stderr" ""
	# One transaction id per order, all different.
	mapfile -t ids < <(sed -n "s/^half message stored, not visible yet: //p" <<<"$output")
	assert_eq "${#ids[@]}" 3
	for id in "${ids[@]}"; do
		[[ "$id" =~ ^order-events:[0-9a-f]{16}$ ]]
	done
	assert_eq "$(printf '%s\n' "${ids[@]}" | sort -u | wc -l)" 3
	assert_eq "$(section "order 1, a blue teapot: saved, so its event is committed" "$output")" \
		"half message stored, not visible yet: ${ids[0]}
database: order 1 committed
event committed"
	section "order 1 again, a red kettle: the database refuses it, so its event is rolled back" "$output" |
		grep -q '^database: order 1 failed: .*UNIQUE'
	assert_eq "$(section "order 1 again, a red kettle: the database refuses it, so its event is rolled back" "$output" | sed -n '1p;$p')" \
		"half message stored, not visible yet: ${ids[1]}
event rolled back"
	# The crashed one is open until the check-back commits it: its order
	# row is there.
	open=$(section "open transactions: the crashed one" "$output")
	assert_eq "$(wc -l <<<"$open")" 2
	[[ "$(sed -n 1p <<<"$open")" == ID* ]]
	[[ "$(sed -n 2p <<<"$open")" =~ ^${ids[2]}\ +[^\ ]+\ +0\ +1( +open)?$ ]]
	assert_eq "$(section "check-back: mq txn check asks txn-check.sh whether each order was saved" "$output")" \
		"${ids[2]} committed"
	# The consumer sees orders 1 and 2, never the refused kettle.
	assert_eq "$(section "what a consumer sees" "$output")" \
		"order 1 created: blue teapot
order 2 created: green mug"
	[[ "$output" == *$'\n'"== open transactions now: none" ]]

	# Afterwards: nothing open, the database and the queue agree, the
	# caller's spool was never touched.
	export MQ_SPOOL=$work/spool
	run -0 mq txn ls order-events
	assert_eq "$output" ""
	run -0 mq txn ls
	assert_eq "$output" ""
	run -0 sqlite3 "$work/orders.db" 'SELECT id, item, txn FROM orders ORDER BY id'
	assert_eq "$output" "1|blue teapot|${ids[0]}
2|green mug|${ids[2]}"
	run -0 mq peek order-events -f '%h %s\n'
	[[ "${lines[0]}" == *order=1*" order 1 created: blue teapot" ]]
	[[ "${lines[1]}" == *order=2*" order 2 created: green mug" ]]
	assert_eq "${#lines[@]}" 2
	run -1 mq get order-events -g mailer
	assert_eq "$output" ""
	# The decisions stand.
	run -0 mq txn commit "${ids[2]}"
	run -65 --separate-stderr mq txn commit "${ids[1]}"
	assert_eq "$output" ""
	assert_eq "$(wc -l <<<"$stderr")" 1
}

@test "txn example: txn-orders.sh without WORKDIR cleans up; a used WORKDIR is refused" {
	need_sqlite3
	export TMPDIR=$BATS_TEST_TMPDIR/tmp
	mkdir "$TMPDIR"
	run -0 sh "$EX/txn-orders.sh" "$MQ"
	assert_eq "$(section "what a consumer sees" "$output")" \
		"order 1 created: blue teapot
order 2 created: green mug"
	assert_eq "$(ls -A "$TMPDIR")" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""

	run -0 sh "$EX/txn-orders.sh" "$MQ" "$BATS_TEST_TMPDIR/work"
	run -64 --separate-stderr sh "$EX/txn-orders.sh" "$MQ" "$BATS_TEST_TMPDIR/work"
	assert_eq "$output" ""
	[[ "$stderr" == *"was used before"* ]]
}

@test "txn: a half message is invisible to get and peek until committed" {
	run -0 --separate-stderr mq put --txn q -H order=7 "order 7 created"
	assert_eq "$stderr" ""
	id=$output
	[[ "$id" =~ ^q:[0-9a-f]{16}$ ]]
	run -1 mq get q
	assert_eq "$output" ""
	run -1 mq peek q
	assert_eq "$output" ""
	run -0 mq txn commit "$id"
	run -0 mq peek q
	assert_eq "$output" "order 7 created"
	run -0 mq get q
	assert_eq "$output" "order 7 created"
	# Committing again is a no-op; rolling back now is refused.
	run -0 mq txn commit "$id"
	run -65 --separate-stderr mq txn rollback "$id"
	assert_eq "$output" ""
	assert_eq "$(wc -l <<<"$stderr")" 1
	run -1 mq get q
	assert_eq "$output" ""
}

@test "txn: several messages commit together; a rolled-back transaction never shows" {
	run -0 mq put --txn q one two
	a=$output
	run -0 mq put --txn q < <(printf 'three\nfour\n')
	b=$output
	[ "$a" != "$b" ]
	run -1 mq peek q
	assert_eq "$output" ""
	run -0 mq txn rollback "$b"
	run -0 mq txn rollback "$b"
	run -65 --separate-stderr mq txn commit "$b"
	assert_eq "$(wc -l <<<"$stderr")" 1
	run -1 mq peek q
	assert_eq "$output" ""
	run -0 mq txn commit "$a"
	run -0 mq get q -n 0
	assert_eq "$output" "one
two"
	run -66 mq txn commit q:0000000000000000
	run -66 mq txn rollback q:0000000000000000
	run -0 mq txn ls q
	assert_eq "$output" ""
}

@test "txn example: txn-check.sh commits an order that was saved, rolls back one that was not" {
	need_sqlite3
	new_orders_db
	run -0 mq put --txn Q -H order=7 "order 7 created"
	t7=$output
	run -0 mq put --txn Q -H order=8 "order 8 created"
	t8=$output
	# Order 9 exists, but was saved by another attempt: not this one's.
	run -0 mq put --txn Q -H order=9 "order 9 created"
	t9=$output
	sqlite3 "$ORDERS_DB" "INSERT INTO orders VALUES (7, 'mug', '$t7'), (9, 'cup', 'Q:0000000000000000')"
	run -0 mq txn check Q --older 0 -- sh "$EX/txn-check.sh"
	assert_eq "$(sort <<<"$output")" "$(printf '%s\n' "$t7 committed" "$t8 rolled back" "$t9 rolled back" | sort)"
	run -0 mq get Q -n 0
	assert_eq "$output" "order 7 created"
	run -0 mq txn ls Q
	assert_eq "$output" ""
	# Nothing was written to the database.
	run -0 sqlite3 "$ORDERS_DB" 'SELECT id, txn FROM orders ORDER BY id'
	assert_eq "$output" "7|$t7
9|Q:0000000000000000"
}

@test "txn example: txn-check.sh answers 'unknown' (2) when it cannot tell; the transaction stays open" {
	need_sqlite3
	new_orders_db
	run -0 mq put --txn Q -H order=7 "order 7 created"
	t=$output
	# Database missing: asked again later, and not created by the check.
	ORDERS_DB=$BATS_TEST_TMPDIR/missing.db run -0 --separate-stderr mq txn check Q --older 0 --max-checks 5 -- sh "$EX/txn-check.sh"
	assert_eq "$output" "$t open (check 1 of 5)"
	[ ! -e "$BATS_TEST_TMPDIR/missing.db" ]
	# The script itself, as mq runs it.
	ORDERS_DB=$BATS_TEST_TMPDIR/missing.db MQ_TXN_ID=$t MQ_HEADER_ORDER=7 run -2 sh "$EX/txn-check.sh" </dev/null
	MQ_TXN_ID=$t MQ_HEADER_ORDER='7 OR 1=1' run -2 sh "$EX/txn-check.sh" </dev/null
	MQ_TXN_ID=$t run -2 sh "$EX/txn-check.sh" </dev/null
	printf 'not a database\n' >"$BATS_TEST_TMPDIR/bad.db"
	ORDERS_DB=$BATS_TEST_TMPDIR/bad.db MQ_TXN_ID=$t MQ_HEADER_ORDER=7 run -2 sh "$EX/txn-check.sh" </dev/null
	ORDERS_DB='' MQ_TXN_ID=$t MQ_HEADER_ORDER=7 run -2 sh "$EX/txn-check.sh" </dev/null
	MQ_TXN_ID=$t MQ_HEADER_ORDER=7 run -1 sh "$EX/txn-check.sh" </dev/null
	sqlite3 "$ORDERS_DB" "INSERT INTO orders VALUES (7, 'mug', '$t')"
	MQ_TXN_ID=$t MQ_HEADER_ORDER=7 run -0 sh "$EX/txn-check.sh" </dev/null
	# Now the real check commits it.
	run -0 mq txn check Q --older 0 --max-checks 5 -- sh "$EX/txn-check.sh"
	assert_eq "$output" "$t committed"
	run -0 mq get Q
	assert_eq "$output" "order 7 created"
}

@test "txn check: a check command exiting 3 leaves the transaction open" {
	run -0 mq put --txn Q -H order=7 "order 7 created"
	t=$output
	run -0 mq txn check Q --older 0 --max-checks 5 -- sh -c 'exit 3'
	assert_eq "$output" "$t open (check 1 of 5)"
	run -0 mq txn ls Q
	assert_eq "${#lines[@]}" 2
	[[ "${lines[0]}" == ID* ]]
	[[ "${lines[1]}" =~ ^$t\ +[^\ ]+\ +1\ +1( +open)?$ ]]
	run -0 mq txn check Q --older 0 --max-checks 5 -- sh -c 'exit 3'
	assert_eq "$output" "$t open (check 2 of 5)"
	run -1 mq get Q
	assert_eq "$output" ""
	# Not old enough: not checked at all.
	run -0 mq txn check Q --older 1h -- sh -c 'exit 0'
	assert_eq "$output" ""
	run -0 mq txn ls Q
	[[ "${lines[1]}" =~ ^$t\ +[^\ ]+\ +2\ +1( +open)?$ ]]
}

@test "txn check: the check command gets the transaction in MQ_* variables and the bodies on stdin" {
	printf 'first\nsecond\n' | mq put --txn jobs -k cust-1 -t new -H order=42 -H x-trace.id=abc
	t=$(mq txn ls jobs | sed -n '2s/ .*//p')
	[[ "$t" =~ ^jobs:[0-9a-f]{16}$ ]]
	out=$BATS_TEST_TMPDIR/check
	run -0 mq txn check jobs --older 0 --max-checks 5 -- \
		sh -c 'env | grep "^MQ_" | grep -v "^MQ_SPOOL=" | sort >"$1.env"; cat >"$1.in"; exit 7' sh "$out"
	assert_eq "$output" "$t open (check 1 of 5)"
	assert_eq "$(cat "$out.in")" "first
second"
	grep -qx "MQ_TXN_ID=$t" "$out.env"
	grep -qx "MQ_QUEUE=jobs" "$out.env"
	grep -qx "MQ_TXN_CHECK=1" "$out.env"
	grep -qx "MQ_KEY=cust-1" "$out.env"
	grep -qx "MQ_TAG=new" "$out.env"
	grep -qx "MQ_HEADER_ORDER=42" "$out.env"
	grep -qx "MQ_HEADER_X_TRACE_ID=abc" "$out.env"
	run -0 mq txn check jobs --older 0 --max-checks 5 -- \
		sh -c 'echo "$MQ_TXN_CHECK" >"$1"; cat >/dev/null; exit 0' sh "$out.n"
	assert_eq "$output" "$t committed"
	assert_eq "$(cat "$out.n")" 2
	run -0 mq get jobs -n 0 -f '%k %t %s\n'
	assert_eq "$output" "cust-1 new first
cust-1 new second"
}
