"""Upcycling, student derivation, safe loading and vocabulary checks, on tiny random models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from students.derive import derive_dense_student, parse_keep_layers
from students.vocab import VocabMismatchError, shared_vocab_size
from teachers.load import ModelLoadError, count_parameters, load_teacher, resolve_model_path
from teachers.upcycle import upcycle_llama


def tiny_llama(layers: int = 4, vocab: int = 300, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("experts,k", [(4, 2), (8, 2), (3, 1), (5, 5)])
def test_upcycled_moe_computes_the_dense_function(experts: int, k: int) -> None:
    dense = tiny_llama()
    moe = upcycle_llama(dense, num_experts=experts, top_k=k, router_init_std=0.5)
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ref, out = dense(ids).logits, moe(ids).logits
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4), (ref - out).abs().max()
    total, active = count_parameters(moe)
    assert total > active > count_parameters(dense)[0] - 1 or experts == k


def test_derived_student_with_all_layers_reproduces_the_dense_model() -> None:
    dense = tiny_llama()
    student = derive_dense_student(upcycle_llama(dense, 4, 2), keep_layers="all")
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, student(ids).logits, atol=1e-5)


def test_derived_student_drops_layers_and_keeps_the_last() -> None:
    moe = upcycle_llama(tiny_llama(layers=5), 4, 2)
    student = derive_dense_student(moe, keep_layers="every_2")
    assert student.config.num_hidden_layers == 3  # layers 0, 2, 4
    assert torch.equal(student.model.layers[2].self_attn.q_proj.weight, moe.model.layers[4].self_attn.q_proj.weight)
    assert count_parameters(student)[0] < count_parameters(moe)[1]


def test_parse_keep_layers() -> None:
    assert parse_keep_layers("all", 3) == [0, 1, 2]
    assert parse_keep_layers("every_2", 6) == [0, 2, 4, 5]
    assert parse_keep_layers("3,0,3", 4) == [0, 3]
    for bad in ("every_0", "every_x", "7", "a,b", "", "top_x", "top_0%", "top_120%", "top_%"):
        with pytest.raises(ValueError):
            parse_keep_layers(bad, 4, torch.zeros(4))


def test_top_share_of_layers_fits_any_depth() -> None:
    """top_<p>% keeps round(p% of L) layers (at least one), the most influential ones and always the last."""
    influence = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.4, 0.0, 0.6, 0.7])
    assert parse_keep_layers("top_50%", 10, influence) == [0, 2, 4, 8, 9]
    assert parse_keep_layers("top_53%", 30, torch.rand(30)).__len__() == 16  # the default top_16 of 30
    assert parse_keep_layers("top_53%", 4, torch.rand(4)).__len__() == 2
    assert parse_keep_layers("top_1%", 4, influence[:4]) == [3]
    assert parse_keep_layers("top_100%", 4, influence[:4]) == [0, 1, 2, 3]


def _save(model: torch.nn.Module, tok_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok_dir(smollm2_tokenizer_dir: Path) -> Path:
    return smollm2_tokenizer_dir


def test_dense_teacher_is_refused_unless_allowed(tmp_path: Path, tok_dir: Path) -> None:
    path = _save(tiny_llama(vocab=49152), tok_dir, tmp_path / "dense")
    with pytest.raises(ModelLoadError, match="dense model.*allow_dense"):
        load_teacher(str(path), torch.device("cpu"), torch.float32)
    model, _ = load_teacher(str(path), torch.device("cpu"), torch.float32, allow_dense=True)
    assert model.config.model_type == "llama"


def test_missing_path_and_pickle_checkpoint_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"), "teacher")
    folder = tmp_path / "pickled"
    tiny_llama().save_pretrained(folder, safe_serialization=False)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    if not list(folder.glob("*.bin")):
        torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle"):
        resolve_model_path(str(folder), "teacher")


def test_remote_code_is_refused_without_the_option(tmp_path: Path, tok_dir: Path) -> None:
    import json

    path = _save(upcycle_llama(tiny_llama(vocab=49152), 4, 2), tok_dir, tmp_path / "remote")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_teacher(str(path), torch.device("cpu"), torch.float32)


def test_vocab_check_names_the_first_differing_tokens(tok_dir: Path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    teacher = AutoTokenizer.from_pretrained(tok_dir)
    assert shared_vocab_size(teacher, teacher, 49152, 49216) == len(teacher)  # padding rows are fine
    vocab = dict(teacher.get_vocab())
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=None)))
    with pytest.raises(VocabMismatchError, match=f"id 100: teacher '{a}'"):
        shared_vocab_size(teacher, other, 49152, 49152)


def test_an_moe_given_as_student_is_refused(tmp_path: Path, tok_dir: Path) -> None:
    from pipelines.stages.student import check_student_source

    teacher = _save(upcycle_llama(tiny_llama(vocab=49152), 4, 2), tok_dir, tmp_path / "teacher")
    moe_student = _save(upcycle_llama(tiny_llama(vocab=49152, seed=1), 4, 2), tok_dir, tmp_path / "student")
    with pytest.raises(ModelLoadError, match="is a Mixture-of-Experts model.*STUDENT=derived"):
        check_student_source(str(moe_student), str(teacher), trust_remote_code=False)
    dense = _save(tiny_llama(vocab=49152, seed=2), tok_dir, tmp_path / "dense")
    assert check_student_source(str(dense), str(teacher), trust_remote_code=False) == str(dense.resolve())


def test_a_student_from_a_config_json_is_randomly_initialised_and_checked(tmp_path: Path, tok_dir: Path) -> None:
    import json

    from pipelines.config import load_config as load_pipeline_config
    from pipelines.context import RunContext
    from pipelines.stages.student import student_stage
    from students.from_config import random_student

    cfg = tiny_llama(vocab=49152).config.to_dict()
    (tmp_path / "student.json").write_text(json.dumps(cfg))
    a, b = random_student(tmp_path / "student.json", 49152, seed=3), random_student(tmp_path / "student.json", 49152, 3)
    assert type(a).__name__ == "LlamaForCausalLM" and a.config.num_hidden_layers == 4
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # the seed decides
    with pytest.raises(VocabMismatchError, match="set vocab_size >= 49153"):
        random_student(tmp_path / "student.json", 49153)
    (tmp_path / "moe.json").write_text(json.dumps(upcycle_llama(tiny_llama(vocab=49152), 4, 2).config.to_dict()))
    with pytest.raises(ModelLoadError, match="must be dense"):
        random_student(tmp_path / "moe.json", 49152)
    (tmp_path / "custom.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(ModelLoadError, match="custom code"):
        random_student(tmp_path / "custom.json", 49152)
    with pytest.raises(ModelLoadError, match="does not exist"):
        random_student(tmp_path / "nope.json", 49152)
    # Through the pipeline's student stage: saved with the teacher's tokenizer, marked as a random start.
    teacher = _save(upcycle_llama(tiny_llama(vocab=49152), 4, 2), tok_dir, tmp_path / "teacher")
    pcfg = load_pipeline_config("ci", teacher=str(teacher), student=str(tmp_path / "student.json"))
    ctx = RunContext(cfg=pcfg, run_dir=tmp_path / "run", device=torch.device("cpu"),
                     records={"teacher_tune": {"outputs": {"path": str(teacher)}}})
    rec = student_stage(ctx, tmp_path / "run" / "student")
    assert rec["outputs"]["summary"]["init"] == "random"
    assert AutoTokenizer.from_pretrained(rec["outputs"]["path"]).get_vocab() == \
        AutoTokenizer.from_pretrained(tok_dir).get_vocab()


def test_a_layer_spec_the_teacher_cannot_take_is_a_config_error_before_calibration(tmp_path: Path,
                                                                                  tok_dir: Path) -> None:
    from safetensors.torch import save_file

    from core.errors import UserError
    from pipelines.config import ConfigError
    from pipelines.config import load_config as load_pipeline_config
    from pipelines.context import RunContext
    from pipelines.stages.student import student_stage

    teacher = _save(upcycle_llama(tiny_llama(vocab=49152), 4, 2), tok_dir, tmp_path / "teacher")
    save_file({"input_ids": torch.randint(0, 300, (4, 16), dtype=torch.int32)}, str(tmp_path / "seqs.safetensors"))
    records = {"teacher_tune": {"outputs": {"path": str(teacher)}},
               "data": {"outputs": {"sequences": str(tmp_path / "seqs.safetensors")}}}
    for spec, message in (("student_options.keep_layers=top_16", "does not fit this 4-layer teacher"),
                          ("student_options.method=select student_options.ffn_width=999", "ffn_width=999")):
        cfg = load_pipeline_config("ci", spec, teacher=str(teacher), student="derived")
        ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", device=torch.device("cpu"), records=records)
        with pytest.raises(ConfigError, match=message) as info:
            student_stage(ctx, tmp_path / "run" / "student")
        assert isinstance(info.value, UserError)  # printed as a one-line error, not a traceback
