"""Skip a stage whose inputs have not changed, judged by content hash.

Each stage's folder holds `stage.json`, written last and atomically, with the hash of everything the stage
read (its config sections, the source of the code it ran, its upstream stages' output hashes) and the hash
of what it wrote. A rerun with the same input hash and the outputs still on disk reuses them; anything else
reruns the stage (which resumes from its own partial work where it has any: shards, checkpoints).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"


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
