"""`moe-distill eval <model>`: lm-eval tasks and latency on one model (a local folder or a hub id), no pipeline.

The same code as the pipeline's eval and latency stages (`eval.lm_eval_runner.run_lm_eval`, `eval.latency`), with
the same loading rules (`teachers.load`: safetensors only, no model code unless asked), so a number here is the
number a pipeline stage would report for that model and these settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import ConfigError, require
from eval.config import LatencyConfig, known_tasks

DEVICES = ("auto", "cpu", "cuda")
# Needs the held-out JSONL that only a pipeline run's data stage writes.
PIPELINE_ONLY_TASKS = ("local_heldout_text",)
RESULTS_FILE = "eval_results.json"


def check_request(tasks: list[str], limit: int, batch_size: int, device: str) -> None:
    """Refuse bad settings before any model is loaded (ConfigError naming the fix)."""
    require(bool(tasks), "--tasks is empty: name at least one task or group, e.g. --tasks local_arc_easy")
    available = [t for t in known_tasks() if t not in PIPELINE_ONLY_TASKS]
    unknown = [t for t in tasks if t not in available]
    require(not unknown, f"unknown task {', '.join(map(repr, unknown))}; available: {', '.join(available)}"
            + (" (local_heldout_text needs a pipeline run's held-out text: `moe-distill run`)"
               if set(unknown) & set(PIPELINE_ONLY_TASKS) else ""))
    require(limit >= 0, "--limit must be >= 0 (0 means all examples)")
    require(batch_size >= 1, "--batch-size must be >= 1")
    require(device in DEVICES, f"--device must be one of: {', '.join(DEVICES)}")


def resolve_device(device: str) -> Any:
    """"auto": cuda when there is a GPU, else cpu; "cuda" without a GPU is a ConfigError. Returns torch.device."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is visible to torch here; use --device cpu (or auto)")
    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def evaluate_model(model_path: str, tasks: list[str], limit: int = 25, batch_size: int = 8, device: str = "auto",
                   latency: bool = True, trust_remote_code: bool = False) -> dict[str, Any]:
    """Score one model on lm-eval `tasks` (at most `limit` examples each, 0: all) and, if `latency`, time it.

    The model is loaded as the pipeline loads it: fp32 on CPU, bf16 on GPU, safetensors only. Latency uses the
    device's default settings (`LatencySettings.for_device`) and, on CPU, the pipeline's thread count.

    Returns {"model", "device", "dtype", "tasks", "limit", "batch_size", "metrics": {"<task>/<metric>": {"value",
    "stderr", "higher_is_better"}}, "latency": {setting: entry} or None, "lm_eval": lm-eval's results,
    versions, n-samples, higher_is_better}. Raises UserError (ModelLoadError, ConfigError) on bad input.
    """
    check_request(tasks, limit, batch_size, device)
    dev = resolve_device(device)
    import torch

    from eval.lm_eval_runner import flatten_metrics, run_lm_eval
    from teachers.load import load_causal_lm, load_tokenizer

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = load_causal_lm(model_path, "model", dev, dtype, trust_remote_code)
    tok = load_tokenizer(model_path, "model", trust_remote_code)
    raw = run_lm_eval(model, tok, tasks, limit=limit or None, batch_size=batch_size, metadata={})
    timing = _latency(model, len(tok), dev) if latency else None
    return {"model": model_path, "device": str(dev), "dtype": str(dtype).removeprefix("torch."), "tasks": tasks,
            "limit": limit, "batch_size": batch_size, "metrics": flatten_metrics(raw), "latency": timing,
            "lm_eval": {k: raw.get(k) for k in ("results", "versions", "n-samples", "higher_is_better")}}


def _latency(model: Any, vocab: int, dev: Any) -> dict[str, dict]:
    """`eval.latency.measure_latency` with the device's settings; on CPU with the pipeline's thread count,
    since two threads on a busy 2-core box vary by 10x (see LatencyConfig.cpu_threads)."""
    import torch

    from eval.latency import LatencySettings, measure_latency

    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(LatencyConfig().cpu_threads)
    try:
        return measure_latency(model, vocab, LatencySettings.for_device(dev), dev)
    finally:
        torch.set_num_threads(threads)


def write_results(result: dict[str, Any], out: Path) -> Path:
    """`out/eval_results.json`, strict JSON (an undefined number is null with a reason beside it)."""
    from core.strict_json import dumps_strict

    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    path.write_text(dumps_strict(result))
    return path


def summary_table(result: dict[str, Any]) -> str:
    """A few aligned lines: each task metric (value +- stderr), then each latency setting's median."""
    rows = [("metric", "value", "")]
    for name, m in result["metrics"].items():
        rows.append((name, f"{m['value']:.4f}", f"+- {m['stderr']:.4f}" if m.get("stderr") is not None else ""))
    for name, e in (result.get("latency") or {}).items():
        median = e.get("median")
        shown = "failed" if median is None else f"{median:.4g}"
        rows.append((f"latency/{name}", shown, e.get("metric", "")))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>{vwidth}}  {c}".rstrip() for a, b, c in rows)


def main(model: str, tasks: list[str], limit: int, batch_size: int, device: str, latency: bool,
         out: Path | None, trust_remote_code: bool) -> int:
    """`moe-distill eval`: evaluate, print the table, write the JSON if `out`. UserError propagates to the CLI."""
    result = evaluate_model(model, tasks, limit, batch_size, device, latency, trust_remote_code)
    print(summary_table(result))
    if out is not None:
        print(f"results: {write_results(result, out)}")
    return 0

