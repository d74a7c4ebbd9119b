"""Where a decoder layer keeps its feed-forward weights, found by structure rather than by parameter names.

Every family names its FFN differently (`mlp`, `feed_forward`, `block_sparse_moe`; `gate_proj`/`up_proj`/
`down_proj` or `w1`/`w3`/`w2`; fused experts `gate_up_proj` [E, 2W, H] or transposed [E, H, 2W]), but the
shapes say what each tensor is, given the hidden size H:
- a gated dense FFN is a module whose Linear children are two [W, H] (gate, up) and one [H, W] (down), or
  one fused [2W, H] (gate rows, then up rows) and one [H, W]; gate and up, alike in shape, are told apart by
  their names (gate/w1 before up/w3), else by order of definition, as every family defines gate first;
- routed experts are 3-d parameters [E, ., .] of one module: gate_up [E, 2W, H] and down [E, H, W], or
  both transposed (a module's own `is_transposed` flag, else the shapes, decide: when 2W == H the down
  projection's shape is unambiguous, and vice versa); gate rows come first, as in every transformers 5
  family that is not refused for its biases (GPT-OSS interleaves and has biases);
- shared experts are the gated dense FFNs inside the MoE block, and a Linear [1, H] beside them is their
  sigmoid gate (Qwen2-MoE, Qwen3-Next);
- anything else in the MoE block must be routing (a tensor with an axis of E: router weights, score
  biases; or any weight of a module scoring the experts, e.g. an MLP router); a parameter that is none of
  these (JetMoE's output bias) makes the layer unreadable, and it is refused rather than silently dropped.
  So are experts with biases or a non-SiLU activation.
Works on the meta device too (no weights read), which is how `check_derivable` inspects a teacher cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from core.errors import UnsupportedModelError
from teachers.moe_layout import holds_experts, router_candidates

Ffn = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [W, H], up [W, H], down [H, W]


@dataclass(frozen=True)
class GatedFfn:
    """Names (within their module) of a SwiGLU FFN's Linear children: `gate`/`up` (None when fused, then
    `gate_up` [2W, H] holds gate rows then up rows) and `down` [H, W]; `width` W."""

    width: int
    down: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None

    def read(self, module: nn.Module) -> Ffn:
        """(gate [W, H], up [W, H], down [H, W]) in float32."""
        get = lambda n: module.get_submodule(n).weight.detach().float().cpu()  # noqa: E731
        down = get(self.down)
        if self.gate_up is not None:
            gu = get(self.gate_up)
            return gu[:self.width], gu[self.width:], down
        return get(self.gate), get(self.up), down  # type: ignore[arg-type]

    def weight_names(self) -> dict[str, str]:
        """Role (gate, up, gate_up, down) -> relative name of its weight."""
        roles = {"gate": self.gate, "up": self.up, "gate_up": self.gate_up, "down": self.down}
        return {r: f"{n}.weight" for r, n in roles.items() if n is not None}


@dataclass(frozen=True)
class Experts:
    """A module holding E routed experts: its path in the MoE block, the names of its fused parameters, and
    whether they are stored transposed ([E, H, 2W] and [E, W, H])."""

    path: str
    gate_up: str
    down: str
    transposed: bool
    num: int
    width: int

    def read(self, block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [E, 2W, H] (gate rows first) and down [E, H, W], float32, whatever the storage layout."""
        mod = block.get_submodule(self.path)
        gu, dn = getattr(mod, self.gate_up).detach().float().cpu(), getattr(mod, self.down).detach().float().cpu()
        return (gu.transpose(1, 2), dn.transpose(1, 2)) if self.transposed else (gu, dn)


@dataclass(frozen=True)
class LayerFfn:
    """One decoder layer's FFN: the layer child holding it (`path`), and either `dense` (its own gated FFN)
    or `experts` with `shared` (path -> GatedFfn of each shared expert) and `shared_gate` (path of the
    Linear [1, H] whose sigmoid scales the shared experts, or None)."""

    path: str
    dense: GatedFfn | None = None
    experts: Experts | None = None
    shared: dict[str, GatedFfn] = field(default_factory=dict)
    shared_gate: str | None = None


def gated_ffn(module: nn.Module, hidden: int) -> GatedFfn | None:
    """The SwiGLU structure of `module` from its direct Linear children (None if it is not a gated FFN: other
    children with weights, such as norms or convolutions, mean it is something else, e.g. attention)."""
    lins = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear)]
    others = [m for m in module.children() if not isinstance(m, nn.Linear) and not _is_activation(m)]
    if len(lins) not in (2, 3) or others:
        return None
    writes = [(n, m) for n, m in lins if m.out_features == hidden]
    if len(writes) > 1:  # W == H: shapes cannot tell the down projection; its name, else its place (last)
        named = [w for w in writes if _role(w[0]) == "down"]
        writes = named or [w for w in writes if _role(w[0]) is None][-1:] or writes[-1:]
    if len(writes) != 1:
        return None
    dname, dmod = writes[0]
    width = dmod.in_features
    rest = [(n, m) for n, m in lins if n != dname]
    if any(m.in_features != hidden for _, m in rest):
        return None
    if len(rest) == 1:
        if rest[0][1].out_features != 2 * width:
            return None
        return GatedFfn(width=width, down=dname, gate_up=rest[0][0])
    if any(m.out_features != width for _, m in rest):
        return None
    a, b = rest[0][0], rest[1][0]
    if _role(b) == "gate" or _role(a) == "up":
        a, b = b, a
    return GatedFfn(width=width, down=dname, gate=a, up=b)


def _role(name: str) -> str | None:
    low = name.lower()
    if "gate" in low or low == "w1":
        return "gate"
    if "down" in low or low == "w2":
        return "down"
    if "up" in low or low == "w3":
        return "up"
    return None


def _is_activation(module: nn.Module) -> bool:
    return not any(True for _ in module.parameters()) and not any(True for _ in module.children())


def _check_plain(module: nn.Module, where: str) -> None:
    """Refuse a gated FFN with biases (the merge and the student's FFN have none) or a non-SiLU activation."""
    biased = [n for n, m in module.named_children() if isinstance(m, nn.Linear) and m.bias is not None]
    if biased:
        raise UnsupportedModelError(f"{where}: FFN projections with biases ({', '.join(biased)}) are not supported")
    _check_silu(module, where)


def _check_silu(module: nn.Module, where: str) -> None:
    """Refuse a module whose activation (a parameter-free child, e.g. `act_fn`) is not SiLU: the merge and the
    student's FFN are SwiGLU."""
    x = torch.linspace(-4, 4, 17)
    for name, child in module.named_children():
        if _is_activation(child) and not isinstance(child, nn.Dropout):
            try:
                ok = torch.allclose(child(x), nn.functional.silu(x), atol=1e-5)
            except Exception:  # noqa: BLE001 - not an elementwise activation
                continue
            if not ok:
                raise UnsupportedModelError(f"{where}.{name} is not SiLU ({type(child).__name__}): only SwiGLU "
                                            "FFNs can be derived")


def _check_expert_gate(experts: nn.Module, where: str) -> None:
    """Refuse experts whose gate function (transformers' `_apply_gate` on the gate_up output) is not
    silu(gate) * up: a clamped or shifted SwiGLU (MiniMax-M3's (up + 1) * gate * sigmoid(alpha * gate), HY-V4's
    clamp at swiglu_limit) has SiLU as no child, so only calling the gate tells. It holds no weights, so this
    works on the meta device too; values up to +-30 reach the usual clamp limits."""
    apply_gate = getattr(experts, "_apply_gate", None)
    if apply_gate is None:
        return
    gate = torch.linspace(-30, 30, 41)
    up = torch.linspace(-30, 30, 41).flip(0)
    # the gate_up output in the experts' own column order: gate columns then up columns, or alternating
    interleaved = not getattr(experts, "is_concatenated", True)
    columns = torch.stack([gate, up], -1).flatten() if interleaved else torch.cat([gate, up])
    try:
        with torch.no_grad():
            got = apply_gate(columns[None])
    except Exception:  # noqa: BLE001 - not the (tokens, 2W) -> (tokens, W) form: nothing to compare
        return
    want = nn.functional.silu(gate) * up
    if not isinstance(got, torch.Tensor) or got.shape != (1, gate.numel()) or not torch.allclose(
            got[0].float(), want, rtol=1e-4, atol=1e-4):
        raise UnsupportedModelError(f"{where}: the experts' gate ({type(experts).__name__}._apply_gate) is not "
                                    "silu(gate) * up: only SwiGLU FFNs can be derived")


def layer_ffn(layer: nn.Module, hidden: int, where: str = "layer") -> LayerFfn:
    """The FFN of one decoder layer, by structure; raises UnsupportedModelError when it cannot be read."""
    found = []
    for name, child in layer.named_children():
        if any(holds_experts(m) for m in child.modules()):
            found.append(_moe_block(name, child, hidden, f"{where}.{name}"))
        elif (ffn := gated_ffn(child, hidden)) is not None:
            _check_plain(child, f"{where}.{name}")
            found.append(LayerFfn(path=name, dense=ffn))
    if len(found) != 1:
        raise UnsupportedModelError(
            f"{where}: expected one feed-forward block (a gated dense FFN or fused experts), found "
            f"{len(found)}")
    return found[0]


def _moe_block(path: str, block: nn.Module, hidden: int, where: str) -> LayerFfn:
    holders = {n for n, m in block.named_modules() if holds_experts(m)}
    if len(holders) != 1:
        raise UnsupportedModelError(f"{where}: routed experts spread over {len(holders)} modules "
                                    f"({', '.join(sorted(holders))}), not one fused gate_up/down pair")
    epath = holders.pop()
    emod = block.get_submodule(epath)
    experts = _experts(epath, emod, hidden, where)
    _check_silu(emod, f"{where}.{epath}")
    _check_expert_gate(emod, f"{where}.{epath}")
    shared: dict[str, GatedFfn] = {}
    for n, m in block.named_modules():
        if n and n != epath and not n.startswith(f"{epath}.") and (g := gated_ffn(m, hidden)) is not None:
            if not any(n.startswith(f"{s}.") for s in shared):
                _check_plain(m, f"{where}.{n}")
                shared[n] = g
    gates = [n for n, m in block.named_children()
             if isinstance(m, nn.Linear) and m.out_features == 1 and m.in_features == hidden]
    known = {f"{epath}.{experts.gate_up}", f"{epath}.{experts.down}"}
    known |= {f"{s}.{w}" for s, g in shared.items() for w in g.weight_names().values()}
    known |= {f"{g}.{p}" for g in gates for p, _ in block.get_submodule(g).named_parameters()}
    # A router may be a small network (Zaya's MLP router): every weight of a module that scores the experts
    # (holds a 2-dim weight with an axis of E to 2E, outside the experts) is routing, whatever its shape.
    routers = [r for r in router_candidates(block, [epath], experts.num)
               if not any(r == s or r.startswith(f"{s}.") or s.startswith(f"{r}.") for s in shared)]
    for n, p in block.named_parameters():
        if n in known or any(n.startswith(f"{r}.") for r in routers):
            continue
        if n.startswith(f"{epath}."):
            raise UnsupportedModelError(f"{where}.{n}: experts with biases or extra weights {tuple(p.shape)} cannot "
                                        "be merged into a SwiGLU FFN")
        if experts.num not in p.shape:  # routing tensors (router weight, score bias) have an axis of E
            raise UnsupportedModelError(f"{where}.{n} {tuple(p.shape)} is neither an expert, a shared expert nor "
                                        "routing: the derivation cannot account for it")
    if len(gates) > 1:
        raise UnsupportedModelError(f"{where}: {len(gates)} shared-expert gates, expected at most one")
    return LayerFfn(path=path, experts=experts, shared=shared, shared_gate=gates[0] if gates else None)


def _experts(path: str, mod: nn.Module, hidden: int, where: str) -> Experts:
    """Fused expert parameters of `mod` (two 3-d tensors), their roles and orientation from their shapes."""
    three = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.dim() == 3]
    refuse = f"{where}.{path}: {[(n, tuple(p.shape)) for n, p in three]} are not fused SwiGLU experts " \
             "(gate_up [E, 2W, H], down [E, H, W], or transposed)"
    if len(three) != 2 or three[0][1].shape[0] != three[1][1].shape[0]:
        raise UnsupportedModelError(refuse)
    flag = getattr(mod, "is_transposed", None)
    fits = []
    for (gn, gp), (dn, dp) in (three, three[::-1]):
        for tr in ((flag,) if isinstance(flag, bool) else (False, True)):
            g2, g1 = (gp.shape[1], gp.shape[2]) if not tr else (gp.shape[2], gp.shape[1])  # (2W, H)
            d_h, d_w = (dp.shape[1], dp.shape[2]) if not tr else (dp.shape[2], dp.shape[1])  # (H, W)
            if g1 == hidden and d_h == hidden and g2 == 2 * d_w:
                fits.append((gn, dn, tr, d_w))
    if len(fits) != 1:
        raise UnsupportedModelError(f"{refuse}: {len(fits)} readings fit")
    gn, dn, tr, width = fits[0]
    return Experts(path=path, gate_up=gn, down=dn, transposed=tr, num=int(three[0][1].shape[0]), width=width)


def check_student_layer(layer: nn.Module, hidden: int, where: str = "layer") -> tuple[str, GatedFfn]:
    """(child path, GatedFfn) of a dense layer: exactly one gated FFN and no experts."""
    if any(holds_experts(m) for m in layer.modules()):
        raise UnsupportedModelError(f"{where} still holds experts")
    ffn = layer_ffn(layer, hidden, where)
    assert ffn.dense is not None
    return ffn.path, ffn.dense
