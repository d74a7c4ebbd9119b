"""Multi-process generation: which sequences each part writes (part_range) and joining the parts (merge_parts).

Parts are cut at shard boundaries so the merged cache is byte for byte what one writer would produce; this
works on manifests and shard files only, through the helpers in `logit_cache.format`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from logit_cache.format import (
    MANIFEST_NAME,
    SHARD_SUFFIX,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    PackLayout,
    _atomic_write,
    _check_shard,
)


def part_range(num_sequences: int, sequences_per_shard: int, part: int, parts: int) -> tuple[int, int]:
    """Sequences [a, b) that part `part` of `parts` writes (data-parallel generation, one part per process).

    Parts are cut at shard boundaries, so every part but the last holds only full shards and the parts'
    shards are, byte for byte, the shards one writer over all sequences would write.
    """
    shards = -(-num_sequences // sequences_per_shard)
    lo, hi = shards * part // parts, shards * (part + 1) // parts
    return min(lo * sequences_per_shard, num_sequences), min(hi * sequences_per_shard, num_sequences)


def merge_parts(part_roots: list[Path], root: Path) -> dict:
    """Join complete caches of consecutive sequence ranges (cut by `part_range`) into one cache at `root`.

    The result, manifest included, is identical to what one writer over all sequences produces. Shard files
    are hard-linked (copied where the file system cannot link), the manifest is written last, and the parts
    are removed only after it: a kill at any point leaves the parts or a complete cache. Returns the manifest.
    """
    manifests = [json.loads((Path(r) / MANIFEST_NAME).read_text()) for r in part_roots]
    first = manifests[0]
    sps = first["sequences_per_shard"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    total = 0
    for i, (part_root, m) in enumerate(zip(part_roots, manifests)):
        if not m["complete"]:
            raise CacheIncompleteError(f"{part_root}: cache part was not finalized")
        for key in ("format", "version", "meta", "layout", "sequences_per_shard", "record_bytes", "dtypes"):
            if m[key] != first[key]:
                raise CacheMismatchError(f"{part_root}: {key!r} differs from {part_roots[0]}")
        layout = PackLayout(**m["layout"])
        for entry in m["shards"]:
            if entry["num_sequences"] != sps and i < len(part_roots) - 1:
                raise CacheMismatchError(f"{part_root}: a part before the last holds a partial shard")
            why = _check_shard(Path(part_root), entry, layout, m["meta"]["seq_len"], verify=False)
            if why is not None:
                raise CacheCorruptError(f"{part_root}: shard {entry['file']}: {why}")
            name = f"shard_{len(shards):06d}{SHARD_SUFFIX}"
            dst = root / name
            dst.unlink(missing_ok=True)
            try:
                os.link(Path(part_root) / entry["file"], dst)
            except OSError:
                shutil.copyfile(Path(part_root) / entry["file"], dst)
            shards.append({**entry, "file": name, "first_sequence": total})
            total += entry["num_sequences"]
    manifest = {**first, "shards": shards, "complete": True, "total_sequences": total}
    _atomic_write(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    for r in part_roots:
        shutil.rmtree(r, ignore_errors=True)
    return manifest
