"""The on-disk format of the top-k logit cache, in one place so that writer, reader and merge agree byte
for byte: constants, errors, CacheMeta, PackLayout, the log-prob quantizer and byte codec, atomic file
writes and the shard header/check. It imports nothing else of the package (the bottom layer).

Sharded on-disk cache of a teacher LM's top-k next-token distribution.

Written once while the teacher runs over fixed-length token sequences, then
memory-mapped at training time so the student never needs the teacher.

On disk (``root/``):
  manifest.json        meta, layout, shard list (file, first_sequence,
                       num_sequences, sha256, bytes), complete flag.
  shard_000000.tkl ... 64-byte header + ``num_sequences`` fixed-size records.

One record = one sequence, a packed numpy structured dtype (no padding):
  input_ids  [S, B_in] uint8  little-endian token ids, B_in = 2 (V <= 2^16),
                              3 (V <= 2^24) else 4
  words      [S, k, W] uint8  per kept logit a little-endian W-byte word:
                              id in the low ``id_bits``, quantized log-prob
                              code in the next ``code_bits``
  top1       [S] float16      log-prob of the most likely kept token
  range_code [S] uint8        log-scale code of the spread logp_1 - logp_k
  tail       [S] float16      log of the probability mass outside the top-k

With W = 3 (default): V <= 65536 -> 16-bit ids + 8-bit codes; V = 151936
-> 18-bit ids + 6-bit codes. Both are 3 bytes/logit; 3k + 7 bytes/token at
V <= 65536 (199 at k=64), 3k + 8 above. ``logit_bytes=4`` buys 14-bit codes
for wide vocabularies at 4 bytes/logit.

Quantization is linear in log space over [logp_k, logp_1] per token: measured
against exp-companding (finer steps near the top) it gave the lowest KL, because
most top-k entries crowd the bottom of the range.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.disk import disk_full_guard
from core.errors import UserError
from core.hashing import file_sha256

FORMAT_NAME = "topk-logit-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tkl"
TMP_SUFFIX = ".tmp"
_MAGIC = b"TKLCACHE"
_HEADER = struct.Struct("<8s8I")
_HEADER_BYTES = 64
# Spread r is stored as 2**((c - 128) / 16), c in 1..255 (c = 0 means r = 0):
# covers 0.004..245 nats with <= 4.4% overestimate, i.e. 4.4% coarser steps.
_RANGE_STEPS_PER_OCTAVE = 16
_RANGE_BIAS = 128
_FP16_MAX = 65504.0


class CacheMismatchError(UserError, ValueError):
    """Existing cache was written with different meta/layout."""
    kind = "cache"


class NonFiniteLogitsError(UserError, ValueError):
    """The teacher produced NaN log-probabilities: nothing worth caching, and no setting here fixes it."""

    kind = "teacher"


class CacheIncompleteError(RuntimeError):
    """Cache was never finalized (writer died or is still running)."""


class CacheCorruptError(UserError, RuntimeError):
    """A shard is missing, has the wrong size/header, or fails its sha256."""
    kind = "cache"


@dataclass
class CacheMeta:
    """Identity of a cache; stored in manifest.json and compared on resume."""

    k: int
    vocab_size: int
    seq_len: int
    teacher_hash: str
    tokenizer_hash: str
    data_hash: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # Round-trip through json so tuples/ints compare equal to what a
        # resumed run reads back from disk.
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CacheMeta":
        return cls(**d)


@dataclass(frozen=True)
class PackLayout:
    """Byte layout of one token; a pure function of (vocab_size, k, logit_bytes)."""

    k: int
    id_bits: int
    code_bits: int
    logit_bytes: int
    input_id_bytes: int

    @classmethod
    def for_vocab(cls, vocab_size: int, k: int, logit_bytes: int = 3) -> "PackLayout":
        if not 1 <= k <= vocab_size:
            raise ValueError(f"need 1 <= k <= vocab_size, got k={k}, V={vocab_size}")
        if logit_bytes not in (3, 4):
            raise ValueError(f"logit_bytes must be 3 or 4, got {logit_bytes}")
        id_bits = max(1, (vocab_size - 1).bit_length())
        # >16 code bits is below float16 resolution of top1 anyway.
        code_bits = min(8 * logit_bytes - id_bits, 16)
        if code_bits < 4:
            raise ValueError(f"V={vocab_size} leaves {code_bits} code bits; use logit_bytes=4")
        in_bytes = 2 if vocab_size <= 1 << 16 else 3 if vocab_size <= 1 << 24 else 4
        return cls(k, id_bits, code_bits, logit_bytes, in_bytes)

    def record_dtype(self, seq_len: int) -> np.dtype:
        return np.dtype([
            ("input_ids", np.uint8, (seq_len, self.input_id_bytes)),
            ("words", np.uint8, (seq_len, self.k, self.logit_bytes)),
            ("top1", "<f2", (seq_len,)),
            ("range_code", np.uint8, (seq_len,)),
            ("tail", "<f2", (seq_len,)),
        ])


# ----------------------------------------------------------------- codec ----

def _to_le_bytes(x: torch.Tensor, nbytes: int) -> np.ndarray:
    """int64 [...] -> uint8 [..., nbytes] little-endian."""
    x = x.to(torch.int64)
    planes = [((x >> (8 * j)) & 0xFF) for j in range(nbytes)]
    return torch.stack(planes, dim=-1).to(torch.uint8).numpy()


def _from_le_bytes(b: np.ndarray) -> torch.Tensor:
    """uint8 [..., nbytes<=4] -> int64 [...]."""
    # Pad to 4 bytes and reinterpret: ~10x faster than shifting byte planes.
    padded = np.zeros(b.shape[:-1] + (4,), dtype=np.uint8)
    padded[..., :b.shape[-1]] = b
    return torch.from_numpy(padded.view("<u4")[..., 0].astype(np.int64))


def _encode_range(spread: torch.Tensor) -> torch.Tensor:
    """float [...] >= 0 (may be inf) -> uint8 code whose decoded range >= spread."""
    s = spread.to(torch.float64)
    c = torch.ceil(torch.log2(s.clamp_min(1e-30)) * _RANGE_STEPS_PER_OCTAVE + _RANGE_BIAS)
    c = torch.where(s > 0, c.clamp(1, 255), torch.zeros_like(c))
    return c.to(torch.uint8)


def _decode_range(code: torch.Tensor) -> torch.Tensor:
    c = code.to(torch.float32)
    r = torch.exp2((c - _RANGE_BIAS) / _RANGE_STEPS_PER_OCTAVE)
    return torch.where(code > 0, r, torch.zeros_like(r))


def quantize_logprobs(logprobs: torch.Tensor, code_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k log-probs [..., k] -> (top1 float16 [...], range_code uint8 [...], codes int64 [..., k]).

    Entries need not be sorted. Deterministic (elementwise float math only).
    """
    lp = logprobs.to(torch.float32)
    if torch.isnan(lp).any():
        raise NonFiniteLogitsError(
            "the teacher's log-probabilities hold NaN: its weights hold NaN/inf, or its activations overflow in "
            "this dtype (float16 overflows where bfloat16 does not); check the teacher checkpoint")
    top1 = lp.amax(-1).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    hi = top1.to(torch.float32)
    # Quantize against the *stored* top1/range so decode is exactly the inverse grid.
    range_code = _encode_range((hi - lp.amin(-1)).clamp_min(0))
    r = _decode_range(range_code).unsqueeze(-1)
    levels = (1 << code_bits) - 1
    t = torch.where(r > 0, (hi.unsqueeze(-1) - lp) / torch.where(r > 0, r, 1.0), 0.0)
    codes = torch.round(t * levels).clamp(0, levels).to(torch.int64)
    return top1, range_code, codes


def reconstruct_logprobs(top1: torch.Tensor, range_code: torch.Tensor, codes: torch.Tensor,
                         code_bits: int) -> torch.Tensor:
    """Dequantize: top1 [...], range_code [...], codes [..., k] -> float32 log-probs [..., k].

    Absolute error vs. the original is <= |fp16 rounding of top1| + range/(2*(2^code_bits-1)).
    """
    levels = (1 << code_bits) - 1
    r = _decode_range(range_code).unsqueeze(-1)
    return top1.to(torch.float32).unsqueeze(-1) - codes.to(torch.float32) * (r / levels)


# -------------------------------------------------------------- file I/O ----

def _atomic_write(path: Path, data: bytes) -> None:
    """Readers see either the old file or the complete new one, never a prefix."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with disk_full_guard(path, "the logit cache", cleanup=tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_header(layout: PackLayout, n: int, seq_len: int) -> bytes:
    fields = (_MAGIC, FORMAT_VERSION, n, seq_len, layout.k, layout.id_bits, layout.code_bits,
              layout.logit_bytes, layout.input_id_bytes)
    return _HEADER.pack(*fields).ljust(_HEADER_BYTES, b"\0")


def _check_shard(root: Path, entry: dict, layout: PackLayout, seq_len: int, verify: bool) -> str | None:
    """Return why a manifest shard entry is unusable, or None if it is fine."""
    path = root / entry["file"]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} != {entry['bytes']}"
    with open(path, "rb") as f:
        if f.read(_HEADER_BYTES) != _shard_header(layout, entry["num_sequences"], seq_len):
            return "bad header"
    if verify and file_sha256(path) != entry["sha256"]:
        return "sha256 mismatch"
    return None
