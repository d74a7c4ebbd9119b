"""The dense architecture a derived student takes: the teacher's dense relative, or its own family made dense.

A derived student keeps the teacher's embeddings, attention and norms, so its architecture must name and shape
those parameters exactly as the teacher does. Two ways to get one, in order of preference:
- a dense relative in transformers (Mixtral: Llama, or Mistral with sliding-window attention; Qwen2-MoE:
  Qwen2 with the same q/k/v biases; Qwen3-MoE: Qwen3 with the same q/k norms), whose config is built from the
  teacher's own config dict (every field the dense family also has), so rope, norm and attention settings
  carry over whole;
- the teacher's own family with every layer dense, where its config has a switch for dense layers
  (DeepSeek, GLM-4-MoE, ERNIE 4.5, Llama 4, Qwen3-Next, ...: found by trying, see dense_switch.py).
Families with neither (OLMoE's attention norms, GPT-OSS's sinks and biases) are refused by `check_derivable`
before any stage runs; a user can still pass STUDENT=<dense model>.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from core.errors import UnsupportedModelError
from students.dense_switch import (
    DenseSwitch,
    dense_config,
    find_dense_switch,
    meta_model,
    switch_candidates,
)
from students.ffn_layout import layer_ffn
from teachers.moe_config import num_layers
from teachers.moe_layout import decoder_layers
from teachers.upcycle import copy_rope_settings

# MoE model_type -> dense model_type whose non-FFN parameters have the same names and shapes (the "dense
# relative"; families whose own config can make every layer dense need no entry, see dense_switch.py).
TWINS = {"mixtral": "llama", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
_FIX = "pass STUDENT=<dense model folder or hub id> to distill into a dense model of your choice"
# Never copied: identity fields, and the ones set from the derivation (depth, width, per-layer lists).
_SKIP = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "num_hidden_layers",
         "intermediate_size", "layer_types", "auto_map"}


def twin_model_type(teacher_cfg: PretrainedConfig) -> str:
    """The dense model_type a student derived from this teacher takes (raises UnsupportedModelError when the
    family has neither a dense relative nor a switch that makes its own layers dense)."""
    mt = teacher_cfg.model_type
    if mt in TWINS:
        if mt == "mixtral" and getattr(teacher_cfg, "sliding_window", None):
            return "mistral"  # Mixtral with sliding-window attention: Mistral is its dense relative, Llama is not
        return TWINS[mt]
    if find_dense_switch(teacher_cfg) is not None:
        return mt
    tried = sorted({c[0] for c in switch_candidates(teacher_cfg)})
    what = f"no setting of {', '.join(tried)} makes" if tried else "its config has no setting that makes"
    raise UnsupportedModelError(
        f"a dense student cannot be derived from a '{mt}' teacher: transformers has no dense relative with its "
        f"attention layout, and {what} every layer a dense SwiGLU FFN; {_FIX}")


def check_derivable(teacher_cfg: PretrainedConfig) -> str:
    """One line naming the dense architecture a derived student of this teacher takes, or UnsupportedModelError
    saying why none fits. Reads the config only: the teacher is built on the meta device (no weights, no memory),
    so this runs before any stage does."""
    try:
        teacher = meta_model(teacher_cfg)
    except Exception as e:  # noqa: BLE001 - remote code, a config transformers cannot build
        raise UnsupportedModelError(f"the '{teacher_cfg.model_type}' teacher cannot be built from its config to "
                                    f"inspect its layers ({type(e).__name__}: {e}); {_FIX}") from e
    prefix, layers = decoder_layers(teacher)
    try:
        for i, layer in enumerate(layers):  # the experts must be readable: fused SwiGLU, no biases
            layer_ffn(layer, teacher_cfg.hidden_size, f"{prefix}.{i}")
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"a dense student cannot be derived from a '{teacher_cfg.model_type}' "
                                    f"teacher: {e}; {_FIX}") from e
    twin = twin_model_type(teacher_cfg)
    if teacher_cfg.model_type in TWINS:
        return f"{twin} (the dense relative of {teacher_cfg.model_type})"
    sw = find_dense_switch(teacher_cfg)
    assert sw is not None
    return f"{twin} with every layer dense ({sw.describe(num_layers(teacher_cfg))}, width from {sw.width_field})"


def dense_switch(teacher_cfg: PretrainedConfig) -> DenseSwitch | None:
    """The switch that makes the teacher's own family dense, when the student takes that architecture (None
    for a family with a dense relative)."""
    return None if teacher_cfg.model_type in TWINS else find_dense_switch(teacher_cfg)


def twin_config(teacher_cfg: PretrainedConfig, keep: list[int], width: int) -> PretrainedConfig:
    """Config of the dense student: the teacher's fields, `len(keep)` layers, FFN width `width`.

    keep: the teacher layer indices the student keeps, in order (per-layer settings such as `layer_types`
    follow them).
    """
    twin_type = twin_model_type(teacher_cfg)
    switch = dense_switch(teacher_cfg)
    if switch is not None:
        return dense_config(teacher_cfg, switch, keep, width)
    src = teacher_cfg.to_dict()
    known = AutoConfig.for_model(twin_type).to_dict()
    # An unset (None) field means "the family's default" across families, so it is left to the twin's own
    # default.
    kwargs = {k: v for k, v in src.items()
              if k in known and k not in _SKIP and not k.startswith("_") and v is not None}
    if "head_dim" in known:
        # Some MoE configs leave head_dim unset (hidden / heads); their dense relatives default to another value.
        kwargs["head_dim"] = getattr(teacher_cfg, "head_dim", None) or (
            teacher_cfg.hidden_size // teacher_cfg.num_attention_heads)
    if isinstance(src.get("layer_types"), list) and "layer_types" in known:
        kwargs["layer_types"] = [src["layer_types"][i] for i in keep]
    cfg = AutoConfig.for_model(twin_type, num_hidden_layers=len(keep), intermediate_size=width, **kwargs)
    copy_rope_settings(teacher_cfg, cfg)
    return cfg
