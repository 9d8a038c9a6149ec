#!/usr/bin/env python3
"""Writes the SLSA v1 provenance predicate of a loopguard release (cosign attest wraps it in an in-toto
statement whose subject is the image digest).

    hack/release/provenance.py --image REF@DIGEST --chart REF@DIGEST --commit SHA --version V \
        --dockerfile Dockerfile --base-images hack/release/base-images.lock \
        --started T --finished T > provenance.json
"""

import argparse
import hashlib
import json
import os
import re
import socket
import sys


def fail(message):
    print(f"provenance: {message}", file=sys.stderr)
    sys.exit(2)


def sha256_of(path):
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        fail(f"cannot read {path}: {e}")


def base_images(path):
    """Lines `NAME DIGEST` (comments with #): the base images the Dockerfile's FROM lines name."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or not re.fullmatch(r"sha256:[0-9a-f]{64}", parts[1]):
                    fail(f"{path}:{number}: expected `NAME sha256:DIGEST`, got {line!r}")
                out.append({"name": parts[0], "digest": {"sha256": parts[1].split(":", 1)[1]}})
    except OSError as e:
        fail(f"cannot read {path}: {e}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("image", "chart", "commit", "version", "dockerfile", "base-images", "started", "finished"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args()
    for name in ("image", "chart"):
        if "@sha256:" not in getattr(args, name):
            fail(f"--{name} names no digest: give REPOSITORY@sha256:...")
    if not re.fullmatch(r"[0-9a-f]{40}", args.commit):
        fail(f"--commit {args.commit!r} is not a full git commit id")

    predicate = {
        "buildDefinition": {
            "buildType": "https://loopguard.dev/release/hack-release-sh/v1",
            "externalParameters": {
                "version": args.version,
                "source": {"uri": "git+loopguard", "digest": {"gitCommit": args.commit}},
                "dockerfile": "Dockerfile",
            },
            "resolvedDependencies": [
                {"uri": "git+loopguard", "digest": {"gitCommit": args.commit}},
                {"name": "Dockerfile", "digest": {"sha256": sha256_of(args.dockerfile)}},
                {"name": "Cargo.lock", "digest": {"sha256": sha256_of("Cargo.lock")}},
            ]
            + base_images(args.base_images),
        },
        "runDetails": {
            "builder": {"id": f"hack/release.sh on {socket.gethostname()}"},
            "metadata": {
                "invocationId": f"{args.version}-{args.commit[:12]}-{os.getpid()}",
                "startedOn": args.started,
                "finishedOn": args.finished,
            },
            "byproducts": [{"name": "chart", "uri": f"oci://{args.chart.split('@')[0]}", "digest": {"sha256": args.chart.split(":")[-1]}}],
        },
    }
    json.dump(predicate, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
