# sluice: the two commands a newcomer needs are `make run` and `make test`.

CARGO   ?= cargo
PREFIX  ?= /usr/local
CONFIG  ?= conf/sluice.conf
HOST    := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
BIN     := target/release/sluice
STATIC  := target/$(HOST)/release/sluice

.PHONY: all build run test lint static repro audit sbom install clean bench bench-compare bench-micro fuzz chaos soak

all: build

build:
	$(CARGO) build --release

run: build
	$(BIN) -c $(CONFIG)

# The TCP tests run again with every listener on the splice path and on the copy path
# (the default, `splice auto`, copies short exchanges and splices bulk ones).
TCP_TESTS := --test tcp_data --test tcp_faults --test tcp_timeouts --test tcp_limits

test:
	$(CARGO) test --all-targets
	SLUICE_TEST_SPLICE=on $(CARGO) test $(TCP_TESTS)
	SLUICE_TEST_SPLICE=off $(CARGO) test $(TCP_TESTS)

# The long chaos run: CHAOS_CONNECTIONS (default 5000) from CHAOS_SEED (default 1): TCP on the
# copy path, splicing and with the PROXY protocol (tests/chaos.rs), then UDP sessions without
# and with it (tests/chaos_udp.rs). `make test` runs a short variant of each with fixed seeds,
# and the chaos load against a sluice starved of descriptors and buffers.
chaos:
	$(CARGO) test --release --test chaos --test chaos_udp -- --ignored --nocapture

# The soak: as many long-lived connections as the descriptor limit allows (at most 9,000),
# each exchanging a message a second, for SOAK_SECONDS (default 600), with reloads and health
# flips; prints the RSS samples, their slope and the CPU per connection (tests/soak.rs).
soak:
	$(CARGO) test --release --test soak -- --ignored --nocapture

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# The static binary is reproducible: the paths of this checkout and of cargo's registry are
# remapped to fixed names, nothing records the time, and the release profile fixes codegen
# (one codegen unit, fat LTO, stripped). `make repro` builds it twice from two clones and
# compares; README "Verifying a release" says how a user checks a published binary.
CARGO_HOME_DIR := $(or $(CARGO_HOME),$(HOME)/.cargo)
STATIC_RUSTFLAGS := -C target-feature=+crt-static \
	--remap-path-prefix=$(CURDIR)=/build/sluice \
	--remap-path-prefix=$(CARGO_HOME_DIR)=/cargo

static:
	RUSTFLAGS='$(STATIC_RUSTFLAGS)' $(CARGO) build --release --locked --target $(HOST)
	@echo "static binary: $(STATIC) ($$(stat -c %s $(STATIC)) bytes)"
	@sha256sum $(STATIC)
	@file $(STATIC) 2>/dev/null || true

repro:
	tools/repro.sh

# The dependency policy (deny.toml, deny-dev.toml), advisories where their database can be
# reached, and the inventory of every unsafe block.
audit:
	tools/audit.sh

# A CycloneDX bill of materials for the release binary's runtime crates, checked after writing.
SBOM := target/sluice.cdx.json

sbom:
	@mkdir -p target
	python3 tools/sbom.py write $(SBOM)
	python3 tools/sbom.py check $(SBOM)

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

# Fuzzing needs nightly and cargo-fuzz (cargo install cargo-fuzz). Each target runs for
# FUZZ_SECONDS; new inputs that reach new code are added to fuzz/corpus/<target>/, which
# `make test` replays on stable (tests/fuzz_corpus.rs). A crash is saved under
# fuzz/artifacts/<target>/: fix it, then move the file into the corpus so it stays fixed.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := admin_http cidr config dns proxy_protocol sni

fuzz:
	@for t in $(FUZZ_TARGETS); do \
	    echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
	    $(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=16384 || exit 1; \
	done
