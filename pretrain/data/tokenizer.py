"""Tokenizers for pretraining data: SentencePiece and BERT WordPiece (load), one API.

Both kinds give the same things to the instance builder and the masker:
- `encode_batch(texts)` -> per text `(ids, word_start)`: int32 token ids without [CLS]/[SEP], and a
  bool array that is True at the first sub-token of each whole word (for whole-word masking);
- the five BERT special ids (`pad_id`, `unk_id`, `cls_id`, `sep_id`, `mask_id`) and `normal_ids`,
  the ids a random-token replacement may draw (all but specials, control pieces and `[unusedN]`);
- `sha256` of the defining file and `describe()`, which a shard manifest records so that shards are
  never read with another vocabulary (`check_tokenizer`).

SentencePiece models trained by `pretrain.data.spm_training.train_sentencepiece` put the specials
at fixed ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. [CLS]/[SEP]/[MASK] are control
pieces: a literal "[MASK]" in a text is tokenized as text.
The WordPiece vocab.txt keeps its own ids (30522-token uncased BERT: [PAD]=0, [UNK]=100, [CLS]=101,
[SEP]=102, [MASK]=103); there too the specials are not matched inside text, unlike transformers'
`BertTokenizer`, which would turn a literal "[MASK]" in a document into the mask id.

Files are read through fsspec, so models and vocabularies may live on gs:// as well as locally.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import fsspec
import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_UNUSED = re.compile(r"^\[unused\d+\]$")
_WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁", which begins every piece that starts a word


def _read_bytes(path: str) -> bytes:
  try:
    with fsspec.open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"tokenizer file not found: {path}") from None
  except IsADirectoryError:
    raise ValueError(f"tokenizer path {path} is a directory; give the .model or vocab.txt file "
                     "inside it") from None


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file's bytes (local path or fsspec URL)."""
  return hashlib.sha256(_read_bytes(path)).hexdigest()


class Tokenizer(abc.ABC):
  """What the data pipeline needs from a tokenizer; see the module docstring."""

  kind: str          # "sentencepiece" or "wordpiece"
  path: str          # the defining file: a SentencePiece .model or a WordPiece vocab.txt
  lowercase: bool
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int

  def __init__(self, path: str, data: bytes):
    self.path = str(path)
    self.sha256 = hashlib.sha256(data).hexdigest()

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids (every id in [0, vocab_size) is valid)."""

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))

  @functools.cached_property
  def normal_ids(self) -> np.ndarray:
    """Sorted int32 ids that random-token replacement may draw."""
    return np.flatnonzero(self._normal_mask()).astype(np.int32)

  @abc.abstractmethod
  def _normal_mask(self) -> np.ndarray:
    """Bool [vocab_size]: True for ordinary tokens."""

  @abc.abstractmethod
  def encode_batch(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: (int32 ids, bool word_start), without [CLS]/[SEP]."""

  def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    return self.encode_batch([text])[0]

  @abc.abstractmethod
  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(int32 ids as `encode` gives them, int32 [n, 2] [start, end) character offsets into `text`).

    Span extraction (SQuAD) maps predicted tokens back to the exact original text through these, so
    they are Python str indices into the text as given (before lowercasing, accent stripping or
    NFKC), and a token's span never begins with whitespace. Spans are in order and do not overlap,
    except where one character becomes several tokens: WordPiece gives each of them the character
    (Hangul syllables split into jamo), SentencePiece gives it to the last and empty spans to the
    others ("Ⅳ" -> "▁I" "V"); a lone "▁" piece has an empty span too.
    """

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; [PAD], [CLS], [SEP] and [MASK] are left out, [UNK] is shown."""

  @abc.abstractmethod
  def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    """The vocabulary entry of each id (specials included)."""

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry, or None."""

  def describe(self) -> dict[str, Any]:
    """JSON-able identity of the tokenizer, for a shard manifest."""
    return {
        "kind": self.kind,
        "file": os.path.basename(self.path.rstrip("/")),
        "sha256": self.sha256,
        "vocab_size": self.vocab_size,
        "lowercase": self.lowercase,
        "special_ids": {"pad": self.pad_id, "unk": self.unk_id, "cls": self.cls_id,
                        "sep": self.sep_id, "mask": self.mask_id},
        "num_normal_ids": int(self.normal_ids.size),
    }

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"lowercase={self.lowercase})")


# ------------------------------------------------------------------------------------------------
# SentencePiece


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` with the BERT specials among its pieces.

  `num_threads` is passed to sentencepiece's batch encoder (1: stay on one core; -1: all cores).
  """

  kind = "sentencepiece"

  def __init__(self, path: str, *, num_threads: int = 1):
    import sentencepiece as spm
    data = _read_bytes(path)
    super().__init__(path, data)
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
      raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from None
    self.num_threads = num_threads
    ids = {}
    for token in SPECIAL_TOKENS:
      i = self.sp.piece_to_id(token)
      if i == self.sp.unk_id() and token != "[UNK]" or self.sp.id_to_piece(i) != token:
        raise ValueError(f"SentencePiece model {path} has no {token} piece; train it with "
                         "pretrain.data.spm_training.train_sentencepiece (which adds the BERT "
                         "specials)")
      ids[token] = i
    if ids["[UNK]"] != self.sp.unk_id():
      raise ValueError(f"SentencePiece model {path}: [UNK] is id {ids['[UNK]']} but the model's "
                       f"unknown piece is id {self.sp.unk_id()}")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        ids[t] for t in SPECIAL_TOKENS)
    self.lowercase = self.sp.normalize("ABC").lstrip(_WORD_BOUNDARY) == "abc"  # case-folding rule
    n = self.sp.get_piece_size()
    self._pieces = [self.sp.id_to_piece(i) for i in range(n)]
    self._starts_word = np.array([p.startswith(_WORD_BOUNDARY) for p in self._pieces], bool)

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  def _normal_mask(self) -> np.ndarray:
    sp = self.sp
    mask = np.array([not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
                     for i in range(self.vocab_size)], bool)
    mask[list(self.special_ids)] = False
    return mask

  @property
  def model_type(self) -> str | None:
    """"unigram", "bpe", "word" or "char" (None where protobuf is not installed)."""
    try:
      from sentencepiece import sentencepiece_model_pb2
    except ImportError:
      return None
    proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
    return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

  def encode_batch(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    texts = list(texts)
    all_ids = self.sp.encode(texts, out_type=int, num_threads=self.num_threads)
    out = []
    for text, ids in zip(texts, all_ids):
      ids = np.asarray(ids, np.int32)
      if self.unk_id in ids:
        # An unknown piece's surface may or may not begin with "▁"; ask for the pieces' surfaces.
        pieces = self.sp.encode(text, out_type=str)
        starts = np.array([p.startswith(_WORD_BOUNDARY) for p in pieces], bool)
      else:
        starts = self._starts_word[ids]
      out.append((ids, starts))
    return out

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    try:  # sentencepiece 0.2.0
      pieces = self.sp.encode(text, out_type="immutable_proto").pieces
      spans = [(p.id, p.begin, p.end) for p in pieces]
    except ValueError:  # releases that dropped immutable_proto (0.2.3) have offset_mapping
      mapping = self.sp.encode(text, out_type="offset_mapping", return_bytes=True)
      spans = [(i, b, e) for i, (b, e) in zip(mapping["ids"], mapping["offsets"])]
    ids = np.array([i for i, _, _ in spans], np.int32)
    # Both give UTF-8 byte offsets; a piece's span also covers the whitespace its "▁" stands for.
    code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    utf8_lengths = (1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000))
    char_of_byte = np.append(np.repeat(np.arange(len(text)), utf8_lengths), len(text))
    offsets = char_of_byte[np.array([(b, e) for _, b, e in spans], np.int64).reshape(-1, 2)]
    return ids, _skip_leading_space(text, offsets).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    drop = self.special_ids - {self.unk_id}
    return self.sp.decode([int(i) for i in ids if int(i) not in drop])

  def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    return [self._pieces[int(i)] for i in ids]

  def token_to_id(self, token: str) -> int | None:
    i = self.sp.piece_to_id(token)
    return None if i == self.unk_id and token != "[UNK]" else i

  def describe(self) -> dict[str, Any]:
    return {**super().describe(), "model_type": self.model_type}


def _skip_leading_space(text: str, offsets: np.ndarray) -> np.ndarray:
  """Moves each [start, end) past the whitespace it begins with (at most to its end)."""
  if not len(text):
    return offsets
  is_space = np.fromiter((c.isspace() for c in text), bool, len(text))
  # next_word[i]: the first non-space position >= i (len(text) if none).
  positions = np.where(is_space, len(text), np.arange(len(text)))
  next_word = np.append(np.minimum.accumulate(positions[::-1])[::-1], len(text))
  starts = np.minimum(next_word[offsets[:, 0]], offsets[:, 1])
  return np.stack([starts, offsets[:, 1]], axis=1)


# ------------------------------------------------------------------------------------------------
# WordPiece


def _parse_vocab(path: str, data: bytes) -> list[str]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"WordPiece vocab {path} is not UTF-8 text ({e}); is it a vocab.txt?"
                     ) from None
  tokens = text.split("\n")
  if tokens and tokens[-1] == "":
    tokens.pop()
  tokens = [t.rstrip("\r") for t in tokens]
  seen: dict[str, int] = {}
  for i, t in enumerate(tokens):
    if t in seen:
      raise ValueError(f"WordPiece vocab {path}: token {t!r} on line {i + 1} repeats line "
                       f"{seen[t] + 1}")
    seen[t] = i
  missing = [t for t in SPECIAL_TOKENS if t not in seen]
  if missing:
    raise ValueError(f"WordPiece vocab {path} lacks the BERT special tokens {missing}")
  return tokens


def guess_lowercase(vocab_path: str) -> bool:
  """True if a WordPiece vocab looks uncased: no entry with a letter that lowercasing would change.

  The bracketed specials ([CLS], [unused0], ...) are ignored. Uncased BERT vocabs pass (their only
  "uppercase" characters, like "ℝ", have no lowercase form); cased ones hold "The", "A", ...
  """
  tokens = _parse_vocab(vocab_path, _read_bytes(vocab_path))
  return not any(t != t.lower() for t in tokens if not (t.startswith("[") and t.endswith("]")))


class WordPieceTokenizer(Tokenizer):
  """A BERT vocab.txt through the `tokenizers` library, with BERT's basic tokenization.

  `lowercase` must match the vocab (True for uncased: lowercase and strip accents; False for cased);
  `guess_lowercase(path)` tells from the vocab, and `load_tokenizer` uses it when not told.
  Parallelism of `encode_batch` follows the TOKENIZERS_PARALLELISM environment variable.
  """

  kind = "wordpiece"

  def __init__(self, path: str, *, lowercase: bool, max_input_chars_per_word: int = 100):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    data = _read_bytes(path)
    super().__init__(path, data)
    self.lowercase = bool(lowercase)
    self._tokens = _parse_vocab(path, data)
    vocab = {t: i for i, t in enumerate(self._tokens)}
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        vocab[t] for t in SPECIAL_TOKENS)
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]",
                                       max_input_chars_per_word=max_input_chars_per_word))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=self.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    self._hf = tok
    self._continuation = np.array([t.startswith("##") for t in self._tokens], bool)

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  def _normal_mask(self) -> np.ndarray:
    mask = np.array([not _UNUSED.match(t) for t in self._tokens], bool)
    mask[list(self.special_ids)] = False
    return mask

  def encode_batch(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for enc in self._hf.encode_batch(list(texts), add_special_tokens=False):
      ids = np.asarray(enc.ids, np.int32)
      out.append((ids, ~self._continuation[ids]))
    return out

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    # tokenizers' Python Encoding.offsets are character offsets into the original string: its
    # normalizer keeps an alignment through lowercasing, accent stripping and CJK spacing.
    enc = self._hf.encode(text, add_special_tokens=False)
    return (np.asarray(enc.ids, np.int32),
            np.asarray(enc.offsets, np.int32).reshape(len(enc.ids), 2))

  def decode(self, ids: Iterable[int]) -> str:
    drop = self.special_ids - {self.unk_id}
    return self._hf.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

  def ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
    return [self._tokens[int(i)] for i in ids]

  def token_to_id(self, token: str) -> int | None:
    return self._hf.token_to_id(token)


# ------------------------------------------------------------------------------------------------
# Loading and checking


def load_tokenizer(path: str, *, lowercase: bool | None = None) -> Tokenizer:
  """A SentencePiece `.model` or a WordPiece vocab `.txt` (or a directory holding `vocab.txt` or one
  `.model`). `lowercase=None`: from the SentencePiece model, or guessed from the WordPiece vocab."""
  path = str(path)
  fs, local = fsspec.core.url_to_fs(path)
  if not fs.exists(local):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  if fs.isdir(local):
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(local, detail=False))
    models = [n for n in names if n.endswith(".model")]
    if "vocab.txt" in names:
      return load_tokenizer(path.rstrip("/") + "/vocab.txt", lowercase=lowercase)
    if len(models) == 1:
      return load_tokenizer(path.rstrip("/") + "/" + models[0], lowercase=lowercase)
    raise ValueError(f"tokenizer directory {path} holds no vocab.txt and {len(models)} .model "
                     f"files ({models}); give the file itself")
  if path.endswith(".model"):
    tok = SentencePieceTokenizer(path)
    if lowercase is not None and lowercase != tok.lowercase:
      raise ValueError(f"lowercase={lowercase} but SentencePiece model {path} "
                       f"{'case-folds' if tok.lowercase else 'keeps case'}; drop the argument")
    return tok
  if path.endswith(".txt"):
    if lowercase is None:
      lowercase = guess_lowercase(path)
    return WordPieceTokenizer(path, lowercase=lowercase)
  raise ValueError(f"cannot tell the tokenizer kind of {path}: expected a SentencePiece '.model' "
                   "or a WordPiece vocab '.txt'")


def check_tokenizer(path: str, expected_sha256: str) -> str:
  """Raises ValueError unless the file's SHA-256 is `expected_sha256`; returns the hash."""
  actual = file_sha256(str(path))
  if actual != expected_sha256.lower():
    raise ValueError(f"tokenizer file {path} has sha256 {actual}, expected {expected_sha256} "
                     "(the data were made with another vocabulary)")
  return actual
