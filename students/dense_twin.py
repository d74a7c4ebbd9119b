"""The dense architecture a derived student takes: the teacher's own family with a plain FFN in every layer.

A derived student keeps the teacher's embeddings, attention and norms, so its architecture must name and shape
those parameters exactly as the teacher does. Each MoE family in transformers has such a dense relative
(Qwen2-MoE: Qwen2 with the same q/k/v biases; Qwen3-MoE: Qwen3 with the same q/k norms); DeepSeek-V3 is its
own relative, as its config can make every layer dense. The twin config is built from the teacher's own
config dict (every field the dense family also has), so rope, norm and attention settings carry over whole.
Families without a dense relative in transformers (OLMoE's attention norms, GPT-OSS's sinks) are refused
with the list of supported ones; a user can still pass STUDENT=<dense model>.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from teachers.upcycle import copy_rope_settings

# MoE model_type -> dense model_type whose non-FFN parameters have the same names and shapes.
TWINS = {"mixtral": "llama", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3", "deepseek_v3": "deepseek_v3"}
# Never copied: identity fields, and the ones set from the derivation (depth, width, per-layer lists).
_SKIP = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "num_hidden_layers",
         "intermediate_size", "layer_types", "auto_map"}


def twin_model_type(teacher_cfg: PretrainedConfig) -> str:
    """The dense model_type a student derived from this teacher takes (raises for unsupported families)."""
    mt = teacher_cfg.model_type
    if mt not in TWINS:
        raise NotImplementedError(
            f"deriving a student from a '{mt}' teacher is not supported: transformers has no dense architecture "
            f"with its attention layout (supported: {', '.join(sorted(TWINS))}); pass STUDENT=<dense model>")
    if mt == "mixtral" and getattr(teacher_cfg, "sliding_window", None):
        return "mistral"  # Mixtral with sliding-window attention: Mistral is its dense relative, Llama is not
    return TWINS[mt]


def twin_config(teacher_cfg: PretrainedConfig, keep: list[int], width: int) -> PretrainedConfig:
    """Config of the dense student: the teacher's fields, `len(keep)` layers, FFN width `width`.

    keep: the teacher layer indices the student keeps, in order (per-layer settings such as `layer_types`
    follow them).
    """
    twin_type = twin_model_type(teacher_cfg)
    src = teacher_cfg.to_dict()
    known = AutoConfig.for_model(twin_type).to_dict()
    same = twin_type == teacher_cfg.model_type
    # An unset (None) field means "the family's default" across families, so it is left to the twin's own
    # default; within one family (DeepSeek) None is a setting of its own (q_lora_rank=None: no q compression).
    kwargs = {k: v for k, v in src.items()
              if k in known and k not in _SKIP and not k.startswith("_") and (v is not None or same)}
    if "head_dim" in known:
        # Some MoE configs leave head_dim unset (hidden / heads); their dense relatives default to another value.
        kwargs["head_dim"] = getattr(teacher_cfg, "head_dim", None) or (
            teacher_cfg.hidden_size // teacher_cfg.num_attention_heads)
    if isinstance(src.get("layer_types"), list) and "layer_types" in known:
        kwargs["layer_types"] = [src["layer_types"][i] for i in keep]
    if twin_type == "deepseek_v3":
        kwargs["first_k_dense_replace"] = len(keep)  # every layer takes the plain FFN
    cfg = AutoConfig.for_model(twin_type, num_hidden_layers=len(keep), intermediate_size=width, **kwargs)
    copy_rope_settings(teacher_cfg, cfg)
    return cfg
