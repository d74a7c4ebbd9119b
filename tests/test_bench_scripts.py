"""Every GPU benchmark imports (so a refactor cannot break one unseen until the next device run) and, on a
machine without a GPU, says so and exits with 2 instead of writing a results file."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "bench").glob("*.py")
                 if p.stem not in ("__init__", "common"))


def test_every_script_is_listed() -> None:
    assert {"moe_layer", "launch_overhead", "kd_loss", "latency", "train_throughput", "preset_probe"} <= set(SCRIPTS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the scripts run for real (device runs)")
@pytest.mark.parametrize("name", SCRIPTS)
def test_script_without_a_gpu_exits_2_and_writes_nothing(name: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"bench.{name}")
    out = tmp_path / "result.csv"
    assert module.main(["--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()
