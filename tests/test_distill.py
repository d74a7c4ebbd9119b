"""The top-k KD loss against a float64 reference, and training that resumes to the same losses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.checkpoint import list_checkpoints
from distill.topk_kd_loss import distillation_loss, topk_forward_kl
from distill.trainer import NonFiniteLossError, train_student
from pipelines.config import DistillConfig
from teachers.topk_logit_cache import topk_from_logits


def reference_bucket_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, k: int, temp: float) -> torch.Tensor:
    """Float64 KL between teacher and student coarsened to (teacher's top-k ids, everything else)."""
    p = torch.softmax(t_logits.double(), -1)
    q = torch.softmax(s_logits.double() / temp, -1)
    ids = p.topk(k, -1).indices
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    pk = p.gather(-1, ids)
    # Teacher buckets at temperature T: top-k log-probs and the tail treated as one pseudo-token.
    b = torch.cat([pk.log(), (p * outside).sum(-1, keepdim=True).log()], -1)
    pb = torch.softmax(b / temp, -1)
    qb = torch.cat([q.gather(-1, ids), (q * outside).sum(-1, keepdim=True)], -1)
    return (torch.where(pb > 0, pb * (pb.log() - qb.log()), 0.0)).sum(-1) * temp**2


@pytest.mark.parametrize("n,v,k,temp", [(7, 50, 5, 1.0), (41, 401, 17, 2.0), (3, 1000, 1, 1.0),
                                        (5, 64, 63, 1.0), (4, 32, 32, 0.5)])
def test_topk_forward_kl_matches_float64_reference(n: int, v: int, k: int, temp: float) -> None:
    g = torch.Generator().manual_seed(n * v + k)
    t = torch.randn(n, v, generator=g) * 3
    s = torch.randn(n, v, generator=g) * 2
    ids, lp, tail = topk_from_logits(t, k)
    got = topk_forward_kl(s, ids, lp, tail, temp)
    ref = reference_bucket_kl(t, s, k, temp)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-5), (got, ref)
    assert (got >= -1e-6).all()


def test_kd_is_zero_when_student_equals_teacher_and_labels_can_be_ignored() -> None:
    t = torch.randn(6, 100)
    ids, lp, tail = topk_from_logits(t, 10)
    labels = torch.tensor([1, 2, -100, 4, -100, 6])
    out = distillation_loss(t.clone(), labels, ids, lp, tail, kd_weight=1.0, ce_weight=0.0)
    assert out["kd"].abs() < 1e-5
    masked = distillation_loss(t.clone(), torch.full((6,), -100), ids, lp, tail, 1.0, 1.0)
    assert masked["loss"] == 0


def _dataset(n: int, seq: int, vocab: int, k: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        ids, lp, tail = topk_from_logits(torch.randn(seq, vocab, generator=g) * 2, k)
        items.append({"input_ids": torch.randint(0, vocab, (seq,), generator=g), "topk_ids": ids,
                      "topk_logprobs": lp, "tail_logmass": tail})
    return items


def _student() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


class Interrupt(Exception):
    pass


def test_resumed_training_reaches_the_same_losses(tmp_path: Path) -> None:
    data = _dataset(12, 16, 96, 8)
    cfg = DistillConfig(batch_size=4, micro_batch_size=2, epochs=3, warmup_steps=2, checkpoint_every=2, lr=1e-3)
    full: dict[int, float] = {}
    train_student(_student(), data, cfg, tmp_path / "a", 96, torch.device("cpu"),
                  lambda m, step: full.__setitem__(step, m["loss"]))

    def die_at_5(m: dict, step: int) -> None:
        resumed[step] = m["loss"]
        if step == 5:
            raise Interrupt  # after the step-4 checkpoint, before the step-6 one
    resumed: dict[int, float] = {}
    with pytest.raises(Interrupt):
        train_student(_student(), data, cfg, tmp_path / "b", 96, torch.device("cpu"), die_at_5)
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "step_0000004"
    torch.manual_seed(123)  # the resumed process starts from a different RNG state and a fresh model
    result = train_student(_student(), data, cfg, tmp_path / "b", 96, torch.device("cpu"),
                           lambda m, step: resumed.__setitem__(step, m["loss"]))
    assert result["steps"] == 9 and sorted(full) == list(range(1, 10))
    for step in range(5, 10):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step


def test_nan_loss_stops_with_a_diagnostic(tmp_path: Path) -> None:
    data = _dataset(4, 8, 96, 4)
    data[2]["topk_logprobs"][:] = float("nan")
    cfg = DistillConfig(batch_size=2, micro_batch_size=2, epochs=1, checkpoint_every=1, seed=0)
    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        train_student(_student(), data, cfg, tmp_path, 96, torch.device("cpu"))
