"""requirements.lock pins the whole dependency closure of moe-distill[test], and make install / make bundle
use it: so two installs a month apart are the same."""
from __future__ import annotations

from pathlib import Path

from pipelines.paths import REPO_ROOT
from resources import bundle
from resources.lockfile import LOCK_FILE, canonical, closure, differences, read_lock


def test_the_lock_pins_exactly_what_this_environment_installs() -> None:
    diff = differences()
    assert not diff, ("requirements.lock is out of date (" + "; ".join(diff[:5]) + "): regenerate it with "
                      ".venv/bin/python -m resources.lockfile write")
    locked = read_lock()
    # The closure is transitive: a dependency of a dependency is pinned too.
    assert {"torch", "transformers", "mlflow", "pytest"} <= set(locked)
    assert {"huggingface-hub", "sqlalchemy", "tokenizers"} <= set(locked)
    assert "moe-distill" not in locked and all("+" not in v for v in locked.values())


def test_install_and_bundle_use_the_lock() -> None:
    make = (REPO_ROOT / "Makefile").read_text()
    assert '-c requirements.lock -e ".[test]"' in make and "pyproject.toml requirements.lock" in make
    assert LOCK_FILE == REPO_ROOT / "requirements.lock"
    wheels = bundle._wheel_requirements()
    assert wheels and all(w.partition("==")[2] == read_lock()[canonical(w.partition("==")[0])] for w in wheels)
    assert not any(w.startswith(("torch==", "triton==", "nvidia-")) for w in wheels)  # the GPU image's own


def test_a_changed_pin_is_reported(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    pins = closure()
    pins["numpy"] = "0.0.1"
    pins["left-over"] = "1.0"
    lock.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
    diff = differences(lock)
    assert any(d.startswith("numpy: installed") and "locked 0.0.1" in d for d in diff)
    assert any(d.startswith("left-over: locked 1.0") for d in diff)
