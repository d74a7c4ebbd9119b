"""Stage `logits`: the teacher's top-k distribution over the training sequences, written to the logit cache,
with router analytics on the way."""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core import distributed as dist
from logit_cache import (
    MANIFEST_NAME,
    CacheMeta,
    LogitCache,
    LogitCacheWriter,
    cache_fidelity_kl,
    merge_parts,
    part_range,
)
from pipelines.context import RunContext
from teachers.fused import use_fused_kernels
from teachers.load import is_moe, load_teacher, needs_several_gpus
from teachers.logit_generation import COUNTS_FILE, generate_logit_cache, save_counts
from teachers.router_analytics import RouterRecorder, summarise, write_heatmaps
from teachers.teacher_text import SOURCE, write_teacher_text


def _cache_complete(root: Path) -> bool:
    try:
        return bool(json.loads((root / MANIFEST_NAME).read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


@torch.inference_mode()
def logits_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Run the teacher over the sequences and write its top-k distribution to a sharded cache, counting what
    its routers do per text source on the way (heatmaps in `router/`, logged to MLflow).

    On GPU the teacher runs our fused MoE kernels (`kernels.hf_moe`), falling back per layer to transformers'
    own path where they do not apply. Resumes from the last complete shard if a previous run was killed.

    Under a multi-process launch each process writes a part (whole shards of consecutive sequences, in
    `parts/<first>-<end>`), and rank 0 joins them into one cache identical to a single process's. A teacher too
    large for one GPU is instead spread over all of them by rank 0 alone.
    """
    cfg = ctx.cfg
    corpus = load_file(ctx.output("data", "sequences"))["input_ids"]
    n_corpus, n_text = len(corpus), cfg.logits.teacher_text_sequences
    # The cache holds the corpus sequences, then the teacher's own text (sequence-level KD), made below by each
    # process for its own range.
    total = n_corpus + n_text
    teacher_path = ctx.output("teacher_tune", "path")
    parts = dist.world_size()
    if parts > 1 and dist.is_main() and (_cache_complete(out / "cache")
                                         or needs_several_gpus(teacher_path, ctx.device, ctx.dtype)):
        parts = 1
    parts = dist.share(parts)  # rank 0 decides: free GPU memory may differ between ranks
    sources = list(ctx.output("data", "sources")) + ([SOURCE] if n_text else [])
    seq_sources = json.loads((Path(ctx.output("data", "sequences")).parent / "sequence_sources.json").read_text())
    source_ids = torch.tensor([sources.index(s) for s in seq_sources] + [len(sources) - 1] * n_text)
    mine: dict[str, Any] | None = None
    error: BaseException | None = None
    teacher = tok = recorder = None
    fused: dict[str, Any] = {"experts_implementation": "stock"}
    try:
        if dist.rank() < parts:
            teacher, tok = load_teacher(teacher_path, ctx.device, ctx.dtype, cfg.teacher_options.allow_dense,
                                        cfg.teacher_options.trust_remote_code)
            fused = use_fused_kernels(teacher, ctx.device)
            a, b = part_range(total, cfg.logits.sequences_per_shard, dist.rank(), parts)
            # A part's folder is named by its range, so a rerun on another number of processes (other
            # ranges) never resumes a part holding other sequences; stale parts go with the merge.
            root = out / "cache" if parts == 1 else out / "parts" / f"{a:09d}-{b:09d}"
            mine_seqs = _sequences(ctx, corpus, a, b, teacher, len(tok), out / "teacher_text")
            writer = LogitCacheWriter(root, _cache_meta(ctx, len(tok), corpus.shape[1]),
                                      sequences_per_shard=cfg.logits.sequences_per_shard)
            recorder = RouterRecorder(teacher, sources) if is_moe(teacher.config) else None
            with recorder if recorder is not None else contextlib.nullcontext():
                gen = generate_logit_cache(teacher, mine_seqs, writer, cfg.logits.top_k, len(tok),
                                           cfg.logits.batch_size, recorder, source_ids[a:b])
            mine = {"root": str(root), "tokens": gen["tokens"], "seconds": gen["seconds"],
                    "analytics_sequences": gen["analytics_sequences"], "complete": gen["analytics_sequences"] == b - a,
                    "counts": None if recorder is None else recorder.counts.cpu()}
    except Exception as e:  # noqa: BLE001 - raised on every rank by the hand-off below
        error = e
    results = [r for r in dist.gather(mine, error) if r is not None]
    if not dist.is_main():
        return {}
    counts = None if recorder is None else sum(r["counts"] for r in results)
    if parts > 1:
        if all(r["complete"] for r in results) and counts is not None:
            (out / "cache").mkdir(parents=True, exist_ok=True)
            save_counts(out / "cache" / COUNTS_FILE, counts, total)
        merge_parts([Path(r["root"]) for r in results], out / "cache")
        shutil.rmtree(out / "parts", ignore_errors=True)  # what the merge left: parts of other ranges
    seconds = max(r["seconds"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return _summarise_cache(ctx, out, teacher, len(tok), recorder, counts, fused,
                            {"tokens_per_s": tokens / seconds if tokens else 0.0, "processes": parts,
                             "analytics_sequences": sum(r["analytics_sequences"] for r in results),
                             "corpus_sequences": n_corpus, "teacher_text_sequences": n_text})


def _sequences(ctx: RunContext, corpus: torch.Tensor, a: int, b: int, teacher: torch.nn.Module, vocab: int,
               folder: Path) -> torch.Tensor:
    """Rows a..b of what the cache holds: the corpus sequences, then the teacher's own text (made here for the
    rows in this range only, and kept in `folder` so that a resumed stage does not sample again)."""
    n = len(corpus)
    rows = [corpus[a:min(b, n)].long()]
    if b > n:
        lc = ctx.cfg.logits
        lo, hi = max(a, n) - n, b - n
        rows.append(write_teacher_text(teacher, corpus, lc.teacher_text_sequences, lc.teacher_text_prompt, vocab,
                                       lc.teacher_text_temperature, lc.batch_size, lc.teacher_text_seed, lo, hi,
                                       save_to=folder / f"{lo:09d}-{hi:09d}.safetensors"))
    return torch.cat(rows)


def _cache_meta(ctx: RunContext, vocab: int, seq_len: int) -> CacheMeta:
    # vocab = the tokenizer's size: padding rows of the embedding past it are never a target.
    return CacheMeta(k=ctx.cfg.logits.top_k, vocab_size=vocab, seq_len=seq_len,
                     teacher_hash=ctx.records["teacher_tune"]["output_hash"],
                     tokenizer_hash=ctx.output("data", "tokenizer_hash"),
                     data_hash=ctx.records["data"]["output_hash"])


def _summarise_cache(ctx: RunContext, out: Path, teacher: torch.nn.Module, vocab: int,
                     recorder: RouterRecorder | None, counts: torch.Tensor | None, fused: dict[str, Any],
                     gen: dict[str, Any]) -> dict[str, Any]:
    """The finished cache's size and fidelity, the router analytics, and the stage's record."""
    import mlflow

    cache = LogitCache(out / "cache")
    # Fidelity: how far the distribution the cache reconstructs is from the teacher's full one.
    sample = cache[0]
    full = teacher(input_ids=sample["input_ids"][None].to(ctx.device), use_cache=False).logits[0, :, :vocab]
    kl = cache_fidelity_kl(full.float().cpu(), sample["topk_ids"], sample["topk_logprobs"], sample["tail_logmass"])
    nbytes, ntok = cache.nbytes(), cache.num_tokens()
    mass = sample["topk_logprobs"].exp().sum(-1).mean().item()
    router: dict[str, Any] = {}
    metrics = {"logits/tokens_per_s": gen["tokens_per_s"], "logits/bytes_per_token": nbytes / ntok,
               "logits/fidelity_kl": kl, "logits/topk_mass": mass, "logits/tokens": ntok}
    if recorder is not None and recorder.skipped is not None:
        # Routing this model's way could not be read: the cache stands, the report shows no router section.
        router = {"skipped": recorder.skipped}
    elif recorder is not None:
        sources = list(ctx.output("data", "sources"))
        router = summarise(counts, recorder.layers, sources)
        router["sequences"] = gen["analytics_sequences"]
        router["heatmaps"] = [str(p) for p in write_heatmaps(router, out / "router")]
        (out / "router" / "router_stats.json").write_text(json.dumps(router, indent=1))
        for p in [*router["heatmaps"], out / "router" / "router_stats.json"]:
            mlflow.log_artifact(str(p), artifact_path="router")
        metrics.update({f"router/{k}": v for k, v in router["mean"].items()})
    manifest = cache.manifest
    return {"outputs": {"cache": str(out / "cache"), "tokens": ntok, "k": ctx.cfg.logits.top_k, "bytes": nbytes,
                        "bytes_per_token": nbytes / ntok, "fidelity_kl": kl, "topk_mass": mass,
                        "shards": len(manifest["shards"]), "tokens_per_s": gen["tokens_per_s"],
                        "processes": gen["processes"], "fused": fused, "router": router,
                        "corpus_sequences": gen["corpus_sequences"],
                        "teacher_text_sequences": gen["teacher_text_sequences"]},
            "output_hash": hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()[:16],
            "metrics": metrics}
