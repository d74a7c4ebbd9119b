"""Several processes, one pipeline: who does what under `accelerate launch` (or torchrun, which it wraps).

Every process runs `pipelines.run`. The two stages that scale with data (logits, distill and its baseline)
run on every process; all others, and everything MLflow, run on rank 0 alone while the others wait. Rank 0
decides whether a stage is reused, and its decision and the stage's record are handed to the others, so the
processes never disagree about the pipeline's state.

accelerate's `PartialState` sets up the process group (NCCL on GPUs, gloo on CPUs) from the launcher's
environment. The hand-offs between stages go over a second, gloo group with a long timeout: the other ranks
may wait an hour while rank 0 evaluates, and that must not trip the GPU group's watchdog, which stays short
so that a rank that dies inside DDP is noticed in minutes.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

from core.errors import UserError

# How long a rank waits for rank 0 to finish a stage it runs alone (evaluations of a large teacher).
HANDOFF_TIMEOUT = timedelta(hours=int(os.environ.get("DISTILL_HANDOFF_TIMEOUT_H", "12")))

_handoff_group: Any = None


class RankFailedError(UserError, RuntimeError):
    """Another process of the same run failed; its message is in its own output (rank 0 prints the cause)."""
    kind = "processes"


def world_size() -> int:
    """Processes in this run: WORLD_SIZE from the launcher, 1 when started plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that owns MLflow, the reports and every stage that does not scale."""
    return rank() == 0


def setup(device_name: str) -> torch.device:
    """Join the launcher's process group (if there is one) and return this process's device.

    device_name: the config's `device` ("auto", "cpu", "cuda"). On GPUs each rank takes cuda:<LOCAL_RANK>.
    """
    global _handoff_group
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or cpu")
    cpu = device_name == "cpu" or not torch.cuda.is_available()
    if world_size() == 1:
        return torch.device("cpu" if cpu else "cuda")
    if not cpu and world_size() > torch.cuda.device_count():
        raise ValueError(f"{world_size()} processes but {torch.cuda.device_count()} visible GPUs: start at most "
                         "one process per GPU (GPUS=<n>), or device=cpu")
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if _handoff_group is None:
        _handoff_group = torch.distributed.new_group(backend="gloo", timeout=HANDOFF_TIMEOUT)
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)
    return state.device


def share(obj: Any = None) -> Any:
    """Rank 0's `obj`, on every rank (the others pass nothing). A no-op in a single process."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, group=_handoff_group)
    return box[0]


def gather(obj: Any, error: BaseException | None = None) -> list[Any]:
    """Collective: every rank's `obj`, in rank order, on every rank; raises on every rank if any rank passed
    an `error`. The failing rank re-raises its own error (so rank 0 shows the real cause, with its actionable
    message); the others raise RankFailedError. Every hand-off inside a stage goes through here, so a rank
    that failed and one that did not always meet in the same collective."""
    if world_size() == 1:
        if error is not None:
            raise error
        return [obj]
    out: list[Any] = [None] * world_size()
    mine = (None, obj) if error is None else (f"{type(error).__name__}: {error}", None)
    torch.distributed.all_gather_object(out, mine, group=_handoff_group)
    if error is not None:
        raise error
    failed = [(r, e) for r, (e, _) in enumerate(out) if e is not None]
    if failed:
        raise RankFailedError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return [o for _, o in out]


def check_all(error: BaseException | None) -> None:
    """Collective: raise on every rank if any rank failed (see `gather`)."""
    gather(None, error)


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier(group=_handoff_group)


def teardown() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
