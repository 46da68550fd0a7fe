"""Throughput of the compiled ``security`` streams against ``openssl enc`` on the same file.

    .venv/bin/python bench/crypto.py [--size-mib 1024] [--runs 3]

Both sides read the same page-cached file and write to /dev/null, so the numbers compare the cipher
paths, not the disk. The bench also proves the two agree byte for byte (contract section 1). The last
line is machine-readable: ``RESULT decrypt_vs_openssl=<ratio> encrypt_vs_openssl=<ratio>``.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import security  # noqa: E402  (the compiled module at the repository root, not an installed one)

MIB = 1024 * 1024
CHUNK = MIB
WRITE_CHUNK = 16 * MIB
OPENSSL_BUFSIZE = MIB
TARGET = 0.9


def _chunks(path, offset=0):
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while chunk := f.read(CHUNK):
            yield chunk


def _drain(stream, sink):
    for out in stream:
        sink.write(out)


def _best_seconds(runs, actions):
    """Best time of each action; runs are interleaved so a load spike on the host hits both sides alike."""
    best = [float("inf")] * len(actions)
    for _ in range(runs):
        for i, action in enumerate(actions):
            start = time.perf_counter()
            action()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _openssl_argv(key, iv, src, dst, decrypt, bufsize):
    argv = ["openssl", "enc", "-aes-256-cbc"] + (["-d"] if decrypt else [])
    argv += ["-K", key.hex(), "-iv", iv.hex(), "-in", str(src), "-out", str(dst)]
    return argv + (["-bufsize", str(bufsize)] if bufsize else [])


def _openssl_bufsize(key, iv, probe):
    """-bufsize when this openssl takes it; otherwise its default (8 KiB in the 1.1/3.x CLI)."""
    argv = _openssl_argv(key, iv, probe, os.devnull, False, OPENSSL_BUFSIZE)
    ok = subprocess.run(argv, capture_output=True, timeout=60, check=False).returncode == 0
    return OPENSSL_BUFSIZE if ok else 0


def _run_openssl(argv, stdout=None):
    subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, timeout=3600, check=True)


def _write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(WRITE_CHUNK, left)
            f.write(os.urandom(n))
            left -= n


def _digest(chunks):
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def _warm(*paths):
    for path in paths:
        for _ in _chunks(path):
            pass


def _mbps(size, seconds):
    return size / seconds / 1e6


def run(size, runs, workdir):
    key, iv = os.urandom(32), os.urandom(16)
    plain, cipher, blob = workdir / "plain.bin", workdir / "cipher.bin", workdir / "blob.bin"
    _write_random(plain, size)
    bufsize = _openssl_bufsize(key, iv, plain)
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False).stdout
    buffer = f"-bufsize {bufsize}" if bufsize else "its default (8 KiB)"
    print(f"openssl: {version.strip()}; enc buffer: {buffer}")
    print(f"security: chunks of {CHUNK} bytes; size {size} bytes; best of {runs}; MB = 10^6 bytes")

    # The reference ciphertext, and the blob = IV || ciphertext that the loader stores.
    _run_openssl(_openssl_argv(key, iv, plain, cipher, False, bufsize))
    with open(blob, "wb") as out, open(cipher, "rb") as src:
        out.write(iv)
        shutil.copyfileobj(src, out, WRITE_CHUNK)
    _warm(plain, cipher, blob)

    if _digest(security.encrypt_stream(key, _chunks(plain), iv=iv)) != _digest(_chunks(blob)):
        raise SystemExit("FAIL: security.encrypt_stream differs from openssl enc for the same key and IV")
    if _digest(security.decrypt_stream(key, _chunks(blob))) != _digest(_chunks(plain)):
        raise SystemExit("FAIL: security.decrypt_stream does not give back the plaintext")
    print("correctness: security ciphertext == openssl ciphertext; decrypt round-trips")

    enc_argv = _openssl_argv(key, iv, plain, os.devnull, False, bufsize)
    dec_argv = _openssl_argv(key, iv, cipher, os.devnull, True, bufsize)
    with open(os.devnull, "wb", buffering=0) as null:
        enc_ours, enc_ssl, dec_ours, dec_ssl = _best_seconds(
            runs,
            [
                lambda: _drain(security.encrypt_stream(key, _chunks(plain)), null),
                lambda: _run_openssl(enc_argv),
                lambda: _drain(security.decrypt_stream(key, _chunks(blob)), null),
                lambda: _run_openssl(dec_argv),
            ],
        )

    rows = [
        ("encrypt security", enc_ours),
        ("encrypt openssl", enc_ssl),
        ("decrypt security", dec_ours),
        ("decrypt openssl", dec_ssl),
    ]
    for name, seconds in rows:
        print(f"{name:<18} {_mbps(size, seconds):9.1f} MB/s  ({seconds:.3f} s)")
    enc_ratio, dec_ratio = enc_ssl / enc_ours, dec_ssl / dec_ours
    for name, ratio in (("encrypt", enc_ratio), ("decrypt", dec_ratio)):
        verdict = "ok" if ratio >= TARGET else "below"
        print(f"{name} security/openssl = {ratio:.2f} ({verdict}: target {TARGET})")
    print(f"RESULT decrypt_vs_openssl={dec_ratio:.2f} encrypt_vs_openssl={enc_ratio:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the random file (MiB)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement; the best counts")
    args = parser.parse_args()
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is required")
    workdir = Path(tempfile.mkdtemp(prefix="azaion-bench-"))
    try:
        run(args.size_mib * MIB, args.runs, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
