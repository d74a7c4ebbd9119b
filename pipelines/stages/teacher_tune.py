"""Stage `teacher_tune`: train the teacher further so its experts differ, or pass the teacher stage's model on."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.errors import ConfigError
from core.hashing import hash_files
from pipelines.context import RunContext
from teachers.load import is_moe, load_teacher
from teachers.smollm2_moe import UNTRAINED_NOTE

TUNED_NOTE = ("The teacher is SmolLM2-135M-Instruct sparse-upcycled to a Mixtral-class MoE and then trained further "
              "on the training text with a load-balancing loss (stage teacher_tune), so its experts differ: see "
              "the expert spread and the routing before and after in that stage's record.")


def teacher_tune_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Train the teacher further (teacher_tune.steps > 0), or pass the teacher stage's model on unchanged.

    Writes out/model (safetensors + tokenizer) and records the routing on the first `probe_sequences`
    training sequences before and after, and the spread between experts (teachers/continued_training.py)."""
    cfg = ctx.cfg
    tc = cfg.teacher_tune
    rec = ctx.records["teacher"]
    if tc.steps == 0:
        return {"outputs": {**rec["outputs"], "tuned": False}, "output_hash": rec["output_hash"], "metrics": {}}
    from pipelines.tracking import log_metrics
    from teachers.continued_training import expert_spread, measure_routing, tune_teacher

    opts = cfg.teacher_options
    # fp32 master weights: the optimizer's small steps would vanish in bf16 weights.
    teacher, tok = load_teacher(ctx.output("teacher", "path"), ctx.device, torch.float32, opts.allow_dense,
                                opts.trust_remote_code)
    if not is_moe(teacher.config):
        raise ConfigError("teacher_tune.steps > 0 needs an MoE teacher (it trains the routers with a "
                          "load-balancing loss); set teacher_tune.steps=0 for a dense one")
    seqs = load_file(ctx.output("data", "sequences"))["input_ids"]
    sources = list(ctx.output("data", "sources"))
    seq_sources = json.loads((Path(ctx.output("data", "sequences")).parent / "sequence_sources.json").read_text())
    probe = min(tc.probe_sequences, len(seqs))
    probe_ids = torch.tensor([sources.index(s) for s in seq_sources[:probe]])
    before_file = out / "routing_before.json"
    if before_file.exists():  # a resumed run: the teacher in memory is no longer the untrained one
        before = json.loads(before_file.read_text())
    else:
        before = {"routing": measure_routing(teacher, seqs[:probe], probe_ids, sources) if probe else None,
                  "expert_spread": expert_spread(teacher)}
        out.mkdir(parents=True, exist_ok=True)
        before_file.write_text(json.dumps(before))
    result = tune_teacher(teacher, seqs, tc, out / "checkpoints", ctx.device,
                          log_fn=lambda m, step: log_metrics({f"teacher_tune/{k}": v for k, v in m.items()}, step))
    after = {"routing": measure_routing(teacher, seqs[:probe], probe_ids, sources) if probe else None,
             "expert_spread": expert_spread(teacher)}
    (out / "model").mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    del teacher
    summary = {**rec["outputs"]["summary"], "path": str(out / "model"), "tuned_steps": tc.steps}
    notes = [TUNED_NOTE if n == UNTRAINED_NOTE else n for n in rec["outputs"]["notes"]]
    metrics = {f"teacher_tune/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    for when, m in (("before", before), ("after", after)):
        metrics[f"teacher_tune/expert_spread_{when}"] = sum(m["expert_spread"]) / max(1, len(m["expert_spread"]))
        if m["routing"]:
            for k, v in m["routing"]["mean"].items():
                metrics[f"teacher_tune/{k}_{when}"] = v
    return {"outputs": {"path": str(out / "model"), "summary": summary, "notes": notes, "vocab": len(tok),
                        "tuned": True, "training": result, "before": before, "after": after},
            "output_hash": hash_files(out / "model"), "metrics": metrics}
