"""The shared starting point: one seeded BertForPreTraining, saved as a transformers folder.

The reference initialises it (transformers' own init, `torch.manual_seed(seed)`) and
`save_pretrained`s it; the project imports the same folder with `pretrain.model.hf_convert`. A
folder given with `--init_dir` must be a BERT checkpoint whose architecture is the config's: every
mismatch is an `InputError` naming the field and both values.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from pretrain.console import UserError
from pretrain.model import hf_convert
from pretrain.model.config import ARCHITECTURE_KEYS, BertConfig
from tools.convert_checkpoint import load_hf_state_dict

_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# Our architecture field -> its name in transformers' config.json (vocab_pad_multiple is ours only).
_HF_NAMES = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "intermediate_size": "intermediate_size",
             "max_position_embeddings": "max_position_embeddings",
             "type_vocab_size": "type_vocab_size", "hidden_act": "hidden_act",
             "layer_norm_eps": "layer_norm_eps"}
assert set(_HF_NAMES) == set(ARCHITECTURE_KEYS) - {"vocab_pad_multiple"}


class InputError(UserError):
  """A bad input the user can fix; the command prints it as one `error: ...` line (exit 2)."""


def hf_config_kwargs(model: BertConfig) -> dict[str, Any]:
  """transformers.BertConfig arguments for our model config (dropout included)."""
  return dict(
      vocab_size=model.vocab_size, hidden_size=model.hidden_size,
      num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
      intermediate_size=model.intermediate_size,
      max_position_embeddings=model.max_position_embeddings,
      type_vocab_size=model.type_vocab_size, hidden_act=_TO_HF_ACTIVATION[model.hidden_act],
      hidden_dropout_prob=model.hidden_dropout,
      attention_probs_dropout_prob=model.attention_dropout,
      layer_norm_eps=model.layer_norm_eps, initializer_range=model.initializer_range)


def create(model: BertConfig, folder: str, seed: int) -> None:
  """transformers' seeded initialisation of BertForPreTraining, saved to `folder`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(seed)
  hf = transformers.BertForPreTraining(transformers.BertConfig(**hf_config_kwargs(model)))
  hf.save_pretrained(folder)


def read_hf_config(folder: str) -> dict[str, Any]:
  """The folder's config.json, after checking that the folder holds a BERT checkpoint."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"{folder} is not a BERT checkpoint: it has no config.json (--init_dir must "
                     "be a transformers save_pretrained folder, or a path that does not exist yet)")
  try:
    with open(path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path} is not valid JSON: {e}") from None
  if hf_config.get("model_type") != "bert":
    raise InputError(f"{folder} is not a BERT checkpoint: config.json has model_type="
                     f"{hf_config.get('model_type')!r}, expected 'bert'")
  if not any(os.path.isfile(os.path.join(folder, name))
             for name in ("model.safetensors", "pytorch_model.bin")):
    raise InputError(f"{folder} is not a BERT checkpoint: it has config.json but no weights "
                     "(model.safetensors or pytorch_model.bin)")
  return hf_config


def check_architecture(folder: str, hf_config: dict[str, Any], model: BertConfig) -> None:
  """Raises InputError naming the first architecture field where the folder and config differ."""
  try:
    theirs = hf_convert.bert_config_from_hf(hf_config)
  except (KeyError, ValueError) as e:
    raise InputError(f"{folder}/config.json: {e.args[0] if e.args else e}") from None
  for key, hf_key in _HF_NAMES.items():
    if getattr(theirs, key) != getattr(model, key):
      raise InputError(
          f"{key} differs between the two sides: the config has model.{key}="
          f"{getattr(model, key)!r} but {folder}/config.json has "
          f"{hf_key}={hf_config.get(hf_key, getattr(theirs, key))!r}; "
          f"set --config.model.{key}={getattr(theirs, key)} or use another --init_dir")


def prepare(config: ml_collections.ConfigDict, folder: str, seed: int) -> BertConfig:
  """Creates the init folder if it does not exist yet (or is empty), then checks it fits `config`.

  Returns the model config both sides train.
  """
  model = BertConfig.from_config(config.model)
  if not os.path.exists(folder) or (os.path.isdir(folder) and not os.listdir(folder)):
    create(model, folder, seed)
  check_architecture(folder, read_hf_config(folder), model)
  load_params(folder, model)          # every tensor's name and shape, before either side starts
  return model


def load_params(folder: str, model: BertConfig) -> dict:
  """Our parameters (numpy float32) from the folder's weights, MLM and NSP heads included."""
  state_dict = load_hf_state_dict(folder)
  if not any(key.startswith("cls.") for key in state_dict):
    raise InputError(f"{folder} holds a BertModel without the pretraining heads (no cls.* "
                     "tensors: MLM and NSP); this tool needs a BertForPreTraining checkpoint "
                     "(transformers' BertForPreTraining.save_pretrained), or no --init_dir (or "
                     "a folder that does not exist yet) to create one")
  try:
    return hf_convert.params_from_hf(state_dict, model)
  except (KeyError, ValueError) as e:
    raise InputError(f"{folder}: {e.args[0] if e.args else e}") from None
