"""The teacher on our fused MoE kernels (kernels/hf_moe.py) wherever it runs forwards on GPU: the logits stage,
online and on-policy distillation, the latency stage. One place decides, so each of them reports the same way
which path ran."""
from __future__ import annotations

from typing import Any

import torch

from teachers.load import is_moe


def use_fused_kernels(teacher: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    """Switch a loaded MoE teacher to the fused kernels when on GPU, in place -> {"experts_implementation":
    "fused_triton" | "stock", and "reason" when a model the kernels do not take keeps transformers' path}."""
    if device.type != "cuda" or not is_moe(teacher.config):
        return {"experts_implementation": "stock"}
    from kernels.hf_moe import enable_fused_moe

    try:
        return enable_fused_moe(teacher)
    except ValueError as e:  # an unsupported model keeps transformers' own path; say why
        return {"experts_implementation": "stock", "reason": str(e)}
