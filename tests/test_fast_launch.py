"""kernels.launch: the short launch path runs exactly the binary Triton's own path would, or is not taken.

On CPU (Triton interpreter) the short path is never taken and launches still compute the right thing; the
key's coverage of Triton's specialisations is checked directly. On a GPU: hits and misses, a change of every
specialisation between launches, CUDA-graph capture, the env switch, and our MoE kernels bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.launch import FastKernel, arg_key, fast

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@triton.jit
def _axpb_kernel(x_ptr, out_ptr, n, a, b, BLOCK: tl.constexpr, SQUARE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    if SQUARE:
        x = x * x
    tl.store(out_ptr + offs, (x * a + b).to(out_ptr.dtype.element_ty), mask=offs < n)


def _run(k: FastKernel, x: torch.Tensor, a: float, b: int, square: bool = False, block: int = 128) -> torch.Tensor:
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    n = x.numel()
    k[(triton.cdiv(n, block),)](x, out, n, a, b, BLOCK=block, SQUARE=square, num_warps=4)
    return out


def _want(x: torch.Tensor, a: float, b: int, square: bool = False) -> torch.Tensor:
    v = x.float() ** 2 if square else x.float()
    return (v * a + b).to(x.dtype)


def test_key_separates_what_triton_specialises_on() -> None:
    """Integers equal to 1, divisible by 16, past int32 (exact values cover them); tensor dtype and 16-byte
    alignment; bools apart from ints; floats all alike (Triton passes them as fp32)."""
    assert arg_key(1) != arg_key(2) and arg_key(16) != arg_key(17) and arg_key(2**31) != arg_key(2**31 - 16)
    assert arg_key(True) != arg_key(1) and arg_key(True, constexpr=True) != arg_key(1, constexpr=True)
    assert arg_key(0.5) == arg_key(2.0) != arg_key(2)
    assert arg_key(0.5, constexpr=True) != arg_key(2.0, constexpr=True)  # compiled in: each value its own binary
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert arg_key(base) == arg_key(torch.zeros(8, dtype=torch.bfloat16))
    assert arg_key(base) != arg_key(base[1:])  # 2 bytes off: not 16-byte aligned
    assert arg_key(base) != arg_key(base.float())
    assert arg_key(None) is None


def test_key_of_a_tensor_descriptor() -> None:
    """Host tensor descriptors (the TMA kernels' arguments): dtype and block shape, which Triton specialises on,
    plus shape, strides, padding and alignment."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    w = torch.zeros(64, 32, dtype=torch.bfloat16)
    d = TensorDescriptor(w, [64, 32], [32, 1], [16, 32])
    assert arg_key(d) == arg_key(TensorDescriptor(torch.zeros(64, 32, dtype=torch.bfloat16), [64, 32], [32, 1],
                                                  [16, 32]))
    assert arg_key(d) != arg_key(TensorDescriptor(w, [64, 32], [32, 1], [32, 32]))  # block shape
    assert arg_key(d) != arg_key(TensorDescriptor(w.half(), [64, 32], [32, 1], [16, 32]))  # dtype
    assert arg_key(d) != arg_key(TensorDescriptor(w, [48, 32], [32, 1], [16, 32]))  # shape


def test_the_inline_key_is_arg_key() -> None:
    """The per-launch key, computed inline for speed, holds arg_key of every argument and the options."""
    from triton.runtime.jit import JITFunction

    # Under the interpreter the decorated kernel has no parameter list; a JITFunction of the same function has
    # one (building it needs no GPU, only launching does).
    k = FastKernel(_axpb_kernel if GPU else JITFunction(_axpb_kernel.fn))
    assert k.names == ["x_ptr", "out_ptr", "n", "a", "b", "BLOCK", "SQUARE"]
    x = torch.zeros(8)
    args = (x, x[1:], 7, 0.5, 16)
    kw = dict(BLOCK=128, SQUARE=True, num_warps=4)
    key, full = k._key(args, kw, 0)
    assert full == [*args, 128, True]
    assert key == (0, 4, None, tuple(arg_key(v, c) for v, c in zip(full, k.is_constexpr)))
    assert key != k._key((x, x[1:], 7, 0.5, 16), dict(BLOCK=128, SQUARE=1, num_warps=4), 0)[0]


def test_a_launch_hook_sends_launches_through_triton() -> None:
    """A profiler's launch hook must see every launch: with one installed the short path is not taken."""
    from triton import knobs

    assert not launch._hooks_installed()
    hook = knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip("this Triton holds launch hooks as plain attributes")

    def seen(metadata: object) -> None:
        pass

    hook.add(seen)
    try:
        assert launch._hooks_installed()
    finally:
        hook.remove(seen)
    assert not launch._hooks_installed()


def test_launch_computes_the_same_on_every_path() -> None:
    """Through the wrapper (short path on a GPU, Triton's path under the interpreter) on changing specialisations."""
    k = FastKernel(_axpb_kernel)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen).to(DEV)
    for n, a, b, square in [(1000, 2.0, 3, False), (1000, 0.5, 1, False), (1000, 2.0, 16, True), (992, 1.5, 17, False),
                            (1, 2.0, 3, False), (1000, 2.0, 3, False)]:
        xs = x[:n]
        torch.testing.assert_close(_run(k, xs, a, b, square), _want(xs, a, b, square))
    misaligned = x[1:]  # 4 bytes off
    torch.testing.assert_close(_run(k, misaligned, 2.0, 3), _want(misaligned, 2.0, 3))
    if not GPU:
        assert k.hits == 0 and not launch.enabled(), "the short path is never taken under the interpreter"


@pytest.mark.skipif(not GPU, reason="the short path exists on a GPU only")
def test_short_path_hits_and_respects_every_specialisation() -> None:
    k = FastKernel(_axpb_kernel)
    x = torch.randn(4096, device="cuda")
    _run(k, x, 2.0, 3)
    assert k.hits == 0 and len(k.compiled) == 1  # first launch: Triton's path, which compiles
    for _ in range(3):
        torch.testing.assert_close(_run(k, x, 2.0, 3), _want(x, 2.0, 3))
    assert k.hits == 3
    # Each of these changes what Triton specialises on: each must run its own binary, and be right.
    cases = [(x, 2.0, 1, False), (x, 2.0, 16, False), (x[:4001], 2.0, 3, False), (x[1:], 2.0, 3, False),
             (x.bfloat16(), 2.0, 3, False), (x, 2.0, 3, True)]
    for xs, a, b, sq in cases:
        for _ in range(2):  # a miss, then a hit
            torch.testing.assert_close(_run(k, xs, a, b, sq), _want(xs, a, b, sq))
    assert len(k.compiled) == 1 + len(cases)


@pytest.mark.skipif(not GPU, reason="CUDA graphs")
def test_short_path_is_captured_by_a_cuda_graph() -> None:
    k = FastKernel(_axpb_kernel)
    x = torch.randn(2048, device="cuda")
    out = torch.empty_like(x)
    for _ in range(2):  # compile, then one short launch, outside the capture
        k[(16,)](x, out, 2048, 3.0, 5, BLOCK=128, SQUARE=False)
    hits = k.hits
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        k[(16,)](x, out, 2048, 3.0, 5, BLOCK=128, SQUARE=False)
    assert k.hits == hits + 1
    x.copy_(torch.randn(2048, device="cuda"))
    out.fill_(float("nan"))
    g.replay()
    torch.testing.assert_close(out, x * 3.0 + 5)


@pytest.mark.skipif(not GPU, reason="the short path exists on a GPU only")
def test_env_switch_and_moe_kernels_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """DISTILL_FAST_LAUNCH=0 takes Triton's path; our MoE kernels give identical bits on both paths."""
    from kernels.moe_experts import ExpertWeights, TileConfig, fused_experts
    from kernels.moe_gemv import gate_up_gemv_kernel
    from kernels.moe_grouped_gemm import gate_up_kernel
    from kernels.moe_grouped_tma import down_tma_kernel, gate_up_tma_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    E, H, I, k = 16, 256, 192, 4
    w = ExpertWeights((torch.randn(E, 2 * I, H, device="cuda", generator=gen) / 16).bfloat16(),
                      (torch.randn(E, H, I, device="cuda", generator=gen) / 14).bfloat16())
    outs = {}
    for T in (2, 300):
        x = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(E, device="cuda", generator=gen)[:k] for _ in range(T)]).int()
        topw = torch.rand(T, k, device="cuda", generator=gen)
        # Per-slot stores in the down GEMM: no float32 atomics, so the sum order, and the bits, are fixed.
        tiles = (TileConfig(64, 64, 64, 8, 4, 4), TileConfig(64, 128, 64, 8, 8, 3, per_slot=True))
        tma = (TileConfig(128, 128, 64, 8, 8, 3, tma=True),
               TileConfig(128, 256, 64, 8, 8, 3, per_slot=True, tma=True, programs_per_sm=1, flatten=True))
        for mode in ("0", "1"):
            monkeypatch.setenv(launch.ENV, mode)
            for _ in range(3):
                outs[(T, mode)] = fused_experts(x, w, topw, ids, configs=tiles)
                outs[(T, mode, "tma")] = fused_experts(x, w, topw, ids, configs=tma, force_path="grouped")
        assert torch.equal(outs[(T, "0")], outs[(T, "1")]), T
        assert torch.equal(outs[(T, "0", "tma")], outs[(T, "1", "tma")]), T
    assert fast(gate_up_gemv_kernel).hits > 0 and fast(gate_up_kernel).hits > 0
    assert fast(gate_up_tma_kernel).hits > 0 and fast(down_tma_kernel).hits > 0
    monkeypatch.setenv(launch.ENV, "0")
    before = fast(gate_up_gemv_kernel).hits
    fused_experts(x[:2], w, topw[:2], ids[:2])
    assert fast(gate_up_gemv_kernel).hits == before
