"""The trainer: exact resume after SIGKILL, fused = unfused, online = cache, LoRA, hidden alignment, FLOPs."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import list_checkpoints
from distill.throughput import flops_per_token
from distill.trainer import NonFiniteLossError, train_student
from kernels import kd_loss
from logit_cache import topk_from_logits
from pipelines.config import REPO_ROOT, DistillConfig
from tests.distill_child import VOCAB, tiny_config, tiny_dataset, tiny_llama


@pytest.fixture(autouse=True)
def _plain_row_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused loss's row kernels are tested through the interpreter in test_fused_linear_kd.py; here their
    PyTorch twins keep the training tests fast (the subprocess runs do the same: no TRITON_INTERPRET)."""
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)


def _run(cfg: DistillConfig, ckpt: Path, data=None, student=None, teacher=None) -> tuple[dict, list[dict]]:
    logs: list[dict] = []
    result = train_student(student or tiny_llama(), data or tiny_dataset(), cfg, ckpt, VOCAB, torch.device("cpu"),
                           lambda m, step: logs.append({"step": step, **m}), teacher=teacher)
    return result, logs


def _child(ckpt: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.Popen([sys.executable, "-m", "tests.distill_child", str(ckpt), str(log), *extra], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_killed_training_resumes_to_the_same_losses(tmp_path: Path, lora_rank: int) -> None:
    """SIGKILL a training process mid-run; a rerun continues from the last checkpoint and logs the same
    losses, step for step, as a run that was never interrupted."""
    _, full = _run(tiny_config(lora_rank=lora_rank), tmp_path / "full")
    assert [r["step"] for r in full] == list(range(1, 10))
    ckpt, log = tmp_path / "killed", tmp_path / "losses.jsonl"
    proc = _child(ckpt, log, "--lora-rank", str(lora_rank), "--sleep", "0.4")
    deadline = time.monotonic() + 120
    while not any(p.name >= "step_0000004" for p in list_checkpoints(ckpt)):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in log.read_text().splitlines()]
    assert 4 <= len(before) < 9, before  # killed mid-run, after a checkpoint
    resumed_from = int(list_checkpoints(ckpt)[-1].name.split("_")[1])
    rerun = _child(ckpt, log, "--lora-rank", str(lora_rank))
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()[-2000:]
    after = [json.loads(line) for line in log.read_text().splitlines()][len(before):]
    assert [r["step"] for r in after] == list(range(resumed_from + 1, 10))
    for r in before + after:
        assert r["loss"] == pytest.approx(full[r["step"] - 1]["loss"], rel=1e-5, abs=1e-6), r


def test_time_limit_stops_after_a_checkpoint_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIME_LIMIT: with too little time left for two more steps and a save, training saves a checkpoint and
    stops; the rerun continues from exactly there to the losses of an uninterrupted run."""
    from core import deadline

    _, full = _run(tiny_config(), tmp_path / "full")
    monkeypatch.setenv(deadline.ENV, str(time.time() + 20))  # under the 30 s a checkpoint save is allowed
    with pytest.raises(deadline.TimeLimitReached, match="step 1 of 9"):
        _run(tiny_config(), tmp_path / "limited")
    assert [p.name for p in list_checkpoints(tmp_path / "limited")] == ["step_0000001"]
    monkeypatch.delenv(deadline.ENV)
    _, rest = _run(tiny_config(), tmp_path / "limited")
    assert [r["step"] for r in rest] == list(range(2, 10))
    for r in rest:
        assert r["loss"] == pytest.approx(full[r["step"] - 1]["loss"], rel=1e-5, abs=1e-6), r


def test_fused_and_unfused_loss_train_alike(tmp_path: Path) -> None:
    _, fused = _run(tiny_config(fused_loss="on", max_steps=4, ce_weight=0.3), tmp_path / "a")
    _, plain = _run(tiny_config(fused_loss="off", max_steps=4, ce_weight=0.3), tmp_path / "b")
    for f, p in zip(fused, plain, strict=True):
        assert f["loss"] == pytest.approx(p["loss"], rel=1e-4) and f["kd"] == pytest.approx(p["kd"], rel=1e-4)
    assert {"loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s", "memory_gib"} <= set(fused[0])


def test_online_teacher_matches_its_cache(tmp_path: Path) -> None:
    """Online mode takes the teacher's top-k on the fly: the same losses as training on a cache of it."""
    teacher = tiny_llama(hidden=48, seed=5, layers=1).eval()
    data = tiny_dataset()
    k = 8
    with torch.no_grad():
        for item in data:
            logits = teacher(input_ids=item["input_ids"][None]).logits[0]
            item["topk_ids"], item["topk_logprobs"], item["tail_logmass"] = topk_from_logits(logits, k)
    _, cached = _run(tiny_config(max_steps=3), tmp_path / "c", data=data)
    _, online = _run(tiny_config(max_steps=3, teacher_mode="online", online_top_k=k), tmp_path / "o", data=data,
                     teacher=teacher)
    for c, o in zip(cached, online, strict=True):
        assert c["loss"] == pytest.approx(o["loss"], rel=1e-4)
    # The whole vocabulary as the top-k (no tail) is the full-logit loss.
    _, topv = _run(tiny_config(max_steps=2, teacher_mode="online", online_top_k=VOCAB), tmp_path / "v", teacher=teacher)
    _, full = _run(tiny_config(max_steps=2, teacher_mode="online", online_top_k=0), tmp_path / "f", teacher=teacher)
    for a, b in zip(topv, full, strict=True):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4)


def test_hidden_alignment_through_a_projection(tmp_path: Path) -> None:
    teacher = tiny_llama(hidden=48, seed=5, layers=1)
    cfg = tiny_config(max_steps=6, teacher_mode="online", hidden_weight=1.0, lr=3e-3)
    _, logs = _run(cfg, tmp_path, teacher=teacher)
    assert all(math.isfinite(r["hidden"]) for r in logs) and logs[-1]["hidden"] < logs[0]["hidden"]
    saved = load_file(str(list_checkpoints(tmp_path)[-1] / "model.safetensors"))
    assert saved["projection.weight"].shape == (48, 32)


def test_lora_student_is_merged_back_into_a_dense_model(tmp_path: Path) -> None:
    student = tiny_llama()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # One batch of the only 4 sequences each step, so the losses are comparable from step to step.
    result, logs = _run(tiny_config(lora_rank=4, max_steps=4, lr=1e-2, epochs=4), tmp_path, student=student,
                        data=tiny_dataset(4))
    assert not [n for n, _ in student.named_modules() if "lora" in n]
    after = student.state_dict()
    assert set(after) == set(before)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # not adapted
    assert result["steps"] == 4 and logs[-1]["loss"] < logs[0]["loss"]


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path: Path) -> None:
    _, plain = _run(tiny_config(max_steps=3), tmp_path / "a")
    _, ckpt = _run(tiny_config(max_steps=3, gradient_checkpointing=True), tmp_path / "b")
    for a, b in zip(plain, ckpt, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    m = tiny_llama()
    h, layers, inter, seq = 32, 2, 64, 16
    kv = 2 * (h // 4)  # 2 kv heads of dim 8
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter
    n = layers * per_layer + VOCAB * h  # + output layer (untied), no input embeddings
    assert flops_per_token(m, seq) == 6 * n + 12 * layers * h * seq
    for p in m.model.parameters():
        p.requires_grad_(False)
    assert flops_per_token(m, seq) == 4 * n + 2 * VOCAB * h + 12 * layers * h * seq


def test_nan_loss_stops_with_a_diagnostic(tmp_path: Path) -> None:
    data = tiny_dataset(4, 8, 4)
    data[2]["topk_logprobs"][:] = float("nan")
    cfg = DistillConfig(batch_size=2, micro_batch_size=2, epochs=1, checkpoint_every=1, seed=0)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train_student(tiny_llama(), data, cfg, tmp_path, VOCAB, torch.device("cpu"))


def test_nan_at_the_first_step_blames_the_model_not_the_learning_rate(tmp_path: Path) -> None:
    data = tiny_dataset(4, 8, 4)
    for d in data:
        d["topk_logprobs"][:] = float("nan")
    cfg = DistillConfig(batch_size=2, micro_batch_size=2, epochs=1, checkpoint_every=1, seed=0)
    with pytest.raises(NonFiniteLossError, match="before any update") as e:
        train_student(tiny_llama(), data, cfg, tmp_path, VOCAB, torch.device("cpu"))
    assert ".lr" not in str(e.value)
