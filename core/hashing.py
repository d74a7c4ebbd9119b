"""Content hashes: of a few strings (stage identities) and of every file under a folder (stage outputs)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def hash_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def hash_files(root: Path, skip: tuple[str, ...] = ("stage.json",)) -> str:
    """Content hash of every file under `root` (names and bytes), in a fixed order."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(f.relative_to(root))
        if rel in skip or rel.split(os.sep)[0] in skip:
            continue
        h.update(rel.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB blocks (archives, cache shards, bundle parts)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
