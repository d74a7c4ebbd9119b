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
    except OSError as e:
        if e.errno not in _FULL or isinstance(e, DiskFullError):
            raise
        if cleanup is not None:
            if cleanup.is_dir():
                shutil.rmtree(cleanup, ignore_errors=True)
            else:
                cleanup.unlink(missing_ok=True)
        raise DiskFullError(e.errno, f"disk full while writing {what} to {path} ({free_mib(path):.0f} MiB free). "
                                     "Everything written before is intact: free some space (or set a runs "
                                     "folder on a larger disk) and rerun the same command to resume.") from e
