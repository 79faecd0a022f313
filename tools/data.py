"""Pretraining data CLI: train a tokenizer, create shards, inspect them.

  python -m tools.data train-tokenizer --input=data/demo/moby_dick.jsonl.gz \
      --output_prefix=workdir/demo/spm --vocab_size=8000 [--model_type=unigram|bpe]
  python -m tools.data create --input='corpus/*.jsonl.gz' --tokenizer=workdir/demo/spm.model \
      --output_dir=workdir/demo/data [--mode=static|dynamic] [--dupe_factor=5] [--whole_word_mask]
  python -m tools.data inspect --data_dir=workdir/demo/data [--num=3]

`--tokenizer` takes a SentencePiece `.model` or a BERT WordPiece `vocab.txt` (with `--lowercase` or
`--nolowercase` for uncased/cased vocabularies).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _add_create_flags(parser: argparse.ArgumentParser):
  from pretrain.data.create import CreateSpec  # pylint: disable=g-import-not-at-top
  defaults = CreateSpec()
  for field in dataclasses.fields(CreateSpec):
    value = getattr(defaults, field.name)
    if isinstance(value, bool):
      parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=value)
    else:
      parser.add_argument(f"--{field.name}", type=type(value), default=value)


def main(argv=None) -> int:
  from pretrain import console  # pylint: disable=g-import-not-at-top
  console.default_jax_platforms()   # before JAX is imported: no TPU probing without a TPU
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--verbose", action="store_true", help="on an error, show its traceback")
  parser = argparse.ArgumentParser(prog="python -m tools.data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  tok = sub.add_parser("train-tokenizer", parents=[common],
                       help="train a SentencePiece model with BERT's specials")
  tok.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
  tok.add_argument("--output_prefix", required=True)
  tok.add_argument("--vocab_size", type=int, default=30522)
  tok.add_argument("--model_type", choices=("unigram", "bpe"), default="unigram")
  tok.add_argument("--input_format", default="auto")
  tok.add_argument("--max_sentences", type=int, default=2_000_000,
                   help="sentences sampled for training")

  create = sub.add_parser("create", parents=[common],
                          help="write tokenized shards and manifest.json")
  create.add_argument("--input", nargs="+", required=True, help="files, directories or globs")
  create.add_argument("--tokenizer", required=True, help="SentencePiece .model or vocab.txt")
  create.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)
  create.add_argument("--output_dir", required=True)
  create.add_argument("--num_workers", type=int, default=None, help="default: all cores")
  _add_create_flags(create)

  inspect = sub.add_parser("inspect", parents=[common],
                           help="decode a few instances with their masks and labels")
  inspect.add_argument("--data_dir", required=True)
  inspect.add_argument("--split", default="train")
  inspect.add_argument("--num", type=int, default=3)

  overlap = sub.add_parser("overlap", parents=[common],
                           help="how much of fine-tuning tasks' text a corpus has seen")
  overlap.add_argument("--input", nargs="+", required=True, help="corpus files, directories or globs")
  overlap.add_argument("--input_format", default="auto")
  overlap.add_argument("--glue", action="append", default=[], metavar="TASK=DIR",
                       help="a GLUE-layout task's training set, e.g. sst2=glue_data/SST-2")
  overlap.add_argument("--squad", action="append", default=[], metavar="NAME=FILE",
                       help="a SQuAD-layout training file (contexts and questions)")
  overlap.add_argument("--tokenizer", help="also pieces per word and unknown pieces on each task")
  overlap.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None)

  args = parser.parse_args(argv)
  command = {"train-tokenizer": _train_tokenizer, "create": _create, "inspect": _inspect,
             "overlap": _overlap}
  return console.run_command(lambda: command[args.command](args), args.verbose)


def _train_tokenizer(args) -> int:
  from pretrain.data import corpus  # pylint: disable=g-import-not-at-top
  from pretrain.data.spm_training import train_sentencepiece  # pylint: disable=g-import-not-at-top

  def sentences():
    count = 0
    for doc in corpus.iter_corpus(corpus.expand_inputs(args.input), format=args.input_format):
      for sentence in doc:
        yield sentence
        count += 1
        if count >= args.max_sentences:
          return

  os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
  tokenizer = train_sentencepiece(sentences(), output_prefix=args.output_prefix,
                                  vocab_size=args.vocab_size, model_type=args.model_type)
  print(f"wrote {tokenizer.path} ({tokenizer.vocab_size} pieces, sha256 {tokenizer.sha256[:12]})")
  return 0


def _create(args) -> int:
  from pretrain.data import create as create_data  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(create_data.CreateSpec)}
  spec = create_data.CreateSpec(**{k: v for k, v in vars(args).items() if k in fields})
  manifest = create_data.create(args.input, args.tokenizer, args.output_dir, spec,
                                num_workers=args.num_workers, lowercase=args.lowercase)
  print(create_data.summary(manifest))
  print(f"wrote {os.path.join(args.output_dir, 'manifest.json')}")
  return 0


def _inspect(args) -> int:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from pretrain.data import loader  # pylint: disable=g-import-not-at-top
  from pretrain.data import shards  # pylint: disable=g-import-not-at-top
  from pretrain.data.masking import MaskingSpec  # pylint: disable=g-import-not-at-top
  from pretrain.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  manifest = shards.read_manifest(args.data_dir)
  creation = manifest["creation"]
  tokenizer = load_tokenizer(os.path.join(args.data_dir, manifest["tokenizer"]["file"]),
                             lowercase=manifest["tokenizer"].get("lowercase"))
  spec = MaskingSpec.for_tokenizer(tokenizer, creation["max_predictions_per_seq"],
                                   creation["masked_lm_prob"], creation["whole_word_mask"])
  source = loader.ShardSource(
      args.data_dir, split=args.split, global_batch_size=args.num, seed=0,
      max_seq_length=creation["max_seq_length"],
      max_predictions_per_seq=creation["max_predictions_per_seq"], dynamic_masking=spec,
      read_ahead=0)                    # one batch is all it shows (gs:// would read 16 ahead)
  batch = next(source)
  print(json.dumps(creation))
  for row in range(args.num):
    length = int(batch["input_mask"][row].sum())
    tokens = tokenizer.ids_to_tokens(batch["input_ids"][row, :length].tolist())
    segments = batch["segment_ids"][row, :length]
    weights = batch["masked_lm_weights"][row] > 0
    positions = batch["masked_lm_positions"][row][weights]
    originals = tokenizer.ids_to_tokens(batch["masked_lm_ids"][row][weights].tolist())
    label = int(batch["next_sentence_labels"][row])
    shown = list(tokens)
    for p, o in zip(positions, originals):
      shown[p] = f"<{tokens[p]}|{o}>"
    print(f"\n#{row} length {length}, next sentence: {'random (1)' if label else 'actual (0)'}, "
          f"segment B from position {int(np.argmax(segments)) if segments.any() else '-'}")
    print(" ".join(shown))
  print("\n<shown|original> marks a position to predict")
  if creation["mode"] == "dynamic":
    print(f"(dynamic shards: these masks were drawn now with the creation's whole_word_mask="
          f"{creation['whole_word_mask']} and masked_lm_prob={creation['masked_lm_prob']}; training "
          "draws new ones every epoch with its config's data.whole_word_mask and "
          "data.masked_lm_prob)")
  return 0


def _task_texts(glue: list[str], squad: list[str]) -> dict[str, list[str]]:
  """{name: the training set's input texts} of every --glue TASK=DIR and --squad NAME=FILE."""
  from finetune.tasks import glue as glue_lib  # pylint: disable=g-import-not-at-top
  from finetune.tasks import squad as squad_lib  # pylint: disable=g-import-not-at-top
  texts = {}
  for flag, values in (("glue", glue), ("squad", squad)):
    for value in values:
      name, sep, path = value.partition("=")
      if not sep or not name or not path:
        raise ValueError(f"--{flag}={value}: give NAME=PATH")
      if flag == "glue":
        texts[f"{name} ({path})"] = [" ".join(filter(None, (e.text_a, e.text_b)))
                                     for e in glue_lib.read_glue(name, path, "train")]
      else:
        examples = squad_lib.read_squad_json(path)
        texts[f"{name} ({path})"] = (list(dict.fromkeys(e.context for e in examples))
                                     + [e.question for e in examples])
  if not texts:
    raise ValueError("overlap needs at least one --glue TASK=DIR or --squad NAME=FILE")
  return texts


def _overlap(args) -> int:
  from pretrain.data import corpus  # pylint: disable=g-import-not-at-top
  from pretrain.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  from tools import overlap  # pylint: disable=g-import-not-at-top

  texts = _task_texts(args.glue, args.squad)
  tokenizer = args.tokenizer and load_tokenizer(args.tokenizer, lowercase=args.lowercase)
  counts = overlap.corpus_counts(corpus.iter_corpus(args.input, format=args.input_format))
  print(f"corpus: {sum(counts.values()):,} words, {len(counts):,} distinct")
  print(overlap.header(bool(tokenizer)))
  for name, task_texts in texts.items():
    print(overlap.measure(task_texts, counts, tokenizer or None).row(name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
