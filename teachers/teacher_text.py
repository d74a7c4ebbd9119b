"""Sequence-level KD (Kim & Rush): text the teacher writes itself, added to the training sequences.

Each teacher sequence starts from the first `prompt` tokens of a training sequence (cycling through them, so any
number can be asked for: the supply does not run out when the corpus does) and the teacher samples the rest up to
the training length (core/sampling.py: batched, KV cache, compiled on GPU). An EOS does not stop it: what follows
is the teacher's next document, as packed training text holds several. The logits stage then labels these
sequences like the others, so the student learns the teacher's distribution on the teacher's own text too.

Generation is deterministic per batch: batch j (sequences j * batch_size ...) draws from a generator seeded by
(seed, j), so a part of the set can be made on its own (one process's share) and a rerun makes the same text.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core.sampling import sample_continuations

SOURCE = "teacher_text"  # the source name of these sequences in router analytics and records


def teacher_prompts(sequences: torch.Tensor, count: int, prompt: int) -> torch.Tensor:
    """The prompts of `count` teacher sequences: the first `prompt` tokens of sequences [N, S], cycling -> [count, prompt]."""
    idx = torch.arange(count) % sequences.shape[0]
    return sequences[idx, :prompt]


@torch.no_grad()
def write_teacher_text(teacher: torch.nn.Module, sequences: torch.Tensor, count: int, prompt: int, vocab: int,
                       temperature: float, batch_size: int, seed: int, start: int = 0, end: int | None = None,
                       save_to: Path | None = None) -> torch.Tensor:
    """Teacher sequences start..end (of `count`), each as long as sequences [N, S] -> [end - start, S] int64.

    `save_to`: a safetensors file holding them, written when made and read instead when it already holds this
    range (a killed logits stage does not sample again). Batches are aligned to `batch_size` over the whole set,
    so any range gives the same sequences as the whole set would.
    """
    end = count if end is None else end
    if save_to is not None and save_to.exists():
        saved = load_file(save_to)
        if int(saved["range"][0]) == start and int(saved["range"][1]) == end:
            return saved["input_ids"]
    device = next(teacher.parameters()).device
    seq_tokens = sequences.shape[1]
    prompts = teacher_prompts(sequences, count, prompt)
    static = device.type == "cuda"
    out = []
    first = start // batch_size * batch_size
    bar = tqdm(total=end - start, desc="teacher text", unit="seq")
    for b in range(first, end, batch_size):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b // batch_size)
        batch = prompts[b:min(b + batch_size, count)].to(device)
        seqs = sample_continuations(teacher, batch, seq_tokens - prompt, vocab, temperature=temperature,
                                    generator=gen, static=static, compiled=static).cpu()
        lo, hi = max(start, b) - b, min(end, b + len(batch)) - b
        out.append(seqs[lo:hi])
        bar.update(hi - lo)
    bar.close()
    result = torch.cat(out).long() if out else torch.empty(0, seq_tokens, dtype=torch.long)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        tmp = save_to.with_suffix(".tmp")
        save_file({"input_ids": result.contiguous(), "range": torch.tensor([start, end])}, tmp)
        tmp.replace(save_to)
    return result
