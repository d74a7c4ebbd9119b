"""JSON that every parser reads: no bare NaN or Infinity (Python writes them, the JSON standard has neither).

A number that could not be computed becomes `null`, and, inside an object, a sibling `<key>_null_reason` says
why, so a reader of the file never has to guess whether null means "zero", "missing" or "undefined".
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping

NULL_SUFFIX = "_null_reason"


def _bad(x: Any) -> bool:
    return isinstance(x, float) and not math.isfinite(x)


def finite_or_null(obj: Any, reasons: Mapping[str, str], default: str = "not a finite number") -> Any:
    """A copy of `obj` with every non-finite float replaced by None; in a dict, `<key>_null_reason` is added
    beside it (from `reasons[key]`, else `default`). Lists get None alone (there is no place for a reason)."""
    if isinstance(obj, dict):
        out: dict[Any, Any] = {}
        for k, v in obj.items():
            if _bad(v):
                out[k] = None
                out.setdefault(f"{k}{NULL_SUFFIX}", reasons.get(str(k), default))
            else:
                out[k] = finite_or_null(v, reasons, default)
        return out
    if isinstance(obj, (list, tuple)):
        return [None if _bad(v) else finite_or_null(v, reasons, default) for v in obj]
    return obj


def dumps_strict(obj: Any, reasons: Mapping[str, str] = {}, indent: int | None = 1) -> str:
    """`json.dumps` of `finite_or_null(obj)`, refusing any NaN left (allow_nan=False); other objects as str."""
    return json.dumps(finite_or_null(obj, reasons), indent=indent, allow_nan=False, default=str)
