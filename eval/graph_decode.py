"""Greedy decode with each step replayed from one CUDA graph: the model's own time per output token.

`generate` runs a Python loop around every decode step (logits processors, the stopping check, cache
bookkeeping). With the static cache and the compiled step, that loop is what batch-1 decode of a small model
waits for: on one H200 a 13- and a 16-layer student both took 2.28 ms per token, and the 30-layer MoE teacher
3.54 (docs/results/flagship2). Serving engines capture the whole decode step instead and replay it. This does
the same: a static KV cache, the prompt prefilled eagerly, then one step (forward of the last token, argmax,
written back as the next input) captured once as a CUDA graph and replayed per token. Positions live on the
device (the static cache's own counter), so a replay needs nothing from the host. Sliding-window layers get a
full static cache (see `full_static_cache`).

On CPU there is no graph: `step` runs the same step eagerly, which is how the tests check the tokens against
`generate`.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer


def full_static_cache(model: PreTrainedModel, max_cache_len: int) -> StaticCache:
    """The model's static cache with every sliding-window (or chunked) layer replaced by a full static one of
    `max_cache_len` positions.

    transformers' sliding static layer keeps its fill level in a host integer and, once full, rolls the window
    with an index tensor it copies from the host at every step: a captured step would replay one branch forever,
    and the copy itself is refused during capture. A full layer writes at the device-side position, so every step
    is the same graph; the model's attention masks still apply the window (they are built from the config per
    layer type), so the tokens are the same, and the attention reads up to `max_cache_len` positions instead of
    the window's."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len) if isinstance(layer, StaticLayer) and layer.is_sliding
                    else layer for layer in cache.layers]
    return cache


class GraphDecoder:
    """Greedy decoding of `batch` rows of prompts of length `prompt_len` for up to `max_new` tokens.

        dec = GraphDecoder(model, batch=1, prompt_len=128, max_new=64)
        dec.prefill(ids)          # ids [batch, prompt_len] -> first token in dec.next_ids [batch, 1]
        for _ in range(63):
            dec.step()            # one more token, into dec.next_ids (a graph replay on CUDA)

    `capture()` (CUDA only) records the step; it needs a prefill before it, since the cache's tensors are made
    by the first write, and it leaves the cache advanced: prefill again before decoding for real.
    """

    def __init__(self, model: PreTrainedModel, batch: int, prompt_len: int, max_new: int) -> None:
        self.model = model
        self.cache = full_static_cache(model, prompt_len + max_new)
        device = next(model.parameters()).device
        self.next_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: list[torch.Tensor] = []  # what a caller asked to keep (see `keep`), one [batch] per step

    def _forward_pick(self, ids: torch.Tensor) -> None:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.next_ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))

    def prefill(self, ids: torch.Tensor) -> None:
        """Reset the cache (in place: a captured graph keeps its addresses) and run the prompt ids [B, P]."""
        self.cache.reset()
        self._forward_pick(ids)

    def capture(self, warmup: int = 2) -> None:
        """Record one decode step as a CUDA graph. Warm-up steps run first on a side stream, as CUDA graph
        capture requires (allocator and kernel selection settle there)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._forward_pick(self.next_ids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward_pick(self.next_ids)
        self.graph = graph

    def step(self) -> None:
        """One more token into `next_ids` [batch, 1]: the graph's replay when captured, else the step eagerly."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward_pick(self.next_ids)

    def keep(self) -> None:
        """Append a copy of the current `next_ids` to `tokens` (for checking the output, not while timing)."""
        self.tokens.append(self.next_ids[:, 0].clone())


def graph_decode(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int, capture: bool) -> torch.Tensor:
    """Greedy continuation of ids [B, P] by `new_tokens` tokens -> [B, new_tokens], through GraphDecoder
    (captured when `capture`, which needs CUDA). For tests and one-off use; timing uses GraphDecoder directly."""
    dec = GraphDecoder(model, ids.shape[0], ids.shape[1], new_tokens)
    with torch.inference_mode():
        if capture:
            dec.prefill(ids)
            dec.capture()
        dec.prefill(ids)
        dec.keep()
        for _ in range(new_tokens - 1):
            dec.step()
            dec.keep()
    return torch.stack(dec.tokens, dim=1)
