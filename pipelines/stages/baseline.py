"""Stage `baseline` (baseline.enabled): the distill stage's student, data and steps on plain cross-entropy, the
teacher taken out; the report's retained gain is measured against it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pipelines.context import RunContext
from pipelines.stages.distill import train_student_stage


def baseline_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """The distill stage's run with the teacher taken out: cross-entropy only, cached data order and budget."""
    dcfg = dataclasses.replace(ctx.cfg.distill, kd_weight=0.0, ce_weight=1.0, teacher_mode="cache",
                               hidden_weight=0.0, layer_weight=0.0, on_policy_rate=0.0)
    return train_student_stage(ctx, out, dcfg, "baseline_train", "baseline", log_model=False)
