"""`docs/config.md`: every config key with its type, default and meaning, generated from the config dataclasses.

The meaning is the comment on the field's line plus the comment lines right above it, read from the dataclass's
source, so the page cannot drift from the definitions: `tests/test_cli.py` fails when the committed page differs
from what this module generates.

    python -m pipelines.config_reference           write docs/config.md
    python -m pipelines.config_reference --check   exit 1 if docs/config.md is out of date
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing
from pathlib import Path
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.paths import REPO_ROOT

REFERENCE_PATH = REPO_ROOT / "docs" / "config.md"
REGENERATE = "python -m pipelines.config_reference"  # or `moe-distill show-config --reference`


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass: the comment at the end of the field's line(s), then the
    comment lines directly above the field (no blank line between), joined into one sentence-like string;
    "" for a field with neither."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line in `source` -> comment text without '#'
    own_line: set[int] = set()  # lines holding only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").strip()
            if not lines[row - 1][:tok.start[1]].strip():
                own_line.add(row)
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef), f"{cls.__name__}: source is not a class"
    out: dict[str, str] = {}
    for stmt in body.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments
                    and r not in own_line]
        above: list[str] = []
        row = stmt.lineno - 1
        while row in own_line:
            above.insert(0, comments[row])
            row -= 1
        parts = [" ".join(trailing), " ".join(above)]
        out[stmt.target.id] = ". ".join(p.rstrip(".") for p in parts if p) + ("." if any(parts) else "")
    return out


def _type_name(typ: Any) -> str:
    """`int`, `list[str]`, ...: the annotation as a user writes the value's type."""
    if typing.get_origin(typ) is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(typ))
        return f"{typing.get_origin(typ).__name__}[{args}]"
    return getattr(typ, "__name__", str(typ))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _cell(text: str) -> str:
    """Markdown table cell: a `|` would end the cell."""
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The reference page: the top-level keys, then one table per section, in PipelineConfig's order."""
    out = [
        "# Configuration keys",
        "",
        f"Generated from the config dataclasses by `{REGENERATE}` (or `moe-distill show-config --reference`);",
        "do not edit by hand: `tests/test_cli.py` fails when this page differs from the definitions.",
        "",
        "Set any key with `SET=\"<section>.<key>=<value> ...\"` (`make distill`) or `--set` (`moe-distill run`), or",
        "in a preset YAML (`configs/<name>.yaml`, or any file: `PRESET=path/to/my.yaml`). `moe-distill show-config`",
        "prints the resolved value of every key and where it came from. A list is written `a,b` or `[a, b]`.",
        "",
    ]
    top_hints = typing.get_type_hints(PipelineConfig)
    top_comments = field_comments(PipelineConfig)
    scalars = [f for f in dataclasses.fields(PipelineConfig) if not dataclasses.is_dataclass(top_hints[f.name])]
    sections = [f for f in dataclasses.fields(PipelineConfig) if dataclasses.is_dataclass(top_hints[f.name])]
    out += _table("Top level", "", [(f.name, top_hints[f.name], _default(f), top_comments[f.name]) for f in scalars])
    for sec in sections:
        cls = top_hints[sec.name]
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        where = Path(inspect.getsourcefile(cls)).resolve().relative_to(REPO_ROOT)
        rows = [(f"{sec.name}.{f.name}", hints[f.name], _default(f), comments[f.name])
                for f in dataclasses.fields(cls)]
        out += _table(f"`{sec.name}`", f"`{cls.__name__}` in `{where}`", rows)
    return "\n".join(out).rstrip() + "\n"


def _table(title: str, subtitle: str, rows: list[tuple[str, Any, Any, str]]) -> list[str]:
    lines = [f"## {title}", ""] + ([subtitle, ""] if subtitle else [])
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, meaning in rows:
        lines.append(f"| `{key}` | {_type_name(typ)} | `{_cell(json.dumps(default))}` | {_cell(meaning) or '-'} |")
    return lines + [""]


def write_reference(path: Path = REFERENCE_PATH) -> Path:
    """Write the reference page to `path` (docs/config.md by default) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reference_markdown())
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.config_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from the definitions")
    ap.add_argument("--out", type=Path, default=REFERENCE_PATH)
    args = ap.parse_args(argv)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != reference_markdown():
            print(f"{args.out} is out of date with the config dataclasses; regenerate it: {REGENERATE}",
                  file=sys.stderr)
            return 1
        return 0
    print(f"wrote {write_reference(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
