"""Run the teacher over the training sequences and write its top-k logit cache, the GPU never waiting on disk.

The teacher computes batch i+1 while a writer thread packs and writes batch i: top-k results are copied to
pinned host memory without blocking, and the thread waits on that copy's CUDA event, not on the GPU. The
queue is short (two batches), so a slow disk slows the teacher down instead of filling host memory. On CPU
the same thread overlaps packing and writing with the next forward.

Router analytics (router_analytics.py) ride along: their counts are saved beside the cache whenever every
sequence counted so far sits in complete shards. A run killed between a shard landing and the next save resumes
from the saved counts and routes the few sequences in between again (the routers only, no top-k, nothing
written), so the counts always cover the whole cache, exactly as an uninterrupted run's.
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from core import interrupt
from logit_cache import LogitCacheWriter, topk_from_hidden, topk_from_logits
from teachers.moe_layout import decoder_module
from teachers.output_head import plain_head_problem
from teachers.router_analytics import RouterRecorder

COUNTS_FILE = "router_counts.safetensors"


def save_counts(path: Path, counts: torch.Tensor, covered: int) -> None:
    """Router counts [L, S, E] that cover sequences 0 .. covered-1 of the cache beside `path`."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({"counts": counts.cpu(), "covered": torch.tensor([covered])}, str(tmp))
    tmp.replace(path)


def _resume_counts(path: Path, recorder: RouterRecorder, start: int) -> int:
    """Load saved counts that cover the first sequences of the `start` already in the cache; return how many
    they cover (0 when there are none that fit: the recorder then starts from zero)."""
    if start == 0 or not path.is_file():
        return 0
    saved = load_file(str(path))
    covered = int(saved["covered"][0])
    if not 0 < covered <= start or saved["counts"].shape != recorder.counts.shape:
        return 0
    recorder.load_counts(saved["counts"])
    return covered


@torch.inference_mode()
def _route_again(teacher: torch.nn.Module, decoder: torch.nn.Module | None, sequences: torch.Tensor,
                 source_ids: torch.Tensor, recorder: RouterRecorder, first: int, end: int, batch_size: int) -> None:
    """Count the routing of sequences first .. end-1 (already in the cache, not in the saved counts): a forward
    through the decoder for its routers, no head, no top-k, nothing written."""
    device = next(teacher.parameters()).device
    seq_len = sequences.shape[1]
    for i in range(first, end, batch_size):
        ids = sequences[i:min(i + batch_size, end)].long()
        recorder.set_batch(source_ids[i:i + len(ids)], seq_len)
        (decoder if decoder is not None else teacher)(input_ids=ids.to(device), use_cache=False)


@torch.inference_mode()
def _teacher_topk(teacher: torch.nn.Module, decoder: torch.nn.Module | None, ids: torch.Tensor, k: int,
                  vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k of ids [B, S]: ids [B, S, k], logprobs [B, S, k], tail [B, S]; through the decoder
    and the chunked head when `decoder` is given, else through the model's own logits."""
    if decoder is None:
        return topk_from_logits(teacher(input_ids=ids, use_cache=False).logits[..., :vocab], k)
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    b, s, h = hidden.shape
    top_ids, top_lp, tail = topk_from_hidden(hidden.reshape(-1, h), teacher.get_output_embeddings().weight, k, vocab)
    return top_ids.view(b, s, k), top_lp.view(b, s, k), tail.view(b, s)


def generate_logit_cache(teacher: torch.nn.Module, sequences: torch.Tensor, writer: LogitCacheWriter, k: int,
                         vocab: int, batch_size: int, recorder: RouterRecorder | None = None,
                         source_ids: torch.Tensor | None = None) -> dict[str, Any]:
    """Add the teacher's top-k distribution of every sequence not yet in `writer`'s cache, then finalize it.

    sequences [N, S] token ids; vocab: columns that are real tokens (padding rows past it never count);
    recorder/source_ids [N]: router analytics with each sequence's source index.
    Returns {"seconds", "tokens" (computed in this call), "tokens_per_s", "analytics_sequences"}.
    """
    device = next(teacher.parameters()).device
    # A plain output layer: the decoder's hidden states, then the head and the top-k chunk by chunk, so the
    # [batch, seq, vocab] logits and their float32 copies never exist whole (about 10 bytes per logit otherwise).
    decoder = decoder_module(teacher) if plain_head_problem(teacher) is None else None
    n, seq_len = sequences.shape
    start = writer.num_completed_sequences
    counts_path = writer.root / COUNTS_FILE
    # Saved counts always mean "sequences 0 .. covered-1"; those between them and the cache's end are routed
    # again, so the counts continue exactly from where the cache does.
    if recorder is not None and start:
        covered = _resume_counts(counts_path, recorder, start)
        _route_again(teacher, decoder, sequences, source_ids, recorder, covered, start, batch_size)
    pending: queue.Queue = queue.Queue(maxsize=2)
    failure: list[BaseException] = []

    def write_loop() -> None:
        while True:
            item = pending.get()
            if item is None:
                return
            if failure:
                continue  # drain after an error so the producer never blocks
            try:
                event, ids, top_ids, top_lp, tail, snapshot = item
                if event is not None:
                    event.synchronize()  # waits for this batch's copy only, not for later GPU work
                writer.add(ids, top_ids, top_lp, tail)
                if snapshot is not None and writer.num_completed_sequences == snapshot[1]:
                    save_counts(counts_path, *snapshot)
            except BaseException as e:  # noqa: BLE001 - re-raised in the producer
                failure.append(e)

    thread = threading.Thread(target=write_loop, name="logit-cache-writer", daemon=True)
    thread.start()
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=n, initial=start, desc="teacher logits", unit="seq")
    try:
        for i in range(start, n, batch_size):
            interrupt.check()  # a Ctrl-C swallowed during a batch stops the stage here, the shards kept
            if failure:
                break
            ids = sequences[i:i + batch_size].long()
            if recorder is not None:
                recorder.set_batch(source_ids[i:i + len(ids)], seq_len)
            top_ids, top_lp, tail = _teacher_topk(teacher, decoder, ids.to(device), k, vocab)
            event = None
            if device.type == "cuda":
                host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (top_ids, top_lp, tail)]
                for h, t in zip(host, (top_ids, top_lp, tail)):
                    h.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                top_ids, top_lp, tail = host
            # Saved by the writer once these sequences sit in complete shards.
            snapshot = (recorder.counts.clone(), i + len(ids)) if recorder is not None else None
            pending.put((event, ids, top_ids, top_lp, tail, snapshot))
            tokens += ids.numel()
            bar.update(len(ids))
    finally:
        pending.put(None)
        thread.join()
        bar.close()
    if failure:
        raise failure[0]
    manifest = writer.finalize(n)
    if recorder is not None:
        save_counts(counts_path, recorder.counts, n)
    seconds = time.perf_counter() - t0
    analysed = 0 if recorder is None else n
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds if tokens else 0.0,
            "analytics_sequences": analysed, "manifest": manifest}
