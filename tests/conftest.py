"""Shared test fixtures. The hub is off for every test: nothing may reach for the network at run time."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU our Triton kernels run through Triton's interpreter. It is chosen when a kernel is decorated,
# so it must be set before any `kernels` module is imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's real tokenizer (read once from the fetched gguf) saved as an ordinary tokenizer folder."""
    from transformers import AutoTokenizer

    from resources.fetch import fetch
    from teachers.smollm2_moe import find_gguf

    gguf = find_gguf(fetch("smollm2"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """The tiny random Mixtral teacher folder the pipeline tests share (tests/tiny_teacher.py)."""
    from tests.tiny_teacher import write_tiny_mixtral

    return write_tiny_mixtral(tmp_path_factory.mktemp("tiny_moe"), smollm2_tokenizer_dir)
