"""What a publisher's signature costs a load (contract section 9): the check of a signed manifest, from the
envelope's bytes to the parsed manifest, against reading the same manifest unsigned.

    .venv/bin/python bench/signature.py [--runs 2000]

Manifests of a 100 MiB model (25 blocks of 4 MiB), a 5 GiB one (1,280 blocks) and a 20 GiB one (5,120
blocks, the envelope 460 kB). Each figure is the median of ``--runs`` checks in microseconds: the JSON of the
envelope, the Base64 payload, Ed25519 over PAE, the JSON of the payload and the manifest's own checks. The
last line is machine-readable: ``RESULT verify_us_100mib=… verify_us_5gib=… verify_us_20gib=…
added_us_20gib=…``: ``added`` is what the signature adds to reading the same manifest unsigned (most of it
the Base64 of the payload and SHA-512 over it, both linear in the manifest's size).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from manifest import Manifest, SealedParts, document  # noqa: E402  (the compiled modules at the root)
from signing import Publisher, Trust, is_envelope  # noqa: E402

MIB = 1024 * 1024
BLOCK = 4 * MIB
SIZES = {"100mib": 100 * MIB, "5gib": 5 * 1024 * MIB, "20gib": 20 * 1024 * MIB}


def manifest_of(size):
    """The manifest document of a ``size``-byte model: real structure, digests of zero blocks (their values
    cost nothing to check; their number is what costs)."""
    parts = SealedParts()
    parts.set_small(bytes(3072))
    blob = (size // 16 + 1) * 16 + 16
    big = blob - 3072
    parts.big_size = big
    parts.blocks = [bytes(32)] * -(-big // BLOCK)
    doc = parts.document(os.urandom(32), size)
    parts.close()
    return doc


def check(trust, raw):
    """What ModelStore does with a manifest's bytes before the first byte of the model."""
    doc = document(raw, "models/m.bin")
    if is_envelope(doc):
        doc = trust.open(
            doc, "models", "m.bin", "models/m.bin", lambda payload: document(payload, "models/m.bin")
        )
    return Manifest.from_document(doc, "models/m.bin")


def median_us(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    publisher, trust = Publisher(key), Trust([Ed25519PrivateKey.generate().public_key(), key.public_key()])
    results = {}
    for label, size in SIZES.items():
        doc = manifest_of(size)
        signed = publisher.sign(doc, "models", "m.bin")
        plain = json.dumps(doc).encode()
        runs = max(50, args.runs * 25 // len(doc["blocks"])) if len(doc["blocks"]) > 25 else args.runs
        assert check(trust, signed).size == size
        results[f"verify_us_{label}"] = median_us(lambda raw=signed: check(trust, raw), runs)
        results[f"unsigned_us_{label}"] = median_us(lambda raw=plain: check(trust, raw), runs)
        print(
            f"{label}: {len(doc['blocks'])} blocks, envelope {len(signed):,} bytes, manifest {len(plain):,}: "
            f"signed {results[f'verify_us_{label}']:.0f} µs, "
            f"unsigned {results[f'unsigned_us_{label}']:.0f} µs ({runs} runs)"
        )
    results["added_us_20gib"] = results["verify_us_20gib"] - results["unsigned_us_20gib"]
    print(
        "RESULT "
        + " ".join(
            f"{k}={results[k]:.0f}"
            for k in ("verify_us_100mib", "verify_us_5gib", "verify_us_20gib", "added_us_20gib")
        )
    )


if __name__ == "__main__":
    main()
