"""How fast training runs, in the terms people compare: tokens/s, model FLOPs utilisation, peak memory.

MFU follows the PaLM appendix: model FLOPs per token = 6 N + 12 L H S for a dense decoder with N
parameters in its matmuls (embeddings excluded, output layer included), L layers, width H, sequence S;
the attention term counts QK^T and AV, forward and backward, without causal halving. A frozen weight
(LoRA) costs 4 instead of 6 per parameter: no weight gradient. The peak is the GPU's dense bf16 rate from
its datasheet; on CPU there is no meaningful peak and MFU is not reported.
"""
from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 tensor-core FLOP/s by device name fragment (datasheet, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 NVL": 835e12,
             "H100 PCIe": 756e12, "H100": 756e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():  # dict order: the more specific names first
        if key in name:
            return value
    return None


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters in matmuls, of which trainable): every >= 2-D weight except input embeddings."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied_head = out is not None and any(id(p) in skip for p in out.parameters())
    total = trainable = 0
    for p in model.parameters():
        if p.dim() < 2 or id(p) in skip:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if tied_head:  # the tied output layer is a matmul even though its weight is the embedding
        n = out.weight.numel()
        total += n
        trainable += n if out.weight.requires_grad else 0
    return total, trainable


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Model FLOPs for one training token (forward + backward) at sequence length `seq_len`."""
    total, trainable = matmul_params(model)
    cfg = model.config
    layers = getattr(cfg, "num_hidden_layers", 0)
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    width = heads * head_dim  # attention width, which differs from hidden_size in e.g. Qwen3
    return 4.0 * total + 2.0 * trainable + 12.0 * layers * width * seq_len


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on CUDA, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**3 if sys.platform == "darwin" else rss / 1024**2
