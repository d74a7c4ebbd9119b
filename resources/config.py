"""The `data` config section: which real text the teacher labels and the student trains on, and what is held
out. Defaults are the default preset's; `validate` holds the section's rules, the only place they are checked."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import require


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
        require(self.seq_len >= 8, "data.seq_len must be >= 8")
        require(self.train_tokens >= self.seq_len, "data.train_tokens must be >= data.seq_len")
