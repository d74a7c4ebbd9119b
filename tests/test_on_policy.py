"""On-policy distillation: the step schedule, the sampler against a full-forward reference, the loss rows, the
loss against a float64 hand computation, exact resume with sampling, and the whole pipeline with it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.sampling import sample_continuations
from distill.batch_loss import online_targets, student_parts
from distill.divergences import divergence
from distill.on_policy import OnPolicy, is_on_policy_step, loss_rows, split_lengths
from distill.trainer import train_student
from kernels import kd_loss
from tests.distill_child import VOCAB, tiny_config, tiny_dataset, tiny_llama
from tests.mlflow_store import fresh_store


@pytest.fixture(autouse=True)
def _plain_row_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)  # as in test_distill.py


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])
def test_the_share_of_on_policy_steps_is_exact_and_spread_evenly(rate: float) -> None:
    steps = [is_on_policy_step(s, rate) for s in range(300)]
    assert sum(steps) == round(300 * rate)
    for n in range(1, 301):  # every prefix holds its share, to within one step
        assert abs(sum(steps[:n]) - n * rate) <= 1


def test_split_lengths_defaults_and_refusals() -> None:
    assert split_lengths(17, 0, 0) == (8, 9)
    assert split_lengths(17, 4, 6) == (4, 6)
    with pytest.raises(ValueError, match="on_policy_prompt=17"):
        split_lengths(17, 17, 0)
    with pytest.raises(ValueError, match="at most the 17 tokens"):
        split_lengths(17, 10, 8)


def test_loss_rows_are_the_sampled_positions_up_to_the_first_eos() -> None:
    # two sequences of 6 tokens, prompt 3: sampled tokens at 3, 4, 5, predicted at positions 2, 3, 4.
    seqs = torch.tensor([[1, 2, 3, 7, 9, 8],    # the sampled EOS (9) is learnt, the 8 after it is not
                         [1, 2, 9, 9, 0, 9]])   # EOS in the prompt does not count; the first sampled one ends it
    rows = loss_rows(seqs, 3, (9,))
    assert rows.tolist() == [2, 3, 5 + 2]  # row = b * (L - 1) + position
    assert loss_rows(seqs, 3, ()).tolist() == [2, 3, 4, 7, 8, 9]


@pytest.mark.parametrize("static", [False, True])
def test_sampler_decodes_what_a_full_forward_predicts(static: bool) -> None:
    """Greedy decoding on the KV cache equals argmax of a fresh full forward at every step; a seeded generator
    draws the same tokens twice; ids at or past vocab_size are never drawn."""
    model = tiny_llama(layers=2).eval()
    prompts = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    got = sample_continuations(model, prompts, 7, VOCAB, temperature=0, static=static)
    ref = prompts
    with torch.no_grad():
        for _ in range(7):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ref)
    a, b = (sample_continuations(model, prompts, 20, 40, generator=torch.Generator().manual_seed(3), static=static)
            for _ in range(2))
    assert torch.equal(a, b) and a[:, 5:].max() < 40


def test_sampler_gives_the_model_back_in_training_mode() -> None:
    model = tiny_llama().train()
    sample_continuations(model, torch.zeros(1, 2, dtype=torch.long), 2, VOCAB)
    assert model.training


def test_sampled_tokens_follow_the_models_distribution() -> None:
    """Frequencies of a one-token sample over many rows match softmax(logits / T) (chi-square-like bound)."""
    model = tiny_llama().eval()
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        p = torch.softmax(model(prompt).logits[0, -1].double() / 0.7, -1)
    rows = 4000
    out = sample_continuations(model, prompt.expand(rows, -1), 1, VOCAB, temperature=0.7,
                               generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, -1], minlength=VOCAB).double() / rows
    assert (freq - p).abs().max() < 4 * (p * (1 - p) / rows).sqrt().max() + 1e-3


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "forward_kl"])
def test_on_policy_loss_matches_a_float64_reference(name: str) -> None:
    """The loss of an on-policy micro-batch (full-vocabulary targets) equals, in float64, the mean over the
    sampled positions only of T^2 D(teacher_T, student_T)."""
    student, teacher = tiny_llama(), tiny_llama(hidden=48, seed=5, layers=1).eval()
    with torch.no_grad():  # peaked distributions: a random tiny model's are near uniform, divergences ~1e-3
        for m in (student, teacher):
            m.lm_head.weight.mul_(30)
    eos = (3,)
    pol = OnPolicy(rate=1.0, prompt=6, new=10, temperature=1.0, seed=0, eos=eos)
    ids = torch.stack([d["input_ids"] for d in tiny_dataset(n=4)])
    seqs, rows = pol.sample(student, ids, VOCAB, step=0, process=0, micro_batch=0, static=False)
    assert seqs.shape == (4, 16) and torch.equal(seqs[:, :6], ids[:, :6])
    assert len(rows) <= 4 * 10
    cfg = tiny_config(on_policy_rate=1.0, on_policy_loss=name, temperature=2.0, beta=0.3, fused_loss="off")
    spec = cfg.on_policy_spec()
    assert spec.ce_weight == 0
    from distill.batch_loss import batch_loss

    targets = online_targets(teacher, seqs, VOCAB, 0, False, rows)
    out = batch_loss(student_parts(student, "off"), seqs, targets, spec, VOCAB)
    with torch.no_grad():
        zs = student.double()(seqs).logits[:, :-1].reshape(-1, VOCAB)[rows]
        zt = teacher.double()(seqs).logits[:, :-1].reshape(-1, VOCAB)[rows]
    t = 2.0
    ref = t * t * divergence(name, torch.log_softmax(zt / t, -1), torch.log_softmax(zs / t, -1), beta=0.3)
    assert out["kd"].item() == pytest.approx(ref.mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(ref.mean().item(), rel=1e-5)  # no CE term


def _train(cfg, ckpt: Path, stop_at: int = 0) -> list[dict]:
    logs: list[dict] = []

    def log(m: dict, step: int) -> None:
        logs.append({"step": step, **m})
        if step == stop_at:
            raise KeyboardInterrupt  # a kill between steps, after the step's work and before its checkpoint

    teacher = tiny_llama(hidden=48, seed=5, layers=1)
    try:
        train_student(tiny_llama(), tiny_dataset(), cfg, ckpt, VOCAB, torch.device("cpu"), log, teacher=teacher)
    except KeyboardInterrupt:
        pass
    return logs


def test_mixed_training_resumes_exactly_with_its_samples(tmp_path: Path) -> None:
    """Half the steps on-policy, the other half on the cache; killed after step 5 (last checkpoint: step 4), the
    rerun samples the same tokens and logs the same numbers as a run never stopped."""
    cfg = tiny_config(on_policy_rate=0.5, on_policy_prompt=6, on_policy_tokens=8, max_steps=8)
    full = _train(cfg, tmp_path / "full")
    assert [r["on_policy"] for r in full] == [0.0, 1.0] * 4
    on = [r for r in full if r["on_policy"] == 1.0]
    assert all("ce" not in r and 0 < r["sampled_tokens"] <= 8 for r in on)
    assert all("ce" in r for r in full if r["on_policy"] == 0.0)
    first = _train(cfg, tmp_path / "killed", stop_at=5)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    rest = _train(cfg, tmp_path / "killed")
    assert [r["step"] for r in rest] == [5, 6, 7, 8]
    for r in first[:4] + rest:
        ref = full[r["step"] - 1]
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6), r
        if "sampled_tokens" in r:
            assert r["sampled_tokens"] == ref["sampled_tokens"]


def test_on_policy_needs_the_teacher_and_sequence_room(tmp_path: Path) -> None:
    from core.errors import ConfigError

    with pytest.raises(ValueError, match="need the teacher model"):
        train_student(tiny_llama(), tiny_dataset(), tiny_config(on_policy_rate=0.5), tmp_path / "a", VOCAB,
                      torch.device("cpu"))
    with pytest.raises(ConfigError, match="on_policy_prompt=16"):
        train_student(tiny_llama(), tiny_dataset(), tiny_config(on_policy_rate=0.5, on_policy_prompt=16),
                      tmp_path / "b", VOCAB, torch.device("cpu"), teacher=tiny_llama(seed=5))
    for bad, match in [(dict(on_policy_rate=1.5), "on_policy_rate must be in"),
                       (dict(on_policy_rate=0.5, on_policy_loss="kl"), "unknown divergence"),
                       (dict(on_policy_rate=0.5, kd_weight=0.0), "needs distill.kd_weight > 0"),
                       (dict(sample_temperature=-1.0), "sample_temperature")]:
        with pytest.raises(ConfigError, match=match):
            tiny_config(**bad).validate(processes=1)


def test_teacher_text_is_the_same_whole_or_in_parts_and_is_not_sampled_twice(tmp_path: Path) -> None:
    """Sequence-level KD: prompts are corpus prefixes (cycling past the corpus), a range equals the slice of
    the whole set, and a saved range is read back instead of sampled again."""
    from teachers.teacher_text import teacher_prompts, write_teacher_text

    teacher = tiny_llama(seed=5).eval()
    corpus = torch.stack([d["input_ids"] for d in tiny_dataset(n=3)])
    assert torch.equal(teacher_prompts(corpus, 5, 4), corpus[[0, 1, 2, 0, 1], :4])
    whole = write_teacher_text(teacher, corpus, 5, 4, VOCAB, 1.0, 2, 0)
    assert whole.shape == (5, 16) and torch.equal(whole[:, :4], corpus[[0, 1, 2, 0, 1], :4])
    part = write_teacher_text(teacher, corpus, 5, 4, VOCAB, 1.0, 2, 0, 1, 4, save_to=tmp_path / "p.safetensors")
    assert torch.equal(part, whole[1:4])
    with torch.no_grad():
        teacher.lm_head.weight.zero_()  # a model that would now write other text
    assert torch.equal(write_teacher_text(teacher, corpus, 5, 4, VOCAB, 1.0, 2, 0, 1, 4,
                                          save_to=tmp_path / "p.safetensors"), part)


@pytest.mark.slow
def test_the_pipeline_distils_on_policy_with_teacher_text(tiny_moe_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`make distill SET="distill.on_policy_rate=0.5 logits.teacher_text_sequences=6"` on the ci preset: the
    cache holds the corpus and the teacher's six sequences, half the distill steps are on-policy (logged to
    MLflow), and the baseline stays cross-entropy only on the same data."""
    import json

    import mlflow

    from pipelines.config import load_config
    from pipelines.run import run_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    sets = ("distill.on_policy_rate=0.5 distill.on_policy_prompt=16 distill.on_policy_tokens=24 "
            "logits.teacher_text_sequences=6 logits.teacher_text_prompt=8 baseline.enabled=true "
            "latency.enabled=false eval.limit=2")
    cfg = load_config("ci", sets, teacher=str(tiny_moe_dir), run_name="onpol")
    assert run_pipeline(cfg, tmp_path / "runs") == 0
    run = tmp_path / "runs" / "onpol"
    logits = json.loads((run / "logits" / "stage.json").read_text())["outputs"]
    assert logits["teacher_text_sequences"] == 6 and logits["corpus_sequences"] == 1024 // 64
    distill = json.loads((run / "distill" / "stage.json").read_text())
    client = mlflow.MlflowClient()
    history = client.get_metric_history(distill["mlflow_run_id"], "train/on_policy")
    flags = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(flags) == (16 + 6) // 2 and flags == [0.0, 1.0] * (len(flags) // 2) + [0.0] * (len(flags) % 2)
    assert client.get_metric_history(distill["mlflow_run_id"], "train/sampled_tokens")
    base = json.loads((run / "baseline" / "stage.json").read_text())
    assert not client.get_metric_history(base["mlflow_run_id"], "baseline_train/on_policy")
    report = json.loads((run / "report.json").read_text())
    assert report["student"]["params_total"] < report["teacher"]["params_total"]
    recipe = [n for n in report["notes"] if n.startswith("Recipe:")]
    assert recipe and "on-policy on 50% of the steps (reverse_kl" in recipe[0]
    assert "6 of the 22 training sequences written by the teacher" in recipe[0]


def test_the_sampling_twin_follows_the_student_without_its_hooks() -> None:
    """GPU sampling runs on a bf16 twin: refresh() copies the student's current weights into the same tensors,
    and the training's layer taps do not fire on the twin."""
    from distill.layer_transfer import tap_layers
    from distill.on_policy import SamplingTwin

    student = tiny_llama()
    tap = tap_layers(student)
    twin = SamplingTwin(student)
    ptr = twin.model.lm_head.weight.data_ptr()
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    twin.refresh()
    assert twin.model.lm_head.weight.dtype == torch.bfloat16 and twin.model.lm_head.weight.data_ptr() == ptr
    assert torch.equal(twin.model.lm_head.weight, student.lm_head.weight.to(torch.bfloat16))
    tap.clear()
    sample_continuations(twin.model, torch.zeros(1, 3, dtype=torch.long), 2, VOCAB)
    assert all(o is None for o in tap.outputs)
    tap.remove()


def test_a_decode_step_that_does_not_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A model whose compiled step fails (a teacher with custom kernels, say) still samples, the same tokens."""
    import logging

    model = tiny_llama().eval()
    prompts = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    want = sample_continuations(model, prompts, 5, VOCAB, temperature=0, static=True)

    def broken(*_a, **_k):
        def step(**_kw):
            raise RuntimeError("backend compiler failed")
        return step
    monkeypatch.setattr(type(model), "get_compiled_call", broken)
    with caplog.at_level(logging.WARNING, logger="core.sampling"):
        got = sample_continuations(model, prompts, 5, VOCAB, temperature=0, static=True, compiled=True)
    assert torch.equal(got, want) and "decoding eagerly" in caplog.text


def test_the_summary_keeps_the_last_ce_when_the_run_ends_on_policy(tmp_path: Path) -> None:
    """Steps 2 and 4 of 4 are on-policy and log no CE: the summary's final_ce is step 3's, also when the summary
    comes from a resumed run that has no step left to take (its checkpoint carries each number's latest value)."""
    cfg = tiny_config(on_policy_rate=0.5, on_policy_prompt=6, on_policy_tokens=8, max_steps=4, checkpoint_every=4)
    logs: list[dict] = []
    teacher = tiny_llama(hidden=48, seed=5, layers=1)
    done = train_student(tiny_llama(), tiny_dataset(), cfg, tmp_path, VOCAB, torch.device("cpu"),
                         lambda m, step: logs.append({"step": step, **m}), teacher=teacher)
    assert [r["on_policy"] for r in logs] == [0.0, 1.0, 0.0, 1.0] and "ce" not in logs[-1]
    assert done["final_ce"] == logs[2]["ce"] and done["final_kd"] == logs[3]["kd"]
    again = train_student(tiny_llama(), tiny_dataset(), cfg, tmp_path, VOCAB, torch.device("cpu"), teacher=teacher)
    assert again["final_ce"] == logs[2]["ce"] and again["steps"] == 4
