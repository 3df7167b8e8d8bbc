#!/usr/bin/env bats
# Transactions through mq serve: put --txn, txn commit|rollback|ls|check
# with -s, a client dropped mid-transaction, and the server's own
# txn-check runs.
bats_require_minimum_version 1.5.0
load helper

teardown() { serve_teardown; }

@test "txn -s: put --txn is invisible until commit; commit and rollback are idempotent, the second end exits 65" {
	serve_start
	run -0 mq put --txn -H order=9 q a b c
	id=$output
	[[ "$id" =~ ^q:[0-9a-f]{16}$ ]]
	run -1 mq peek q
	run -1 mq get q
	run -0 mq txn ls
	[[ "${lines[1]}" == "$id "*" 0 "*" 3  open" ]]
	run -0 mq txn ls --json q
	python3 -c 'import json,sys; d=json.load(sys.stdin); assert len(d)==1 and d[0]["messages"]==3 and d[0]["id"]==sys.argv[1]' "$id" <<<"$output"
	run -0 mq txn commit "$id"
	run -0 mq txn commit "$id"
	run -65 --separate-stderr mq txn rollback "$id"
	[[ "$stderr" == *"already committed"* ]]
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' a b c)"
	# the same spool locally agrees
	run -0 mq -d "$MQ_SPOOL" txn commit "$id"
	run -0 mq put --txn q x
	id2=$output
	run -0 mq txn rollback "$id2"
	run -65 --separate-stderr mq txn commit "$id2"
	[[ "$stderr" == *"already rolled back"* ]]
	run -66 mq txn commit q:0123456789abcdef
	run -66 mq txn commit nope:0123456789abcdef
	run -64 mq txn commit q:xyz
	run -0 mq txn ls
	assert_eq "$output" ""
	run -64 mq -n 127.0.0.1:1 txn ls
	run -64 mq -n 127.0.0.1:1 put --txn q x
}

@test "txn -s: a long put --txn spans many requests and stays one transaction" {
	serve_start
	seq 1 200000 >"$BATS_TEST_TMPDIR/in"
	run -0 mq put --txn q <"$BATS_TEST_TMPDIR/in"
	id=$output
	run -1 mq peek q -n 1
	run -0 mq txn commit "$id"
	mq -d "$MQ_SPOOL" peek q >"$BATS_TEST_TMPDIR/out"
	cmp "$BATS_TEST_TMPDIR/in" "$BATS_TEST_TMPDIR/out"
}

@test "txn -s: a client gone before its transaction is prepared leaves nothing behind" {
	serve_start
	# BEGIN, a PUT, then the connection closes without PREPARE
	exec 5<>"/dev/tcp/127.0.0.1/$PORT"
	printf 'BEGIN q\nPUT q 2 txn=1\n1\na\n1\nb\n' >&5
	read -r -t 10 line <&5
	[[ "$line" == "OK txn="* ]]
	name=${line#OK txn=}
	read -r -t 10 line <&5
	assert_eq "$line" "OK 2"
	[ -e "$MQ_SPOOL/q/txn/$name" ]
	exec 5>&-
	wait_for "[ ! -e '$MQ_SPOOL/q/txn/$name' ]"
	run -0 mq txn ls
	assert_eq "$output" ""
	# PUT txn=1 without BEGIN, and PREPARE of nothing, are refused
	exec 5<>"/dev/tcp/127.0.0.1/$PORT"
	printf 'PUT q 1 txn=1\n1\na\nPREPARE q\n' >&5
	read -r -t 10 line <&5
	[[ "$line" == "ERR 64 "*"BEGIN QUEUE first"* ]]
	read -r -t 10 line <&5
	[[ "$line" == "ERR 64 "* ]]
	exec 5>&-
	run -1 mq -d "$MQ_SPOOL" peek q
}

@test "txn -s: check runs the command on the client with the transaction in MQ_* variables" {
	serve_start
	mq create --txn-max-checks 2 q
	run -0 mq put --txn -H order-id=7 -k k1 -t t1 q a b
	ida=$output
	run -0 mq put --txn q c
	idc=$output
	run -0 mq txn check q -- sh -c 'exit 0'
	assert_eq "$output" "" # younger than txn-check-after (1m)
	cat >"$BATS_TEST_TMPDIR/check" <<-'EOF'
		env | grep -E '^MQ_(TXN_ID|TXN_CHECK|KEY|TAG|HEADER_ORDER_ID|TXN_MESSAGES)=' | sort >>"$CHECK_LOG"
		cat >>"$CHECK_LOG"
		[ "$MQ_TXN_MESSAGES" = 2 ] && exit 0
		exit 3
	EOF
	export CHECK_LOG=$BATS_TEST_TMPDIR/log
	run -0 mq txn check q --older 0 -- sh "$BATS_TEST_TMPDIR/check"
	assert_eq "$output" "$(printf '%s\n' "$ida committed" "$idc open (check 1 of 2)")"
	grep -qx "MQ_TXN_ID=$ida" "$CHECK_LOG"
	grep -qx 'MQ_HEADER_ORDER_ID=7' "$CHECK_LOG"
	grep -qx 'MQ_KEY=k1' "$CHECK_LOG"
	grep -qx 'MQ_TAG=t1' "$CHECK_LOG"
	grep -qx 'MQ_TXN_CHECK=1' "$CHECK_LOG"
	run -0 --separate-stderr mq txn check q --older 0 -- sh "$BATS_TEST_TMPDIR/check"
	assert_eq "$output" "$idc rolled back (no answer after the last check)"
	[[ "$stderr" == *"txn-max-checks"* ]]
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' a b)"
}

@test "txn -s: mq serve runs the queue's txn-check command every txn-check-after" {
	mq create --txn-check 'read -r first; [ "$first" = yes ] || exit 3' --txn-check-after 1s \
		--txn-max-checks 2 q
	run -0 mq put --txn q yes y2
	yes=$output
	run -0 mq put --txn q no
	no=$output
	serve_start
	wait_for "grep -q '$yes committed' '$SERVE_LOG'" 30
	run -0 mq peek q
	assert_eq "$output" "$(printf '%s\n' yes y2)"
	grep -q 'event=txn-check queue=q' "$SERVE_LOG"
	# the other stays open, checked again each second, until the last check
	run -0 mq txn ls q
	[[ "${lines[1]}" == "$no "* ]]
	wait_for "grep -q '$no rolled back' '$SERVE_LOG'" 60
	run -0 mq txn ls q
	assert_eq "$output" ""
}
