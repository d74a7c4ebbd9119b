"""On-policy distillation (GKD, MiniLLM): the student learns on text it wrote itself, scored by the teacher.

Off-policy KD (the cache) only ever shows the student the teacher's text; at inference the student conditions on
its own tokens, and its errors compound where it was never corrected. On an on-policy step each sequence of the
micro-batch is cut to a prompt (its first `prompt` tokens of training text), the student samples `new` tokens
after it (core/sampling.py: batched, KV cache, compiled on GPU), the teacher scores the whole sequence online, and
the loss is the chosen divergence (reverse KL by default, GKD's generalised JSD, forward KL, ...) between the
teacher's and the student's next-token distributions at the sampled positions only. The student's sample is
the data, not a label: there is no cross-entropy term on those steps.

Which steps are on-policy is a pure function of the step index: step s is when floor((s + 1) r) > floor(s r),
exactly round(r n) of the first n steps, spread evenly, the rest off-policy on the cache. Each micro-batch draws
from a torch.Generator seeded by (seed, step, process, micro-batch), so a resumed run samples the same tokens
without any sampling state in the checkpoint.

A sampled EOS ends that sequence's sample: the positions after it carry no loss (the teacher never saw a
document continue past its end in a way the student should learn from).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from core.sampling import sample_continuations


def is_on_policy_step(step: int, rate: float) -> bool:
    """Whether optimizer step `step` (from 0) trains on the student's samples, at share `rate` in [0, 1]."""
    return math.floor((step + 1) * rate) > math.floor(step * rate)


def sampling_seed(seed: int, step: int, process: int, micro_batch: int) -> int:
    """The generator seed of one micro-batch's sampling: distinct for every (step, process, micro-batch)."""
    return (seed * 1_000_003 + step * 10_007 + process * 101 + micro_batch) % (2**63 - 1)


def split_lengths(seq_tokens: int, prompt: int, new: int) -> tuple[int, int]:
    """(prompt tokens, sampled tokens) for training sequences of `seq_tokens` tokens; 0 means the default
    (half the sequence as prompt, the rest sampled). Raises ValueError when they do not fit."""
    p = prompt or max(1, seq_tokens // 2)
    n = new or seq_tokens - p
    if not 1 <= p < seq_tokens:
        raise ValueError(f"distill.on_policy_prompt={prompt} must be between 1 and {seq_tokens - 1} (the training "
                         f"sequences hold {seq_tokens} tokens)")
    if n < 1 or p + n > seq_tokens:
        raise ValueError(f"distill.on_policy_prompt + on_policy_tokens = {p} + {n} must be at most the "
                         f"{seq_tokens} tokens of a training sequence (the teacher's context was checked for those)")
    return p, n


def loss_rows(sequences: torch.Tensor, prompt: int, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """Which predicted positions of sequences [B, L] carry the on-policy loss -> row indices into the
    B * (L - 1) flattened positions (position j predicts token j + 1): the sampled tokens, each sequence's up
    to and including its first sampled EOS."""
    b, length = sequences.shape
    sampled = sequences[:, prompt:]
    keep = torch.ones_like(sampled, dtype=torch.bool)
    if eos_ids:
        is_eos = torch.isin(sampled, torch.tensor(eos_ids, device=sampled.device))
        # positions strictly after the first EOS: an EOS has been seen before them
        after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        keep = ~after
    # sampled token t of sequence i is predicted at position prompt + t - 1 of that sequence
    pos = torch.arange(prompt - 1, length - 1, device=sequences.device)
    rows = torch.arange(b, device=sequences.device)[:, None] * (length - 1) + pos[None, :]
    return rows[keep]


def eos_ids(config: object) -> tuple[int, ...]:
    """The model config's EOS id(s) as a tuple (empty when it has none)."""
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@dataclass(frozen=True)
class OnPolicy:
    """The on-policy side of a training run: the share of steps, the lengths, the sampling temperature."""

    rate: float
    prompt: int
    new: int
    temperature: float
    seed: int
    eos: tuple[int, ...]

    def takes(self, step: int) -> bool:
        return is_on_policy_step(step, self.rate)

    def sample(self, student: torch.nn.Module, input_ids: torch.Tensor, vocab_size: int, step: int, process: int,
               micro_batch: int, static: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's continuations of the prompts cut from input_ids [B, S] -> (sequences [B, prompt + new],
        loss rows into their B * (prompt + new - 1) predicted positions)."""
        gen = torch.Generator(device=input_ids.device).manual_seed(sampling_seed(self.seed, step, process, micro_batch))
        seqs = sample_continuations(student, input_ids[:, :self.prompt], self.new, vocab_size,
                                    temperature=self.temperature, generator=gen, static=static, compiled=static)
        return seqs, loss_rows(seqs, self.prompt, self.eos)


class SamplingTwin:
    """A bf16 copy of the student that samples on GPU, its weights refreshed in place from the trained ones.

    The student trains from float32 master weights under bf16 autocast, where a static KV cache cannot work:
    RoPE promotes the keys to float32 while the values stay bf16, and the cache holds one dtype. The twin is
    bf16 throughout, so its cache is too, and since `refresh` copies into the same tensors, the compiled decode
    step (and its CUDA graphs) stays valid from step to step. Costs 2 bytes per parameter of GPU memory.
    """

    def __init__(self, student: torch.nn.Module) -> None:
        twin = copy.deepcopy(student)
        for m in twin.modules():  # hooks of the training (layer taps) belong to the student, not to the twin
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        self.model = twin.to(torch.bfloat16).eval().requires_grad_(False)
        self._src = list(student.parameters()) + list(student.buffers())
        self._dst = list(self.model.parameters()) + list(self.model.buffers())

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the student's current weights into the twin (cast to bf16)."""
        torch._foreach_copy_(self._dst, self._src)
