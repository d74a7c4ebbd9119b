"""Every MoE family a user may bring, on a tiny random config: loaded through our safe loader, its cached
top-k logits equal a plain forward of the same model, and its routers are found and counted by the general
mechanism (modules named *Router returning (logits, weights, indices)), not by a list of architectures."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
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

from logit_cache import CacheMeta, LogitCache, LogitCacheWriter, topk_from_logits
from teachers.load import is_moe, load_teacher
from teachers.logit_generation import generate_logit_cache
from teachers.router_analytics import RouterRecorder, summarise, write_heatmaps

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
}


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_cache_equals_a_plain_forward_and_routers_are_counted(arch: str, tokenizer, tmp_path: Path) -> None:
    cfg = ARCHS[arch]()
    assert is_moe(cfg), arch
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # routers with clear preferences (some start at zero)
        for name, p in model.named_parameters():
            if "router" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
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
    routed = {"deepseek_v3": 2}.get(arch, cfg.num_hidden_layers)
    top_k = cfg.num_experts_per_tok
    assert rec.counts.shape[0] == routed
    assert (rec.counts.sum((1, 2)) == seqs.numel() * top_k).all()
    assert (rec.counts[:, 0].sum(-1) == 2 * 12 * top_k).all()  # two "news" sequences
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


def test_router_counts_resume_exactly_after_an_interrupted_generation(tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_config(ARCHS["mixtral"]()).eval()
    seqs, sources = torch.randint(0, V, (6, 8)), torch.tensor([0, 1, 2, 0, 1, 2])
    meta = CacheMeta(k=4, vocab_size=V, seq_len=8, teacher_hash="m", tokenizer_hash="t", data_hash="d")

    def run(root: Path, upto: int | None = None) -> torch.Tensor:
        writer = LogitCacheWriter(root, meta, sequences_per_shard=2)
        with RouterRecorder(model, ["a", "b", "c"]) as rec:
            part = seqs if upto is None else seqs[:upto]
            if upto is None:
                generate_logit_cache(model, part, writer, 4, V, 2, rec, sources)
            else:  # stop early: the cache holds `upto` sequences in complete shards, not finalized
                for i in range(0, upto, 2):
                    rec.set_batch(sources[i:i + 2], 8)
                    out = model(input_ids=part[i:i + 2]).logits
                    writer.add(part[i:i + 2], *topk_from_logits(out, 4))
                from teachers.logit_generation import COUNTS_FILE, save_counts
                save_counts(root / COUNTS_FILE, rec.counts, upto)
        return rec.counts.clone()

    full = run(tmp_path / "full")
    run(tmp_path / "resumed", upto=4)
    assert torch.equal(run(tmp_path / "resumed"), full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels' GPU path needs CUDA")
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gpu_cache_through_the_fused_kernels_matches_the_stock_forward(arch: str, tmp_path: Path) -> None:
    """On GPU the logits stage runs our fused experts/routers; the cache must match transformers' own path
    (bf16: the same log-probs within bf16 noise at the ids the cache kept). Unsupported cases fall back."""
    from kernels.hf_moe import enable_fused_moe

    torch.manual_seed(0)
    cfg = ARCHS[arch]()
    stock = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "router" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
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
    assert (rec.counts.sum((1, 2)) == seqs.numel() * cfg.num_experts_per_tok).all()
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
