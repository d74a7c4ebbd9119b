"""What a run must survive: bad inputs refused before the first stage (one line, exit 3, nothing written),
models identified by content, run folders that never leave `runs/`, Ctrl-C as one line and exit 130, a strict
report.json. Each case drives the real entry point (`pipelines.run.main`) on a tiny real model folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.paths import REPO_ROOT
from tests.mlflow_store import fresh_store
from tests.tiny_teacher import write_tiny_mixtral

V = 49152  # SmolLM2's tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A smaller teacher than the shared one, in a folder named `model` (the run-name test needs the name)."""
    return write_tiny_mixtral(tmp_path_factory.mktemp("teacher") / "model", smollm2_tokenizer_dir, hidden_size=32,
                              intermediate_size=48, num_hidden_layers=2, max_position_embeddings=256)


@pytest.fixture
def copy_of(tmp_path: Path):
    """A fresh copy of a model folder, to damage."""
    import shutil

    def make(src: Path, name: str = "model") -> Path:
        dst = tmp_path / "models" / name
        shutil.copytree(src, dst)
        return dst
    return make


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], teacher: Path | str,
         *extra: str, student: str = "derived") -> tuple[int, str, Path]:
    """The pipeline's entry point with a private MLflow store and runs folder: (exit code, stderr, runs dir)."""
    from pipelines.run import main

    # A URI, not a store: most of these inputs must be refused before the store is even created.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = tmp_path / "runs"
    code = main(["--preset", "ci", "--teacher", str(teacher), "--student", student, "--runs-dir", str(runs),
                 *extra])
    return code, capsys.readouterr().err, runs


def _no_stage_ran(runs: Path) -> None:
    """Nothing but the lock file in any run folder: no stage output, nothing to lose."""
    for run in runs.iterdir() if runs.exists() else []:
        assert {p.name for p in run.iterdir()} <= {".lock"}, sorted(p.name for p in run.iterdir())


def _one_line(err: str, kind: str) -> str:
    """The error line: the last one on stderr, the only `error (` line, no traceback (MLflow may log before)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and lines, err
    assert [ln for ln in lines if ln.startswith("error (")] == lines[-1:], err
    assert lines[-1].startswith(f"error ({kind}): "), lines[-1]
    return lines[-1]


# ----------------------------------------------------------------------------------- checks before any stage

def test_a_truncated_safetensors_file_is_refused_before_any_stage(teacher_dir, copy_of, tmp_path, monkeypatch,
                                                                   capsys) -> None:
    bad = copy_of(teacher_dir)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    code, err, runs = _run(tmp_path, monkeypatch, capsys, bad)
    assert code == 3 and "truncated" in _one_line(err, "model")
    _no_stage_ran(runs)


def test_nan_weights_are_refused_before_any_stage(teacher_dir, copy_of, tmp_path, monkeypatch, capsys) -> None:
    from safetensors.torch import load_file, save_file

    bad = copy_of(teacher_dir)
    f = bad / "model.safetensors"
    weights = load_file(f)
    name = sorted(k for k in weights if "layers.1." in k and "experts" in k)[-1]  # one expert of the last layer
    weights[name].view(-1)[17] = float("nan")
    save_file(weights, f, metadata={"format": "pt"})
    code, err, runs = _run(tmp_path, monkeypatch, capsys, bad, "--set", "teacher_tune.steps=0")
    line = _one_line(err, "model")
    assert code == 3 and name in line and "NaN" in line
    _no_stage_ran(runs)


@pytest.mark.parametrize("setting, words", [
    ("logits.top_k=60000", "larger than the teacher's vocabulary (49152"),
    ("data.sources=[]", "data.sources is empty"),
    ("data.sources=wiki,nowhere", "unknown source 'nowhere'"),
    ("data.heldout_docs=0", "data.heldout_docs must be >= 1"),
    ("eval.tasks=local_arc_easy,local_nope", "unknown task 'local_nope'"),
    ("data.seq_len=512", "longer than the teacher's context (256 positions"),
])
def test_settings_that_cannot_work_are_refused_before_any_stage(setting, words, teacher_dir, tmp_path, monkeypatch,
                                                                capsys) -> None:
    code, err, runs = _run(tmp_path, monkeypatch, capsys, teacher_dir, "--set", setting)
    assert code == 3 and words in _one_line(err, "config")
    _no_stage_ran(runs)


@pytest.mark.parametrize("content, kind, words", [
    ("{not json", "model", "is not valid JSON"),
    ('{"model_type": "llama", "vocab_size": 100}', "vocabulary", "set vocab_size >= 49152"),
    ('{"model_type": "mixtral", "vocab_size": 49152}', "model", "the student must be dense"),
])
def test_a_bad_student_config_is_refused_before_any_stage(content, kind, words, teacher_dir, tmp_path, monkeypatch,
                                                          capsys) -> None:
    f = tmp_path / "student.json"
    f.write_text(content)
    code, err, runs = _run(tmp_path, monkeypatch, capsys, teacher_dir, student=str(f))
    assert code == 3 and words in _one_line(err, kind)
    _no_stage_ran(runs)


def test_a_tokenizer_larger_than_the_model_is_refused(teacher_dir, copy_of, tmp_path, monkeypatch, capsys) -> None:
    bad = copy_of(teacher_dir)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (bad / "config.json").write_text(json.dumps(cfg))
    code, err, runs = _run(tmp_path, monkeypatch, capsys, bad)
    assert code == 3 and "the teacher's tokenizer has 49152 tokens but its model only 1000" in _one_line(err, "model")
    _no_stage_ran(runs)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
@pytest.mark.parametrize("folder", ["run", "artifacts"])
def test_read_only_output_folders_are_refused_before_any_stage(folder, teacher_dir, tmp_path, monkeypatch,
                                                               capsys) -> None:
    target = tmp_path / ("runs" if folder == "run" else "mlartifacts")
    target.mkdir()
    target.chmod(0o500)
    try:
        code, err, _ = _run(tmp_path, monkeypatch, capsys, teacher_dir)
    finally:
        target.chmod(0o700)
    assert code == 3 and "make it writable" in _one_line(err, "disk")


def test_an_unwritable_run_folder_is_refused_even_for_root(teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    # Permission bits do not stop root (CI may run as root); a file where the runs folder should be stops anyone.
    (tmp_path / "runs").write_text("not a folder")
    code, err, _ = _run(tmp_path, monkeypatch, capsys, teacher_dir)
    assert code == 3 and "cannot write to the run folder" in _one_line(err, "disk")


def test_an_unwritable_artifact_folder_is_refused_even_for_root(teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "mlartifacts").write_text("not a folder")  # where the local store keeps its artifacts
    code, err, runs = _run(tmp_path, monkeypatch, capsys, teacher_dir)
    assert code == 3 and "cannot write to the MLflow artifact folder" in _one_line(err, "disk")
    _no_stage_ran(runs)


def test_check_writable_names_the_folder(tmp_path: Path) -> None:
    from pipelines.preflight import PreflightError, check_writable

    (tmp_path / "file").write_text("x")
    with pytest.raises(PreflightError, match="MLflow artifact folder"):
        check_writable(tmp_path / "file" / "sub", "MLflow artifact folder")
    check_writable(tmp_path / "new" / "deep", "run folder")
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())


# ------------------------------------------------------------------------------ run folders and model identity

def test_two_teachers_in_folders_of_the_same_name_get_two_run_folders(teacher_dir, copy_of) -> None:
    from pipelines.config import load_config
    from pipelines.run import run_name

    other = copy_of(teacher_dir)  # .../models/model, beside .../teacherN/model
    a = run_name(load_config("ci", teacher=str(teacher_dir)))
    b = run_name(load_config("ci", teacher=str(other)))
    assert a != b and a.startswith("model-") and b.startswith("model-")
    assert "/" not in a and ".." not in a
    assert run_name(load_config("ci", teacher=str(teacher_dir))) == a  # stable


def test_replacing_a_teacher_s_weights_in_place_reruns_what_depends_on_it(teacher_dir, copy_of, tmp_path,
                                                                         monkeypatch) -> None:
    from safetensors.torch import load_file, save_file

    from core import content_identity
    from pipelines.config import load_config
    from pipelines.stage_runner import input_hash
    from pipelines.stage_table import BY_NAME

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    model = copy_of(teacher_dir)
    cfg = load_config("ci", teacher=str(model))
    stage = BY_NAME["teacher"]
    first = input_hash(stage, cfg, {}, "cpu")
    # Read once, then from the cache: a large teacher is not re-read on every run.
    reads = []
    real = content_identity.file_sha256
    monkeypatch.setattr(content_identity, "file_sha256", lambda p: reads.append(p) or real(p))
    content_identity._MEMO.clear()
    assert input_hash(stage, cfg, {}, "cpu") == first and reads == []
    f = model / "model.safetensors"
    st = f.stat()
    weights = load_file(f)
    weights["model.norm.weight"] += 1.0
    save_file(weights, f, metadata={"format": "pt"})
    assert f.stat().st_size == st.st_size  # same name, same size: only the content says it changed
    assert input_hash(stage, cfg, {}, "cpu") != first
    assert [p.name for p in reads] == ["model.safetensors"]


def test_the_stage_cache_never_deletes_outside_its_run_folder(tmp_path: Path) -> None:
    from core.errors import UserError
    from pipelines.stage_runner import remove_stage_dir

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "distill").symlink_to(precious, target_is_directory=True)
    with pytest.raises(UserError, match="outside the run folder"):
        remove_stage_dir(run_dir / "distill", run_dir)
    with pytest.raises(UserError, match="outside the run folder"):
        remove_stage_dir(tmp_path / "precious", run_dir)
    assert (precious / "keep.txt").read_text() == "mine"
    (run_dir / "logits").mkdir()
    remove_stage_dir(run_dir / "logits", run_dir)
    assert not (run_dir / "logits").exists()


@pytest.mark.parametrize("name", ["..", "../x", "/tmp/x", "a/b", ".hidden", "x/../.."])
def test_run_names_that_leave_runs_write_nothing(name, teacher_dir, tmp_path, monkeypatch, capsys) -> None:
    code, err, runs = _run(tmp_path, monkeypatch, capsys, teacher_dir, "--run-name", name)
    assert code == 3 and "is not a run name" in _one_line(err, "config")
    assert not runs.exists() and not list(tmp_path.iterdir())  # refused before the store or any folder


# ----------------------------------------------------------------------------------- strict report.json

def test_report_json_is_strict_json_with_reasons_for_undefined_numbers() -> None:
    from core.strict_json import dumps_strict
    from eval.report import NULL_REASONS

    report = {"summary": {"retained_mean": float("nan"), "speedup": 2.0},
              "quality": {"arc/acc": {"retained_gain": float("inf"), "teacher": 0.5}}, "curve": [1.0, float("nan")]}
    text = dumps_strict(report, NULL_REASONS)

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    back = json.loads(text, parse_constant=refuse)
    assert back["summary"]["retained_mean"] is None and back["summary"]["speedup"] == 2.0
    assert back["summary"]["retained_mean_null_reason"] == NULL_REASONS["retained_mean"]
    assert back["quality"]["arc/acc"]["retained_gain"] is None
    assert "no gain to recover" in back["quality"]["arc/acc"]["retained_gain_null_reason"]
    assert back["curve"] == [1.0, None]


# ----------------------------------------------------------------------------------- Ctrl-C and exit codes

def _start(cmd: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": fresh_store(tmp_path), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job


def _interrupt_when_running(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    """Wait for the first stage to start, then Ctrl-C the process group as a terminal would."""
    t0, seen = time.monotonic(), []
    for line in proc.stdout:
        seen.append(line)
        if "] running" in line:
            break
        assert time.monotonic() - t0 < timeout, "".join(seen)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return "".join(seen) + out, err


def test_a_swallowed_ctrl_c_still_stops_at_the_next_safe_point() -> None:
    """A KeyboardInterrupt that lands in a finalizer or a library that catches it is remembered: check(),
    called before each stage and after each training step, raises it again. The handler is put back after."""
    from core import interrupt

    before = signal.getsignal(signal.SIGINT)
    with interrupt.remembered():
        interrupt.check()  # nothing pressed yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the handler raises in here
        except KeyboardInterrupt:
            pass  # what a finalizer or a careless library does with it
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is before
    interrupt.check()  # forgotten once the command is over


def test_ctrl_c_in_a_finalizer_is_raised_in_ordinary_code_just_after(recwarn) -> None:
    """Raised inside __del__ (tqdm's, at the end of every progress bar), KeyboardInterrupt would be printed as
    "Exception ignored" and dropped: the handler sends the signal again once the finalizer has returned."""
    import threading

    from core import interrupt

    finalized = []

    class SlowToFinalize:
        def __del__(self) -> None:
            time.sleep(0.5)  # the signal arrives in here
            finalized.append(True)

    with interrupt.remembered():
        obj = SlowToFinalize()
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            del obj
            assert finalized  # the finalizer ran to its end: nothing was raised in it
            time.sleep(2.0)  # the signal sent again is raised here
    assert not [w for w in recwarn if "nraisable" in type(w.message).__name__]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(teacher_dir, tmp_path) -> None:
    proc = _start([sys.executable, "-m", "pipelines.run", "--preset", "ci", "--teacher", str(teacher_dir),
                   "--runs-dir", str(tmp_path / "runs"), "--run-name", "ctrl-c"], tmp_path)
    out, err = _interrupt_when_running(proc)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command to resume"


@pytest.mark.slow
def test_make_distill_passes_ctrl_c_and_names_the_pipeline_s_exit_code(teacher_dir, tmp_path) -> None:
    make = ["make", "-s", "--no-print-directory", "distill", f"TEACHER={teacher_dir}", "PRESET=ci",
            f"RUNS_DIR={tmp_path / 'runs'}"]
    # A bad input: make itself can only exit 2, so the pipeline's code is printed, and moe-distill returns it.
    done = subprocess.run([*make, "SET=logits.top_k=60000"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": fresh_store(tmp_path)},
                          timeout=300)
    assert done.returncode == 2 and "pipeline exit code 3" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    cli = subprocess.run([str(Path(sys.executable).parent / "moe-distill"), "run", "--preset", "ci", "--teacher",
                          str(teacher_dir), "--runs-dir", str(tmp_path / "runs"), "--set", "logits.top_k=60000"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MLFLOW_TRACKING_URI": fresh_store(tmp_path)})
    assert cli.returncode == 3 and "logits.top_k=60000" in cli.stderr
    # Ctrl-C: make dies of SIGINT too, so the shell sees 130 (128 + 2). When the pipeline's exit reaches make
    # before make handles its own SIGINT, GNU make reports the recipe's 130 and exits 2 (seen once in a fresh
    # clone's `make test`): the pipeline's code is still named.
    proc = _start([*make, "RUN=make-ctrl-c"], tmp_path)
    out, err = _interrupt_when_running(proc)
    assert proc.returncode in (-signal.SIGINT, 130) or (proc.returncode == 2 and "Error 130" in err), \
        (proc.returncode, out, err)
    assert "interrupted; run the same command to resume" in err and "Traceback" not in err, err


def test_derived_from_a_family_without_a_dense_form_is_refused_before_any_stage(
        smollm2_tokenizer_dir, tmp_path, monkeypatch, capsys) -> None:
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    cfg = OlmoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    folder = tmp_path / "olmoe"
    OlmoeForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    code, err, runs = _run(tmp_path, monkeypatch, capsys, folder)  # STUDENT=derived
    line = _one_line(err, "model")
    assert code == 3 and "'olmoe'" in line and "STUDENT=<dense model" in line
    _no_stage_ran(runs)
