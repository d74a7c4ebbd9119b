"""Stage `data`: the training text tokenised into fixed-length sequences, and the held-out documents apart."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from core.hashing import hash_files
from pipelines.context import RunContext
from resources.config import DataError
from resources.corpus import iter_documents
from teachers.load import load_tokenizer

SEQUENCES_FILE = "sequences.safetensors"


def tokenizer_hash(tok: Any) -> str:
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def data_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Tokenise the training text into fixed-length sequences; keep the held-out documents apart.

    Sources are interleaved document by document (each document capped at two sequences' worth of tokens),
    so even a small token budget sees every kind of text. Writes `sequences.safetensors` (input_ids
    [N, S] int32), `sequence_sources.json` (majority source per sequence) and `heldout.jsonl`.
    """
    d = ctx.cfg.data
    tok = load_tokenizer(ctx.output("teacher", "path"), "teacher", ctx.cfg.teacher_options.trust_remote_code)
    if tok.eos_token_id is None:
        raise DataError("the teacher's tokenizer has no EOS token to separate documents; give the teacher folder a "
                        "tokenizer with an eos_token")
    docs = {s: list(iter_documents(s)) for s in dict.fromkeys(d.sources + [d.heldout_source])}
    available = len(docs[d.heldout_source])
    if d.heldout_docs >= available:
        raise DataError(f"data.heldout_docs={d.heldout_docs} would hold out every document of "
                        f"'{d.heldout_source}', which has {available}; set it below {available}")
    heldout = docs[d.heldout_source][-d.heldout_docs:]
    docs[d.heldout_source] = docs[d.heldout_source][:-d.heldout_docs]
    need = (d.train_tokens // d.seq_len) * d.seq_len
    cap = 2 * d.seq_len
    stream: list[int] = []
    origin: list[int] = []
    names = list(d.sources)
    cursors = {s: 0 for s in names}
    bar = tqdm(total=need, desc="tokenise", unit="tok")
    while len(stream) < need and names:
        for s in list(names):
            if cursors[s] >= len(docs[s]):
                names.remove(s)
                continue
            ids = tok(docs[s][cursors[s]].text, add_special_tokens=False)["input_ids"][:cap] + [tok.eos_token_id]
            cursors[s] += 1
            stream += ids
            origin += [d.sources.index(s)] * len(ids)
            bar.update(len(ids))
            if len(stream) >= need:
                break
    bar.close()
    if len(stream) < need:
        raise DataError(f"the sources {d.sources} hold only {len(stream)} tokens, fewer than data.train_tokens="
                        f"{d.train_tokens}; lower it or add sources")
    seqs = torch.tensor(stream[:need], dtype=torch.int32).view(-1, d.seq_len)
    org = torch.tensor(origin[:need]).view(-1, d.seq_len)
    majority = [d.sources[int(torch.bincount(row).argmax())] for row in org]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": seqs}, str(out / SEQUENCES_FILE))
    (out / "sequence_sources.json").write_text(json.dumps(majority))
    with open(out / "heldout.jsonl", "w") as fh:
        for doc in heldout:
            fh.write(json.dumps({"text": doc.text, "source": doc.source, "id": doc.doc_id}) + "\n")
    per_source = {s: majority.count(s) for s in d.sources}
    return {"outputs": {"sequences": str(out / SEQUENCES_FILE), "heldout": str(out / "heldout.jsonl"),
                        "num_sequences": len(seqs), "tokens": seqs.numel(), "sequences_per_source": per_source,
                        "tokenizer_hash": tokenizer_hash(tok)},
            "output_hash": hash_files(out),
            "metrics": {"data/tokens": seqs.numel(), "data/sequences": len(seqs),
                        "data/heldout_docs": len(heldout)}}
