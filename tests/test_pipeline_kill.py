"""`make distill` as users run it, in separate processes: SIGKILLed at random points of the logits and distill
stages and rerun, it ends with the same cache checksums and final loss as an uninterrupted run; and two runs
at once (different students, one MLflow store, one resource cache) do not disturb each other."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import REPO_ROOT
from tests.mlflow_store import fresh_store

pytestmark = pytest.mark.slow


# Timing, the CE baseline, the held-out text and the as-derived evaluation add minutes over this test's five runs
# and nothing to what it checks (the logits and distill stages resumed after a kill; concurrent runs on one store).
SET = "latency.enabled=false baseline.enabled=false eval.heldout=false eval.student_init=false"


def _start(teacher: Path, runs: Path, name: str, env: dict[str, str], extra: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.run", "--teacher", str(teacher), "--student", "derived",
           "--preset", "ci", "--run-name", name, "--runs-dir", str(runs), "--set", f"{SET} {extra}".strip()]
    return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed:\n{err.decode()[-3000:]}"


def _running(stage_dir: Path) -> bool:
    """The stage has started (its record exists) and not finished."""
    try:
        return json.loads((stage_dir / "stage.json").read_text()).get("complete") is False
    except (OSError, json.JSONDecodeError):
        return False


def _kill_during(proc: subprocess.Popen, stage_dir: Path, delay: float) -> bool:
    """SIGKILL `delay` seconds after the stage starts; True when the kill landed inside the stage."""
    deadline = time.monotonic() + 300
    while not _running(stage_dir):
        assert proc.poll() is None, f"run ended before {stage_dir.name}: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"{stage_dir.name} never started"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _running(stage_dir)


def _digests(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache.iterdir()) if p.is_file()}


def test_killed_runs_resume_to_the_same_result_and_concurrent_runs_coexist(tiny_moe_dir: Path,
                                                                          tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # row ops in PyTorch, as on CPU
    env.update(PYTHONPATH=str(REPO_ROOT), MLFLOW_TRACKING_URI=fresh_store(tmp_path))
    runs = tmp_path / "runs"
    # Two runs at once on one MLflow store and resource cache, with different students.
    a = _start(tiny_moe_dir, runs, "plain", env)
    b = _start(tiny_moe_dir, runs, "other-student", env, "student_options.method=frequency")
    _finish(a, "run A")
    _finish(b, "run B (concurrent, other student)")
    ref = json.loads((runs / "plain" / "report.json").read_text())
    assert json.loads((runs / "other-student" / "report.json").read_text())["student"]["name"].startswith(
        "derived(frequency")
    # The same configuration as A, killed at random moments of the logits and the distill stage.
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    killed = runs / "killed"
    landed = 0
    for stage in ("logits", "distill"):
        if (killed / stage / "stage.json").exists() and not _running(killed / stage):
            print(f"{stage} finished before the previous kill: nothing left to kill in it")
            continue
        # A random point inside the stage: a share of what it took in run A (which shared the machine with B,
        # so a solo run is faster), not a fixed number of seconds a fast machine could finish the stage in.
        took = json.loads((runs / "plain" / stage / "stage.json").read_text())["seconds"]
        delay = rng.uniform(0.05, 0.4) * took
        print(f"kill seed {seed}: SIGKILL {delay:.2f} s into {stage} (run A's took {took:.1f} s)")
        landed += _kill_during(_start(tiny_moe_dir, runs, "killed", env), killed / stage, delay)
    assert landed, "no kill landed inside a stage: nothing was resumed"
    _finish(_start(tiny_moe_dir, runs, "killed", env), "the resumed run")
    assert _digests(killed / "logits" / "cache") == _digests(runs / "plain" / "logits" / "cache")
    got = json.loads((killed / "report.json").read_text())
    assert got["training"]["steps"] == ref["training"]["steps"]
    assert got["training"]["final_loss"] == pytest.approx(ref["training"]["final_loss"], rel=1e-5, abs=1e-6)


def test_time_limit_stops_before_a_stage_and_says_to_rerun(tiny_moe_dir: Path, tmp_path: Path) -> None:
    """TIME_LIMIT with less left than a stage needs to start: exit 75, the message says to rerun, and no stage
    folder was touched (what an earlier call finished stays as it was)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": fresh_store(tmp_path)}
    cmd = [sys.executable, "-m", "pipelines.run", "--teacher", str(tiny_moe_dir), "--student", "derived",
           "--preset", "ci", "--run-name", "limited", "--runs-dir", str(tmp_path / "runs"), "--time-limit", "30"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "stopped for the time limit" in proc.stderr and "run the same command again" in proc.stderr
    assert not (tmp_path / "runs" / "limited" / "teacher").exists()
    # The stopped stage opened no MLflow run either: the UI shows no empty "teacher" stage for this call.
    import mlflow

    client = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert not [r for r in runs if r.data.tags.get("stage") == "teacher"]
