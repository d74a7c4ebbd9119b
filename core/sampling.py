"""Sampling continuations from a causal LM, batched, on a KV cache: the decode path of on-policy distillation
(the student writes, distill/on_policy.py) and of sequence-level KD (the teacher writes, teachers/teacher_text.py).

Not `generate`: that merges the model's own generation_config (top-k, repetition penalties, EOS handling) into
what it draws, so the tokens would not come from the model's distribution, and it draws from the global RNG.
Here every token is drawn from softmax(logits / temperature) over the first `vocab_size` ids with the caller's
`torch.Generator`, so a run that resumes draws the same tokens. Sampling does not stop at EOS: callers decide
what an EOS means (on-policy masks what follows it; teacher text reads on, like packed documents).

The whole batch decodes together, one token per forward, on the model's KV cache. With `static=True` the cache
is a StaticCache of the final length and the one-token step is compiled (transformers' own compiled call of the
model, CUDA graphs where torch uses them): the fast decode path on GPU. On CPU the cache is the model's default
and the step eager.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V] from softmax(logits / temperature) (argmax at temperature 0) -> [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _base(model: torch.nn.Module) -> torch.nn.Module:
    # A peft wrapper's base model carries the adapters inside its layers; its own forward is the one to call.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def sample_continuations(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, vocab_size: int, *,
                         temperature: float = 1.0, generator: torch.Generator | None = None,
                         static: bool = False, compiled: bool = False) -> torch.Tensor:
    """prompts [B, P] (P >= 1) followed by `new_tokens` tokens drawn from `model` -> [B, P + new_tokens].

    Only ids below `vocab_size` are drawn (an embedding padded past the tokenizer has rows no text uses). The
    model is put in eval mode for the sampling and given back in the mode it had. `static`: StaticCache and a
    `compiled` decode step (the GPU path); otherwise the model's default cache. `compiled` needs `static`
    (a dynamic cache changes shape every step).
    """
    if prompts.ndim != 2 or prompts.shape[1] < 1:
        raise ValueError(f"prompts must be [batch, length >= 1], got {tuple(prompts.shape)}")
    if new_tokens < 1:
        return prompts
    if compiled and not static:
        raise ValueError("a compiled decode step needs the static cache (static=True)")
    lm = _base(model)
    was_training = lm.training
    lm.eval()
    try:
        cache = None
        step = lm.__call__
        if static:
            from transformers import StaticCache

            cache = StaticCache(config=lm.config, max_cache_len=prompts.shape[1] + new_tokens)
        if compiled:
            from transformers.generation.configuration_utils import CompileConfig

            step = lm.get_compiled_call(CompileConfig())
        # Prefill eagerly: its shape differs from every decode step's, and compiling it would buy one call.
        out = lm(input_ids=prompts, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tokens = [draw(out.logits[:, -1, :vocab_size], temperature, generator)]
        for i in range(new_tokens - 1):
            kwargs = dict(input_ids=tokens[-1][:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            try:
                out = step(**kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - compiling a model's step can fail in many ways
                if step is lm.__call__ or i > 0:
                    raise
                # A model whose step does not compile (custom kernels, graph breaks the backend refuses) still
                # samples, eagerly on the same static cache: the step writes its own position, so redoing it
                # after a failed first attempt is safe.
                log.warning("sampling: the compiled decode step failed (%s: %s); decoding eagerly",
                            type(e).__name__, str(e)[:200])
                step = lm.__call__
                out = step(**kwargs)
            tokens.append(draw(out.logits[:, -1, :vocab_size], temperature, generator))
    finally:
        lm.train(was_training)
    return torch.cat([prompts, torch.stack(tokens, dim=1).to(prompts.dtype)], dim=1)
