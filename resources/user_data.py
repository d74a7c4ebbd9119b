"""The user's own text (`data.files`): reading and checking it into documents, as `resources.corpus` does for
the built-in corpora.

An entry of `data.files` is one of (`data.format=auto` tells them apart by name and content):

    JSONL (.jsonl, .ndjson, .json)   one JSON object per line: a text field, or a chat (a list of messages)
    Parquet (.parquet)               a text column or a messages column, read in batches
    a `datasets` folder              saved by Dataset.save_to_disk or DatasetDict.save_to_disk (its `train`
                                     split, or its only split); a text column or a messages column
    plain text (.txt, .md, or any    documents separated by one or more blank lines (a paragraph each); a
    file with data.format=text)      folder is read recursively, its *.txt and *.md files in name order

A record is plain text when it has `data.text_field` (default `text`), else a chat when it has
`data.messages_field` (default `messages`): a list of {"role": str, "content": str}. Each file is one or the
other, decided by its first record; every later record must have the same field. Chats are rendered into text
by the caller (the data stage, with the teacher's chat template).

Every problem is one line naming the file and the JSONL line (counted from 1) or the Parquet / datasets row
(counted from 0), found by one streaming pass (`count_documents`): memory stays flat for large files, and a
file checked once in a process is not read again until it changes.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from resources.corpus import Document

FORMATS: tuple[str, ...] = ("auto", "jsonl", "parquet", "datasets", "text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".md")
_BATCH_ROWS = 1024  # Parquet / datasets rows per batch: memory stays flat however large the file

Messages = list[dict[str, str]]
ChatRenderer = Callable[[Messages], str]


class DataFileError(ConfigError):
    """A file of `data.files` that cannot be read as documents; the message names the file, line or row, and
    what to change."""

    kind = "data"


@dataclass(frozen=True)
class Fields:
    """Which record field holds plain text and which holds a chat (`data.text_field`, `data.messages_field`)."""

    text: str = "text"
    messages: str = "messages"


def resolve(entry: str) -> Path:
    """The path an entry of `data.files` names (`~` expanded; relative to the current directory)."""
    return Path(entry).expanduser().absolute()


def source_labels(files: list[str]) -> list[str]:
    """One label per entry, the name of its text source (router analytics by source, `heldout.jsonl`): the
    file or folder name, or the entry as written where two entries share a name."""
    names = [resolve(e).name for e in files]
    return [n if names.count(n) == 1 else e for n, e in zip(names, files)]


def entry_format(entry: str, fmt: str = "auto") -> str:
    """The format an entry is read as: `fmt`, or with `auto` the one its name or folder layout says.

    Raises:
        DataFileError: the path is missing, or `auto` cannot tell (an unknown suffix).
    """
    path = resolve(entry)
    if not path.exists():
        raise DataFileError(f"data.files: {path} does not exist; give the path of a JSONL, Parquet or text file, "
                            "or of a folder (text files, or a dataset saved with save_to_disk)")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        return "datasets" if saved else "text"
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise DataFileError(f"data.files: cannot tell the format of {path} from its suffix {suffix!r}; name it "
                        f"*.jsonl, *.parquet, *.txt or *.md, or set data.format to one of {', '.join(FORMATS[1:])}")


def entry_files(entry: str, fmt: str = "auto") -> list[Path]:
    """The files an entry reads, in reading order (a folder of text: its *.txt and *.md files, recursively, by
    name; with data.format=text every file; a datasets folder: all of its files)."""
    path = resolve(entry)
    kind = entry_format(entry, fmt)
    if not path.is_dir():
        return [path]
    visible = sorted(f for f in path.rglob("*")
                     if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    if kind == "text" and fmt == "auto":
        return [f for f in visible if f.suffix.lower() in TEXT_SUFFIXES]
    return visible


def _type_name(value: Any) -> str:
    """How a JSON value's type reads in a message: "a number", "an object", "null"."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _check_value(value: Any, field: str, chat: bool, where: str) -> str | Messages:
    """`value` as a text (a string) or a chat (a list of {role, content} strings), else DataFileError at `where`."""
    if not chat:
        if not isinstance(value, str):
            raise DataFileError(f"{where}: field {field!r} is {_type_name(value)}, not a string; give every "
                                "record its text as a string")
        return value
    if not isinstance(value, list) or not value:
        raise DataFileError(f"{where}: field {field!r} is {_type_name(value) if value != [] else 'an empty list'}, "
                            "not a list of messages; give it as [{\"role\": \"user\", \"content\": \"...\"}, ...]")
    for i, m in enumerate(value):
        bad = ("it is " + _type_name(m) if not isinstance(m, dict) else
               next((f"its {k!r} is {_type_name(m[k]) if k in m else 'missing'}" for k in ("role", "content")
                     if not isinstance(m.get(k), str)), None))
        if bad:
            raise DataFileError(f"{where}: message {i} of field {field!r} is not a {{role, content}} pair of "
                                f"strings ({bad}); give each message as {{\"role\": \"...\", \"content\": \"...\"}}")
    return value


def _pick_field(keys: Any, fields: Fields, where: str) -> tuple[str, bool]:
    """The field of a file's first record (or its columns) that holds its documents, and whether they are chats."""
    if fields.text in keys:
        return fields.text, False
    if fields.messages in keys:
        return fields.messages, True
    found = ", ".join(map(repr, list(keys)[:10])) or "none"
    raise DataFileError(f"{where}: no field {fields.text!r} (text) or {fields.messages!r} (chat); its fields: "
                        f"{found}. Name yours with data.text_field=<field> or data.messages_field=<field>")


def _jsonl_records(path: Path, fields: Fields) -> Iterator[tuple[str, str | Messages]]:
    field: str | None = None
    chat = False
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{where}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
            if not line.strip():
                continue  # blank lines (a trailing newline) hold no record
            try:
                record = json.loads(line.rstrip("\r\n"))  # the newline apart, a column is one of this line
            except json.JSONDecodeError as e:
                hint = (" (a JSON array: write one object per line instead)" if number == 1 and
                        line.lstrip().startswith("[") else "")
                raise DataFileError(f"{where}: not JSON ({e.msg} at column {e.colno}){hint}; every line must be "
                                    "one JSON object") from None
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: {_type_name(record)}, not a JSON object; write each record as "
                                    f"{{\"{fields.text}\": \"...\"}} or {{\"{fields.messages}\": [...]}}")
            if field is None:
                field, chat = _pick_field(record, fields, where)
            elif field not in record:
                raise DataFileError(f"{where}: no field {field!r} (the file's first record has one, so every record "
                                    "needs it)")
            yield f"line {number}", _check_value(record[field], field, chat, where)
    if field is None:
        raise DataFileError(f"data.files: {path} is empty; give it one JSON object per line")


def _table_records(batches: Iterator[Any], columns: list[str], where: str,
                   fields: Fields) -> Iterator[tuple[str, str | Messages]]:
    """Rows of Arrow record batches (Parquet, datasets): the text or messages column, checked row by row."""
    field, chat = _pick_field(columns, fields, where)
    row = 0
    for batch in batches:
        for value in batch.column(batch.schema.get_field_index(field)).to_pylist():
            yield f"row {row}", _check_value(value, field, chat, f"{where} row {row}")
            row += 1
    if row == 0:
        raise DataFileError(f"data.files: {where} has no rows; give it at least one {fields.text!r} or "
                            f"{fields.messages!r} row")


def _parquet_records(path: Path, fields: Fields) -> Iterator[tuple[str, str | Messages]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise DataFileError(f"data.files: {path} is not a Parquet file ({str(e).splitlines()[0]})") from None
    columns = pf.schema_arrow.names
    field, _ = _pick_field(columns, fields, str(path))
    yield from _table_records(pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field]), columns, str(path), fields)


def _datasets_records(path: Path, fields: Fields) -> Iterator[tuple[str, str | Messages]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a folder it did not write
        raise DataFileError(f"data.files: {path} is not a dataset saved with save_to_disk "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" not in ds and len(splits) != 1:
            raise DataFileError(f"data.files: {path} holds the splits {', '.join(splits)} and no 'train'; save the "
                                "split to train on alone (dataset_dict['<split>'].save_to_disk(...))")
        split = "train" if "train" in ds else splits[0]
        ds, where = ds[split], f"{path} (split {split})"
    field, _ = _pick_field(ds.column_names, fields, where)
    table = ds.select_columns([field]).with_format("arrow")
    yield from _table_records(table.iter(batch_size=_BATCH_ROWS), ds.column_names, where, fields)


def _paragraphs(path: Path, label: str) -> Iterator[tuple[str, str]]:
    """A text file's documents: runs of non-blank lines, separated by one or more blank lines."""
    lines: list[str] = []
    start = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path} line {number}: not UTF-8 text (byte {e.start}); save the file as "
                                    "UTF-8") from None
            if line.strip():
                if not lines:
                    start = number
                lines.append(line.rstrip("\r\n"))
            elif lines:
                yield f"{label}line {start}", "\n".join(lines)
                lines = []
    if lines:
        yield f"{label}line {start}", "\n".join(lines)


def _text_records(entry: str, fmt: str) -> Iterator[tuple[str, str | Messages]]:
    root = resolve(entry)
    files = entry_files(entry, fmt)
    if root.is_dir() and not files:
        raise DataFileError(f"data.files: the folder {root} holds no *.txt or *.md file; put the text there, or set "
                            "data.format=text to read every file in it")
    found = False
    for f in files:
        label = f"{f.relative_to(root).as_posix()} " if root.is_dir() else ""
        for doc_id, text in _paragraphs(f, label):
            found = True
            yield doc_id, text
        if not root.is_dir() and not found:
            raise DataFileError(f"data.files: {f} is empty; give it text (documents separated by blank lines)")
    if not found:
        raise DataFileError(f"data.files: the text files under {root} are all empty; give them text")


def iter_records(entry: str, fmt: str = "auto", fields: Fields = Fields()) -> Iterator[tuple[str, str | Messages]]:
    """Yield `(doc_id, text or messages)` for each document of one `data.files` entry, in file order, checking
    each record on the way (a bad one raises DataFileError naming the file and line or row).

    `doc_id` says where the document starts ("line 7", "row 3", "notes/a.md line 12")."""
    kind = entry_format(entry, fmt)
    path = resolve(entry)
    if kind == "text":
        yield from _text_records(entry, fmt)
        return
    if path.is_dir() and kind != "datasets":
        raise DataFileError(f"data.files: {path} is a folder, not a {kind} file; name the file, or set data.format "
                            "to text (a folder of text) or datasets (a dataset saved with save_to_disk)")
    if kind == "datasets" and not path.is_dir():
        raise DataFileError(f"data.files: {path} is a file; data.format=datasets reads a folder written by "
                            "save_to_disk")
    if path.stat().st_size == 0:
        raise DataFileError(f"data.files: {path} is empty; give it documents (see README, 'Your own data')")
    reader = {"jsonl": _jsonl_records, "parquet": _parquet_records, "datasets": _datasets_records}[kind]
    for doc_id, value in reader(path, fields):
        # A document of blanks gives no tokens: left out here, as the built-in corpora leave out empty ones.
        if not isinstance(value, str) or value.strip():
            yield doc_id, value


_COUNTS: dict[tuple[Any, ...], int] = {}  # (entry, format, fields, each file's stat) -> documents: checked once


def count_documents(entry: str, fmt: str = "auto", fields: Fields = Fields()) -> int:
    """How many documents an entry holds, every record checked (one streaming pass; remembered for this process
    until a file of it changes).

    Raises:
        DataFileError: the first problem found, naming the file and line or row.
    """
    stats = tuple((str(f), st.st_size, st.st_mtime_ns) for f in entry_files(entry, fmt) for st in [f.stat()])
    key = (str(resolve(entry)), fmt, fields, stats)
    if key not in _COUNTS:
        _COUNTS[key] = sum(1 for _ in iter_records(entry, fmt, fields))
    return _COUNTS[key]


def check_files(files: list[str], fmt: str = "auto", fields: Fields = Fields()) -> list[int]:
    """Check every entry of `data.files` and return its number of documents (what `DataConfig.validate` runs).

    Raises:
        DataFileError: a missing, empty or malformed file, named with its line or row.
    """
    resolved = [resolve(e) for e in files]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise DataFileError(f"data.files names {', '.join(twice)} more than once; name each file once")
    return [count_documents(e, fmt, fields) for e in files]


def iter_user_documents(entry: str, label: str, fmt: str = "auto", fields: Fields = Fields(),
                        render: ChatRenderer | None = None) -> Iterator[Document]:
    """The documents of one entry as `Document(source=label, doc_id=where it starts, text)`; a chat is rendered
    by `render` (the teacher's chat template).

    Raises:
        DataFileError: a bad record, or a chat with no `render` (the tokenizer has no chat template).
    """
    for doc_id, value in iter_records(entry, fmt, fields):
        if isinstance(value, list):
            if render is None:
                raise DataFileError(f"{resolve(entry)} {doc_id}: a chat ({fields.messages!r}), but the teacher's "
                                    "tokenizer has no chat template to render it; give the records a text field "
                                    f"({fields.text!r}, or name it with data.text_field) holding the text to train on")
            try:
                text = render(value)
            except Exception as e:  # noqa: BLE001 - a template rejects a chat in its own way (jinja, ValueError)
                raise DataFileError(f"{resolve(entry)} {doc_id}: the teacher's chat template cannot render this "
                                    f"chat ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); fix "
                                    "its messages (roles the template accepts), or give the records a text field"
                                    ) from None
            yield Document(source=label, doc_id=doc_id, text=text)
        else:
            yield Document(source=label, doc_id=doc_id, text=value.strip())
