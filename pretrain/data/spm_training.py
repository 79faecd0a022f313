"""Training a SentencePiece model for pretraining data: BERT's specials at fixed ids ([PAD]=0,
[UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; [CLS]/[SEP]/[MASK] as control pieces), from sentences or
from files, written through fsspec and returned loaded as a `SentencePieceTokenizer`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec

from pretrain.data.tokenizer import SPECIAL_TOKENS, SentencePieceTokenizer


def _lines(paths: Sequence[str]) -> Iterator[str]:
  for path in paths:
    try:
      f = fsspec.open(path, "rt", compression="infer", encoding="utf-8", errors="replace").open()
    except FileNotFoundError:
      raise FileNotFoundError(f"sentencepiece training input not found: {path}") from None
    with f:
      yield from f


def train_sentencepiece(sentences: Iterable[str] | None = None, *, output_prefix: str,
                        vocab_size: int, model_type: str = "unigram",
                        input_files: Sequence[str] | None = None, lowercase: bool = False,
                        character_coverage: float = 0.9995, input_sentence_size: int = 0,
                        max_sentence_length: int = 20000, byte_fallback: bool = False,
                        num_threads: int = 1, seed: int = 0, verbose: bool = False,
                        **trainer_options: Any) -> SentencePieceTokenizer:
  """Trains a SentencePiece model with BERT's specials at ids 0..4 and returns it loaded.

  Give either `sentences` (any iterable of strings, e.g. sentences from `pretrain.data.corpus`) or
  `input_files` (one sentence per line; local or fsspec URLs, .gz fine). Writes
  `{output_prefix}.model` and `{output_prefix}.vocab` (the prefix may be an fsspec URL).
  `lowercase=True` case-folds in the model's normalizer (nmt_nfkc_cf). `input_sentence_size` > 0
  trains on a random sample of that many sentences. `trainer_options` go to
  `SentencePieceTrainer.train` as they are.
  Training is deterministic: the same input, options and `num_threads` give the same model bytes.
  Another `num_threads` gives another unigram model (EM sums in another order: scores differ in the
  last bits and some pieces change rank); BPE does not depend on it. The bytes also record the
  options, `num_threads` included.
  """
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type={model_type!r}: expected 'unigram' or 'bpe'")
  if (sentences is None) == (input_files is None):
    raise ValueError("train_sentencepiece: give exactly one of `sentences` and `input_files`")
  if isinstance(sentences, (str, bytes)):
    raise ValueError("train_sentencepiece: `sentences` is one string; pass a list of sentences, or "
                     "file paths as input_files=[...]")
  if vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} leaves no room beyond the {len(SPECIAL_TOKENS)} "
                     "specials")
  source = _lines(list(input_files)) if input_files is not None else iter(sentences)
  stripped = (s.strip() for s in source)
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=(s for s in stripped if s), model_writer=model,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
        control_symbols=["[MASK]"],
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, max_sentence_length=max_sentence_length,
        byte_fallback=byte_fallback, num_threads=num_threads,
        minloglevel=0 if verbose else 2, **trainer_options)
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training of {output_prefix}.model failed: {e}") from None
  data = model.getvalue()
  sp = spm.SentencePieceProcessor(model_proto=data)
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  if tuple(pieces[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
    raise RuntimeError(f"sentencepiece put {pieces[:5]} at ids 0..4, expected "
                       f"{list(SPECIAL_TOKENS)}")
  with fsspec.open(f"{output_prefix}.model", "wb") as f:
    f.write(data)
  with fsspec.open(f"{output_prefix}.vocab", "w", encoding="utf-8") as f:
    f.writelines(f"{p}\t{sp.get_score(i):g}\n" for i, p in enumerate(pieces))
  return SentencePieceTokenizer(f"{output_prefix}.model", num_threads=num_threads)
