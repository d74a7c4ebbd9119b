"""`make distill GPUS=2` as users launch it (`accelerate launch --multi_gpu`), here on 2 CPU processes over gloo:
the logits cache the two processes write together is byte-identical to one process's, and the distill stage
under DDP and under FSDP2 logs the same per-step losses as one process given the same global batch."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from logit_cache import part_range
from pipelines.config import REPO_ROOT
from tests.mlflow_store import fresh_store

pytestmark = pytest.mark.slow

# Distill budget of the ci preset (16 sequences): 8 steps of 2 sequences, one per process. The teacher is not
# trained further: that runs on rank 0 alone, where `accelerate launch` gives each process fewer threads, so
# its float sums (and then the cache bytes compared here) would differ in the last bits from one process's.
# The CE baseline trains like distill (same trainer, same parallel path) and nothing here checks it: off, for time;
# so is the evaluation of the student as derived.
SET = "latency.enabled=false eval.heldout=false eval.student_init=false baseline.enabled=false teacher_tune.steps=0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(teacher: Path, runs: Path, name: str, env: dict[str, str], processes: int, extra: str = "",
         ok: bool = True) -> subprocess.CompletedProcess:
    args = ["-m", "pipelines.run", "--teacher", str(teacher), "--student", "derived", "--preset", "ci",
            "--run-name", name, "--runs-dir", str(runs), "--set", f"{SET} {extra}".strip()]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:  # what `make distill GPUS=<n>` runs
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    if ok:
        assert proc.returncode == 0, f"{name} ({processes} processes) failed:\n{proc.stderr[-4000:]}"
    return proc


def _digests(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.iterdir()) if p.is_file()}


def _step_losses(run_dir: Path, tracking_uri: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "distill" / "stage.json").read_text())["mlflow_run_id"]
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def _distill_outputs(run_dir: Path) -> dict:
    return json.loads((run_dir / "distill" / "stage.json").read_text())["outputs"]


def test_part_ranges_are_whole_shards_covering_every_sequence_once() -> None:
    for n, sps, parts in [(16, 4, 2), (17, 4, 3), (5, 4, 4), (100, 7, 3)]:
        ranges = [part_range(n, sps, p, parts) for p in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(a % sps == 0 for a, _ in ranges)


def test_two_processes_write_the_same_cache_and_train_to_the_same_losses(tiny_moe_dir: Path,
                                                                         tmp_path: Path) -> None:
    uri = fresh_store(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=uri)
    runs = tmp_path / "runs"
    _run(tiny_moe_dir, runs, "one", env, 1)
    _run(tiny_moe_dir, runs, "two", env, 2)

    one, two = runs / "one", runs / "two"
    # The cache: same files, byte for byte (the merged manifest included), written by two processes.
    assert _digests(two / "logits" / "cache") == _digests(one / "logits" / "cache")
    assert not (two / "logits" / "parts").exists()
    logits = json.loads((two / "logits" / "stage.json").read_text())["outputs"]
    assert logits["processes"] == 2 and logits["router"]["sequences"] == logits["tokens"] // 64
    router_one = json.loads((one / "logits" / "router" / "router_stats.json").read_text())
    router_two = json.loads((two / "logits" / "router" / "router_stats.json").read_text())
    assert router_two["mean"] == pytest.approx(router_one["mean"])

    # Distill under DDP: each process takes 1 of every step's 2 sequences; gradients are averaged.
    ref = _step_losses(one, uri)
    assert len(ref) == 8
    assert _step_losses(two, uri) == pytest.approx(ref, rel=1e-4)
    assert _distill_outputs(two)["parallel"] == "ddp" and _distill_outputs(one)["parallel"] == "none"

    # The same run under FSDP2 (only distill and what follows it rerun): the same losses again.
    _run(tiny_moe_dir, runs, "two", env, 2, "distill.parallel=fsdp")
    assert _step_losses(two, uri) == pytest.approx(ref, rel=1e-4)
    assert _distill_outputs(two)["parallel"] == "fsdp2"
    # The student rank 0 saved holds the full trained weights gathered from the shards.
    w_one = load_file(str(one / "distill" / "model" / "model.safetensors"))
    w_two = load_file(str(two / "distill" / "model" / "model.safetensors"))
    assert w_two.keys() == w_one.keys()
    for name, w in w_one.items():
        torch.testing.assert_close(w_two[name], w, rtol=1e-3, atol=1e-4, msg=name)
    report = json.loads((two / "report.json").read_text())
    assert report["student"]["name"] == json.loads((one / "report.json").read_text())["student"]["name"]


def test_an_error_on_rank_0_stops_every_process_with_its_message(tiny_moe_dir: Path, tmp_path: Path) -> None:
    """The student stage runs on rank 0 alone; its config error reaches the waiting rank, and the run ends
    (no hang) with rank 0's actionable message."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=fresh_store(tmp_path))
    proc = _run(tiny_moe_dir, tmp_path / "runs", "bad", env, 2, "student_options.keep_layers=top_16", ok=False)
    assert proc.returncode != 0
    assert "error (config)" in proc.stderr and "keep_layers" in proc.stderr
    assert json.loads((tmp_path / "runs" / "bad" / "logits" / "stage.json").read_text())["complete"]


def test_a_batch_the_processes_cannot_share_is_a_config_error(tmp_path: Path) -> None:
    env = {**os.environ, "WORLD_SIZE": "3"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "--preset", "ci", "--runs-dir", str(tmp_path)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "must be a multiple of 3 processes" in proc.stderr


def _child(ckpt: Path, log: Path, processes: int, *extra: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    launch = ([sys.executable] if processes == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(_free_port())])
    proc = subprocess.run([*launch, "-m", "tests.distill_child", str(ckpt), str(log), *extra], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("first,second", [(1, 2), (2, 1)])
def test_a_checkpoint_resumes_under_fsdp2_and_back(tmp_path: Path, first: int, second: int) -> None:
    """Checkpoints hold full, named states: training stopped after step 4 on `first` processes (FSDP2 when 2)
    and resumed on `second` logs the same losses as one uninterrupted single process."""
    from distill.trainer import train_student
    from tests.distill_child import VOCAB, tiny_config, tiny_dataset, tiny_llama

    full: list[float] = []
    train_student(tiny_llama(), tiny_dataset(), tiny_config(), tmp_path / "full", VOCAB, torch.device("cpu"),
                  lambda m, step: full.append(m["loss"]))
    ckpt, log = tmp_path / "ckpt", tmp_path / "losses.jsonl"
    _child(ckpt, log, first, "--parallel", "fsdp", "--stop-after", "4")
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]
    _child(ckpt, log, second, "--parallel", "fsdp")
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 10))
    assert [r["loss"] for r in logged] == pytest.approx(full, rel=1e-4)
