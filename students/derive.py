"""Derive a dense student from an MoE teacher (any family `dense_twin.check_derivable` accepts).

Embeddings, attention and norms are copied into the teacher's dense twin architecture (dense_twin.py: a dense
relative, or the teacher's own family with every layer dense); the FFN weights of both are found by
structure (ffn_layout.py), not by name. Each kept layer's dense FFN is
- the layer's routed experts merged by one of the methods of expert_merge.py, weighted by the routing mass
  measured on calibration text (routing_stats.py) and scaled by the mean total routed weight,
- with the shared experts, if any, folded in side by side (scaled by their gate's mean value),
- or, for a layer the teacher already runs dense (DeepSeek's first layers), that layer's FFN.
Experts with biases or a non-SiLU activation are refused (ffn_layout.py).
Every layer of the student has one width: a dense layer whose width differs is zero-padded (exact) or cut
to its most important neurons.
Dropping layers is what makes the student measurably faster than the teacher (merging experts alone keeps
the active compute of one expert instead of k).
"""
from __future__ import annotations

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from students.dense_twin import check_derivable, twin_config
from students.expert_merge import METHODS, merge_experts, top_neurons
from students.ffn_layout import Ffn, LayerFfn, check_student_layer, layer_ffn
from students.layer_importance import most_influential
from students.routing_stats import RoutingStats
from teachers.moe_layout import decoder_layers


def parse_keep_layers(spec: str, num_layers: int, influence: torch.Tensor | None = None) -> list[int]:
    """`"all"`, `"every_<n>"` (layers 0, n, 2n, ... and always the last), `"top_<n>"` (the n most influential
    by measured block influence [L], see layer_importance.py), `"top_<p>%"` (the same for p% of the layers,
    rounded, at least one: a spec that fits a teacher of any depth), or `"0,3,7"` -> sorted indices."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith("top_"):
        if influence is None:
            raise ValueError(f"keep_layers '{spec}' needs layer influence measured on calibration text")
        return most_influential(influence, _top_count(spec, num_layers))
    if spec.startswith("every_"):
        try:
            n = int(spec[len("every_"):])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"keep_layers '{spec}': expected every_<n> with n >= 1")
        keep = list(range(0, num_layers, n))
        # The last layer shapes the output distribution most directly; keep it.
        if keep[-1] != num_layers - 1:
            keep.append(num_layers - 1)
        return keep
    try:
        keep = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"keep_layers '{spec}': expected all, every_<n>, or comma-separated indices") from None
    if not keep or keep[0] < 0 or keep[-1] >= num_layers:
        raise ValueError(f"keep_layers '{spec}': indices must lie in 0..{num_layers - 1}")
    return keep


def _top_count(spec: str, num_layers: int) -> int:
    body = spec[len("top_"):]
    try:
        if body.endswith("%"):
            share = float(body[:-1])
            if not 0 < share <= 100:
                raise ValueError
            return max(1, round(share / 100 * num_layers))
        return int(body)
    except ValueError:
        raise ValueError(f"keep_layers '{spec}': expected top_<n> or top_<p>% with 0 < p <= 100") from None


@torch.no_grad()
def derive_dense_student(teacher: PreTrainedModel, keep_layers: str = "every_2", method: str = "uniform",
                         ffn_width: int = 0, stats: RoutingStats | None = None,
                         influence: torch.Tensor | None = None, svd_rank: int = 0) -> PreTrainedModel:
    """A dense model of the teacher's twin architecture with its attention and merged experts on the kept layers.

    method: one of students.expert_merge.METHODS; ffn_width: width of the merged routed experts (0: one
    expert's; method=select may set any), to which shared experts add their own width;
    stats: routing mass [L, E] and shared-expert gate [L] measured on calibration text (routing_stats);
    None assumes routing weights that sum to 1 (Mixtral) and is refused for a gated shared expert;
    influence [L]: block influence per teacher layer, for keep_layers="top_<n>"; svd_rank: for method=svd.
    The FFN weights are found by structure (students/ffn_layout.py), in any family check_derivable accepts.
    """
    check_derivable(teacher.config)  # unsupported family or unreadable experts: say so before any work
    if method not in METHODS:
        raise ValueError(f"unknown derivation method '{method}' (available: {', '.join(METHODS)})")
    tc = teacher.config
    hidden = tc.hidden_size
    t_prefix, t_layers = decoder_layers(teacher)
    n_layers = len(t_layers)
    keep = parse_keep_layers(keep_layers, n_layers, influence)
    if stats is not None and stats.mass.shape[0] != n_layers:
        raise ValueError(f"routing stats cover {stats.mass.shape[0]} layers, the teacher has {n_layers}")
    layouts = [layer_ffn(t_layers[i], hidden, f"{t_prefix}.{i}") for i in keep]
    ffns = [_layer_ffn(t_layers[i].get_submodule(lay.path), lay, i, method, ffn_width, stats, svd_rank)
            for i, lay in tqdm(list(zip(keep, layouts)), desc=f"derive ({method})", unit="layer", leave=False)]
    # One width for all layers: that of the derived MoE layers (kept dense layers are fitted to it).
    width = max(_routed_width(lay, ffn_width) for lay in layouts)
    width = width or max(f[0].shape[0] for f in ffns)  # only dense layers kept: the widest of them
    ffns = [fit_width(f, width) for f in ffns]
    cfg = twin_config(tc, keep, width)
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(cfg).to(dtype)
    s_prefix, s_layers = decoder_layers(student)
    s_ffn = [check_student_layer(layer, hidden, f"{s_prefix}.{j}") for j, layer in enumerate(s_layers)]
    src = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, param in student.state_dict().items():
        name_t = name
        if name.startswith(f"{s_prefix}."):
            j, rest = name[len(s_prefix) + 1:].split(".", 1)
            if rest.startswith(f"{s_ffn[int(j)][0]}."):
                continue  # the FFN: derived below
            name_t = f"{t_prefix}.{keep[int(j)]}.{rest}"
        if name_t not in src or src[name_t].shape != param.shape:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            got = tuple(src[name_t].shape) if name_t in src else "missing"
            raise ValueError(f"the {cfg.model_type} twin of the {tc.model_type} teacher needs {name_t} of shape "
                             f"{tuple(param.shape)}, the teacher has {got}")
        out[name] = src[name_t]
    for j, (gate, up, down) in enumerate(ffns):
        path, names = s_ffn[j][0], s_ffn[j][1].weight_names()
        base = f"{s_prefix}.{j}.{path}"
        if "gate_up" in names:
            out[f"{base}.{names['gate_up']}"] = torch.cat([gate, up]).to(dtype)
        else:
            out[f"{base}.{names['gate']}"] = gate.to(dtype)
            out[f"{base}.{names['up']}"] = up.to(dtype)
        out[f"{base}.{names['down']}"] = down.to(dtype)
    student.load_state_dict(out, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        student.tie_weights()
    # The layer map travels with the student (config.json): layer-wise transfer pairs each student layer with
    # the teacher layer it came from (distill/layer_transfer.py).
    student.config.teacher_layers = [int(i) for i in keep]
    return student.eval()


def _routed_width(layout: LayerFfn, ffn_width: int) -> int:
    """Width of a layer's derived FFN before fitting: merged routed experts plus shared experts (0: dense layer)."""
    if layout.experts is None:
        return 0
    return (ffn_width or layout.experts.width) + sum(g.width for g in layout.shared.values())


def _layer_ffn(block: torch.nn.Module, layout: LayerFfn, layer: int, method: str, ffn_width: int,
               stats: RoutingStats | None, svd_rank: int) -> Ffn:
    """The dense FFN of one teacher layer (float32), before fitting to the student's width.

    block: the layer's FFN module (dense FFN or MoE block) described by `layout`."""
    if layout.experts is None:
        assert layout.dense is not None
        return layout.dense.read(block)
    mass = None if stats is None else stats.mass[layer]
    if mass is not None and mass.shape[0] != layout.experts.num:
        mass = mass[:layout.experts.num]  # stats padded to the widest layer of the teacher
    gate_up, down = layout.experts.read(block)
    gate, up, down = merge_experts(gate_up, down, method, mass, ffn_width, svd_rank)
    # merge_experts averages (weights summing to 1); the MoE block adds its experts with weights summing to
    # the mean total routed weight (1 when renormalised, routed_scaling_factor for DeepSeek, < 1 otherwise).
    total = 1.0 if mass is None else float(mass.sum())
    parts = [(gate, up, down * total)]
    if layout.shared_gate is not None and stats is None:
        raise ValueError(f"layer {layer} has a gated shared expert: deriving needs its gate's mean value "
                         "measured on calibration text (pass stats=routing_stats(teacher, batches))")
    # The shared part's factor: its gate's mean, or the factor the block applies to it (Cohere2-MoE's average of
    # experts and shared expert, fitted by routing_stats; 1.0 for a plain sum).
    g = float(stats.shared_gate[layer]) if stats is not None and (layout.shared_gate is not None or layout.shared) \
        else 1.0
    if layout.shared_gate is not None and g >= 1.0:  # a sigmoid's mean is < 1: the stats never saw this gate
        raise ValueError(f"layer {layer}: the routing stats hold no measured value for the shared-expert gate "
                         f"'{layout.shared_gate}'")
    for path, ffn in layout.shared.items():
        sg, su, sd = ffn.read(block.get_submodule(path))
        parts.append((sg, su, sd * g))
    return torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts]), torch.cat([q[2] for q in parts], 1)


def fit_width(ffn: Ffn, width: int) -> Ffn:
    """Bring a gated FFN to `width` neurons: zero neurons added (the function is unchanged), or the most
    important kept (||gate row|| * ||up row|| * ||down column||), when it is wider. gate/up [W0, H], down [H, W0]."""
    gate, up, down = ffn
    n = gate.shape[0]
    if n == width:
        return ffn
    if n < width:
        pad = width - n
        return (torch.cat([gate, gate.new_zeros(pad, gate.shape[1])]), torch.cat([up, up.new_zeros(pad, up.shape[1])]),
                torch.cat([down, down.new_zeros(down.shape[0], pad)], 1))
    keep = top_neurons(gate, up, down, width)
    return gate[keep], up[keep], down[:, keep]
