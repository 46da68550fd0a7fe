"""Damage a loader's cache as a device's disk may hold it, for the tests and bench/liveness.py: what the
loader finds there must never reach outside its cache."""

import hashlib
import os
import shutil
from pathlib import Path


def snapshot(root):
    """Every entry below ``root``: its kind, and a file's digest or a link's target."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = ("link", os.readlink(p))
        elif p.is_file():
            out[key] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[key] = ("dir", None)
    return out


def link_folder_outside(folder, outside, name):
    """Move a bucket's cache ``folder`` (holding the cached part of resource ``name``) to ``outside`` and
    leave a symbolic link to it in its place; outside, the part gets a bit flipped, and beside it lie a file
    of someone else's and a leftover .part file. Returns ``snapshot(outside)``: what must stay as it is."""
    folder, outside = Path(folder), Path(outside)
    shutil.move(folder, outside)
    part = outside / (name + ".big")
    raw = bytearray(part.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    part.write_bytes(bytes(raw))
    (outside / "keep.txt").write_bytes(b"not the loader's")
    (outside / f"{name}.big.0123.part").write_bytes(b"not the loader's either")
    folder.symlink_to(outside, target_is_directory=True)
    return snapshot(outside)
