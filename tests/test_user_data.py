"""The user's own data (`data.files`, `make distill DATA=...`): each format read into documents, each kind of bad
file refused when the config loads with the file and line (or row) named, the data stage on it (held-out split,
chats through the teacher's chat template, too little text), the stage identity following the files' content,
and the whole pipeline on a user's JSONL and chat JSONL file."""
from __future__ import annotations

import inspect
import json
import math
import os
import textwrap
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from pipelines.config import PipelineConfig, load_config
from resources.config import DataError
from resources.user_data import DataFileError, Fields, iter_records, iter_user_documents, source_labels
from tests.mlflow_store import fresh_store


def _docstrings() -> list[tuple[str, str]]:
    """Real English text: the docstrings of `str`'s methods and of a few standard modules' functions, in a
    fixed order (each some 20-300 tokens)."""
    out = []
    for owner in (str, json, textwrap, inspect):
        for name in sorted(dir(owner)):
            doc = inspect.getdoc(getattr(owner, name))
            if not name.startswith("_") and doc and len(doc) > 80:
                out.append((f"{getattr(owner, '__name__', owner)}.{name}", doc))
    return out


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(*files: Path, extra: str = "") -> PipelineConfig:
    """The ci preset on `files` (the SET text `make distill` would pass), one document held out (the small test
    files hold fewer than ci's 4), plus `extra` overrides."""
    return load_config("ci", f"data.files=[{','.join(map(str, files))}] data.heldout_docs=1 {extra}")


# --- each format ---------------------------------------------------------------------------------------------


def test_jsonl_text_records_with_a_named_field(tmp_path: Path) -> None:
    f = tmp_path / "notes.jsonl"
    f.write_text('{"body": "first note", "n": 1}\n\n{"body": "   "}\n{"body": "second note"}\n')
    assert list(iter_records(str(f), fields=Fields(text="body"))) == [("line 1", "first note"),
                                                                      ("line 4", "second note")]
    cfg = _cfg(f, extra="data.text_field=body")
    assert cfg.data.files == [str(f)] and cfg.data.text_field == "body"
    with pytest.raises(ConfigError, match=rf"^{f} line 1: no field 'text' \(text\) or 'messages' \(chat\); "
                                          r"its fields: 'body', 'n'\. Name yours with data.text_field"):
        _cfg(f)


def test_chat_jsonl_is_rendered_by_the_given_template(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    f = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, {"messages": chat[:1]}])
    assert [v for _, v in iter_records(str(f))] == [chat, chat[:1]]
    docs = list(iter_user_documents(str(f), "chat.jsonl", render=lambda m: " | ".join(x["content"] for x in m)))
    assert [(d.source, d.doc_id, d.text) for d in docs] == [("chat.jsonl", "line 1", "Hi? | Hello."),
                                                            ("chat.jsonl", "line 2", "Hi?")]
    with pytest.raises(DataFileError, match=rf"^{f} line 1: a chat \('messages'\), but the teacher's tokenizer has "
                                            "no chat template to render it; give the records a text field"):
        list(iter_user_documents(str(f), "chat.jsonl", render=None))


def test_text_files_split_at_blank_lines_and_folders_are_read_recursively(tmp_path: Path) -> None:
    one = tmp_path / "book.txt"
    one.write_text("First paragraph,\nstill the first.\n\n  \n\nSecond.\n")
    assert list(iter_records(str(one))) == [("line 1", "First paragraph,\nstill the first."), ("line 6", "Second.")]
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("# B\n\nbody of b\n")
    (folder / "sub" / "a.txt").write_text("in a\n")
    (folder / "empty.txt").write_text("")  # an empty file in a folder holds no document, and is no error
    (folder / "skip.py").write_text("print('not text')\n")
    (folder / ".hidden.txt").write_text("hidden\n")
    assert list(iter_records(str(folder))) == [("b.md line 1", "# B"), ("b.md line 3", "body of b"),
                                               ("sub/a.txt line 1", "in a")]
    # data.format=text reads every file of the folder, whatever its suffix.
    assert ("skip.py line 1", "print('not text')") in list(iter_records(str(folder), "text"))
    assert _cfg(one, folder).data.files == [str(one), str(folder)]


def test_parquet_text_and_messages_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["a doc", "", "another doc"]}), texts, row_group_size=2)
    assert list(iter_records(str(texts))) == [("row 0", "a doc"), ("row 2", "another doc")]
    chats = tmp_path / "chats.parquet"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({"messages": [chat, chat[:1]]}), chats)
    assert list(iter_records(str(chats))) == [("row 0", chat), ("row 1", chat[:1])]
    _cfg(texts, chats)


def test_datasets_folders_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_records(str(tmp_path / "ds"))) == [("row 0", "one"), ("row 1", "two")]
    split = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["t"]}),
                                  "train": datasets.Dataset.from_dict({"text": ["x", "y", "z"]})})
    split.save_to_disk(str(tmp_path / "dd"))
    assert [v for _, v in iter_records(str(tmp_path / "dd"))] == ["x", "y", "z"]  # the train split
    datasets.DatasetDict({"only": datasets.Dataset.from_dict({"text": ["o"]})}).save_to_disk(str(tmp_path / "one"))
    assert [v for _, v in iter_records(str(tmp_path / "one"))] == ["o"]
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["1"]}),
                          "b": datasets.Dataset.from_dict({"text": ["2"]})}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ConfigError, match=rf"^data.files: {tmp_path / 'two'} holds the splits a, b and no 'train'"):
        _cfg(tmp_path / "two")
    _cfg(tmp_path / "ds", tmp_path / "dd")


def test_source_labels_are_file_names_unless_two_share_one() -> None:
    assert source_labels(["/x/a.jsonl", "/y/b.jsonl"]) == ["a.jsonl", "b.jsonl"]
    assert source_labels(["/x/a.jsonl", "/y/a.jsonl", "c"]) == ["/x/a.jsonl", "/y/a.jsonl", "c"]


# --- bad data, refused when the config loads -----------------------------------------------------------------

CHAT_OK = [{"role": "user", "content": "q"}]
BAD_JSONL = [
    ("not_json", ['{"text": "fine"}', '{"text": "fine"}', '{"text": "broken"'],
     r"line 3: not JSON \(Expecting ',' delimiter at column 18\); every line must be one JSON object"),
    ("array", ['[', '  {"text": "a"}', ']'], r"line 1: not JSON .*\(a JSON array: write one object per line instead\)"),
    ("one_line_array", ['[{"text": "a"}]'], r"line 1: a list, not a JSON object; write each record as"),
    ("not_object", ['{"text": "a"}', '"just a string"'], r"line 2: a string, not a JSON object"),
    ("missing_field", ['{"text": "a"}', '{"text": "b"}', '{"txt": "c"}'],
     r"line 3: no field 'text' \(the file's first record has one, so every record needs it\)"),
    ("text_not_string", ['{"text": "a"}', '{"text": ["b"]}'], r"line 2: field 'text' is a list, not a string"),
    ("text_null", ['{"text": null}'], r"line 1: field 'text' is null, not a string"),
    ("messages_not_list", [json.dumps({"messages": CHAT_OK}), '{"messages": "hello"}'],
     r"line 2: field 'messages' is a string, not a list of messages"),
    ("messages_empty", ['{"messages": []}'], r"line 1: field 'messages' is an empty list, not a list of messages"),
    ("message_no_content", [json.dumps({"messages": CHAT_OK}), json.dumps({"messages": [{"role": "user"}]})],
     r"line 2: message 0 of field 'messages' is not a \{role, content\} pair of strings \(its 'content' is missing\)"),
    ("message_content_number", [json.dumps({"messages": CHAT_OK + [{"role": "assistant", "content": 7}]})],
     r"line 1: message 1 of field 'messages' is not a \{role, content\} pair of strings \(its 'content' is a number\)"),
    ("message_not_object", [json.dumps({"messages": ["hi"]})],
     r"line 1: message 0 of field 'messages' is not a \{role, content\} pair of strings \(it is a string\)"),
]


@pytest.mark.parametrize("name,lines,message", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_a_bad_jsonl_line_is_named_with_its_file_and_line(tmp_path: Path, name: str, lines: list[str],
                                                          message: str) -> None:
    f = tmp_path / f"{name}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFileError, match=f"^{f} {message}") as e:
        _cfg(f)
    assert e.value.kind == "data" and "\n" not in str(e.value)


def test_missing_empty_and_unreadable_files(tmp_path: Path) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match=rf"^data.files: {tmp_path / 'nowhere.jsonl'} does not exist"):
        _cfg(good, tmp_path / "nowhere.jsonl")
    for name in ("empty.jsonl", "empty.txt", "empty.parquet"):
        (tmp_path / name).write_text("")
        with pytest.raises(ConfigError, match=rf"^data.files: {tmp_path / name} is empty"):
            _cfg(tmp_path / name)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match=rf"^data.files: {tmp_path / 'blank.jsonl'} is empty"):
        _cfg(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9\n\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'latin1.txt'} line 1: not UTF-8 text"):
        _cfg(tmp_path / "latin1.txt")
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    with pytest.raises(ConfigError, match=rf"^data.files: {tmp_path / 'fake.parquet'} is not a Parquet file"):
        _cfg(tmp_path / "fake.parquet")
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(ConfigError, match=r"cannot tell the format of .*data.csv from its suffix '.csv'"):
        _cfg(tmp_path / "data.csv")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match=rf"^data.files: the folder {tmp_path / 'nothing'} holds no \*.txt or \*.md"):
        _cfg(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="names .*good.jsonl more than once"):
        _cfg(good, good)
    with pytest.raises(ConfigError, match="data.format 'csv' is not a format; choose one of auto, jsonl"):
        _cfg(good, extra="data.format=csv")


def test_a_bad_parquet_row_is_named_with_its_file_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", None, "e"]}), f, row_group_size=2)
    with pytest.raises(ConfigError, match=rf"^{f} row 3: field 'text' is null, not a string"):
        _cfg(f)
    g = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), g)
    with pytest.raises(ConfigError, match=rf"^{g} row 0: field 'text' is a number, not a string"):
        _cfg(g)
    h = tmp_path / "m.parquet"
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "q"}], [{"role": "user", "content": None}]]}), h)
    with pytest.raises(ConfigError, match=rf"^{h} row 1: message 0 of field 'messages' is not a \{{role, content\}}"):
        _cfg(h)
    k = tmp_path / "k.parquet"
    pq.write_table(pa.table({"body": ["x"]}), k)
    with pytest.raises(ConfigError, match=rf"^{k}: no field 'text' \(text\) or 'messages' \(chat\); its fields: "
                                          "'body'"):
        _cfg(k)


def test_the_entry_point_prints_one_line_and_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.run import main

    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n{"text": 2}\n')
    assert main(["--preset", "ci", "--set", f"data.files=[{f}]", "--runs-dir", str(tmp_path / "runs")]) == 3
    err = capsys.readouterr().err.strip()
    assert err == (f"error (data): {f} line 2: field 'text' is a number, not a string; give every record its text "
                   "as a string")


# --- the data stage on the user's files ----------------------------------------------------------------------


def _data_stage(cfg: PipelineConfig, teacher: Path, out: Path) -> dict:
    from pipelines.context import RunContext
    from pipelines.stages.data import data_stage

    ctx = RunContext(cfg=cfg, run_dir=out.parent, device=torch.device("cpu"),
                     records={"teacher": {"outputs": {"path": str(teacher)}, "output_hash": "t"}})
    return data_stage(ctx, out)


def test_data_stage_holds_out_the_last_documents_and_renders_chats(tmp_path: Path,
                                                                  tiny_moe_dir: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    docs = _docstrings()
    a = _write_jsonl(tmp_path / "a.jsonl", [{"text": d} for _, d in docs[:30]])
    chat = [{"messages": [{"role": "user", "content": f"What does {n} do?"}, {"role": "assistant", "content": d}]}
            for n, d in docs[30:33]]
    b = _write_jsonl(tmp_path / "b.jsonl", chat)
    cfg = _cfg(a, b, extra="data.heldout_docs=4 data.train_tokens=512")
    rec = _data_stage(cfg, tiny_moe_dir, tmp_path / "run" / "data")
    out = rec["outputs"]
    assert out["sources"] == ["a.jsonl", "b.jsonl"] and out["tokens"] == 512
    seqs = load_file(out["sequences"])["input_ids"]
    assert seqs.shape == (512 // 64, 64)
    assert set(json.loads((tmp_path / "run" / "data" / "sequence_sources.json").read_text())) <= {"a.jsonl", "b.jsonl"}
    held = [json.loads(line) for line in Path(out["heldout"]).read_text().splitlines()]
    # The last 4 documents in the order of data.files: a's last one, then b's three chats.
    assert [(h["source"], h["id"]) for h in held] == [("a.jsonl", "line 30"), ("b.jsonl", "line 1"),
                                                      ("b.jsonl", "line 2"), ("b.jsonl", "line 3")]
    assert held[0]["text"] == docs[29][1]
    tok = AutoTokenizer.from_pretrained(tiny_moe_dir)
    assert held[1]["text"] == tok.apply_chat_template(chat[0]["messages"], tokenize=False)
    assert held[1]["text"].startswith("<|im_start|>") and f"What does {docs[30][0]} do?" in held[1]["text"]
    # Training reads a's other 29 documents whole (b's are all held out): a's first document, then the EOS.
    first = tok(docs[0][1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert seqs.flatten()[:len(first)].tolist() == first


def test_data_stage_too_little_text_is_a_data_error(tmp_path: Path, tiny_moe_dir: Path) -> None:
    f = _write_jsonl(tmp_path / "small.jsonl", [{"text": d} for _, d in _docstrings()[:6]])
    with pytest.raises(DataError, match=r"^the files in data.files hold only \d+ tokens .*fewer than "
                                        r"data.train_tokens=4096; lower it or add text"):
        _data_stage(_cfg(f, extra="data.train_tokens=4096 data.heldout_docs=2"), tiny_moe_dir, tmp_path / "d")
    # Holding out every document is found when the config loads, from the count the record check makes.
    with pytest.raises(ConfigError, match=r"^data.heldout_docs=6 would hold out every document of data.files, "
                                          r"which hold 6: add documents \(at least 7\)"):
        _cfg(f, extra="data.heldout_docs=6")


def test_data_stage_refuses_chats_for_a_tokenizer_without_a_chat_template(tmp_path: Path,
                                                                          tiny_moe_dir: Path) -> None:
    import shutil

    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_moe_dir, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.chat_template = None
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        (teacher / name).unlink(missing_ok=True)
    tok.save_pretrained(teacher)
    assert AutoTokenizer.from_pretrained(teacher).chat_template is None
    f = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": d}]}
                                               for _, d in _docstrings()[:8]])
    with pytest.raises(DataFileError, match=rf"^{f} line 1: a chat \('messages'\), but the teacher's tokenizer has "
                                            r"no chat template to render it; give the records a text field \('text'"):
        _data_stage(_cfg(f, extra="data.heldout_docs=2"), teacher, tmp_path / "d")


# --- identity ------------------------------------------------------------------------------------------------


def test_editing_a_data_file_changes_the_data_stage_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.stage_runner import input_hash
    from pipelines.stage_table import BY_NAME

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    f = _write_jsonl(tmp_path / "a.jsonl", [{"text": "the cat sat"}, {"text": "on the mat"}])
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "n.md").write_text("a note\n")
    stage, records = BY_NAME["data"], {"teacher": {"output_hash": "t"}}
    cfg = _cfg(f, folder)
    first = input_hash(stage, cfg, records, "cpu")
    assert input_hash(stage, _cfg(f, folder), records, "cpu") == first  # nothing changed: the same identity
    # An editor's save: a new file of the same size renamed over the old one.
    tmp = tmp_path / "edit.tmp"
    _write_jsonl(tmp, [{"text": "the dog sat"}, {"text": "on the mat"}])
    os.replace(tmp, f)
    edited = input_hash(stage, cfg, records, "cpu")
    assert edited != first
    (folder / "skip.py").write_text("x = 1\n")  # not read (the folder's *.txt and *.md are): the same identity
    assert input_hash(stage, cfg, records, "cpu") == edited
    (folder / "sub").mkdir()
    (folder / "sub" / "more.txt").write_text("more text\n")
    assert input_hash(stage, cfg, records, "cpu") != edited
    # The built-in corpora have no external files.
    assert stage.external(load_config("ci")) == ()


# --- the whole pipeline --------------------------------------------------------------------------------------


def _run_ci_on(data: Path, tiny_moe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from kernels import kd_loss
    from pipelines.run import run_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh_store(tmp_path))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kd_loss, "TRITON_ON_CPU", False)  # as in test_pipeline_e2e: PyTorch row ops on CPU
    cfg = load_config("ci", f"data.files=[{data}] teacher_tune.steps=0 baseline.enabled=false "
                      "latency.enabled=false eval.limit=2", teacher=str(tiny_moe_dir), student="derived",
                      run_name="user-data")
    assert run_pipeline(cfg, tmp_path / "runs") == 0
    report = json.loads((tmp_path / "runs" / "user-data" / "report.json").read_text())
    assert report["cache"]["tokens"] == 1024
    assert math.isfinite(report["quality"]["heldout_text/bits_per_byte"]["student"])
    assert report["router"]["sources"] == [data.name]
    return report


@pytest.mark.slow
def test_pipeline_on_a_user_jsonl_file(tmp_path: Path, tiny_moe_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docstrings()
    f = _write_jsonl(tmp_path / "docstrings.jsonl", [{"text": d, "name": n} for n, d in docs])
    _run_ci_on(f, tiny_moe_dir, tmp_path, monkeypatch)
    held = [json.loads(line) for line in (tmp_path / "runs" / "user-data" / "data" / "heldout.jsonl").open()]
    assert [h["text"] for h in held] == [d.strip() for _, d in docs[-4:]]  # as read: surrounding blanks dropped


@pytest.mark.slow
def test_pipeline_on_a_user_chat_jsonl_file(tmp_path: Path, tiny_moe_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    f = _write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"What does {n} do?"}, {"role": "assistant", "content": d}]}
        for n, d in _docstrings()])
    _run_ci_on(f, tiny_moe_dir, tmp_path, monkeypatch)
    held = [json.loads(line) for line in (tmp_path / "runs" / "user-data" / "data" / "heldout.jsonl").open()]
    assert len(held) == 4 and all(h["text"].startswith("<|im_start|>") for h in held)


def test_data_option_sets_data_files_and_conflicts_with_set(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from pipelines.config import load_config
    from pipelines.run import with_data

    f = tmp_path / "my notes, v2.jsonl"  # a space and a comma: one path all the same
    f.write_text("\n".join('{"text": "line %d of my own text, long enough to matter."}' % i for i in range(40)))
    cfg = load_config("ci", with_data("eval.limit=3", str(f)))
    assert cfg.data.files == [str(f)] and cfg.eval.limit == 3
    with pytest.raises(ConfigError, match="not both"):
        with_data("data.files=[other.jsonl]", str(f))
