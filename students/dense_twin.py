"""The dense architecture a derived student takes: the teacher's own family made dense, or a dense relative.

A derived student keeps the teacher's embeddings, attention and norms, so its architecture must name and shape
those parameters exactly as the teacher does, and compute with them what the teacher does. In order of
preference:
- a known dense relative (TWINS: Mixtral -> Llama, or Mistral with sliding-window attention; Qwen2-MoE -> Qwen2;
  Qwen3-MoE -> Qwen3): what the search below finds for them (a test holds them to it), kept so that the most
  common teachers skip it;
- the teacher's own family with every layer dense, where its config has a switch for dense layers that changes
  nothing else (DeepSeek, GLM-4-MoE, ERNIE 4.5, Llama 4, Qwen3-Next, ...: found by trying and checked by a
  forward, see dense_switch.py);
- any other dense family of transformers, found by trying and checked by a forward (dense_relative.py:
  Qwen3.5-MoE -> Qwen3.5, Solar-Open -> Llama, ...).
Every config is built from the teacher's own config dict (every field the dense family also has), so rope, norm
and attention settings carry over whole. Families with none (OLMoE's attention norms, GPT-OSS's sinks and
biases) are refused by `check_derivable` before any stage runs; a user can still pass STUDENT=<dense model>.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from core.errors import UnsupportedModelError
from students.dense_relative import Relative, find_dense_relative, relative_config
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

# MoE model_type -> its dense relative, for the commonest teachers: what the search of dense_relative.py accepts
# for them (tests/test_dense_relative.py holds each entry to its checks), known in advance so they skip it.
TWINS = {"mixtral": "llama", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
_FIX = "pass STUDENT=<dense model folder or hub id> to distill into a dense model of your choice"


def _known_twin(teacher_cfg: PretrainedConfig) -> str | None:
    mt = teacher_cfg.model_type
    if mt not in TWINS:
        return None
    if mt == "mixtral" and getattr(teacher_cfg, "sliding_window", None):
        return "mistral"  # Mixtral with sliding-window attention: Mistral is its dense relative, Llama is not
    return TWINS[mt]


def twin_model_type(teacher_cfg: PretrainedConfig) -> str:
    """The dense model_type a student derived from this teacher takes (raises UnsupportedModelError when the
    family has neither a dense relative nor a switch that makes its own layers dense)."""
    known = _known_twin(teacher_cfg)
    if known is not None:
        return known
    if find_dense_switch(teacher_cfg) is not None:
        return teacher_cfg.model_type
    relative = find_dense_relative(teacher_cfg)
    if relative is not None:
        return relative.model_type
    tried = sorted({c[0] for c in switch_candidates(teacher_cfg)})
    what = f"no setting of {', '.join(tried)} makes" if tried else "its config has no setting that makes"
    raise UnsupportedModelError(
        f"a dense student cannot be derived from a '{teacher_cfg.model_type}' teacher: no dense family of "
        f"transformers computes its attention and norms (names, shapes and a forward compared), and {what} every "
        f"layer a dense SwiGLU FFN; {_FIX}")


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
    if _known_twin(teacher_cfg) is not None:
        return f"{twin} (the dense relative of {teacher_cfg.model_type})"
    sw = find_dense_switch(teacher_cfg)
    if sw is not None:
        return f"{twin} with every layer dense ({sw.describe(num_layers(teacher_cfg))}, width from {sw.width_field})"
    return (f"{twin} (a dense relative of {teacher_cfg.model_type}, found by trying: the same attention and norms, "
            f"by name, shape and a forward; width from {_relative(teacher_cfg).width_field})")


def dense_switch(teacher_cfg: PretrainedConfig) -> DenseSwitch | None:
    """The switch that makes the teacher's own family dense, when the student takes that architecture (None
    for a family with a dense relative)."""
    return None if _known_twin(teacher_cfg) is not None else find_dense_switch(teacher_cfg)


def _relative(teacher_cfg: PretrainedConfig) -> Relative:
    known = _known_twin(teacher_cfg)
    if known is not None:
        return Relative(model_type=known, width_field="intermediate_size")
    relative = find_dense_relative(teacher_cfg)
    if relative is None:
        twin_model_type(teacher_cfg)  # raises, saying why
        raise AssertionError("unreachable")
    return relative


def twin_config(teacher_cfg: PretrainedConfig, keep: list[int], width: int) -> PretrainedConfig:
    """Config of the dense student: the teacher's fields, `len(keep)` layers, FFN width `width`.

    keep: the teacher layer indices the student keeps, in order (per-layer settings such as `layer_types`
    follow them).
    """
    switch = dense_switch(teacher_cfg)
    if switch is not None:
        return dense_config(teacher_cfg, switch, keep, width)
    relative = _relative(teacher_cfg)
    return relative_config(teacher_cfg, relative.model_type, keep, width, relative.width_field)
