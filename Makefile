# mq - see README.md.  `make demo` and `make check` install what they
# need (apt-get as root, else they print the exact command to run).

PREFIX  ?= /usr/local
DESTDIR ?=
BINDIR   = $(DESTDIR)$(PREFIX)/bin
MANDIR   = $(DESTDIR)$(PREFIX)/share/man

CC      ?= cc
WARN     = -std=c11 -Wall -Wextra -Werror
CFLAGS  ?= -O2 -g
PKGS     = yaml-0.1 zlib
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   = $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lyaml -lz) -pthread
SAN      = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all

BATS_FILES = $(sort $(wildcard tests/*.bats))

.PHONY: all deps plugfs torture demo check check-werror unit bats bats-remote bats-asan lint bench install uninstall clean

all: mq

mq: mq.c mq.h
	$(CC) $(WARN) $(CFLAGS) $(PKG_CFLAGS) -o $@ mq.c $(PKG_LIBS)

# Sanitizer build, and a build with the fault-injecting syscall table.
mq-asan: mq.c mq.h
	$(CC) $(WARN) -O1 -g $(SAN) $(PKG_CFLAGS) -o $@ mq.c $(PKG_LIBS)

mq-fault: mq.c mq.h
	$(CC) $(WARN) -O1 -g -DMQ_FAULTS $(PKG_CFLAGS) -o $@ mq.c $(PKG_LIBS)

tests/unit: tests/unit.c mq.c mq.h
	$(CC) $(WARN) -O1 -g $(SAN) -DMQ_FAULTS $(PKG_CFLAGS) -I. -o $@ tests/unit.c $(PKG_LIBS)

# The engine side of the lease bench (make bench only; mq.c's CLI-only
# statics go unused there).
tests/leasebench: tests/leasebench.c mq.c mq.h
	$(CC) $(WARN) -Wno-unused-function $(CFLAGS) $(PKG_CFLAGS) -I. -o $@ tests/leasebench.c $(PKG_LIBS)

# A client of mq serve that knows only the wire protocol (make bench).
tests/netbench: tests/netbench.c
	$(CC) $(WARN) $(CFLAGS) -o $@ tests/netbench.c

# The power-loss file system of tests/powerloss.bats (libfuse3).  Built
# when libfuse3's development files are there (make deps installs them);
# without them tests/powerloss.bats skips and says why.
tests/plugfs: tests/plugfs.c
	$(CC) $(WARN) $(CFLAGS) $(shell pkg-config --cflags fuse3) -o $@ tests/plugfs.c $(shell pkg-config --libs fuse3)

plugfs:
	@if pkg-config --exists fuse3; then $(MAKE) --no-print-directory tests/plugfs; \
	else echo "mq: libfuse3-dev missing: tests/powerloss.bats will skip (make deps)" >&2; fi

deps:
	@sh tests/deps.sh

demo: deps
	@$(MAKE) --no-print-directory mq
	@sh examples/demo.sh ./mq

# The gate: warnings as errors, unit tests (under ASan+UBSan), the bats
# suite against the normal build and again against the sanitizer build,
# and the man pages through mandoc -Tlint.
check: deps
	@$(MAKE) --no-print-directory check-werror unit lint bats bats-remote bats-asan

check-werror:
	$(CC) $(WARN) -O2 $(PKG_CFLAGS) -fsyntax-only mq.c
	$(CC) $(WARN) -O2 -DMQ_TEST $(PKG_CFLAGS) -fsyntax-only mq.c

unit: tests/unit
	./tests/unit

bats: mq mq-fault plugfs
	MQ=$(CURDIR)/mq MQ_FAULT_BIN=$(CURDIR)/mq-fault bats --jobs 1 $(BATS_FILES)

# The files of the commands that work through a server, again with every
# mq command going through a real mq serve on loopback (MQ_VIA_SERVER=1:
# tests/helper.bash starts one per test and exports MQ_SERVER).
BATS_REMOTE_FILES = $(addprefix tests/,$(addsuffix .bats,cli consume create delay get groups \
	leases locking peek put retention retry stat tags tail))

bats-remote: mq mq-fault
	MQ=$(CURDIR)/mq MQ_FAULT_BIN=$(CURDIR)/mq-fault MQ_VIA_SERVER=1 bats --jobs 1 $(BATS_REMOTE_FILES)

# More plug pulls than make check's: PLUG_ROUNDS per fsync mode.
torture: mq mq-fault plugfs
	MQ=$(CURDIR)/mq MQ_FAULT_BIN=$(CURDIR)/mq-fault PLUG_ROUNDS=$${PLUG_ROUNDS:-100} bats tests/powerloss.bats

bats-asan: mq-asan mq-fault plugfs
	MQ=$(CURDIR)/mq-asan MQ_FAULT_BIN=$(CURDIR)/mq-fault MQ_ASAN=1 bats $(BATS_FILES)

lint:
	mandoc -Tlint -Wwarning man/*.[1-8]

bench: mq tests/leasebench tests/netbench
	@bash tests/bench.sh ./mq ./tests/leasebench
	@bash tests/benchserve.sh ./mq ./tests/netbench

install: mq
	mkdir -p $(BINDIR) $(MANDIR)/man1 $(MANDIR)/man5
	mkdir -p $(MANDIR)/man7
	install -m 0755 mq $(BINDIR)/mq
	install -m 0644 man/mq.1 $(MANDIR)/man1/mq.1
	install -m 0644 man/mq.yaml.5 man/mq-format.5 $(MANDIR)/man5/
	install -m 0644 man/mq-protocol.7 $(MANDIR)/man7/

uninstall:
	rm -f $(BINDIR)/mq $(MANDIR)/man1/mq.1 $(MANDIR)/man5/mq.yaml.5 $(MANDIR)/man5/mq-format.5 \
		$(MANDIR)/man7/mq-protocol.7

clean:
	rm -f mq mq-asan mq-fault tests/unit tests/leasebench tests/netbench tests/plugfs
