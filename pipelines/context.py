"""What every stage of one pipeline run shares: the config, the run folder, the device and the stage records."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.config import PipelineConfig


@dataclass
class RunContext:
    cfg: PipelineConfig
    run_dir: Path
    device: torch.device
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its stage.json

    @property
    def dtype(self) -> torch.dtype:
        # bf16 on GPU (tensor cores); fp32 on CPU, where bf16 matmuls are slow and lose precision for nothing.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def output(self, stage: str, key: str) -> Any:
        return self.records[stage]["outputs"][key]

