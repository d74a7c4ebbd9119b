"""Where a causal LM keeps its decoder layers, experts and routers, found by structure rather than by names.

Most transformers models answer `get_decoder().layers`, but not all (Llama 4's `get_decoder()` is the
causal-LM module itself, multimodal wrappers nest a text model). The decoder layers are the one
`nn.ModuleList` with `num_hidden_layers` entries, which every family has.

In each decoder layer of an MoE (`moe_layers`):
- the experts are the module(s) holding the expert weights: a parameter of >= 3 dims whose leading dim is the
  number of experts E (transformers 5's fused [E, ...] layout), or a ModuleList of E experts (older code);
- the MoE block is their parent (the `mlp` of most families, the decoder layer itself in Gemma 4);
- the router is what the block calls to choose experts: a descendant of the block outside the experts that
  holds an [E, *] weight. Static discovery can only rank candidates (a shared expert of width E looks the
  same), so `routing_tap.RoutingTap` hooks them all and keeps, per layer, the outermost one whose output reads as routing
  over the layer's tokens (`read_routing`), e.g. HunYuan's `gate` (logits, weights, indices) over `gate.wg`.
Layers without experts (DeepSeek's first_k_dense_replace, Jamba's attention-only MoE interleave) are dense.

`check_moe_layout` runs the static part on a model built on the meta device: cheap, and before any weight
is read, so a teacher whose MoE blocks cannot be found is refused in one line instead of hours later.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import UnsupportedModelError
from teachers.moe_config import NOT_TEXT, config_num_experts, experts_at_layer, experts_per_token, num_layers


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted path, module list) of the decoder layers: the ModuleList of `num_hidden_layers` entries
    (the shortest path if several, e.g. a vision tower of the same depth sits deeper in its own branch).
    A family whose layers hold several sublayers each (LongCat-Flash: num_hidden_layers = 2 x the list) has
    none of that length; its decoder stack is then the ModuleList holding the most parameters."""
    want = num_layers(model.config)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    found = [f for f in lists if len(f[1]) == want]
    text = [f for f in found if not any(w in f[0] for w in NOT_TEXT)]
    if text or found:
        return min(text or found, key=lambda f: (f[0].count("."), f[0]))
    sized = [(sum(p.numel() for p in m.parameters()), name, m) for name, m in lists
             if not any(w in name for w in NOT_TEXT) and len(m) > 1]
    if not sized:
        raise UnsupportedModelError(f"no list of {want} decoder layers in {type(model).__name__}")
    _, name, m = max(sized, key=lambda s: s[0])
    return name, m


def decoder_module(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (embeddings, layers, final norm; its output has
    `last_hidden_state`): `get_decoder()` where that is a separate module, else the owner of the layer list
    (Llama 4's `get_decoder()` returns the causal LM itself)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    if dec is not None and dec is not base and hasattr(dec, "layers"):
        return dec
    path, _ = decoder_layers(base)
    return base.get_submodule(path.rsplit(".", 1)[0]) if "." in path else base


@dataclass(frozen=True, eq=False)
class MoeLayer:
    """The routed part of one decoder layer. Paths are dotted names in the model (`model.named_modules()`).

    experts: the module(s) holding the expert weights, usually one (JetMoE splits them in two);
    routers: router candidates, outermost first (`router` is the best static guess; `RoutingTap` confirms
    which one returns routing at the first forward); empty when the block has no [E, *] weight outside its
    experts (e.g. hash routing): the layer is routed but its routing cannot be read.
    """

    index: int
    block_path: str
    block: torch.nn.Module
    expert_paths: tuple[str, ...]
    experts: tuple[torch.nn.Module, ...]
    router_paths: tuple[str, ...]
    routers: tuple[torch.nn.Module, ...]
    num_experts: int
    top_k: int

    @property
    def router(self) -> torch.nn.Module | None:
        return self.routers[0] if self.routers else None

    @property
    def router_path(self) -> str | None:
        return self.router_paths[0] if self.router_paths else None


def holds_experts(module: torch.nn.Module, num_experts: int | None = None) -> bool:
    """Whether `module` itself holds the experts' weights: a direct [E, ...] parameter of >= 3 dims
    (transformers 5's fused layout; a convolution's weight is not one), or E entries of one type with
    parameters (a ModuleList of experts). `num_experts` None: any E > 1 (the fused form only), in at least
    two such parameters (experts project in and out), so that a lone many-dim parameter elsewhere (a linear
    attention's A_log [1, 1, heads, 1], a hand-made convolution kernel) is not taken for experts."""
    if isinstance(module, torch.nn.ModuleList):
        return (num_experts is not None and len(module) == num_experts and len({type(m) for m in module}) == 1
                and any(True for _ in module[0].parameters()))
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return False
    if num_experts is None:
        return sum(p.dim() >= 3 and p.shape[0] > 1 for p in module.parameters(recurse=False)) >= 2
    return any(p.dim() >= 3 and p.shape[0] == num_experts for p in module.parameters(recurse=False))


def _within(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def router_candidates(block: torch.nn.Module, expert_names: list[str], num_experts: int) -> list[str]:
    """Names (relative to `block`) of the descendants that could be its router: outside the experts, holding
    a 2-dim parameter with a dim of E to 2E (a router's [E, H] projection; some score up to E extra 'null'
    experts: Zaya, Inkling, LongCat-Flash). Those with a dim of exactly E first; each group outermost first,
    then in block order."""
    out = []
    for name, m in block.named_modules():
        if not name or any(_within(name, e) or _within(e, name) for e in expert_names):
            continue
        dims = {d for p in m.parameters() if p.dim() == 2 for d in p.shape if num_experts <= d <= 2 * num_experts}
        if dims:
            out.append((num_experts not in dims, name.count("."), len(out), name))
    return [name for *_, name in sorted(out)]


def _layer_moe(model_config: object, index: int, prefix: str, layer: torch.nn.Module) -> MoeLayer | None:
    num_experts = experts_at_layer(model_config, index)
    if num_experts <= 1:
        return None
    holders = [(n, m) for n, m in layer.named_modules() if holds_experts(m, num_experts)]
    holders = [(n, m) for n, m in holders if not any(o != n and _within(n, o) for o, _ in holders)]  # outermost
    if not holders:
        return None
    # One block per layer: the parent of the most expert weight (JetMoE also routes attention heads, over
    # fewer weights than its FFN experts).
    blocks: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    for n, m in holders:
        blocks.setdefault(n.rpartition(".")[0], []).append((n, m))
    block_name, members = max(blocks.items(), key=lambda b: sum(p.numel() for _, m in b[1] for p in m.parameters()))
    block = layer.get_submodule(block_name) if block_name else layer
    rel = [n[len(block_name) + 1:] if block_name else n for n, _ in members]
    routers = router_candidates(block, rel, num_experts)
    full = f"{prefix}.{block_name}" if block_name else prefix

    def path(name: str) -> str:
        return f"{full}.{name}"

    return MoeLayer(index=index, block_path=full, block=block, expert_paths=tuple(path(n) for n in rel),
                    experts=tuple(m for _, m in members), router_paths=tuple(path(n) for n in routers),
                    routers=tuple(block.get_submodule(n) for n in routers), num_experts=num_experts,
                    top_k=experts_per_token(model_config, index))


def moe_layers(model: torch.nn.Module) -> list[MoeLayer]:
    """The routed decoder layers of `model`, in order (dense layers and dense models give none)."""
    if not config_num_experts(model.config):
        return []
    prefix, layers = decoder_layers(model)
    found = [_layer_moe(model.config, i, f"{prefix}.{i}", layer) for i, layer in enumerate(layers)]
    return [f for f in found if f is not None]


# ------------------------------------------------------------------------------------------ pre-run check ---

def expert_tables(model: torch.nn.Module, experts: int) -> str:
    """The [experts, hidden] parameters of the last decoder layer, where it has two or more (an expert per row, in
    and out: retrieval experts such as Doge's product-key ones, a vector each; a router alone is one such
    table), as "path [E, H], ..."; "" otherwise."""
    prefix, layers = decoder_layers(model)
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    if not len(layers) or hidden is None:
        return ""
    last = len(layers) - 1  # the last layer: families with dense first layers route from there on
    found = [f"{prefix}.{last}.{name} {list(p.shape)}" for name, p in layers[last].named_parameters()
             if tuple(p.shape) == (experts, hidden)]
    return ", ".join(found[:4]) if len(found) >= 2 else ""


def some_layers(indices: list[int]) -> str:
    """Layer indices for a one-line message: all of them when few."""
    if len(indices) <= 6:
        return ", ".join(map(str, indices))
    return f"{indices[0]}, {indices[1]}, ... {indices[-1]} ({len(indices)} layers)"


def check_moe_layout(config: object, trust_remote_code: bool = False, allow_dense: bool = False) -> list[str]:
    """Find the MoE blocks, experts and routers of the model `config` describes, built on the meta device
    (no weights, no memory). Returns notes for the user (e.g. router analytics that will be skipped);
    raises UnsupportedModelError, one line, when the config cannot build a model or declares experts that no
    decoder layer holds; with `allow_dense` the latter is a note instead: the teacher runs as a dense model
    (its logits through its own forward; no router analytics, no derived student). A dense config returns no
    notes (whether dense is allowed is decided elsewhere)."""
    from transformers import AutoModelForCausalLM

    experts = config_num_experts(config)
    if not experts:
        return []
    model_type = getattr(config, "model_type", type(config).__name__)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any construction failure is the config's, said in one line
        msg = " ".join(str(e).split())[:300]
        raise UnsupportedModelError(
            f"this {model_type} config cannot build a model ({type(e).__name__}: {msg}); use the checkpoint's "
            "complete config.json (defaults of some families are incomplete)") from e
    layers = moe_layers(model)
    if not layers:
        if tables := expert_tables(model, experts):
            why = (f"the {model_type} config declares {experts} experts, stored as rows of 2-D tables ({tables}): "
                   "experts of one vector each, picked per token (retrieval experts, e.g. product keys), which "
                   "this pipeline cannot route, fuse or merge")
        else:
            why = (f"the {model_type} config declares {experts} experts but no decoder layer holds them (no "
                   f"parameter [{experts}, ...] of 3+ dims nor a list of {experts} experts): this pipeline cannot "
                   "find its MoE blocks")
        if allow_dense:
            return [f"{why}; teacher_options.allow_dense: it runs as a dense teacher (its logits from its own "
                    "forward, no router analytics, no derived student: give STUDENT=<dense model>)"]
        raise UnsupportedModelError(f"{why}; use a teacher whose experts this pipeline finds (a transformers MoE "
                                    "family), or set teacher_options.allow_dense=true to distill it as a dense "
                                    "teacher into a dense STUDENT of your choice")
    notes = []
    bare = [m.index for m in layers if not m.routers]
    if bare:
        notes.append(f"router analytics will be skipped: no router (a module with an [{experts}, *] weight "
                     f"outside the experts) found in decoder layers {some_layers(bare)}")
    if not all(m.top_k for m in layers):
        notes.append("the config declares no experts-per-token (top-k); routers returning bare logits cannot "
                     "be read, and their analytics would be skipped")
    dense = len(decoder_layers(model)[1]) - len(layers)
    notes.append(f"{model_type}: {len(layers)} MoE layers ({experts} experts, top-{layers[0].top_k or '?'}) "
                 f"and {dense} dense; router {layers[0].router_path or 'not found'}")
    return notes
