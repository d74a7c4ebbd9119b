"""A full disk is a user's problem to fix, not a traceback: say where, how much is free, and that nothing is lost.

Every writer of long-lived output here (cache shards, manifests, checkpoints) writes to a temporary name and
renames into place, so a write that fails leaves the earlier files intact; `disk_full_guard` removes the
temporary and turns the OSError into a `DiskFullError` that says so.
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from core.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)
# How the same failure reads when a library's native code hit it and raised its own exception type (safetensors'
# SafetensorError: "I/O error: No space left on device (os error 28)"; Rust's and C's texts alike).
_FULL_TEXTS = tuple(f"os error {n}" for n in _FULL) + ("No space left on device", "Disk quota exceeded")


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from) is a full disk or an exceeded quota: an OSError with
    ENOSPC/EDQUOT, or another library's exception saying so."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if any(t in str(e) for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


class DiskFullError(UserError, OSError):
    """No space left (or quota exceeded) while writing pipeline output."""
    kind = "disk"


def free_mib(path: Path) -> float:
    """Free space of the file system holding `path` (or its nearest existing parent), in MiB."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 2**20


@contextmanager
def disk_full_guard(path: Path, what: str, cleanup: Path | None = None) -> Iterator[None]:
    """Run a write of `what` to `path`; on ENOSPC/EDQUOT remove `cleanup` (the temporary) and raise DiskFullError."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        raise disk_full_error(path, f"writing {what} to {path}") from e


def disk_full_error(path: Path, doing: str) -> DiskFullError:
    """The one error a full disk gives: what was being done, and how much space is left where `path` lies."""
    return DiskFullError(errno.ENOSPC, f"disk full while {doing} ({free_mib(path):.0f} MiB free). "
                                       "Everything written before is intact: free some space (or set a runs folder "
                                       "on a larger disk) and rerun the same command to resume.")
