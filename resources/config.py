"""The `data` config section: which real text the teacher labels and the student trains on, and what is held
out. Defaults are the default preset's; `validate` holds the section's rules, the only place they are checked."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import UserError, require
from resources.corpus import CORPUS_SOURCES


class DataError(UserError, ValueError):
    """The configured text cannot give what the run needs (too few tokens or documents)."""

    kind = "data"


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: [
        "wiki", "news", "sotu", "moby_dick", "python_docs", "gcide", "brown"])
    seq_len: int = 256  # tokens per training sequence
    train_tokens: int = 16384  # tokens of text the teacher labels and the student trains on
    heldout_source: str = "wiki"  # the last documents of this source are kept out of training
    heldout_docs: int = 40  # how many of them (perplexity on held-out text)
    seed: int = 0

    def validate(self) -> None:
        known = ", ".join(CORPUS_SOURCES)
        require(self.seq_len >= 8, "data.seq_len must be >= 8")
        require(self.train_tokens >= self.seq_len, "data.train_tokens must be >= data.seq_len")
        require(bool(self.sources), f"data.sources is empty: name at least one of {known}")
        unknown = [s for s in self.sources if s not in CORPUS_SOURCES]
        require(not unknown, f"data.sources: unknown source {', '.join(map(repr, unknown))}; available: {known}")
        require(len(set(self.sources)) == len(self.sources), "data.sources names a source twice")
        require(self.heldout_source in CORPUS_SOURCES,
                f"data.heldout_source {self.heldout_source!r} is not a source; available: {known}")
        # The report's held-out bits per byte (the one quality number that needs no benchmark) reads them.
        require(self.heldout_docs >= 1, "data.heldout_docs must be >= 1: the evaluation measures bits per byte "
                "on those held-out documents")
