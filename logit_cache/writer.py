"""LogitCacheWriter: the append-only, crash-safe, resumable writer of top-k logit shards.

Kept apart from the reader so the teacher side (writing, resume, stray cleanup) is read on its own; the
byte layout it writes is defined in `logit_cache.format`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from logit_cache.format import (
    _HEADER_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_SUFFIX,
    TMP_SUFFIX,
    CacheMeta,
    CacheMismatchError,
    PackLayout,
    _atomic_write,
    _check_shard,
    _shard_header,
    _to_le_bytes,
    quantize_logprobs,
)


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
