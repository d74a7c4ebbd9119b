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


def test_the_moe_grid_is_made_by_rule_within_its_budgets() -> None:
    """bench.moe_grid: the anchors first (the DeepSeek-V3 and 60-expert cases of the issue among them), then
    shapes drawn by a seeded rule: the same every run, distinct, covering each axis, under the weight budget."""
    from bench.moe_grid import ANCHORS, WEIGHT_BUDGET, grid

    shapes = grid(24)
    assert shapes == grid(24) and shapes[:len(ANCHORS)] == ANCHORS and len(shapes) == len(ANCHORS) + 24
    assert len({(s.experts, s.top_k, s.hidden, s.width, s.shared) for s in shapes}) == len(shapes)
    assert all(s.weight_bytes() <= WEIGHT_BUDGET and 1 <= s.top_k <= s.experts for s in shapes)
    assert {s.shared for s in shapes} == {"none", "gated", "ungated"}
    assert max(s.experts for s in shapes) == 384 and max(s.hidden for s in shapes) == 7168
    ds = next(s for s in shapes if s.name == "deepseek-v3")
    assert (ds.experts, ds.top_k, ds.hidden, ds.width, ds.groups) == (256, 8, 7168, 2048, 8)
