#!/usr/bin/env bats
# mq nameserver: brokers (mq serve with server: nameservers: in mq.yaml)
# register with every nameserver; clients find them with -n or
# $MQ_NAMESRV.  Routes on each nameserver (a broker with many queues
# too), a put that goes on when a broker is killed -9 under it or refuses
# it (ERR 75), and one that gives up (69) when every broker is gone;
# expiry of a dead broker and UNREGISTER of a stopped one; one nameserver
# of two down, restarted or hung; how put spreads messages, with and
# without keys; get draining every broker; -n against -s, -d and the
# environment; the errors (69 no nameserver, 64 usage).  Every process
# listens on a loopback ephemeral port (-l 127.0.0.1:0, the address read
# from its log), with short intervals (scan 1s, expire 3s, register 1s);
# every server left must exit 0 on SIGTERM with no sanitizer report in
# its log.  Known bugs skip their test with "BUG: ..." once the rest of it
# passed.
bats_require_minimum_version 1.5.0
load helper

# Under the sanitizer build a process costs ~10x: scale counts down.
PUT_A=200000 PUT_N=800000 LINES_200=3000 SPREAD_N=1000000
[ -z "${MQ_ASAN:-}" ] || { PUT_A=100000 PUT_N=300000; }

setup() {
	export MQ_SPOOL="$BATS_TEST_TMPDIR/spool"
	mkdir -p "$MQ_SPOOL"
	BG_PIDS=()
	# these tests start their own servers and say where to find them
	unset MQ_SERVER MQ_NAMESRV MQ_TOKEN
	declare -gA PID=() ADDR=() LOG=() SPOOL=()
	NAMES=()
	T=$BATS_TEST_TMPDIR
}

teardown() {
	local p n rc=0
	for p in "${BG_PIDS[@]}"; do # clients
		kill -9 "$p" 2>/dev/null || true
	done
	# brokers first (they UNREGISTER on the way out), then nameservers;
	# each must exit 0 on SIGTERM
	for n in $(printf '%s\n' "${NAMES[@]}" | grep -v '^ns'; printf '%s\n' "${NAMES[@]}" | grep '^ns'); do
		[ -n "${PID[$n]:-}" ] || continue
		kill -CONT "${PID[$n]}" 2>/dev/null || true # (one a test stopped)
		stop "$n" || rc=1
	done
	wait 2>/dev/null || true
	# a sanitizer report from any server or client of the test fails it
	local errs=("$T"/*.err)
	[ -e "${errs[0]}" ] || errs=()
	FAILED=${rc#0} servers_checked "${errs[@]}" || rc=1
	return "$rc"
}

# start NAME ARGS...: `mq ARGS...` (a nameserver or serve command line)
# in the background, its stderr in serve.NAME.log; waits (at most 20 s)
# for event=ready and sets PID[NAME], LOG[NAME] and ADDR[NAME] (the first
# address it listens on, from its log).
start() {
	local name=$1 log=$T/serve.$1.log
	shift
	LOG[$name]=$log
	NAMES+=("$name")
	PID[$name]=
	bg_ready "$log" "$@" || return 1
	PID[$name]=$BG_READY_PID
	unset 'BG_PIDS[-1]' # stopped by name in teardown, not killed with the clients
	local port
	port=$(log_ports "$log" | head -n 1)
	[ -n "$port" ] || { echo "start: no listen line in $log" >&2; return 1; }
	ADDR[$name]=127.0.0.1:$port
}

# ns NAME [OPTIONS...]: a nameserver, scanning every second and expiring
# brokers silent for ${EXPIRE:-3s}.
ns() {
	local name=$1
	shift
	start "$name" nameserver -l 127.0.0.1:0 --scan-interval 1s --expire "${EXPIRE:-3s}" "$@"
}

# broker NAME NS... [-- YAML-LINE...]: mq serve on spool $T/NAME
# (SPOOL[NAME]; make queues there first with `mq -d "${SPOOL[NAME]}"
# create`), registering every second with the nameservers NS...; extra
# lines go into its server: section.  Waits until every NS lists it.
broker() {
	local name=$1 list=() n extra=()
	shift
	while [ $# -gt 0 ] && [ "$1" != -- ]; do
		list+=("${ADDR[$1]}")
		shift
	done
	[ $# -eq 0 ] || { shift; extra=("$@"); }
	SPOOL[$name]=$T/$name
	mkdir -p "${SPOOL[$name]}"
	{
		echo "server:"
		echo "  nameservers: [$(IFS=,; echo "${list[*]}")]"
		echo "  register-interval: 1s"
		for n in "${extra[@]}"; do echo "  $n"; done
	} >"${SPOOL[$name]}/mq.yaml"
	start "$name" -d "${SPOOL[$name]}" serve -l 127.0.0.1:0
	local who=${ADDR[$name]}
	for n in "${extra[@]}"; do
		case $n in advertise:*) who=${n#advertise: } ;; esac
	done
	for n in "${list[@]}"; do
		wait_for "listed $n $who" 10
	done
}

# stop NAME [SIGNAL]: signal (default TERM) the process NAME and wait (at
# most 10 s) for it to exit; STOP_RC gets its status.  SIGTERM must give 0.
stop() {
	local name=$1 sig=${2:-TERM} pid=${PID[$1]}
	PID[$name]=
	STOP_RC=
	kill -s "$sig" "$pid" 2>/dev/null || true
	if ! wait_for "proc_gone $pid" 10; then
		kill -9 "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		echo "stop: $name did not exit within 10s of SIG$sig" >&2
		return 1
	fi
	STOP_RC=0
	wait "$pid" 2>/dev/null || STOP_RC=$?
	if [ "$sig" = TERM ] && [ "$STOP_RC" != 0 ]; then
		echo "stop: $name exited $STOP_RC on SIGTERM" >&2
		return 1
	fi
}

# Does nameserver address $1 list broker address $2 (in `mq route`)?
listed() { "$MQ" -n "$1" route | cut -f1 | grep -qxF "$2"; }

# Wait (at most $2 s) for process $1 to exit; JOB_RC gets its status.
job_wait() {
	wait_for "proc_gone $1" "${2:-10}" || return 1
	JOB_RC=0
	wait "$1" || JOB_RC=$?
}

# Bodies of queue $2 in spool $1, one a line (a local read: the broker
# may be dead).
bodies() { "$MQ" -d "$1" peek -f '%s\n' "$2"; }

# Number of messages of queue $2 in spool $1 (0 when it has none).
count() {
	local out rc=0
	out=$("$MQ" -d "$1" peek -f '.\n' "$2" 2>/dev/null) || rc=$?
	[ "$rc" = 0 ] || [ "$rc" = 1 ] || [ "$rc" = 66 ] || return 1
	[ -n "$out" ] && wc -l <<<"$out" || echo 0
}

@test "nameserver: two nameservers list both brokers; route QUEUE gives the holders and their partitions" {
	ns ns1
	ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} n a
	mkdir -p "$T/b1" "$T/b2" "$T/b3"
	"$MQ" -d "$T/b1" create --partitions 3 q
	"$MQ" -d "$T/b1" create only1
	"$MQ" -d "$T/b2" create --partitions 2 q
	"$MQ" -d "$T/b3" create --partitions 5 other
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	# a follower that advertises an address of its own (never dialled here)
	broker b3 ns1 ns2 -- "role: follower" "advertise: 192.0.2.1:7411"
	grep -q "event=registered nameserver=${ADDR[ns1]} as=${ADDR[b1]}" "${LOG[b1]}"
	grep -q "event=registered nameserver=${ADDR[ns2]} as=${ADDR[b1]}" "${LOG[b1]}"
	grep -q "event=registered nameserver=${ADDR[ns2]} as=192.0.2.1:7411" "${LOG[b3]}"
	for n in ns1 ns2; do
		grep -q "event=register broker=${ADDR[b1]} " "${LOG[$n]}"
		grep -q "event=register broker=${ADDR[b2]} " "${LOG[$n]}"
		grep -q "event=register broker=192.0.2.1:7411 role=follower" "${LOG[$n]}"
		# each nameserver on its own: ADDR QUEUES ROLE SECONDS
		run -0 --separate-stderr mq -n "${ADDR[$n]}" route
		assert_eq "$stderr" ""
		assert_eq "${#lines[@]}" 3
		assert_eq "$(sort <<<"$output" | cut -f1-3)" "$(printf '%s\t2\tmaster\n%s\t1\tmaster\n192.0.2.1:7411\t1\tfollower' \
			"${ADDR[b1]}" "${ADDR[b2]}" | sort)"
		# registered within the last register-interval or two
		awk -F'\t' '$4 !~ /^[0-9]+$/ || $4 > 2 { exit 1 }' <<<"$output"
		run -0 --separate-stderr mq -n "${ADDR[$n]}" route q
		assert_eq "$(sort <<<"$output")" "$(printf '%s\t3\tmaster\n%s\t2\tmaster' "${ADDR[b1]}" "${ADDR[b2]}" | sort)"
		run -0 mq -n "${ADDR[$n]}" route only1
		assert_eq "$output" "$(printf '%s\t1\tmaster' "${ADDR[b1]}")"
		run -0 mq -n "${ADDR[$n]}" route other
		assert_eq "$output" "$(printf '192.0.2.1:7411\t5\tfollower')"
	done
	# both nameservers in the list, in either order, and $MQ_NAMESRV
	for a in "$NS" "${ADDR[ns2]},${ADDR[ns1]}" "${ADDR[ns1]} ${ADDR[ns2]}"; do
		run -0 mq -n "$a" route q
		assert_eq "${#lines[@]}" 2
		MQ_NAMESRV=$a run -0 mq route
		assert_eq "${#lines[@]}" 3
	done
	run -0 mq --namesrv="$NS" route q
	assert_eq "${#lines[@]}" 2
	# a queue nobody holds: 66 and one line
	run -66 --separate-stderr mq -n "$NS" route nope
	assert_eq "$output" ""
	[[ "$stderr" == "mq: route: no live broker holds queue 'nope'" ]]
	run -64 mq -n "$NS" route 'bad/name'
	# a queue created on a running broker is in its next registration
	run -0 mq -s "${ADDR[b2]}" create --partitions 4 fresh
	wait_for "mq -n '${ADDR[ns1]}' route fresh" 5
	wait_for "mq -n '${ADDR[ns2]}' route fresh" 5
	run -0 mq -n "$NS" route fresh
	assert_eq "$output" "$(printf '%s\t4\tmaster' "${ADDR[b2]}")"
	run -0 mq -n "${ADDR[ns1]}" route
	grep -qxF "$(printf '%s\t2\tmaster' "${ADDR[b2]}")" <(cut -f1-3 <<<"$output")
	# a nameserver no broker was told about lists none
	ns ns3
	run -0 --separate-stderr mq -n "${ADDR[ns3]}" route
	assert_eq "$output$stderr" ""
	run -66 mq -n "${ADDR[ns3]}" route q
}

@test "nameserver: a broker with 300 queues registers them over several REGISTER lines; each is routed" {
	ns ns1
	local long k
	mkdir -p "$T/b1"
	"$MQ" -d "$T/b1" create base
	# 300 queues of 128-character names: ~39 KB of QUEUE:PARTITIONS, so
	# two REGISTER lines (one takes queues up to 32 KiB); copies of one,
	# made by one process
	long=$(printf 'q%.0s' $(seq 1 125))
	python3 -c 'import shutil, sys
for k in range(100, 400):
    shutil.copytree(sys.argv[1] + "/base", sys.argv[1] + "/" + sys.argv[2] + str(k))' "$T/b1" "$long"
	broker b1 ns1
	# (re-registering every second: each answer has them all)
	for k in 1 2 3 4 5; do
		run -0 mq -n "${ADDR[ns1]}" route
		assert_eq "${#lines[@]}" 1
		assert_eq "$(cut -f1-3 <<<"$output")" "$(printf '%s\t301\tmaster' "${ADDR[b1]}")"
	done
	for k in 100 250 399; do
		run -0 mq -n "${ADDR[ns1]}" route "$long$k"
		assert_eq "$output" "$(printf '%s\t1\tmaster' "${ADDR[b1]}")"
	done
	run -0 mq -n "${ADDR[ns1]}" route base
	run -66 mq -n "${ADDR[ns1]}" route "${long}400"
	# a put through -n finds the last one
	run -0 mq -n "${ADDR[ns1]}" put --print-offsets "${long}399" x
	assert_eq "$output" "0:0@${ADDR[b1]}"
}

@test "nameserver: kill -9 a broker under a running put: the put goes on to the other, exits 0, and every line is stored" {
	# the dead broker stays in the routes (60 s expiry): a put after it
	# must find out by itself
	EXPIRE=60s ns ns1
	EXPIRE=60s ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} w wpid pp k n m b1
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 3 q
	"$MQ" -d "$T/b2" create --partitions 1 q
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	b1=${ADDR[b1]}
	mkfifo "$T/in"
	# (not through bg: a background command's stdin would be /dev/null)
	"$MQ" -n "$NS" put --print-offsets q <"$T/in" >"$T/offs" 2>"$T/put.err" 3>&- &
	pp=$!
	BG_PIDS+=("$pp")
	exec {w}>"$T/in"
	# a first part, all acknowledged, some by each broker (requests in
	# turn, weighted 3:1)
	seq 1 "$PUT_A" >&"$w"
	wait_for "[ \$(wc -l <'$T/offs') -ge $PUT_A ]" 60
	grep -q "@$b1\$" "$T/offs"
	grep -q "@${ADDR[b2]}\$" "$T/offs"
	run ! proc_gone "$pp"
	# the rest streams in while broker 1 dies
	seq $((PUT_A + 1)) "$PUT_N" >&"$w" 3>&- &
	wpid=$!
	stop b1 KILL
	assert_eq "$STOP_RC" 137
	k=$(wc -l <"$T/offs")
	wait "$wpid"
	exec {w}>&-
	job_wait "$pp" 120
	echo "acknowledged when broker 1 was killed: $k of $PUT_N" >&2
	cat "$T/put.err" >&2
	assert_eq "$JOB_RC" 0
	# one line names the broker that failed
	run -0 cat "$T/put.err"
	assert_eq "${#lines[@]}" 1
	[[ "${lines[0]}" =~ ^mq:\ put:\ q:\ broker\ $b1\ failed\ \(.+\)\;\ left\ out\ for\ 30s$ ]]
	# every message acknowledged once, each by a broker of the route
	assert_eq "$(wc -l <"$T/offs")" "$PUT_N"
	run ! grep -vE "^[0-9]+:[0-9]+@($b1|${ADDR[b2]})\$" "$T/offs"
	# every line stored on at least one broker (at least once: some twice),
	# nothing else; and what broker 2 acknowledged is what it holds
	{ bodies "$T/b1" q; bodies "$T/b2" q; } >"$T/stored"
	sort -n -u "$T/stored" | cmp - <(seq 1 "$PUT_N")
	n=$(count "$T/b2" q)
	assert_eq "$(grep -c "@${ADDR[b2]}\$" "$T/offs")" "$n"
	m=$(count "$T/b1" q)
	[ "$m" -ge "$(grep -c "@$b1\$" "$T/offs")" ]
	echo "stored: $m on broker 1, $n on broker 2 (of $PUT_N lines)" >&2

	# within the back-off, new puts go to the live broker; one that tries
	# the dead one first says so (connection refused) and goes on
	for k in 1 2 3 4; do
		run -0 --separate-stderr mq -n "$NS" put --print-offsets q "again$k" "again$k.2"
		assert_eq "${#lines[@]}" 2
		[[ "${lines[0]}" == *"@${ADDR[b2]}" ]]
		[ -z "$stderr" ] || [[ "$stderr" =~ ^mq:\ put:\ q:\ broker\ $b1\ failed\ \(.+\)\;\ left\ out\ for\ 30s$ ]]
	done
	seq "$((PUT_N + 1))" "$((PUT_N + 50000))" >"$T/more"
	run -0 --separate-stderr mq -n "$NS" put q <"$T/more"
	[ -z "$stderr" ] || [[ "$stderr" =~ ^mq:\ put:\ q:\ broker\ $b1\ failed\ \(.+\)\;\ left\ out\ for\ 30s$ ]]
	bodies "$T/b2" q | grep -vE '^again' | tail -n 50000 | cmp - "$T/more"
	assert_eq "$(count "$T/b2" q)" $((n + 8 + 50000))
	# other commands go on to the live broker when the dead one comes
	# first (saying on stderr that it could not connect to it)
	for k in 1 2 3 4; do
		run -0 --separate-stderr mq -n "$NS" stat --json q
		assert_eq "$(json_eval 'd["messages"]' <<<"$output")" $((n + 8 + 50000))
		[ -z "$stderr" ] || assert_eq "$stderr" "mq: stat: cannot connect to server '$b1': Connection refused"
		run -0 --separate-stderr mq -n "$NS" ls
		assert_eq "$output" q
		[ -z "$stderr" ] || assert_eq "$stderr" "mq: ls: cannot connect to server '$b1': Connection refused"
		run -0 --separate-stderr mq -n "$NS" peek -n 1 q
		assert_eq "$output" "$(bodies "$T/b2" q | head -n 1)"
	done
}

@test "nameserver: a broker that refuses with ERR 75 (too many connections) is left out of a put like a dead one" {
	ns ns1
	local fd l
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 3 q
	"$MQ" -d "$T/b2" create q
	broker b1 ns1 -- "max-connections: 1"
	broker b2 ns1
	# an idle client takes broker 1's only connection
	exec {fd}<>"/dev/tcp/${ADDR[b1]%:*}/${ADDR[b1]##*:}"
	printf 'PING\n' >&"$fd"
	IFS= read -r -t 10 l <&"$fd"
	assert_eq "$l" OK
	run -75 mq -s "${ADDR[b1]}" ls
	# several requests in turn: broker 1's turn comes, and goes to broker 2
	seq 1 200000 >"$T/in"
	run -0 --separate-stderr bash -c 'cat "$1" | "$MQ" -n "$2" put --print-offsets q' _ "$T/in" "${ADDR[ns1]}"
	assert_eq "$stderr" "mq: put: q: broker ${ADDR[b1]} failed (too many connections); left out for 30s"
	assert_eq "${#lines[@]}" 200000
	printf '%s\n' "${lines[@]}" >"$T/offs"
	run ! grep -v "@${ADDR[b2]}\$" "$T/offs"
	bodies "$T/b2" q | cmp - "$T/in"
	assert_eq "$(count "$T/b1" q)" 0
	exec {fd}>&-
}

@test "nameserver: every broker killed under a put: it exits 69 naming each, and every acknowledged offset is stored" {
	EXPIRE=60s ns ns1
	local w wpid pp b k
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 3 q
	"$MQ" -d "$T/b2" create q
	broker b1 ns1
	broker b2 ns1
	mkfifo "$T/in"
	"$MQ" -n "${ADDR[ns1]}" put --print-offsets q <"$T/in" >"$T/offs" 2>"$T/put.err" 3>&- &
	pp=$!
	BG_PIDS+=("$pp")
	exec {w}>"$T/in"
	seq 1 "$PUT_A" >&"$w"
	wait_for "[ \$(wc -l <'$T/offs') -ge $PUT_A ]" 60
	# (the writer dies of SIGPIPE when the put gives up)
	seq $((PUT_A + 1)) "$PUT_N" >&"$w" 3>&- 2>/dev/null &
	wpid=$!
	BG_PIDS+=("$wpid")
	stop b1 KILL
	stop b2 KILL
	wait "$wpid" || true
	exec {w}>&-
	job_wait "$pp" 60
	cat "$T/put.err" >&2
	assert_eq "$JOB_RC" 69
	for b in b1 b2; do
		grep -q "^mq: put: q: broker ${ADDR[$b]} failed (.*); left out for 30s\$" "$T/put.err"
	done
	run -0 tail -n 1 "$T/put.err"
	[[ "$output" == "mq: put: q: no broker of queue 'q' is left (the last error: "*")" ]]
	# each offset acknowledged is a message stored there
	complete_lines "$T/offs" >"$T/offs.ok"
	[ "$(wc -l <"$T/offs.ok")" -ge "$PUT_A" ]
	for b in b1 b2; do
		"$MQ" -d "${SPOOL[$b]}" peek -f "%p:%o@${ADDR[$b]}\n" q
	done | sort >"$T/stored"
	sort "$T/offs.ok" | comm -23 - "$T/stored" >"$T/lost"
	assert_eq "$(head -n 5 "$T/lost")" ""
	# the last error once, not quoted inside itself
	assert_eq "$(grep -c "no broker of queue 'q' is left" "$T/put.err")" 1
	# each broker failed once: left out, it is not tried again
	for b in b1 b2; do
		k=$(grep -c "broker ${ADDR[$b]} failed" "$T/put.err")
		if [ "$k" != 1 ]; then
			skip "BUG: with every broker dead, put -n reports broker ${ADDR[$b]} failed $k times (the last: connection refused): rset_fail finds no broker to move the failed one's kept requests to, so they stay on it, and put_remote's final rset_flush connects to it again although it is left out (down_until is not checked there)"
		fi
	done
}

@test "nameserver: a broker killed -9 expires within scan+expire; one stopped with SIGTERM unregisters at once" {
	ns ns1
	ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} t0 t1 n dead
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 2 q
	"$MQ" -d "$T/b2" create q
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	dead=${ADDR[b1]}
	stop b1 KILL
	t0=$(now_ms)
	# not at once: the broker registered under a second ago, and expiry is 3s
	listed "${ADDR[ns1]}" "$dead"
	# gone from both within scan (1s) + expire (3s) + a register-interval
	wait_for "! listed '${ADDR[ns1]}' '$dead' && ! listed '${ADDR[ns2]}' '$dead'" 10
	t1=$(now_ms)
	echo "expired after $((t1 - t0)) ms" >&2
	[ $((t1 - t0)) -ge 1500 ]
	[ $((t1 - t0)) -le 6500 ]
	for n in ns1 ns2; do
		grep -q "event=expire broker=$dead\$" "${LOG[$n]}"
		run ! grep -q "event=unregister broker=$dead" "${LOG[$n]}"
	done
	run -0 mq -n "$NS" route q
	assert_eq "$output" "$(printf '%s\t1\tmaster' "${ADDR[b2]}")"
	# the live one stays past the expiry: it keeps registering
	run -0 mq -n "$NS" route
	assert_eq "$(cut -f1 <<<"$output")" "${ADDR[b2]}"

	# SIGTERM: exit 0, and both nameservers forget it before it exits
	n=${ADDR[b2]}
	stop b2
	for ns in ns1 ns2; do
		grep -q "event=unregister broker=$n\$" "${LOG[$ns]}"
		run -0 --separate-stderr mq -n "${ADDR[$ns]}" route
		assert_eq "$output$stderr" ""
		run -66 mq -n "${ADDR[$ns]}" route q
	done
	# a restarted broker (its spool, a new port) is back at once
	start b1r -d "$T/b1" serve -l 127.0.0.1:0
	wait_for "listed '${ADDR[ns1]}' '${ADDR[b1r]}' && listed '${ADDR[ns2]}' '${ADDR[b1r]}'" 5
	run -0 mq -n "$NS" route q
	assert_eq "$output" "$(printf '%s\t2\tmaster' "${ADDR[b1r]}")"
}

@test "nameserver: with one of two nameservers down, clients get routes from the other" {
	ns ns1
	ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} k t0
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 2 q
	"$MQ" -d "$T/b2" create q
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	stop ns1
	# the brokers notice (one warning each), and keep registering with ns2
	wait_for "grep -q 'level=warn event=register nameserver=${ADDR[ns1]} ' '${LOG[b1]}'" 5
	t0=$(now_ms)
	wait_for "[ \$(now_ms) -gt $((t0 + 4500)) ]" 10 # past the expiry of ns2
	# a client asks the nameservers from a random one on: each order works
	for k in 1 2 3 4 5 6; do
		run -0 --separate-stderr mq -n "$NS" route q
		assert_eq "$stderr" ""
		assert_eq "$(sort <<<"$output")" "$(printf '%s\t2\tmaster\n%s\t1\tmaster' "${ADDR[b1]}" "${ADDR[b2]}" | sort)"
		run -0 mq -n "${ADDR[ns1]},${ADDR[ns2]}" route
		assert_eq "${#lines[@]}" 2
		run -0 mq -n "${ADDR[ns2]},${ADDR[ns1]}" route
		assert_eq "${#lines[@]}" 2
		MQ_NAMESRV=$NS run -0 --separate-stderr mq put --print-offsets q "m$k"
		assert_eq "$stderr" ""
		[[ "$output" =~ ^[01]:[0-9]+@(${ADDR[b1]}|${ADDR[b2]})$ ]]
	done
	run -0 mq -n "$NS" route
	awk -F'\t' '$4 > 2 { exit 1 }' <<<"$output"
	# the one left alone answers 69 for everything
	run -69 --separate-stderr mq -n "${ADDR[ns1]}" route q
	[[ "$stderr" == "mq: route: no nameserver answers (${ADDR[ns1]}): "* ]]
	# what was put is on the brokers, each message once
	assert_eq "$({ bodies "$T/b1" q; bodies "$T/b2" q; } | sort | tr '\n' ' ')" "m1 m2 m3 m4 m5 m6 "

	# it comes back on its address: the brokers register again within a
	# register-interval
	if ! start ns1b nameserver -l "${ADDR[ns1]}" --scan-interval 1s --expire 3s; then
		grep -q 'cannot listen' "${LOG[ns1b]}" && skip "the port of ns1 was taken meanwhile"
		false
	fi
	wait_for "listed '${ADDR[ns1]}' '${ADDR[b1]}' && listed '${ADDR[ns1]}' '${ADDR[b2]}'" 5
	assert_eq "$(grep -c "event=registered nameserver=${ADDR[ns1]} " "${LOG[b2]}")" 2

	# ns2 hangs (SIGSTOP: connections are taken, never answered): clients
	# wait for it at most 2 s, then ask ns1; the brokers stay on ns1
	kill -STOP "${PID[ns2]}"
	t0=$(now_ms)
	for k in 1 2 3; do
		run -0 --separate-stderr mq -n "$NS" route q
		assert_eq "$stderr" ""
		assert_eq "${#lines[@]}" 2
	done
	run -0 mq -n "${ADDR[ns2]},${ADDR[ns1]}" put --print-offsets q hung
	[[ "$output" =~ ^[01]:[0-9]+@(${ADDR[b1]}|${ADDR[b2]})$ ]]
	echo "3 routes and a put with ns2 hung: $(($(now_ms) - t0)) ms" >&2
	[ $(($(now_ms) - t0)) -lt 15000 ]
	wait_for "[ \$(now_ms) -gt $((t0 + 4500)) ]" 10
	run -0 mq -n "${ADDR[ns1]}" route q
	assert_eq "${#lines[@]}" 2
	wait_for "grep -q 'level=warn event=register nameserver=${ADDR[ns2]} ' '${LOG[b1]}'" 5
	kill -CONT "${PID[ns2]}"
	# once it answers again, it has both (registered meanwhile or just now)
	wait_for "listed '${ADDR[ns2]}' '${ADDR[b1]}' && listed '${ADDR[ns2]}' '${ADDR[b2]}'" 5
}

@test "nameserver: put spreads unkeyed messages over the brokers in proportion to their partitions" {
	ns ns1
	local share
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 3 q
	"$MQ" -d "$T/b2" create q
	"$MQ" -d "$T/b1" create --partitions 3 f
	"$MQ" -d "$T/b2" create f
	broker b1 ns1
	broker b2 ns1
	seq 1 "$SPREAD_N" >"$T/in"
	# share_b1 QUEUE: broker 1's share of what was put, in per cent, in
	# share; everything put is on one or the other
	share_b1() {
		local c1 c2
		c1=$(count "$T/b1" "$1")
		c2=$(count "$T/b2" "$1")
		assert_eq $((c1 + c2)) "$SPREAD_N"
		share=$((c1 * 100 / (c1 + c2)))
	}
	# 3 partitions against 1: three requests of four to broker 1
	cat "$T/in" | "$MQ" -n "${ADDR[ns1]}" put q
	share_b1 q
	echo "from a pipe: broker 1 has $share%" >&2
	[ "$share" -ge 65 ]
	[ "$share" -le 85 ]
	# the same from a file
	"$MQ" -n "${ADDR[ns1]}" put f <"$T/in"
	share_b1 f
	echo "from a file: broker 1 has $share%" >&2
	if [ "$share" -lt 65 ] || [ "$share" -gt 85 ]; then
		skip "BUG: from a file, put -n gives broker 1 (3 partitions of 4) $share% of the messages: put_stdin never polls while frames wait (rput_due is 0), so after each 256 KiB read rset_flush sends the partial request and takes a turn; full and partial requests alternate, and one broker's turns fall on partials only (or on fulls only, by the random route order)"
	fi
}

@test "nameserver: keyed put: -k messages of one put land on one broker; -K lines with one key on one broker" {
	ns ns1
	ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} c1 c2 k q
	mkdir -p "$T/b1" "$T/b2"
	for q in kd k1; do
		"$MQ" -d "$T/b1" create --partitions 3 "$q"
		"$MQ" -d "$T/b2" create "$q"
	done
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	# -K: 20 keys over 20000 lines (several requests), interleaved
	seq 1 20000 | awk '{ print "key" $1 % 20 ":" $1 }' >"$T/kd"
	run -0 --separate-stderr mq -n "$NS" put -K : kd <"$T/kd"
	assert_eq "$stderr" ""
	"$MQ" -d "$T/b1" peek -f '%k %s\n' kd >"$T/kd.1"
	"$MQ" -d "$T/b2" peek -f '%k %s\n' kd >"$T/kd.2"
	# all of them, once, and no key on both brokers
	cat "$T/kd.1" "$T/kd.2" | sed 's/ /:/' | sort | cmp - <(sort "$T/kd")
	cut -d' ' -f1 "$T/kd.1" | sort -u >"$T/keys.1"
	cut -d' ' -f1 "$T/kd.2" | sort -u >"$T/keys.2"
	assert_eq "$(comm -12 "$T/keys.1" "$T/keys.2")" ""
	# the weights are 3:1: both get some keys
	[ -s "$T/keys.1" ]
	[ -s "$T/keys.2" ]
	echo "keys on broker 1: $(wc -l <"$T/keys.1"), on broker 2: $(wc -l <"$T/keys.2")" >&2
	# each key in order (one partition of one broker)
	for k in key0 key7 key13; do
		cat "$T/kd.1" "$T/kd.2" | awk -v k="$k" '$1 == k { print $2 }' | sort -n -c
	done

	# -k: one key for a whole put of several requests (200-byte lines)
	seq 1 "$LINES_200" | awk '{ printf "%0200d\n", $1 }' >"$T/k1"
	run -0 --separate-stderr mq -n "$NS" put --print-offsets -k K k1 <"$T/k1"
	assert_eq "$stderr" ""
	c1=$(count "$T/b1" k1)
	c2=$(count "$T/b2" k1)
	echo "-k K: $c1 on broker 1, $c2 on broker 2" >&2
	assert_eq $((c1 + c2)) "$LINES_200"
	if [ "$c1" != 0 ] && [ "$c2" != 0 ]; then
		skip "BUG: put -n -k KEY spreads the key's messages over the brokers ($c1 and $c2): cmd_put calls put_remote before it sets pc.tmpl (has_key), so rset_add never sees -k"
	fi
	run -0 mq -d "$T/b$([ "$c1" = 0 ] && echo 2 || echo 1)" peek -f '%k\n' k1
	assert_eq "$(sort -u <<<"$output")" K
}

@test "nameserver: keyed put: a key lands on the same broker in every put while the brokers stay the same" {
	ns ns1
	ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} k m q
	mkdir -p "$T/b1" "$T/b2"
	for q in q ids; do
		"$MQ" -d "$T/b1" create --partitions 3 "$q"
		"$MQ" -d "$T/b2" create "$q"
	done
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	# -K (the key goes with each line): one put per message, as producers
	# putting an order's events one at a time would
	for k in a b c d e f; do
		for m in 1 2 3 4 5 6 7 8; do
			run -0 mq -n "$NS" put -K : q "$k:$m"
		done
	done
	"$MQ" -d "$T/b1" peek -f '%k\n' q | sort -u >"$T/keys.1"
	"$MQ" -d "$T/b2" peek -f '%k\n' q | sort -u >"$T/keys.2"
	assert_eq "$(cat "$T/keys.1" "$T/keys.2" | sort -u | tr -d '\n')" abcdef
	# put --id chooses the broker as a key would: a retried put with the
	# same id finds the first one there and stores nothing
	for k in a b c d e f; do
		for m in 1 2 3 4; do
			run -0 mq -n "$NS" put --id "$k" ids "$k$m"
		done
	done
	m=$(($(count "$T/b1" ids) + $(count "$T/b2" ids)))
	k=$(comm -12 "$T/keys.1" "$T/keys.2" | tr -d '\n')
	if [ -n "$k" ] || [ "$m" != 6 ]; then
		skip "BUG: keys '$k' went to both brokers over successive puts, and put --id stored $m messages for 6 ids: rset_owner maps a key hash onto the brokers in route order, and ns_brokers rotates that order at random per process (and each nameserver lists brokers in its own registration order)"
	fi
}

@test "nameserver: get through -n drains both brokers; no nameserver is 69; route without -n and put -p with -n are 64" {
	ns ns1
	ns ns2
	local NS=${ADDR[ns1]},${ADDR[ns2]} k rc out got=() tail_bug=''
	mkdir -p "$T/b1" "$T/b2"
	"$MQ" -d "$T/b1" create --partitions 2 q
	"$MQ" -d "$T/b2" create q
	broker b1 ns1 ns2
	broker b2 ns1 ns2
	# some on each broker for sure, some wherever the put sends them
	run -0 mq -s "${ADDR[b1]}" put q a1 a2 a3 a4
	run -0 mq -s "${ADDR[b2]}" put q b1 b2 b3
	run -0 mq -n "$NS" put q n1 n2
	run -0 mq -n "$NS" put -K : q x:k1 y:k2 z:k3
	# one at a time, from whichever broker has one, until none has
	for k in $(seq 1 30); do
		rc=0
		out=$("$MQ" -n "$NS" get -n 1 q 2>"$T/get.err") || rc=$?
		[ "$rc" = 0 ] || break
		got+=("$out")
	done
	assert_eq "$rc" 1
	assert_eq "$(cat "$T/get.err")" ""
	assert_eq "$(printf '%s\n' "${got[@]}" | sort | tr '\n' ' ')" "a1 a2 a3 a4 b1 b2 b3 k1 k2 k3 n1 n2 "
	run -1 --separate-stderr mq -n "$NS" get q
	assert_eq "$output$stderr" ""
	run -1 mq -n "$NS" get -n 0 q
	# both brokers' groups are at the end
	run -0 mq -s "${ADDR[b1]}" groups --json q
	assert_eq "$(json_eval 'd[0]["lag"]' <<<"$output")" 0
	run -0 mq -s "${ADDR[b2]}" groups --json q
	assert_eq "$(json_eval 'd[0]["lag"]' <<<"$output")" 0
	# peek and tail through -n: a broker that has something
	run -0 mq -n "$NS" peek -n 1 q
	[[ " a1 a2 a3 a4 b1 b2 b3 k1 k2 k3 n1 n2 " == *" $output "* ]]
	run -0 mq -n "$NS" tail -n 1 q
	[ -n "$output" ]
	# ... and past one that has nothing, whichever comes first
	run -0 mq -s "${ADDR[b1]}" create p
	run -0 mq -s "${ADDR[b2]}" put p only-on-b2
	wait_for "[ \$(mq -n '$NS' route p | wc -l) = 2 ]" 5
	for k in 1 2 3 4; do
		run -0 --separate-stderr mq -n "$NS" peek p
		assert_eq "$output$stderr" only-on-b2
		run -0 --separate-stderr mq -n "$NS" tail p
		if [ -z "$output$stderr" ]; then
			tail_bug="mq -n NS tail Q prints nothing (exit 0) for a queue empty on one broker when that broker comes first: tail exits 0 on an empty queue (not 1), so ns_run never asks the next broker"
		else
			assert_eq "$output$stderr" only-on-b2
		fi
	done
	run -0 mq -n "$NS" get p
	assert_eq "$output" only-on-b2
	run -1 mq -n "$NS" get p

	# precedence: -d beats -s beats -n; $MQ_SERVER beats $MQ_NAMESRV; flags beat both
	mkdir -p "$T/local"
	run -0 mq -n "$NS" -d "$T/local" put --print-offsets q local
	assert_eq "$output" 0:0
	# (straight to the broker: no "@BROKER" after the offset)
	run -0 mq -n "$NS" -s "${ADDR[b2]}" put --print-offsets q direct
	[[ "$output" =~ ^0:[0-9]+$ ]]
	MQ_NAMESRV=$NS MQ_SERVER=${ADDR[b2]} run -0 mq put --print-offsets q direct2
	[[ "$output" =~ ^0:[0-9]+$ ]]
	run -0 mq -s "${ADDR[b2]}" tail -n 2 q
	assert_eq "$output" "$(printf 'direct\ndirect2')"
	MQ_SERVER=${ADDR[b2]} run -0 mq -n "$NS" route q
	assert_eq "${#lines[@]}" 2
	MQ_NAMESRV=$NS run -64 mq -s "${ADDR[b2]}" route
	MQ_NAMESRV=$NS run -0 mq -d "$T/local" peek q
	assert_eq "$output" local

	# usage: route without nameservers, -p with -n
	run -64 --separate-stderr mq route
	[[ "$stderr" == "mq: route: route needs nameservers"* ]]
	run -64 mq route q
	run -64 --separate-stderr mq -n "$NS" put -p 0 q x
	[[ "$stderr" == "mq: put: -p names a partition of one broker"* ]]
	MQ_NAMESRV=$NS run -64 mq put -p 1 q x

	# no nameserver answers: 69 with one line, nothing stored
	stop ns1
	stop ns2
	for k in "route" "route q" "put q lost" "get q" "peek q" "stat q" "ls"; do
		run -69 --separate-stderr eval "mq -n '$NS' $k </dev/null"
		assert_eq "$output" ""
		assert_eq "${#stderr_lines[@]}" 1
		[[ "$stderr" == "mq: "*"no nameserver answers ($NS)"* ]]
	done
	run -69 --separate-stderr mq -n "$NS" put q <<<"lost2"
	MQ_NAMESRV=$NS run -69 mq route
	run -0 mq -s "${ADDR[b1]}" peek q
	run ! grep -q lost <<<"$output"
	run -0 mq -s "${ADDR[b2]}" peek q
	run ! grep -q lost <<<"$output"
	# the error says why the last one did not answer
	run -69 --separate-stderr mq -n "${ADDR[ns2]}" route q
	assert_eq "$stderr" "mq: route: no nameserver answers (${ADDR[ns2]}): cannot connect to server '${ADDR[ns2]}': Connection refused"
	[ -z "$tail_bug" ] || skip "BUG: $tail_bug"
}
