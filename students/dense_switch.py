"""The setting of an MoE config that makes every decoder layer dense, found by trying rather than by a table.

Many MoE families can run some layers with a plain FFN (DeepSeek's `first_k_dense_replace`, Qwen's
`mlp_only_layers` / `decoder_sparse_step`, ERNIE's `moe_layer_start_index`, Llama 4's `moe_layers`, LFM2's
`num_dense_layers`, EXAONE's `mlp_layer_types`, ...). Set to its extreme, such a field makes the family's own
class a dense model whose attention, norms and embeddings are named and shaped exactly as the teacher's: the
natural architecture for a derived student. Each candidate is a config field whose name speaks of
dense/sparse/MoE/MLP layers; each candidate value (the depth, one past it, 0, every layer, no layer, one
layer type everywhere) is tried by building the model on the meta device (no memory, no weights) and
checking that
- no layer holds experts or a router, each holds one gated (SwiGLU) FFN, all of one width;
- every other parameter is the teacher's, name for name and shape for shape;
- with the FFNs zeroed, the switched model computes the teacher's logits (same_function.py): a switch may change
  more than the FFNs (Cohere2-MoE's attention takes rotary in full-attention layers only where the FFN is dense).
The config field that sets that width is found the same way (changed, and seen to change the width).
A value depends on the depth (first_k_dense_replace = depth), so a switch is kept as a rule and applied to the
student's own depth.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from core.errors import UnsupportedModelError
from students.config_layers import meta_model, with_layers
from students.ffn_layout import check_student_layer, layer_ffn
from students.same_function import probe_config, same_outside_ffns
from teachers.moe_config import num_layers
from teachers.moe_layout import decoder_layers

# Field names that may decide which layers are dense; sizes, counts and routing settings are not switches.
_SWITCHY = re.compile(r"dense|sparse|moe|mlp|expert_layer|layer_freq|interleave", re.I)
_NOT_SWITCH = re.compile(r"size|dim|per_tok|top|group|bias|factor|coef|norm|min|alpha|capacity|jitter|noise|"
                         r"act|loss|aux|num_experts$|n_routed|n_shared|num_shared|dropout|init|std|eps", re.I)
RULES = ("depth", "beyond", "zero", "all", "none", "fill")


@dataclass(frozen=True)
class DenseSwitch:
    """`field` set by `rule` makes every layer dense: depth (= number of layers), beyond (depth + 1), zero,
    all (every layer index), none (empty list), fill (`fill` for every layer); `width_field` sets the dense
    FFN width."""

    field: str
    rule: str
    width_field: str
    fill: Any = None

    def value(self, depth: int) -> Any:
        """The field's value for a model of `depth` layers."""
        return {"depth": depth, "beyond": depth + 1, "zero": 0, "all": list(range(depth)), "none": [],
                "fill": [self.fill] * depth}[self.rule]

    def describe(self, depth: int) -> str:
        v = self.value(depth)
        shown = f"[{self.fill!r} x {depth}]" if self.rule == "fill" else repr(v)
        return f"{self.field}={shown}"


_CACHE: dict[str, DenseSwitch | None] = {}


def find_dense_switch(config: PretrainedConfig) -> DenseSwitch | None:
    """The config setting that makes every layer of this family dense (None if the family has none)."""
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        _CACHE[key] = _search(config)
    return _CACHE[key]


def dense_config(config: PretrainedConfig, switch: DenseSwitch, keep: list[int], width: int) -> PretrainedConfig:
    """The teacher's config with `len(keep)` layers (per-layer lists follow `keep`), every layer dense of
    FFN width `width`."""
    cfg = with_layers(config, keep, skip=(switch.field,))
    setattr(cfg, switch.field, switch.value(len(keep)))
    setattr(cfg, switch.width_field, width)
    return cfg


def switch_candidates(config: PretrainedConfig) -> list[tuple[str, str, Any]]:
    """(field, rule, fill) settings worth trying, from the config's own fields whose names speak of layer kinds."""
    depth = num_layers(config)
    out: list[tuple[str, str, Any]] = []
    for k, v in config.to_dict().items():
        if k.startswith("_") or not _SWITCHY.search(k) or _NOT_SWITCH.search(k) or isinstance(v, bool):
            continue
        if isinstance(v, int):
            out += [(k, r, None) for r in ("depth", "beyond", "zero")]
        elif isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            out += [(k, r, None) for r in ("all", "none")]
        elif isinstance(v, list) and len(v) == depth:
            values = list(dict.fromkeys([*v, "dense", False, True]))  # each type present, and the usual names
            out += [(k, "fill", x) for x in values if type(x) is type(v[0])]
        elif v is None:
            out += [(k, r, None) for r in ("all", "none", "depth")]
    # The names that speak of dense layers first: they are the switch in most families.
    return sorted(out, key=lambda c: "dense" not in c[0].lower())


def _search(config: PretrainedConfig) -> DenseSwitch | None:
    try:
        teacher = meta_model(config)
    except Exception:  # noqa: BLE001 - a config transformers cannot build has no dense switch either
        return None
    reference = non_ffn_shapes(teacher, config)
    if reference is None:
        return None
    depth = num_layers(config)
    for fld, rule, fill in switch_candidates(config):
        sw = DenseSwitch(field=fld, rule=rule, width_field="", fill=fill)
        cfg = copy.deepcopy(config)
        setattr(cfg, fld, sw.value(depth))
        width = dense_width(cfg, reference)
        if width is None:
            continue
        wfield = find_width_field(cfg, reference, width, exclude=fld)
        if wfield is None:
            continue
        found = DenseSwitch(field=fld, rule=rule, width_field=wfield, fill=fill)
        if _changes_attention(config, found):
            continue
        return found
    return None


def _changes_attention(config: PretrainedConfig, switch: DenseSwitch) -> bool:
    """Whether making the layers dense changes what the rest of the model computes: the teacher and its switched
    config, FFN blocks zeroed, give different logits on a probe (students/same_function.py). Cohere2-MoE's
    attention applies rotary in full-attention layers only where the FFN is dense, so `mlp_layer_types` all
    "dense" had the same names and shapes and another function (a derived student 4e-3 off its teacher where
    it should be exact). A probe that cannot run (a layer that will not take a zero FFN) does not veto: names
    and shapes then decide, as before."""
    try:
        probe = probe_config(config)
        depth = num_layers(probe)
        width = getattr(probe, switch.width_field, None) or probe.hidden_size
        switched = dense_config(probe, switch, list(range(depth)), width)
        return not same_outside_ffns(probe, switched)
    except Exception:  # noqa: BLE001 - see the docstring
        return False


def non_ffn_shapes(model: torch.nn.Module, config: PretrainedConfig) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every parameter outside the layers' FFN blocks (layer index kept in the name)."""
    prefix, layers = decoder_layers(model)
    hidden = config.hidden_size
    skip = []
    for i, layer in enumerate(layers):
        try:
            skip.append(f"{prefix}.{i}.{layer_ffn(layer, hidden, f'{prefix}.{i}').path}.")
        except UnsupportedModelError:
            return None
    return {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith(tuple(skip))}


def dense_width(cfg: PretrainedConfig, reference: dict[str, tuple[int, ...]]) -> int | None:
    """The FFN width if `cfg` builds an all-dense model with the teacher's other parameters, else None."""
    try:
        model = meta_model(cfg)
        prefix, layers = decoder_layers(model)
        widths = {check_student_layer(layer, cfg.hidden_size)[1].width for layer in layers}
        if len(widths) != 1 or non_ffn_shapes(model, cfg) != reference:
            return None
        return widths.pop()
    except Exception:  # noqa: BLE001 - a candidate value the family rejects, or that leaves experts
        return None


def find_width_field(cfg: PretrainedConfig, reference: dict[str, tuple[int, ...]], width: int,
                 exclude: str) -> str | None:
    """The int field of `cfg` that sets the dense FFN width: one now equal to it that, changed, changes it."""
    names = [k for k, v in cfg.to_dict().items()
             if k != exclude and isinstance(v, int) and not isinstance(v, bool) and v == width]
    names.sort(key=lambda k: ("intermediate" not in k and "ffn" not in k, k))
    for k in names:
        probe = copy.deepcopy(cfg)
        setattr(probe, k, width + 8)
        if dense_width(probe, reference) == width + 8:
            return k
    return None
