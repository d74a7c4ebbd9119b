"""Layer-wise transfer: the derivation records which teacher layer each student layer came from, the loss
matches them (against a float64 reference), training runs with it and lowers it, and a student without a map
is refused with the setting to change."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from distill.layer_transfer import LayerMapError, layer_loss, layer_map, tap_layers
from distill.trainer import train_student
from students.derive import derive_dense_student
from tests.distill_child import VOCAB, tiny_config, tiny_dataset, tiny_llama


def _teacher(layers: int = 4) -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def test_the_derived_student_carries_its_layer_map_through_save_and_load(tmp_path: Path) -> None:
    teacher = _teacher()
    student = derive_dense_student(teacher, keep_layers="0,2,3")
    assert student.config.teacher_layers == [0, 2, 3]
    student.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert back.config.teacher_layers == [0, 2, 3]
    assert layer_map(back, teacher) == [0, 2, 3]


def test_a_student_without_a_map_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LayerMapError, match="STUDENT=derived"):
        layer_map(tiny_llama(), _teacher())
    student = derive_dense_student(_teacher(), keep_layers="0,3")
    student.config.teacher_layers = [0, 9]
    with pytest.raises(LayerMapError, match="do not fit"):
        layer_map(student, _teacher())


@pytest.mark.parametrize("kind", ["nmse", "mse", "cosine"])
def test_layer_loss_matches_a_float64_reference(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 5, 8, generator=g, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 5, 8, generator=g) * (1 + 10 * i) for i in range(3)]  # layers of different scales
    got = layer_loss(s, t, kind)
    ref = []
    for a, b in zip(s, t):
        a, b = a.detach().double(), b.double()
        if kind == "nmse":
            ref.append(((a - b) ** 2).mean() / (b ** 2).mean())
        elif kind == "mse":
            ref.append(((a - b) ** 2).mean())
        else:
            cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            ref.append((1 - cos).mean())
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    got.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)


def test_the_tap_reads_the_layer_outputs_of_one_forward() -> None:
    model = _teacher(3)
    tap = tap_layers(model, [2, 0])
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    got = tap.taken()
    tap.remove()
    # hidden_states[i + 1] is layer i's output (the last one after the final norm, so compare layers 0 and 1).
    assert torch.allclose(got[1], out.hidden_states[1]) and got[0].shape == (2, 6, 32)
    tap.clear()
    with pytest.raises(RuntimeError, match="did not run"):
        tap.taken()


def test_training_with_layer_transfer_lowers_the_layer_loss(tmp_path: Path) -> None:
    teacher = _teacher()
    student = derive_dense_student(teacher, keep_layers="0,3")
    with torch.no_grad():  # start the layers far from their teacher layers, so there is something to learn
        for name, p in student.model.layers.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    cfg = tiny_config(teacher_mode="online", online_top_k=8, layer_weight=10.0, layer_loss="mse", epochs=4,
                      lr=3e-3, checkpoint_every=100)
    logged: list[float] = []
    summary = train_student(student, tiny_dataset(8, 12), cfg, tmp_path / "ckpt", VOCAB, torch.device("cpu"),
                            log_fn=lambda m, step: logged.append(m["layers"]), teacher=teacher)
    assert len(logged) == summary["steps"] and all(v == v and v >= 0 for v in logged)
    assert logged[-1] < logged[0], logged
    assert summary["final_layers"] == pytest.approx(logged[-1])


def test_nmse_does_not_depend_on_the_scale_of_the_residual_stream() -> None:
    """One weight means the same for a model whose hidden states are 100x larger; raw MSE grows 10,000x."""
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(2, 5, 8, generator=g)]
    t = [torch.randn(2, 5, 8, generator=g)]
    assert layer_loss([x * 100 for x in s], [x * 100 for x in t], "nmse").item() == pytest.approx(
        layer_loss(s, t, "nmse").item(), rel=1e-5)
    assert layer_loss([x * 100 for x in s], [x * 100 for x in t], "mse").item() == pytest.approx(
        1e4 * layer_loss(s, t, "mse").item(), rel=1e-5)
    assert layer_loss([torch.zeros(2, 5, 8)], t, "nmse").item() == pytest.approx(1.0)
