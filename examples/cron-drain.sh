#!/bin/sh
# cron-drain.sh - drain a job queue from cron, one message at a time.
#
# A real crontab line would be:
#
#	*/5 * * * * /path/cron-drain.sh
#
# Every run takes the jobs the group "mailer" has not seen yet, hands each
# to handle(), and stops when the queue is empty (mq get exits 1).  At its
# core it is
#
#	while msg=$(mq get jobs -g mailer); do handle "$msg" || break; done
#
# plus telling "empty" (1) from a real error and keeping failed jobs.  Runs
# that overlap are safe: two drains of one group never get the same
# message (mq locks the group's partition while it hands one out).
#
# mq get commits a message once it has written it out, so by the time
# handle() runs the message is consumed.  A job that fails is therefore
# put on QUEUE.dlq (an ordinary queue: inspect it with `mq peek jobs.dlq`,
# replay it with `mq move jobs.dlq jobs`), and the run stops
# there with exit 1 so that cron mails the error; the next run goes on
# with the rest.
#
# Environment: MQ (default mq), MQ_SPOOL (default: mq's), QUEUE (jobs),
# GROUP (mailer).
set -u

MQ=${MQ:-mq}
QUEUE=${QUEUE:-jobs}
GROUP=${GROUP:-mailer}

# The work: here, "send" a mail to the address in the job.  A job that is
# not an address fails, to show what happens then.
handle() {
	case $1 in
	*@*) printf 'mailed %s\n' "$1" ;;
	*) printf 'cannot mail %s: not an address\n' "$1" >&2; return 1 ;;
	esac
}

n=0
while :; do
	status=0
	msg=$("$MQ" get "$QUEUE" -g "$GROUP") || status=$?
	case $status in
	0) ;;
	1) break ;;                # nothing left: done
	*) exit "$status" ;;       # mq said why on stderr (no such queue, I/O ...)
	esac
	if ! handle "$msg"; then
		printf '%s\n' "$msg" | "$MQ" put "$QUEUE.dlq" || exit
		printf 'moved the failed job to %s.dlq after %d done\n' "$QUEUE" "$n" >&2
		exit 1
	fi
	n=$((n + 1))
done
printf 'drained %d jobs\n' "$n"
