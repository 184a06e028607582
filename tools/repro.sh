#!/usr/bin/env bash
# `make repro`: builds the static binary of the committed HEAD twice, from two fresh clones in
# directories of different names and depths, and compares them byte for byte. Prints the
# SHA-256 a user compares with a release's. Uncommitted changes are not part of either build.
set -euo pipefail
cd "$(dirname "$0")/.."

# Settings that would change the binary or where it is written come from the Makefile and
# Cargo.toml alone.
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS \
    CARGO_INCREMENTAL RUSTFLAGS
for var in $(env | sed -n 's/^\(CARGO_PROFILE_[A-Z_]*\)=.*/\1/p'); do unset "$var"; done
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "note: uncommitted changes are not in these builds; they build HEAD" >&2
fi
commit=$(git rev-parse HEAD)
work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-repro.XXXXXX")
trap 'rm -rf "$work"' EXIT
a="$work/a/sluice"
b="$work/second/checkout/of/sluice-$commit"
for dir in "$a" "$b"; do
    mkdir -p "$(dirname "$dir")"
    git clone -q --no-local "$PWD" "$dir"
    git -C "$dir" checkout -q "$commit"
    echo "== make static in $dir"
    make -s -C "$dir" static >/dev/null
done
host=$(rustc -vV | sed -n 's/^host: //p')
sum_a=$(sha256sum "$a/target/$host/release/sluice" | cut -d' ' -f1)
sum_b=$(sha256sum "$b/target/$host/release/sluice" | cut -d' ' -f1)
size=$(stat -c %s "$a/target/$host/release/sluice")
echo "commit $commit, $host, $size bytes"
echo "$sum_a  $a/target/$host/release/sluice"
echo "$sum_b  $b/target/$host/release/sluice"
# Neither the checkout's place nor cargo's may show in the binary: then neither can matter.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
for path in "$a" "$b" "$cargo_home" "$PWD"; do
    if grep -qaF "$path" "$a/target/$host/release/sluice"; then
        echo "NOT reproducible elsewhere: the binary holds the path $path" >&2
        exit 1
    fi
done
if [ "$sum_a" != "$sum_b" ]; then
    echo "NOT reproducible: the two builds differ" >&2
    cmp -l "$a/target/$host/release/sluice" "$b/target/$host/release/sluice" | head -5 >&2 || true
    exit 1
fi
echo "reproducible: both builds are byte-identical (sha256 $sum_a)"
