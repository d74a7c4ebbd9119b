"""What a folder holds, as one hash: every file's name, size and sha256, so editing a model in place is seen.

Reading a large teacher's weights for every run would cost minutes, so each file's checksum is cached on disk,
keyed by its absolute path, size, modification time (ns) and inode: a file replaced or rewritten in place
changes at least one of them and is read again; an untouched one is not. The cache is a small JSON file
(`$DISTILL_CACHE/file-hashes.json`, default `~/.cache/moe-distill/`) written atomically; two processes
writing it at once can only lose an entry, which is then recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from core.hashing import file_sha256

_MEMO: dict[str, str] = {}  # this process: stat key -> sha256, so a run hashes each file at most once


def cache_file() -> Path:
    """Where the checksum cache lives: `$DISTILL_CACHE/file-hashes.json` or `~/.cache/moe-distill/...`."""
    root = os.environ.get("DISTILL_CACHE") or str(Path.home() / ".cache" / "moe-distill")
    return Path(root) / "file-hashes.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: everything is recomputed, nothing is wrong


def _store(path: Path, entries: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: identities are still right, only recomputed next time


def file_checksums(files: list[Path]) -> list[str]:
    """sha256 of each file, from the cache where its stat key is unchanged, else read (and cached)."""
    keys = [_stat_key(f) for f in files]
    missing = [k for k in keys if k not in _MEMO]
    if missing:
        disk = _load(cache_file())
        _MEMO.update({k: disk[k] for k in missing if k in disk})
        new = {k: file_sha256(f) for k, f in zip(keys, files) if k not in _MEMO}
        if new:
            _MEMO.update(new)
            # Drop entries of files that changed since (same path, other stat), so the cache does not grow.
            paths = {k.split("|", 1)[0] for k in new}
            kept = {k: v for k, v in disk.items() if k.split("|", 1)[0] not in paths}
            _store(cache_file(), {**kept, **new})
    return [_MEMO[k] for k in keys]


def folder_identity(root: Path) -> str:
    """Content hash (16 hex) of every file under `root`: relative names, sizes and checksums, in a fixed order.
    Hidden files and folders (`.cache/`, `.lock`) are left out: tools write them beside a model."""
    files = sorted(f for f in root.rglob("*")
                   if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts))
    h = hashlib.sha256()
    for f, digest in zip(files, file_checksums(files)):
        h.update(f"{f.relative_to(root).as_posix()}|{f.stat().st_size}|{digest}\0".encode())
    return h.hexdigest()[:16]
