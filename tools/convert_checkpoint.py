"""Checkpoints in and out of transformers: import a BERT folder as a workdir, export a workdir.

  python -m tools.convert_checkpoint import --hf_dir=PATH --workdir=OUT
  python -m tools.convert_checkpoint export --workdir=RUN --output=DIR [--step=N] [--seed=S]

(`--hf_dir=PATH --workdir=OUT` without a command is an import, as before the commands existed.)

import: PATH holds transformers' `config.json`, `model.safetensors` (or `pytorch_model.bin`, read
with torch) and the WordPiece `vocab.txt` (`tokenizer_config.json`'s do_lower_case decides the
casing). OUT gets what `python -m pretrain` leaves: `config.json` (the model group), the tokenizer
with `tokenizer.json`, and `checkpoints/0/state` holding the parameters (no optimizer state: it
starts fine-tuning, `--config.init_checkpoint=OUT`, not a pretraining resume). A BertForPreTraining
checkpoint keeps its MLM/NSP heads; a bare BertModel (e.g. sentence encoders) converts its encoder
and pooler.

export: RUN is the --workdir of `python -m pretrain` (or of an import), exported as
BertForPreTraining from its latest checkpoint or `--step`, or of `python -m finetune`, exported as
BertForSequenceClassification (GLUE, with its label names) or BertForQuestionAnswering (SQuAD) from
the best weights it kept (`--seed`, else the seed with the best main metric). DIR gets
`model.safetensors`, `config.json`, the tokenizer (WordPiece: `vocab.txt` and
`tokenizer_config.json` for AutoTokenizer; SentencePiece: the `.model` file, which AutoTokenizer
cannot load) and a README.md. docs/checkpoints.md says more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import fsspec
import numpy as np

from pretrain.console import UserError

COMMANDS = ("import", "export")

# ------------------------------------------------------------------------------------------------
# Import: a transformers folder -> a workdir


def load_hf_state_dict(hf_dir: str) -> dict:
  safetensors_path = os.path.join(hf_dir, "model.safetensors")
  if os.path.exists(safetensors_path):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(safetensors_path)
  torch_path = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.exists(torch_path):
    import torch  # pylint: disable=g-import-not-at-top
    return {k: v.float().numpy() for k, v in torch.load(torch_path, map_location="cpu").items()}
  raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor pytorch_model.bin")


def convert(hf_dir: str, workdir: str) -> dict:
  """Writes the workdir; returns its config.json content."""
  from pretrain.model import hf_convert  # pylint: disable=g-import-not-at-top
  from pretrain.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from pretrain.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  config_path, vocab_path = os.path.join(hf_dir, "config.json"), os.path.join(hf_dir, "vocab.txt")
  for path in (config_path, vocab_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: --hf_dir must be a transformers BERT folder")
  with open(config_path, encoding="utf-8") as f:
    model_config = hf_convert.bert_config_from_hf(json.load(f))
  lowercase = True
  tokenizer_config = os.path.join(hf_dir, "tokenizer_config.json")
  if os.path.exists(tokenizer_config):
    with open(tokenizer_config, encoding="utf-8") as f:
      lowercase = bool(json.load(f).get("do_lower_case", True))
  tokenizer = load_tokenizer(vocab_path, lowercase=lowercase)
  if tokenizer.vocab_size != model_config.vocab_size:
    raise ValueError(f"{vocab_path} has {tokenizer.vocab_size} entries but {config_path} says "
                     f"vocab_size={model_config.vocab_size}")

  state_dict = load_hf_state_dict(hf_dir)
  with_heads = any(k.startswith("cls.") for k in state_dict)
  params = hf_convert.params_from_hf(state_dict, model_config, with_heads=with_heads)

  os.makedirs(workdir, exist_ok=True)
  shutil.copyfile(vocab_path, os.path.join(workdir, "vocab.txt"))
  with open(os.path.join(workdir, "tokenizer.json"), "w", encoding="utf-8") as f:
    json.dump({**tokenizer.describe(), "file": "vocab.txt"}, f, indent=2)
  config = {"model": dataclasses.asdict(model_config), "converted_from": os.path.abspath(hf_dir)}
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=1,
                      async_save=False)
  if ckpt.latest_step is not None:
    raise FileExistsError(f"{workdir}/checkpoints already holds step {ckpt.latest_step}")
  ckpt.save(0, {"params": params}, {"converted_from": os.path.abspath(hf_dir)}, force=True)
  ckpt.close()
  return config


# ------------------------------------------------------------------------------------------------
# Export: reading a workdir


@dataclasses.dataclass(frozen=True)
class Exported:
  """A workdir's model in transformers' terms."""
  architecture: str                 # the transformers class, e.g. "BertForPreTraining"
  model_config: Any                 # pretrain.model.config.BertConfig of the encoder
  tensors: dict[str, np.ndarray]    # by transformers' parameter names
  tokenizer: Any                    # pretrain.data.tokenizer.Tokenizer
  hf_fields: dict[str, Any]         # config.json fields besides the encoder's (labels, problem)
  source: str                       # "WORKDIR step N" (and the seed), for the summary and README


def _exists(path: str) -> bool:
  fs, local = fsspec.core.url_to_fs(path)
  return fs.exists(local)


def _read_json(path: str) -> Any:
  with fsspec.open(path, "r", encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None


def _workdir_config(workdir: str) -> dict[str, Any]:
  """The workdir's config.json, which says what made it: pretraining (a `model` group) or
  fine-tuning (a `task` and a `head`)."""
  path = os.path.join(workdir, "config.json")
  if not _exists(path):
    raise UserError(f"{workdir} is not a workdir (no config.json): export the --workdir of "
                    "python -m pretrain, python -m finetune or an import")
  config = _read_json(path)
  known = isinstance(config, dict) and ("task" in config or isinstance(config.get("model"), dict))
  if not known:
    raise UserError(f"{path} is neither a pretraining nor a fine-tuning run's config")
  return config


def _pick_step(directory: str, step: int | None, what: str) -> tuple[int, str]:
  """(step, its `state` path) of the checkpoints in `directory`: `step`, or the latest."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = sorted(ocp.utils.checkpoint_steps(directory)) if _exists(directory) else []
  if not steps:
    raise UserError(f"no checkpoint in {directory}: {what}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"--step={step} is not in {directory}; it has steps {steps}")
  state = os.path.join(directory, str(step), "state")
  if not _exists(state):
    raise UserError(f"{state} not found: checkpoint {step} has no parameters (cut short while "
                    f"saving?); pick another --step of {steps}")
  return step, state


def _int_keys(tree: Any) -> Any:
  """Orbax gives the layer keys back as strings ("0"); our params key layers by int."""
  if not isinstance(tree, dict):
    return tree
  return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v)
          for k, v in tree.items()}


def _restore_numpy(state_path: str, key: str | None) -> dict:
  """The parameters saved at `state_path` (the subtree `key`, or all) as numpy arrays, without a
  model or a mesh: the saved shapes are the target."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_path)
  saved = dict(getattr(metadata, "item_metadata", metadata))
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        {key: dict(saved[key])} if key else saved)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = checkpointer.restore(state_path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return _int_keys(restored[key] if key else restored)


def _recorded_tokenizer(workdir: str):
  """The tokenizer the run recorded (`tokenizer.json` and the file it names), hash-checked."""
  from pretrain.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  info_path = os.path.join(workdir, "tokenizer.json")
  if not _exists(info_path):
    raise UserError(f"{workdir} records no tokenizer (no tokenizer.json; a run on synthetic "
                    "data?): an export needs the vocabulary the model was trained with")
  info = _read_json(info_path)
  path = os.path.join(workdir, info["file"])
  tokenizer_lib.check_tokenizer(path, info["sha256"])
  return tokenizer_lib.load_tokenizer(path, lowercase=info.get("lowercase"))


def _from_pretraining(workdir: str, config: dict[str, Any], step: int | None) -> Exported:
  """BertForPreTraining (BertModel for an encoder-only import) from a checkpoint's `params`."""
  from pretrain.model import hf_convert  # pylint: disable=g-import-not-at-top
  from pretrain.model.bert import unstack_layer_params  # pylint: disable=g-import-not-at-top
  from pretrain.model.config import BertConfig  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  model_config = BertConfig(**{k: v for k, v in config["model"].items() if k in fields})
  model_config.validate()
  step, state = _pick_step(os.path.join(workdir, "checkpoints"), step,
                           "the run has not saved one yet")
  params = _restore_numpy(state, "params")
  if model_config.scan_layers:
    params = _int_keys(unstack_layer_params(params))
  tensors = hf_convert.hf_from_params(params, model_config)
  tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
  tensors = {k: v for k, v in tensors.items() if k not in tied}   # transformers ties them on load
  architecture = "BertForPreTraining" if "mlm" in params else "BertModel"
  return Exported(architecture, model_config, tensors, _recorded_tokenizer(workdir), {},
                  f"{workdir} step {step}")


def _pick_seed(workdir: str, seed: int | None, first_seed: int) -> int:
  """`seed`, else the one seed that kept weights, else the best of them by the main metric in
  results.json (`first_seed` where none did: its error names it)."""
  fs, local = fsspec.core.url_to_fs(workdir)
  names = [os.path.basename(os.path.dirname(p.rstrip("/")))
           for p in fs.glob(os.path.join(local, "seed_*", "best"))]
  kept = sorted(int(n[len("seed_"):]) for n in names if n[len("seed_"):].isdigit())
  if seed is not None:
    if kept and seed not in kept:
      raise UserError(f"--seed={seed}: {workdir} kept weights for seeds {kept}")
    return seed
  if len(kept) <= 1:
    return kept[0] if kept else first_seed
  results_path = os.path.join(workdir, "results.json")
  if not _exists(results_path):
    raise UserError(f"{workdir} kept weights for seeds {kept}; choose one with --seed")
  results = _read_json(results_path)
  main = results["main_metric"]
  runs = [r for r in results["runs"] if r["seed"] in kept]
  return max(runs, key=lambda r: r["metrics"].get(main, float("-inf")))["seed"]


def _task_tensors(params: dict, model_config, kind: str) -> dict[str, np.ndarray]:
  """BertForSequenceClassification's tensors (classification/regression) or
  BertForQuestionAnswering's (span, which has no pooler), from a TaskModel's params."""
  from pretrain.model import hf_convert  # pylint: disable=g-import-not-at-top
  encoder = hf_convert.hf_from_params({"bert": params["bert"]}, model_config)
  tensors = {f"bert.{k}": v for k, v in encoder.items()
             if not (kind == "span" and k.startswith("pooler."))}
  name = "qa_outputs" if kind == "span" else "classifier"
  tensors[f"{name}.weight"] = np.ascontiguousarray(np.asarray(params["head"]["kernel"],
                                                              np.float32).T)
  tensors[f"{name}.bias"] = np.asarray(params["head"]["bias"], np.float32)
  return tensors


def _head_fields(task, head_dropout: float) -> dict[str, Any]:
  """config.json's fields for the task head: labels, problem type, the head's dropout."""
  if task.kind == "span":
    return {}
  names = task.spec.label_names if task.kind == "classification" else ("LABEL_0",)
  return {"id2label": {str(i): n for i, n in enumerate(names)},
          "label2id": {n: i for i, n in enumerate(names)},
          "problem_type": ("single_label_classification" if task.kind == "classification"
                           else "regression"),
          "classifier_dropout": head_dropout}


def _from_finetuning(workdir: str, config: dict[str, Any], step: int | None,
                     seed: int | None) -> Exported:
  """The task model from a seed's best weights; the encoder's shape and the tokenizer from the run
  it was fine-tuned from, read as fine-tuning reads them."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from finetune import train as ft_train  # pylint: disable=g-import-not-at-top
  from finetune.task import make_task  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config)
  if config.head.mode == "features":
    raise UserError(f"{workdir} was fine-tuned in features mode (a frozen encoder and a scalar "
                    "mix of all its layers), which transformers' BERT classes cannot express; "
                    "only head.mode=finetune runs export")
  try:
    pretrained, tokenizer = ft_train.load_pretrained(config)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"{workdir}: the architecture and tokenizer come from the run it was "
                    f"fine-tuned from, and {e}") from e
  model_config = ft_train.model_config_for(config, pretrained)
  task = make_task(config, tokenizer)
  pooling = config.head.get("pooling", "pooler")
  if task.kind != "span" and pooling != "pooler":
    raise UserError(f"{workdir} classifies from head.pooling={pooling!r}, which transformers' "
                    "BertForSequenceClassification cannot express: it reads BERT's pooler "
                    "(head.pooling='pooler') only")
  seed = _pick_seed(workdir, seed, config.seed)
  step, state = _pick_step(os.path.join(workdir, f"seed_{seed}", "best"), step,
                           "fine-tuning keeps weights only with ckpt.keep_best=True, after its "
                           "first evaluation")
  tensors = _task_tensors(_restore_numpy(state, None), model_config, task.kind)
  architecture = "BertForQuestionAnswering" if task.kind == "span" else \
      "BertForSequenceClassification"
  return Exported(architecture, model_config, tensors, tokenizer,
                  _head_fields(task, config.head.dropout), f"{workdir} seed {seed} step {step}")


def read_workdir(workdir: str, step: int | None = None, seed: int | None = None) -> Exported:
  """What a pretraining or fine-tuning workdir exports; `seed` is for fine-tuning runs only."""
  if "://" not in workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))   # Orbax needs absolute paths
  workdir = workdir.rstrip("/")
  config = _workdir_config(workdir)
  if "task" in config:
    return _from_finetuning(workdir, config, step, seed)
  if seed is not None:
    raise UserError(f"--seed is for fine-tuning workdirs; {workdir} is a pretraining one")
  return _from_pretraining(workdir, config, step)


# ------------------------------------------------------------------------------------------------
# Export: writing the transformers folder


def _copy(source: str, destination: str):
  """Copies a file from a local path or any fsspec URL (a workdir on gs://) to a local path."""
  with fsspec.open(source, "rb") as f_in, open(destination, "wb") as f_out:
    shutil.copyfileobj(f_in, f_out)


def _wordpiece_files(tokenizer, output: str, max_length: int):
  """vocab.txt and the tokenizer_config.json that makes AutoTokenizer build BERT's tokenizer
  (lowercasing and accent stripping as ours, for an uncased vocabulary)."""
  _copy(tokenizer.path, os.path.join(output, "vocab.txt"))
  config = {"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase,
            "strip_accents": None, "tokenize_chinese_chars": True, "do_basic_tokenize": True,
            "model_max_length": max_length, "unk_token": "[UNK]", "sep_token": "[SEP]",
            "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
  with open(os.path.join(output, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)


def _readme(exported: Exported, output: str) -> str:
  """README.md: where the weights came from and how to load them (and, for SentencePiece, how to
  tokenize, since AutoTokenizer cannot)."""
  tok, name = exported.tokenizer, exported.architecture
  lines = [f"# {name} exported from {exported.source}", "",
           "Written by `python -m tools.convert_checkpoint export` (bert-jax). Load it with:", "",
           f"    from transformers import {name}",
           f"    model = {name}.from_pretrained({output!r})"]
  if tok.kind == "wordpiece":
    return "\n".join(lines + [
        "    from transformers import AutoTokenizer",
        f"    tokenizer = AutoTokenizer.from_pretrained({output!r})", ""])
  model_file = os.path.basename(tok.path)
  return "\n".join(lines + [
      "", "## Tokenizer: SentencePiece, which AutoTokenizer cannot load", "",
      f"The model was trained with the SentencePiece model `{model_file}` ({tok.vocab_size} pieces;"
      f" [PAD]={tok.pad_id}, [UNK]={tok.unk_id}, [CLS]={tok.cls_id}, [SEP]={tok.sep_id}, "
      f"[MASK]={tok.mask_id}). transformers has no BERT tokenizer for SentencePiece, so "
      "`AutoTokenizer.from_pretrained` cannot load this folder's tokenizer. Encode with the "
      "sentencepiece package and add BERT's specials yourself:", "",
      "    import sentencepiece as spm",
      f"    sp = spm.SentencePieceProcessor(model_file={model_file!r})",
      "    a, b = sp.encode(\"first segment\"), sp.encode(\"second segment\")",
      f"    input_ids = [{tok.cls_id}, *a, {tok.sep_id}, *b, {tok.sep_id}]",
      "    token_type_ids = [0] * (len(a) + 2) + [1] * (len(b) + 1)", ""])


def write_folder(exported: Exported, output: str):
  """model.safetensors, config.json, the tokenizer and README.md into `output` (new or empty)."""
  try:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("export writes safetensors files: pip install safetensors") from None
  from pretrain.model import hf_convert  # pylint: disable=g-import-not-at-top
  tok, model_config = exported.tokenizer, exported.model_config
  if tok.vocab_size != model_config.vocab_size:
    raise UserError(f"the tokenizer {tok.path} has {tok.vocab_size} entries but the model's "
                    f"vocab_size is {model_config.vocab_size}")
  if os.path.isdir(output) and os.listdir(output):
    raise UserError(f"--output={output} is not empty; give a new folder")
  os.makedirs(output, exist_ok=True)
  save_file(exported.tensors, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
  hf_config = hf_convert.hf_config_from_bert(
      model_config, architectures=[exported.architecture], pad_token_id=tok.pad_id,
      **exported.hf_fields)
  with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)
  if tok.kind == "wordpiece":
    _wordpiece_files(tok, output, model_config.max_position_embeddings)
  else:
    _copy(tok.path, os.path.join(output, os.path.basename(tok.path)))
  with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
    f.write(_readme(exported, output))


def export(workdir: str, output: str, step: int | None = None, seed: int | None = None
           ) -> Exported:
  """Writes the transformers folder `output` of a workdir; returns what it wrote."""
  exported = read_workdir(workdir, step, seed)
  write_folder(exported, output)
  return exported


# ------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m tools.convert_checkpoint", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  imp = commands.add_parser("import", help="a transformers BERT folder -> a workdir")
  imp.add_argument("--hf_dir", required=True, help="a transformers BERT folder")
  imp.add_argument("--workdir", required=True, help="the pretraining-style workdir to write")
  exp = commands.add_parser("export", help="a pretraining or fine-tuning workdir -> a "
                            "transformers folder")
  exp.add_argument("--workdir", required=True, help="a python -m pretrain / finetune workdir")
  exp.add_argument("--output", required=True, help="the folder to write (new or empty)")
  exp.add_argument("--step", type=int, help="the checkpoint step; default: the latest (the best "
                   "kept, for fine-tuning)")
  exp.add_argument("--seed", type=int, help="fine-tuning: the seed_<s> to export; default: the "
                   "best by the task's main metric")
  for command in (imp, exp):
    command.add_argument("--verbose", action="store_true", help="on an error, show its traceback")
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
    argv = ["import", *argv]          # the flag form from before the commands: an import
  args = _parser().parse_args(argv)
  from pretrain import console  # pylint: disable=g-import-not-at-top
  console.default_jax_platforms()   # before JAX is imported: no TPU probing without a TPU

  def body():
    if args.command == "import":
      m = convert(args.hf_dir, args.workdir)["model"]
      print(f"wrote {args.workdir}: L{m['num_layers']}/H{m['hidden_size']}, vocab "
            f"{m['vocab_size']}; fine-tune with --config.init_checkpoint={args.workdir}")
      return
    from absl import logging  # pylint: disable=g-import-not-at-top
    from pretrain.logs import quiet_library_logs  # pylint: disable=g-import-not-at-top
    logging.use_absl_handler()      # as under absl's app.run, so that Orbax's chatter is filtered
    quiet_library_logs()
    e = export(args.workdir, args.output, step=args.step, seed=args.seed)
    m = e.model_config
    print(f"wrote {args.output}: {e.architecture} from {e.source} (L{m.num_layers}/"
          f"H{m.hidden_size}, vocab {m.vocab_size}, {e.tokenizer.kind} tokenizer); load it with "
          f"transformers.{e.architecture}.from_pretrained({args.output!r})")

  return console.run_command(body, args.verbose)


if __name__ == "__main__":
  sys.exit(main())
