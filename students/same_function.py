"""Whether two architectures compute the same function outside their FFN blocks, by running them.

Names and shapes of parameters do not settle it: Gemma scales its embeddings by sqrt(hidden), Granite has
residual multipliers, ERNIE another rotary layout, and Cohere2-MoE's attention applies rotary in full-attention
layers only where the layer's FFN is dense (`force_rope`), so switching its layers to dense changes its attention.
Both models are built small (`probe_config`: one layer of each kind, a small vocabulary, windows shorter than the
probe), their FFN blocks replaced by zeros and every other parameter set from its name (same name, same values),
and run on the same tokens at two weight scales: the same function gives the same logits up to rounding.
"""
from __future__ import annotations

import hashlib
import warnings

import torch
from transformers import PretrainedConfig

from students.config_layers import meta_model, with_layers
from students.ffn_layout import layer_ffn
from teachers.moe_config import num_layers
from teachers.moe_layout import decoder_layers

PROBE_VOCAB = 256
PROBE_TOKENS = 24
PROBE_WINDOW = 4  # sliding windows and attention chunks, below PROBE_TOKENS so that they act
PROBE_SCALES = (0.05, 0.5)
PROBE_TOLERANCE = 1e-4  # float32: an equivalent family differs by rounding only (0.0 on every family seen)


def probe_config(cfg: PretrainedConfig) -> PretrainedConfig:
    """A copy of `cfg` cheap to build for real: one layer of each kind (per-layer lists follow), a small vocabulary
    (token ids inside it), windows and attention chunks shorter than the probe."""
    depth = num_layers(cfg)
    d = cfg.to_dict()
    per_layer = [v for v in d.values() if isinstance(v, list) and len(v) == depth and depth > 1]
    # the first layer of each kind any per-layer setting names, and at least two layers
    keep = sorted({v.index(x) for v in per_layer for x in v} | {0, 1})
    out = with_layers(cfg, [i for i in keep if i < depth])
    out.vocab_size = PROBE_VOCAB
    for k, v in d.items():
        if k.endswith("_token_id") and isinstance(v, int) and v >= PROBE_VOCAB:
            setattr(out, k, 0)
        elif k.endswith("_token_id") and isinstance(v, list):
            setattr(out, k, [x for x in v if isinstance(x, int) and x < PROBE_VOCAB] or None)
        elif ("window" in k or k == "attention_chunk_size") and isinstance(v, int) and not isinstance(v, bool) \
                and v > PROBE_WINDOW:
            setattr(out, k, PROBE_WINDOW)
    return out


class _ZeroFfn(torch.nn.Module):
    """Stands in for an FFN block: zeros of its input's shape (with a second value where the layer unpacks two)."""

    def __init__(self, pair: bool) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> object:
        z = torch.zeros_like(x)
        return (z, None) if self.pair else z


def _without_ffns(cfg: PretrainedConfig, scale: float, pair: bool) -> torch.nn.Module:
    """The model `cfg` describes in float32 on the CPU, its FFN blocks replaced by _ZeroFfn before any weight is
    allocated (an MoE's experts never are), every other parameter set from its name (same name, same values)."""
    model = meta_model(cfg)
    prefix, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        *head, last = layer_ffn(layer, cfg.hidden_size, f"{prefix}.{i}").path.split(".")
        parent = layer.get_submodule(".".join(head)) if head else layer
        setattr(parent, last, _ZeroFfn(pair))
    model = model.to_empty(device="cpu").float()
    model.initialize_weights()  # buffers made on the meta device (rotary frequencies) are computed again
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def _logits(cfg: PretrainedConfig, scale: float) -> torch.Tensor:
    ids = torch.randint(0, PROBE_VOCAB, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    for pair in (False, True):  # the layer may unpack (hidden, router logits) from its FFN block
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _without_ffns(cfg, scale, pair)(input_ids=ids, use_cache=False).logits.float()
        except (TypeError, ValueError):
            continue
    raise ValueError(f"the {cfg.model_type} model does not run with its FFN blocks replaced")


def same_outside_ffns(reference: PretrainedConfig, candidate: PretrainedConfig) -> bool:
    """Whether `candidate` computes `reference`'s logits once both have their FFN blocks replaced by zeros (both
    probe-sized configs, see probe_config; the same parameter names outside the FFNs). Raises what building or
    running either model raises."""
    for scale in PROBE_SCALES:
        want, got = _logits(reference, scale), _logits(candidate, scale)
        if want.shape != got.shape or not torch.isfinite(want).all():
            return False
        if float((want - got).norm() / want.norm().clamp_min(1e-12)) > PROBE_TOLERANCE:
            return False
    return True
