"""Checks on a model folder's safetensors files before any stage loads them: complete, readable, finite.

A truncated download, a copy interrupted half way or a training run that diverged leave files transformers
loads with a traceback (or not at all: NaN weights load fine and poison every later number). These checks read
the files' headers and a bounded sample of their bytes, so they cost seconds even for a large teacher:
- every file's header parses and its tensors' byte ranges end exactly at the end of the file;
- the shards an index (`*.safetensors.index.json`) names all exist;
- floating-point weights hold no NaN or infinity: a value is non-finite exactly when its exponent bits are all
  ones, so the raw bytes are tested as integers without decoding (bfloat16 included, which numpy lacks). Small
  tensors are read whole; from large ones, evenly spread blocks, within a budget of bytes per model.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from teachers.load import ModelLoadError

# safetensors dtype -> (bytes per element, unsigned view, exponent mask): non-finite <=> (bits & mask) == mask.
_FLOATS = {
    "F64": (8, np.uint64, 0x7FF0000000000000),
    "F32": (4, np.uint32, 0x7F800000),
    "F16": (2, np.uint16, 0x7C00),
    "BF16": (2, np.uint16, 0x7F80),
}
_BLOCK = 4096  # elements per sampled block of a large tensor
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset where the data starts) of one safetensors file;
    raises ModelLoadError naming the file when it is not a complete safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ModelLoadError(f"{path} is not a complete safetensors file ({size} bytes, header length "
                                 f"{n}): the download or copy was cut short; fetch or copy it again")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise ModelLoadError(f"{path}: its safetensors header is not valid JSON; the file is damaged, "
                                 "fetch or copy it again") from None
    header.pop("__metadata__", None)
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + n + end != size:
        raise ModelLoadError(f"{path} holds {size} bytes but its header describes {8 + n + end}: the file is "
                             "truncated or damaged; fetch or copy it again")
    return header, 8 + n


def _non_finite(path: Path, start: int, info: dict, budget: int) -> bool:
    """Whether a sample of this tensor (all of it when it has at most `budget` elements) holds a non-finite
    value. `start` is the file offset of the data section."""
    width, view, mask = _FLOATS[info["dtype"]]
    lo, hi = (int(x) for x in info["data_offsets"])
    count = (hi - lo) // width
    if count == 0:
        return False
    data = np.memmap(path, dtype=view, mode="r", offset=start + lo, shape=(count,))
    if count <= budget:
        return bool(((data & view(mask)) == view(mask)).any())
    blocks = max(1, budget // _BLOCK)
    for b in np.linspace(0, count - _BLOCK, blocks).astype(np.int64):
        chunk = data[b:b + _BLOCK]
        if ((chunk & view(mask)) == view(mask)).any():
            return True
    return False


def check_weight_files(folder: Path, scan_bytes: int = 256 << 20) -> None:
    """Refuse a model folder whose safetensors files are incomplete or hold NaN/inf weights (ModelLoadError,
    one sentence naming the file, the tensor and the fix). Reads headers and at most about `scan_bytes` of data."""
    files = sorted(folder.glob("*.safetensors"))
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            raise ModelLoadError(f"{index} is not a valid safetensors index (no weight_map)") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelLoadError(f"{folder}: the index names shards that are not there ({', '.join(missing[:3])}); "
                                 "the download is incomplete, fetch the missing files")
    headers = [(f, *read_header(f)) for f in files]
    floats = [(f, start, name, info) for f, header, start in headers for name, info in sorted(header.items())
              if info.get("dtype") in _FLOATS]
    total = sum((int(i["data_offsets"][1]) - int(i["data_offsets"][0])) // _FLOATS[i["dtype"]][0]
                for _, _, _, i in floats)
    for f, start, name, info in floats:
        count = (int(info["data_offsets"][1]) - int(info["data_offsets"][0])) // _FLOATS[info["dtype"]][0]
        # Each tensor's share of the budget, in proportion to its size, but never less than one block.
        budget = count if total * 2 <= scan_bytes else max(_BLOCK, count * scan_bytes // (2 * total))
        if _non_finite(f, start, info, budget):
            raise ModelLoadError(f"{f.name} in {folder}: tensor {name} holds NaN or infinite values, so every "
                                 "number computed from this model would be meaningless; use the checkpoint from "
                                 "before training diverged, or fix the weights")
