#!/usr/bin/env python3
"""Lists every `unsafe` in the tree, with the `// SAFETY:` line that justifies it.

Fails (exit 1) when an `unsafe` has no `// SAFETY:` comment in the comment block just above
the statement it is in, when it lives outside the one file its crate allows (src/sys.rs for
sluice itself: src/, tests/, build.rs; bench/src/sys.rs for the bench), or when a tracked .rs
file belongs to no part this script knows (so new code cannot go unscanned). `make audit` runs
it. The compiler enforces the same place: `#![deny(unsafe_code)]` in each crate root, allowed
only on its `sys` module; this list adds the SAFETY check and covers tests/ and build.rs.
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Where to look, and the one file of each part that may hold unsafe code.
PARTS = [
    (["src/", "tests/", "build.rs"], "src/sys.rs"),
    (["bench/src/"], "bench/src/sys.rs"),
    (["fuzz/fuzz_targets/"], None),
]
WORD = re.compile(r"\bunsafe\b")
# Literals whose text could hide code or fake it: raw strings, char literals ('"' among them),
# then ordinary strings.
RAW = re.compile(r'b?r(#*)".*?"\1')
CHAR = re.compile(r"b?'(?:\\.|[^'\\])'")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# How far above an `unsafe` its statement may begin (a `let x =` broken over lines, a chain).
REACH = 4


def code_of(line):
    """The line without string literals and without its `//` comment."""
    line = RAW.sub('""', line)
    line = CHAR.sub("' '", line)
    line = STRING.sub('""', line)
    cut = line.find("//")
    return line if cut < 0 else line[:cut]


def safety_for(lines, at):
    """The `// SAFETY:` line justifying the unsafe on line index `at`, or None."""
    i = at - 1
    steps = 0
    # Up through the earlier lines of the same statement...
    while i >= 0 and steps < REACH:
        text = lines[i].strip()
        if text.startswith("//") or text.startswith("#["):
            break
        # A statement's end, or an earlier arm or argument with an unsafe of its own.
        if not text or text.endswith((";", "{", "}")) or WORD.search(code_of(text)):
            return None
        i -= 1
        steps += 1
    # ...then through the comment block (and attributes) right above it.
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("// SAFETY:"):
            return text
        if not (text.startswith("//") or text.startswith("#[")):
            return None
        i -= 1
    return None


def tracked():
    """Every .rs file git knows in this tree, relative to it; without git, a walk of it."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "*.rs"],
                             capture_output=True, text=True, check=True).stdout
        return sorted(out.split())
    except (OSError, subprocess.CalledProcessError):
        return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.rs")
                      if "target" not in p.relative_to(ROOT).parts)


def part_of(rel):
    for index, (roots, _) in enumerate(PARTS):
        if any(rel == r or (r.endswith("/") and rel.startswith(r)) for r in roots):
            return index
    return None


def main():
    failures = []
    counts = []
    by_part = {index: [] for index in range(len(PARTS))}
    for rel in tracked():
        index = part_of(rel)
        if index is None:
            failures.append(f"{rel}: in no part the unsafe inventory scans (add it to PARTS)")
        else:
            by_part[index].append(rel)
    for index, (roots, allowed) in enumerate(PARTS):
        found = 0
        for rel in by_part[index]:
            lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
            for index, line in enumerate(lines):
                if not WORD.search(code_of(line)):
                    continue
                found += 1
                where = f"{rel}:{index + 1}"
                safety = safety_for(lines, index)
                print(f"{where}: {safety or 'NO SAFETY COMMENT'}")
                if safety is None:
                    failures.append(f"{where}: unsafe without a // SAFETY: comment above it")
                if rel != allowed:
                    failures.append(f"{where}: unsafe outside {allowed or 'the files that allow it'}")
        counts.append(f"{found} in {' '.join(roots)}")
    print(f"unsafe inventory: {', '.join(counts)}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
