#!/usr/bin/env bats
# mq serve operations: tokens (AUTH, $MQ_TOKEN, exit 77), per-queue read
# and write patterns, SIGHUP reloads (tokens, patterns, queue settings, a
# broken file), --config FILE (spool:, listen:, -d and -l over them), bad
# configurations (64 naming file:line, 66 for a missing file), and the
# Prometheus metrics on --metrics-listen.  Every server listens on
# loopback ephemeral ports (-l 127.0.0.1:0, ports read from its log) and
# must exit 0 on SIGTERM with no sanitizer report in its log.
bats_require_minimum_version 1.5.0
load helper

# Secrets (at least 16 characters).  READ_ONLY reads orders.* and logs,
# WRITE_ONLY writes them, ADMIN may do anything.
ADMIN=admin-secret-0000000001
READ_ONLY=reader-secret-000000002
WRITE_ONLY=writer-secret-000000003

setup() {
	export MQ_SPOOL="$BATS_TEST_TMPDIR/spool"
	mkdir -p "$MQ_SPOOL"
	BG_PIDS=()
	# these tests start their own servers and choose their own tokens
	unset MQ_SERVER MQ_TOKEN MQ_NAMESRV
}

teardown() { serve_teardown; }

# auth_start ARGS...: run `mq ARGS...` (a serve command line, with its own
# -d, --config, -l ... as the test wants) in the background and wait (at
# most 20 s) for it to log event=ready.  Sets SERVE_PID and SERVE_LOG (as
# serve_start does, so serve_stop and teardown handle it), PORTS (every
# address it listens on for clients, in order), PORT (the first) and
# MPORT (metrics, if any), and exports MQ_SERVER.
auth_start() {
	SERVE_N=$((${SERVE_N:-0} + 1))
	SERVE_LOG=$BATS_TEST_TMPDIR/serve.$SERVE_N.log
	bg_ready "$SERVE_LOG" "$@" || return 1
	SERVE_PID=$BG_READY_PID
	mapfile -t PORTS < <(log_ports "$SERVE_LOG")
	PORT=${PORTS[0]:-}
	MPORT=$(sed -n 's/.* event=metrics-listen addr=127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$SERVE_LOG")
	[ -n "$PORT" ] || { echo "auth_start: no listen line" >&2; cat "$SERVE_LOG" >&2; return 1; }
	MQ_SERVER=127.0.0.1:$PORT
	export PORT MPORT MQ_SERVER SERVE_PID SERVE_LOG
}

# Stop the server with SIGTERM; it must exit 0.
auth_stop() {
	serve_stop
	assert_eq "$SERVE_RC" 0
}

# as SECRET ARGS...: `mq ARGS...` with $MQ_TOKEN=SECRET.
as() {
	MQ_TOKEN=$1 "$MQ" "${@:2}"
}

# Write SPOOL/mq.yaml (or the file $CONF, if set) from stdin.
conf() { cat >"${CONF:-$MQ_SPOOL/mq.yaml}"; }

# How many reloads (successful or not) the server has logged.
reloads() { grep -cE ' event=reload (tokens=|error=)' "$SERVE_LOG" || true; }

# Send SIGHUP and wait until the server has logged one more reload.
hup() {
	local before
	before=$(reloads)
	kill -HUP "$SERVE_PID"
	wait_for "[ \$(reloads) -gt $before ]" 20
}

# The standard tokens: ADMIN everything, READ_ONLY and WRITE_ONLY on
# orders.* and logs; $1 more YAML lines for the tokens: mapping.
conf_tokens() {
	conf <<EOF
server:
  tokens:
    admin:
      secret: $ADMIN
      read: "*"
      write: "*"
    reader:
      secret: $READ_ONLY
      read: "orders.*, logs"
    writer:
      secret: $WRITE_ONLY
      write: orders.* logs
${1:-}
EOF
}

# Read one line from descriptor $1 and require end of file, not a line
# and not a timeout (read -t's status is then over 128).
expect_eof() {
	local l= rc=0
	IFS= read -r -t 10 l <&"$1" || rc=$?
	if [ "$rc" != 1 ] || [ -n "$l" ]; then
		echo "expected EOF, got status $rc and line '$l'" >&2
		return 1
	fi
}

# http_get PATH: the whole HTTP/1.0 answer of the metrics listener, with
# carriage returns removed.
http_get() {
	local fd
	exec {fd}<>"/dev/tcp/127.0.0.1/$MPORT" || return 1
	printf 'GET %s HTTP/1.0\r\nHost: x\r\n\r\n' "$1" >&"$fd"
	timeout 10 cat <&"$fd" | tr -d '\r'
	exec {fd}>&-
}

# The value of the one sample line starting with $1 (name and labels) of
# the metrics text on stdin.
metric() { awk -v m="$1" 'index($0, m " ") == 1 { print $2; n++ } END { exit n != 1 }'; }

@test "auth: without a token put, get and ls are 77 and store nothing, while a client with a token is served" {
	conf_tokens
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0
	grep -q ' event=ready .* tokens=3$' "$SERVE_LOG"
	as "$ADMIN" create orders.eu

	# a client with a token waits for a message meanwhile
	bg as "$ADMIN" get -w 30 -g w orders.eu >"$BATS_TEST_TMPDIR/got" 2>&1
	local getter=$!
	# and one holds a raw authenticated connection
	local fd
	srv_open fd
	srv_send "$fd" 'AUTH %s\n' "$ADMIN"
	run -0 srv_answer "$fd"
	assert_eq "$output" "OK admin"

	run -77 mq put orders.eu no-token
	[[ "$output" == *"needs a token"*'$MQ_TOKEN'* ]]
	assert_eq "${#lines[@]}" 1
	run -77 mq put orders.new no-token
	run -77 mq get orders.eu
	run -77 mq get -g w orders.eu
	run -77 mq ls
	run -77 mq stat orders.eu
	run -77 mq create orders.other
	MQ_TOKEN= run -77 mq ls # an empty $MQ_TOKEN sends no AUTH
	run -0 "$MQ" --help
	[[ "$output" == *" 77 "* ]]

	# on the wire: HELLO and PING need no token, the rest is 77 and the
	# connection stays open; a refused put's frames are skipped
	local u
	srv_open u
	srv_send "$u" 'HELLO 1\nPING\nLS\nSTATS\nPEEK orders.eu\nPUT orders.eu 2\n3\nabc\n1\nx\nPING\n'
	run -0 srv_answer "$u"
	[[ "$output" == "OK mq "* ]]
	run -0 srv_answer "$u"
	assert_eq "$output" OK
	local i
	for i in 1 2 3 4; do
		run -0 srv_answer "$u"
		[[ "$output" == "ERR 77 "* ]]
	done
	run -0 srv_answer "$u"
	assert_eq "$output" OK
	# a token later on the same connection is accepted
	srv_send "$u" 'AUTH %s\nLS\nQUIT\n' "$READ_ONLY"
	run -0 srv_answer "$u"
	assert_eq "$output" "OK reader"
	run -0 srv_answer "$u"
	assert_eq "$output" "$(printf 'QUEUE orders.eu\nOK 1')"
	run -0 srv_answer "$u"
	expect_eof "$u"
	srv_shut "$u"

	# the authenticated connection was served throughout
	srv_send "$fd" 'STAT orders.eu\n'
	run -0 srv_answer "$fd"
	[[ "${lines[-1]}" == OK* ]]
	as "$ADMIN" put orders.eu with-token
	wait_for "proc_gone $getter" 30
	wait "$getter"
	assert_eq "$(cat "$BATS_TEST_TMPDIR/got")" with-token
	# nothing of the refused requests was stored or created
	run -0 as "$ADMIN" peek orders.eu
	assert_eq "$output" with-token
	run -0 as "$ADMIN" ls
	assert_eq "$output" orders.eu
	run -66 as "$ADMIN" stat orders.new
	srv_shut "$fd"
	auth_stop
}

@test "auth: a wrong token is 77 and the server closes the connection; nothing after it runs" {
	conf_tokens
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0

	local fd
	srv_open fd
	srv_send "$fd" 'AUTH wrong-secret-0000000000\nPING\nPUT q 1\n1\nx\nLS\n' || true # it may have closed
	run -0 srv_answer "$fd"
	assert_eq "$output" "ERR 77 bad token"
	expect_eof "$fd"
	srv_shut "$fd"
	grep -q 'level=warn event=auth-failed peer=127\.0\.0\.1:' "$SERVE_LOG"

	# after HELLO, and after a good AUTH, a wrong one still closes
	srv_open fd
	srv_send "$fd" 'HELLO 1\nAUTH %s\nAUTH %s\nPING\n' "$ADMIN" "${ADMIN}x" || true
	run -0 srv_answer "$fd"
	run -0 srv_answer "$fd"
	assert_eq "$output" "OK admin"
	run -0 srv_answer "$fd"
	assert_eq "$output" "ERR 77 bad token"
	expect_eof "$fd"
	srv_shut "$fd"

	# the CLI: near misses of a secret are all wrong
	local bad
	for bad in wrong-secret-0000000000 "${ADMIN%?}" "${ADMIN}0" "${ADMIN^^}" " $ADMIN" x; do
		run -77 as "$bad" put q x
		assert_eq "$output" "mq: put: q: bad token"
		run -77 as "$bad" ls
		assert_eq "$output" "mq: ls: bad token"
	done
	run -0 as "$ADMIN" ls
	assert_eq "$output" ""
	assert_eq "$(grep -c 'event=auth-failed' "$SERVE_LOG")" 14
	auth_stop
}

@test "auth: a secret with spaces, '=', '%' and '#' works through \$MQ_TOKEN" {
	conf <<'EOF'
server:
  tokens:
    odd:
      secret: "s3cret with space=%41=#x"
      read: "*"
      write: "*"
EOF
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0
	run -0 as 's3cret with space=%41=#x' put q a
	run -77 as 's3cret with space=A=#x' put q b
	run -77 as 's3cret with space=%41=' put q b
	run -0 as 's3cret with space=%41=#x' peek q
	assert_eq "$output" a
	auth_stop
}

@test "auth: per-queue read and write patterns for put, get, ack, peek, stat, rm, purge and ls" {
	conf_tokens "$(
		cat <<EOF
    jobs:
      secret: jobs-secret-000000004
      read: "job-?"
      write: "job-[ab]"
    nothing:
      secret: nothing-secret-0000005
EOF
	)"
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0
	local q
	for q in orders.eu orders.us orders logs secret job-a job-b job-c job-ab; do
		as "$ADMIN" create "$q"
	done

	# write-only: put, and nothing that reads
	run -0 as "$WRITE_ONLY" put orders.eu e1 e2 e3
	run -0 as "$WRITE_ONLY" put orders.us u1 u2
	run -0 as "$WRITE_ONLY" put logs l1
	run -0 as "$WRITE_ONLY" put orders.new n1 # creating needs write too
	run -77 as "$WRITE_ONLY" put orders o1     # orders.* needs the dot
	assert_eq "$output" "mq: put: orders: token 'writer' may not write queue 'orders'"
	run -77 as "$WRITE_ONLY" put secret s1
	run -77 as "$WRITE_ONLY" put xorders.eu x1
	run -77 as "$WRITE_ONLY" get orders.eu
	assert_eq "$output" "mq: get: orders.eu: token 'writer' may not read queue 'orders.eu'"
	run -77 as "$WRITE_ONLY" peek orders.eu
	run -77 as "$WRITE_ONLY" stat orders.eu
	run -77 as "$WRITE_ONLY" groups orders.eu
	run -77 as "$WRITE_ONLY" seek -g g --to latest orders.eu
	run -0 as "$WRITE_ONLY" create orders.fresh
	run -0 as "$WRITE_ONLY" purge orders.fresh
	run -0 as "$WRITE_ONLY" rm orders.fresh

	# read-only: get, ack, peek and stat; nothing that writes
	run -0 as "$READ_ONLY" get -g g orders.eu
	assert_eq "$output" e1
	run -0 as "$READ_ONLY" get -g g --lease 1m -f '%r\n' orders.us
	local receipt=$output
	run -0 as "$READ_ONLY" ack orders.us "$receipt"
	run -0 as "$READ_ONLY" peek logs
	assert_eq "$output" l1
	run -0 as "$READ_ONLY" stat orders.eu
	run -0 as "$READ_ONLY" groups orders.eu
	run -77 as "$READ_ONLY" put orders.eu r1
	assert_eq "$output" "mq: put: orders.eu: token 'reader' may not write queue 'orders.eu'"
	run -77 as "$READ_ONLY" rm orders.eu
	run -77 as "$READ_ONLY" purge orders.eu
	run -77 as "$READ_ONLY" create orders.x
	run -77 as "$READ_ONLY" get secret
	run -77 as "$READ_ONLY" peek orders

	# globs: job-? reads one character, job-[ab] writes a and b only
	run -0 as jobs-secret-000000004 put job-a a1
	run -0 as jobs-secret-000000004 put job-b b1
	run -77 as jobs-secret-000000004 put job-c c1
	run -77 as jobs-secret-000000004 put job-ab x
	run -0 as jobs-secret-000000004 peek job-a
	run -1 as jobs-secret-000000004 peek job-c
	run -77 as jobs-secret-000000004 peek job-ab
	run -77 as jobs-secret-000000004 peek orders.eu

	# ls: only the queues the token may read or write
	run -0 as "$ADMIN" ls
	assert_eq "$(echo $output)" "job-a job-ab job-b job-c logs orders orders.eu orders.new orders.us secret"
	run -0 as "$READ_ONLY" ls
	assert_eq "$(echo $output)" "logs orders.eu orders.new orders.us"
	run -0 as "$WRITE_ONLY" ls
	assert_eq "$(echo $output)" "logs orders.eu orders.new orders.us"
	run -0 as jobs-secret-000000004 ls
	assert_eq "$(echo $output)" "job-a job-b job-c"
	run -0 as nothing-secret-0000005 ls
	assert_eq "$output" ""
	run -77 as nothing-secret-0000005 peek logs
	run -77 as nothing-secret-0000005 put logs x

	# stat of every queue: those the token may read, and no error
	run -0 as "$READ_ONLY" stat --json
	assert_eq "$(json_eval '[q["queue"] for q in d]' <<<"$output")" '["logs", "orders.eu", "orders.new", "orders.us"]'
	run -0 as "$WRITE_ONLY" stat --json
	assert_eq "$output" "[]"

	# rm and purge of several queues: all allowed, or none is touched
	run -77 as "$WRITE_ONLY" rm orders.eu secret
	assert_eq "$output" "mq: rm: token 'writer' may not write queue 'secret'"
	run -77 as "$WRITE_ONLY" rm secret orders.eu
	run -77 as "$WRITE_ONLY" purge orders.eu orders
	run -77 as jobs-secret-000000004 rm job-a job-c
	run -0 as "$ADMIN" peek orders.eu
	assert_eq "$(echo $output)" "e1 e2 e3"
	run -0 as "$ADMIN" ls
	assert_eq "$(echo $output)" "job-a job-ab job-b job-c logs orders orders.eu orders.new orders.us secret"
	run -0 as "$WRITE_ONLY" purge orders.eu orders.us
	run -1 as "$ADMIN" peek orders.eu
	run -0 as "$WRITE_ONLY" rm orders.eu logs
	run -0 as "$ADMIN" ls
	assert_eq "$(echo $output)" "job-a job-ab job-b job-c orders orders.new orders.us secret"
	auth_stop
}

@test "auth: SIGHUP adds and removes tokens, changes patterns for connected clients, and keeps the old settings on a broken file" {
	conf <<EOF
server:
  tokens:
    admin:
      secret: $ADMIN
      read: "*"
      write: "*"
EOF
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0
	as "$ADMIN" put q m1
	run -77 as "$READ_ONLY" peek q

	# a token added to the file works after SIGHUP
	conf <<EOF
server:
  tokens:
    admin:
      secret: $ADMIN
      read: "*"
      write: "*"
    reader:
      secret: $READ_ONLY
      read: "*"
EOF
	hup
	grep -q 'level=info event=reload tokens=2 ' "$SERVE_LOG"
	run -0 as "$READ_ONLY" peek q
	assert_eq "$output" m1

	# clients that authenticated before the next reload
	local a r
	srv_open a
	srv_send "$a" 'AUTH %s\n' "$ADMIN"
	run -0 srv_answer "$a"
	assert_eq "$output" "OK admin"
	srv_open r
	srv_send "$r" 'AUTH %s\nPEEK q\n' "$READ_ONLY"
	run -0 srv_answer "$r"
	assert_eq "$output" "OK reader"
	run -0 srv_answer "$r"
	[[ "${lines[-1]}" == "OK 1 "* ]]

	# admin removed, reader's patterns narrowed: both apply at once
	conf <<EOF
server:
  tokens:
    reader:
      secret: $READ_ONLY
      read: "other"
EOF
	hup
	grep -q 'level=info event=reload tokens=1 ' "$SERVE_LOG"
	srv_send "$a" 'PEEK q\nPING\n'
	run -0 srv_answer "$a"
	[[ "$output" == "ERR 77 "*"needs a token"* ]]
	run -0 srv_answer "$a" # the connection stays, without a token
	assert_eq "$output" OK
	srv_send "$a" 'AUTH %s\n' "$ADMIN"
	run -0 srv_answer "$a"
	assert_eq "$output" "ERR 77 bad token"
	expect_eof "$a"
	srv_shut "$a"
	srv_send "$r" 'PEEK q\nLS\n'
	run -0 srv_answer "$r"
	assert_eq "$output" "ERR 77 token 'reader' may not read queue 'q'"
	run -0 srv_answer "$r"
	assert_eq "$output" "OK 0"
	run -77 as "$ADMIN" ls
	run -77 as "$READ_ONLY" peek q

	# a token whose secret changes loses its clients
	conf <<EOF
server:
  tokens:
    reader:
      secret: ${READ_ONLY}-new
      read: "*"
EOF
	hup
	srv_send "$r" 'PEEK q\n'
	run -0 srv_answer "$r"
	[[ "$output" == "ERR 77 "*"needs a token"* ]]
	srv_shut "$r"
	run -0 as "${READ_ONLY}-new" peek q
	run -77 as "$READ_ONLY" peek q

	# a broken file is logged and changes nothing
	srv_open r
	srv_send "$r" 'AUTH %s-new\n' "$READ_ONLY"
	run -0 srv_answer "$r"
	local good
	good=$(cat "$MQ_SPOOL/mq.yaml")
	printf '%s\n    admin:\n      secret: %s\n      read: "*"\n      bogus: 1\n' "$good" "$ADMIN" | conf
	hup
	grep -q "level=error event=reload error=\"$MQ_SPOOL/mq.yaml:9: unknown key 'bogus' in token 'admin'" "$SERVE_LOG"
	grep -q 'msg="kept the old settings"' "$SERVE_LOG"
	run -0 as "${READ_ONLY}-new" peek q
	assert_eq "$output" m1
	run -77 as "$ADMIN" peek q
	srv_send "$r" 'PEEK q\n'
	run -0 srv_answer "$r"
	[[ "${lines[-1]}" == "OK 1 "* ]]

	printf 'server:\n  tokens:\n    short:\n      secret: fifteen-chars-x\n' | conf
	hup
	[ "$(grep -c 'level=error event=reload' "$SERVE_LOG")" = 2 ]
	grep -q "mq.yaml:3: token 'short' needs a secret of at least 16 characters" "$SERVE_LOG"
	printf 'server: [\n' | conf
	hup
	[ "$(grep -c 'level=error event=reload' "$SERVE_LOG")" = 3 ]
	printf 'defaults:\n  retries: lots\n' | conf
	hup
	[ "$(grep -c 'level=error event=reload' "$SERVE_LOG")" = 4 ]
	run -0 as "${READ_ONLY}-new" peek q
	run -77 as "$ADMIN" peek q
	run -77 mq peek q
	srv_send "$r" 'PEEK q\n'
	run -0 srv_answer "$r"
	[[ "${lines[-1]}" == "OK 1 "* ]]
	srv_shut "$r"

	# the file fixed: no tokens at all, so none is needed
	: | conf
	hup
	grep -q 'level=info event=reload tokens=0 ' "$SERVE_LOG"
	run -0 mq peek q
	assert_eq "$output" m1
	auth_stop
}

# bytes_mark notes how many bytes the server has read (mq_bytes_in_total);
# bytes_wait N waits (at most 20 s) until it has read N more, not counting
# the metrics requests that ask (http_get sends 34 bytes).
bytes_mark() {
	BYTES_MARK=$(http_get /metrics | metric mq_bytes_in_total)
}
bytes_wait() {
	local n=0 b
	while :; do
		b=$(http_get /metrics | metric mq_bytes_in_total)
		n=$((n + 1))
		[ $((b - BYTES_MARK - 34 * n)) -lt "$1" ] || return 0
		[ "$n" -lt 400 ] || { echo "bytes_wait: the server did not read $1 bytes" >&2; return 1; }
		sleep 0.05
	done
}

@test "auth: a GET waiting when SIGHUP removes its token or its read pattern is not handed the next message" {
	conf_tokens "$(
		cat <<EOF
    reader2:
      secret: reader2-secret-00000006
      read: "*"
EOF
	)"
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0 --metrics-listen 127.0.0.1:0
	as "$ADMIN" create orders.eu
	local g h
	bytes_mark
	srv_open g
	srv_send "$g" 'AUTH %s\nGET orders.eu wait=30000\n' "$READ_ONLY"
	srv_open h
	srv_send "$h" 'AUTH reader2-secret-00000006\nGET orders.eu group=h wait=30000\n'
	run -0 srv_answer "$g"
	assert_eq "$output" "OK reader"
	run -0 srv_answer "$h"
	assert_eq "$output" "OK reader2"
	# both GET lines are in: the getters wait
	bytes_wait $((2 * ${#READ_ONLY} + 2 * 6 + 2 * 25 + 8))
	# reader2 is gone, reader may now read only logs
	conf <<EOF
server:
  tokens:
    admin:
      secret: $ADMIN
      read: "*"
      write: "*"
    reader:
      secret: $READ_ONLY
      read: logs
EOF
	hup
	as "$ADMIN" put orders.eu secret-data
	run srv_answer "$g"
	if [[ "$output" == *secret-data* ]]; then
		echo "a narrowed token's waiting GET was handed: $output" >&2
		return 1
	fi
	[[ "$output" == "ERR 77 "* ]]
	run srv_answer "$h"
	if [[ "$output" == *secret-data* ]]; then
		echo "a removed token's waiting GET was handed: $output" >&2
		return 1
	fi
	[[ "$output" == "ERR 77 "* ]]
	srv_shut "$g"
	srv_shut "$h"
	# the message is there for the default group, not leased to anyone
	run -0 as "$ADMIN" get orders.eu
	assert_eq "$output" secret-data
	auth_stop
}

@test "auth: SIGHUP applies changed queue settings, and a broken file keeps the old ones" {
	printf 'defaults:\n  max-message-bytes: 10\n' | conf
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0
	run -65 mq put q 0123456789abcdef
	run -0 mq put q short
	printf 'defaults:\n  max-message-bytes: 100\n' | conf
	hup
	run -0 mq put q 0123456789abcdef
	printf 'defaults:\n  max-message-bytes: 10\n  nonsense: 1\n' | conf
	hup
	grep -q 'level=error event=reload' "$SERVE_LOG"
	run -0 mq put q 0123456789abcdef
	run -0 mq peek q
	assert_eq "$(echo $output)" "short 0123456789abcdef 0123456789abcdef"
	auth_stop
}

@test "auth: --config FILE names the spool and listen addresses and replaces SPOOL/mq.yaml; -d and -l win over it" {
	local cs=$BATS_TEST_TMPDIR/cfgspool other=$BATS_TEST_TMPDIR/other
	mkdir -p "$cs" "$other"
	# SPOOL/mq.yaml of that spool is not read at all with --config
	printf 'defaults:\n  max-message-bytes: 1M\nserver:\n  tokens:\n    ignored:\n      secret: ignored-secret-00000\n      read: "*"\n' >"$cs/mq.yaml"
	# a secret of exactly 16 characters is enough
	CONF=$BATS_TEST_TMPDIR/server.yaml conf <<EOF
# mq serve settings
server:
  listen:
    - 127.0.0.1:0
    - 127.0.0.1:0
  spool: $cs
  max-connections: 100
  idle-timeout: 1h
  request-timeout: 30s
  role: master
  tokens:
    t16:
      secret: sixteen-chars-xy
      read: "*"
      write: "*"
defaults:
  max-message-bytes: 10
EOF
	# $MQ_SPOOL is set (setup), but the file's spool: wins over it
	auth_start serve --config "$BATS_TEST_TMPDIR/server.yaml"
	grep -q " event=ready spool=$cs pid=$SERVE_PID tokens=1$" "$SERVE_LOG"
	assert_eq "${#PORTS[@]}" 2
	[ "${PORTS[0]}" != "${PORTS[1]}" ]
	local p
	for p in "${PORTS[@]}"; do
		MQ_SERVER=127.0.0.1:$p run -0 as sixteen-chars-xy put q "via$p"
	done
	run -77 as ignored-secret-00000 peek q
	run -65 as sixteen-chars-xy put q 0123456789abcdef # defaults: of the file
	run -0 as sixteen-chars-xy peek q
	assert_eq "$(echo $output)" "via${PORTS[0]} via${PORTS[1]}"
	[ -d "$cs/q" ]
	assert_eq "$(ls -A "$MQ_SPOOL")" ""

	# SIGHUP reads the same file again; a new listen address only warns
	sed -i "s/- 127.0.0.1:0$/- 127.0.0.2:0/; s/sixteen-chars-xy/sixteen-chars-yz/" "$BATS_TEST_TMPDIR/server.yaml"
	hup
	grep -q 'level=warn event=reload msg="listen, metrics-listen and spool change only with a restart"' "$SERVE_LOG"
	run -77 as sixteen-chars-xy peek q
	run -0 as sixteen-chars-yz peek q
	MQ_SERVER=127.0.0.1:${PORTS[1]} run -0 as sixteen-chars-yz peek q
	# the file gone: an error, and the server goes on as it was
	mv "$BATS_TEST_TMPDIR/server.yaml" "$BATS_TEST_TMPDIR/server.yaml.away"
	hup
	grep -q "level=error event=reload error=\"config file '$BATS_TEST_TMPDIR/server.yaml' does not exist\"" "$SERVE_LOG"
	run -0 as sixteen-chars-yz peek q
	run -65 as sixteen-chars-yz put q 0123456789abcdef
	mv "$BATS_TEST_TMPDIR/server.yaml.away" "$BATS_TEST_TMPDIR/server.yaml"
	auth_stop

	# -d wins over spool:, -l over listen:
	auth_start -d "$other" serve --config "$BATS_TEST_TMPDIR/server.yaml" -l 127.0.0.1:0
	grep -q " event=ready spool=$other " "$SERVE_LOG"
	assert_eq "${#PORTS[@]}" 1
	run -0 as sixteen-chars-yz put q2 x
	[ -d "$other/q2" ]
	[ ! -e "$cs/q2" ]
	auth_stop

	# the same with -d after the command
	auth_start serve -d "$other" -c "$BATS_TEST_TMPDIR/server.yaml" -l 127.0.0.1:0
	grep -q " event=ready spool=$other " "$SERVE_LOG"
	auth_stop
}

@test "auth: --config FILE stands in for a broken SPOOL/mq.yaml" {
	# FILE replaces SPOOL/mq.yaml for the server entirely: the spool's own
	# file, whatever it holds, is not read
	printf 'server:\n  bogus: 1\n' >"$MQ_SPOOL/mq.yaml"
	CONF=$BATS_TEST_TMPDIR/server.yaml conf <<EOF
server:
  spool: $MQ_SPOOL
EOF
	auth_start serve --config "$BATS_TEST_TMPDIR/server.yaml" -l 127.0.0.1:0
	run -0 mq put q x
	auth_stop
}

@test "auth: a changed spool: in the --config file is logged on SIGHUP as needing a restart" {
	local cs=$BATS_TEST_TMPDIR/cfgspool
	CONF=$BATS_TEST_TMPDIR/server.yaml conf <<EOF
server:
  listen: 127.0.0.1:0
  spool: $cs
EOF
	auth_start serve --config "$BATS_TEST_TMPDIR/server.yaml"
	sed -i "s|spool: .*|spool: $BATS_TEST_TMPDIR/elsewhere|" "$BATS_TEST_TMPDIR/server.yaml"
	hup
	grep -q 'level=warn event=reload msg="listen, metrics-listen and spool change only with a restart"' "$SERVE_LOG"
	run -0 mq put q x # still the old spool
	[ -d "$cs/q" ]
	auth_stop
}

@test "auth: a missing --config file is 66; bad keys and values are 64 with one line naming file:line" {
	local f=$BATS_TEST_TMPDIR/bad.yaml
	run -66 "$MQ" serve --config "$BATS_TEST_TMPDIR/nope.yaml" -l 127.0.0.1:0
	assert_eq "$output" "mq: serve: config file '$BATS_TEST_TMPDIR/nope.yaml' does not exist"

	# bad_conf LINE TEXT: the YAML on stdin as --config is 64, and the one
	# line of error names $f:LINE and holds TEXT
	bad_conf() {
		cat >"$f"
		run -64 timeout 20 "$MQ" serve --config "$f" -l 127.0.0.1:0 </dev/null
		if [ "${#lines[@]}" != 1 ] || [[ "$output" != "mq: serve: $f:$1: "*"$2"* ]]; then
			echo "config:" >&2
			cat -n "$f" >&2
			echo "expected one line 'mq: serve: $f:$1: ...$2...', got: $output" >&2
			return 1
		fi
	}
	printf 'server:\n  listen: 127.0.0.1:0\n  bogus: 1\n' | bad_conf 3 "unknown key 'bogus' in 'server'"
	printf 'serverx:\n  listen: 127.0.0.1:0\n' | bad_conf 1 "unknown key 'serverx'"
	printf 'server:\n  idle-timeout: forever\n' | bad_conf 2 "bad duration 'forever' for 'idle-timeout'"
	printf 'server:\n  request-timeout: 0\n' | bad_conf 2 "request-timeout"
	printf 'server:\n\n  max-connections: 0\n' | bad_conf 3 "bad number '0' for 'max-connections'"
	printf 'server:\n  max-connections: many\n' | bad_conf 2 "max-connections"
	printf 'server:\n  role: boss\n' | bad_conf 2 "role must be master or follower"
	printf 'server:\n  listen: [127.0.0.1:0, nocolon]\n' | bad_conf 2 "address 'nocolon' is not HOST:PORT"
	printf 'server:\n  metrics-listen: nocolon\n' | bad_conf 2 "metrics-listen"
	printf 'server:\n  spool: [a, b]\n' | bad_conf 2 "'spool' needs a plain scalar value"
	printf 'server: 7\n' | bad_conf 1 "'server' must be a mapping"
	printf 'server:\n  tokens: [a]\n' | bad_conf 2 "'tokens' must map names to tokens"
	printf 'server:\n  tokens:\n    t:\n      secret: fifteen-chars-x\n' |
		bad_conf 3 "token 't' needs a secret of at least 16 characters"
	printf 'server:\n  tokens:\n    t:\n      read: "*"\n' |
		bad_conf 3 "token 't' needs a secret of at least 16 characters"
	printf 'server:\n  tokens:\n    t:\n      secret: 0123456789abcdef\n      admin: "*"\n' |
		bad_conf 5 "unknown key 'admin' in token 't'"
	printf 'server:\n  tokens:\n    t:\n      secret: 0123456789abcdef\n      read: [a, b]\n' |
		bad_conf 5 "'read' must be a plain scalar"
	printf 'server:\n  tokens:\n    bad/name:\n      secret: 0123456789abcdef\n' |
		bad_conf 3 "bad token name 'bad/name'"
	printf 'server:\n  tokens:\n    t:\n      secret: 0123456789abcdef\n    t:\n      secret: 0123456789abcdeg\n' |
		bad_conf 5 "token 't' given twice"
	printf 'server:\n  tokens:\n    t: 0123456789abcdef\n' | bad_conf 3 "token 't' must be a mapping"
	printf 'server: [\n' | bad_conf 2 ""
	printf 'defaults:\n  retries: lots\n' | bad_conf 2 "retries"

	# the same checks for SPOOL/mq.yaml without --config
	printf 'server:\n  tokens:\n    t:\n      secret: short\n' >"$MQ_SPOOL/mq.yaml"
	run -64 timeout 20 "$MQ" -d "$MQ_SPOOL" serve -l 127.0.0.1:0 </dev/null
	assert_eq "$output" "mq: serve: $MQ_SPOOL/mq.yaml:3: token 't' needs a secret of at least 16 characters"
}

@test "auth: metrics-listen serves Prometheus text at /metrics: counters, group lag, a cumulative fsync histogram; 404 elsewhere" {
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0 --metrics-listen 127.0.0.1:0
	[ -n "$MPORT" ]
	[ "$MPORT" != "$PORT" ]
	# a token where none is configured is accepted and not needed
	MQ_TOKEN=any-secret-at-all-000 mq put q m1 m2 m3 m4 m5
	mq put q m6 m7
	mq put other o1
	run -0 mq get -g g -n 2 q
	run -0 mq get -g all -n 0 q
	run -0 mq get -g g other

	run -0 http_get /metrics
	local resp=$output body
	[[ "${lines[0]}" == "HTTP/1.0 200 OK" ]]
	grep -qx 'Content-Type: text/plain; version=0.0.4; charset=utf-8' <<<"$resp"
	body=${resp#*$'\n\n'}
	# Content-Length counts the body (the \r of the head are gone)
	assert_eq "$(sed -n 's/^Content-Length: //p' <<<"$resp")" "$(printf '%s\n' "$body" | wc -c)"
	[ "$(metric mq_messages_in_total <<<"$body")" -ge 8 ]
	[ "$(metric mq_messages_out_total <<<"$body")" -ge 10 ]
	assert_eq "$(metric 'mq_group_lag{queue="q",group="g"}' <<<"$body")" 5
	assert_eq "$(metric 'mq_group_lag{queue="q",group="all"}' <<<"$body")" 0
	assert_eq "$(metric 'mq_group_lag{queue="other",group="g"}' <<<"$body")" 0
	assert_eq "$(metric 'mq_queue_messages{queue="q"}' <<<"$body")" 7
	metric mq_connections <<<"$body" >/dev/null
	grep -qx '# TYPE mq_fsync_seconds histogram' <<<"$body"
	grep -qx '# TYPE mq_group_lag gauge' <<<"$body"
	grep -qx '# TYPE mq_messages_in_total counter' <<<"$body"
	# every sample line is NAME[{LABELS}] NUMBER
	run -0 awk '!/^#/ && !/^[a-z_]+(\{[a-z]+="[^"]*"(,[a-z]+="[^"]*")*\})? [0-9.e+-]+$/ { print; bad = 1 } END { exit bad }' <<<"$body"

	# the histogram: le ascending, counts cumulative, +Inf last and equal
	# to _count, and the puts synced at least once
	run -0 awk '
		/^mq_fsync_seconds_bucket\{le="/ {
			le = $1; sub(/.*le="/, "", le); sub(/"}$/, "", le)
			if (inf) { print "bucket after +Inf"; exit 1 }
			if (le == "+Inf") { inf = $2; next }
			if (n && le + 0 <= prev_le) { print "le not ascending at " le; exit 1 }
			if (n && $2 + 0 < prev) { print "not cumulative at " le; exit 1 }
			prev_le = le + 0; prev = $2 + 0; n++
		}
		/^mq_fsync_seconds_count / { count = $2 }
		/^mq_fsync_seconds_sum / { sum = $2 }
		END {
			if (n < 2 || inf == "") { print "buckets missing"; exit 1 }
			if (inf + 0 < prev) { print "+Inf below the last bucket"; exit 1 }
			if (inf != count) { print "+Inf " inf " != count " count; exit 1 }
			if (count + 0 < 1 || sum == "" || sum + 0 < 0) { print "count " count " sum " sum; exit 1 }
		}' <<<"$body"

	# the lag follows the group
	run -0 mq get -g g q
	run -0 http_get /metrics
	assert_eq "$(metric 'mq_group_lag{queue="q",group="g"}' <<<"$output")" 4

	run -0 http_get /other
	[[ "${lines[0]}" == "HTTP/1.0 404 Not Found" ]]
	run -0 http_get /metricsx
	[[ "${lines[0]}" == "HTTP/1.0 404 Not Found" ]]
	# the protocol is not spoken there
	local fd
	exec {fd}<>"/dev/tcp/127.0.0.1/$MPORT"
	printf 'PING\n\n' >&"$fd"
	run -0 timeout 10 cat <&"$fd"
	exec {fd}>&-
	[[ "${lines[0]}" == "HTTP/1.0 404 Not Found"* ]]
	run -0 mq ls
	assert_eq "$(echo $output)" "other q"
	auth_stop
}

@test "auth: metrics need no token while the protocol does" {
	conf_tokens
	auth_start -d "$MQ_SPOOL" serve -l 127.0.0.1:0 --metrics-listen 127.0.0.1:0
	as "$WRITE_ONLY" put logs a b c
	run -77 mq put logs d
	run -0 http_get /metrics
	[[ "${lines[0]}" == "HTTP/1.0 200 OK" ]]
	assert_eq "$(metric mq_messages_in_total <<<"$output")" 3
	auth_stop
}
