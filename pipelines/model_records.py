"""What the pipeline records of a model: a cheap identity of one it did not write, and its size and class."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from teachers.load import count_parameters


def external_identity(name_or_path: str) -> str:
    """Cheap identity of a model the pipeline did not write: file names, sizes and mtimes, or the hub id."""
    p = Path(name_or_path)
    if not p.is_dir():
        return hashlib.sha256(name_or_path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def model_summary(model: Any, name: str, path: str) -> dict[str, Any]:
    total, active = count_parameters(model)
    return {"name": name, "path": path, "params_total": total, "params_active": active,
            "architecture": type(model).__name__}
