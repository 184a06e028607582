#!/usr/bin/env python3
"""Lists every `unsafe` in the tree, with the `// SAFETY:` line that justifies it.

Fails (exit 1) when an `unsafe` has no `// SAFETY:` comment in the comment block just above
the statement it is in, or when it lives outside the one file its crate allows: src/sys.rs for
sluice itself (src/, tests/, build.rs), bench/src/sys.rs for the bench. `make audit` runs it.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Where to look, and the one file of each part that may hold unsafe code.
PARTS = [
    (["src", "tests", "build.rs"], "src/sys.rs"),
    (["bench/src"], "bench/src/sys.rs"),
    (["fuzz/fuzz_targets"], None),
]
WORD = re.compile(r"\bunsafe\b")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
# How far above an `unsafe` its statement may begin (a `let x =` broken over lines, a chain).
REACH = 4


def code_of(line):
    """The line without string literals and without its `//` comment."""
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
        if not text or text.endswith((";", "{", "}")):
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


def files(roots):
    for name in roots:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*.rs") if "target" not in p.parts)


def main():
    failures = []
    counts = []
    for roots, allowed in PARTS:
        found = 0
        for path in files(roots):
            rel = path.relative_to(ROOT).as_posix()
            lines = path.read_text(encoding="utf-8").splitlines()
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
