"""Sharded on-disk cache of a teacher LM's top-k next-token distribution.

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

import bisect
import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resources.disk import disk_full_guard

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


class CacheMismatchError(ValueError):
    """Existing cache was written with different meta/layout."""


class CacheIncompleteError(RuntimeError):
    """Cache was never finalized (writer died or is still running)."""


class CacheCorruptError(RuntimeError):
    """A shard is missing, has the wrong size/header, or fails its sha256."""


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
        raise ValueError("NaN in topk_logprobs")
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


def topk_from_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (ids [..., k] int64, logprobs [..., k] f32, tail_logmass [...] f32).

    Float32 math regardless of input dtype. The tail is logsumexp over the
    non-top-k logits (not log1p(-sum p)), so it stays accurate when the top-k
    holds nearly all the mass; it is -inf when k == V.
    """
    x = logits.to(torch.float32)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    vals, ids = torch.topk(x, k, dim=-1)
    rest = x.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1) - lse.squeeze(-1)
    return ids, vals - lse, tail


def cache_fidelity_kl(full_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                      tail: torch.Tensor, chunk: int = 256) -> float:
    """Mean over N of KL(teacher_full || reconstructed), in nats.

    full_logits [N, V], ids [N, k], logprobs [N, k], tail [N]. The
    reconstruction puts exp(logprobs) on ids and exp(tail) spread uniformly
    over the other V-k ids, then renormalizes (quantization leaves the total
    a hair off 1; a proper distribution keeps KL >= 0).
    """
    n, v = full_logits.shape
    k = ids.shape[-1]
    total = 0.0
    for s in range(0, n, chunk):
        p = torch.log_softmax(full_logits[s:s + chunk].to(torch.float64), dim=-1)
        t = tail[s:s + chunk].to(torch.float64)
        fill = t - math.log(v - k) if v > k else torch.full_like(t, float("-inf"))
        logq = fill.unsqueeze(-1).expand_as(p).clone()
        logq.scatter_(-1, ids[s:s + chunk].long(), logprobs[s:s + chunk].to(torch.float64))
        logq = torch.log_softmax(logq, dim=-1)
        pe = p.exp()
        total += torch.where(pe > 0, pe * (p - logq), 0.0).sum().item()
    return total / n


# -------------------------------------------------------------- file I/O ----

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    if verify and _sha256_file(path) != entry["sha256"]:
        return "sha256 mismatch"
    return None


# ---------------------------------------------------------------- writer ----

class LogitCacheWriter:
    """Append-only, crash-safe, resumable writer of top-k logit shards."""

    def __init__(self, root: Path, meta: CacheMeta, sequences_per_shard: int = 64, logit_bytes: int = 3):
        if sequences_per_shard < 1:
            raise ValueError("sequences_per_shard must be >= 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.layout = PackLayout.for_vocab(meta.vocab_size, meta.k, logit_bytes)
        self._record = self.layout.record_dtype(meta.seq_len)
        self._pending: list[np.ndarray] = []
        fresh = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "meta": meta.to_json(),
            "layout": dataclasses.asdict(self.layout), "sequences_per_shard": sequences_per_shard,
            "record_bytes": self._record.itemsize, "header_bytes": _HEADER_BYTES,
            "dtypes": {name: self._record.fields[name][0].str for name in self._record.names},
            "shards": [], "complete": False, "total_sequences": None,
        }
        path = self.root / MANIFEST_NAME
        if path.exists():
            self._manifest = json.loads(path.read_text())
            self._check_compatible(fresh)
            self._drop_bad_shards()
        else:
            self._manifest = fresh
        self._delete_strays()
        self._write_manifest()

    def _check_compatible(self, fresh: dict) -> None:
        old = self._manifest
        for key in ("format", "version", "sequences_per_shard", "layout"):
            if old.get(key) != fresh[key]:
                raise CacheMismatchError(f"{self.root}: {key!r} differs: cache has {old.get(key)!r}, "
                                         f"writer wants {fresh[key]!r}")
        for name, want in fresh["meta"].items():
            have = old["meta"].get(name)
            if have != want:
                raise CacheMismatchError(f"{self.root}: meta field {name!r} differs: cache has {have!r}, "
                                         f"writer wants {want!r}")

    def _drop_bad_shards(self) -> None:
        # Resume is by prefix (the generator skips N sequences), so the first
        # bad shard invalidates itself and everything after it.
        shards, sps = self._manifest["shards"], self._manifest["sequences_per_shard"]
        keep = 0
        for i, entry in enumerate(shards):
            full = entry["num_sequences"] == sps or self._manifest["complete"]
            if entry["first_sequence"] != i * sps or not full:
                break
            if _check_shard(self.root, entry, self.layout, self.meta.seq_len, verify=True) is not None:
                break
            keep += 1
        if keep < len(shards):
            for entry in shards[keep:]:
                (self.root / entry["file"]).unlink(missing_ok=True)
            self._manifest["shards"] = shards[:keep]
            self._manifest["complete"] = False
            self._manifest["total_sequences"] = None

    def _delete_strays(self) -> None:
        # A shard renamed into place but killed before the manifest update, or
        # any tmp file, is not trusted: it will be regenerated bit-identically.
        # Only names this module creates are touched; other files in root are left alone.
        listed = {e["file"] for e in self._manifest["shards"]}
        for p in self.root.iterdir():
            base = p.name[:-len(TMP_SUFFIX)] if p.name.endswith(TMP_SUFFIX) else None
            ours = p.name.startswith("shard_") and p.name.endswith(SHARD_SUFFIX)
            if (ours and p.name not in listed) or (base is not None and (base == MANIFEST_NAME or
                                                                          base.startswith("shard_"))):
                p.unlink()

    def _write_manifest(self) -> None:
        text = json.dumps(self._manifest, indent=1, sort_keys=True)
        _atomic_write(self.root / MANIFEST_NAME, text.encode())

    @property
    def num_completed_sequences(self) -> int:
        """Sequences durably in shards listed in the manifest (not the buffered ones)."""
        return sum(e["num_sequences"] for e in self._manifest["shards"])

    @property
    def _num_pending(self) -> int:
        return sum(len(r) for r in self._pending)

    def add(self, input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            tail_logmass: torch.Tensor) -> None:
        """Buffer B sequences; full shards are flushed to disk as they fill.

        input_ids [B, S] int, topk_ids [B, S, k] int, topk_logprobs [B, S, k]
        float, tail_logmass [B, S] float.
        """
        if self._manifest["complete"]:
            raise RuntimeError(f"{self.root}: cache is already complete")
        m, lay, b = self.meta, self.layout, input_ids.shape[0]
        for name, t, shape in (("input_ids", input_ids, (b, m.seq_len)), ("topk_ids", topk_ids, (b, m.seq_len, m.k)),
                               ("topk_logprobs", topk_logprobs, (b, m.seq_len, m.k)),
                               ("tail_logmass", tail_logmass, (b, m.seq_len))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        ids = topk_ids.detach().cpu().to(torch.int64)
        inp = input_ids.detach().cpu().to(torch.int64)
        for name, t in (("topk_ids", ids), ("input_ids", inp)):
            if t.numel() and (t.min() < 0 or t.max() >= m.vocab_size):
                raise ValueError(f"{name} out of range [0, {m.vocab_size})")
        top1, range_code, codes = quantize_logprobs(topk_logprobs.detach().cpu(), lay.code_bits)
        rec = np.zeros(b, dtype=self._record)
        rec["input_ids"] = _to_le_bytes(inp, lay.input_id_bytes)
        rec["words"] = _to_le_bytes(ids | (codes << lay.id_bits), lay.logit_bytes)
        rec["top1"] = top1.numpy()
        rec["range_code"] = range_code.numpy()
        rec["tail"] = tail_logmass.detach().cpu().to(torch.float32).to(torch.float16).numpy()
        self._pending.append(rec)
        sps = self._manifest["sequences_per_shard"]
        if self._num_pending >= sps:
            buf = np.concatenate(self._pending)
            while len(buf) >= sps:
                self._write_shard(buf[:sps])
                buf = buf[sps:]
            self._pending = [buf] if len(buf) else []

    def _write_shard(self, records: np.ndarray, complete: bool = False, total: int | None = None) -> None:
        index = len(self._manifest["shards"])
        name = f"shard_{index:06d}{SHARD_SUFFIX}"
        payload = _shard_header(self.layout, len(records), self.meta.seq_len) + records.tobytes()
        _atomic_write(self.root / name, payload)
        self._manifest["shards"].append({
            "file": name, "first_sequence": self.num_completed_sequences, "num_sequences": len(records),
            "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)})
        # Partial last shard and complete flag land in ONE manifest write, so a
        # partial shard is never listed in an incomplete cache.
        self._manifest["complete"] = complete
        self._manifest["total_sequences"] = total
        self._write_manifest()

    def finalize(self, total_sequences: int) -> dict:
        """Flush the partial last shard, mark the cache complete; returns the manifest."""
        have = self.num_completed_sequences + self._num_pending
        if have != total_sequences:
            raise ValueError(f"finalize({total_sequences}) but {have} sequences were written")
        if self._pending:
            self._write_shard(np.concatenate(self._pending), complete=True, total=total_sequences)
            self._pending = []
        elif not self._manifest["complete"]:
            self._manifest["complete"] = True
            self._manifest["total_sequences"] = total_sequences
            self._write_manifest()
        return json.loads(json.dumps(self._manifest))


# ---------------------------------------------------------------- reader ----

class LogitCache(torch.utils.data.Dataset):
    """Random access by sequence over a finalized cache; shards are memory-mapped."""

    def __init__(self, root: Path, verify: bool = True):
        self.root = Path(root)
        self.manifest: dict = json.loads((self.root / MANIFEST_NAME).read_text())
        if self.manifest.get("format") != FORMAT_NAME or self.manifest.get("version") != FORMAT_VERSION:
            raise CacheCorruptError(f"{self.root}: unknown format {self.manifest.get('format')!r} "
                                    f"v{self.manifest.get('version')!r}")
        if not self.manifest["complete"]:
            raise CacheIncompleteError(f"{self.root}: cache was not finalized "
                                       f"({len(self.manifest['shards'])} shards so far)")
        self.meta = CacheMeta.from_json(self.manifest["meta"])
        self.layout = PackLayout(**self.manifest["layout"])
        self._record = self.layout.record_dtype(self.meta.seq_len)
        shards = self.manifest["shards"]
        for entry in shards:
            why = _check_shard(self.root, entry, self.layout, self.meta.seq_len, verify)
            if why is not None:
                raise CacheCorruptError(f"{self.root}: shard {entry['file']}: {why}")
        self._starts = [e["first_sequence"] for e in shards]
        self._len = sum(e["num_sequences"] for e in shards)
        if self._len != self.manifest["total_sequences"]:
            raise CacheCorruptError(f"{self.root}: shards hold {self._len} sequences, "
                                    f"manifest says {self.manifest['total_sequences']}")
        self._maps: list[np.memmap | None] = [None] * len(shards)

    def __getstate__(self) -> dict:
        # Pickling an np.memmap copies its data; DataLoader workers reopen lazily instead.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._maps)
        return state

    def _map(self, s: int) -> np.memmap:
        if self._maps[s] is None:
            entry = self.manifest["shards"][s]
            self._maps[s] = np.memmap(self.root / entry["file"], dtype=self._record, mode="r",
                                      offset=_HEADER_BYTES, shape=(entry["num_sequences"],))
        return self._maps[s]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """-> input_ids [S] int64, topk_ids [S,k] int64, topk_logprobs [S,k] f32, tail_logmass [S] f32."""
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sequence {i} out of range [0, {self._len})")
        s = bisect.bisect_right(self._starts, i) - 1
        rec = self._map(s)[i - self._starts[s]]
        lay = self.layout
        words = _from_le_bytes(rec["words"])
        codes = words >> lay.id_bits
        top1 = torch.from_numpy(np.array(rec["top1"], dtype=np.float16))
        range_code = torch.from_numpy(np.array(rec["range_code"]))
        return {
            "input_ids": _from_le_bytes(rec["input_ids"]),
            "topk_ids": words & ((1 << lay.id_bits) - 1),
            "topk_logprobs": reconstruct_logprobs(top1, range_code, codes, lay.code_bits),
            "tail_logmass": torch.from_numpy(np.array(rec["tail"], dtype=np.float32)),
        }

    def nbytes(self) -> int:
        """Bytes of all shard files (headers included; manifest excluded)."""
        return sum(e["bytes"] for e in self.manifest["shards"])

    def num_tokens(self) -> int:
        return self._len * self.meta.seq_len


# ----------------------------------------------------------------- parts ----

def part_range(num_sequences: int, sequences_per_shard: int, part: int, parts: int) -> tuple[int, int]:
    """Sequences [a, b) that part `part` of `parts` writes (data-parallel generation, one part per process).

    Parts are cut at shard boundaries, so every part but the last holds only full shards and the parts'
    shards are, byte for byte, the shards one writer over all sequences would write.
    """
    shards = -(-num_sequences // sequences_per_shard)
    lo, hi = shards * part // parts, shards * (part + 1) // parts
    return min(lo * sequences_per_shard, num_sequences), min(hi * sequences_per_shard, num_sequences)


def merge_parts(part_roots: list[Path], root: Path) -> dict:
    """Join complete caches of consecutive sequence ranges (cut by `part_range`) into one cache at `root`.

    The result, manifest included, is identical to what one writer over all sequences produces. Shard files
    are hard-linked (copied where the file system cannot link), the manifest is written last, and the parts
    are removed only after it: a kill at any point leaves the parts or a complete cache. Returns the manifest.
    """
    manifests = [json.loads((Path(r) / MANIFEST_NAME).read_text()) for r in part_roots]
    first = manifests[0]
    sps = first["sequences_per_shard"]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    total = 0
    for i, (part_root, m) in enumerate(zip(part_roots, manifests)):
        if not m["complete"]:
            raise CacheIncompleteError(f"{part_root}: cache part was not finalized")
        for key in ("format", "version", "meta", "layout", "sequences_per_shard", "record_bytes", "dtypes"):
            if m[key] != first[key]:
                raise CacheMismatchError(f"{part_root}: {key!r} differs from {part_roots[0]}")
        layout = PackLayout(**m["layout"])
        for entry in m["shards"]:
            if entry["num_sequences"] != sps and i < len(part_roots) - 1:
                raise CacheMismatchError(f"{part_root}: a part before the last holds a partial shard")
            why = _check_shard(Path(part_root), entry, layout, m["meta"]["seq_len"], verify=False)
            if why is not None:
                raise CacheCorruptError(f"{part_root}: shard {entry['file']}: {why}")
            name = f"shard_{len(shards):06d}{SHARD_SUFFIX}"
            dst = root / name
            dst.unlink(missing_ok=True)
            try:
                os.link(Path(part_root) / entry["file"], dst)
            except OSError:
                shutil.copyfile(Path(part_root) / entry["file"], dst)
            shards.append({**entry, "file": name, "first_sequence": total})
            total += entry["num_sequences"]
    manifest = {**first, "shards": shards, "complete": True, "total_sequences": total}
    _atomic_write(root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    for r in part_roots:
        shutil.rmtree(r, ignore_errors=True)
    return manifest
