"""The embedded default corpus: English prose that ships with CPython itself, nothing downloaded.

Two sources, both read as text (no module is imported): the Python language reference topics of
`pydoc_data/topics.py` (one document per section) and the docstrings of the standard library's
.py files (one document per module, class or function docstring). Code examples, grammar rules,
doctests and very short fragments are dropped. Deterministic for a given Python build.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from typing import Iterator, List

MIN_DOCUMENT_CHARS = 100
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "pydoc_data", "turtledemo", "lib2to3"}
_HEADING_RULE = re.compile(r"^([*=\-~^])\1{2,}\s*$")
# Every triple-quoted literal, in source order, so that pairs of quotes stay matched.
_TRIPLE_QUOTED = re.compile(
    r"(?P<prefix>[rRuUbBfF]{0,2})(?P<quote>\"\"\"|''')(?P<body>.*?)(?P=quote)", re.S)
_SPACES = re.compile(r"\s")
_NON_LETTERS = re.compile(r"[\W\d_]+")
_DEFINITION = re.compile(r"^\s*(async\s+def|def|class)\b")


def _is_prose(paragraph: str) -> bool:
    """True for a paragraph of English sentences; False for code, grammar, tables, doctests."""
    text = paragraph.strip()
    words = text.split()
    if len(words) < 4 or ">>>" in text or "::=" in text or text.startswith(("..", "+--", "|")):
        return False
    visible = len(text) - len(_SPACES.findall(text))
    letters = len(_NON_LETTERS.sub("", text))
    if letters < 0.8 * visible:
        return False
    # Indented blocks are prose only when they read as sentences (definition-list bodies).
    if paragraph.startswith("   ") and not text.endswith((".", ":", "?", "!", ")")):
        return False
    return True


def _clean(text: str) -> str:
    """Keeps prose paragraphs, each reflowed to one line, separated by blank lines."""
    paragraphs = re.split(r"\n\s*\n", text.expandtabs(8))
    kept = [" ".join(p.split()) for p in paragraphs if _is_prose(p)]
    return "\n\n".join(kept)


def _topic_sections(topic: str) -> Iterator[str]:
    """Splits one pydoc topic at its headings (a title line underlined with ***, ===, ---)."""
    lines = topic.splitlines()
    section: List[str] = []
    for index, line in enumerate(lines):
        next_line = lines[index + 1] if index + 1 < len(lines) else ""
        if _HEADING_RULE.match(next_line) and line.strip() and section:
            yield "\n".join(section)
            section = []
        if not _HEADING_RULE.match(line):
            section.append(line)
    if section:
        yield "\n".join(section)


def _reference_documents() -> Iterator[str]:
    from pydoc_data import topics  # plain data: a dict of strings

    for name in sorted(topics.topics):
        for section in _topic_sections(topics.topics[name]):
            yield _clean(section)


def _stdlib_files() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        for file_name in sorted(files):
            if file_name.endswith(".py"):
                yield os.path.join(directory, file_name)


def _previous_code_lines(source: str, end: int, count: int) -> List[str]:
    """Up to `count` non-blank, non-comment lines before offset `end`, nearest first."""
    lines: List[str] = []
    while end > 0 and len(lines) < count:
        start = source.rfind("\n", 0, end - 1) + 1
        line = source[start:end]
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
        end = start
    return lines


def _docstrings(source: str) -> Iterator[str]:
    """Docstrings found by scanning triple-quoted literals that open a module, class or def body.

    A text scan instead of `ast.parse` keeps the corpus build under a second (parsing the whole
    standard library takes ~5 s); a literal counts when it starts its line and follows a line
    ending in ':' of a def/class header, or starts the module.
    """
    for match in _TRIPLE_QUOTED.finditer(source):
        if "b" in match["prefix"].lower() or "f" in match["prefix"].lower():
            continue
        line_start = source.rfind("\n", 0, match.start()) + 1
        if source[line_start:match.start()].strip():
            continue
        before = _previous_code_lines(source, line_start, 6)
        if before:
            opens_body = before[0].rstrip().endswith(":") and any(
                _DEFINITION.match(line) for line in before)
            if not opens_body:
                continue
        try:
            value = ast.literal_eval(match.group(0))
        except (SyntaxError, ValueError):
            continue
        if isinstance(value, str):
            yield value


def _docstring_documents() -> Iterator[str]:
    import inspect

    for path in _stdlib_files():
        try:
            with open(path, encoding="utf-8") as handle:
                source = handle.read()
        except (OSError, UnicodeDecodeError):
            continue
        for docstring in _docstrings(source):
            yield _clean(inspect.cleandoc(docstring))


@functools.lru_cache(maxsize=1)
def _embedded_documents() -> tuple:
    seen = set()
    documents = []
    for document in list(_reference_documents()) + list(_docstring_documents()):
        if len(document) >= MIN_DOCUMENT_CHARS and document not in seen:
            seen.add(document)
            documents.append(document)
    return tuple(documents)


def embedded_documents() -> list[str]:
    """The embedded English corpus (about 1.5M characters, a few thousand documents of very
    different lengths), built from CPython's own documentation in about a second."""
    return list(_embedded_documents())
