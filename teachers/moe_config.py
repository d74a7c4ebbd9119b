"""What an MoE config declares: routed experts per layer, experts per token, decoder depth.

Families name these differently (num_local_experts, n_routed_experts, moe_num_experts, ...; moe_topk, moe_k,
top_k_experts, ...), some per layer (lists), some keep a switch that turns the MoE block off in a config that
still carries an expert count (Doge's is_moe, Gemma 4's enable_moe_block), and multimodal wrappers keep them
in a `text_config`. Everything here reads the config only; `moe_layout` finds the modules.
"""
from __future__ import annotations

from typing import Iterator

from core.errors import UnsupportedModelError

# Sub-configs and module paths of other modalities, never the text decoder.
NOT_TEXT = ("vision", "visual", "audio", "speech")
# Config attributes by which transformers' MoE families declare their routed experts and experts per token
# (many more names reach these through each config's attribute_map).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k_experts", "moe_k", "moe_top_k",
               "top_k", "experts_per_token")
# Switches some families keep in a dense config next to a non-zero expert count (Doge's is_moe, Gemma 4's
# enable_moe_block): explicitly False means no MoE block is built.
_MOE_SWITCHES = ("is_moe", "enable_moe_block", "use_moe")


def _text_configs(config: object) -> Iterator[object]:
    """The config, its text_config, and other sub-configs that are not vision/audio towers (Dbrx's ffn_config)."""
    yield config
    text = getattr(config, "text_config", None)
    if text is not None:
        yield text
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if name != "text_config" and sub is not None and not any(w in name for w in NOT_TEXT):
            yield sub


def _as_ints(value: object) -> list[int]:
    """An int, or a per-layer list of ints (HunYuan's num_experts / moe_topk), as a list; [] otherwise."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        return list(value)
    return []


def _moe_config(config: object) -> tuple[object, list[int]] | None:
    """(the (sub-)config declaring routed experts, its expert count(s)) or None for a dense config."""
    for cfg in _text_configs(config):
        if any(getattr(cfg, s, None) is False for s in _MOE_SWITCHES):
            continue
        for key in _EXPERT_COUNT_KEYS:
            n = _as_ints(getattr(cfg, key, None))
            if n and max(n) > 1:
                return cfg, n
    return None


def config_num_experts(config: object) -> int:
    """Routed experts per MoE layer declared by `config` (the largest, if per layer); 0 for a dense config.
    One expert (HunYuan's default) is a dense FFN by another name, and counts as 0."""
    found = _moe_config(config)
    return max(found[1]) if found else 0


def experts_per_token(config: object, layer: int | None = None) -> int:
    """Experts each token is routed to (top-k) declared by `config`, at decoder `layer` if it is per layer;
    0 when the config does not say."""
    found = _moe_config(config)
    for cfg in ([found[0]] if found else []) + list(_text_configs(config)):
        for key in _TOP_K_KEYS:
            k = _as_ints(getattr(cfg, key, None))
            if k and min(k) > 0:
                return k[layer] if layer is not None and len(k) > 1 and layer < len(k) else max(k)
    return 0


def experts_at_layer(config: object, layer: int) -> int:
    found = _moe_config(config)
    if not found:
        return 0
    n = found[1]
    return n[layer] if len(n) > 1 and layer < len(n) else max(n)


def num_layers(config: object) -> int:
    """Decoder depth declared by a config (or by its `text_config` in multimodal wrappers)."""
    for cfg in (config, getattr(config, "text_config", None)):
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n, int) and n > 0:
            return n
    raise UnsupportedModelError(f"{type(config).__name__} declares no num_hidden_layers")


# ------------------------------------------------------------------------------------------- structure ---
