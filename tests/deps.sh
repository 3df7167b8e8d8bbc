#!/bin/sh
# Install what building and testing mq needs, on Debian and derivatives:
# with apt-get when root, otherwise print the exact command to run.
missing=""
command -v cc >/dev/null 2>&1 || missing="$missing gcc"
command -v make >/dev/null 2>&1 || missing="$missing make"
command -v pkg-config >/dev/null 2>&1 || missing="$missing pkg-config"
if command -v pkg-config >/dev/null 2>&1; then
	pkg-config --exists yaml-0.1 || missing="$missing libyaml-dev"
	pkg-config --exists zlib || missing="$missing zlib1g-dev"
	# tests/powerloss.bats: tests/plugfs is a libfuse3 file system
	pkg-config --exists fuse3 || missing="$missing libfuse3-dev"
else
	missing="$missing libyaml-dev zlib1g-dev libfuse3-dev"
fi
command -v fusermount3 >/dev/null 2>&1 || missing="$missing fuse3"
command -v bats >/dev/null 2>&1 || missing="$missing bats"
command -v mandoc >/dev/null 2>&1 || missing="$missing mandoc"
# The tests check -f json output with an independent JSON parser.
command -v python3 >/dev/null 2>&1 || missing="$missing python3"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	echo "mq: installing:$missing" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q $missing >/dev/null 2>&1 ||
		{ apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; } || {
		echo "mq: apt-get install$missing failed" >&2
		exit 1
	}
	exit 0
fi
echo "mq: missing packages; run: sudo apt-get install -y$missing" >&2
exit 1
