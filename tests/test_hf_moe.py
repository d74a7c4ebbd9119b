"""`fused_triton` inside transformers: whole tiny models of five MoE architectures give eager's logits."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.integrations.moe import grouped_mm_experts_forward

from kernels import dispatch, hf_moe, hf_shared
from kernels.hf_moe import enable_fused_moe, fused_triton_experts_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)

CONFIGS = {
    "mixtral": lambda: MixtralConfig(**SMALL, intermediate_size=40, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": lambda: OlmoeConfig(**SMALL, intermediate_size=24, num_experts=16, num_experts_per_tok=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24, num_experts=12,
                                       num_experts_per_tok=4, norm_topk_prob=True, head_dim=12),
    "deepseek_v3": lambda: DeepseekV3Config(**{**SMALL, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
                                            n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                            n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=None,
                                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                            v_head_dim=12, routed_scaling_factor=2.0),
    # A gated shared expert 56 wide beside experts 24 wide: three chunks, the last one partly masked.
    "qwen2_moe": lambda: Qwen2MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=24, num_experts=12,
                                       num_experts_per_tok=4, shared_expert_intermediate_size=56),
    # GPT-OSS: expert biases, the clamped SwiGLU on interleaved, transposed gate/up weights, attention sinks and
    # alternating sliding-window layers. swiglu_limit well under the default 7 so that the clamp bites on these
    # small activations (and a limit that did not reach the kernels would show); alpha also not the default.
    "gpt_oss": lambda: GptOssConfig(**SMALL, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                                    head_dim=12, sliding_window=4, swiglu_limit=0.4, swiglu_alpha=1.5),
}
# Routers left unfused, by architecture: GPT-OSS's has a logit bias and a softmax over the top-k logits only, not
# a scoring our router kernel has; it keeps its stock forward and is reported as unrecognised.
UNFUSED_ROUTERS = {"gpt_oss": ["GptOssTopKRouter"]}


def _model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # routers start at zero in some architectures: give them real preferences
        for n, p in model.named_parameters():
            if n.endswith("proj_bias"):  # GPT-OSS's expert biases [E, 2I] / [E, H], zeros at init: make them count
                p.normal_(0, 0.2)
            elif p.dim() >= 2:
                # Routers ("gate", GPT-OSS's "router") get clear preferences: near-tied top-k choices flip between
                # two half-precision paths and move the logits by far more than either path's rounding.
                p.normal_(0, 0.3 if any(r in n.split(".")[-2] for r in ("gate", "router")) else 0.05)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.05)
    return model.to(DEV).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_model_matches_eager(name: str) -> None:
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = _model(name, dtype)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    summary = enable_fused_moe(model)
    unfused = UNFUSED_ROUTERS.get(name, [])
    assert summary["routers_unrecognised"] == unfused
    assert summary["routers_fused"] == (0 if unfused else model.config.num_hidden_layers)
    with torch.no_grad():
        out = model(input_ids=ids).logits.double()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err


def test_unsupported_case_falls_back_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    model = _model("mixtral", torch.float32)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 48, device=DEV)
    idx = torch.randint(0, 8, (5, 2), device=DEV)
    w = torch.rand(5, 2, device=DEV)
    ref = torch.ops.aten.clone(fused_triton_experts_forward(experts, x, idx, w))
    experts.has_post_expert_norm = True  # a case we do not cover
    experts.post_expert_norm = torch.nn.Identity()
    enable_fused_moe(model)  # the structure changed: the cached verdict is worked out again
    with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
        out = fused_triton_experts_forward(experts, x, idx, w)
    assert "post-expert norm" in caplog.text and "grouped_mm" in caplog.text
    # fp32 inputs: our dots and cuBLAS's may both use tf32-class arithmetic on GPU
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3


def test_dense_model_is_refused() -> None:
    from transformers import LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL, intermediate_size=32))
    with pytest.raises(ValueError, match="experts interface"):
        enable_fused_moe(dense)


@pytest.mark.parametrize("T", [3, 9])  # the decode (GEMV) path and the grouped GEMMs
def test_gpt_oss_experts_run_our_kernels(T: int, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-OSS's experts (biases, clamped SwiGLU, transposed interleaved weights) go to our kernels, not the
    fallback, and give transformers' grouped_mm result on the same inputs, with the clamp biting."""
    model = _model("gpt_oss", torch.float32)
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "GptOssExperts" and experts.has_bias
    assert experts.is_transposed and not experts.is_concatenated
    for b in (experts.gate_up_proj_bias, experts.down_proj_bias):
        assert b.abs().min() > 0, "expert biases left at zero: the test would not see them"
    enable_fused_moe(model)
    monkeypatch.setenv("DISTILL_MOE_DISPATCH", "fused")  # on a GPU the dispatcher might time grouped_mm faster
    calls: list[tuple[str, float, float, bool]] = []
    real = hf_moe.fused_experts

    def spy(x, weights, *args, **kwargs):
        calls.append((kwargs["activation"], kwargs["swiglu_alpha"], kwargs["swiglu_limit"],
                      weights.gate_up_bias is not None and weights.down_bias is not None))
        return real(x, weights, *args, **kwargs)

    monkeypatch.setattr(hf_moe, "fused_experts", spy)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, 48, generator=gen).to(DEV)
    idx = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)]).to(DEV)
    w = torch.rand(T, 2, generator=gen).softmax(-1).to(DEV)
    # Scale the input so that the clamp bites whatever limit this transformers version gives the experts (5.17
    # keeps GPT-OSS's 7 and ignores the config's swiglu_limit): the largest gate and |up| pre-activations reach
    # twice the limit past the biases, most stay under it.
    xw = torch.einsum("th,tkhi->tki", x.double(), experts.gate_up_proj.double()[idx])
    reach = min(xw[..., ::2].max().item(), xw[..., 1::2].abs().max().item())
    x = x * ((2 * experts.limit + experts.gate_up_proj_bias.abs().max().item()) / reach)
    pre = torch.einsum("th,tkhi->tki", x.double(), experts.gate_up_proj.double()[idx]) + \
        experts.gate_up_proj_bias.double()[idx]
    assert (pre[..., ::2] > experts.limit).any() and (pre[..., 1::2].abs() > experts.limit).any(), "no clamping"
    assert (pre[..., ::2] <= experts.limit).any(), "everything clamped: the gate itself would go untested"
    caplog.clear()  # enable_fused_moe's note on the unfused router is not about the experts
    with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"), torch.no_grad():
        out = fused_triton_experts_forward(experts, x, idx, w)
    assert "fused_triton:" not in caplog.text, caplog.text
    assert calls == [("clamped_swiglu", experts.alpha, experts.limit, True)], calls

    with torch.no_grad():
        ref = grouped_mm_experts_forward(experts, x, idx, w)
    # fp32 inputs: our dots and cuBLAS's may both use tf32-class arithmetic on GPU
    assert ((out - ref).norm() / ref.norm()).item() < (5e-3 if DEV == "cuda" else 1e-5)


def test_unknown_custom_gate_still_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """A custom `_apply_gate` not in KNOWN_GATES (here GPT-OSS's gate patched on one module's class) still runs
    transformers' grouped_mm, and says why."""
    model = _model("gpt_oss", torch.float32)
    experts = model.model.layers[0].mlp.experts
    patched = type("GptOssExperts", (type(experts),), {"_apply_gate": lambda self, gu: gu[..., ::2] * gu[..., 1::2]})
    experts.__class__ = patched  # same name, different gate: the registry must not take it
    assert hf_moe._unsupported(experts, torch.zeros(1, 48, device=DEV)) == "GptOssExperts has its own gate function"
    hf_moe._warned.discard("GptOssExperts has its own gate function")
    enable_fused_moe(model)
    x = torch.randn(5, 48, device=DEV)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(5)]).to(DEV)
    w = torch.rand(5, 2, device=DEV)
    with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"), torch.no_grad():
        out = fused_triton_experts_forward(experts, x, idx, w)
        ref = grouped_mm_experts_forward(experts, x, idx, w)
    assert "has its own gate function" in caplog.text
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_compiled_model_runs_the_stock_paths_in_one_graph(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the experts and routers take transformers' own paths, which trace into one graph
    (fullgraph=True fails on any break): our dispatch does not trace, and its compiled decode ran 20x slower than
    stock on a GPU. Uncompiled calls still run our kernels."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = _model(name, dtype)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double()
    enable_fused_moe(model)
    calls: list[str] = []
    experts, route = hf_moe.fused_experts, hf_moe.route
    monkeypatch.setattr(hf_moe, "fused_experts", lambda *a, **k: calls.append("experts") or experts(*a, **k))
    monkeypatch.setattr(hf_moe, "route", lambda *a, **k: calls.append("router") or route(*a, **k))
    with torch.no_grad():
        model(input_ids=ids)
    if DEV == "cpu":  # plain calls run ours here (the interpreter has nothing to time; a GPU may measure stock)
        assert {"experts", "router"} <= set(calls)
    calls.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=ids).logits.double()
    assert calls == []
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err


def _decode(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode of 3 tokens after a 9-token prompt, two sequences (2 tokens per decode step): (tokens,
    logits of the steps [steps, 2, vocab]). The prompt's 18 tokens are past the decode kernels' 16; the two decode
    steps after it read a cache the kernels' own step wrote."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEV)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits).double()


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_blocks_decode_on_our_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks with a shared expert (Qwen2-MoE's gated one in three chunks, DeepSeek-V3's ungated one) decode with
    routed and shared experts in our kernels' one call per block, and give eager's tokens and logits."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = _model(name, dtype)
    model.set_experts_implementation("eager")
    ref_tokens, ref_logits = _decode(model)
    monkeypatch.setenv(dispatch.ENV, "fused")  # our side, also where a GPU would measure stock as faster
    summary = enable_fused_moe(model)
    assert summary["shared_blocks_fused"] == model.config.num_hidden_layers
    calls: list[int] = []
    real = hf_shared.fused_experts
    monkeypatch.setattr(hf_shared, "fused_experts",
                        lambda x, *a, **k: (calls.append(x.shape[0]) if k.get("shared") is not None else None)
                        or real(x, *a, **k))
    tokens, logits = _decode(model)
    # 2 decode steps of 2 tokens per layer, plus each block's one check against its stock forward; the prompt
    # (18 tokens) runs the stock block.
    assert calls == [2] * (2 + 1) * model.config.num_hidden_layers, calls
    assert torch.equal(tokens, ref_tokens)
    err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err


def _calls(model: torch.nn.Module, n: int = 2) -> torch.Tensor:
    """Logits [n, 1, 2, vocab] of n decode-sized calls (one sequence of 2 tokens, no cache): each block's first
    such call compares its paths, the later ones run the path it kept."""
    ids = torch.tensor([[5, 7]], device=DEV)
    with torch.no_grad():
        return torch.stack([model(input_ids=ids, use_cache=False).logits.double() for _ in range(n)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_a_block_that_is_not_what_its_structure_says_keeps_its_stock_forward(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structure is not semantics: a block with the shared-expert layout whose forward scales its output (as an
    architecture might) is caught by the first call's comparison and keeps its stock forward, logged once."""
    model = _model("qwen2_moe", torch.float32)
    for layer in model.model.layers:
        cls = type(layer.mlp)
        layer.mlp.__class__ = type(cls.__name__, (cls,), {"forward": lambda self, h, _c=cls: 1.5 * _c.forward(self, h)})
    model.set_experts_implementation("eager")
    ref = _calls(model)
    monkeypatch.setenv(dispatch.ENV, "fused")
    hf_moe._warned.clear()
    enable_fused_moe(model)
    with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
        logits = _calls(model)
    assert "differs from its stock forward" in caplog.text, caplog.text
    assert caplog.text.count("differs from its stock forward") == 1  # once, not per block and call
    # The blocks' stock forwards, with our routers and experts in them: float32 dots of another order on a GPU
    assert _rel(logits, ref) < (1e-4 if DEV == "cpu" else 2e-3)


def test_shared_experts_our_kernels_cannot_take_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    """A shared expert with biases (or any layout other than three bias-free nn.Linear) is not fused, and the
    reason is logged; the model still gives eager's output."""
    model = _model("qwen2_moe", torch.float32)
    mlp = model.model.layers[0].mlp.shared_expert
    mlp.up_proj = torch.nn.Linear(48, 56, bias=True).to(DEV)
    model.set_experts_implementation("eager")
    ref = _calls(model)
    hf_moe._warned.clear()
    with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
        summary = enable_fused_moe(model)
    assert summary["shared_blocks_fused"] == model.config.num_hidden_layers - 1
    assert "shared_expert is not three bias-free nn.Linear" in caplog.text
    assert _rel(_calls(model), ref) < (1e-4 if DEV == "cpu" else 2e-3)
    # Offloading hooks (accelerate's) load weights inside the forwards our kernels would bypass: left alone too.
    other = model.model.layers[1].mlp
    other.shared_expert.down_proj._hf_hook = object()
    assert "accelerate hooks" in hf_shared.structure_problem(other)


def test_a_block_called_with_more_than_hidden_states_runs_its_stock_forward(caplog: pytest.LogCaptureFixture) -> None:
    """DeepSeek-V4's blocks take the token ids beside the hidden states (its hash routers read them): whatever a
    block's extra arguments mean, it gets them, through its stock forward."""
    model = _model("qwen2_moe", torch.float32)
    block = model.model.layers[0].mlp
    cls = type(block)
    block.__class__ = type(cls.__name__, (cls,), {
        "forward": lambda self, h, input_ids=None, _c=cls: _c.forward(self, h) + (0 if input_ids is None else 1)})
    enable_fused_moe(model)
    h = torch.randn(1, 2, 48, device=DEV)
    hf_moe._warned.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
        with_ids = block(h, input_ids=torch.zeros(1, 2, dtype=torch.long, device=DEV))
        positional = block(h, torch.zeros(1, 2, dtype=torch.long, device=DEV))
        plain = block(h)
    assert torch.allclose(with_ids, plain + 1, atol=1e-5) and torch.allclose(positional, plain + 1, atol=1e-5)
    assert "forward takes more than the hidden states" in caplog.text


def test_observers_see_one_routing_per_block_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's first decode-sized call runs both paths to compare them (and, on a GPU, times them): hooks on its
    router (transformers' router-logits recorder, our routing taps) still see one call per call of the block."""
    monkeypatch.setenv(dispatch.ENV, "fused")
    model = _model("qwen2_moe", torch.float32)
    enable_fused_moe(model)
    seen: list[int] = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(a[0].shape[0]))
    with torch.no_grad():
        for _ in range(2):  # the first call compares the paths, the second runs the chosen one
            model(input_ids=torch.tensor([[5, 7]], device=DEV), use_cache=False)
    assert seen == [2] * 2 * model.config.num_hidden_layers, seen
    assert all(m.__dict__.get("_fused_block_state") for m in model.modules() if getattr(m, "_fused_block", False))
