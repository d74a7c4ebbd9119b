"""students/dense_relative.py: a dense relative found by trying every dense family, checked by a forward."""
from __future__ import annotations

import pytest
import torch

from core.errors import UnsupportedModelError
from tests.arch_probe import shrink


def _probe(arch: str, **over) -> object:
    cfg = shrink(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("arch, twin, over", [
    ("qwen2_moe", "qwen2", {}),
    ("qwen3_moe", "qwen3", {}),
    ("mixtral", "llama", {"sliding_window": None}),
    ("mixtral", "mistral", {"sliding_window": 4096}),
])
def test_the_known_twins_pass_the_same_checks_as_any_relative(arch: str, twin: str, over: dict) -> None:
    """The table of known relatives is what the search accepts, not a separate truth: each entry passes the
    forward check; with a sliding window (shrunk below the probe's length) Llama no longer does."""
    from students.dense_relative import _probe_config, _same_function
    from students.dense_twin import twin_model_type

    cfg = _probe(arch, **over)
    assert twin_model_type(cfg) == twin
    assert _same_function(_probe_config(cfg), twin)
    if twin == "mistral":
        assert not _same_function(_probe_config(cfg), "llama")


@pytest.mark.parametrize("arch", ["qwen3_5_moe_text", "solar_open", "aria_text"])
def test_a_family_without_a_dense_switch_is_derived_into_its_relative_exactly(arch: str, tmp_path) -> None:
    """No table entry and no dense switch: the search finds a relative, a student derived from a teacher whose
    experts are all equal reproduces that teacher, and the student saved is a plain transformers model folder."""
    from transformers import AutoModelForCausalLM

    from students.dense_relative import find_dense_relative
    from students.dense_twin import check_derivable
    from students.derive import derive_dense_student
    from students.routing_stats import routing_stats
    from tests.arch_probe import _exactness

    cfg = shrink(arch)
    relative = find_dense_relative(cfg)
    assert relative is not None and "found by trying" in check_derivable(cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    assert _exactness(model, ids) < 1e-4
    student = derive_dense_student(model, keep_layers="all", stats=routing_stats(model, ids.split(1)))
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.model_type == relative.model_type
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("arch", ["flex_olmo", "granitemoe", "hunyuan_v1_moe", "solar_open"])
def test_families_once_refused_are_derived_exactly(arch: str) -> None:
    """The families tests/test_derive_families.py refused before the search, on its configs: the relative it
    names, and a derived student that reproduces a teacher of equal experts."""
    from transformers import AutoModelForCausalLM

    from students.dense_twin import twin_model_type
    from tests.arch_probe import _exactness
    from tests.test_derive_families import RELATIVES, _config

    cfg = _config(arch, {})
    assert twin_model_type(cfg) == RELATIVES[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert _exactness(model, torch.randint(0, cfg.vocab_size, (2, 9))) < 1e-5


def test_names_and_shapes_alone_would_accept_a_family_that_computes_otherwise() -> None:
    """Gemma has Llama's parameter names and shapes but scales its embeddings by sqrt(hidden): the name check
    passes, the forward refuses it."""
    from students.dense_relative import _probe_config, _same_function, relative_config
    from students.dense_switch import dense_width, meta_model, non_ffn_shapes

    cfg = shrink("solar_open")
    reference = non_ffn_shapes(meta_model(cfg), cfg)
    gemma = relative_config(cfg, "gemma", list(range(cfg.num_hidden_layers)), cfg.hidden_size)
    assert dense_width(gemma, reference) is not None
    assert not _same_function(_probe_config(cfg), "gemma")


@pytest.mark.parametrize("arch", ["olmoe", "zaya"])
def test_a_family_with_no_equivalent_dense_family_is_still_refused_with_the_fix(arch: str) -> None:
    from students.dense_twin import check_derivable

    with pytest.raises(UnsupportedModelError, match="no dense family of transformers computes .* pass STUDENT="):
        check_derivable(shrink(arch))


def test_a_dense_switch_that_changes_the_attention_is_not_taken() -> None:
    """Cohere2-MoE's attention applies rotary in full-attention layers only where the layer's FFN is dense, so its
    own switch (mlp_layer_types all "dense") keeps every name and shape and changes the function: a student
    derived through it was 3.4e-3 off a teacher of equal experts, where it must be exact. The switch search runs
    the FFN-free probe too, rejects it, and the relative search finds Cohere2, which is exact. (Where all layers
    slide, as in tests/test_derive_families.py's config, the switch is equivalent and still taken.)"""
    from transformers import AutoModelForCausalLM

    from students.dense_switch import find_dense_switch
    from students.dense_twin import check_derivable
    from tests.arch_probe import _exactness

    cfg = shrink("cohere2_moe")
    assert "full_attention" in cfg.layer_types
    assert find_dense_switch(cfg) is None
    assert check_derivable(cfg).startswith("cohere2 (a dense relative of cohere2_moe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert _exactness(model, torch.randint(0, cfg.vocab_size, (2, 9))) < 1e-5
