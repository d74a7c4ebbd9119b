"""Top-k selection of a teacher's logits and the fidelity of the cached top-k reconstruction.

What the teacher keeps per token (top-k ids, their log-probs and the tail mass) and how far the
reconstruction from those is from the full distribution; pure tensor math, independent of the file format.
"""
from __future__ import annotations

import math

import torch

from kernels import topk_tail


def topk_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (ids [..., k] int64, logprobs [..., k] f32, tail_logmass [...] f32).

    Float32 math regardless of input dtype. The tail is logsumexp over the
    non-top-k logits (not log1p(-sum p)), so it stays accurate when the top-k
    holds nearly all the mass; it is -inf when k == V.
    """
    x = logits.to(torch.float32)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    vals, ids = torch.topk(x, k, dim=-1)
    rest = x.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) - lse.squeeze(-1)
    return ids, vals - lse, tail


# Columns per block of block_topk: the candidates are k blocks of this many, so their top-k is a small sort.
TOPK_BLOCK = 64


def block_topk(x: torch.Tensor, k: int, block: int = TOPK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, dim=-1) for x [N, V] (values sorted, largest first; ids int64 [N, k]) through the maxima
    of blocks of `block` columns: the k largest entries lie in the k blocks with the largest maxima (each block
    holding one of them has a maximum at least as large as the k-th value; with ties, the k chosen blocks still
    hold every entry above the k-th value and enough entries equal to it). So one pass takes each block's maximum,
    a top-k over those (V / block of them) picks k blocks, and a top-k over their k x block entries (and the
    last V mod block columns, kept whole) gives the result. The same values as torch.topk, exactly; among equal
    values the ids may differ. torch.topk on a bf16 row of 151,936 logits is a multi-pass radix select: 1.5x the
    head's matmul on an H200 (bench/results/head_topk_h200.csv). Small rows (under 4k blocks) go to torch.topk."""
    n, v = x.shape
    nb = v // block
    if nb < 4 * k or x.stride(-1) != 1:
        return torch.topk(x, k, dim=-1)
    main = x[:, :nb * block].unflatten(-1, (nb, block))  # [N, nb, block], a view
    best = torch.topk(main.amax(-1), k, dim=-1).indices  # [N, k] blocks
    cand = main.gather(1, best[..., None].expand(n, k, block)).flatten(1)  # [N, k * block]
    cand_ids = (best[..., None] * block + torch.arange(block, device=x.device)).flatten(1)
    if nb * block < v:  # the last, partial block: every column is a candidate
        cand = torch.cat((cand, x[:, nb * block:]), 1)
        tail_ids = torch.arange(nb * block, v, device=x.device).expand(n, -1)
        cand_ids = torch.cat((cand_ids, tail_ids), 1)
    vals, pos = torch.topk(cand, k, dim=-1)
    return vals, cand_ids.gather(1, pos)


def topk_select(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_from_logits(logits, k) for [N, V] logits, in two passes over them instead of about ten
    (`topk_two_pass`). Returns ids [N, k] int64, logprobs [N, k] float32, tail_logmass [N] float32 (-inf when
    k == V).

    `topk_one_read` gives the same in one read and was 2.2-2.5x faster on its own on an H200
    (bench/results/head_topk_h200.csv), but the logits stage does not see it: three interleaved stage runs of each
    read 60.8k / 61.9k / 62.9k tokens/s on this path and 62.3k / 60.4k / 63.9k on that one
    (bench/results/teacher_scale_selection_h200.csv; an earlier single run's 55.5k was noise). The head's
    selection is a small share of a batch, so the path the stage was first measured on stays."""
    return topk_two_pass(logits, k)


def topk_two_pass(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_select's path: the top-k (block_topk) in the logits' own dtype (converting bf16 or fp16 to float32 is
    exact and keeps the order), then one pass for the log-normaliser and the logsumexp below the k-th value
    (kernels.topk_tail.row_stats); the tail joins the latter with the entries equal to the k-th value that the
    top-k left out."""
    vals, ids = block_topk(logits, k)
    vals = vals.float()
    kth = vals[:, -1].contiguous()
    lse, below, n_eq = topk_tail.row_stats(logits, kth)
    left_out = n_eq - (vals == kth[:, None]).sum(-1)  # ties at the k-th value outside the top-k
    ties = kth + torch.log(left_out.clamp(min=1).float())
    tail = torch.where(left_out > 0, torch.logaddexp(below, ties), below)
    return ids, vals - lse[:, None], tail - lse


def topk_one_read(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_select in one read of the logits [N, V] (CUDA tensors, or the interpreter with
    kernels.topk_tail.TRITON_ON_CPU; at least k blocks of TOPK_BLOCK columns): each block's maximum and logsumexp
    (kernels.topk_tail.block_stats), the k blocks with the largest maxima (they hold the top-k: block_topk's
    argument), a top-k over their entries. Every entry outside those blocks is at most the k-th value (the k chosen maxima are k entries at least as
    large as any other block's maximum), so the tail is exactly the logsumexp of the other blocks joined with the
    chosen blocks' entries the final top-k left out: a sum of what is outside, never a difference."""
    n, v = logits.shape
    if -(-v // TOPK_BLOCK) < k:
        raise ValueError(f"topk_one_read needs at least k = {k} blocks of {TOPK_BLOCK} columns; V = {v} has fewer")
    bmax, blse = topk_tail.block_stats(logits, TOPK_BLOCK)
    lse = torch.logsumexp(blse, -1)
    best = torch.topk(bmax, k, dim=-1).indices  # [N, k]
    cols = (best[..., None] * TOPK_BLOCK + torch.arange(TOPK_BLOCK, device=logits.device)).flatten(1)
    cand = logits.gather(1, cols.clamp(max=v - 1)).float()
    cand = cand.masked_fill(cols >= v, float("-inf"))  # past the last column: the last block is partial
    vals, pos = torch.topk(cand, k, dim=-1)
    others = blse.scatter(1, best, float("-inf"))
    left = cand.scatter(1, pos, float("-inf"))
    tail = torch.logaddexp(torch.logsumexp(others, -1), torch.logsumexp(left, -1))
    return cols.gather(1, pos), vals - lse[:, None], tail - lse


# Rows of one chunk of topk_from_hidden: about this many bytes of [rows, V] logits (the product in the model's
# dtype, and on CPU the float32 copies of topk_select's PyTorch path), so the full [tokens, V] logits never
# exist at once.
CHUNK_BYTES = 1 << 30


def topk_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, k: int, vocab: int,
                     chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_from_logits(hidden @ weight[:vocab].T) without the whole product: per chunk of rows, each through
    topk_select.

    hidden [N, H] (the model's last hidden states, after its final norm), weight [V', H] its output matrix
    (V' >= vocab; rows past `vocab` are padding and never a target). Returns ids [N, k] int64, logprobs [N, k]
    float32, tail_logmass [N] float32. The product is taken in the inputs' dtype like the model's own head
    (F.linear); the statistics in float32, as topk_from_logits computes them.
    """
    n = hidden.shape[0]
    w = weight[:vocab]
    rows = max(1, chunk_bytes // (vocab * (hidden.element_size() + 8)))
    ids = torch.empty(n, k, dtype=torch.int64, device=hidden.device)
    lps = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
    tail = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, rows):
        ids[s:s + rows], lps[s:s + rows], tail[s:s + rows] = topk_select(
            torch.nn.functional.linear(hidden[s:s + rows], w), k)
    return ids, lps, tail


def cache_fidelity_kl(full_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                      tail: torch.Tensor, chunk: int = 256) -> float:
    """Mean over N of KL(teacher_full || reconstructed), in nats.

    full_logits [N, V], ids [N, k], logprobs [N, k], tail [N]. The
    reconstruction puts exp(logprobs) on ids and exp(tail) spread uniformly
    over the other V-k ids, then renormalizes (quantization leaves the total
    a hair off 1; a proper distribution keeps KL >= 0).
    """
    n, v = full_logits.shape
    k = ids.shape[-1]
    total = 0.0
    for s in range(0, n, chunk):
        p = torch.log_softmax(full_logits[s:s + chunk].to(torch.float64), dim=-1)
        t = tail[s:s + chunk].to(torch.float64)
        fill = t - math.log(v - k) if v > k else torch.full_like(t, float("-inf"))
        logq = fill.unsqueeze(-1).expand_as(p).clone()
        logq.scatter_(-1, ids[s:s + chunk].long(), logprobs[s:s + chunk].to(torch.float64))
        logq = torch.log_softmax(logq, dim=-1)
        pe = p.exp()
        total += torch.where(pe > 0, pe * (p - logq), 0.0).sum().item()
    return total / n
