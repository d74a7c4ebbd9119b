"""Our Triton kernels compiled for a Hopper GPU on the CPU, no GPU needed.

The interpreter (TRITON_INTERPRET=1, the CPU tests) runs kernels as Python: a branch that a specialisation makes
dead, or an operand that is None in one specialisation, never reaches Triton's compiler there. A GPU then fails
at the first launch (the expert-rows kernels' shared-expert branch took `None + offset` until it was guarded by
a constexpr). Here each specialisation the host code launches is compiled to a cubin for sm_90, as a GPU's first
call would: in a child process, since this one's kernels are the interpreter's.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMEM_LIMIT = 232448  # an H100/H200's shared memory per block
# (shared chunks, biases, top-k, input width, transposed weights) of the expert-rows kernels compiled
SPECS = [*((s, b, 8, 2048, False) for s, b in itertools.product((0, 2), (False, True))), (0, False, 1, 2048, False),
         (2, False, 8, 4096, False), (0, True, 4, 2880, True)]
GROUPED_TOKENS = [64, 256, 4096, 16384]  # token counts whose grouped gate/up tiles compile with paired loads


def compile_for_hopper(fn, constexprs: dict, types: dict[str, str], options: dict | None = None):
    """Compile `fn` with these constexprs (a pointer given as None is one the specialisation leaves out) and
    argument types (default i32) to a cubin for sm_90 (options: num_warps, num_stages); returns the compiled
    kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=dict(constexprs)), target=GPUTarget("cuda", 90, 32),
                          options=options)


def expert_rows_specs() -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, constexprs, types) of every specialisation of the expert-rows kernels fused_experts
    launches: with and without a (gated) shared expert, with and without biases (then GPT-OSS's clamped gate),
    top-8, and top-1, the wide-input tile and GPT-OSS's (transposed, interleaved: paired loads; biased; top-4)
    once each; the tiles rows_tiles gives for many experts and, without shared expert and biases, for few."""
    from kernels.moe_expert_rows import MAX_SLOTS, down_rows_kernel, gate_up_rows_kernel
    from kernels.moe_experts import rows_tiles

    half = {p: "*bf16" for p in ("x_ptr", "w_ptr", "out_ptr", "bias_ptr", "sh_gate_ptr", "sh_up_ptr", "sgate_ptr",
                                 "a_ptr", "sh_down_ptr")}
    types = {**half, "ids_ptr": "*i32", "topw_ptr": "*fp32", "part_ptr": "*fp32", "alpha": "fp32", "limit": "fp32"}
    specs = []
    for shared, bias, top_k, k_dim, transposed in SPECS:
        tiles = rows_tiles(k_dim, 768, 128, transposed)  # 128 experts: the wide tiles; few experts: the narrow
        if not (shared or bias):
            tiles = rows_tiles(k_dim, 768, 4, transposed)
        base = dict(TOP_K=top_k, HAS_BIAS=bias, BLOCK_M=16, BLOCK_S=MAX_SLOTS, DOT_F32=False, N_SHARED=shared,
                    **({} if bias else {"bias_ptr": None}))
        gu = dict(base, BLOCK_N=tiles[0].block_n, BLOCK_K=tiles[0].block_k, ACT=4 if bias else 0,
                  HAS_SGATE=shared > 0, PAIRED=transposed)
        dn = dict(base, BLOCK_N=tiles[1].block_n, BLOCK_K=tiles[1].block_k)
        if not shared:
            gu.update(sh_gate_ptr=None, sh_up_ptr=None, sgate_ptr=None)
            dn.update(sh_down_ptr=None)
        name = f"shared={shared} bias={bias} k={top_k} K={k_dim} transposed={transposed}"
        specs += [(f"gate_up {name}", gate_up_rows_kernel, gu, types), (f"down {name}", down_rows_kernel, dn, types)]
    return specs


def grouped_paired_specs() -> list[tuple[str, object, dict, dict, dict]]:
    """The grouped gate/up kernel on GPT-OSS's transposed, interleaved gate/up (paired loads), biased, with the
    clamped gate, at each pointer tile pick_configs gives (a few rows per expert to thousands), H = 2880."""
    from kernels.moe_experts import pick_configs
    from kernels.moe_grouped_gemm import gate_up_kernel

    types = {**{p: "*bf16" for p in ("x_ptr", "w_ptr", "out_ptr", "bias_ptr")}, "sorted_ptr": "*i32",
             "block_expert_ptr": "*i32", "num_padded_ptr": "*i32", "alpha": "fp32", "limit": "fp32"}
    specs, seen = [], set()
    for tokens in GROUPED_TOKENS:
        c = pick_configs(tokens, 4, 32)[0]
        key = (c.block_m, c.block_n, c.block_k, c.num_warps, c.num_stages)
        if key in seen:
            continue
        seen.add(key)
        consts = dict(TOP_K=4, ACT=4, HAS_BIAS=True, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                      GROUP_M=c.group_m, EVEN_K=2880 % c.block_k == 0, DOT_F32=False, PAIRED=True)
        specs.append((f"grouped gate_up paired tile {key}", gate_up_kernel, consts, types,
                      {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    return specs


def router_selection_specs() -> list[tuple[str, object, dict, dict, dict]]:
    """The router's selection kernel reading matmul logits as its one part (moe_router.gemm_logits): bf16 logits
    (a softmax router) and float32 ones (DeepSeek's grouped sigmoid with its score bias), 384 experts."""
    from kernels.moe_router import _router_kernel

    specs = []
    for fp32 in (False, True):
        dt = "*fp32" if fp32 else "*bf16"
        types = {"x_ptr": "*bf16", "w_ptr": dt, "bias_ptr": "*fp32", "logits_ptr": dt, "topw_ptr": "*fp32",
                 "topi_ptr": "*i32", "part_ptr": dt, "scaling": "fp32"}
        consts = dict(SCORING=int(fp32), RENORM=True, HAS_BIAS=fp32, FP32_LOGITS=fp32, N_GROUP=8 if fp32 else 1,
                      TOPK_GROUP=4 if fp32 else 1, TOP_K=8, BLOCK_T=16, BLOCK_H=16, BLOCK_E=512, BLOCK_K=8,
                      BLOCK_G=8 if fp32 else 2, DOT_F32=False, FP32_PRECISION="ieee", FROM_PARTS=True, BLOCK_P=1,
                      STORE_LOGITS=False,
                      **({} if fp32 else {"bias_ptr": None}))
        specs.append((f"router selection from matmul logits fp32={fp32}", _router_kernel, consts, types,
                      {"num_warps": 8, "num_stages": 1}))
    return specs


def main() -> int:
    """Compile every spec; print one line each; exit 1 on any failure or a block over the shared memory."""
    failed = 0
    specs = [(*spec, None) for spec in expert_rows_specs()] + grouped_paired_specs() + router_selection_specs()
    for name, fn, consts, types, options in specs:
        try:
            k = compile_for_hopper(fn, consts, types, options)
            ok = k.metadata.shared <= SMEM_LIMIT
            print(f"{'ok  ' if ok else 'SMEM'} {name}: {k.metadata.shared} bytes of shared memory")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            ok = False
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:600]}")
        failed += not ok
    return 1 if failed else 0


def test_kernels_compile_for_hopper() -> None:
    pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    got = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stdout[-4000:] + got.stderr[-2000:]
    want = 2 * len(SPECS) + len(grouped_paired_specs()) + len(router_selection_specs())
    assert got.stdout.count("ok  ") == want, got.stdout


if __name__ == "__main__":
    raise SystemExit(main())
