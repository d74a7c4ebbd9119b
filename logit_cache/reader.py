"""LogitCache: the training-time reader, a torch Dataset over a finalized cache with memory-mapped shards.

Kept apart from the writer so the student side needs only the format and this file; it checks the manifest
and every shard before use and decodes one sequence per item.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import torch

from logit_cache.format import (
    _HEADER_BYTES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMeta,
    PackLayout,
    _check_shard,
    _from_le_bytes,
    reconstruct_logprobs,
)


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
