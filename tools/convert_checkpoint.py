"""Turn a Hugging Face BERT folder into a pretraining workdir that fine-tuning can start from.

  python -m tools.convert_checkpoint --hf_dir=PATH --workdir=OUT

PATH holds transformers' `config.json`, `model.safetensors` (or `pytorch_model.bin`, read with
torch) and the WordPiece `vocab.txt` (`tokenizer_config.json`'s do_lower_case decides the casing).
OUT gets what `python -m pretrain` leaves: `config.json` (the model group), the tokenizer with
`tokenizer.json`, and `checkpoints/0/state` holding the parameters (no optimizer state: it starts
fine-tuning, `--config.init_checkpoint=OUT`, not a pretraining resume). A BertForPreTraining checkpoint
keeps its MLM/NSP heads; a bare BertModel (e.g. sentence encoders) converts its encoder and pooler.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.convert_checkpoint", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf_dir", required=True, help="a transformers BERT folder")
  parser.add_argument("--workdir", required=True, help="the pretraining-style workdir to write")
  parser.add_argument("--verbose", action="store_true", help="on an error, show its traceback")
  args = parser.parse_args(argv)
  from pretrain import console  # pylint: disable=g-import-not-at-top
  console.default_jax_platforms()   # before JAX is imported: no TPU probing without a TPU

  def body():
    m = convert(args.hf_dir, args.workdir)["model"]
    print(f"wrote {args.workdir}: L{m['num_layers']}/H{m['hidden_size']}, vocab "
          f"{m['vocab_size']}; fine-tune with --config.init_checkpoint={args.workdir}")

  return console.run_command(body, args.verbose)


if __name__ == "__main__":
  sys.exit(main())
