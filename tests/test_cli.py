"""`moe-distill`, through the installed console script: every command's help, show-config's provenance, YAML-path
presets, `eval` on a real saved model, and the config reference page kept in sync with the dataclasses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import ConfigError, config_sources, load_config
from pipelines.config_reference import REFERENCE_PATH, REGENERATE, field_comments, reference_markdown

CLI = str(Path(sys.executable).parent / "moe-distill")
COMMANDS = ["run", "eval", "compare", "show-config", "ui", "sweep"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_every_command() -> None:
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: moe-distill")
    for command in COMMANDS:
        assert f"    {command}" in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    out = _cli(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: moe-distill {command}"), out.stdout[:200]


def test_unknown_command_is_one_line_exit_2() -> None:
    out = _cli("swep")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("error (usage): unknown command 'swep'")


def test_show_config_says_where_each_value_came_from() -> None:
    out = _cli("show-config", "--preset", "ci", "--set", "distill.lr=1e-4 eval.batch_size=3", "--teacher", "some/dir",
               "--json")
    assert out.returncode == 0, out.stderr
    got = {k: (v["value"], v["source"]) for k, v in json.loads(out.stdout).items()}
    assert got["distill.weight_decay"] == (0.0, "default")
    assert got["eval.limit"] == (4, "preset ci")
    assert got["baseline.enabled"] == (True, "preset smoke (base of ci)")  # ci's base: smoke
    assert got["distill.lr"] == (1e-4, "SET")
    assert got["eval.batch_size"] == (3, "SET")  # ci sets 4: SET wins
    assert got["teacher"] == ("some/dir", "option")
    assert got["student"] == ("derived", "default")
    assert got["preset"] == ("ci", "option")
    # Every key of the config, with the value load_config gives.
    cfg = load_config("ci", "distill.lr=1e-4 eval.batch_size=3", teacher="some/dir")
    assert {k: v for k, (v, _) in got.items()} == {k: v for k, (v, _) in config_sources(
        "ci", "distill.lr=1e-4 eval.batch_size=3", teacher="some/dir").items()}
    assert got["data.sources"][0] == cfg.data.sources and got["overrides"] == (cfg.overrides, "SET")


def test_show_config_text_is_aligned_and_bad_input_is_one_line() -> None:
    out = _cli("show-config", "--preset", "smoke")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["key", "value", "source"]
    source_col = lines[0].index("source")
    row = next(line for line in lines if line.startswith("logits.top_k "))
    assert row.split() == ["logits.top_k", "16", "preset", "smoke"] and row.index("preset") == source_col
    bad = _cli("show-config", "--set", "distill.lrr=1")
    assert bad.returncode == 3 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error (config): unknown config key")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_preset_may_be_any_yaml_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file preset; its base: a path relative to that file, whose own base: is a built-in preset."""
    _write(tmp_path / "parent.yaml", "base: smoke\neval:\n  limit: 2\n")
    child = _write(tmp_path / "sub" / "child.yaml", "base: ../parent.yaml\ndistill:\n  lr: 0.001\n")
    cfg = load_config(str(child))
    assert cfg.distill.lr == 0.001 and cfg.eval.limit == 2 and cfg.data.train_tokens == 1024  # smoke's
    assert cfg.preset == str(child)
    monkeypatch.chdir(tmp_path)  # relative to the working directory
    src = config_sources("sub/child.yaml")
    assert src["distill.lr"] == (0.001, "preset sub/child.yaml")
    assert src["eval.limit"] == (2, "preset parent.yaml (base of sub/child.yaml)")
    assert src["data.train_tokens"] == (1024, "preset smoke (base of sub/child.yaml)")
    assert src["distill.seed"] == (0, "default")
    # The installed command takes the same path.
    out = _cli("show-config", "--preset", "sub/child.yaml", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["eval.limit"] == {"value": 2, "source": "preset parent.yaml (base of sub/child.yaml)"}


def test_a_missing_or_circular_preset_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"preset file '{tmp_path}/nope.yaml' does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    child = _write(tmp_path / "child.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match=f"preset file 'gone.yaml' \\(the base: of {child}\\) does not exist "
                       f"\\({tmp_path}/gone.yaml\\)"):
        load_config(str(child))
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(str(tmp_path / "a.yaml"))
    out = _cli("show-config", "--preset", str(tmp_path / "nope.yaml"))
    assert out.returncode == 3 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith(f"error (config): preset file '{tmp_path}/nope.yaml' does not exist")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A saved 2-layer random Llama with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_eval_one_model_writes_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = _cli("eval", str(tiny_model_dir), "--tasks", "local_arc_easy", "--limit", "2", "--batch-size", "2",
               "--device", "cpu", "--out", str(tmp_path / "res"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "res" / "eval_results.json").read_text())
    assert res["model"] == str(tiny_model_dir) and res["device"] == "cpu" and res["dtype"] == "float32"
    assert res["tasks"] == ["local_arc_easy"] and res["limit"] == 2
    assert res["lm_eval"]["n-samples"]["local_arc_easy"]["effective"] == 2
    acc = res["metrics"]["arc_easy/acc"]
    assert 0.0 <= acc["value"] <= 1.0 and acc["higher_is_better"] is True
    assert res["latency"]["decode_b1"]["metric"] == "ms_per_token" and res["latency"]["decode_b1"]["median"] > 0
    assert res["latency"]["memory_weights"]["median"] > 0
    assert any(line.startswith("arc_easy/acc ") for line in out.stdout.splitlines())
    assert any(line.startswith("latency/decode_b1 ") for line in out.stdout.splitlines())


@pytest.mark.parametrize("args,start", [
    (["{missing}"], "error (model): model '{missing}' does not exist as a local folder"),
    (["{model}", "--tasks", "local_nope"], "error (config): unknown task 'local_nope'; available: "),
])
def test_eval_bad_input_is_one_line_exit_3(args: list[str], start: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    fill = {"missing": str(tmp_path / "no_model"), "model": str(tiny_model_dir)}
    out = _cli("eval", *[a.format(**fill) for a in args], "--no-latency")
    assert out.returncode == 3, out.stderr[-3000:]
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith(start.format(**fill))


def test_field_comments_read_the_line_and_the_lines_above() -> None:
    from distill.config import DistillConfig
    from teachers.config import TeacherTuneConfig

    d = field_comments(DistillConfig)
    assert d["temperature"] == "KD at this temperature, scaled by T^2; CE stays at T = 1."
    assert d["parallel"].startswith("With several processes (GPUS=<n>): \"ddp\"")  # the comment block above
    assert d["lr"] == ""
    t = field_comments(TeacherTuneConfig)
    assert t["steps"].startswith("optimizer steps. Continued training of the teacher")  # line, then above


def test_reference_page_is_in_sync() -> None:
    from pipelines.config import PipelineConfig, _flat

    page = reference_markdown()
    for key in _flat(PipelineConfig().to_dict()):
        assert f"| `{key}` |" in page, f"{key} missing from the reference"
    committed = REFERENCE_PATH.read_text() if REFERENCE_PATH.is_file() else ""
    assert committed == page, (f"{REFERENCE_PATH} differs from the config dataclasses; regenerate it: {REGENERATE} "
                               "(or moe-distill show-config --reference)")
