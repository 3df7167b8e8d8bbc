# Shared set-up for the bats suite.  Each test gets a fresh spool under
# $BATS_TEST_TMPDIR; $MQ names the binary under test (the Makefile passes
# the normal build, then the ASan+UBSan build).
#
# With MQ_VIA_SERVER=1 (make bats-remote) setup() also starts `mq serve`
# on that spool and exports MQ_SERVER, so every `mq` and "$MQ" without -d
# runs through the server; teardown() stops it (it must exit 0 on SIGTERM)
# and fails the test on a sanitizer report in its log.  A test that checks
# what only a local command does calls local_only REASON first.  A bare
# `wait` would wait for that server too: use wait_jobs.
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
	if via_server; then
		serve_start
	fi
}

teardown() {
	local p rc=0
	for p in "${BG_PIDS[@]}"; do
		[ "$p" = "${SERVE_PID:-}" ] || kill -9 "$p" 2>/dev/null || true
	done
	if [ -n "${SERVE_PID:-}" ]; then
		# a server left running must stop cleanly on SIGTERM
		serve_stop || rc=1
		[ "${SERVE_RC:-0}" = 0 ] || { echo "teardown: mq serve exited $SERVE_RC" >&2; rc=1; }
	fi
	wait 2>/dev/null || true
	# a sanitizer report from any server of the test fails it
	if grep -l 'Sanitizer\|runtime error:' "$BATS_TEST_TMPDIR"/serve.*.log >/dev/null 2>&1; then
		cat "$BATS_TEST_TMPDIR"/serve.*.log >&2
		rc=1
	elif [ "$rc" != 0 ] || [ -z "${BATS_TEST_COMPLETED:-}" ]; then
		# a failed test shows the end of its servers' logs
		for p in "$BATS_TEST_TMPDIR"/serve.*.log; do
			[ -e "$p" ] || continue
			echo "--- last lines of $p" >&2
			tail -n 20 "$p" >&2
		done
	fi
	return "$rc"
}

# Does this run send every mq command through a server (MQ_VIA_SERVER=1)?
via_server() { [ "${MQ_VIA_SERVER:-}" = 1 ]; }

# Skip the test when it runs through a server: it checks what only a
# local command does (the spool's files while a server holds them, a
# command that exits 64 through a server, fault injection, ...).  $1 says
# why; it is required.
local_only() {
	[ -n "${1:-}" ] || { echo "local_only: give the reason" >&2; return 1; }
	! via_server || skip "local only: $1"
}

# Make $1 the test's spool: $MQ_SPOOL for local commands and, when the
# test runs through a server, a new `mq serve` on it (the old one must
# stop cleanly).
use_spool() {
	export MQ_SPOOL=$1
	[ -n "${SERVE_PID:-}" ] || return 0
	serve_stop || return 1
	[ "$SERVE_RC" = 0 ] || { echo "use_spool: mq serve exited $SERVE_RC" >&2; return 1; }
	SERVE_SPOOL=$1 serve_start
}

# Wait (at most 10 s) until the `mq get -w` or `mq tail -F` of process $1
# waits for new messages.  Locally it then watches the head files with
# inotify.  Through a server it waits there (GET -w, WATCH a second at a
# time) and sleeps in one read meanwhile: asleep for 300 ms without a
# context switch, longer than an idle server takes to answer anything else.
wait_waiting() {
	if via_server; then
		wait_for "asleep_for $1 0.3" 10
	else
		wait_for "ls -l /proc/$1/fd | grep -q inotify" 10
	fi
}

# Has process $1 slept through the last $2 seconds (no voluntary context
# switch meanwhile)?
asleep_for() {
	local a b
	a=$(awk '/^State:/ { s = $2 } /^voluntary_ctxt_switches:/ { print s, $2 }' "/proc/$1/status") || return 1
	sleep "$2"
	b=$(awk '/^State:/ { s = $2 } /^voluntary_ctxt_switches:/ { print s, $2 }' "/proc/$1/status") || return 1
	[ "$a" = "$b" ] && [ "${b%% *}" = S ]
}

# After a test writes SPOOL/mq.yaml: a server reads it at start and on
# SIGHUP (mq(1), serve), so send SIGHUP and wait for its reload line.
reload_config() {
	[ -n "${SERVE_PID:-}" ] || return 0
	local n
	n=$(grep -c ' event=reload ' "$SERVE_LOG" || true)
	kill -HUP "$SERVE_PID"
	wait_for "[ \$(grep -c ' event=reload ' '$SERVE_LOG') -gt $n ]" 10
}

# Through a server, get without --lease and consume take their messages
# under a lease (get: 60 s; consume: --timeout plus a minute, else an
# hour) and acknowledge them only once done (mq(1), "Through a server").
# After one that failed or was killed, check that group $2 of queue $1
# holds them, $3 of them, all leased (none lost, none committed): they
# come again when the lease runs out, where locally they come at once.
assert_lease_held() {
	run -0 mq groups --json "$1"
	assert_eq "$(json_eval "[[g['lag'], g['leased']] for g in d if g['group'] == '$2']" <<<"$output")" "[[$3, $3]]"
}

# Wait for every background job of the test except the server started by
# setup (a bare `wait` would wait for it too); their statuses are ignored,
# as a bare `wait` ignores them.
wait_jobs() {
	local p
	for p in $(jobs -p); do
		[ "$p" = "${SERVE_PID:-}" ] || wait "$p" 2>/dev/null || true
	done
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

# ----- added for the server tests (serve.bats) -----

# Is process $1 gone (exited, or a zombie nobody waited for yet)?
proc_gone() {
	local st
	st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 0
	[ -z "$st" ] || [ "$st" = Z ]
}

# bg_ready LOG ARGS...: run `mq ARGS...` (a serve or nameserver command
# line) in the background with its stderr in LOG and wait (at most 20 s)
# for it to log event=ready.  Sets BG_READY_PID (also in BG_PIDS); on an
# early exit or a timeout prints the log and fails.
bg_ready() {
	local log=$1 n=0
	shift
	"$MQ" "$@" </dev/null >/dev/null 2>"$log" 3>&- &
	BG_READY_PID=$!
	BG_PIDS+=("$BG_READY_PID")
	until grep -q ' event=ready ' "$log"; do
		if proc_gone "$BG_READY_PID"; then
			echo "bg_ready: mq $* exited early:" >&2
			cat "$log" >&2
			return 1
		fi
		n=$((n + 1))
		if [ "$n" -ge 400 ]; then
			echo "bg_ready: mq $* not ready after 20s:" >&2
			cat "$log" >&2
			return 1
		fi
		sleep 0.05
	done
}

# The loopback ports a server's log $1 says it listens on for clients, one
# per line (metrics-listen excluded).
log_ports() { sed -n 's/.* event=listen addr=127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$1"; }

# Start `mq serve` on spool $SERVE_SPOOL (default $MQ_SPOOL) on a free
# loopback port, with extra serve options "$@".  Waits for it to be ready,
# then exports PORT and MQ_SERVER (so plain `mq CMD` runs through it) and
# sets SERVE_PID and SERVE_LOG (its stderr; each start gets a new one).
# Teardown kills it.
serve_start() {
	local spool=${SERVE_SPOOL:-$MQ_SPOOL}
	SERVE_N=$((${SERVE_N:-0} + 1))
	SERVE_LOG=$BATS_TEST_TMPDIR/serve.$SERVE_N.log
	bg_ready "$SERVE_LOG" -d "$spool" serve -l 127.0.0.1:0 "$@" || return 1
	SERVE_PID=$BG_READY_PID
	PORT=$(log_ports "$SERVE_LOG" | head -n 1)
	[ -n "$PORT" ] || { echo "serve_start: no listen line" >&2; cat "$SERVE_LOG" >&2; return 1; }
	MQ_SERVER=127.0.0.1:$PORT
	export PORT MQ_SERVER SERVE_PID SERVE_LOG
}

# A teardown for tests that start servers: the one of serve_start must
# exit 0 on SIGTERM, the other background processes are killed, and no
# server log may hold a sanitizer report.
serve_teardown() {
	local p rc=0
	if [ -n "${SERVE_PID:-}" ]; then
		serve_stop || rc=1
		[ "${SERVE_RC:-0}" = 0 ] || { echo "teardown: mq serve exited $SERVE_RC" >&2; rc=1; }
	fi
	for p in "${BG_PIDS[@]}"; do
		kill -9 "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	FAILED=${rc#0} servers_checked || rc=1
	return "$rc"
}

# For a teardown: fail (return 1) on a sanitizer report in any server log
# of the test ($BATS_TEST_TMPDIR/serve.*.log) or in the extra files "$@",
# printing them; when $FAILED is set or the test did not complete, print
# the end of each server log.
servers_checked() {
	local f
	if grep -l 'Sanitizer\|runtime error:' "$BATS_TEST_TMPDIR"/serve.*.log "$@" >/dev/null 2>&1; then
		cat "$BATS_TEST_TMPDIR"/serve.*.log "$@" >&2 2>/dev/null
		return 1
	fi
	if [ -n "${FAILED:-}" ] || [ -z "${BATS_TEST_COMPLETED:-}" ]; then
		for f in "$BATS_TEST_TMPDIR"/serve.*.log; do
			[ -e "$f" ] || continue
			echo "--- last lines of $f" >&2
			tail -n 20 "$f" >&2
		done
	fi
}

# Stop the server started by serve_start with signal $1 (default TERM) and
# wait (at most 10 s, then kill -9 and fail) for it to exit; SERVE_RC gets
# its exit status.  MQ_SERVER is unset.
serve_stop() {
	local sig=${1:-TERM} pid=${SERVE_PID:-}
	SERVE_RC=
	[ -n "$pid" ] || return 0
	SERVE_PID=
	unset MQ_SERVER
	kill -s "$sig" "$pid" 2>/dev/null || true
	if ! wait_for "proc_gone $pid" 10; then
		kill -9 "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		echo "serve_stop: mq serve did not exit within 10s of SIG$sig" >&2
		return 1
	fi
	SERVE_RC=0
	wait "$pid" 2>/dev/null || SERVE_RC=$?
}

# Open a raw protocol connection to the server: the file descriptor goes
# into the variable named $1.  Talk with srv_send and srv_answer.
srv_open() {
	local srv_open_fd
	exec {srv_open_fd}<>"/dev/tcp/127.0.0.1/$PORT" || return 1
	printf -v "$1" %s "$srv_open_fd"
}

# srv_send FD FORMAT [ARG...]: printf to a raw connection, in a subshell:
# if the server has closed it, SIGPIPE ends the subshell (status 141), not
# the test.  (bash writes a printf line by line, so the server may close
# the connection halfway through.)
srv_send() {
	local srv_send_fd=$1
	shift
	(printf "$@" >&"$srv_send_fd") 2>/dev/null
}

# Close descriptor $1 (from srv_open).
srv_shut() {
	local srv_shut_fd=$1
	exec {srv_shut_fd}>&-
}

# Read one answer from descriptor $1: every line up to and including the
# final OK or ERR line, printed; fails on EOF or when a line takes more
# than ${2:-10} seconds.
srv_answer() {
	local l
	while :; do
		IFS= read -r -t "${2:-10}" l <&"$1" || { printf '%s\n' "${l:+$l}<EOF or timeout>"; return 1; }
		printf '%s\n' "$l"
		case $l in OK | "OK "* | "ERR "*) return 0 ;; esac
	done
}

# One request line ($1, newline added) on a new connection; prints the
# answer (as srv_answer) and closes.
srv_req() {
	local fd_ rc_=0
	srv_open fd_ || return 1
	printf '%s\n' "$1" >&"$fd_"
	srv_answer "$fd_" || rc_=$?
	srv_shut "$fd_"
	return "$rc_"
}

# Value of counter $1 of the server's STATS answer.
srv_stat() { srv_req STATS | sed -n "s/^STAT $1 //p"; }
