#!/usr/bin/env bats
# The command line as a whole: version, help, dispatch, option parsing,
# spool selection and exit codes.
bats_require_minimum_version 1.5.0
load helper

# Command names of the cmds[] table in mq.c, in table order.
table_commands() {
	sed -n 's/^\t{"\([a-z][a-z]*\)", cmd_[a-z_]*,.*/\1/p' "$BATS_TEST_DIRNAME/../mq.c"
}

@test "cli: the command table is found in mq.c" {
	run -0 table_commands
	[ "${#lines[@]}" -ge 12 ]
	local c
	for c in put get peek tail ls stat create rm purge verify config help; do
		grep -qx "$c" <<<"$output" || {
			echo "missing from the table: $c"
			return 1
		}
	done
}

@test "cli: --version and -V print the version from mq.h" {
	local v
	v=$(sed -n 's/^#define MQ_VERSION "\(.*\)"$/\1/p' "$BATS_TEST_DIRNAME/../mq.h")
	[ -n "$v" ]
	run -0 --separate-stderr mq --version
	assert_eq "$output" "mq $v"
	assert_eq "$stderr" ""
	run -0 mq -V
	assert_eq "$output" "mq $v"
}

@test "cli: --help lists every command of the table and the exit codes" {
	run -0 --separate-stderr mq --help
	assert_eq "$stderr" ""
	[[ "${lines[0]}" == "usage: mq "* ]]
	local c
	for c in $(table_commands); do
		grep -Eq "^  $c +[A-Z]" <<<"$output" || {
			echo "--help does not list: $c"
			return 1
		}
	done
	run -0 mq -h
	[[ "${lines[0]}" == "usage: mq "* ]]
	run -0 mq help
	[[ "${lines[0]}" == "usage: mq "* ]]
}

@test "cli: the exit codes are documented in --help and in mq(1)" {
	run -0 mq --help
	local code
	for code in '0 ok' '1 nothing to get' '64 usage' '65 bad data' '66 no such queue' \
		'69 unavailable' '74 I/O error' '75 try again'; do
		grep -q "$code" <<<"$(tr '\n' ' ' <<<"$output")" || {
			echo "--help does not document: $code"
			return 1
		}
	done
	local man=$BATS_TEST_DIRNAME/../man/mq.1
	[ -f "$man" ] || skip "no man/mq.1"
	run -0 sed -n '/^\.Sh EXIT STATUS/,/^\.Sh /p' "$man"
	for code in 0 1 64 65 66 69 74 75; do
		grep -qx "\.It $code" <<<"$output" || {
			echo "mq(1) EXIT STATUS does not list: $code"
			return 1
		}
	done
}

@test "cli: 'mq CMD --help' for every command prints its usage and exits 0" {
	local c bad=""
	for c in $(table_commands); do
		run --separate-stderr mq "$c" --help
		if [ "$status" -ne 0 ] || [[ "${lines[0]}" != "usage: mq $c"* ]] || [ -n "$stderr" ]; then
			bad+="$c --help: exit $status: ${lines[0]} $stderr"$'\n'
		fi
		run --separate-stderr mq "$c" -h
		[ "$status" -eq 0 ] && [[ "${lines[0]}" == "usage: mq $c"* ]] || bad+="$c -h: exit $status"$'\n'
		run --separate-stderr mq help "$c"
		[ "$status" -eq 0 ] && [[ "${lines[0]}" == "usage: mq $c"* ]] || bad+="help $c: exit $status"$'\n'
	done
	assert_eq "$bad" ""
	# asking for help does nothing else
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "cli: help for a command shows its options" {
	run -0 mq put --help
	grep -q -- '--print-offsets' <<<"$output"
	grep -q -- '--no-create' <<<"$output"
	grep -q -- '-d, --spool DIR' <<<"$output"
	run -0 mq get --help
	grep -q -- '-w, --wait \[TIMEOUT\]' <<<"$output"
}

@test "cli: an unknown command is 64 with one line on stderr" {
	run -64 --separate-stderr mq frobnicate q
	assert_eq "$output" ""
	assert_eq "$stderr" "mq: unknown command 'frobnicate' (see 'mq --help')"
	run -64 --separate-stderr mq help frobnicate
	assert_eq "$output" ""
	assert_eq "$stderr" "mq: help: unknown command 'frobnicate'"
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "cli: an unknown option is 64 with a one-line error for every command" {
	local c bad=""
	for c in $(table_commands); do
		run --separate-stderr mq "$c" --no-such-option q
		if [ "$status" -ne 64 ] || [ -n "$output" ] ||
			[ "${stderr%%$'\n'*}" != "mq: $c: unknown option '--no-such-option'" ]; then
			bad+="$c --no-such-option: exit $status: $stderr"$'\n'
		fi
		# at most the error and the usage line
		[ "$(wc -l <<<"$stderr")" -le 2 ] || bad+="$c: stderr has $(wc -l <<<"$stderr") lines"$'\n'
		run --separate-stderr mq "$c" -Z q
		[ "$status" -eq 64 ] && [ "${stderr%%$'\n'*}" = "mq: $c: unknown option '-Z'" ] ||
			bad+="$c -Z: exit $status: $stderr"$'\n'
	done
	assert_eq "$bad" ""
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
}

@test "cli: an unknown option before the command is 64" {
	run -64 --separate-stderr mq --frob ls
	assert_eq "$output" ""
	# One line, no help dump.
	assert_eq "$stderr" "mq: unknown option '--frob' (see 'mq --help')"
}

@test "cli: no command is 64 with the usage on stderr" {
	run -64 --separate-stderr mq
	assert_eq "$output" ""
	[[ "$stderr" == "usage: mq "* ]]
	run -64 --separate-stderr mq -d "$MQ_SPOOL"
	assert_eq "$output" ""
}

@test "cli: an option missing its value is 64" {
	mq put q x
	run -64 --separate-stderr mq get q -n
	[[ "${stderr%%$'\n'*}" == "mq: get: option '-n' needs COUNT" ]]
	run -64 --separate-stderr mq get q --group
	[[ "${stderr%%$'\n'*}" == "mq: get: option '--group' needs GROUP" ]]
	run -64 --separate-stderr mq ls --json=yes
	[[ "${stderr%%$'\n'*}" == "mq: ls: option '--json' takes no value" ]]
	run -0 mq get q
	assert_eq "$output" x
}

@test "cli: option forms: --name=value, -nVALUE, bundled flags, options after arguments" {
	seq 5 | mq put q
	run -0 mq peek --count=2 q
	assert_eq "$output" "$(seq 2)"
	run -0 mq peek -n3 q
	assert_eq "$output" "$(seq 3)"
	run -0 mq peek q -n 1 --from=2
	assert_eq "$output" 3
	mq peek q -0n2 >"$BATS_TEST_TMPDIR/out"
	printf '1\0002\000' | cmp - "$BATS_TEST_TMPDIR/out"
}

@test "cli: -- ends the options" {
	run -0 mq put q -- -x --y
	run -0 mq peek q
	assert_eq "$output" "$(printf -- '-x\n--y')"
}

@test "cli: -d DIR before or after the command selects the spool" {
	local a=$BATS_TEST_TMPDIR/a b=$BATS_TEST_TMPDIR/b c=$BATS_TEST_TMPDIR/c d=$BATS_TEST_TMPDIR/d
	run -0 mq -d "$a" put q one
	run -0 mq put -d "$b" q two
	run -0 mq put q three -d "$c"
	run -0 mq --spool="$d" put q four
	[ -d "$a/q" ] && [ -d "$b/q" ] && [ -d "$c/q" ] && [ -d "$d/q" ]
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
	run -0 mq peek q -d "$a"
	assert_eq "$output" one
	run -0 mq -d "$b" peek q
	assert_eq "$output" two
	run -0 mq --spool "$c" peek q
	assert_eq "$output" three
	run -0 mq peek --spool="$d" q
	assert_eq "$output" four
	run -0 mq "-d$a" ls
	assert_eq "$output" q
	run -66 mq peek q
}

@test "cli: -d after the command wins over -d before it" {
	local a=$BATS_TEST_TMPDIR/a b=$BATS_TEST_TMPDIR/b
	mq -d "$a" put q in-a
	mq -d "$b" put q in-b
	run -0 mq -d "$a" peek -d "$b" q
	assert_eq "$output" in-b
}

@test "cli: \$MQ_SPOOL selects the spool when there is no -d" {
	local_only "\$MQ_SPOOL names the spool of local commands only"
	local other=$BATS_TEST_TMPDIR/other
	MQ_SPOOL=$other run -0 mq put q x
	[ -d "$other/q" ]
	assert_eq "$(ls -A "$MQ_SPOOL")" ""
	MQ_SPOOL=$other run -0 mq config
	assert_eq "${lines[0]}" "# spool: $other"
}

@test "cli: without -d or \$MQ_SPOOL the spool is /var/spool/mq for root, else XDG state" {
	local_only "\$MQ_SPOOL names the spool of local commands only"
	if [ "$(id -u)" -eq 0 ]; then
		# config only reads, so this touches nothing
		MQ_SPOOL= run -0 mq config
		assert_eq "${lines[0]}" "# spool: /var/spool/mq"
	else
		MQ_SPOOL= XDG_STATE_HOME="$BATS_TEST_TMPDIR/xdg" run -0 mq put q x
		[ -d "$BATS_TEST_TMPDIR/xdg/mq/q" ]
		MQ_SPOOL= XDG_STATE_HOME= HOME="$BATS_TEST_TMPDIR/home" run -0 mq config
		assert_eq "${lines[0]}" "# spool: $BATS_TEST_TMPDIR/home/.local/state/mq"
	fi
}

@test "cli: too many or too few arguments are 64 with the command's usage" {
	local bad="" args
	for args in 'put' 'get' 'get a b' 'peek' 'peek a b' 'tail' 'tail a b' 'ls a' \
		'create' 'create a b' 'rm' 'purge' 'config a b' 'help a b'; do
		# shellcheck disable=SC2086
		run --separate-stderr mq $args
		local cmd=${args%% *}
		if [ "$status" -ne 64 ] || [[ "$stderr" != "mq: $cmd: "*"arguments"*"usage: mq $cmd "* ]]; then
			bad+="mq $args: exit $status: $stderr"$'\n'
		fi
	done
	assert_eq "$bad" ""
}

@test "cli: diagnostics go to stderr, data to stdout" {
	mq put q a
	run -0 --separate-stderr mq get q
	assert_eq "$output" a
	assert_eq "$stderr" ""
	run -1 --separate-stderr mq get q
	assert_eq "$output" ""
	assert_eq "$stderr" ""
	run -66 --separate-stderr mq get nosuch
	assert_eq "$output" ""
	[[ "$stderr" =~ ^mq:\ get:\ nosuch:\ [a-z] ]]
}

@test "cli: the exit codes 0, 1, 64, 65 and 66 in practice" {
	mq create big --max-message-bytes 10
	run -0 mq put q x
	run -0 mq get q
	run -1 mq get q
	run -64 mq get q -g ../x
	run -65 mq put big 01234567890
	run -65 mq create q
	run -66 mq get nosuch
}

@test "cli: long work shows a progress line on a terminal only" {
	local_only "verify's progress line is drawn where it runs: on the server's terminal"
	mq create q --segment-bytes 4k
	seq 1 3000 | mq put q
	# Not a terminal: stderr stays empty.
	run -0 --separate-stderr mq verify q
	assert_eq "$stderr" ""
	command -v script >/dev/null || skip "script(1) not installed"
	# A terminal: verify redraws one line per segment group, then erases it.
	MQ_SPOOL=$MQ_SPOOL run -0 script -qec "'$MQ' verify q" /dev/null
	[[ "$output" == *"mq: verify: q/0: segment "*" of "* ]]
	[[ "$output" == *"ok: 1 queues, 1 partitions, no damage"* ]]
}
