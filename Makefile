# sluice: the two commands a newcomer needs are `make run` and `make test`.

CARGO   ?= cargo
PREFIX  ?= /usr/local
CONFIG  ?= conf/sluice.conf
HOST    := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
BIN     := target/release/sluice
STATIC  := target/$(HOST)/release/sluice

.PHONY: all build run test lint static install clean bench bench-compare bench-micro

all: build

build:
	$(CARGO) build --release

run: build
	$(BIN) -c $(CONFIG)

test:
	$(CARGO) test --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

static:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --target $(HOST)
	@echo "static binary: $(STATIC) ($$(stat -c %s $(STATIC)) bytes)"
	@file $(STATIC) 2>/dev/null || true

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)/etc/sluice $(DESTDIR)$(PREFIX)/lib/systemd/system
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/sluice
	test -e $(DESTDIR)/etc/sluice/sluice.conf || install -m 0644 conf/sluice.conf $(DESTDIR)/etc/sluice/sluice.conf
	sed 's|/usr/local/bin/sluice|$(PREFIX)/bin/sluice|g' conf/sluice.service > $(DESTDIR)$(PREFIX)/lib/systemd/system/sluice.service
	chmod 0644 $(DESTDIR)$(PREFIX)/lib/systemd/system/sluice.service

clean:
	$(CARGO) clean

# The bench is its own crate (bench/Cargo.toml, not a workspace member) with its own target dir.
# Extra arguments: make bench BENCH_ARGS="--scenario rr --reps 5"; see bench/README.md.
bench: build
	cd bench && CARGO_TARGET_DIR=$(CURDIR)/bench/target $(CARGO) run --release --bin sluice-bench -- --sluice $(CURDIR)/$(BIN) $(BENCH_ARGS)

bench-compare:
	sh bench/install-compare.sh
	$(MAKE) bench

bench-micro:
	cd bench && CARGO_TARGET_DIR=$(CURDIR)/bench/target $(CARGO) run --release --bin sluice-micro -- $(MICRO_ARGS)
