"""Reading what a router returns, whatever its form, as (weights [T, k], expert indices [T, k]).

transformers 5 routers return (logits, top-k weights, top-k indices); others return the sparse scores and the
logits (Llama 4), indices with logits, or bare logits that the block turns into top-k itself. `read_routing`
reads each form; `RoutingTap` hooks every router candidate `moe_layout.moe_layers` found, keeps per layer
the outermost one whose output reads as routing over the layer's tokens, and hands each call's `Routing` to a
callback. A layer whose routing cannot be read is skipped with one logged line, never a crash.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from teachers.moe_config import config_num_experts
from teachers.moe_layout import decoder_module, moe_layers, some_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routing:
    """One router call over T tokens: weights [T, k] float32 and expert indices [T, k] int64, as the block
    uses them. Indices >= the layer's expert count are 'null' experts some families route to (LongCat's
    zero-computation experts); consumers skip them. `approximate`: read from bare logits (softmax, then
    top-k), so the indices are exact for top-k routing but the weights may not be what the block applies."""

    weights: torch.Tensor
    indices: torch.Tensor
    approximate: bool = False


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _per_token(t: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """t as [tokens, d] if its leading dims flatten to `tokens` rows, else None."""
    if t.dim() < 2 or t.shape[-1] == 0 or t.numel() // t.shape[-1] != tokens:
        return None
    return t.reshape(tokens, t.shape[-1])


def read_routing(out: Any, num_experts: int, top_k: int, tokens: int) -> Routing | None:
    """Normalise a router's output over `tokens` tokens to `Routing`, whatever its form; None if unreadable.

    Forms, tried in order:
    - a tuple holding integer indices [.., k] with float weights of the same shape (transformers 5's
      (logits, weights, indices), HunYuan's gate, Zaya's 4-tuple): exact;
    - integer indices with logits [.., E] but no weights: the softmax of the logits at the indices, approximate;
    - a float [T, E] with at most `top_k` non-zeros per row (Llama 4's sparse sigmoid scores, next to its
      logits): indices are its top-k, weights the scores there, exact;
    - bare logits [T, E] (or [E, T]): softmax then top-k, approximate.
    """
    if tokens <= 0:
        return None
    ts = _tensors(out)
    floats = [(i, t) for i, t in enumerate(ts) if t.is_floating_point()]
    wide = []  # float [T, E]
    for _, t in floats:
        rows = _per_token(t, tokens)
        if rows is None and t.dim() == 2 and t.shape == (num_experts, tokens) and tokens != num_experts:
            rows = t.t()
        if rows is not None and rows.shape[-1] == num_experts:
            wide.append(rows)
    for i in reversed(range(len(ts))):
        idx = ts[i]
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
            continue
        idx_rows = _per_token(idx, tokens)
        if idx_rows is None:
            continue
        same = [(abs(j - i) + (0.5 if j > i else 0), t) for j, t in floats if t.shape == idx.shape]
        if same:  # the weights: the float of the indices' shape nearest them (before them on a tie)
            w = min(same, key=lambda s: s[0])[1]
            return Routing(w.reshape(idx_rows.shape).float(), idx_rows.long())
        if wide:
            probs = torch.softmax(wide[-1].float(), -1)
            return Routing(probs.gather(-1, idx_rows.long().clamp(0, num_experts - 1)), idx_rows.long(), True)
    if top_k <= 0 or top_k > num_experts:
        return None
    for rows in wide:
        if int((rows != 0).sum(-1).max()) <= top_k:
            w, idx = rows.float().topk(top_k, dim=-1)
            return Routing(w, idx.long())
    if wide:
        w, idx = torch.softmax(wide[-1].float(), -1).topk(top_k, dim=-1)
        return Routing(w, idx.long(), True)
    return None


def describe_output(out: Any) -> str:
    """A router output's form for a log line, e.g. "tuple(float32[6, 4], int64[6, 2])"."""
    ts = _tensors(out)
    inner = ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in ts)
    return f"{type(out).__name__}({inner})"


def _tokens_in(args: tuple, kwargs: dict) -> int:
    """Tokens in a module's input: its first tensor's rows ([B, S, H] or [T, H] -> T)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.numel() // a.shape[-1] if a.dim() else 0
    return 0


class RoutingTap:
    """Forward hooks that hand over each routed layer's `Routing` on every forward of `model`.

    Use as a context manager around forwards of the model itself (`model(...)`). During the first forward
    every router candidate of every MoE layer is hooked and read; when it returns, each layer keeps its first
    candidate (outermost) that read exactly, else the first that read approximately, and the rest are
    unhooked; the first forward's routing is then handed over, so nothing is lost to the discovery. When a
    layer has no candidate that reads (statically or at that forward), `on_skip(reason)` is called once,
    the hooks are removed and nothing more is handed over.

    on_routing(j, routing): j indexes `layers` (the MoE layers, in order).
    """

    def __init__(self, model: torch.nn.Module, on_routing: Callable[[int, Routing], None],
                 on_skip: Callable[[str], None]) -> None:
        self.model = model
        self.layers = moe_layers(model)
        self.on_routing, self.on_skip = on_routing, on_skip
        self.skipped: str | None = None
        self.chosen: list[int] | None = None  # per MoE layer: index into its router candidates
        self.approximate = False
        self._tokens: list[int | None] = [None] * len(self.layers)  # per MoE layer, set by its block
        self._first: list[dict[int, Routing]] = [{} for _ in self.layers]
        self._forms: list[dict[int, str]] = [{} for _ in self.layers]
        self._hooks: dict[tuple[int, int], Any] = {}
        self._other: list[Any] = []

    def static_problem(self) -> str | None:
        """Why routing cannot be read, known before any forward (None when it may be)."""
        if not self.layers:
            return (f"no MoE block found in the {self.model.config.model_type} model (no module holding "
                    f"{config_num_experts(self.model.config)} experts' weights in its decoder layers)")
        bare = [m.index for m in self.layers if not m.routers]
        if bare:
            return f"no router (a module with an [E, *] weight outside the experts) in decoder layers {some_layers(bare)}"
        return None

    def _skip(self, reason: str) -> None:
        if self.skipped is None:
            self.skipped = reason
            self._remove()
            self.on_skip(reason)

    def _router_hook(self, j: int, c: int):
        layer = self.layers[j]

        def fn(_mod: torch.nn.Module, args: tuple, out: Any) -> None:
            if self.skipped is not None:
                return
            tokens = self._tokens[j]
            if tokens is None:  # a block driven through other methods than forward (JetMoE's MoA)
                tokens = _tokens_in(args, {})
            routing = read_routing(out, layer.num_experts, layer.top_k, tokens)
            if self.chosen is None:  # discovering: keep what each candidate returned
                self._forms[j][c] = describe_output(out)
                if routing is not None:
                    self._first[j][c] = routing
            elif routing is None:
                self._skip(f"the router {layer.router_paths[c]} returned {describe_output(out)}, which does not "
                           f"read as routing over {tokens} tokens")
            else:
                self.on_routing(j, routing)
        return fn

    def _tokens_hook(self, j: int):
        def fn(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._tokens[j] = _tokens_in(args, kwargs)
        return fn

    def _resolve(self, _mod: torch.nn.Module, _args: tuple, _out: Any) -> None:
        if self.chosen is not None or self.skipped is not None:
            return
        chosen = []
        for j, layer in enumerate(self.layers):
            got = self._first[j]
            exact = [c for c in sorted(got) if not got[c].approximate]
            pick = (exact or sorted(got) or [None])[0]
            if pick is None:
                forms = "; ".join(f"{layer.router_paths[c]} -> {f}" for c, f in sorted(self._forms[j].items()))
                self._skip(f"no router output of decoder layer {layer.index} reads as routing over its tokens "
                           f"({forms or 'no candidate was called'})")
                return
            chosen.append(pick)
        self.chosen = chosen
        self.approximate = any(self._first[j][c].approximate for j, c in enumerate(chosen))
        for (j, c), h in list(self._hooks.items()):
            if c != chosen[j]:
                h.remove()
                del self._hooks[(j, c)]
        first, self._first = self._first, []
        for j, c in enumerate(chosen):
            self.on_routing(j, first[j][c])

    def __enter__(self) -> "RoutingTap":
        problem = self.static_problem()
        if problem is not None:
            self._skip(problem)
            return self
        for j, layer in enumerate(self.layers):
            self._other.append(layer.block.register_forward_pre_hook(self._tokens_hook(j), with_kwargs=True))
            for c, r in enumerate(layer.routers):
                if self.chosen is None or self.chosen[j] == c:
                    self._hooks[(j, c)] = r.register_forward_hook(self._router_hook(j, c))
        if self.chosen is None:
            # The routing is resolved when a forward ends: the model's own, or its decoder's alone (the logits
            # stage runs the decoder and takes the head chunk by chunk); the second call finds it resolved.
            ends = {id(m): m for m in (self.model, decoder_module(self.model))}
            self._other += [m.register_forward_hook(self._resolve) for m in ends.values()]
        return self

    def _remove(self) -> None:
        for h in [*self._hooks.values(), *self._other]:
            h.remove()
        self._hooks, self._other = {}, []

    def __exit__(self, *exc: object) -> None:
        self._remove()
