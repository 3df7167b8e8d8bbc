#!/usr/bin/env bats
# mq groups, mq groups rm, mq seek, and get --commit-first (at-most-once).
bats_require_minimum_version 1.5.0
load helper

@test "groups: lists each group with lag, oldest unconsumed age and offsets" {
	mq create q --partitions 2
	mq put q -p 0 a b c
	mq put q -p 1 d e
	mq get q -g one -n 2 >/dev/null
	mq get q -g two -n 0 >/dev/null
	run -0 mq groups q
	assert_eq "${lines[0]}" "$(printf '%-20s %10s %8s %8s %10s  %s' GROUP LAG LEASED RETRYING OLDEST OFFSETS)"
	# get starts at a partition picked from its pid: either one went first.
	[[ "${lines[1]}" =~ ^one\ +3\ +0\ +0\ +[0-9][0-9a-z]*\ +(0:2\ 1:0|0:0\ 1:2)$ ]]
	[[ "${lines[2]}" =~ ^two\ +0\ +0\ +0\ +-\ +0:3\ 1:2$ ]]
	run -0 mq groups --json q
	[[ "$output" == '[{"group":"one","lag":3,"leased":0,"retrying":0,"oldest_unconsumed_age_ms":'*',"offsets":['*'},{"group":"two","lag":0,"leased":0,"retrying":0,"oldest_unconsumed_age_ms":null,"offsets":[3,2]}]' ]]
	[[ "$output" == *'"offsets":[2,0]}'* || "$output" == *'"offsets":[0,2]}'* ]]
}

@test "groups: a queue without groups prints nothing; errors are 66 and 64" {
	mq put q x
	run -0 --separate-stderr mq groups q
	assert_eq "$output" ""
	run -66 --separate-stderr mq groups nosuch
	run -64 --separate-stderr mq groups
	run -64 --separate-stderr mq groups a b
}

@test "groups rm: forgets a group, which then starts again from the earliest" {
	mq put q 1 2 3
	mq get q -g g -n 2 >/dev/null
	run -0 mq groups rm q g
	assert_eq "$output" ""
	[ ! -e "$MQ_SPOOL/q/groups/g" ]
	run -0 mq groups q
	assert_eq "$output" ""
	run -0 mq get q -g g
	assert_eq "$output" "1"
	run -66 --separate-stderr mq groups rm q nosuch
	assert_eq "$stderr" "mq: groups: q: no such group 'nosuch'"
	run -64 --separate-stderr mq groups rm q ../x
}

@test "groups rm: retention reclaims what only the removed group was holding" {
	mq create q --segment-bytes 4k
	seq 1 3000 | mq put q
	mq get q -g slow -n 1 >/dev/null
	mq get q -g fast -n 0 >/dev/null
	before=$(ls "$MQ_SPOOL/q/0" | grep -c '\.log$')
	[ "$before" -gt 3 ]
	mq groups rm q slow
	after=$(ls "$MQ_SPOOL/q/0" | grep -c '\.log$')
	[ "$after" -le 1 ]
	run -1 mq get q -g fast
}

@test "seek: earliest, latest, an offset, per partition, and clamping" {
	mq create q --partitions 2
	mq put q -p 0 a b c d
	mq put q -p 1 e f
	run -0 mq seek q -g g --to latest
	assert_eq "$output" "$(printf '0:4\n1:2')"
	run -1 mq get q -g g
	run -0 mq seek q -g g --to earliest
	assert_eq "$output" "$(printf '0:0\n1:0')"
	run -0 mq get q -g g -n 0 -f '%p%s '
	[ "$(echo "$output" | tr ' ' '\n' | sort | tr -d '\n')" = "0a0b0c0d1e1f" ]
	run -0 mq seek q -g g --to 2 -p 0
	assert_eq "$output" "0:2"
	run -0 mq get q -g g -n 0
	assert_eq "$output" "$(printf 'c\nd')"
	run -0 mq seek q -g g --to 99 -p 1
	assert_eq "$output" "1:2"
}

@test "seek: to a time finds the first message at or after it" {
	mq put q old1 old2
	t=$(( $(date +%s) + 1 ))
	wait_for "[ \$(date +%s) -ge $t ]" 5
	mq put q new1 new2
	run -0 mq seek q -g g --to "@$t"
	assert_eq "$output" "0:2"
	run -0 mq get q -g g
	assert_eq "$output" "new1"
	run -0 mq seek q -g g --to 1h
	assert_eq "$output" "0:0"
}

@test "seek: bad arguments are usage errors and move nothing" {
	mq put q a b
	mq get q -g g >/dev/null
	run -64 --separate-stderr mq seek q -g g --to yesterday
	run -64 --separate-stderr mq seek q --to 0
	run -64 --separate-stderr mq seek q -g g
	run -64 --separate-stderr mq seek q -g g --to 0 -p 5
	run -64 --separate-stderr mq seek q -g ../x --to 0
	run -66 --separate-stderr mq seek nosuch -g g --to 0
	run -0 mq get q -g g
	assert_eq "$output" "b"
}

@test "get --commit-first: committed before it is written (at-most-once)" {
	mq put q 1 2 3 4
	# stdout closed: the write fails, but the messages were committed.
	run -74 --separate-stderr bash -c "'$MQ' get q --commit-first -n 2 >&-"
	[[ "$stderr" == *"already committed"* ]]
	run -0 mq get q -n 0
	assert_eq "$output" "$(printf '3\n4')"
	# Without it, the same failure commits nothing.
	mq put q 5 6
	run -74 --separate-stderr bash -c "'$MQ' get q -n 2 >&-"
	if via_server; then
		assert_lease_held q default 2
	else
		run -0 mq get q -n 0
		assert_eq "$output" "$(printf '5\n6')"
	fi
}
