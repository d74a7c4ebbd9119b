"""A tiny distillation run that tests start in a separate process, so that they can SIGKILL it.

    python -m tests.distill_child <ckpt_dir> <losses.jsonl> [--lora-rank R] [--sleep S] [--parallel P]
                                  [--stop-after N]

Under torchrun it is one process of a multi-process run (distill.parallel=P); --stop-after N ends every
process abruptly (no cleanup, like a kill) once it starts reading step N+1's data.

Also the one place the tiny data and models of the trainer tests are defined, so that parent and child
build exactly the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.config import DistillConfig
from logit_cache import topk_from_logits

VOCAB = 96


def tiny_dataset(n: int = 12, seq: int = 16, k: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        ids, lp, tail = topk_from_logits(torch.randn(seq, VOCAB, generator=g) * 2, k)
        items.append({"input_ids": torch.randint(0, VOCAB, (seq,), generator=g), "topk_ids": ids,
                      "topk_logprobs": lp, "tail_logmass": tail})
    return items


def tiny_llama(hidden: int = 32, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


def tiny_config(**kw) -> DistillConfig:
    base = dict(batch_size=4, micro_batch_size=2, epochs=3, warmup_steps=2, checkpoint_every=2, lr=1e-3)
    return DistillConfig(**{**base, **kw})


def main() -> None:
    from distill.trainer import train_student

    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt_dir")
    ap.add_argument("log")
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--parallel", default="ddp")
    ap.add_argument("--stop-after", type=int, default=0)
    args = ap.parse_args()
    cfg = tiny_config(lora_rank=args.lora_rank, parallel=args.parallel)
    data = tiny_dataset()
    if args.stop_after:
        data = _StopAfter(data, 1 + args.stop_after * cfg.batch_size // int(os.environ.get("WORLD_SIZE", "1")))

    def log(m: dict, step: int) -> None:
        with open(args.log, "a") as f:
            f.write(json.dumps({"step": step, "loss": m["loss"]}) + "\n")
        time.sleep(args.sleep)  # gives the parent a window to kill between steps

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from core import distributed

        distributed.setup("cpu")
    train_student(tiny_llama(), data, cfg, Path(args.ckpt_dir), VOCAB, torch.device("cpu"), log)


class _StopAfter(list):
    """The data, until `reads` items have been read (the trainer reads one item first, then its share of each
    step); then the process ends at once."""

    def __init__(self, items: list, reads: int):
        super().__init__(items)
        self.left = reads

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.left == 0:
            os._exit(0)
        self.left -= 1
        return super().__getitem__(i)


if __name__ == "__main__":
    main()
