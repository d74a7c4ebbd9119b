"""`requirements.lock`: every package the project installs, direct or transitive, at one version.

pyproject.toml pins the direct dependencies; their own dependencies float, so two installs a month apart
could differ. The lock file pins the whole closure of `moe-distill[test]` as installed in a working
environment. `make install` passes it to pip as constraints (`-c`), so the set of packages is still decided by
pyproject.toml and each version by the lock; `make bundle` downloads exactly the locked wheels.

    python -m resources.lockfile write    # after changing pyproject.toml, from an environment that works
    python -m resources.lockfile check    # exit 1, naming the packages, when the lock and this environment differ

Local version labels (`torch==2.13.0+cpu`) are dropped: `==2.13.0` matches the CPU and the CUDA build alike,
so the same lock serves a CPU machine and a GPU image.
"""
from __future__ import annotations

import argparse
import re
import sys
from datetime import date
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"
PROJECT = "moe-distill"
EXTRAS = ("test",)


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def closure(root: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of every distribution `root[extras]` needs in this environment
    (markers evaluated here), the root itself excluded. Raises LookupError for a required one not installed."""
    env = default_environment()
    seen: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, want = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise LookupError(f"{name} is required but not installed; run make install") from None
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in (want or ("",))):
                continue
            key = canonical(req.name)
            new_extras = tuple(sorted(req.extras))
            if key in seen and not new_extras:
                continue
            seen[key] = _public(metadata.version(req.name)) if _installed(req.name) else ""
            if not seen[key]:
                raise LookupError(f"{req.name} (needed by {name}) is not installed; run make install")
            todo.append((req.name, new_extras))
    seen.pop(canonical(root), None)
    return seen


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """{canonical name: version} pinned in a lock file (comments and blank lines ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def write_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """Write the closure of this environment as `path` and return it."""
    pins = closure()
    head = (f"# Every package moe-distill[test] installs, pinned ({date.today().isoformat()}, Python "
            f"{sys.version_info.major}.{sys.version_info.minor}).\n"
            "# Regenerate after changing pyproject.toml: .venv/bin/python -m resources.lockfile write\n")
    path.write_text(head + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    return pins


def differences(path: Path = LOCK_FILE) -> list[str]:
    """What differs between the lock file and this environment's closure, one line each (empty: in sync)."""
    have, locked = closure(), read_lock(path)
    out = [f"{n}: installed {have[n]}, locked {locked.get(n, 'not at all')}" for n in sorted(have)
           if locked.get(n) != have[n]]
    out += [f"{n}: locked {locked[n]}, not needed any more" for n in sorted(set(locked) - set(have))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resources.lockfile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("write", "check"))
    ap.add_argument("--path", type=Path, default=LOCK_FILE)
    args = ap.parse_args(argv)
    if args.command == "write":
        print(f"{args.path}: {len(write_lock(args.path))} packages")
        return 0
    diff = differences(args.path)
    for line in diff:
        print(line)
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
