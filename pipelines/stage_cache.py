"""Skip a stage whose inputs have not changed, judged by content hash.

Each stage's folder holds `stage.json`, written last and atomically, with the hash of everything the stage
read (its config sections, the source of the code it ran, its upstream stages' output hashes) and the hash
of what it wrote. A rerun with the same input hash and the outputs still on disk reuses them; anything else
reruns the stage (which resumes from its own partial work where it has any: shards, checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipelines.config import REPO_ROOT

STAGE_FILE = "stage.json"


def hash_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def code_hash(*packages: str) -> str:
    """Hash of the Python source of the named project packages or modules (e.g. "teachers", "pipelines/x.py")."""
    h = hashlib.sha256()
    for name in sorted(packages):
        path = REPO_ROOT / name
        files = sorted(f for f in path.rglob("*") if f.suffix in (".py", ".yaml")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(REPO_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def hash_files(root: Path, skip: tuple[str, ...] = (STAGE_FILE,)) -> str:
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


def read_stage(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / STAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from an older, non-atomic version: treat as not done


def is_fresh(stage_dir: Path, input_hash: str) -> dict[str, Any] | None:
    """The stored record if the stage finished with exactly these inputs, else None."""
    rec = read_stage(stage_dir)
    if rec and rec.get("input_hash") == input_hash and rec.get("complete"):
        return rec
    return None


def write_stage(stage_dir: Path, record: dict[str, Any]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".{STAGE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, stage_dir / STAGE_FILE)
