# Shared set-up for the bats suite.  Each test gets a fresh spool under
# $BATS_TEST_TMPDIR; $MQ names the binary under test (the Makefile passes
# the normal build, then the ASan+UBSan build).
bats_require_minimum_version 1.5.0

: "${MQ:=$BATS_TEST_DIRNAME/../mq}"
: "${MQ_FAULT_BIN:=$BATS_TEST_DIRNAME/../mq-fault}"
export MQ MQ_FAULT_BIN
# A sanitizer report exits 86, so it can never pass as an expected status
# (1 "nothing to get" would otherwise hide a leak or a UBSan error).
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}:exitcode=86"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}:exitcode=86"

setup() {
	export MQ_SPOOL="$BATS_TEST_TMPDIR/spool"
	mkdir -p "$MQ_SPOOL"
	BG_PIDS=()
}

teardown() {
	local p
	for p in "${BG_PIDS[@]}"; do
		kill -9 "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
}

# mq with the test spool, so `run mq ...` reads naturally.
mq() { "$MQ" "$@"; }

# Start a command in the background and remember it for teardown.
bg() {
	"$@" &
	BG_PIDS+=("$!")
}

# Poll until a command succeeds, up to $2 seconds (default 20); no bare
# sleeps in tests.
wait_for() {
	local cmd=$1 limit=${2:-20} i=0
	while ! eval "$cmd" >/dev/null 2>&1; do
		i=$((i + 1))
		[ "$i" -ge $((limit * 20)) ] && { echo "timed out waiting for: $cmd" >&2; return 1; }
		sleep 0.05
	done
}

# Fail with a message unless two values are equal.
assert_eq() {
	if [ "$1" != "$2" ]; then
		echo "expected: $2" >&2
		echo "actual:   $1" >&2
		return 1
	fi
}

# Milliseconds since the epoch (GNU date).
now_ms() { date +%s%3N; }

# Evaluate a Python expression over the JSON document on stdin, bound to d,
# and print it (strings bare, everything else as JSON):
#   mq stat --json q | json_eval 'd["groups"][0]["lag"]'
json_eval() {
	local py=python3
	# the system interpreter starts faster than a pyenv shim
	[ -x /usr/bin/python3 ] && py=/usr/bin/python3
	"$py" -c 'import json, sys
d = json.load(sys.stdin)
r = eval(sys.argv[1])
print(r if isinstance(r, str) else json.dumps(r))' "$1"
}

# ----- added for the robustness tests (recovery, crash, fault, ...) -----

# Directory of partition $2 (default 0) of queue $1 in the test spool.
part_dir() { echo "$MQ_SPOOL/$1/${2:-0}"; }

# Segment log files of a partition directory, oldest first.
seg_logs() { ls "$1"/*.log | sort; }

# Only the newline-terminated lines of a file: the output of a process
# killed mid-write may end in a partial line, which was never promised.
complete_lines() { head -n "$(wc -l <"$1")" "$1"; }

# Little-endian unsigned integer of $3 bytes (4 or 8) at position $2.
le_at() { od -An -tu"$3" -j "$2" -N "$3" "$1" | tr -d ' '; }

# One line "POS LEN BASE COUNT" per batch of a segment log (mq.h layout).
seg_batches() {
	local f=$1 pos=0 size len
	size=$(stat -c %s "$f")
	while [ "$pos" -lt "$size" ]; do
		len=$(le_at "$f" $((pos + 8)) 4)
		echo "$pos $len $(le_at "$f" $((pos + 16)) 8) $(le_at "$f" $((pos + 24)) 4)"
		pos=$((pos + len))
	done
}

# Invert every bit of the byte at position $2 of file $1, in place.
flip_byte() {
	local b
	b=$(od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' ')
	printf "\\$(printf %03o $((b ^ 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# Total bytes of the files matching a glob (0 when none match).
bytes_of() { cat "$@" 2>/dev/null | wc -c; }

# Run `mq get ARGS...` until it hands out something (at most ~20 s) and
# print what it printed; any status but 0 and 1 is an error.
poll_get() {
	local out rc n=0
	while :; do
		rc=0
		out=$("$MQ" get "$@") || rc=$?
		[ "$rc" = 0 ] && { printf '%s\n' "$out"; return 0; }
		[ "$rc" = 1 ] || { echo "get exited $rc" >&2; return 1; }
		n=$((n + 1))
		[ "$n" -lt 400 ] || { echo "poll_get: nothing after 20s" >&2; return 1; }
		sleep 0.05
	done
}
