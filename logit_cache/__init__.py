"""The teacher's top-k logit cache: the contract between the teacher that writes it, the trainer that reads it
and the pipeline that merges and checks it. One format, one writer, one reader: `format` (on-disk layout,
codec, errors; the bottom layer), `writer`, `reader`, `merge` (multi-process parts) and `topk` (top-k
selection and fidelity). Imports go downward only: format <- writer, reader, merge; topk stands alone
(its row statistics are a kernel, kernels.topk_tail)."""
from logit_cache.format import (
                                MANIFEST_NAME,
                                CacheCorruptError,
                                CacheIncompleteError,
                                CacheMeta,
                                CacheMismatchError,
                                PackLayout,
                                _decode_range,
                                quantize_logprobs,
                                reconstruct_logprobs,
)
from logit_cache.merge import merge_parts, part_range
from logit_cache.reader import LogitCache
from logit_cache.topk import cache_fidelity_kl, topk_from_hidden, topk_from_logits, topk_select
from logit_cache.writer import LogitCacheWriter

__all__ = ["MANIFEST_NAME", "CacheCorruptError", "CacheIncompleteError", "CacheMeta", "CacheMismatchError",
           "LogitCache", "LogitCacheWriter", "PackLayout", "_decode_range", "cache_fidelity_kl", "merge_parts",
           "part_range", "quantize_logprobs", "reconstruct_logprobs", "topk_from_hidden",
           "topk_from_logits", "topk_select"]
