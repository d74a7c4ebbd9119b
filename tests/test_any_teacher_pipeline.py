"""The whole pipeline on teachers whose layout differs from transformers' usual MoE: HunYuan-MoE-V1 (its router
is a `*Gate` module) with a dense student, and Llama 4 (two-value router, its decoder's layers not under
`get_decoder()`) with a derived one. Both used to pass the MoE check and then crash; each must finish with
router analytics in its report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.mlflow_store import fresh_store

pytestmark = pytest.mark.slow

FAST = ("baseline.enabled=false latency.enabled=false eval.limit=2 data.train_tokens=512 "
        "logits.sequences_per_shard=8 student_options.keep_layers=top_1")


def _teacher(arch: str, folder: Path, tok) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, num_experts_per_tok=2,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    extra = {"hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, intermediate_size=16),
             "llama4_text": dict(num_local_experts=4, intermediate_size=16, intermediate_size_mlp=24)}[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common, **extra))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch, student", [("hunyuan_v1_moe", "dense.json"), ("llama4_text", "derived")])
def test_the_pipeline_runs_on_teachers_of_other_layouts(arch, student, smollm2_tokenizer_dir, tmp_path,
                                                        monkeypatch) -> None:
    from transformers import AutoTokenizer

    from kernels import kd_loss
    from pipelines.config import load_config
    from pipelines.run import run_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)  # as in test_pipeline_e2e: the CPU path of the loss
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    teacher = _teacher(arch, tmp_path / arch, tok)
    if student == "dense.json":
        student = str(tmp_path / "dense.json")
        Path(student).write_text(json.dumps({
            "model_type": "llama", "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256, "tie_word_embeddings": True}))
    cfg = load_config("ci", FAST, teacher=str(teacher), student=student, run_name=arch)
    assert run_pipeline(cfg, tmp_path / "runs") == 0
    report = json.loads((tmp_path / "runs" / arch / "report.json").read_text())
    router = report["router"]
    assert router["layers"] == [0, 1] and all(sum(row) == report["cache"]["tokens"] * 2 for row in router["tokens_per_expert"])
    assert report["student"]["params_total"] < report["teacher"]["params_total"]
