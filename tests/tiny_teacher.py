"""The tiny random Mixtral teacher the pipeline tests run on: a complete model folder (safetensors, config,
SmolLM2's real tokenizer), so it passes every check a user's teacher passes. One definition, used through the
`tiny_moe_dir` fixture (tests/conftest.py) or directly where a test needs another size."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_tiny_mixtral(out: Path, tokenizer_dir: Path, **config: Any) -> Path:
    """Save a random Mixtral (seed 0; 64 wide, 4 layers, 4 experts top-2 unless `config` says otherwise) with the
    tokenizer at `tokenizer_dir` into `out`, and return `out`."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**{**settings, **config})).save_pretrained(out)
    tok.save_pretrained(out)
    return out
