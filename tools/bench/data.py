"""Data-pipeline throughput per CPU core: text -> instances, the tokenizer floor, and the loader.

  python -m tools.bench.data --input='../shared/data/corpus/*.gz' --tokenizer=path/to/vocab.txt

1. `create`: text -> tokenized, masked instances in shards (static mode, dupe_factor 1) with one
   worker process; tokens per CPU-second (this process + the worker).
2. The `tokenizers` library's own batch encode of the same sentences on one thread: the floor
   no Python pipeline around it can beat.
3. The loader: `ShardSource` batches at seq 128 with dynamic masking, in this one process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"


def _cpu_seconds() -> float:
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", nargs="+", required=True)
  parser.add_argument("--tokenizer", required=True)
  parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--loader_batches", type=int, default=200)
  parser.add_argument("--whole_word_mask", action="store_true")
  args = parser.parse_args(argv)

  from pretrain.data import corpus  # pylint: disable=g-import-not-at-top
  from pretrain.data import create as create_data  # pylint: disable=g-import-not-at-top
  from pretrain.data import loader  # pylint: disable=g-import-not-at-top
  from pretrain.data import masking  # pylint: disable=g-import-not-at-top
  from pretrain.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer = load_tokenizer(args.tokenizer, lowercase=args.lowercase)
  inputs = corpus.expand_inputs(args.input)
  out = tempfile.mkdtemp(prefix="bench_data_")
  try:
    # 1. The whole creation pipeline on one worker.
    spec = create_data.CreateSpec(dupe_factor=1, mode="static", eval_fraction=0.0,
                                  whole_word_mask=args.whole_word_mask)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    manifest = create_data.create(inputs, args.tokenizer, os.path.join(out, "static"), spec,
                                  num_workers=1, lowercase=args.lowercase)
    create_cpu, create_wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
    tokens = manifest["corpus"]["tokens"]
    instances = manifest["splits"]["train"]["num_instances"]

    # 2. The tokenizer alone on the same sentences.
    sentences = [s for doc in corpus.iter_corpus(inputs) for s in doc]
    cpu0 = _cpu_seconds()
    encoded = 0
    for i in range(0, len(sentences), 1000):
      encoded += sum(len(ids) for ids, _ in tokenizer.encode_batch(sentences[i:i + 1000]))
    tokenizer_cpu = _cpu_seconds() - cpu0
    raw = getattr(tokenizer, "_hf", None)   # the `tokenizers.Tokenizer` (WordPiece)
    raw_cpu = None
    if raw is not None and hasattr(raw, "encode_batch"):
      cpu0 = _cpu_seconds()
      for i in range(0, len(sentences), 1000):
        raw.encode_batch(sentences[i:i + 1000], add_special_tokens=False)
      raw_cpu = _cpu_seconds() - cpu0

    # 3. The loader with dynamic masking.
    dynamic = os.path.join(out, "dynamic")
    create_data.create(inputs, args.tokenizer, dynamic,
                       create_data.CreateSpec(dupe_factor=1, mode="dynamic", eval_fraction=0.0),
                       num_workers=1, lowercase=args.lowercase)
    mspec = masking.MaskingSpec.for_tokenizer(tokenizer, 20, 0.15, args.whole_word_mask)
    source = loader.ShardSource(dynamic, split="train", global_batch_size=args.batch_size,
                                   seed=0, max_seq_length=128, max_predictions_per_seq=20,
                                   dynamic_masking=mspec)
    next(source)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    for _ in range(args.loader_batches):
      next(source)
    loader_cpu, loader_wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
  finally:
    shutil.rmtree(out, ignore_errors=True)

  rows = [
      ("corpus", f"{len(inputs)} files, {tokens:,} tokens, {instances:,} instances (seq 128)"),
      ("tokenizer", f"{tokenizer.kind} {os.path.basename(tokenizer.path)} ({tokenizer.vocab_size:,})"),
      ("create: tokens / CPU-s", f"{tokens / create_cpu:,.0f}  ({create_cpu:.1f} CPU-s, "
                                 f"{create_wall:.1f} s wall)"),
      ("our encode_batch: tokens / CPU-s", f"{encoded / tokenizer_cpu:,.0f}"),
  ]
  if raw_cpu:
    rows.append(("tokenizers' own encode_batch: tokens / CPU-s", f"{encoded / raw_cpu:,.0f}"))
  rows.append(("loader, dynamic masking: seq / CPU-s",
               f"{args.loader_batches * args.batch_size / loader_cpu:,.0f}  "
               f"(seq/s wall {args.loader_batches * args.batch_size / loader_wall:,.0f}, "
               f"batch {args.batch_size}, whole-word {args.whole_word_mask})"))
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
