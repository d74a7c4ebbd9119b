"""Every MoE family a user may bring, on a tiny random config: loaded through our safe loader, its cached
top-k logits equal a plain forward of the same model, and its routers are found and counted by the general
mechanism (teachers/moe_layout.py: experts by their [E, ...] weights, routers by what they return), not by a
list of architectures."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    GptOssConfig,
    GraniteMoeConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from core.errors import UnsupportedModelError
from logit_cache import CacheMeta, LogitCache, LogitCacheWriter, topk_from_logits
from students.routing_stats import routing_stats
from teachers.load import expert_count, is_moe, load_teacher
from teachers.logit_generation import generate_logit_cache
from teachers.moe_config import experts_per_token
from teachers.moe_layout import check_moe_layout, moe_layers
from teachers.router_analytics import RouterRecorder, summarise, write_heatmaps
from teachers.routers import find_routers

V = 49152  # SmolLM2's tokenizer, so the folders are complete models our loader accepts
_C = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64, num_experts_per_tok=2)
ARCHS = {
    "mixtral": lambda: MixtralConfig(**_C, num_local_experts=4, intermediate_size=24),
    "qwen2_moe": lambda: Qwen2MoeConfig(**_C, num_experts=6, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=24, intermediate_size=40),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_C, num_experts=5, moe_intermediate_size=16, intermediate_size=40),
    "olmoe": lambda: OlmoeConfig(**_C, num_experts=4, intermediate_size=16),
    "deepseek_v3": lambda: DeepseekV3Config(**{**_C, "num_key_value_heads": 4, "num_hidden_layers": 3},
                                            n_routed_experts=8, moe_intermediate_size=16, n_shared_experts=1,
                                            intermediate_size=32, first_k_dense_replace=1, n_group=2, topk_group=1,
                                            q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                            qk_nope_head_dim=8, v_head_dim=8),
    "granitemoe": lambda: GraniteMoeConfig(**_C, num_local_experts=4, intermediate_size=16),
    "phimoe": lambda: PhimoeConfig(**_C, num_local_experts=4, intermediate_size=16),
    "gpt_oss": lambda: GptOssConfig(**{**_C, "head_dim": 8}, num_local_experts=4, intermediate_size=16,
                                    sliding_window=8),
    # Families whose routers are not transformers' usual *Router modules, decoder layers not under
    # get_decoder().layers, expert counts under other keys, or dense layers among the MoE ones.
    "hunyuan_v1_moe": lambda: _auto("hunyuan_v1_moe", num_experts=4, moe_topk=2, intermediate_size=16, head_dim=8),
    "llama4_text": lambda: _auto("llama4_text", num_local_experts=4, intermediate_size=16, intermediate_size_mlp=24,
                                 head_dim=8),
    "ernie4_5_moe": lambda: _auto("ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                                  intermediate_size=24, moe_num_shared_experts=1, moe_layer_start_index=1),
    "glm4_moe": lambda: _auto("glm4_moe", n_routed_experts=4, moe_intermediate_size=16, intermediate_size=24,
                              first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=8),
    "dots1": lambda: _auto("dots1", n_routed_experts=4, moe_intermediate_size=16, intermediate_size=24,
                           first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1, head_dim=8),
    "deepseek_v2": lambda: _auto("deepseek_v2", n_routed_experts=4, moe_intermediate_size=16, intermediate_size=24,
                                 first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None,
                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4),
    "minimax": lambda: _auto("minimax", num_local_experts=4, intermediate_size=16, head_dim=8,
                             layer_types=["linear_attention", "full_attention"]),
    "jetmoe": lambda: _auto("jetmoe", num_local_experts=4, intermediate_size=48, kv_channels=8,
                            num_key_value_heads=4),
    "flex_olmo": lambda: _auto("flex_olmo", num_experts=4, intermediate_size=16, pad_token_id=0),
    "lfm2_moe": lambda: _auto("lfm2_moe", num_experts=4, moe_intermediate_size=16, intermediate_size=24,
                              num_dense_layers=1, layer_types=["full_attention", "conv"]),
    "granitemoeshared": lambda: _auto("granitemoeshared", num_local_experts=4, intermediate_size=16,
                                      shared_intermediate_size=24),
    "gemma4_text": lambda: _auto("gemma4_text", enable_moe_block=True, num_experts=4, top_k_experts=2,
                                 moe_intermediate_size=16, intermediate_size=24, head_dim=8, global_head_dim=8,
                                 layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0),
}
# Decoder layers each family routes (the others are dense); every config routes each token to 2 experts.
ROUTED = {"deepseek_v3": [1, 2], "ernie4_5_moe": [1], "glm4_moe": [1], "dots1": [1], "lfm2_moe": [1]}
TOP_K = 2
# Families whose experts run through transformers' experts interface, which our fused kernels plug into.
FUSED = ["deepseek_v3", "gpt_oss", "granitemoe", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"]


def _auto(model_type: str, **kw: object):
    return AutoConfig.for_model(model_type, **{**_C, **kw})


def _sharpen_routers(model: torch.nn.Module) -> None:
    """Routers with clear preferences (some start at zero): every [E, H] weight outside the experts."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or name.endswith(("gate.weight", "gate.wg.weight")):
                p.normal_(0, 1.0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cache_equals_a_plain_forward_and_routers_are_counted(arch: str, tokenizer, tmp_path: Path) -> None:
    cfg = ARCHS[arch]()
    assert is_moe(cfg), arch
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    _sharpen_routers(model)
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    teacher, _ = load_teacher(str(tmp_path / "teacher"), torch.device("cpu"), torch.float32)
    assert type(teacher).__name__ == type(model).__name__
    seqs = torch.randint(0, V, (5, 12))
    sources = torch.tensor([0, 1, 0, 1, 1])
    k = 8
    meta = CacheMeta(k=k, vocab_size=V, seq_len=12, teacher_hash=arch, tokenizer_hash="t", data_hash="d")
    writer = LogitCacheWriter(tmp_path / "cache", meta, sequences_per_shard=2)
    with RouterRecorder(teacher, ["news", "code"]) as rec:
        result = generate_logit_cache(teacher, seqs, writer, k, V, batch_size=2, recorder=rec, source_ids=sources)
    assert result["tokens"] == seqs.numel() and result["analytics_sequences"] == 5
    cache = LogitCache(tmp_path / "cache")
    with torch.no_grad():
        ids, lp, tail = topk_from_logits(teacher(input_ids=seqs).logits, k)
    got = [cache[i] for i in range(5)]
    assert torch.equal(torch.stack([g["topk_ids"] for g in got]), ids)
    # Within the codec's error: top-1 stored in float16 (half a step is 0.004 near -10), the rest quantized.
    assert torch.allclose(torch.stack([g["topk_logprobs"] for g in got]), lp, atol=5e-3)
    assert torch.allclose(torch.stack([g["tail_logmass"] for g in got]), tail, atol=2e-3)
    # Every routed layer counts each token once per chosen expert, split by its sequence's source.
    assert rec.skipped is None and rec.layers == ROUTED.get(arch, [0, 1])
    assert rec.counts.shape[0] == len(rec.layers)
    assert (rec.counts.sum((1, 2)) == seqs.numel() * TOP_K).all()
    assert (rec.counts[:, 0].sum(-1) == 2 * 12 * TOP_K).all()  # two "news" sequences
    summary = summarise(rec.counts, rec.layers, rec.sources)
    assert all(0 < e <= 1 for e in summary["routing_entropy"]) and set(summary["specialisation_js_bits"]) == {
        "news", "code"}
    assert [p.name for p in write_heatmaps(summary, tmp_path / "png")] == ["router_load.png", "router_sources.png"]


def test_balance_and_specialisation_measures() -> None:
    counts = torch.zeros(1, 2, 4, dtype=torch.int64)
    counts[0, 0] = torch.tensor([10, 10, 0, 0])  # source 0 uses experts 0-1 only
    counts[0, 1] = torch.tensor([0, 0, 10, 10])  # source 1 uses experts 2-3 only
    s = summarise(counts, [0], ["a", "b"])
    assert s["load_max_over_mean"] == [1.0] and s["load_cv"] == [0.0] and s["routing_entropy"] == [pytest.approx(1.0)]
    # Each source's distribution is half-disjoint from the overall one: JS = 0.5 * log2(4/3) * 2 ... exactly:
    p, m = torch.tensor([0.5, 0.5, 0, 0]), torch.tensor([0.375, 0.375, 0.125, 0.125])
    want = 0.5 * float((p[:2] * (p[:2] / m[:2]).log2()).sum()) + 0.5 * float(
        (torch.full((4,), 0.25) * (torch.full((4,), 0.25) / m).log2()).sum())
    assert s["specialisation_js_bits"]["a"] == pytest.approx(want)
    one = torch.zeros(1, 1, 4, dtype=torch.int64)
    one[0, 0, 0] = 40  # every token to one expert: max/mean 4, entropy 0
    s = summarise(one, [0], ["a"])
    assert s["load_max_over_mean"] == [4.0] and s["routing_entropy"] == [0.0]
    assert s["specialisation_js_bits"]["a"] == 0.0


@pytest.mark.parametrize("saved", [4, 2, None])
def test_router_counts_resume_exactly_after_an_interrupted_generation(saved: int | None, tmp_path: Path) -> None:
    """Killed with 4 sequences in complete shards and the counts saved for all 4, for the first 2 only (killed
    between a shard landing and the save), or not at all: the resumed counts equal an uninterrupted run's, and so
    does the counts file beside the cache."""
    from safetensors.torch import load_file

    from teachers.logit_generation import COUNTS_FILE, save_counts

    model = AutoModelForCausalLM.from_config(ARCHS["mixtral"]()).eval()
    seqs, sources = torch.randint(0, V, (6, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    meta = CacheMeta(k=4, vocab_size=V, seq_len=8, teacher_hash="m", tokenizer_hash="t", data_hash="d")

    def run(root: Path, upto: int | None = None) -> torch.Tensor:
        writer = LogitCacheWriter(root, meta, sequences_per_shard=2)
        with RouterRecorder(model, ["a", "b", "c"]) as rec:
            part = seqs if upto is None else seqs[:upto]
            if upto is None:
                result = generate_logit_cache(model, part, writer, 4, V, 2, rec, sources)
                assert result["analytics_sequences"] == len(seqs)
            else:  # stop early: the cache holds `upto` sequences in complete shards, not finalized
                for i in range(0, upto, 2):
                    rec.set_batch(sources[i:i + 2], 8)
                    out = model(input_ids=part[i:i + 2]).logits
                    writer.add(part[i:i + 2], *topk_from_logits(out, 4))
                    if i + 2 == saved:
                        save_counts(root / COUNTS_FILE, rec.counts, saved)
        return rec.counts.clone()

    full = run(tmp_path / "full")
    run(tmp_path / "resumed", upto=4)
    assert torch.equal(run(tmp_path / "resumed"), full)
    on_disk = [load_file(str(p / COUNTS_FILE)) for p in (tmp_path / "full", tmp_path / "resumed")]
    assert torch.equal(on_disk[0]["counts"], on_disk[1]["counts"]) and int(on_disk[1]["covered"][0]) == len(seqs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels' GPU path needs CUDA")
@pytest.mark.parametrize("arch", FUSED)
def test_gpu_cache_through_the_fused_kernels_matches_the_stock_forward(arch: str, tmp_path: Path) -> None:
    """On GPU the logits stage runs our fused experts/routers; the cache must match transformers' own path
    (bf16: the same log-probs within bf16 noise at the ids the cache kept). Unsupported cases fall back."""
    from kernels.hf_moe import enable_fused_moe

    torch.manual_seed(0)
    cfg = ARCHS[arch]()
    stock = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()
    _sharpen_routers(stock)
    seqs = torch.randint(0, V, (4, 32))
    with torch.no_grad():
        ref = torch.log_softmax(stock(input_ids=seqs.cuda()).logits.float(), -1).cpu()
    fused = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()
    fused.load_state_dict(stock.state_dict())
    info = enable_fused_moe(fused)
    assert info["experts_implementation"] == "fused_triton"
    meta = CacheMeta(k=16, vocab_size=V, seq_len=32, teacher_hash=arch, tokenizer_hash="t", data_hash="d")
    writer = LogitCacheWriter(tmp_path / "cache", meta, sequences_per_shard=2)
    with RouterRecorder(fused, ["a"]) as rec:
        generate_logit_cache(fused, seqs, writer, 16, V, 2, rec, torch.zeros(4, dtype=torch.long))
    cache = LogitCache(tmp_path / "cache")
    got_ids = torch.stack([cache[i]["topk_ids"] for i in range(4)])
    got_lp = torch.stack([cache[i]["topk_logprobs"] for i in range(4)])
    assert (got_lp - ref.gather(-1, got_ids)).abs().max() < 0.1  # bf16 logits of a random model
    assert (rec.counts.sum((1, 2)) == seqs.numel() * TOP_K).all()
    print(f"{arch}: fused={info}")


def test_a_teacher_too_large_for_one_gpu_is_spread_over_several(tmp_path: Path) -> None:
    from teachers.load import checkpoint_parameters, spread_over_gpus

    model = AutoModelForCausalLM.from_config(ARCHS["mixtral"]())
    model.save_pretrained(tmp_path)
    assert checkpoint_parameters(tmp_path) == sum(p.numel() for p in model.parameters())  # untied head
    gib = 2**30
    assert not spread_over_gpus(60 * gib, 78 * gib, gpus=8)  # fits one H100 with room for activations
    assert spread_over_gpus(70 * gib, 78 * gib, gpus=2)
    assert not spread_over_gpus(70 * gib, 78 * gib, gpus=1)  # one GPU: load and let the user see the OOM


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    _sharpen_routers(model)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_routing_mass_sums_to_the_weight_the_experts_receive(arch: str) -> None:
    """routing_stats' masses per layer sum to the mean total weight the block gives its experts, measured
    where the experts take them (their top_k_weights argument; Llama 4 scales the experts' input by its
    router's sparse scores instead). A router that gives no weights is refused in one clear error."""
    model = _model(arch)
    ids = torch.randint(0, V, (2, 7))
    if arch == "jetmoe":  # its gating returns a dispatch plan and logits: weights cannot be read exactly
        with pytest.raises(UnsupportedModelError, match="STUDENT=<dense model> or student_options.method=uniform"):
            routing_stats(model, [ids])
        return
    totals: dict[int, list[float]] = {}
    hooks = []
    for m in moe_layers(model):
        def weights(_mod, args, kwargs, i=m.index):
            ts = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            idx = [t for t in ts if not t.is_floating_point()]
            w = [t for t in ts if t.is_floating_point() and idx and t.shape == idx[0].shape]
            if w:
                totals.setdefault(i, []).append(float(w[0].double().sum(-1).mean()))

        def scores(_mod, _args, out, i=m.index):  # Llama 4: sparse sigmoid scores [T, E] scale the inputs
            totals.setdefault(i, []).append(float(out[0].double().sum(-1).mean()))

        hooks.append(m.experts[0].register_forward_pre_hook(weights, with_kwargs=True) if arch != "llama4_text"
                     else m.router.register_forward_hook(scores))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    stats = routing_stats(model, [ids])
    routed = ROUTED.get(arch, [0, 1])
    assert sorted(totals) == routed
    sums = stats.mass.sum(-1)
    for i in range(ARCHS[arch]().num_hidden_layers):
        assert float(sums[i]) == pytest.approx(totals[i][0], rel=1e-4) if i in routed else float(sums[i]) == 0.0


class _Odd:
    """A router output no reader knows: iterable like the tuple it wraps, so the block still works."""

    def __init__(self, out: tuple) -> None:
        self.out = out

    def __iter__(self):
        return iter(self.out)


def test_unreadable_routing_skips_analytics_with_one_warning_and_keeps_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.stages.logits import _summarise_cache

    model = _model("mixtral")
    router_type = type(moe_layers(model)[0].router)
    stock = router_type.forward
    monkeypatch.setattr(router_type, "forward", lambda self, h: _Odd(stock(self, h)))
    seqs = torch.randint(0, V, (4, 8))
    meta = CacheMeta(k=4, vocab_size=V, seq_len=8, teacher_hash="m", tokenizer_hash="t", data_hash="d")
    writer = LogitCacheWriter(tmp_path / "cache", meta, sequences_per_shard=2)
    with caplog.at_level(logging.WARNING), RouterRecorder(model, ["a", "b"]) as rec:
        gen = generate_logit_cache(model, seqs, writer, 4, V, 2, rec, torch.tensor([0, 1, 0, 1]))
    skipped = [r for r in caplog.records if "router analytics skipped" in r.getMessage()]
    assert len(skipped) == 1 and "_Odd" in skipped[0].getMessage() and rec.skipped
    assert int(rec.counts.sum()) == 0
    cache = LogitCache(tmp_path / "cache")
    with torch.no_grad():
        ids, _, _ = topk_from_logits(model(input_ids=seqs).logits, 4)
    assert torch.equal(torch.stack([cache[i]["topk_ids"] for i in range(4)]), ids)
    # The stage's record: the cache's numbers, and a router section saying why it is empty (no heatmaps).
    ctx = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(logits=SimpleNamespace(top_k=4)),
                          records={})
    got = _summarise_cache(ctx, tmp_path, model, V, rec, rec.counts, {"experts_implementation": "stock"},
                           {"tokens_per_s": 1.0, "processes": 1, "analytics_sequences": gen["analytics_sequences"],
                            "corpus_sequences": len(seqs), "teacher_text_sequences": 0})
    assert got["outputs"]["tokens"] == seqs.numel() and got["outputs"]["router"] == {"skipped": rec.skipped}
    assert not any(k.startswith("router/") for k in got["metrics"])
    with pytest.raises(UnsupportedModelError, match="cannot read the routing weights"):
        routing_stats(model, [seqs[:1]])


def test_no_router_found_skips_before_any_forward(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("qwen3_moe")
    with torch.no_grad():  # a block whose [E, H] router weight is gone: nothing statically reads as a router
        for m in moe_layers(model):
            m.router.weight = torch.nn.Parameter(m.router.weight[:1].clone())
    with caplog.at_level(logging.WARNING):
        rec = RouterRecorder(model, ["a"])
    assert rec.skipped and "no router" in rec.skipped and len(caplog.records) == 1
    assert find_routers(model) == []


@pytest.mark.parametrize("arch", ["hunyuan_v1_moe", "llama4_text", "jetmoe", "gemma4_text"])
def test_fused_moe_leaves_unknown_routers_and_experts_alone(arch: str) -> None:
    """enable_fused_moe on families outside its kernels either declines (ValueError, which the logits stage
    turns into transformers' own path) or installs what fits; the model's output is unchanged on CPU."""
    from kernels.hf_moe import enable_fused_moe

    model = _model(arch)
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    try:
        enable_fused_moe(model)
    except ValueError:
        pass
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, use_cache=False).logits, ref, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_check_moe_layout_finds_every_family_on_the_meta_device(arch: str) -> None:
    notes = check_moe_layout(ARCHS[arch]())
    assert notes and not any("skipped" in n for n in notes), notes
    assert f"{len(ROUTED.get(arch, [0, 1]))} MoE layers" in notes[-1]


def test_check_moe_layout_refuses_what_it_cannot_use() -> None:
    assert check_moe_layout(AutoConfig.for_model("llama", **{**_C, "intermediate_size": 16})) == []  # dense
    # Experts declared, but every layer dense: no MoE block to distil from.
    cfg = Qwen2MoeConfig(**_C, num_experts=6, moe_intermediate_size=16, intermediate_size=40, mlp_only_layers=[0, 1])
    with pytest.raises(UnsupportedModelError, match="declares 6 experts but no decoder layer holds them"):
        check_moe_layout(cfg)
    # HunYuan's defaults leave head_dim None, which its attention cannot build with: the user's real config
    # is needed, said in one line rather than a traceback.
    with pytest.raises(UnsupportedModelError, match="config cannot build a model"):
        check_moe_layout(_auto("hunyuan_v1_moe", num_experts=4, moe_topk=2, intermediate_size=16))


def test_expert_count_reads_every_family_and_no_dense_config() -> None:
    assert expert_count(ARCHS["hunyuan_v1_moe"]()) == 4 and expert_count(ARCHS["gemma4_text"]()) == 4
    assert expert_count(ARCHS["dots1"]()) == 4 and expert_count(ARCHS["ernie4_5_moe"]()) == 4
    assert expert_count(AutoConfig.for_model("dbrx")) == 4  # under its ffn_config
    per_layer = AutoConfig.for_model("hunyuan_v1_moe", num_experts=4, moe_topk=[1, 2], head_dim=8)
    assert expert_count(per_layer) == 4 and experts_per_token(per_layer, 0) == 1
    assert experts_per_token(per_layer, 1) == 2
    assert expert_count(SimpleNamespace(num_experts=[4, 6])) == 6  # HunYuan's modelling reads per-layer lists
    for dense in ("hunyuan_v1_moe", "gemma4_text", "doge", "llama", "qwen3"):  # defaults: 1 expert, MoE off
        assert not is_moe(AutoConfig.for_model(dense)), dense
    assert expert_count(AutoConfig.for_model("doge", is_moe=True)) == 16384
