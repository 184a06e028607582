#!/usr/bin/env bash
# `make audit`: the dependency policy (deny.toml for the binary's crates, deny-dev.toml for
# what is built but not shipped), security advisories where their database can be reached,
# and the inventory of every `unsafe`. Exits non-zero on the first policy that fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# The policy tool itself is pinned (installing it needs rustc 1.88 or newer).
DENY_VERSION=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $DENY_VERSION" ]; then
    echo "== installing cargo-deny $DENY_VERSION"
    cargo install --locked "cargo-deny@$DENY_VERSION"
fi
# Every lock file is committed, and the checks use it as it is: a change upstream cannot
# change the verdict of a given commit.
DENY="cargo deny --locked --log-level warn"

echo "== runtime crates (deny.toml): bans licenses sources"
$DENY --config deny.toml check bans licenses sources
echo "== everything else built (deny-dev.toml): licenses sources"
# The crate's dev-dependencies, and the bench and fuzz crates beside it (not shipped either).
for manifest in Cargo.toml bench/Cargo.toml fuzz/Cargo.toml; do
    echo "-- $manifest"
    $DENY --manifest-path "$manifest" --config deny-dev.toml check licenses sources
done

echo "== advisories (RustSec database)"
# The database is a git repository on github.com; machines that cannot reach it (this
# project's CI among them) cannot check advisories, and say so rather than pass silently.
# A copy fetched earlier (cargo-deny keeps it under $CARGO_HOME/advisory-dbs) is used when
# the fetch fails; cargo-deny refuses one older than 90 days.
set +e
out=$(timeout 120 $DENY --config deny.toml check advisories 2>&1)
rc=$?
if [ $rc -ne 0 ] && { [ $rc -eq 124 ] || grep -q "failed to fetch advisory database" <<<"$out"; }; then
    if ls -d "${CARGO_HOME:-$HOME/.cargo}"/advisory-dbs/*/.git >/dev/null 2>&1; then
        echo "the database cannot be fetched; checking against the copy fetched earlier"
        out=$($DENY --config deny.toml check --disable-fetch advisories 2>&1)
        rc=$?
    else
        rc=unreachable
    fi
fi
set -e
case $rc in
    0) echo "advisories ok" ;;
    unreachable)
        echo "advisories NOT CHECKED: the RustSec database (github.com/RustSec/advisory-db) cannot be"
        echo "reached from this machine and no copy was fetched before; run 'make audit' where it can"
        ;;
    *)
        echo "$out"
        exit "$rc"
        ;;
esac

echo "== unsafe inventory"
python3 tools/unsafe_inventory.py
