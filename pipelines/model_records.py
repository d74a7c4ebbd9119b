"""What the pipeline records of a model: a cheap identity of one it did not write, and its size and class."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.content_identity import file_checksums, folder_identity
from core.hashing import hash_text
from teachers.load import count_parameters


def external_identity(name_or_path: str) -> str:
    """Identity of a model the pipeline did not write, by content: a local folder's files (names, sizes,
    checksums; see core.content_identity), a local file's checksum (a config.json), or else the name (a hub id)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return folder_identity(p)
    if p.is_file():
        return hash_text(p.name, *file_checksums([p]))
    return hash_text(name_or_path)


def model_summary(model: Any, name: str, path: str) -> dict[str, Any]:
    total, active = count_parameters(model)
    return {"name": name, "path": path, "params_total": total, "params_active": active,
            "architecture": type(model).__name__}
