#!/usr/bin/env python3
"""Writes or checks the CycloneDX bill of materials of the sluice binary's runtime crates.

  tools/sbom.py write FILE   the crates of `cargo tree -e normal` for the build target, with
                             their versions and licenses (as cargo reads them from each crate's
                             manifest) and the SHA-256 checksums that Cargo.lock pins
  tools/sbom.py check FILE   FILE is well-formed CycloneDX JSON and lists exactly those crates

The file holds no timestamp and no path, so one commit always gives the same bill.
"""

import hashlib
import json
import os
import pathlib
import subprocess
import re
import sys
import uuid

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = "1.5"


def target():
    host = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    default = next(l.split(": ", 1)[1] for l in host.splitlines() if l.startswith("host: "))
    return os.environ.get("SBOM_TARGET", default)


def tree():
    """(depth, name, version, license) for each line of the runtime dependency tree."""
    out = subprocess.run(
        ["cargo", "tree", "-e", "normal", "--no-dedupe", "--prefix", "depth", "--locked",
         "--target", target(), "-f", "{p}|{l}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    rows = []
    for line in out.splitlines():
        digits = len(line) - len(line.lstrip("0123456789"))
        depth, rest = int(line[:digits]), line[digits:]
        package, license_ = rest.split("|", 1)
        name, version = package.split(" ")[:2]
        rows.append((depth, name, version.lstrip("v"), license_.strip()))
    return rows


def checksums():
    """(name, version) -> checksum, from Cargo.lock's [[package]] entries (read by hand: the
    format is fixed and tomllib needs Python 3.11)."""
    text = (ROOT / "Cargo.lock").read_text(encoding="utf-8")
    sums = {}
    for block in text.split("[[package]]")[1:]:
        fields = dict(re.findall(r'^(name|version|checksum) = "([^"]*)"', block, re.M))
        if "name" in fields and "version" in fields:
            sums[(fields["name"], fields["version"])] = fields.get("checksum")
    return sums


def ref(name, version):
    return f"pkg:cargo/{name}@{version}"


def licenses(expression):
    if not expression:
        return []
    if " " in expression:
        return [{"expression": expression}]
    if re.fullmatch(r"[A-Za-z0-9.+-]+", expression) and not expression.startswith("LicenseRef"):
        return [{"license": {"id": expression}}]
    # An old-style "MIT/Apache-2.0" or a LicenseRef is no SPDX id: keep it as a name.
    return [{"license": {"name": expression}}]


def build():
    rows = tree()
    sums = checksums()
    root = rows[0]
    crates = {}
    edges = {}
    stack = []
    for depth, name, version, license_ in rows:
        key = ref(name, version)
        del stack[depth:]
        if stack:
            edges.setdefault(stack[-1], set()).add(key)
        stack.append(key)
        edges.setdefault(key, set())
        if depth > 0:
            crates[key] = (name, version, license_)
    components = []
    for key in sorted(crates):
        name, version, license_ = crates[key]
        component = {
            "type": "library",
            "bom-ref": key,
            "name": name,
            "version": version,
            "purl": key,
            "licenses": licenses(license_),
        }
        checksum = sums.get((name, version))
        if checksum:
            component["hashes"] = [{"alg": "SHA-256", "content": checksum}]
        components.append(component)
    lock_digest = hashlib.sha256(
        (ROOT / "Cargo.lock").read_bytes() + target().encode()).digest()
    top = ref(root[1], root[2])
    return {
        "bomFormat": "CycloneDX",
        "specVersion": SPEC,
        # Derived from the lock file and the target, so the same inputs give the same bill.
        "serialNumber": "urn:uuid:" + str(uuid.UUID(bytes=lock_digest[:16], version=5)),
        "version": 1,
        "metadata": {
            "component": {
                "type": "application",
                "bom-ref": top,
                "name": root[1],
                "version": root[2],
                "purl": top,
                "licenses": licenses(root[3]),
            },
            "properties": [{"name": "sluice:target", "value": target()}],
        },
        "components": components,
        "dependencies": [
            {"ref": key, "dependsOn": sorted(deps)} for key, deps in sorted(edges.items())
        ],
    }


def check(path):
    """Errors in the bill at `path`, as a list of strings (empty when it is right)."""
    try:
        bom = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"{path}: not readable JSON: {e}"]
    errors = []
    for field, want in [("bomFormat", "CycloneDX"), ("specVersion", SPEC), ("version", 1)]:
        if bom.get(field) != want:
            errors.append(f"{field} is {bom.get(field)!r}, not {want!r}")
    if not str(bom.get("serialNumber", "")).startswith("urn:uuid:"):
        errors.append("serialNumber is not a urn:uuid")
    if bom.get("metadata", {}).get("component", {}).get("name") != "sluice":
        errors.append("metadata.component is not sluice")
    listed = set()
    for c in bom.get("components", []):
        for field in ["type", "bom-ref", "name", "version", "purl", "licenses"]:
            if not c.get(field):
                errors.append(f"component {c.get('name')!r} has no {field}")
        if not any(h.get("alg") == "SHA-256" and len(h.get("content", "")) == 64
                   for h in c.get("hashes", [])):
            errors.append(f"component {c.get('name')!r} has no SHA-256 checksum")
        listed.add((c.get("name"), c.get("version")))
    wanted = {(name, version) for depth, name, version, _ in tree() if depth > 0}
    for name, version in sorted(wanted - listed):
        errors.append(f"{name} {version} is a runtime crate but is not listed")
    for name, version in sorted(listed - wanted):
        errors.append(f"{name} {version} is listed but is not a runtime crate")
    refs = {c.get("bom-ref") for c in bom.get("components", [])}
    refs.add(bom.get("metadata", {}).get("component", {}).get("bom-ref"))
    for d in bom.get("dependencies", []):
        for r in [d.get("ref")] + d.get("dependsOn", []):
            if r not in refs:
                errors.append(f"dependency names {r!r}, which is not a component")
    return errors + schema_errors(path)


def schema_errors(path):
    """The official CycloneDX JSON schema's verdict, where cyclonedx-python-lib is installed."""
    try:
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator
    except ImportError:
        print("schema not checked: pip install 'cyclonedx-python-lib[json-validation]' for it")
        return []
    found = JsonStrictValidator(SchemaVersion.V1_5).validate_str(
        pathlib.Path(path).read_text(encoding="utf-8"))
    if found is None:
        print("valid against the CycloneDX 1.5 JSON schema (strict)")
        return []
    return [f"CycloneDX schema: {found}"]


def main(argv):
    if len(argv) != 3 or argv[1] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "write":
        text = json.dumps(build(), indent=2) + "\n"
        pathlib.Path(argv[2]).write_text(text, encoding="utf-8")
        print(f"wrote {argv[2]}: {len(json.loads(text)['components'])} runtime crates")
        return 0
    errors = check(argv[2])
    for e in errors:
        print(f"error: {argv[2]}: {e}", file=sys.stderr)
    if not errors:
        print(f"{argv[2]}: CycloneDX {SPEC}, lists exactly the crates of `cargo tree -e normal`")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
