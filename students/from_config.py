"""A randomly initialised dense student from a transformers config.json: the "no teacher knowledge" start.

Useful as a control (how much does starting from the teacher's weights buy?) and for architectures a user
designs. The config must describe a dense causal LM whose vocabulary covers the teacher's tokenizer; it is
read as data, so a config that asks for custom code (`auto_map`) is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from students.vocab import VocabMismatchError
from teachers.load import ModelLoadError, is_moe


def random_student(config_file: Path, tokenizer_size: int, seed: int = 0) -> PreTrainedModel:
    """The causal LM `config_file` describes, with transformers' own initialisation under `seed`, in eval mode.

    tokenizer_size: tokens in the teacher's tokenizer; the config's vocab_size must be at least that (extra
    rows are padding that is never a target).
    """
    cfg = student_config(config_file, tokenizer_size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def student_config(config_file: Path, tokenizer_size: int) -> PretrainedConfig:
    """The dense config a student config.json describes, checked (no model built: cheap enough to run before
    any stage). Raises ModelLoadError / VocabMismatchError with the fix."""
    path = Path(config_file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"student config '{config_file}' does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"student config '{config_file}' is not valid JSON: {e}") from e
    if data.get("auto_map"):
        raise ModelLoadError(f"student config '{config_file}' asks for custom code (auto_map); use a transformers "
                             "architecture")
    model_type = data.pop("model_type", None)
    if not model_type:
        raise ModelLoadError(f"student config '{config_file}' has no model_type (e.g. \"llama\", \"qwen3\")")
    try:
        cfg = AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"student config '{config_file}': {e}") from e
    if is_moe(cfg):
        raise ModelLoadError(f"student config '{config_file}' describes a Mixture-of-Experts model; the student "
                             "must be dense")
    if cfg.vocab_size < tokenizer_size:
        raise VocabMismatchError(f"student config '{config_file}' has vocab_size={cfg.vocab_size}, fewer than the "
                                 f"teacher's {tokenizer_size} tokens: set vocab_size >= {tokenizer_size}")
    return cfg
