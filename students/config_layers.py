"""A config cut to some of its layers, and a model built from a config on the meta device: the two ways the
derivation looks at an architecture without paying for its weights."""
from __future__ import annotations

import copy
import warnings

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from teachers.moe_config import num_layers


def with_layers(config: PretrainedConfig, keep: list[int], skip: tuple[str, ...] = ()) -> PretrainedConfig:
    """A copy of `config` with `len(keep)` layers: every per-layer list (layer_types, no_rope_layers, ...) but
    those in `skip` follows `keep`, the teacher layer indices kept."""
    depth = num_layers(config)
    cfg = copy.deepcopy(config)
    for k, v in config.to_dict().items():
        if isinstance(v, list) and len(v) == depth and k not in skip and hasattr(cfg, k):
            setattr(cfg, k, [v[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
    return cfg


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model `config` describes, on the meta device: structure and shapes, no memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
