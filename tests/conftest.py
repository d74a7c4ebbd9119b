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


def _patch_triton_language_once_per_launch() -> None:
    """Triton's interpreter re-patches triton.language (inspect.getmembers over its modules, about 3 ms) at every
    call of a @triton.jit helper inside a kernel, although the launch patched those very modules already (14,789
    such calls in tests/test_hf_moe.py's Qwen2-MoE decode; that test took 44-47 s with this and 49-53 s without,
    two runs each, Triton 3.9). Inside a launch, a helper whose globals hold only language modules the launch
    patched skips that work; any other call, and any Triton without these internals, runs the interpreter's own
    code."""
    try:
        from triton.runtime import interpreter as ti

        grid_call, patch, scope_cls, lang = ti.GridExecutor.__call__, ti._patch_lang, ti._LangPatchScope, ti.tl
    except (ImportError, AttributeError):
        return
    launches: list[set[int]] = []  # per active launch: ids of the language modules it patched

    def launch(self, *args, **kwargs):
        launches.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            launches.pop()

    def patch_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is lang or v is lang.core}
        if launches and langs and langs <= launches[-1]:
            return scope_cls()
        scope = patch(fn)
        if launches:
            launches[-1] |= langs
        return scope

    ti.GridExecutor.__call__, ti._patch_lang = launch, patch_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_language_once_per_launch()


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
