"""Raw documents for pretraining: each document is a list of sentence strings.

Input formats (each may be compressed: .gz, .bz2, .xz, ... as fsspec infers from the name):
- "google": google-research/bert's layout: one sentence per line, a blank line between documents.
  Lines are taken as sentences as they are (no splitting); runs of blank lines are one separator.
- "text": a plain text file is one document; its blank-line separated paragraphs are split into
  sentences with `split_sentences` (lines inside a paragraph are joined).
- "jsonl": one JSON object per line, the document's text under `text_field`; paragraphs (blank-line
  separated) are split into sentences as for "text". Blank lines between records are skipped.
- "auto": by the name without its compression suffix: .jsonl/.json/.ndjson -> jsonl, .txt/.text ->
  text. "google" files are plain text too, so that format is used only when asked for.

Inputs are local paths, directories (all files below them, hidden or "_"-prefixed names left out),
globs (hidden files left out unless the pattern's last part starts with "."), or any fsspec URL
(gs://bucket/dir/*.jsonl.gz). Bad input never stops a run: lines with
non-UTF-8 bytes are decoded with replacement characters, bad JSON lines and empty documents are
skipped, sentences longer than `max_sentence_chars` are cut at whitespace into chunks; every case is
counted in `CorpusStats`. Whitespace inside a sentence is collapsed to single spaces.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

FORMATS = ("auto", "google", "text", "jsonl")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
               ".txt": "text", ".text": "text"}


@dataclasses.dataclass
class CorpusStats:
  """Counters over the files read; `merge` adds another's counts (e.g. from a worker process)."""
  files: int = 0
  documents: int = 0                  # yielded (non-empty) documents
  empty_documents: int = 0            # skipped: no text at all
  single_sentence_documents: int = 0  # yielded, but useless as NSP "A" segments on their own
  sentences: int = 0                  # yielded sentences (after chunking overlong ones)
  characters: int = 0                 # characters in the yielded sentences
  decode_errors: int = 0              # lines with non-UTF-8 bytes (decoded with U+FFFD)
  bad_json_lines: int = 0             # skipped: not a JSON object
  missing_text_field: int = 0         # skipped: a JSON object without a string `text_field`
  overlong_sentences: int = 0         # sentences over max_sentence_chars, cut into chunks

  def merge(self, other: CorpusStats) -> CorpusStats:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
    return self

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Sentence splitting

_OPENERS = "\"'\u201c\u2018([\u00ab"
_CLOSERS = "\"'\u201d\u2019)]\u00bb"
# Terminal punctuation, optional closing quotes/brackets, whitespace, then (after optional opening
# quotes/brackets) an uppercase letter or a digit.
_BOUNDARY = re.compile(r"([.!?]+)([%s]*)\s+(?=[%s]*[A-Z0-9\u00c0-\u00d6\u00d8-\u00de])"
                       % (re.escape(_CLOSERS), re.escape(_OPENERS)))
_DOTTED = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # U.S, e.g, i.e, Ph.D (before the final ".")
ABBREVIATIONS = frozenset("""
    mr mrs ms messrs dr prof rev fr st mt jr sr gen col maj capt lt sgt cmdr adm gov sen rep hon
    pres supt det insp vs etc al cf approx dept univ inc ltd co corp bros no nos vol vols fig figs
    ch sec pp ed eds jan feb mar apr jun jul aug sep sept oct nov dec
    """.split())


def _is_abbreviation(word: str) -> bool:
  word = word.lstrip(_OPENERS)
  if len(word) == 1:
    return word.isupper() and word != "I"  # an initial, as in "John F. Kennedy"
  return word.lower() in ABBREVIATIONS or _DOTTED.fullmatch(word) is not None


def split_sentences(paragraph: str) -> list[str]:
  """Sentences of one paragraph, whitespace collapsed.

  Splits after . ! ? (and closing quotes/brackets after them) when whitespace and then an uppercase
  letter, a digit or an opening quote follows; not after a known abbreviation (Mr. Dr. St. etc.), a
  dotted one (U.S. e.g. i.e.) or a single capital initial. Decimals like 3.14 have no whitespace and
  never split.
  """
  text = " ".join(paragraph.split())
  sentences = []
  start = 0
  for m in _BOUNDARY.finditer(text):
    if m.group(1) == "." and not m.group(2):
      word = text[max(text.rfind(" ", start, m.start()) + 1, start):m.start()]
      if _is_abbreviation(word):
        continue
    sentences.append(text[start:m.end(2)])
    start = m.end()
  if start < len(text):
    sentences.append(text[start:])
  return sentences


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def text_to_sentences(text: str) -> list[str]:
  """Sentences of a text: blank lines separate paragraphs; sentences never span paragraphs."""
  return [s for par in _PARAGRAPH_BREAK.split(text) for s in split_sentences(par)]


def _chunk(sentence: str, limit: int) -> list[str]:
  """Cuts a (whitespace-collapsed) sentence into pieces of at most `limit` characters at spaces."""
  chunks = []
  while len(sentence) > limit:
    cut = sentence.rfind(" ", 0, limit + 1)
    if cut <= 0:  # no space to cut at: a hard cut
      chunks.append(sentence[:limit])
      sentence = sentence[limit:].lstrip(" ")
    else:
      chunks.append(sentence[:cut])
      sentence = sentence[cut + 1:]
  if sentence:
    chunks.append(sentence)
  return chunks


# ------------------------------------------------------------------------------------------------
# Files


def expand_inputs(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Sorted, de-duplicated files named by paths, directories (recursively) and globs, local or URLs.

  Local files come back as absolute paths, remote ones as full URLs. A pattern that names nothing is
  a FileNotFoundError naming it.
  """
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  patterns = [os.fspath(p) for p in patterns]
  if not patterns:
    raise ValueError("expand_inputs: no input patterns given")
  found: set[str] = set()
  for pattern in patterns:
    fs, root = fsspec.core.url_to_fs(pattern)
    if _glob.has_magic(root):
      matches = fs.glob(root, detail=True)
      if not os.path.basename(root).startswith("."):  # like a shell, "*" skips hidden files
        matches = {p: i for p, i in matches.items() if not os.path.basename(p).startswith(".")}
      files = [p for p, info in matches.items() if info["type"] != "directory"]
      for p, info in matches.items():
        if info["type"] == "directory":
          files.extend(_files_below(fs, p))
    elif fs.isdir(root):
      files = _files_below(fs, root)
    elif fs.exists(root):
      files = [root]
    else:
      raise FileNotFoundError(f"corpus input not found: {pattern}")
    if not files:
      raise FileNotFoundError(f"corpus input {pattern} matches no files")
    local = isinstance(fs, LocalFileSystem)
    found.update(p if local else fs.unstrip_protocol(p) for p in files)
  return sorted(found)


def _files_below(fs: Any, root: str) -> list[str]:
  return [p for p in fs.find(root)
          if not os.path.basename(p).startswith((".", "_"))
          and not any(part.startswith(".") for part in os.path.relpath(p, root).split("/")[:-1])]


def detect_format(path: str) -> str:
  """"jsonl" or "text" from the file name (compression suffix ignored)."""
  name = os.path.basename(path.rstrip("/"))
  if fsspec.utils.infer_compression(name):
    name = os.path.splitext(name)[0]
  fmt = _EXTENSIONS.get(os.path.splitext(name)[1].lower())
  if fmt is None:
    raise ValueError(f"cannot tell the format of corpus file {path} from its name; pass "
                     f"format= one of {FORMATS[1:]} (known extensions: {sorted(_EXTENSIONS)})")
  return fmt


def _lines(f: Any, stats: CorpusStats) -> Iterator[str]:
  """Decoded lines (without line endings) of a binary file; bad UTF-8 is replaced and counted."""
  first = True
  for raw in f:
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError:
      stats.decode_errors += 1
      line = raw.decode("utf-8", errors="replace")
    if first:
      line, first = line.lstrip("\ufeff"), False
    yield line.rstrip("\r\n")


def read_documents(path: str, *, format: str = "auto", text_field: str = "text",  # noqa: A002
                   stats: CorpusStats | None = None,
                   max_sentence_chars: int = 5000) -> Iterator[list[str]]:
  """Documents (lists of non-empty sentences) of one file; counts go into `stats` if given."""
  path = os.fspath(path)
  if format not in FORMATS:
    raise ValueError(f"format={format!r} for {path}: expected one of {FORMATS}")
  if max_sentence_chars <= 0:
    raise ValueError(f"max_sentence_chars={max_sentence_chars}: must be positive")
  fmt = detect_format(path) if format == "auto" else format
  stats = CorpusStats() if stats is None else stats
  try:
    f = fsspec.open(path, "rb", compression="infer").open()
  except FileNotFoundError:
    raise FileNotFoundError(f"corpus file not found: {path}") from None
  except IsADirectoryError:
    raise ValueError(f"corpus path {path} is a directory; use iter_corpus for directories"
                     ) from None
  stats.files += 1
  reader = {"google": _google, "text": _text, "jsonl": _jsonl}[fmt]
  with f:
    try:
      for sentences in reader(_lines(f, stats), stats, text_field):
        doc = _finish(sentences, stats, max_sentence_chars)
        if doc:
          yield doc
    except (EOFError, OSError) as e:  # truncated or corrupt compressed data
      raise ValueError(f"corpus file {path} could not be read to the end ({type(e).__name__}: "
                       f"{e}); is it truncated?") from e


def _finish(sentences: list[str], stats: CorpusStats, limit: int) -> list[str]:
  doc = []
  for s in sentences:
    if len(s) > limit:
      stats.overlong_sentences += 1
      doc.extend(_chunk(s, limit))
    elif s:
      doc.append(s)
  if not doc:
    stats.empty_documents += 1
    return doc
  stats.documents += 1
  stats.single_sentence_documents += len(doc) == 1
  stats.sentences += len(doc)
  stats.characters += sum(map(len, doc))
  return doc


def _google(lines: Iterable[str], stats: CorpusStats, text_field: str) -> Iterator[list[str]]:
  del stats, text_field
  doc: list[str] = []
  for line in lines:
    sentence = " ".join(line.split())
    if sentence:
      doc.append(sentence)
    elif doc:
      yield doc
      doc = []
  if doc:
    yield doc


def _text(lines: Iterable[str], stats: CorpusStats, text_field: str) -> Iterator[list[str]]:
  del stats, text_field
  doc: list[str] = []
  paragraph: list[str] = []
  for line in lines:
    if line.strip():
      paragraph.append(line)
    elif paragraph:
      doc.extend(split_sentences(" ".join(paragraph)))
      paragraph = []
  if paragraph:
    doc.extend(split_sentences(" ".join(paragraph)))
  yield doc


def _jsonl(lines: Iterable[str], stats: CorpusStats, text_field: str) -> Iterator[list[str]]:
  for line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      stats.bad_json_lines += 1
      continue
    if not isinstance(record, dict):
      stats.bad_json_lines += 1
      continue
    text = record.get(text_field)
    if not isinstance(text, str):
      stats.missing_text_field += 1
      continue
    yield text_to_sentences(text)


def iter_corpus(patterns: str | os.PathLike | Sequence[str | os.PathLike], *,
                format: str = "auto", text_field: str = "text",  # noqa: A002
                stats: CorpusStats | None = None,
                max_sentence_chars: int = 5000) -> Iterator[list[str]]:
  """Documents of every file that `expand_inputs(patterns)` finds, file by file in sorted order."""
  for path in expand_inputs(patterns):
    yield from read_documents(path, format=format, text_field=text_field, stats=stats,
                              max_sentence_chars=max_sentence_chars)
