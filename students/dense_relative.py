"""A dense relative of an MoE family, found by trying every dense causal-LM family transformers has.

A family whose own config cannot make its layers dense (dense_switch.py) may still have a dense relative whose
attention, norms and embeddings are the teacher's: Qwen3.5-MoE's is Qwen3.5, Solar-Open's is Llama. A
candidate is accepted when
1. built from the teacher's config (every field the candidate's config also has), every parameter outside the
   FFN blocks is the teacher's, name for name and shape for shape, and each layer holds one SwiGLU FFN whose
   width one int field sets (the checks of dense_switch.py);
2. it computes what the teacher computes once the FFNs are taken out: both models, their FFN blocks replaced by
   zeros and every other parameter set to the same values, give the same logits on the same tokens. Names and
   shapes alone would accept Gemma (embeddings scaled by sqrt(hidden)), Granite (residual multipliers) or
   ERNIE (another rotary layout) for a Llama-like teacher; the forward does not. Sliding windows are shrunk
   below the probe's length and the weights are probed at two scales, so window and soft-cap settings that a
   candidate lacks show too.

Candidates are tried in order: those sharing most name parts with the teacher's model_type first (qwen3_5_moe
-> qwen3_5_text), then the simplest configs; the first that passes is taken.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from transformers import AutoConfig, PretrainedConfig

from students.dense_switch import dense_width, find_width_field, meta_model, non_ffn_shapes
from students.same_function import probe_config as _probe_config
from students.same_function import same_outside_ffns
from teachers.moe_config import num_layers
from teachers.upcycle import copy_rope_settings

# Never copied from the teacher's config: identity fields, and the ones the derivation sets (depth, width,
# per-layer lists).
SKIP_FIELDS = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "num_hidden_layers",
               "intermediate_size", "layer_types", "auto_map"}


@dataclass(frozen=True)
class Relative:
    """A dense family (`model_type`) equivalent to the teacher outside its FFNs; `width_field` sets its FFN width."""

    model_type: str
    width_field: str


def relative_config(teacher_cfg: PretrainedConfig, model_type: str, keep: list[int], width: int,
                    width_field: str = "intermediate_size") -> PretrainedConfig:
    """Config of a dense `model_type` model: the teacher's fields that family also has, `len(keep)` layers (per-
    layer `layer_types` follow `keep`, the teacher layer indices kept), FFN width `width`, the teacher's rope."""
    src = teacher_cfg.to_dict()
    known = AutoConfig.for_model(model_type).to_dict()
    # An unset (None) field means "the family's default" across families, so it is left to the relative's own.
    kwargs = {k: v for k, v in src.items()
              if k in known and k not in SKIP_FIELDS and not k.startswith("_") and v is not None}
    if "head_dim" in known:
        # Some MoE configs leave head_dim unset (hidden / heads); their dense relatives default to another value.
        kwargs["head_dim"] = getattr(teacher_cfg, "head_dim", None) or (
            teacher_cfg.hidden_size // teacher_cfg.num_attention_heads)
    if isinstance(src.get("layer_types"), list) and "layer_types" in known:
        kwargs["layer_types"] = [src["layer_types"][i] for i in keep]
    kwargs[width_field] = width
    cfg = AutoConfig.for_model(model_type, num_hidden_layers=len(keep), **kwargs)
    copy_rope_settings(teacher_cfg, cfg)
    return cfg


_CACHE: dict[str, Relative | None] = {}


def find_dense_relative(teacher_cfg: PretrainedConfig) -> Relative | None:
    """The first dense family that passes both checks of the module docstring (None if none does)."""
    key = teacher_cfg.to_json_string(use_diff=False)
    if key not in _CACHE:
        _CACHE[key] = _search(teacher_cfg)
    return _CACHE[key]


@functools.lru_cache(maxsize=1)
def _dense_families() -> tuple[tuple[str, int], ...]:
    """(model_type, number of config fields) of every causal-LM family that is not an MoE."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if "moe" in mt.split("_"):
            continue
        try:
            out.append((mt, len(AutoConfig.for_model(mt).to_dict())))
        except Exception:  # noqa: BLE001 - a family whose config cannot be built bare is no candidate
            continue
    return tuple(out)


def candidates(model_type: str) -> list[str]:
    """Dense causal-LM families to try for an MoE `model_type`, most name parts in common first, then the ones
    with the fewest config fields (the plainest), then by name."""
    parts = set(re.split(r"[_\-]", model_type)) - {"moe", "text", ""}
    ranked = sorted((-len(parts & set(re.split(r"[_\-]", mt))), fields, mt)
                    for mt, fields in _dense_families() if mt != model_type)
    return [mt for *_, mt in ranked]


def _reference(teacher_cfg: PretrainedConfig) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the teacher's parameters outside its FFN blocks (None when it cannot be built or read)."""
    try:
        return non_ffn_shapes(meta_model(teacher_cfg), teacher_cfg)
    except Exception:  # noqa: BLE001 - a config transformers cannot build has no relative either
        return None


def _matches(teacher_cfg: PretrainedConfig, reference: dict[str, tuple[int, ...]],
             model_type: str) -> str | None:
    """The field that sets the FFN width if `model_type` built from the teacher's config has the teacher's
    parameters outside the FFNs (`reference`) and one SwiGLU FFN per layer, else None (meta device: no memory)."""
    try:
        cfg = relative_config(teacher_cfg, model_type, list(range(num_layers(teacher_cfg))),
                              teacher_cfg.hidden_size)
    except Exception:  # noqa: BLE001 - the teacher's fields do not make a valid config of this family
        return None
    width = dense_width(cfg, reference)
    return None if width is None else find_width_field(cfg, reference, width, exclude="")


def _search(teacher_cfg: PretrainedConfig) -> Relative | None:
    # Names and shapes are compared on the probe's few layers first (a candidate costs one small meta build), then
    # once at the teacher's full depth for the one that also computes alike.
    probe = _probe_config(teacher_cfg)
    probe_ref, full_ref = _reference(probe), _reference(teacher_cfg)
    if probe_ref is None or full_ref is None:
        return None
    for mt in candidates(teacher_cfg.model_type):
        if _matches(probe, probe_ref, mt) is None or not _same_function(probe, mt):
            continue
        field = _matches(teacher_cfg, full_ref, mt)
        if field is not None:
            return Relative(model_type=mt, width_field=field)
    return None


def _same_function(probe_teacher: PretrainedConfig, model_type: str) -> bool:
    """Whether the dense `model_type` built from the probe config computes the teacher's logits with the FFNs out."""
    try:
        probe = relative_config(probe_teacher, model_type, list(range(num_layers(probe_teacher))),
                                probe_teacher.hidden_size)
        return same_outside_ffns(probe_teacher, probe)
    except Exception:  # noqa: BLE001 - a candidate that cannot run the probe is not equivalent
        return False
