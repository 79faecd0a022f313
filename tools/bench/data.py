"""Data-pipeline throughput per CPU core: text -> instances, the tokenizer floor, and the loader.

  python -m tools.bench.data --input='../shared/data/corpus/*.gz' --tokenizer=path/to/vocab.txt
  python -m tools.bench.data --shards=DIR --storage [--read_block_records 1 16]
      [--shuffle_window_records=N] [--bucket=gs://BUCKET/DIR]

1. `create`: text -> tokenized, masked instances in shards (static mode, dupe_factor 1) with one
   worker process; tokens per CPU-second (this process + the worker).
2. The `tokenizers` library's own batch encode of the same sentences on one thread: the floor
   no Python pipeline around it can beat.
3. The loader: `ShardSource` batches at seq 128 with dynamic masking, in this one process.
4. With --storage: the loader on the same shards from local disk (memory-mapped) and from object
   storage (range requests with read-ahead), in sequences per second of wall time over
   --loader_batches batches after the first, and their ratio, for each --read_block_records
   (`data.read_block_records`: 1 draws records one by one, about one range request per sequence;
   K > 1 reads runs of K neighbours, about 1/K; the range requests per record are counted).
   A shuffle window that holds much of the data set (the default 65,536 records, on a small
   corpus) also joins neighbouring blocks into one request: --shuffle_window_records well below
   the data set's size shows what a large corpus costs. The shards are uploaded to a GCS emulator
   on 127.0.0.1 (tools/gcs_emulator.py), or to --bucket (a real gs:// prefix; removed afterwards).
   --shards=DIR skips 1-3 and uses DIR's shards (seq 128 or any other length).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
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
  parser.add_argument("--input", nargs="+")
  parser.add_argument("--tokenizer")
  parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--loader_batches", type=int, default=200)
  parser.add_argument("--whole_word_mask", action="store_true")
  parser.add_argument("--shards", help="existing shards: measure the loader from storage only")
  parser.add_argument("--storage", action="store_true",
                      help="local disk vs object storage (see 4. above)")
  parser.add_argument("--bucket", help="a gs:// prefix to upload to instead of the emulator")
  parser.add_argument("--read_block_records", type=int, nargs="+", default=[1],
                      help="the values of data.read_block_records to time (see 4. above)")
  parser.add_argument("--shuffle_window_records", type=int,
                      help="data.shuffle_window_records (default: its default; see 4. above)")
  parser.add_argument("--verbose", action="store_true", help="on an error, its traceback too")
  args = parser.parse_args(argv)
  from pretrain import console  # pylint: disable=g-import-not-at-top
  return console.run_command(lambda: _bench(args, parser), args.verbose)


def _bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
  if any(k < 1 for k in args.read_block_records):
    parser.error(f"--read_block_records {' '.join(map(str, args.read_block_records))}: each must "
                 "be at least 1")
  if args.shards:
    _print_rows(storage_rows(args.shards, args.batch_size, args.loader_batches, args.bucket,
                             args.read_block_records, args.shuffle_window_records))
    return 0
  if not (args.input and args.tokenizer):
    parser.error("--input and --tokenizer are required (or --shards=DIR --storage)")

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
    storage_table = (storage_rows(dynamic, args.batch_size, args.loader_batches, args.bucket,
                                  args.read_block_records, args.shuffle_window_records)
                     if args.storage else [])
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
  _print_rows(rows + storage_table)
  return 0


def _print_rows(rows: list[tuple[str, str]]):
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")


def _seq_per_s(source, batches: int) -> float:
  """Wall-clock sequences per second over `batches` batches, after one to start up."""
  next(source)
  wall0 = time.perf_counter()
  for _ in range(batches):
    next(source)
  seconds = time.perf_counter() - wall0
  source.close()
  return batches * source.local_batch / seconds


def storage_rows(directory: str, batch_size: int, batches: int, bucket: str | None,
                 block_sizes: list[int], window: int | None) -> list[tuple[str, str]]:
  """Loader throughput on `directory`'s shards from local disk and from object storage, for each
  data.read_block_records in `block_sizes`, with data.shuffle_window_records = `window` (None:
  the loader's default)."""
  import fsspec  # pylint: disable=g-import-not-at-top

  from pretrain.data import loader, masking, shards  # pylint: disable=g-import-not-at-top
  from tools.gcs_emulator import Emulator  # pylint: disable=g-import-not-at-top

  manifest = shards.read_manifest(directory)
  creation = manifest["creation"]
  tokenizer = loader.tokenizer_of_shards(directory, manifest)
  spec = masking.MaskingSpec.for_tokenizer(tokenizer, creation["max_predictions_per_seq"], 0.15,
                                           False)
  window = window or loader.ShardSource.SHUFFLE_WINDOW_RECORDS

  def source(path, block):
    return loader.ShardSource(path, split="train", global_batch_size=batch_size, seed=0,
                              max_seq_length=creation["max_seq_length"],
                              max_predictions_per_seq=creation["max_predictions_per_seq"],
                              dynamic_masking=spec, read_block_records=block,
                              shuffle_window_records=window)

  load_before = os.getloadavg()[0]
  local = {block: _seq_per_s(source(directory, block), batches) for block in block_sizes}
  emulator = None if bucket else Emulator().start()
  try:
    if emulator:
      emulator.activate()
      emulator.create_bucket("bench")
    url = bucket.rstrip("/") + f"/bench-data-{os.getpid()}" if bucket else "gs://bench/shards"
    fs, root = fsspec.core.url_to_fs(url)
    fs.put(directory.rstrip("/") + "/", root, recursive=True)
    try:
      remote = {}                   # K -> (seq/s, range requests per record read)
      for block in block_sizes:
        timed = source(url, block)
        remote[block] = (_seq_per_s(timed, batches),
                         timed.records.requests / timed.records.records_read)
    finally:
      fs.rm(root, recursive=True)
  finally:
    if emulator:
      emulator.stop()
  where = bucket or "GCS emulator on 127.0.0.1"
  rows = [("loader: shards", f"seq {creation['max_seq_length']}, batch {batch_size}, "
                             f"{manifest['splits']['train']['num_instances']:,} instances, "
                             f"shuffle window {window:,}, {batches} batches timed, read-ahead "
                             f"{loader.ShardSource.REMOTE_READ_AHEAD} batches from {where}"),
          ("load average (1 min), before / after", f"{load_before:.2f} / {os.getloadavg()[0]:.2f}")]
  for block in block_sizes:
    local_rate, (remote_rate, per_record) = local[block], remote[block]
    rows += [(f"loader, read_block_records={block}, local disk: seq/s", f"{local_rate:,.0f}"),
             (f"loader, read_block_records={block}, {where}: seq/s",
              f"{remote_rate:,.0f}  (ratio to local {remote_rate / local_rate:.2f}, "
              f"{per_record:.3f} range requests per record)")]
  return rows


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
