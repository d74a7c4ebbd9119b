"""Resumable training checkpoints in safetensors + JSON (never pickle), written atomically.

A checkpoint is a folder `step_<n>/` with the model, the optimizer state, the scheduler state and the
trainer's position. It is assembled in a temporary folder and renamed into place, so a kill at any moment
leaves either the previous checkpoints or a complete new one, never a half-written one that looks valid.

States are full (unsharded) and keyed by parameter name, through torch.distributed.checkpoint's state-dict
API: the same checkpoint is written by one process, by DDP or by FSDP2 (which gathers the shards; rank 0
writes), and any of them can resume it, on any number of processes.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.disk import disk_full_guard

_DONE = "checkpoint.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state {param name: {key: value}} -> tensors {"<param name>.<key>": tensor} + JSON meta."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param, per_param in state["state"].items():
        for key, value in per_param.items():
            name = f"{param}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, key = name.rsplit(".", 1)  # parameter names hold dots, the state's keys (exp_avg, step) none
        state.setdefault(param, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses two names for one storage (tied embeddings); each name gets its own copy.
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _is_writer() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write `root/step_<step>` atomically and prune all but the newest `keep` checkpoints.

    Collective under torch.distributed (every rank calls it; rank 0 writes and returns the path, which the
    others return too without waiting for the write)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer,
                                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = root / f"step_{step:07d}"
    if not _is_writer():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_full_guard(final, f"checkpoint step {step}", cleanup=tmp):
        tmp.mkdir()
        save_file(_untied(model_state), str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optim_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "trainer": trainer_state}
        (tmp / _DONE).write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():  # data on disk before the rename makes the checkpoint visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (stray temporary folders from a killed save are ignored)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / _DONE).is_file())


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from `path`; return the trainer state saved with them.
    Every rank reads the files (FSDP2 keeps its own shard of each)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    meta = json.loads((path / _DONE).read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    set_state_dict(model, optimizer, model_state_dict=load_file(str(path / "model.safetensors")),
                   optim_state_dict=_unflatten_optimizer(tensors, meta["optimizer"]),
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(meta["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return {"step": meta["step"], **meta["trainer"]}
