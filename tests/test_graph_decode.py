"""eval/graph_decode.py: greedy decode on a static cache, one step per call (a CUDA-graph replay on GPU), gives
generate's greedy tokens; the cache resets in place, so a second prefill decodes the same tokens again."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig

from eval.graph_decode import GraphDecoder, graph_decode

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=128),
    "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    # a window shorter than prompt + continuation: the static cache's sliding layers
    "mistral_window": lambda: MistralConfig(**SMALL, intermediate_size=128, sliding_window=6),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).to(DEV).eval()


def _generate(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tokens_match_generate(name: str) -> None:
    model = _model(name)
    if DEV == "cuda" and name == "mixtral":
        # In float32, transformers' grouped_mm experts copy a host tensor inside torch's grouped_mm, which capture
        # refuses (seen on an H200; bf16 captures, see the test below): float32 runs our kernels, which capture.
        from kernels.hf_moe import enable_fused_moe

        enable_fused_moe(model)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1)).to(DEV)
    ref = _generate(model, ids, 6)
    assert torch.equal(graph_decode(model, ids, 6, capture=DEV == "cuda"), ref)


def test_sliding_window_layers_get_a_full_static_cache() -> None:
    """A sliding static layer keeps its fill level on the host and copies an index from it once full, which
    capture refuses (seen on an H200): the decoder's cache has full layers only, of the whole length."""
    dec = GraphDecoder(_model("mistral_window"), batch=1, prompt_len=8, max_new=6)
    assert not any(dec.cache.is_sliding) and all(layer.max_cache_len == 14 for layer in dec.cache.layers)


def test_prefill_resets_the_cache_in_place() -> None:
    """A captured graph keeps the cache's addresses: a second prefill must reuse them and decode the same."""
    model = _model("llama")
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2)).to(DEV)
    dec = GraphDecoder(model, batch=1, prompt_len=5, max_new=4)
    runs = []
    with torch.inference_mode():
        for _ in range(2):
            dec.prefill(ids)
            dec.tokens.clear()
            dec.keep()
            for _ in range(3):
                dec.step()
                dec.keep()
            runs.append(torch.stack(dec.tokens, dim=1))
            addresses = [layer.keys.data_ptr() for layer in dec.cache.layers]
            if len(runs) == 1:
                first = addresses
    assert torch.equal(runs[0], runs[1]) and addresses == first
    assert torch.equal(runs[0], _generate(model, ids, 4))


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
def test_a_stock_bf16_moe_replays_its_own_eager_steps() -> None:
    """A stock MoE teacher in bf16 (transformers' grouped_mm experts) captures, and each replay gives the tokens
    of the same static-cache step run eagerly: the graph path times the stock teacher, not a failed entry."""
    model = _model("mixtral").to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1)).to(DEV)
    assert torch.equal(graph_decode(model, ids, 6, capture=True), graph_decode(model, ids, 6, capture=False))
