#!/usr/bin/env bash
# `make audit`: the dependency policy (deny.toml for the binary's crates, deny-dev.toml for
# what is built but not shipped), security advisories where their database can be reached,
# and the inventory of every `unsafe`. Exits non-zero on the first policy that fails.
set -euo pipefail
cd "$(dirname "$0")/.."

DENY_VERSION=0.20.2
if ! cargo deny --version >/dev/null 2>&1; then
    echo "== installing cargo-deny $DENY_VERSION"
    cargo install --locked "cargo-deny@$DENY_VERSION"
fi

echo "== runtime crates (deny.toml): bans licenses sources"
cargo deny --log-level warn --config deny.toml check bans licenses sources
echo "== everything else built (deny-dev.toml): licenses sources"
# The crate's dev-dependencies, and the bench and fuzz crates beside it (not shipped either).
for manifest in Cargo.toml bench/Cargo.toml fuzz/Cargo.toml; do
    echo "-- $manifest"
    cargo deny --log-level warn --manifest-path "$manifest" --config deny-dev.toml \
        check licenses sources
done

echo "== advisories (RustSec database)"
# The database is a git repository on github.com; machines that cannot reach it (this
# project's CI among them) cannot check advisories, and say so rather than pass silently.
set +e
out=$(timeout 120 cargo deny --config deny.toml check advisories 2>&1)
rc=$?
set -e
if grep -q "failed to fetch advisory database" <<<"$out"; then
    echo "advisories NOT CHECKED: the RustSec database (github.com/RustSec/advisory-db) cannot be"
    echo "reached from this machine; run 'make audit' where it can, or point cargo-deny at a copy"
    echo "(deny.toml [advisories] db-path)"
elif [ $rc -ne 0 ]; then
    echo "$out"
    exit $rc
else
    echo "advisories ok"
fi

echo "== unsafe inventory"
python3 tools/unsafe_inventory.py
