"""Derive a dense student from a Mixtral-class MoE teacher.

Embeddings, attention and norms are copied; each kept layer's dense FFN is built from that layer's experts
by one of the methods of students/expert_merge.py, weighted by routing mass measured on calibration text
(students/routing_stats.py) when given.
Dropping layers is what makes the student measurably faster than the teacher (merging experts alone keeps
the active compute of one expert instead of k).
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from students.expert_merge import METHODS, merge_experts
from students.layer_importance import most_influential
from teachers.upcycle import copy_rope_settings

_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "attention_dropout",
)
SUPPORTED_TEACHERS = ("mixtral",)


def parse_keep_layers(spec: str, num_layers: int, influence: torch.Tensor | None = None) -> list[int]:
    """`"all"`, `"every_<n>"` (layers 0, n, 2n, ... and always the last), `"top_<n>"` (the n most influential
    by measured block influence [L], see layer_importance.py), or `"0,3,7"` -> sorted indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith("top_"):
        if influence is None:
            raise ValueError(f"keep_layers '{spec}' needs layer influence measured on calibration text")
        try:
            n = int(spec[len("top_"):])
        except ValueError:
            raise ValueError(f"keep_layers '{spec}': expected top_<n>") from None
        return most_influential(influence, n)
    if spec.startswith("every_"):
        try:
            n = int(spec[len("every_"):])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"keep_layers '{spec}': expected every_<n> with n >= 1")
        keep = list(range(0, num_layers, n))
        # The last layer shapes the output distribution most directly; keep it.
        if keep[-1] != num_layers - 1:
            keep.append(num_layers - 1)
        return keep
    try:
        keep = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"keep_layers '{spec}': expected all, every_<n>, or comma-separated indices") from None
    if not keep or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"keep_layers '{spec}': indices must lie in 0..{num_layers - 1}")
    return keep


@torch.no_grad()
def derive_dense_student(teacher: PreTrainedModel, keep_layers: str = "every_2", method: str = "uniform",
                         ffn_width: int = 0, mass: torch.Tensor | None = None,
                         influence: torch.Tensor | None = None) -> LlamaForCausalLM:
    """A dense Llama with the teacher's attention and merged experts on the kept layers.

    method: one of students.expert_merge.METHODS; ffn_width: the dense FFN width (0: one expert's);
    mass [L, E]: routing mass per teacher layer and expert (routing_stats.routing_mass), None for uniform;
    influence [L]: block influence per teacher layer, for keep_layers="top_<n>".
    """
    model_type = teacher.config.model_type
    if model_type not in SUPPORTED_TEACHERS:
        raise NotImplementedError(f"deriving a student from a '{model_type}' teacher is not supported yet "
                                  f"(supported: {', '.join(SUPPORTED_TEACHERS)}); pass STUDENT=<dense model>")
    if method not in METHODS:
        raise ValueError(f"unknown derivation method '{method}' (available: {', '.join(METHODS)})")
    tc = teacher.config
    keep = parse_keep_layers(keep_layers, tc.num_hidden_layers, influence)
    if mass is not None and mass.shape != (tc.num_hidden_layers, tc.num_local_experts):
        raise ValueError(f"routing mass must be [layers={tc.num_hidden_layers}, experts={tc.num_local_experts}], "
                         f"got {tuple(mass.shape)}")
    kwargs = {f: getattr(tc, f) for f in _SHARED_FIELDS if getattr(tc, f, None) is not None}
    cfg = LlamaConfig(intermediate_size=ffn_width or tc.intermediate_size, num_hidden_layers=len(keep), **kwargs)
    copy_rope_settings(tc, cfg)
    dtype = next(teacher.parameters()).dtype
    student = LlamaForCausalLM(cfg).to(dtype)
    src = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name in student.state_dict():
        if not name.startswith("model.layers."):
            out[name] = src[name]
            continue
        parts = name.split(".")
        new_i = int(parts[2])
        old = f"model.layers.{keep[new_i]}"
        rest = ".".join(parts[3:])
        if rest.startswith("mlp."):
            continue
        out[name] = src[f"{old}.{rest}"]
    for new_i, old_i in enumerate(keep):
        p = f"model.layers.{old_i}.mlp.experts"
        gate, up, down = merge_experts(src[f"{p}.gate_up_proj"], src[f"{p}.down_proj"], method,
                                       None if mass is None else mass[old_i], ffn_width)
        out[f"model.layers.{new_i}.mlp.gate_proj.weight"] = gate.to(dtype)
        out[f"model.layers.{new_i}.mlp.up_proj.weight"] = up.to(dtype)
        out[f"model.layers.{new_i}.mlp.down_proj.weight"] = down.to(dtype)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    student.load_state_dict(out, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        student.tie_weights()
    return student.eval()
