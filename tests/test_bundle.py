"""`make bundle` and its use offline: files cut to the chunk size with checksums, a resource fetched from the
bundle with no registry client run, and a damaged or incomplete bundle named as such."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from resources import fetch as fetch_mod
from resources.bundle import Bundle, BundleError, build
from resources.fetch import FetchError, fetch, provenance

pytestmark = pytest.mark.slow  # downloads a 5 MB resource and a wheel


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    build(out, python="3.12", resources=["wiki"], wheels=["iniconfig==2.1.0"], chunk_mib=1)
    return out


def test_the_bundle_holds_the_resource_and_wheels_in_checked_parts(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["python"] == "3.12" and m["missing_wheels"] == []
    assert m["wheels"] == ["iniconfig-2.1.0-py3-none-any.whl"]
    archive = m["resources"]["wiki"]["path"]
    parts = m["files"][archive]["parts"]
    assert len(parts) >= 4  # ~5 MB in 1 MiB parts
    assert all(p.stat().st_size <= 1024 * 1024 for p in bundle_dir.rglob("*") if p.is_file())
    assert not (bundle_dir / archive).exists()  # only its parts
    assert Bundle.open(bundle_dir).verify() == []
    assert [w.name for w in Bundle.open(bundle_dir).wheels(bundle_dir.parent / "w")] == m["wheels"]


def test_fetch_takes_the_resource_from_the_bundle_without_any_client(bundle_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_: object) -> None:
        raise AssertionError("a registry client was run with DISTILL_BUNDLE set")

    monkeypatch.setattr(fetch_mod, "download", offline)
    monkeypatch.setenv("DISTILL_BUNDLE", str(bundle_dir))
    target = fetch("wiki", cache_dir=tmp_path)
    rec = provenance("wiki", cache_dir=tmp_path)
    assert rec["command"] == ["bundle", str(bundle_dir)]
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert rec["sha256"] == m["files"][m["resources"]["wiki"]["path"]]["sha256"]
    assert any(p.is_file() and p.name != "provenance.json" for p in target.rglob("*"))
    with pytest.raises(FetchError, match="holds no 'moby_dick'"):
        fetch("moby_dick", cache_dir=tmp_path)


def test_a_damaged_part_is_named_and_nothing_is_unpacked(bundle_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    archive = copy / m["resources"]["wiki"]["path"]
    part = archive.with_name(m["files"][m["resources"]["wiki"]["path"]]["parts"][1]["file"])
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    assert Bundle.open(copy).verify() == [f"{part.relative_to(copy)}: missing or damaged"]
    monkeypatch.setenv("DISTILL_BUNDLE", str(copy))
    with pytest.raises(BundleError, match="fails its sha256"):
        fetch("wiki", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "wiki").exists()
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.open(tmp_path / "nowhere")


def test_the_pipeline_names_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from pipelines.config import REPO_ROOT

    env = {**os.environ, "DISTILL_BUNDLE": str(tmp_path), "DISTILL_CACHE": str(tmp_path / "cache"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--preset", "ci", "--runs-dir", str(tmp_path / "runs")],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3
    assert "error (bundle)" in proc.stderr and "make bundle" in proc.stderr


def test_a_venv_made_from_a_venv_python_sees_its_packages(tmp_path: Path) -> None:
    """`make install` from a bundle on an image whose Python is itself a venv (as the GPU image's is): the new
    venv's --system-site-packages would see only the base interpreter, so `link-site` adds this venv's
    packages (here torch, which the base interpreter lacks), behind the new venv's own."""
    import subprocess
    import sys

    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run in the project venv; here they do not")
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    probe = [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__file__)"]
    assert subprocess.run(probe, capture_output=True).returncode != 0  # the base interpreter has no torch
    done = subprocess.run([sys.executable, "-m", "resources.bundle", "link-site", str(venv)], capture_output=True,
                          text=True, check=True)
    assert "also sees" in done.stdout
    found = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert found.startswith(sys.prefix)
