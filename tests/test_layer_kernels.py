"""The one-pass RMSNorm and rotary kernels against their PyTorch references, and their installation on
transformers models, each checked against the model's own functions.

Runs on GPU when there is one, else through the Triton interpreter (TRITON_INTERPRET=1, set by conftest)."""
from __future__ import annotations

import copy
import logging
import sys

import pytest
import torch

from kernels import hf_norms, hf_rotary
from kernels import rms_norm as norm_kernel
from kernels import rotary as rotary_kernel
from kernels.hf_moe import enable_fused_moe
from tests.test_hf_moe import CONFIGS, _model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# One half-precision rounding apart (the sum of squares is taken in another order), which CAST_THEN_SCALE's two
# roundings can make two units of the output's last place.
ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("mode", norm_kernel.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [48, 100, 2048])
def test_rms_norm_matches_its_reference(mode: int, dtype: torch.dtype, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    base = torch.randn(7, width + 5, generator=gen).to(DEV, dtype) * 3
    x = base[:, :width]  # rows one stride apart, not contiguous
    w = (torch.randn(width, generator=gen) * 0.5 + 1).to(DEV, dtype)
    out = norm_kernel.rms_norm(x, w, 1e-6, mode)
    ref = norm_kernel.rms_norm_reference(x, w, 1e-6, mode)
    assert out.dtype == ref.dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * ULP[dtype], atol=2 * ULP[dtype])


def test_rms_norm_takes_a_float32_weight_and_any_leading_shape() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 16, generator=gen).to(DEV, torch.bfloat16).transpose(1, 2)  # rows not one stride apart
    w = torch.randn(16, generator=gen).to(DEV)
    out = norm_kernel.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32  # the promoted dtype, as weight * x.to(bf16) gives
    # One bf16 unit apart at most: the normalised row is rounded to bf16 first (by truncation under Triton's
    # interpreter, to nearest on a GPU).
    ref = norm_kernel.rms_norm_reference(x, w, 1e-5)
    torch.testing.assert_close(out, ref, rtol=ULP[torch.bfloat16], atol=1e-5)
    with pytest.raises(ValueError, match="weight"):
        norm_kernel.rms_norm(x, torch.ones(15, device=DEV), 1e-5)
    assert norm_kernel.rms_norm(x[:0], w, 1e-5).shape == (0, 3, 5, 16)


ROTARY_CASES = {  # name: (B, H, S, D, cos width, cos batch, shared_halves)
    "full": (2, 3, 5, 8, 8, 2, False),
    "partial": (2, 3, 5, 10, 6, 2, False),  # dims 6..9 pass through
    "cos-batch-1": (3, 2, 4, 16, 16, 1, False),
    "shared-halves": (2, 4, 3, 12, 6, 2, True),  # GPT-OSS: one cos of half width for both halves
    "many-heads": (1, 40, 2, 64, 64, 1, False),  # heads in blocks, the last one partial
}


@pytest.mark.parametrize("case", sorted(ROTARY_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_its_reference(case: str, dtype: torch.dtype) -> None:
    b, h, s, d, r, cb, shared = ROTARY_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    x = torch.randn(b, s, h, d, generator=gen).to(DEV, dtype).transpose(1, 2)  # transformers' layout
    cos, sin = (torch.randn(cb, s, r, generator=gen).to(DEV, dtype) for _ in range(2))
    k = torch.randn(b, s, 1, d, generator=gen).to(DEV, dtype).transpose(1, 2)  # fewer key heads (GQA)
    out, out_k = rotary_kernel.rotary_pair(x, k, cos, sin, shared)  # one launch for both
    assert out.stride() == x.stride() and out.dtype == dtype
    for got, inp in ((out, x), (out_k, k), (rotary_kernel.rotary(x, cos, sin, shared), x)):
        ref = rotary_kernel.rotary_reference(inp.double(), cos.double(), sin.double(), shared)
        torch.testing.assert_close(got.double(), ref, rtol=ULP[dtype], atol=ULP[dtype] * 4)


def test_rotary_refuses_what_it_does_not_compute() -> None:
    x = torch.randn(1, 2, 3, 8, device=DEV)
    odd = torch.randn(1, 3, 5, device=DEV)
    assert not rotary_kernel.supports(x, odd, odd)
    assert not rotary_kernel.supports(x, torch.randn(1, 3, 16, device=DEV), torch.randn(1, 3, 16, device=DEV))
    assert not rotary_kernel.supports(x, torch.randn(1, 3, 8, device=DEV), torch.randn(1, 3, 8, device=DEV), True)
    with pytest.raises(ValueError, match="rotary takes"):
        rotary_kernel.rotary(x, odd, odd)


# Rotary kernel runs expected per architecture: DeepSeek-V3 rotates by its interleaved function (not replaced), the
# others through `apply_rotary_pos_emb` (GLM-4-MoE partially, GPT-OSS with shared halves).
ROTARY_RUNS = {"mixtral": True, "olmoe": True, "qwen3_moe": True, "qwen2_moe": True, "gpt_oss": True,
               "deepseek_v3": None}


@pytest.mark.parametrize("name", sorted(ROTARY_RUNS))
def test_models_on_our_norms_and_rotary_match_their_own_forward(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = _model(name, dtype)
    with torch.no_grad():  # norms at their init of ones would hide a dropped weight: make them count
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.normal_(1.0, 0.3)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    # The truth is the same weights' float32 eager forward: in bf16 transformers' own eager forward is itself about
    # 2e-2 from it on Mixtral (bench/results/probes/gpt_oss_bf16_probe_h200.log), ours closer.
    truth = copy.deepcopy(model).float()
    truth.set_experts_implementation("eager")
    with torch.no_grad():
        ref = truth(input_ids=ids).logits.double()
        eager = model(input_ids=ids).logits.double()
    del truth
    # Ours may be as far from the truth as transformers' own forward in the model's dtype, with some margin.
    tol = max(2e-2, 1.5 * ((eager - ref).norm() / ref.norm()).item()) if dtype == torch.bfloat16 else 1e-5
    calls = {"norm": 0, "rotary": 0}
    norm, rot = norm_kernel.rms_norm, rotary_kernel.rotary_pair
    monkeypatch.setattr(norm_kernel, "rms_norm", lambda *a, **k: calls.__setitem__("norm", calls["norm"] + 1)
                        or norm(*a, **k))
    monkeypatch.setattr(rotary_kernel, "rotary_pair", lambda *a, **k: calls.__setitem__("rotary", calls["rotary"]
                                                                                         + 1) or rot(*a, **k))
    try:
        summary = enable_fused_moe(model)
        norms = [m for m in model.modules() if hf_norms.norm_epsilon(m) is not None]
        assert summary["norms_fused"] == len(norms) >= 2 * model.config.num_hidden_layers + 1
        assert type(model.model).__module__ in summary["rotary_fused"]
        with torch.no_grad():
            out = model(input_ids=ids).logits.double()
            calls_first = dict(calls)
            again = model(input_ids=ids).logits.double()
            third = model(input_ids=ids).logits.double()
        for o in (out, again):
            err = ((o - ref).norm() / ref.norm()).item()
            assert err < tol, (err, tol)
        # Checked once, then the same kernels every call (on a GPU the first call of each MoE problem may return
        # another path's output while the dispatcher measures; from the second on the choice is fixed).
        assert torch.equal(again, third)
        assert calls_first["norm"] >= len(norms)  # each module's check tried the kernel, then ran it
        if ROTARY_RUNS[name]:
            assert calls_first["rotary"] > 0
        chosen = {m.__dict__.get("_fused_norm_state", {}).get((dtype, dtype, DEV)) for m in norms}
        assert chosen <= set(norm_kernel.MODES), chosen  # every norm of these models is one our kernel computes
        # Another model of the same file, not enabled, runs the file's own function (a derived student of the
        # teacher's family, a stock copy timed beside the fused one).
        other = _model(name, dtype)
        calls["rotary"] = calls["norm"] = 0
        with torch.no_grad():
            other(input_ids=ids)
        assert calls == {"rotary": 0, "norm": 0}
        hf_rotary.uninstall_fused_rotary(model)
        with torch.no_grad():
            model(input_ids=ids)
        assert calls["rotary"] == 0 and calls["norm"] > 0
    finally:
        hf_rotary.uninstall_fused_rotary(model)
        hf_rotary.uninstall_fused_rotary()
        hf_norms.uninstall_fused_norms(model)
    modeling = sys.modules[type(model.model).__module__]
    assert not hasattr(modeling.apply_rotary_pos_emb, "_fused_original")


class _GemmaNorm(torch.nn.Module):
    """Gemma's RMSNorm: a zero-initialised weight applied as 1 + w, in float32."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width) * 0.1)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (t * (1.0 + self.weight.float())).type_as(x)


def test_each_norm_gets_the_mode_its_forward_computes_or_keeps_its_own(caplog: pytest.LogCaptureFixture) -> None:
    model = torch.nn.ModuleDict({"gemma": _GemmaNorm(32), "layer": torch.nn.LayerNorm(32, bias=False),
                                 "linear": torch.nn.Linear(32, 32)}).to(DEV)
    x = torch.randn(4, 32, device=DEV) + 0.5  # a mean away from zero: a LayerNorm centres it, an RMSNorm does not
    with torch.no_grad():
        refs = {n: m(x) for n, m in model.items()}
    assert hf_norms.install_fused_norms(model) == 2  # the Linear has a bias and a 2-D weight: not a candidate
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
        outs = {n: m(x) for n, m in model.items()}
    assert model["gemma"]._fused_norm_state[(x.dtype, x.dtype, DEV)] == norm_kernel.ONE_PLUS_WEIGHT
    assert isinstance(model["layer"]._fused_norm_state[(x.dtype, x.dtype, DEV)], str)
    assert "LayerNorm is not an RMSNorm our kernel computes" in caplog.text
    torch.testing.assert_close(outs["gemma"], refs["gemma"], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs["layer"], refs["layer"]) and torch.equal(outs["linear"], refs["linear"])
    # Training: autograd runs through the module's own forward.
    xg = x.clone().requires_grad_(True)
    model["gemma"](xg).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    hf_norms.uninstall_fused_norms(model)


def test_a_rotary_function_of_another_convention_keeps_its_own(caplog: pytest.LogCaptureFixture) -> None:
    def interleaved(q, k, cos, sin, unsqueeze_dim=1):  # pairs (0, 1), (2, 3), ...: not rotate-half
        def rot(x):
            x2 = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
            return x * cos.unsqueeze(unsqueeze_dim) + x2 * sin.unsqueeze(unsqueeze_dim)
        return rot(q), rot(k)

    fused = hf_rotary._fused("tests.fake_modeling", interleaved)
    hf_rotary._inside[0] += 1  # as inside an enabled model's attention forward
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 3, 8, generator=gen).to(DEV) for _ in range(2))
    pos = torch.arange(3, dtype=torch.float32)[None, :, None] * torch.linspace(0.1, 1, 8)[None, None]
    cos, sin = pos.cos().to(DEV), pos.sin().to(DEV)
    try:
        with caplog.at_level(logging.WARNING, logger="kernels.hf_moe"):
            out = fused(q, k, cos, sin)
    finally:
        hf_rotary._inside[0] -= 1
    assert "tests.fake_modeling.apply_rotary_pos_emb is not the rotate-half embedding" in caplog.text
    ref = interleaved(q, k, cos, sin)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_a_module_carries_one_swapped_forward_at_a_time() -> None:
    """Installing twice keeps the module's own forward; another integration's swap on the same module is refused
    (each calls `_stock_forward`, so two would call each other); restoring gives the own forward back."""
    from kernels.forward_swap import install_forward, restore_forwards

    lin = torch.nn.Linear(3, 3)
    own = lin.forward
    assert install_forward(lin, "_a", lambda self, x: self._stock_forward(x) + 1)
    assert install_forward(lin, "_a", lambda self, x: self._stock_forward(x) + 1)  # again: still the own forward
    assert not install_forward(lin, "_b", lambda self, x: self._stock_forward(x) * 0)
    x = torch.randn(2, 3)
    assert torch.equal(lin(x), own(x) + 1)
    restore_forwards(lin, "_a")
    assert torch.equal(lin(x), own(x))
    assert install_forward(lin, "_b", lambda self, x: self._stock_forward(x) * 0)  # free again
    assert torch.equal(lin(x), torch.zeros(2, 3))
    restore_forwards(lin, "_b")


def test_every_architecture_of_the_moe_tests_is_covered_here() -> None:
    assert set(ROTARY_RUNS) == set(CONFIGS)
