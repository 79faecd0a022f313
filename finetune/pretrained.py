"""Find a pretraining run's checkpoint, its model shape and its tokenizer; restore its encoder.

A pretraining workdir holds `config.json` (the resolved config: the model's architecture),
`checkpoints/<step>/state` (Orbax), and the tokenizer it trained with plus `tokenizer.json` (its
manifest entry and SHA-256). Only `params/bert` (the encoder, and the pooler where asked) is read, a
partial Orbax restore straight into the fine-tuning mesh's shardings, so the optimizer state and the
MLM/NSP heads are never loaded and the mesh may differ from the one that wrote the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import os
from typing import Any

import fsspec
import orbax.checkpoint as ocp

from pretrain import checkpoint_integrity as integrity
from pretrain.data.tokenizer import Tokenizer, check_tokenizer, load_tokenizer
from pretrain.model.config import ARCHITECTURE_KEYS

@dataclasses.dataclass(frozen=True)
class Pretrained:
  workdir: str                  # the pretraining run's workdir
  step: int                     # the checkpoint step used
  state_path: str               # <workdir>/checkpoints/<step>/state
  architecture: dict[str, Any]  # ARCHITECTURE_KEYS from its config.json
  tokenizer_path: str | None    # the tokenizer copied into the workdir, if the run recorded one
  tokenizer_sha256: str | None
  tokenizer_lowercase: bool | None

  def tokenizer(self) -> Tokenizer:
    if self.tokenizer_path is None:
      raise ValueError(f"{self.workdir} records no tokenizer (a run on synthetic data?); pass "
                       "--config.tokenizer=PATH (a SentencePiece .model or a WordPiece vocab.txt)")
    if not _exists(self.tokenizer_path):
      raise FileNotFoundError(f"{self.tokenizer_path} not found: {self.workdir}/tokenizer.json "
                              "names it as the run's tokenizer; put it back or pass "
                              "--config.tokenizer=PATH")
    check_tokenizer(self.tokenizer_path, self.tokenizer_sha256)
    return load_tokenizer(self.tokenizer_path, lowercase=self.tokenizer_lowercase)


def _read_json(path: str) -> dict[str, Any]:
  with fsspec.open(path, "r", encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                       f"{e.msg})") from None


def _exists(path: str) -> bool:
  fs, p = fsspec.core.url_to_fs(path)
  return fs.exists(p)


def locate(init_checkpoint: str, step: int = -1) -> Pretrained:
  """`init_checkpoint` is a pretraining workdir (or its `checkpoints/` folder); step -1 = latest.

  A relative local path is taken from the current directory (Orbax needs absolute paths)."""
  workdir = init_checkpoint.rstrip("/")
  if "://" not in workdir:
    workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.basename(workdir) == "checkpoints":
    workdir = os.path.dirname(workdir)
  config_path = os.path.join(workdir, "config.json")
  if not _exists(config_path):
    raise FileNotFoundError(f"init_checkpoint={init_checkpoint!r}: no {config_path}; point it at a "
                            "pretraining workdir (the --workdir of `python -m pretrain`)")
  model = _read_json(config_path).get("model")
  if not isinstance(model, Mapping):
    raise ValueError(f"{config_path} has no `model` group: not a pretraining config")
  if model.get("scan_layers"):
    raise ValueError(f"{config_path}: the run stacked its layers (model.scan_layers=True); "
                     "fine-tuning reads the per-layer layout: convert the parameters with "
                     "pretrain.model.unstack_layer_params first")
  missing = [k for k in ARCHITECTURE_KEYS if k not in model]
  if missing:
    raise ValueError(f"{config_path}: the model group lacks {missing}")
  architecture = {k: model[k] for k in ARCHITECTURE_KEYS}

  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = ocp.utils.checkpoint_steps(ckpt_dir) if _exists(ckpt_dir) else []
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {ckpt_dir}")
  if step < 0:
    step = max(steps)
  elif step not in steps:
    raise ValueError(f"init_step={step} is not in {ckpt_dir}; it has steps {sorted(steps)}")

  state_path = os.path.join(ckpt_dir, str(step), "state")
  if not _exists(state_path):
    raise FileNotFoundError(f"{state_path} not found: checkpoint {step} of {workdir} has no "
                            "parameters (was it cut short while saving?); pick another with "
                            f"--config.init_step (steps: {sorted(steps)})")
  tokenizer_path = sha = lowercase = None
  info_path = os.path.join(workdir, "tokenizer.json")
  if _exists(info_path):
    info = _read_json(info_path)
    tokenizer_path = os.path.join(workdir, info["file"])
    sha, lowercase = info["sha256"], info.get("lowercase")
  return Pretrained(workdir, step, state_path, architecture, tokenizer_path, sha, lowercase)


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def check_shapes(pretrained: Pretrained, abstract_encoder: Any):
  """Refuses a checkpoint whose encoder differs from the configured one, naming every parameter."""
  metadata = ocp.PyTreeCheckpointer().metadata(pretrained.state_path)
  tree = getattr(metadata, "item_metadata", metadata)
  saved = _flatten(dict(tree)).items()
  saved = {path[2:]: meta for path, meta in saved if path[:2] == ("params", "bert")}
  wanted = _flatten(abstract_encoder)
  problems = []
  for path, leaf in sorted(wanted.items()):
    name = "bert/" + "/".join(path)
    if path not in saved:
      problems.append(f"{name} is not in the checkpoint")
    elif tuple(saved[path].shape) != tuple(leaf.shape):
      problems.append(f"{name}: checkpoint {tuple(saved[path].shape)}, config {tuple(leaf.shape)}")
  if problems:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise ValueError(f"checkpoint {pretrained.state_path} does not match the configured encoder: "
                     f"{shown}")


def restore_encoder(pretrained: Pretrained, abstract_encoder: Any) -> Any:
  """The `params/bert` subtree of the checkpoint, placed as `abstract_encoder`'s leaves say
  (ShapeDtypeStructs with shardings); pass a subtree without the pooler to leave it out. A step
  saved with checksums is checked against them first: a damaged file is named, not restored."""
  check_shapes(pretrained, abstract_encoder)
  step_dir = os.path.dirname(pretrained.state_path)
  damage = integrity.verify(step_dir)
  if damage:
    raise ValueError(f"checkpoint {step_dir} is damaged: {damage}; copy it again or fine-tune "
                     "another step (--config.init_step)")
  target = {"params": {"bert": abstract_encoder}}
  restored = ocp.PyTreeCheckpointer().restore(
      pretrained.state_path,
      args=ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True))
  return restored["params"]["bert"]


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int, where: str):
  if tokenizer.vocab_size != vocab_size:
    raise ValueError(f"vocabulary mismatch: the tokenizer {tokenizer.path} has {tokenizer.vocab_size} "
                     f"entries but the model ({where}) has vocab_size={vocab_size}; fine-tune with the "
                     "tokenizer the checkpoint was pretrained with")

