"""What every stage of one pipeline run shares: the config, the run folder, the device and the stage records."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig


class ConfigView:
    """The config as one stage sees it: only the entries the stage declares (`Stage.config`), which are exactly
    the ones its identity hashes. Reading another is a bug in the stage table, caught the first time it runs."""

    def __init__(self, cfg: PipelineConfig, stage: str, allowed: tuple[str, ...]):
        self._cfg, self._stage, self._allowed = cfg, stage, frozenset(allowed)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in self._allowed:
            return getattr(self._cfg, name)
        raise RuntimeError(f"stage {self._stage} reads config entry '{name}', which its entry in "
                           f"pipelines/stage_table.py does not list (config={tuple(sorted(self._allowed))}): add it "
                           "there, so that changing it reruns the stage")


@dataclass
class RunContext:
    cfg: Any  # PipelineConfig, or a stage's ConfigView of it
    run_dir: Path
    device: torch.device
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its stage.json

    @property
    def dtype(self) -> torch.dtype:
        # bf16 on GPU (tensor cores); fp32 on CPU, where bf16 matmuls are slow and lose precision for nothing.
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def for_stage(self, stage: str, allowed: tuple[str, ...]) -> RunContext:
        """The same run seen by one stage: its config restricted to `allowed` (records stay shared)."""
        return dataclasses.replace(self, cfg=ConfigView(self.cfg, stage, allowed))

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def output(self, stage: str, key: str) -> Any:
        return self.records[stage]["outputs"][key]
