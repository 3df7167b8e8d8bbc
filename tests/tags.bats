#!/usr/bin/env bats
# --tag 'A||B' on get, peek and tail: only messages with one of the tags,
# other batches skipped through the index's tag hashes.
bats_require_minimum_version 1.5.0
load helper

fill() {
	mq put q -t A a1 a2
	mq put q -t B b1
	mq put q n1
	mq put q -t C c1
	mq put q -t A a3
}

@test "tags: peek and tail show only the tags asked for" {
	fill
	run -0 mq peek q --tag A
	assert_eq "$output" "$(printf 'a1\na2\na3')"
	run -0 mq peek q --tag 'B||C' -f '%t:%s\n'
	assert_eq "$output" "$(printf 'B:b1\nC:c1')"
	run -0 mq peek q --tag ' C || A ' -n 2
	assert_eq "$output" "$(printf 'a1\na2')"
	run -0 mq peek q --tag '*'
	assert_eq "${#lines[@]}" 6
	run -1 mq peek q --tag Z
	run -0 mq tail q --tag A -n 10
	assert_eq "$output" "$(printf 'a1\na2\na3')"
}

@test "tags: a group reading one tag moves past the others" {
	fill
	run -0 mq get q -g ga --tag A -n 0
	assert_eq "$output" "$(printf 'a1\na2\na3')"
	run -1 mq get q -g ga --tag A
	run -0 mq groups q
	[[ "${lines[1]}" =~ ^ga\ +0\ +0\ +0\ +-\ +0:6$ ]]
	# Other groups are unaffected; a later matching message is delivered.
	run -0 mq get q -g all -n 0
	assert_eq "${#lines[@]}" 6
	mq put q -t B b2
	mq put q -t A a4
	run -0 mq get q -g ga --tag A
	assert_eq "$output" "a4"
}

@test "tags: skipped batches are not read: a damaged body of another tag does not matter" {
	mq put q -t A a1
	mq put q -t B "$(head -c 300 /dev/zero | tr '\0' b)"
	mq put q -t A a2
	log=$(part_dir q)/00000000000000000000.log
	read -r pos len base count < <(seg_batches "$log" | sed -n 2p)
	flip_byte "$log" $((pos + len - 10))
	# Everything: the damaged B batch stops the reader (65).
	run -65 --separate-stderr mq peek q
	# Tag A: the B batch is skipped by its index entry, unread.
	run -0 mq peek q --tag A
	assert_eq "$output" "$(printf 'a1\na2')"
	run -0 mq get q --tag A -n 0
	assert_eq "$output" "$(printf 'a1\na2')"
}

@test "tags: a bad expression is a usage error" {
	mq put q -t A a
	run -64 --separate-stderr mq peek q --tag 'A||'
	run -64 --separate-stderr mq get q --tag '||'
	run -64 --separate-stderr mq tail q --tag ''
}
