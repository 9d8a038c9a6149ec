#!/usr/bin/env python3
"""Writes the SPDX 2.3 (JSON) SBOM of a loopguard image from what went into it.

    hack/release/sbom.py --cargo-lock Cargo.lock --dpkg-status STATUS --image REF@DIGEST \
        --version VERSION --created 2026-12-01T00:00:00Z > sbom.spdx.json

Every crate of Cargo.lock (the loopguard binary is built from it with --locked) and every Debian
package the image's dpkg status lists as installed becomes an SPDX package with its purl. The same
inputs give the same bytes: no clock is read (--created comes from the release's commit), and the
document namespace is derived from the image digest.
"""

import argparse
import json
import re
import sys
import tomllib
from urllib.parse import quote


def fail(message):
    print(f"sbom: {message}", file=sys.stderr)
    sys.exit(2)


def spdx_id(kind, name, version):
    # SPDXRef- ids allow letters, digits, '.' and '-' only.
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]", "-", f"{kind}-{name}-{version}")


def package(spdxid, name, version, purl):
    """An SPDX package known by name, version and purl only (no files analysed, licenses not asserted)."""
    return {
        "name": name,
        "SPDXID": spdxid,
        "versionInfo": version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "externalRefs": [
            {"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": purl}
        ],
    }


def crates(lock_path):
    try:
        with open(lock_path, "rb") as f:
            lock = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        fail(f"cannot read {lock_path}: {e}")
    packages = lock.get("package") or fail(f"{lock_path} lists no [[package]]")
    out = []
    for p in packages:
        name, version = p["name"], p["version"]
        # Where a crate came from is its purl (pkg:cargo names the default registry) and checksum.
        entry = package(spdx_id("crate", name, version), name, version,
                        f"pkg:cargo/{quote(name)}@{quote(version)}")
        if p.get("checksum"):
            entry["checksums"] = [{"algorithm": "SHA256", "checksumValue": p["checksum"]}]
        out.append(entry)
    return out


def debian_packages(status_path):
    try:
        with open(status_path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read {status_path}: {e}")
    out = []
    for stanza in text.strip().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue  # a continuation line of a multi-line field
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if not fields.get("Status", "").endswith(" installed"):
            continue
        name, version, arch = fields["Package"], fields["Version"], fields.get("Architecture", "")
        purl = f"pkg:deb/debian/{quote(name)}@{quote(version)}" + (f"?arch={arch}" if arch else "")
        entry = package(spdx_id("deb", name, version), name, version, purl)
        entry["supplier"] = "Organization: Debian"
        out.append(entry)
    if not out:
        fail(f"{status_path} lists no installed package: is it an image's var/lib/dpkg/status?")
    return sorted(out, key=lambda p: p["name"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cargo-lock", required=True)
    parser.add_argument("--dpkg-status", required=True)
    parser.add_argument("--image", required=True, help="the image as REPOSITORY@sha256:...")
    parser.add_argument("--version", required=True)
    parser.add_argument("--created", required=True, help="RFC 3339 UTC time (the commit's)")
    args = parser.parse_args()
    if "@sha256:" not in args.image:
        fail(f"--image {args.image!r} names no digest: give REPOSITORY@sha256:...")
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", args.created):
        fail(f"--created {args.created!r} is not a UTC time like 2026-12-01T00:00:00Z")
    digest = args.image.split("@", 1)[1]

    image = {
        "name": "loopguard",
        "SPDXID": "SPDXRef-image",
        "versionInfo": args.version,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": False,
        "primaryPackagePurpose": "CONTAINER",
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "Apache-2.0",
        "copyrightText": "NOASSERTION",
        "checksums": [{"algorithm": "SHA256", "checksumValue": digest.split(":", 1)[1]}],
        "externalRefs": [
            {
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": f"pkg:oci/loopguard@{quote(digest)}",
            }
        ],
    }
    parts = crates(args.cargo_lock) + debian_packages(args.dpkg_status)
    document = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"loopguard-{args.version}",
        "documentNamespace": f"https://loopguard.dev/spdx/loopguard-{args.version}-{digest}",
        "creationInfo": {"created": args.created, "creators": ["Tool: loopguard-hack-release-sbom"]},
        "documentDescribes": ["SPDXRef-image"],
        "packages": [image] + parts,
        "relationships": [
            {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": "SPDXRef-image"}
        ]
        + [
            {"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS", "relatedSpdxElement": p["SPDXID"]}
            for p in parts
        ],
    }
    ids = [p["SPDXID"] for p in document["packages"]]
    if len(ids) != len(set(ids)):
        fail("two packages share an SPDX id")
    json.dump(document, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
