"""Stage `data`: the training text tokenised into fixed-length sequences, and the held-out documents apart."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from core.hashing import hash_files
from pipelines.context import RunContext
from resources.config import DataConfig, DataError
from resources.corpus import Document, iter_documents
from resources.user_data import ChatRenderer, check_files, iter_user_documents, source_labels
from teachers.load import load_tokenizer

SEQUENCES_FILE = "sequences.safetensors"


def tokenizer_hash(tok: Any) -> str:
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


def data_stage(ctx: RunContext, out: Path) -> dict[str, Any]:
    """Tokenise the training text into fixed-length sequences; keep the held-out documents apart.

    The text is the built-in corpora (`data.sources`) or the user's files (`data.files`, each file one source).
    Sources are interleaved document by document, so even a small token budget sees every kind of text; a
    built-in document is capped at two sequences' worth of tokens for the same reason, a user's is used whole.
    Writes `sequences.safetensors` (input_ids [N, S] int32), `sequence_sources.json` (majority source per
    sequence, a name of the record's `sources` output) and `heldout.jsonl`.
    """
    d = ctx.cfg.data
    tok = load_tokenizer(ctx.output("teacher", "path"), "teacher", ctx.cfg.teacher_options.trust_remote_code)
    if tok.eos_token_id is None:
        raise DataError("the teacher's tokenizer has no EOS token to separate documents; give the teacher folder a "
                        "tokenizer with an eos_token")
    if d.files:
        sources, streams, heldout = _user_text(d, _chat_renderer(tok))
        cap: int | None = None
    else:
        sources, streams, heldout = _builtin_text(d)
        cap = 2 * d.seq_len
    need = (d.train_tokens // d.seq_len) * d.seq_len
    index = {s: i for i, s in enumerate(sources)}
    stream: list[int] = []
    origin: list[int] = []
    names = list(sources)
    docs = {s: iter(streams[s]) for s in names}
    bar = tqdm(total=need, desc="tokenise", unit="tok")
    while len(stream) < need and names:
        for s in list(names):
            doc = next(docs[s], None)
            if doc is None:
                names.remove(s)
                continue
            ids = tok(doc.text, add_special_tokens=False)["input_ids"][:cap] + [tok.eos_token_id]
            stream += ids
            origin += [index[s]] * len(ids)
            bar.update(len(ids))
            if len(stream) >= need:
                break
    bar.close()
    if len(stream) < need:
        what = "the files in data.files hold" if d.files else f"the sources {d.sources} hold"
        raise DataError(f"{what} only {len(stream)} tokens (the teacher's tokenizer, held-out documents apart), "
                        f"fewer than data.train_tokens={d.train_tokens}; lower it or add text")
    seqs = torch.tensor(stream[:need], dtype=torch.int32).view(-1, d.seq_len)
    org = torch.tensor(origin[:need]).view(-1, d.seq_len)
    majority = [sources[int(torch.bincount(row).argmax())] for row in org]
    out.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": seqs}, str(out / SEQUENCES_FILE))
    (out / "sequence_sources.json").write_text(json.dumps(majority))
    with open(out / "heldout.jsonl", "w") as fh:
        for doc in heldout:
            fh.write(json.dumps({"text": doc.text, "source": doc.source, "id": doc.doc_id}) + "\n")
    per_source = {s: majority.count(s) for s in sources}
    return {"outputs": {"sequences": str(out / SEQUENCES_FILE), "heldout": str(out / "heldout.jsonl"),
                        "num_sequences": len(seqs), "tokens": seqs.numel(), "sources": sources,
                        "sequences_per_source": per_source, "tokenizer_hash": tokenizer_hash(tok)},
            "output_hash": hash_files(out),
            "metrics": {"data/tokens": seqs.numel(), "data/sequences": len(seqs),
                        "data/heldout_docs": len(heldout)}}


Texts = tuple[list[str], dict[str, Iterable[Document]], list[Document]]  # sources, training docs by source, held out


def _builtin_text(d: DataConfig) -> Texts:
    """The built-in corpora: the last `heldout_docs` documents of `heldout_source` are held out."""
    docs = {s: list(iter_documents(s)) for s in dict.fromkeys(d.sources + [d.heldout_source])}
    available = len(docs[d.heldout_source])
    if d.heldout_docs >= available:
        raise DataError(f"data.heldout_docs={d.heldout_docs} would hold out every document of "
                        f"'{d.heldout_source}', which has {available}; set it between 1 and {available - 1}")
    heldout = docs[d.heldout_source][-d.heldout_docs:]
    docs[d.heldout_source] = docs[d.heldout_source][:-d.heldout_docs]
    return list(d.sources), {s: docs[s] for s in d.sources}, heldout


def _user_text(d: DataConfig, render: ChatRenderer | None) -> Texts:
    """The user's files, each a source named by `source_labels`: the last `heldout_docs` documents of all of them,
    in the order of `data.files`, are held out. Documents are read as they are needed, never all at once."""
    fields = d.record_fields()
    sources = source_labels(d.files)
    counts = check_files(d.files, d.format, fields)  # checked when the config loaded; here the counts
    total = sum(counts)
    if d.heldout_docs >= total:
        raise DataError(f"data.heldout_docs={d.heldout_docs} would hold out every document of data.files, which "
                        f"hold {total}: add documents (at least {d.heldout_docs + 1}) or lower data.heldout_docs (>= 1)")
    train: list[int] = []  # documents of each entry that are trained on: all but its share of the last ones
    left = d.heldout_docs
    for c in reversed(counts):
        train.insert(0, c - min(c, left))
        left -= min(c, left)

    def read(i: int) -> Iterator[Document]:
        return iter_user_documents(d.files[i], sources[i], d.format, fields, render)

    streams = {s: islice(read(i), train[i]) for i, s in enumerate(sources)}
    heldout = [doc for i, c in enumerate(counts) if train[i] < c for doc in islice(read(i), train[i], None)]
    return sources, streams, heldout


def _chat_renderer(tok: Any) -> ChatRenderer | None:
    """The teacher's chat template as text (what it would be fed in a chat), or None if it has none."""
    if not getattr(tok, "chat_template", None):
        return None
    return lambda messages: tok.apply_chat_template(messages, tokenize=False)
