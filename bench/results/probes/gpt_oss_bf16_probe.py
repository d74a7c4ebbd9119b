"""GPU probe: how far each experts path of a tiny bf16 GPT-OSS / Mixtral is from the same weights' float32 eager
forward (transformers' bf16 paths, and ours forced), to tell our kernels' error from bf16's own spread."""
import copy
import os

import torch

from tests.test_hf_moe import _model

ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).cuda()


def rel(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{((a - b).norm() / b.norm()).item():.2e}"


for name in ("gpt_oss", "mixtral", "qwen3_moe"):
    model = _model(name, torch.bfloat16)
    r32 = copy.deepcopy(model).float()
    r32.set_experts_implementation("eager")
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = r32(input_ids=ids).logits.double()
        eager = model(input_ids=ids).logits.double()
    print(name, "eager bf16 vs float32 eager", rel(eager, ref), flush=True)
    for impl in ("batched_mm", "grouped_mm"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            out = model(input_ids=ids).logits.double()
        print(name, impl, "bf16 vs float32 eager", rel(out, ref), "vs eager bf16", rel(out, eager), flush=True)
    os.environ["DISTILL_MOE_DISPATCH"] = "fused"
    from kernels.hf_moe import enable_fused_moe
    enable_fused_moe(model, norms=False, rotary=False)
    with torch.no_grad():
        out = model(input_ids=ids).logits.double()
    print(name, "ours forced bf16 vs float32 eager", rel(out, ref), "vs eager bf16", rel(out, eager), flush=True)
    enable_fused_moe(model)
    with torch.no_grad():
        out = model(input_ids=ids).logits.double()
    print(name, "ours + norms + rotary bf16 vs float32 eager", rel(out, ref), "vs eager bf16", rel(out, eager),
          flush=True)
    del os.environ["DISTILL_MOE_DISPATCH"]
    from kernels.hf_rotary import uninstall_fused_rotary
    uninstall_fused_rotary()
