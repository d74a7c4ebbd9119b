"""The `data` config section: which real text the teacher labels and the student trains on, and what is held
out. Defaults are the default preset's; `validate` holds the section's rules, the only place they are checked."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import UserError, require
from resources.corpus import CORPUS_SOURCES
from resources.user_data import FORMATS, Fields, check_files


class DataError(UserError, ValueError):
    """The configured text cannot give what the run needs (too few tokens or documents)."""

    kind = "data"


@dataclass
class DataConfig:
    # The built-in corpora (resources/corpus.py), interleaved document by document; not used when `files` is set.
    sources: list[str] = field(default_factory=lambda: [
        "wiki", "news", "sotu", "moby_dick", "python_docs", "gcide", "brown"])
    seq_len: int = 256  # tokens per training sequence
    train_tokens: int = 16384  # tokens of text the teacher labels and the student trains on
    heldout_source: str = "wiki"  # the last documents of this source are kept out of training
    heldout_docs: int = 40  # how many of them (perplexity on held-out text)
    seed: int = 0
    # The user's own text instead of the built-in sources (`make distill DATA=...`): JSONL, Parquet, text files
    # or folders, datasets folders (resources/user_data.py). When set, `sources` and `heldout_source` are not
    # used, and the last `heldout_docs` documents of these files, in this order, are held out.
    files: list[str] = field(default_factory=list)
    text_field: str = "text"  # the JSONL field / Parquet or datasets column holding a document's text
    # The field / column holding a chat instead, [{"role": ..., "content": ...}, ...], rendered as text with the
    # teacher's chat template; a file's first record says which of the two fields the file uses.
    messages_field: str = "messages"
    # How to read each entry of `files`: auto (by suffix: .jsonl/.ndjson/.json, .parquet, .txt/.md; a folder
    # saved by `datasets`' save_to_disk, else a folder of *.txt/*.md), or jsonl, parquet, datasets, text.
    format: str = "auto"

    def record_fields(self) -> Fields:
        """The record fields that hold a document (`text_field`, `messages_field`), as the readers take them."""
        return Fields(text=self.text_field, messages=self.messages_field)

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
        require(self.format in FORMATS, f"data.format {self.format!r} is not a format; choose one of "
                f"{', '.join(FORMATS)}")
        require(bool(self.text_field) and bool(self.messages_field),
                "data.text_field and data.messages_field must name a field")
        # Every record of the user's files is checked now (one streaming pass), not minutes into the run, and
        # the held-out split against their document count (the pass counts them anyway).
        total = sum(check_files(self.files, self.format, self.record_fields()))
        require(not self.files or self.heldout_docs < total,
                f"data.heldout_docs={self.heldout_docs} would hold out every document of data.files, which hold "
                f"{total}: add documents (at least {self.heldout_docs + 1}) or lower data.heldout_docs (>= 1)")
