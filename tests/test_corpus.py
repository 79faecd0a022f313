"""Corpus reading: the google / text / jsonl formats (plain and gzip), the sentence splitter, input
expansion (globs, directories, fsspec URLs), robustness counters, a pass over the real corpus."""

import bz2
import gzip
import json
from pathlib import Path

import fsspec
import pytest

from pretrain.data import corpus
from pretrain.data.corpus import CorpusStats, expand_inputs, iter_corpus, read_documents, split_sentences

REAL_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


def _write(path: Path, data: str | bytes) -> str:
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if path.name.endswith(".gz"):
    raw = gzip.compress(raw)
  elif path.name.endswith(".bz2"):
    raw = bz2.compress(raw)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(raw)
  return str(path)


def _read(path, **kwargs):
  stats = CorpusStats()
  return list(read_documents(path, stats=stats, **kwargs)), stats


GOOGLE = ("\n\nFirst doc, sentence one.\nSentence  two,\tnot split. Here.\n\n\n\n"
          "Second doc.\n   \nThird.\nEnd")


@pytest.mark.parametrize("name", ["g.txt", "g.txt.gz", "g.bz2"])
def test_google_format_document_boundaries(tmp_path, name):
  docs, stats = _read(_write(tmp_path / name, GOOGLE), format="google")
  assert docs == [["First doc, sentence one.", "Sentence two, not split. Here."],
                  ["Second doc."], ["Third.", "End"]]
  assert stats.as_dict() == {**stats.as_dict(), "files": 1, "documents": 3, "sentences": 5,
                             "single_sentence_documents": 1, "empty_documents": 0,
                             "characters": sum(len(s) for d in docs for s in d)}


@pytest.mark.parametrize("name", ["book.txt", "book.txt.gz"])
def test_text_format_is_one_document_of_paragraph_sentences(tmp_path, name):
  text = ("\ufeffCHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago, never\nmind how long. "
          "Mr. Smith\r\nagreed!\n\n\n  \nThe end")
  docs, stats = _read(_write(tmp_path / name, text))  # auto: .txt -> text
  assert docs == [["CHAPTER 1.", "Loomings.", "Call me Ishmael.",
                   "Some years ago, never mind how long.", "Mr. Smith agreed!", "The end"]]
  assert stats.documents == 1 and stats.sentences == 6 and stats.decode_errors == 0
  empty, stats = _read(_write(tmp_path / "empty.txt", "\n \n\n"))
  assert empty == [] and stats.empty_documents == 1 and stats.documents == 0


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.ndjson.gz"])
def test_jsonl_format(tmp_path, name):
  lines = [json.dumps({"id": 1, "text": "One. Two three!\n\nNew paragraph here"}), "",
           json.dumps({"id": 2, "text": "Just one sentence."}),
           json.dumps({"id": 3, "text": "  \n "}),            # empty document
           "{not json", "[1, 2, 3]", '"a string"',             # 3 bad lines
           json.dumps({"id": 4, "body": "no text field"}), json.dumps({"text": None}),
           json.dumps({"text": "Last doc. Über alles."}) + "\r"]
  docs, stats = _read(_write(tmp_path / name, "\n".join(lines) + "\n"))
  assert docs == [["One.", "Two three!", "New paragraph here"], ["Just one sentence."],
                  ["Last doc.", "Über alles."]]
  assert (stats.documents, stats.empty_documents, stats.single_sentence_documents) == (3, 1, 1)
  assert (stats.bad_json_lines, stats.missing_text_field, stats.sentences) == (3, 2, 6)
  other, stats = _read(_write(tmp_path / "o.jsonl", json.dumps({"body": "A b. C d."})),
                       text_field="body")
  assert other == [["A b.", "C d."]] and stats.missing_text_field == 0


def test_bad_bytes_and_overlong_sentences_are_counted_not_fatal(tmp_path):
  raw = (b"Caf\xe9 au lait.\nFine line.\n\n\xff\xfe\x00 junk\n\n" +
         b"word " * 30 + b"\n" + b"x" * 25 + b"\n")
  docs, stats = _read(_write(tmp_path / "bad.txt.gz", raw), format="google", max_sentence_chars=20)
  assert stats.decode_errors == 2 and stats.overlong_sentences == 2
  assert docs[0] == ["Caf\ufffd au lait.", "Fine line."]
  assert docs[1] == ["\ufffd\ufffd\x00 junk"]
  chunks = docs[2]
  assert all(len(c) <= 20 for c in chunks) and " ".join(chunks[:-2]) == " ".join(["word"] * 30)
  assert chunks[-2:] == ["x" * 20, "x" * 5]  # no space: a hard cut
  assert stats.sentences == 3 + len(chunks) and stats.documents == 3
  # jsonl: a non-UTF-8 line is decoded with replacement, then parsed.
  docs, stats = _read(_write(tmp_path / "bad.jsonl", b'{"text": "Bad \xc3 byte."}\n'))
  assert docs == [["Bad \ufffd byte."]] and stats.decode_errors == 1


def test_truncated_gzip_names_the_file(tmp_path):
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"text": "A b."}\n' * 1000)[:60])
  with pytest.raises(ValueError, match="cut.jsonl.gz could not be read to the end"):
    _read(str(path))


def test_format_detection_and_errors(tmp_path):
  assert corpus.detect_format("gs://b/x/part-0.JSONL.gz") == "jsonl"
  assert corpus.detect_format("a.json") == "jsonl" and corpus.detect_format("a.txt.bz2") == "text"
  odd = _write(tmp_path / "notes.md", "Hello.")
  with pytest.raises(ValueError, match="notes.md"):
    _read(odd)
  assert _read(odd, format="text")[0] == [["Hello."]]
  with pytest.raises(ValueError, match="format='csv'"):
    _read(odd, format="csv")
  with pytest.raises(ValueError, match="max_sentence_chars=0"):
    _read(odd, format="text", max_sentence_chars=0)
  with pytest.raises(FileNotFoundError, match="gone.txt"):
    _read(str(tmp_path / "gone.txt"))


@pytest.mark.parametrize("text, expected", [
    ("Mr. Smith went to Washington. He arrived at 3.14 p.m. on Monday.",
     ["Mr. Smith went to Washington.", "He arrived at 3.14 p.m. on Monday."]),
    ('He said "Stop!" Then he left. (It was late.) Nobody knew?',
     ['He said "Stop!"', "Then he left.", "(It was late.)", "Nobody knew?"]),
    ("\u201cHello.\u201d She smiled.\u2019 \u2018Yes? No!\u2019 It ends",
     ["\u201cHello.\u201d", "She smiled.\u2019", "\u2018Yes?", "No!\u2019", "It ends"]),
    ("The U.S. Army, e.g. Dr. Who and St. John, etc. Went home. John F. Kennedy spoke.",
     ["The U.S. Army, e.g. Dr. Who and St. John, etc. Went home.", "John F. Kennedy spoke."]),
    ("It cost 3.5 million. 2020 was a year. So did I. Then we left.",
     ["It cost 3.5 million.", "2020 was a year.", "So did I.", "Then we left."]),
    ("Wait... What?! no split here. lowercase follows",
     ["Wait...", "What?! no split here. lowercase follows"]),
    ("  Line one\n   continues.\n\tLine two.  ", ["Line one continues.", "Line two."]),
    ("Élan. Ça va. Ok", ["Élan.", "Ça va.", "Ok"]),
    ("no terminal punctuation at all", ["no terminal punctuation at all"]),
    (" \n\t ", []),
])
def test_sentence_splitter(text, expected):
  assert split_sentences(text) == expected


def test_text_to_sentences_keeps_paragraphs_apart():
  assert corpus.text_to_sentences("Heading\n\nBody text. More\ntext.\n \nnext para") == [
      "Heading", "Body text.", "More text.", "next para"]


def test_expand_inputs_globs_directories_and_urls(tmp_path):
  a = _write(tmp_path / "a.jsonl", json.dumps({"text": "A one. A two."}))
  b = _write(tmp_path / "sub" / "b.txt.gz", "B one.")
  c = _write(tmp_path / "sub" / "deeper" / "c.txt", "C one. C two.")
  _write(tmp_path / "sub" / ".hidden.txt", "hidden")
  _write(tmp_path / "sub" / "_SUCCESS", "")
  _write(tmp_path / ".cache" / "x.txt", "hidden dir")
  assert expand_inputs(str(tmp_path / "sub")) == sorted([b, c])
  assert expand_inputs([str(tmp_path / "*.jsonl"), tmp_path / "sub", a]) == sorted([a, b, c])
  assert expand_inputs(str(tmp_path / "sub" / "**" / "*.txt")) == [c]
  assert expand_inputs(str(tmp_path / "s*")) == sorted([b, c])  # a glob hitting a directory
  with pytest.raises(FileNotFoundError, match="nothing-here"):
    expand_inputs(str(tmp_path / "nothing-here"))
  with pytest.raises(FileNotFoundError, match=r"\*\.parquet"):
    expand_inputs(str(tmp_path / "*.parquet"))
  with pytest.raises(ValueError, match="no input patterns"):
    expand_inputs([])

  stats = CorpusStats()
  docs = list(iter_corpus([str(tmp_path / "*.jsonl"), str(tmp_path / "sub")], stats=stats))
  assert docs == [["A one.", "A two."], ["B one."], ["C one.", "C two."]]
  assert stats.files == 3 and stats.documents == 3 and stats.single_sentence_documents == 1

  # Any fsspec URL works the same way (gs:// in production; the in-memory filesystem here).
  fs = fsspec.filesystem("memory")
  with fs.open("/corpus-test/part-0.jsonl.gz", "wb") as f:
    f.write(gzip.compress(json.dumps({"text": "Remote one. Remote two."}).encode()))
  with fs.open("/corpus-test/part-1.jsonl.gz", "wb") as f:
    f.write(gzip.compress(json.dumps({"text": "Remote three."}).encode()))
  try:
    urls = expand_inputs("memory://corpus-test/*.jsonl.gz")
    assert urls == [fs.unstrip_protocol(f"/corpus-test/part-{i}.jsonl.gz") for i in (0, 1)]
    assert all(u.startswith("memory://") for u in urls)
    assert list(iter_corpus("memory://corpus-test")) == [["Remote one.", "Remote two."],
                                                         ["Remote three."]]
  finally:
    fs.rm("/corpus-test", recursive=True)


def test_stats_merge_and_as_dict():
  a = CorpusStats(files=1, documents=2, sentences=5, decode_errors=1)
  b = CorpusStats(files=2, documents=3, sentences=1, bad_json_lines=4)
  assert a.merge(b) is a
  assert a.as_dict() == {**CorpusStats().as_dict(), "files": 3, "documents": 5, "sentences": 6,
                         "decode_errors": 1, "bad_json_lines": 4}
  assert json.loads(json.dumps(a.as_dict())) == a.as_dict()


def test_real_corpus_counts():
  if not REAL_CORPUS.is_dir():
    pytest.skip(f"{REAL_CORPUS} is absent")
  expected_docs = {"sotu.jsonl.gz": 233, "brown.jsonl.gz": 500, "python_docs.jsonl.gz": 469,
                   "linux_docs.jsonl.gz": 2490, "moby_dick.txt.gz": 1}
  total = CorpusStats()
  for name, count in expected_docs.items():
    stats = CorpusStats()
    docs = list(read_documents(str(REAL_CORPUS / name), stats=stats))
    assert stats.documents == len(docs) == count, name
    assert stats.decode_errors == stats.bad_json_lines == stats.missing_text_field == 0, name
    assert all(doc and all(s and s == s.strip() and len(s) <= 5000 for s in doc) for doc in docs)
    mean = stats.characters / stats.sentences
    assert 20 < mean < 300, (name, mean)
    total.merge(stats)
  assert total.files == 5 and total.documents == 3693
  assert 300_000 < total.sentences < 600_000 and 40e6 < total.characters < 60e6
  assert expand_inputs(str(REAL_CORPUS)) == sorted(str(REAL_CORPUS / n) for n in expected_docs)
  sotu = next(read_documents(str(REAL_CORPUS / "sotu.jsonl.gz")))
  assert sotu[0].startswith("Fellow-Citizens of the Senate") and len(sotu) > 20
  moby = next(read_documents(str(REAL_CORPUS / "moby_dick.txt.gz")))
  assert moby[:3] == ["CHAPTER 1.", "Loomings.", "Call me Ishmael."]
