"""Probe: which MoE families of the installed transformers break the pipeline's general mechanisms, and how.

A plain script, not a pytest test. For every model type in ARCHS it builds a tiny random model from the
family's default config with every size-like field shrunk (generic rules in `shrink`, plus per-family
OVERRIDES where the config needs them), saves it as safetensors, loads it back through our loader, and runs:

  1 preflight   teachers.load.check_teacher_config + teachers.moe_layout.check_moe_layout
  2 discovery   teachers.moe_layout.moe_layers + teachers.routers.find_routers
  3 logits      generate_logit_cache with a RouterRecorder (as tests/test_teacher_architectures.py), the cache
                compared with a plain forward, router counts checked (tokens x top-k per routed layer)
  4 derive      students.dense_twin.check_derivable, then routing_stats + derive_dense_student + a forward
  5 fused       kernels.hf_moe.enable_fused_moe (TRITON_INTERPRET=1), a forward compared with the eager one, then
                a decode-sized one (2 tokens: shared-expert blocks take kernels/hf_shared.py's path there)

Each step is classified: ok / refusal (a UserError, a logged skip or fallback: a message a user can act on) /
wrong (ran, but the result is not what it should be, or an MoE refused as dense) / crash (any other exception:
type, message, innermost frame in this project's code) / n/c (the tiny model could not be built).

Each family runs in its own subprocess (a hang or a segfault loses one family only), two at a time.

    .venv/bin/python tests/arch_probe.py            # all families, table + JSON
    .venv/bin/python tests/arch_probe.py jamba zaya  # some families
    .venv/bin/python tests/arch_probe.py --one jamba # in-process, tracebacks shown
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / kernels are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCHS = ("afmoe aria_text axk1 axk2 bailing_hybrid beam cohere2_moe deepseek_v32 deepseek_v4 doge dots3_note_text "
         "exaone_moe flint glm4_moe_lite glm_moe_dsa granitemoe_swa granitemoehybrid hy_v3 hy_v4 inkling2_text "
         "inkling_text jamba kimi_linear kolibri1 laguna longcat_flash mellum mimo_v2_flash minimax_m2 "
         "minimax_m3_vl_text nemotron_h qwen3_5_moe_text qwen3_next qwen4_exp_text solar_open zaya").split()
STEPS = ("preflight", "discovery", "logits", "derive", "fused")
H, V, E, K = 64, 512, 4, 2
SEQ = 10
TIMEOUT_S = 150

# ------------------------------------------------------------------------------------------ tiny configs ---
# Exact field name -> tiny value (only applied where the default config has the field and it is not None).
_EXACT = {
    "hidden_size": H, "vocab_size": V, "unpadded_vocab_size": V - 12,
    "num_attention_heads": 4, "swa_num_attention_heads": 4,
    "head_dim": 16, "swa_head_dim": 16, "global_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "o_lora_rank": 16, "o_groups": 2,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "intermediate_size": 48, "ffn_hidden_size": 48, "dense_intermediate_size": 48,
    "moe_intermediate_size": 16, "expert_ffn_hidden_size": 16,
    "shared_expert_intermediate_size": 24, "shared_intermediate_size": 24, "shared_experts_intermediate_size": 16,
    "moe_shared_expert_intermediate_size": 24,
    "num_experts": E, "n_routed_experts": E, "num_local_experts": E, "moe_num_experts": E, "zero_expert_num": 2,
    "num_experts_per_tok": K, "num_experts_per_token": K, "moe_topk": K, "moe_k": K, "top_k_experts": K,
    "n_group": 1, "num_expert_group": 1, "topk_group": 1,
    "max_position_embeddings": 128, "model_max_length": 128, "sliding_window": 8, "sliding_window_size": 8,
    "keep_window_size": 8, "rel_extent": 16, "log_scaling_n_floor": 16,
    "index_topk": 4, "index_n_heads": 2, "index_head_dim": 16, "index_block_size": 4, "index_topk_blocks": 2,
    "index_local_blocks": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_head_dim": 16, "linear_num_heads": 4,
    "mamba_n_heads": 8, "mamba_num_heads": 8, "mamba_d_head": 16, "mamba_head_dim": 16, "mamba_d_state": 8,
    "ssm_state_size": 8, "mamba_chunk_size": 16, "chunk_size": 16, "mamba_dt_rank": 8, "n_groups": 1,
    "mamba_n_groups": 1,
    "router_hidden_size": 16, "hc_lowrank": 8, "ple_embed_dim": 16, "ngram_vocab_size_base": 1000,
    "split_ngram_parts": 4, "heads_per_ngram": 2, "rotary_dim": 8, "gated_norm_rank": 4,
    "num_nextn_predict_layers": 0,
}
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_GENERIC_SIZE = re.compile(r"(size|dim|rank|heads)$")

# Per family: fields set after shrinking (layer count "layers", explicit per-layer lists, ...).
OVERRIDES: dict[str, dict] = {
    "jamba": {"layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
              "expert_layer_offset": 1, "use_mamba_kernels": False},
    "doge": {"is_moe": True, "num_experts": 16, "num_experts_per_tok": 2},  # experts indexed by a product key
    "nemotron_h": {"layers_block_type": ["mamba", "moe", "attention", "moe"],
                   "mtp_layers_block_type": ["attention", "moe"]},
    "longcat_flash": {"num_layers": 2},
    # Granite divides its logits by logits_scaling (1.0 by default; released checkpoints set other values).
    "granitemoe_swa": {"logits_scaling": 6.0},
    "granitemoehybrid": {"logits_scaling": 6.0},
    "zaya": {"num_experts_per_tok": 1, "sliding_window": 8},  # the family routes top-1 only
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},  # default config leaves its indexer unset
}


def _layer_lists(d: dict, depth: int) -> dict[str, list]:
    """Per-layer settings: lists of `depth` entries, and lists of layer indices (mlp_only_layers)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, list) and len(v) == depth and depth > 2:
            out[k] = v
    return out


def _index_lists(d: dict, depth: int) -> dict[str, list[int]]:
    return {k: v for k, v in d.items() if isinstance(v, list) and v and "layers" in k
            and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < depth for x in v)
            and len(v) < depth}


def shrink(model_type: str) -> object:
    """A tiny config of `model_type`: its default config with every size-like field made small."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    d = base.to_dict()
    over = dict(OVERRIDES.get(model_type, {}))
    depth_key = "num_hidden_layers" if isinstance(d.get("num_hidden_layers"), int) else "num_layers"
    depth = d.get(depth_key) or 2
    per_layer = _layer_lists(d, depth)
    idx_lists = _index_lists(d, depth)
    # Keep one original layer for every distinct value of every per-layer setting (first occurrence), so a
    # hybrid's attention kinds and an MoE's dense/sparse layers all survive; at least 2 layers.
    keep: list[int] = []
    for k, v in per_layer.items():
        if isinstance(v[0], (str, int, float, bool)) or v[0] is None:
            seen = {}
            for i, x in enumerate(v):
                seen.setdefault(json.dumps(x), i)
            keep += list(seen.values())
    for k, v in idx_lists.items():
        keep += [v[0]] + [i for i in range(depth) if i not in v][:1]
    keep = sorted(set(keep))
    n = over.pop("layers", None) or max(2, len(keep))
    if len(keep) > n:
        keep = keep[:n]
    i = 0
    while len(keep) < n:
        if i not in keep:
            keep.append(i)
        i += 1
    keep = sorted(keep)
    new: dict = {depth_key: n}
    for k, v in per_layer.items():
        new[k] = [v[i] for i in keep]
    for k, v in idx_lists.items():
        new[k] = [j for j, i in enumerate(keep) if i in v]
    for k, v in d.items():
        if k in new or k.startswith("_") or v is None or isinstance(v, bool):
            continue
        if k in _EXACT:
            new[k] = _EXACT[k]
        elif k == "num_key_value_heads" or k == "swa_num_key_value_heads":
            heads = d.get("num_attention_heads" if k == "num_key_value_heads" else "swa_num_attention_heads") or 1
            new[k] = 4 if v == heads else (1 if v == 1 else 2)
        elif k in _TOKEN_IDS and isinstance(v, int) and v >= V:
            new[k] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[k]
        elif k == "first_k_dense_replace" and isinstance(v, int) and v > 0:
            mlp = new.get("mlp_layer_types")
            new[k] = (next((j for j, t in enumerate(mlp) if t != "dense"), len(mlp)) if isinstance(mlp, list)
                      else 1)
        elif k == "num_dense_layers" and isinstance(v, int) and v > 0:
            new[k] = 1
        elif k == "per_layer_config" and isinstance(v, dict):
            new[k] = {}
        elif (isinstance(v, int) and v > 64 and _GENERIC_SIZE.search(k) and "vocab" not in k
              and "token" not in k):
            new[k] = 16
    if d.get("head_dim") is not None and d.get("head_dim") == d.get("qk_rope_head_dim"):  # MLA: rope dims
        new["head_dim"] = new["qk_rope_head_dim"]
    if "qk_head_dim" in d and "qk_nope_head_dim" in new:
        new["qk_head_dim"] = new["qk_nope_head_dim"] + new["qk_rope_head_dim"]
    new.update(over)
    return AutoConfig.for_model(model_type, **new)


# ------------------------------------------------------------------------------------------- one family ---

def _ours(tb) -> str | None:
    """Innermost frame of a traceback in this project's code (not site-packages, not this script)."""
    here = None
    for fs in traceback.extract_tb(tb):
        f = os.path.abspath(fs.filename)
        if f.startswith(str(ROOT)) and "site-packages" not in f and not f.endswith("arch_probe.py"):
            here = f"{os.path.relpath(f, ROOT)}:{fs.lineno} in {fs.name}"
    return here


def _crash(e: BaseException) -> dict:
    from core.errors import UserError

    msg = " ".join(str(e).split())[:400]
    if isinstance(e, UserError):
        return {"status": "refusal", "detail": f"{type(e).__name__}: {msg}"}
    return {"status": "crash", "detail": f"{type(e).__name__}: {msg}", "frame": _ours(e.__traceback__),
            "traceback": traceback.format_exc(limit=-8)}


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("teachers", "students", "kernels", "pipelines")):
            self.lines.append(f"{record.name}: {record.getMessage()}")


def _sharpen(model) -> None:
    """Routers with clear preferences (some start at zero), as the architecture tests do."""
    import torch

    from teachers.moe_layout import moe_layers
    with torch.no_grad():
        for m in moe_layers(model):
            for r in m.routers:
                for p in r.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 1.0)


def _exactness(teacher, ids) -> float | None:
    """Relative error of a student derived from a copy of `teacher` whose experts are all equal and whose routers
    are zeroed (every expert scored alike, so each token's total routed weight is the same constant): the MoE
    then computes a dense function and the derived student must reproduce the teacher (cf. tests/
    test_derive_families.py). None when routing stats cannot be read."""
    import copy

    import torch

    from core.errors import UnsupportedModelError
    from students.derive import derive_dense_student
    from students.routing_stats import routing_stats
    from teachers.moe_layout import moe_layers
    t = copy.deepcopy(teacher)
    with torch.no_grad():
        for m in moe_layers(t):
            for ex in m.experts:
                for p in ex.parameters(recurse=False):
                    if p.dim() >= 3:
                        p.copy_(p[:1].expand_as(p))
            for r in m.routers[:1]:
                for p in r.parameters():
                    p.zero_()
            for n, c in m.block.named_children():  # a shared-expert gate [1, H]: sigmoid(0) = 0.5 exactly
                if isinstance(c, torch.nn.Linear) and c.out_features == 1:
                    c.weight.zero_()
        # Dense layers wider than the derived width are cut to their most important neurons (an approximation
        # by design): zero their neurons past that width, so the cut keeps all that is there.
        from students.derive import _routed_width
        from students.ffn_layout import layer_ffn
        from teachers.moe_layout import decoder_layers
        prefix, layers = decoder_layers(t)
        lays = [layer_ffn(layer, t.config.hidden_size, f"{prefix}.{i}") for i, layer in enumerate(layers)]
        width = max(_routed_width(lay, 0) for lay in lays)
        for layer, lay in zip(layers, lays):
            if lay.dense is not None and lay.dense.width > width:
                ffn = layer.get_submodule(lay.path)
                names = lay.dense.weight_names()
                down = ffn.get_submodule(names["down"].removesuffix(".weight")).weight
                down[:, width:] = 0
                if "gate_up" in names:
                    gu = ffn.get_submodule(names["gate_up"].removesuffix(".weight")).weight
                    gu[width:lay.dense.width] = 0
                    gu[lay.dense.width + width:] = 0
                else:
                    for r in ("gate", "up"):
                        ffn.get_submodule(names[r].removesuffix(".weight")).weight[width:] = 0
    try:
        stats = routing_stats(t, ids.split(1))
    except UnsupportedModelError:
        return None
    student = derive_dense_student(t, keep_layers="all", method="frequency", stats=stats)
    with torch.no_grad():
        a = t(input_ids=ids, use_cache=False).logits.float()
        b = student(input_ids=ids, use_cache=False).logits.float()
    return float((a - b).norm() / a.norm())


def probe(model_type: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    res: dict = {"arch": model_type, "steps": {}}
    steps = res["steps"]
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    t0 = time.perf_counter()
    try:
        cfg = shrink(model_type)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(3, V, (2, SEQ))
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()
    except Exception as e:  # noqa: BLE001
        res["constructible"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        res["traceback"] = traceback.format_exc(limit=-4)
        return res
    res["constructible"] = True
    res["model"] = type(model).__name__
    res["params"] = sum(p.numel() for p in model.parameters())

    # 1 preflight -------------------------------------------------------------------------------------------
    from teachers.load import check_teacher_config
    from teachers.moe_layout import check_moe_layout
    try:
        check_teacher_config(cfg, model_type, allow_dense=False)
    except Exception as e:  # noqa: BLE001
        r = _crash(e)
        if r["status"] == "refusal":  # an MoE refused as dense: its expert count was not read
            r["status"] = "wrong"
        steps["preflight"] = r
    if "preflight" not in steps:
        try:
            notes = check_moe_layout(cfg, trust_remote_code=False)
            steps["preflight"] = {"status": "ok", "detail": " | ".join(notes)}
        except Exception as e:  # noqa: BLE001
            steps["preflight"] = _crash(e)

    # 2 discovery -------------------------------------------------------------------------------------------
    from teachers.moe_config import config_num_experts
    from teachers.moe_layout import expert_tables, moe_layers
    from teachers.routers import find_routers
    try:
        layers = moe_layers(model)
        routers = find_routers(model)
        detail = (f"{len(layers)} MoE layers {[m.index for m in layers]}, E={[m.num_experts for m in layers][:1]}, "
                  f"k={[m.top_k for m in layers][:1]}, experts {[m.expert_paths for m in layers][:1]}, "
                  f"routers {[m.router_paths for m in layers][:1]}")
        tables = expert_tables(model, config_num_experts(model.config)) if not layers else ""
        if tables:  # experts of one vector each (product-key retrieval): refused by name at preflight
            steps["discovery"] = {"status": "refusal", "detail": f"experts as rows of 2-D tables: {tables}"}
        elif not layers:
            steps["discovery"] = {"status": "wrong", "detail": "no MoE layer found: " + detail}
        elif len(routers) != len(layers):
            steps["discovery"] = {"status": "refusal", "detail": f"{len(routers)} routers for {len(layers)} "
                                                                 f"layers: " + detail}
        else:
            steps["discovery"] = {"status": "ok", "detail": detail}
        _sharpen(model)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits.float()
    except Exception as e:  # noqa: BLE001
        steps["discovery"] = _crash(e)

    tmp = Path(tempfile.mkdtemp(prefix=f"probe_{model_type}_"))
    # 3 logits ------------------------------------------------------------------------------------------------
    teacher = model
    try:
        from logit_cache import CacheMeta, LogitCache, LogitCacheWriter, topk_from_logits
        from teachers.load import load_causal_lm
        from teachers.logit_generation import generate_logit_cache
        from teachers.router_analytics import RouterRecorder

        model.save_pretrained(tmp / "teacher")
        assert any(p.suffix == ".safetensors" for p in (tmp / "teacher").iterdir())
        teacher = load_causal_lm(str(tmp / "teacher"), "teacher", torch.device("cpu"), torch.float32)
        k = 8
        vocab = teacher.get_output_embeddings().weight.shape[0] if teacher.get_output_embeddings() is not None \
            else cfg.vocab_size
        meta = CacheMeta(k=k, vocab_size=vocab, seq_len=SEQ, teacher_hash=model_type, tokenizer_hash="t",
                         data_hash="d")
        writer = LogitCacheWriter(tmp / "cache", meta, sequences_per_shard=1)
        n_warn = len(handler.lines)
        with RouterRecorder(teacher, ["a", "b"]) as rec:
            generate_logit_cache(teacher, ids, writer, k, vocab, batch_size=2, recorder=rec,
                                 source_ids=torch.tensor([0, 1]))
        cache = LogitCache(tmp / "cache")
        with torch.no_grad():
            plain = teacher(input_ids=ids, use_cache=False).logits
            want_ids, want_lp, _ = topk_from_logits(plain, k)
        got_ids = torch.stack([cache[i]["topk_ids"] for i in range(2)])
        got_lp = torch.stack([cache[i]["topk_logprobs"] for i in range(2)])
        problems = []
        if (plain.float() - ref).abs().max() > 1e-4 * max(1.0, float(ref.abs().max())):
            problems.append(f"reloaded model differs from the saved one by {(plain.float() - ref).abs().max():.3g}")
        if not torch.equal(got_ids, want_ids) or not torch.allclose(got_lp, want_lp, atol=5e-3):
            problems.append(f"cache != plain forward (ids equal: {torch.equal(got_ids, want_ids)}, "
                            f"max |dlp| {float((got_lp - want_lp).abs().max()):.3g})")
        if rec.skipped:
            steps["logits"] = {"status": "wrong" if problems else "refusal",
                               "detail": "; ".join(problems + [f"analytics skipped: {rec.skipped}"])}
        else:
            per_layer = rec.counts.sum((1, 2)).tolist()
            k_per = [m.top_k for m in moe_layers(teacher)]
            problems_note = ""
            want = [ids.numel() * kk for kk in k_per]
            # Families with 'null' (zero-computation) experts score more than E choices (router [E < n <= 2E,
            # H]); picks of those are not counted by design, so a layer counts at most tokens x top-k.
            nulls = any(d > m.num_experts for m in moe_layers(teacher) for r in m.routers[:1]
                        for p in r.parameters() if p.dim() == 2 for d in p.shape[:1])
            if nulls and all(0 < g <= w for g, w in zip(per_layer, want)):
                problems_note = " (null experts: their picks are not counted)"
            elif per_layer != want:
                problems_note = ""
                problems.append(f"router counts per layer {per_layer}, expected tokens x top-k = {want}")
            detail = (f"layers {rec.layers}, counts/layer {per_layer}{problems_note}"
                      + (" (approximate: read from logits)" if rec.approximate else ""))
            steps["logits"] = ({"status": "wrong", "detail": "; ".join(problems) + "; " + detail} if problems
                               else {"status": "ok", "detail": detail})
        if len(handler.lines) > n_warn:
            steps["logits"]["warnings"] = handler.lines[n_warn:]
    except Exception as e:  # noqa: BLE001
        steps["logits"] = _crash(e)

    # 4 derive ------------------------------------------------------------------------------------------------
    from students.dense_twin import check_derivable
    try:
        line = check_derivable(teacher.config)
    except Exception as e:  # noqa: BLE001
        steps["derive"] = _crash(e)
    if "derive" not in steps:
        try:
            from core.errors import UnsupportedModelError
            from students.derive import derive_dense_student
            from students.routing_stats import routing_stats
            stats_note = ""
            try:
                stats = routing_stats(teacher, ids.split(1))
            except UnsupportedModelError as e:
                stats, stats_note = None, f"; routing_stats refused: {' '.join(str(e).split())[:200]}"
            student = derive_dense_student(teacher, keep_layers="all", method="frequency", stats=stats)
            with torch.no_grad():
                out = student(input_ids=ids, use_cache=False).logits
            finite = bool(torch.isfinite(out).all())
            same_type = student.config.model_type
            exact = _exactness(teacher, ids)
            status = "ok" if finite and (exact is None or exact < 1e-3) else "wrong"
            steps["derive"] = {"status": status,
                               "detail": f"{line} -> {type(student).__name__} ({same_type}), "
                                         f"{sum(p.numel() for p in student.parameters())} params, finite={finite}; "
                                         f"identical experts + flat routers: student vs teacher rel err "
                                         f"{'n/a' if exact is None else f'{exact:.2e}'}" + stats_note}
        except Exception as e:  # noqa: BLE001
            steps["derive"] = _crash(e)
            steps["derive"]["check_derivable"] = line

    # 5 fused -------------------------------------------------------------------------------------------------
    try:
        import kernels.hf_moe as hf
        import kernels.hf_shared as hs
        from kernels.hf_moe import enable_fused_moe
        calls = {"experts": 0, "router": 0, "shared_blocks": 0}
        stock_experts, stock_route, stock_shared = hf.fused_experts, hf.route, hs.fused_experts

        def counting_shared(*a, **kw):
            calls["shared_blocks"] += 1
            return stock_shared(*a, **kw)
        hs.fused_experts = counting_shared

        def counting_experts(*a, **kw):
            calls["experts"] += 1
            return stock_experts(*a, **kw)

        def counting_route(*a, **kw):
            calls["router"] += 1
            return stock_route(*a, **kw)
        hf.fused_experts, hf.route = counting_experts, counting_route
        fused = AutoModelForCausalLM.from_config(cfg).eval()
        fused.load_state_dict(model.state_dict())
        n_warn = len(handler.lines)
        try:
            info = enable_fused_moe(fused)
        except ValueError as e:
            steps["fused"] = {"status": "refusal", "detail": f"declined (ValueError): {' '.join(str(e).split())}"}
        else:
            with torch.no_grad():
                out = fused(input_ids=ids, use_cache=False).logits.float()
                # Decode-sized: one token of each of the 2 sequences, against the eager model on the same.
                one = ids[:, :1]
                ref1 = model(input_ids=one, use_cache=False).logits.float()
                out1 = fused(input_ids=one, use_cache=False).logits.float()
            rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            rel = max(rel, float((out1 - ref1).norm() / ref1.norm().clamp_min(1e-12)))
            warns = handler.lines[n_warn:]
            fallback = [w for w in warns if "fused_triton" in w]
            status = "ok" if rel < 1e-3 else "wrong"
            if status == "ok" and calls["experts"] == 0:  # nothing of ours ran: a fallback, logged or not
                status = "refusal" if fallback else "bypass"
            steps["fused"] = {"status": status, "detail": f"{info}, our kernel calls {calls}, rel err {rel:.2e}"
                              + (f"; logged: {fallback}" if fallback else "")}
    except Exception as e:  # noqa: BLE001
        steps["fused"] = _crash(e)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# ------------------------------------------------------------------------------------------------ driver ---

def _run_child(model_type: str) -> dict:
    try:
        p = subprocess.run([sys.executable, __file__, "--child", model_type], capture_output=True, text=True,
                           timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"arch": model_type, "constructible": f"timeout after {TIMEOUT_S}s", "steps": {}}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"arch": model_type, "constructible": f"child exited {p.returncode}: {p.stderr[-600:]}", "steps": {}}


def _cell(res: dict, step: str) -> str:
    if res.get("constructible") is not True:
        return "n/c"
    return res["steps"].get(step, {}).get("status", "-")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(json.dumps(probe(argv[1]), default=str))
        return
    if argv[:1] == ["--one"]:
        logging.basicConfig(level=logging.WARNING)
        res = probe(argv[1])
        print(json.dumps(res, indent=1, default=str))
        return
    archs = argv or ARCHS
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_run_child, archs))
    out = Path(tempfile.gettempdir()) / "arch_probe_results.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    w = max(len(a) for a in archs)
    print(f"{'arch':<{w}}  " + "  ".join(f"{s:<9}" for s in STEPS))
    for r in results:
        print(f"{r['arch']:<{w}}  " + "  ".join(f"{_cell(r, s):<9}" for s in STEPS))
    print()
    for r in results:
        if r.get("constructible") is not True:
            print(f"[{r['arch']}] not constructible: {r['constructible']}")
            continue
        for s in STEPS:
            st = r["steps"].get(s, {})
            if st.get("status") in ("crash", "wrong", "refusal"):
                frame = f"  @ {st['frame']}" if st.get("frame") else ""
                print(f"[{r['arch']}] {s} {st['status']}: {st.get('detail')}{frame}")
    print(f"\n{len(results)} families in {time.perf_counter() - t0:.0f}s; details in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
