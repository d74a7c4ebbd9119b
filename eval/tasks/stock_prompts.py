"""Prompt helpers that stock lm-eval tasks keep in Python files.

Stock YAMLs refer to ``!function utils.process_docs`` and the like, which
lm-eval resolves next to the YAML; our YAMLs live elsewhere, so the same
behaviour is implemented here.  It must stay byte-for-byte equivalent to
lm-eval 0.4.13's ``hellaswag/utils.py`` and
``winogrande/preprocess_winogrande.py`` so that scores are comparable with
published lm-eval numbers.
"""

from __future__ import annotations

import re
from typing import Any

import datasets

# ----------------------------------------------------------------- hellaswag

def hellaswag_clean(text: str) -> str:
    """Tidy a HellaSwag string as lm-eval does.

    The WikiHow part of HellaSwag carries ``[title]``-style markers: the
    title marker becomes a sentence break and other bracketed markers go.
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# lm-eval calls process_docs on every access to the split (four times per
# run); mapping 10k rows takes ~3 s each on 2 cores, so results are kept per
# input fingerprint (the same in-memory dataset object on each call).
_PROCESSED: dict[str, datasets.Dataset] = {}


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add ``query``, ``choices`` and ``gold`` the way stock hellaswag does."""
    key = dataset._fingerprint
    if key not in _PROCESSED:
        _PROCESSED.clear()  # keep at most one split alive
        _PROCESSED[key] = _hellaswag_map(dataset)
    return _PROCESSED[key]


def _hellaswag_map(dataset: datasets.Dataset) -> datasets.Dataset:
    def one(doc: dict[str, Any]) -> dict[str, Any]:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": hellaswag_clean(doc["activity_label"] + ": " + context),
            "choices": [hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


# ---------------------------------------------------------------- winogrande
# WinoGrande is scored by "partial evaluation": the two candidate contexts
# (sentence up to the blank, filled with each option) are compared on the
# likelihood of the shared remainder.  lm-eval expresses that by swapping
# the roles: doc_to_text gives the gold index, doc_to_choice the contexts.

def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Index of the correct option (answer "1" -> 0, "2" -> 1)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank: the continuation that is scored."""
    blank = doc["sentence"].index("_") + 1
    return doc["sentence"][blank:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
