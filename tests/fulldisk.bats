#!/usr/bin/env bats
# A real full disk (a 1 MiB tmpfs in a private mount namespace) and a
# spool the user may not write.  DESIGN.md §4, §11: a failed write fails
# the command with 74 and a one-line message; what was acknowledged stays
# readable; nothing partial shows; freeing space is the only repair.
bats_require_minimum_version 1.5.0
load helper
# A sanitizer report exits 1 by default, which reads as "nothing to get":
# give it a status of its own so that no test takes it for an answer.
export ASAN_OPTIONS="$ASAN_OPTIONS:exitcode=86" UBSAN_OPTIONS="$UBSAN_OPTIONS:exitcode=86"

# Keep the helper's teardown, and also remove the world-readable
# directory the permission test makes outside the bats tree.
eval "helper_$(declare -f teardown)"
teardown() {
	[ -z "${PERM_DIR:-}" ] || rm -rf "$PERM_DIR"
	helper_teardown
}

need_mount_ns() {
	[ "$(id -u)" = 0 ] || skip "needs root (mount -t tmpfs in a private mount namespace)"
	unshare -m true 2>/dev/null || skip "unshare -m is not allowed here (no CAP_SYS_ADMIN?)"
}

need_loop_ext4() {
	need_mount_ns
	command -v mkfs.ext4 >/dev/null || skip "no mkfs.ext4 (e2fsprogs)"
	truncate -s 2M "$BATS_TEST_TMPDIR/ext4.img"
	mkfs.ext4 -q -F "$BATS_TEST_TMPDIR/ext4.img" >/dev/null 2>&1 || skip "mkfs.ext4 failed"
	unshare -m bash -c "mkdir -p '$BATS_TEST_TMPDIR/probe' &&
		mount -o loop '$BATS_TEST_TMPDIR/ext4.img' '$BATS_TEST_TMPDIR/probe'" 2>/dev/null ||
		skip "cannot loop-mount an ext4 image here"
}

# Run function $1 (with helper functions) as root in a private mount
# namespace, where a 1 MiB tmpfs (or, with DISK=ext4, the 2 MiB ext4
# image need_loop_ext4 made, loop-mounted) is mounted on
# $BATS_TEST_TMPDIR/disk.  The function reports each failed check on
# stdout and returns non-zero.
in_small_disk() {
	local mnt="mount -t tmpfs -o size=1m tmpfs '$BATS_TEST_TMPDIR/disk'"
	[ "${DISK:-tmpfs}" = ext4 ] && mnt="mount -o loop '$BATS_TEST_TMPDIR/ext4.img' '$BATS_TEST_TMPDIR/disk'"
	mkdir -p "$BATS_TEST_TMPDIR/disk"
	unshare -m bash -c "
		set -u
		$(declare -f mq assert_eq complete_lines check fill_until_full "$1")
		$mnt || exit 99
		export MQ_SPOOL='$BATS_TEST_TMPDIR/disk/spool'
		mkdir \"\$MQ_SPOOL\"
		FAILED=0
		$1 '$BATS_TEST_TMPDIR/disk' '$BATS_TEST_TMPDIR'
		exit \$FAILED"
}

# check DESCRIPTION COMMAND...: run a check, record a failure, go on.
check() {
	local what=$1
	shift
	if ! "$@"; then
		echo "FAILED: $what"
		FAILED=1
	fi
}

# Put batches of 500 messages until a put fails; returns via files in $2.
fill_until_full() {
	local out=$2 i=0 rc=0
	: >"$out/acked"
	: >"$out/expect"
	while [ "$i" -lt 2000 ]; do
		i=$((i + 1))
		rc=0
		seq -f "m$i-%g" 1 500 | "$MQ" put q --print-offsets >"$out/offs" 2>"$out/err" || rc=$?
		[ "$rc" = 0 ] || break
		cat "$out/offs" >>"$out/acked"
		seq -f "m$i-%g" 1 500 >>"$out/expect"
	done
	echo "$i" >"$out/puts"
	echo "$rc" >"$out/rc"
	# The failed put may not have acknowledged anything either.
	complete_lines "$out/offs" >>"$out/acked"
}

full_disk_scenario() {
	local disk=$1 out=$2
	# A filler to delete later, so that space can come back.
	dd if=/dev/zero of="$disk/filler" bs=64k count=4 status=none
	mq create q
	fill_until_full "$disk" "$out"
	echo "put $(cat "$out/puts") failed with $(cat "$out/rc"): $(cat "$out/err")"
	check "the filling put exits 74" [ "$(cat "$out/rc")" = 74 ]
	check "one line saying No space left on device" \
		[ "$(wc -l <"$out/err")" = 1 -a -n "$(grep 'No space left on device' "$out/err")" ]
	check "something was stored before" [ "$(cat "$out/puts")" -gt 3 ]
	check "the failed put acknowledged nothing" [ "$(wc -l <"$out/acked")" = "$(wc -l <"$out/expect")" ]

	# Everything acknowledged is readable, nothing of the failed put is.
	mq peek q >"$out/peek" 2>"$out/peek.err"
	check "peek shows exactly the acknowledged messages" cmp -s "$out/peek" "$out/expect"
	check "verify is clean on the full disk" mq verify
	# Still full: the same put again fails the same way, and leaves no trace.
	local rc=0 i
	i=$(cat "$out/puts")
	seq -f "m$i-%g" 1 500 | "$MQ" put q 2>"$out/err2" || rc=$?
	check "the same put on the still-full disk exits 74 (got $rc)" [ "$rc" = 74 ]
	mq peek q >"$out/peek"
	check "... and shows nothing" cmp -s "$out/peek" "$out/expect"

	# Free space: the next put works without any repair.
	rm "$disk/filler"
	rc=0
	seq -f 'after-%g' 1 100 | "$MQ" put q --print-offsets >"$out/offs" 2>"$out/err3" || rc=$?
	check "a put after freeing space works (got $rc: $(cat "$out/err3"))" [ "$rc" = 0 ]
	check "it continues at the next offset" \
		[ "$(head -n 1 "$out/offs")" = "0:$(wc -l <"$out/expect")" ]
	seq -f 'after-%g' 1 100 >>"$out/expect"
	mq peek q >"$out/peek"
	check "peek shows the old and the new messages" cmp -s "$out/peek" "$out/expect"
	check "verify is clean afterwards" mq verify
}

@test "fulldisk: put on a full tmpfs exits 74 (No space left on device); acknowledged data stays; freeing space is enough" {
	need_mount_ns
	run in_small_disk full_disk_scenario
	printf '%s\n' "${lines[@]}"
	assert_eq "$status" 0
}

drain_frees_space_scenario() {
	local disk=$1 out=$2
	mq create q
	# The consumer group exists (and has committed once) before the disk fills.
	mq put q first
	check "the group commits once" mq get q -g g
	fill_until_full "$disk" "$out"
	check "the filling put exits 74" [ "$(cat "$out/rc")" = 74 ]
	# On the full disk the group still reads everything and commits ...
	mq get q -g g -n 0 >"$out/got" 2>"$out/get.err"
	check "a get on the full disk works: $(cat "$out/get.err")" cmp -s "$out/got" "$out/expect"
	# ... and the space it frees lets producers go on.
	local rc=0
	seq 1 100 | "$MQ" put q 2>"$out/err3" || rc=$?
	check "a put after the group drained the queue works (got $rc: $(cat "$out/err3"))" [ "$rc" = 0 ]
	check "verify is clean" mq verify
}

@test "fulldisk: on a full disk consumers still drain, and draining frees the space" {
	need_mount_ns
	run in_small_disk drain_frees_space_scenario
	printf '%s\n' "${lines[@]}"
	assert_eq "$status" 0
}

@test "fulldisk: the same on a full 2 MiB loop-mounted ext4: 74, acknowledged data stays, freeing space is enough" {
	need_loop_ext4
	DISK=ext4 run in_small_disk full_disk_scenario
	printf '%s\n' "${lines[@]}"
	assert_eq "$status" 0
}

# A group's offset commit on a full disk: its exit status tells the
# truth.  A get that exits 74 committed nothing (its messages come again);
# one that exits 0 committed.  Which one happens depends on the blocks the
# failed put and recovery left, so both are accepted, but never a mix; an
# existing group's offset stays where its last successful commit put it.
commit_on_full_disk_scenario() {
	local disk=$1 out=$2 rc=0 want exp
	dd if=/dev/zero of="$disk/filler" bs=64k count=4 status=none
	mq create q
	seq 1 10 | mq put q
	check "group old commits 3" mq get q -g old -n 3
	fill_until_full "$disk" "$out"
	check "the filling put exits 74" [ "$(cat "$out/rc")" = 74 ]
	dd if=/dev/zero of="$disk/rest" bs=4k status=none 2>/dev/null || true # the last blocks
	mq get q -g new -n 2 >"$out/new" 2>"$out/new.err" || rc=$?
	echo "new group's first get on the full disk: $rc $(cat "$out/new.err")"
	check "it exits 0 or 74 (got $rc)" [ "$rc" = 0 -o "$rc" = 74 ]
	check "... with at most one line on stderr" [ "$(wc -l <"$out/new.err")" -le 1 ]
	check "... having printed 1 and 2" [ "$(cat "$out/new")" = "$(printf '1\n2')" ]
	[ "$rc" = 0 ] && exp=$(printf '3\n4') || exp=$(printf '1\n2')
	rc=0
	mq get q -g old -n 2 >"$out/old" 2>"$out/old.err" || rc=$?
	echo "old group's get on the full disk: $rc $(cat "$out/old.err")"
	check "it prints 4 and 5" [ "$(cat "$out/old")" = "$(printf '4\n5')" ]
	[ "$rc" = 0 ] && want=6 || want=4
	rm -f "$disk/filler" "$disk/rest"
	mq get q -g new -n 2 >"$out/new" 2>"$out/new.err"
	check "with space back the new group goes on where its exit status said: $(cat "$out/new")" \
		[ "$(cat "$out/new")" = "$exp" ]
	mq get q -g old -n 1 >"$out/old"
	check "and the old group kept its offset" [ "$(cat "$out/old")" = "$want" ]
	check "verify is clean" mq verify
}

@test "fulldisk: a group's offset commit on a full disk keeps the old offset (tmpfs and ext4)" {
	need_mount_ns
	run in_small_disk commit_on_full_disk_scenario
	printf '%s\n' "${lines[@]}"
	assert_eq "$status" 0
	need_loop_ext4
	DISK=ext4 run in_small_disk commit_on_full_disk_scenario
	printf '%s\n' "${lines[@]}"
	assert_eq "$status" 0
}

# ----- a spool this user may not write -----

# mq as user nobody, from a copy of the binary nobody can run.
as_nobody() {
	setpriv --reuid=65534 --regid=65534 --clear-groups \
		env MQ_SPOOL="$PERM_DIR/spool" "$PERM_DIR/mq" "$@"
}

@test "fulldisk: a spool the user may not write: clear one-line errors (74, 66), reads still work" {
	[ "$(id -u)" = 0 ] || skip "needs root to switch to user nobody"
	command -v setpriv >/dev/null || skip "no setpriv(1)"
	PERM_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mq-perm.XXXXXX")
	chmod 755 "$PERM_DIR"
	cp "$MQ" "$PERM_DIR/mq"
	chmod 755 "$PERM_DIR/mq"
	MQ_SPOOL=$PERM_DIR/spool
	mkdir -m 755 "$MQ_SPOOL"
	mq create q
	seq 1 5 | mq put q
	as_nobody --version >/dev/null || skip "user nobody cannot run $PERM_DIR/mq"

	run -74 --separate-stderr as_nobody put q x
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: put: q: "*"Permission denied" ]]
	run -74 --separate-stderr as_nobody put newq x
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: put: newq: "*"Permission denied" ]]
	run -74 --separate-stderr as_nobody get q -g g
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: get: q: "*"Permission denied" ]]
	run -74 --separate-stderr as_nobody create other
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: create: other: "*"Permission denied" ]]
	run -66 --separate-stderr as_nobody peek missing
	assert_eq "$stderr" "mq: peek: missing: no such queue 'missing'"
	run -66 --separate-stderr as_nobody put --no-create missing x
	assert_eq "${#stderr_lines[@]}" 1
	# verify (of one queue, and of the whole spool) needs the writer lock.
	run -74 --separate-stderr as_nobody verify q
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: verify: q: "*"Permission denied" ]]
	run -74 --separate-stderr as_nobody verify
	echo "stderr: $stderr"
	assert_eq "${#stderr_lines[@]}" 1
	[[ "$stderr" == "mq: verify: q: "*"Permission denied" ]]
	# Reading needs no write access.
	run -0 --separate-stderr as_nobody peek q
	assert_eq "$output" "$(seq 1 5)"
	run -0 as_nobody ls
	assert_eq "$output" "q"
	# Nothing changed.
	run -0 mq peek q
	assert_eq "$output" "$(seq 1 5)"
	run -0 mq ls
	assert_eq "$output" "q"
	run -0 mq verify
}
