"""Text -> tokenized shards, in parallel, deterministic and resumable.

1. Tokenize: documents from the inputs are encoded in ordered chunks by a pool of workers and stored
   flat in `<output>/_work/` (reused by a re-run with the same inputs and tokenizer).
2. Split: a seeded `eval_fraction` of the documents becomes the held-out split.
3. Instances: the work is cut into units (split, dupe, block of documents); each unit draws from its
   own RNG seeded by (seed, split, dupe, block) and writes one shard, its instances shuffled, so the
   output is byte-identical for any number of workers, and a re-run skips the shards an interrupted
   run already finished.
4. Manifest: counts, per-shard checksums, the creation settings and the tokenizer (copied in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import random
import shutil
from typing import Any

from absl import logging
import fsspec
import numpy as np
import tqdm

from pretrain.data import corpus as corpus_lib
from pretrain.data import instances as instances_lib
from pretrain.data import masking
from pretrain.data import shards
from pretrain.data.tokenizer import Tokenizer, load_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # we parallelise across processes


@dataclasses.dataclass(frozen=True)
class CreateSpec:
  max_seq_length: int = 128
  max_predictions_per_seq: int = 20
  masked_lm_prob: float = 0.15
  short_seq_prob: float = 0.1
  dupe_factor: int = 5
  mode: str = "static"                 # "static": masks in the shards; "dynamic": in the loader
  whole_word_mask: bool = False
  seed: int = 12345
  eval_fraction: float = 0.01          # of documents, held out for evaluation
  tokens_per_shard: int = 4_000_000    # corpus tokens that feed one shard
  input_format: str = "auto"
  text_field: str = "text"

  def validate(self):
    if self.mode not in ("static", "dynamic"):
      raise ValueError(f"mode={self.mode!r}; choose 'static' or 'dynamic'")
    if self.max_predictions_per_seq > self.max_seq_length:
      raise ValueError(f"max_predictions_per_seq={self.max_predictions_per_seq} exceeds "
                       f"max_seq_length={self.max_seq_length}")
    if self.max_seq_length < 5:
      raise ValueError(f"max_seq_length={self.max_seq_length} leaves no room for a pair")
    if self.dupe_factor < 1:
      raise ValueError(f"dupe_factor={self.dupe_factor} must be at least 1")
    if not 0 <= self.eval_fraction < 1:
      raise ValueError(f"eval_fraction={self.eval_fraction} must lie in [0, 1)")


# Part of every shard's key: shards written before their instances were shuffled are made again.
_SHARD_LAYOUT = "instances shuffled"


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- stage 1: tokenize

# Per-process state of pool workers (set by their initializer). Workers are spawned, not forked: the
# caller may hold threads (JAX's, the tokenizers library's), and forking a threaded process can crash
# or hang the child.
_worker: dict[str, Any] = {}


def _init_tokenize_worker(tokenizer_path: str, lowercase: bool | None):
  try:
    _worker["tokenizer"] = load_tokenizer(tokenizer_path, lowercase=lowercase)
  except Exception as e:  # pylint: disable=broad-except
    _worker["error"] = e     # raised by the first task: a failing initializer would hang the pool


def _tokenize_chunk(documents: list[list[str]]):
  if "error" in _worker:
    raise _worker["error"]
  tokenizer: Tokenizer = _worker["tokenizer"]
  flat = [s for doc in documents for s in doc]
  encoded = tokenizer.encode_batch(flat) if flat else []
  out, k = [], 0
  for doc in documents:
    sentences = [encoded[k + j] for j in range(len(doc)) if len(encoded[k + j][0])]
    k += len(doc)
    out.append(sentences)
  return out


def _chunks(iterator, size: int):
  chunk = []
  for item in iterator:
    chunk.append(item)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def tokenize_corpus(inputs: list[str], tokenizer: Tokenizer, spec: CreateSpec, workdir: str,
                    num_workers: int, stats: corpus_lib.CorpusStats,
                    tokenizer_path: str | None = None) -> instances_lib.TokenizedCorpus:
  """Encodes every document (ordered), caching the flat arrays in `workdir`.

  Workers load the tokenizer from `tokenizer_path` (a local copy), else from `tokenizer.path`.
  """
  tokenizer_path = tokenizer_path or tokenizer.path
  key = _digest([inputs, [os.path.getsize(p) if os.path.exists(p) else None for p in inputs],
                 tokenizer.sha256, tokenizer.lowercase, spec.input_format, spec.text_field])
  cache = os.path.join(workdir, f"tokens-{key}.npz")
  if os.path.exists(cache):
    with np.load(cache) as z:
      stats.merge(corpus_lib.CorpusStats(**json.loads(str(z["stats"]))))
      return instances_lib.TokenizedCorpus(z["ids"], z["word_start"], z["sentence_offsets"],
                                           z["document_offsets"])
  documents = corpus_lib.iter_corpus(inputs, format=spec.input_format,
                                     text_field=spec.text_field, stats=stats)
  ids, starts, sentence_lengths, doc_sizes = [], [], [], []
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(num_workers, _init_tokenize_worker, (tokenizer_path, tokenizer.lowercase)) as pool:
    progress = tqdm.tqdm(desc="tokenize", unit=" docs", mininterval=2.0)
    for tokenized in pool.imap(_tokenize_chunk, _chunks(documents, 64)):
      for doc in tokenized:
        progress.update(1)
        if not doc:
          continue
        for sentence_ids, sentence_starts in doc:
          ids.append(sentence_ids)
          starts.append(sentence_starts)
          sentence_lengths.append(len(sentence_ids))
        doc_sizes.append(len(doc))
    progress.close()
  if not doc_sizes:
    raise ValueError(f"no text found in {inputs}")
  corpus = instances_lib.TokenizedCorpus(
      ids=np.concatenate(ids).astype(np.int32),
      word_start=np.concatenate(starts).astype(bool),
      sentence_offsets=np.concatenate([[0], np.cumsum(sentence_lengths)]).astype(np.int64),
      document_offsets=np.concatenate([[0], np.cumsum(doc_sizes)]).astype(np.int64))
  os.makedirs(workdir, exist_ok=True)
  np.savez(cache + ".tmp.npz", stats=json.dumps(stats.as_dict()),
           **dataclasses.asdict(corpus))
  os.replace(cache + ".tmp.npz", cache)
  return corpus


def select_documents(corpus: instances_lib.TokenizedCorpus, docs: np.ndarray
                     ) -> instances_lib.TokenizedCorpus:
  """A corpus of the given documents (in order)."""
  sent_ranges = [corpus.sentences(int(d)) for d in docs]
  sentences = np.concatenate([np.arange(r.start, r.stop) for r in sent_ranges])
  starts, ends = corpus.sentence_offsets[sentences], corpus.sentence_offsets[sentences + 1]
  token_index = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
  return instances_lib.TokenizedCorpus(
      ids=corpus.ids[token_index], word_start=corpus.word_start[token_index],
      sentence_offsets=np.concatenate([[0], np.cumsum(ends - starts)]),
      document_offsets=np.concatenate([[0], np.cumsum([len(r) for r in sent_ranges])]))


# ---------------------------------------------------------------- stage 3: instances per unit

def _document_blocks(corpus: instances_lib.TokenizedCorpus, tokens_per_block: int
                     ) -> list[tuple[int, int]]:
  doc_tokens = np.diff(corpus.sentence_offsets[corpus.document_offsets])
  blocks, start, total = [], 0, 0
  for d, n in enumerate(doc_tokens):
    total += int(n)
    if total >= tokens_per_block:
      blocks.append((start, d + 1))
      start, total = d + 1, 0
  if start < len(doc_tokens):
    blocks.append((start, len(doc_tokens)))
  return blocks


def _init_unit_worker(corpora_path: str, tokenizer_path: str, lowercase, spec: CreateSpec):
  try:
    _load_unit_worker(corpora_path, tokenizer_path, lowercase, spec)
  except Exception as e:  # pylint: disable=broad-except
    _worker["error"] = e


def _load_unit_worker(corpora_path: str, tokenizer_path: str, lowercase, spec: CreateSpec):
  _worker["corpora"] = {}
  with np.load(corpora_path) as z:
    for split in ("train", "eval"):
      if f"{split}_ids" in z:
        _worker["corpora"][split] = instances_lib.TokenizedCorpus(
            *(z[f"{split}_{f}"] for f in ("ids", "word_start", "sentence_offsets",
                                          "document_offsets")))
  tokenizer = load_tokenizer(tokenizer_path, lowercase=lowercase)
  _worker["tokenizer"], _worker["spec"] = tokenizer, spec


def _make_unit(unit: dict[str, Any]) -> dict[str, Any]:
  """Creates (or finds finished) the shard of one (split, dupe, block) unit."""
  if "error" in _worker:
    raise _worker["error"]
  done = shards.finished_shard(unit["path"], unit["key"])
  if done is not None:
    return done
  spec: CreateSpec = _worker["spec"]
  tokenizer: Tokenizer = _worker["tokenizer"]
  corpus = _worker["corpora"][unit["split"]]
  name = f"{spec.seed}/{unit['split']}/{unit['dupe']}/{unit['block']}"
  rng = random.Random(name)
  ispec = instances_lib.InstanceSpec(spec.max_seq_length, spec.short_seq_prob,
                                     tokenizer.cls_id, tokenizer.sep_id)
  instances = []
  for doc in range(*unit["documents"]):
    instances.extend(instances_lib.create_instances_from_document(corpus, doc, ispec, rng))
  # As google-research/bert shuffles its instances before writing them: neighbouring records come
  # from unrelated documents, so a reader of blocks of neighbours (data.read_block_records) still
  # gets well-mixed batches.
  rng.shuffle(instances)
  packed = instances_lib.pack(instances, ispec, tokenizer.pad_id)
  static = spec.mode == "static"
  dtype = shards.record_dtype(spec.max_seq_length, spec.max_predictions_per_seq,
                              tokenizer.vocab_size, static)
  records = np.zeros(len(instances), dtype)
  records["segment_ids"], records["word_start"] = packed["segment_ids"], packed["word_start"]
  records["length"], records["next_sentence_label"] = packed["lengths"], packed[
      "next_sentence_labels"]
  records["input_ids"] = packed["input_ids"]
  stats = {"instances": len(instances), "random_next": int(packed["next_sentence_labels"].sum()),
           "short_target": sum(i.target_seq_length < spec.max_seq_length - 3 for i in instances),
           "tokens": int(packed["lengths"].sum())}
  if static and len(instances):
    mspec = masking.MaskingSpec.for_tokenizer(tokenizer, spec.max_predictions_per_seq,
                                              spec.masked_lm_prob, spec.whole_word_mask)
    masked = masking.mask_batch(packed["input_ids"], packed["lengths"], packed["word_start"],
                                mspec, np.random.default_rng(list(name.encode())))
    records["input_ids"] = masked["input_ids"]
    for field in ("masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
      records[field] = masked[field]
    stats["masked"] = int(masked["masked_lm_weights"].sum())
  return shards.write_shard(unit["path"], records, {"key": unit["key"], "stats": stats})


def create(inputs: list[str], tokenizer_path: str, output_dir: str, spec: CreateSpec,
           num_workers: int | None = None, lowercase: bool | None = None) -> dict[str, Any]:
  """Writes the shards and manifest of `inputs` to `output_dir`; returns the manifest."""
  spec.validate()
  num_workers = num_workers or os.cpu_count() or 1
  inputs = corpus_lib.expand_inputs(inputs)
  tokenizer = load_tokenizer(tokenizer_path, lowercase=lowercase)
  os.makedirs(output_dir, exist_ok=True)
  # The tokenizer travels with the shards; workers load this local copy (the original may be a URL).
  tokenizer_file = os.path.basename(tokenizer.path)
  local_tokenizer = os.path.join(output_dir, tokenizer_file)
  _copy_file(tokenizer.path, local_tokenizer)
  workdir = os.path.join(output_dir, "_work")
  stats = corpus_lib.CorpusStats()
  corpus = tokenize_corpus(inputs, tokenizer, spec, workdir, num_workers, stats, local_tokenizer)
  corpus_key = hashlib.sha256(b"".join(
      a.tobytes() for a in dataclasses.astuple(corpus))).hexdigest()[:16]

  order = np.random.default_rng([spec.seed, 7]).permutation(corpus.num_documents)
  num_eval = int(round(corpus.num_documents * spec.eval_fraction))
  if spec.eval_fraction:
    # Each split needs two documents (a random-next B comes from another document).
    num_eval = min(max(num_eval, 2), corpus.num_documents - 2)
    if num_eval < 2:
      logging.warning("%d documents: too few to hold some out for evaluation (eval_fraction=%s); "
                      "writing no eval split", corpus.num_documents, spec.eval_fraction)
      num_eval = 0
  splits = {"train": np.sort(order[num_eval:])}
  if num_eval:
    splits["eval"] = np.sort(order[:num_eval])
  corpora = {name: select_documents(corpus, docs) for name, docs in splits.items()}
  corpora_path = os.path.join(workdir, "splits.npz")
  np.savez(corpora_path, **{f"{name}_{k}": v for name, c in corpora.items()
                            for k, v in dataclasses.asdict(c).items()})

  units = []
  for name, split_corpus in corpora.items():
    dupes = spec.dupe_factor if name == "train" else 1
    for dupe in range(dupes):
      for block, docs in enumerate(_document_blocks(split_corpus, spec.tokens_per_shard)):
        unit = {"split": name, "dupe": dupe, "block": block, "documents": docs,
                "path": os.path.join(output_dir, f"{name}-{dupe:02d}-{block:05d}.npy")}
        # What the shard depends on: a re-run reuses it only if all of this is unchanged.
        unit["key"] = _digest([dataclasses.asdict(spec), tokenizer.sha256, tokenizer.lowercase,
                               corpus_key, name, dupe, block, docs, _SHARD_LAYOUT])
        units.append(unit)
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(num_workers, _init_unit_worker,
                (corpora_path, local_tokenizer, lowercase, spec)) as pool:
    entries = list(tqdm.tqdm(pool.imap(_make_unit, units), total=len(units), desc="shards",
                             mininterval=2.0))

  static = spec.mode == "static"
  manifest = {
      "splits": {name: {"num_instances": sum(e["num_instances"] for e, u in zip(entries, units)
                                             if u["split"] == name),
                        "num_documents": int(len(splits[name])),
                        "shards": [e for e, u in zip(entries, units) if u["split"] == name]}
                 for name in corpora},
      "record_dtype": shards.dtype_to_json(shards.record_dtype(
          spec.max_seq_length, spec.max_predictions_per_seq, tokenizer.vocab_size, static)),
      "creation": dataclasses.asdict(spec),
      "tokenizer": {**tokenizer.describe(), "file": tokenizer_file},
      "inputs": inputs,
      "corpus": {**stats.as_dict(), "tokens": int(len(corpus.ids)),
                 "tokenized_documents": corpus.num_documents,
                 "tokenized_sentences": int(len(corpus.sentence_offsets) - 1)},
  }
  shards.write_manifest(output_dir, manifest)
  shutil.rmtree(workdir, ignore_errors=True)
  return manifest


_SKIPPED_OR_REPAIRED = ("empty_documents", "single_sentence_documents", "decode_errors",
                        "bad_json_lines", "missing_text_field", "overlong_sentences")


def _copy_file(source: str, target: str):
  """Copies `source` (a local path or fsspec URL) unless it already is `target`."""
  if os.path.exists(target) and os.path.exists(source) and os.path.samefile(source, target):
    return
  with fsspec.open(source, "rb") as f:
    data = f.read()
  with open(target + ".tmp", "wb") as f:
    f.write(data)
  os.replace(target + ".tmp", target)


def summary(manifest: dict[str, Any]) -> str:
  lines = []
  c = manifest["corpus"]
  lines.append(f"documents {c['tokenized_documents']:,}  sentences {c['tokenized_sentences']:,}  "
               f"tokens {c['tokens']:,}")
  skipped = {k: v for k, v in c.items() if v and k in _SKIPPED_OR_REPAIRED}
  if skipped:
    lines.append("skipped or repaired: " + ", ".join(f"{k} {v:,}" for k, v in skipped.items()))
  for name, split in manifest["splits"].items():
    totals: dict[str, int] = {}
    for e in split["shards"]:
      for k, v in e["stats"].items():
        totals[k] = totals.get(k, 0) + v
    n = max(totals.get("instances", 0), 1)
    line = (f"{name}: {split['num_instances']:,} instances in {len(split['shards'])} shards "
            f"from {split['num_documents']:,} documents; random-next {totals['random_next'] / n:.1%}"
            f", short targets {totals['short_target'] / n:.1%}")
    if "masked" in totals:
      line += f", masked {totals['masked'] / max(totals['tokens'] - 3 * n, 1):.1%} of word tokens"
    lines.append(line)
  return "\n".join(lines)
