"""Bad conditions get a clear error that names the fix, and lose nothing already written: a full disk while
writing the cache or a checkpoint, a batch too large for memory, an unreachable MLflow server, a wrong path."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint
from core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from core.disk import DiskFullError
from distill.trainer import BatchTooLargeError, train_student
from kernels import kd_loss
from logit_cache import MANIFEST_NAME, CacheIncompleteError, LogitCache
from pipelines.config import DistillConfig, load_config
from pipelines.run import run_pipeline
from tests.distill_child import VOCAB, tiny_dataset, tiny_llama
from tests.mlflow_store import fresh_store
from tests.test_logit_cache import (
    RESUME_GEOMETRY,
    RESUME_SPS,
    RESUME_TOTAL,
    assert_matches_reference,
    make_meta,
    reference_cache,
    write_sequences,
)

__all__ = ["reference_cache"]  # the module-scoped fixture, shared with the cache tests


def _enospc(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_the_cache_keeps_earlier_shards_and_resumes(
        tmp_path: Path, reference_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the disk fills up while the third shard is being written
        if "shard_000002" in os.readlink(f"/proc/self/fd/{fd}"):
            _enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=r"disk full while writing the logit cache .* MiB free\). Everything "
                                            r"written before is intact"):
        write_sequences(root, make_meta(**RESUME_GEOMETRY), RESUME_TOTAL, RESUME_SPS, batch=1)
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST_NAME, "shard_000000.tkl", "shard_000001.tkl"]
    with pytest.raises(CacheIncompleteError):  # nothing half-written is accepted
        LogitCache(root)
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the same call resumes after shard 1
    write_sequences(root, make_meta(**RESUME_GEOMETRY), RESUME_TOTAL, RESUME_SPS, batch=3)
    assert_matches_reference(root, reference_cache)


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.randint(0, VOCAB, (1, 5))).logits.sum().backward()
    opt.step()
    first = save_checkpoint(tmp_path, 1, model, opt, sched, {"tokens": 5})
    def save_file(*_args: object, **_kwargs: object) -> None:  # what safetensors raises on a full disk
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(checkpoint, "save_file", save_file)  # the optimizer state no longer fits
    with pytest.raises(DiskFullError, match="checkpoint step 2"):
        save_checkpoint(tmp_path, 2, model, opt, sched, {"tokens": 10})
    assert list_checkpoints(tmp_path) == [first] and sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    monkeypatch.undo()
    assert load_checkpoint(first, model, opt, sched) == {"step": 1, "tokens": 5}


def test_a_batch_too_large_for_memory_names_the_setting_to_change(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)
    import distill.trainer as trainer

    real = trainer.batch_loss
    calls = {"n": 0}

    def batch_loss(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] > 2:  # the allocator gives up on the third micro-batch (step 2)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 68719476736 bytes.")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "batch_loss", batch_loss)
    cfg = DistillConfig(batch_size=4, micro_batch_size=2, epochs=1, checkpoint_every=1, seed=0)
    with pytest.raises(BatchTooLargeError) as info:
        train_student(tiny_llama(), tiny_dataset(8, 8, 4), cfg, tmp_path, VOCAB, torch.device("cpu"))
    msg = str(info.value)
    assert 'SET="distill.micro_batch_size=1"' in msg and "distill.batch_size=4" in msg
    assert "distill.gradient_checkpointing=true" in msg and "step_0000001" in msg
    # Other runtime errors are not disguised as memory problems.
    monkeypatch.setattr(trainer, "batch_loss", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        train_student(tiny_llama(), tiny_dataset(8, 8, 4), cfg, tmp_path / "b", VOCAB, torch.device("cpu"))


def test_an_unreachable_mlflow_server_fails_before_any_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    cfg = load_config("ci", run_name="unreachable")
    t0 = time.monotonic()
    assert run_pipeline(cfg, tmp_path) == 2
    assert time.monotonic() - t0 < 60
    err = capsys.readouterr().err
    assert "cannot use the MLflow tracking store at http://127.0.0.1:9" in err and "Start the server" in err
    assert not (tmp_path / "unreachable").exists()  # no stage started, nothing written


def test_a_wrong_teacher_path_is_a_clear_error_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    cfg = load_config("ci", teacher=str(tmp_path / "no-such-model"), run_name="wrong-path")
    assert run_pipeline(cfg, tmp_path / "runs") == 3
    err = capsys.readouterr().err
    assert "error (model): teacher" in err and "does not exist as a local folder" in err


def test_a_full_disk_in_any_stage_is_one_error_naming_the_stage(tmp_path: Path) -> None:
    """A write no guard of ours wraps (transformers' save_pretrained through safetensors' native code) still ends
    as the one-line disk error, naming the stage and its folder; other failures pass through unchanged."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    from pipelines.stage_runner import _call_stage
    from pipelines.stage_table import Stage

    def full(ctx: object, out: Path) -> dict:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def broken(ctx: object, out: Path) -> dict:
        raise ValueError("a bug")
    ctx = SimpleNamespace(for_stage=lambda name, allowed: None)
    _, err = _call_stage(Stage("distill", full, (), ()), ctx, tmp_path / "distill")
    assert isinstance(err, DiskFullError) and err.exit_code == 3
    assert "disk full while running stage distill in " + str(tmp_path / "distill") + " (" in str(err)
    assert "rerun the same command to resume" in err.describe() and "\n" not in err.describe()
    _, err = _call_stage(Stage("distill", broken, (), ()), ctx, tmp_path / "distill")
    assert isinstance(err, ValueError)
