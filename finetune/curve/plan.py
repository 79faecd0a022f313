"""What a learning curve runs: its arms, its sizes, and one fine-tuning config per cell.

An arm is a way to start fine-tuning: `pretrained` (full fine-tuning of --checkpoint), `scratch`
(the same architecture and tokenizer from random weights), `features` (frozen encoder, a head fitted
by L-BFGS; by gradient steps on span tasks, which L-BFGS does not fit), or a further checkpoint
given as --extra=NAME=PATH. A cell is (arm, size, seed): the arm's config with `size` training
examples drawn by `seed` (finetune/task.py `subsample`) and that seed for the run. Nothing here
touches a device: every check runs before the first cell trains.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re

import ml_collections

from pretrain import cli
from pretrain.console import UserError

BUILTIN_ARMS = ("pretrained", "scratch", "features")
ALL = "all"
# train.eval_every_steps past any run's end: a cell is evaluated once, after its last step, so that
# no epoch is picked on the dev set (the dev set is the curve's test set).
_ONLY_AT_THE_END = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  checkpoint: str                        # a pretraining (or converted) workdir; "" = none
  overrides: tuple[tuple[str, str], ...] = ()   # (config key, value) from --arm_override


def size_label(size: int | None) -> str:
  return ALL if size is None else str(size)


@dataclasses.dataclass(frozen=True)
class Cell:
  arm: str
  size: int | None                       # None = the whole training set
  seed: int

  @property
  def size_label(self) -> str:
    return size_label(self.size)

  @property
  def key(self) -> tuple[str, str, int]:
    return self.arm, self.size_label, self.seed

  def describe(self) -> str:
    return f"{self.arm} n={self.size_label} seed={self.seed}"


# ------------------------------------------------------------------------------------------------
# Flags -> arms and sizes


def parse_sizes(values: list[str]) -> list[int | None]:
  """--sizes=100,300,all -> [100, 300, None], ascending with `all` last."""
  sizes = []
  for value in values:
    if value == ALL:
      sizes.append(None)
    elif value.isdigit() and int(value) > 0:
      sizes.append(int(value))
    else:
      raise UserError(f"--sizes: {value!r} is neither a positive number of examples nor {ALL!r}")
  if not sizes or len(set(sizes)) != len(sizes):
    raise UserError(f"--sizes={','.join(values)}: give distinct sizes, e.g. 100,300,1000,all")
  return sorted(sizes, key=lambda s: (s is None, s or 0))


def parse_arms(names: list[str], checkpoint: str, extras: list[str], overrides: list[str]
               ) -> list[Arm]:
  """Arms from --arms (built-in names or --extra names), then --extra arms not listed there."""
  extra = {}
  for spec in extras:
    name, sep, path = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path:
      raise UserError(f"--extra={spec}: give NAME=CHECKPOINT_WORKDIR, e.g. minilm=out/minilm")
    if name in BUILTIN_ARMS or name in extra:
      raise UserError(f"--extra={spec}: the arm name {name!r} is already taken")
    extra[name] = path
  known = BUILTIN_ARMS + tuple(extra)
  for name in names:
    if name not in known:
      raise UserError(f"unknown arm {name!r} in --arms; choose among {', '.join(BUILTIN_ARMS)}, "
                      f"or add a checkpoint as an arm with --extra={name}=PATH")
  order = list(dict.fromkeys([*names, *extra]))
  if not order:
    raise UserError("no arms: give --arms (pretrained, scratch, features) or --extra=NAME=PATH")
  needs_checkpoint = [n for n in order if n in ("pretrained", "features")]
  if needs_checkpoint and not checkpoint:
    raise UserError(f"arm {needs_checkpoint[0]} needs --checkpoint=PRETRAINING_WORKDIR")
  by_arm = _overrides_by_arm(overrides, order)
  return [Arm(name, cli.absolute(extra.get(name, checkpoint)), tuple(by_arm[name]))
          for name in order]


def _overrides_by_arm(overrides: list[str], arms: list[str]) -> dict[str, list[tuple[str, str]]]:
  """--arm_override=ARM:KEY=VALUE flags as {arm: [(key, value), ...]}."""
  by_arm: dict[str, list[tuple[str, str]]] = {name: [] for name in arms}
  for spec in overrides:
    match = re.fullmatch(r"([^:=]+):([^=]+)=(.*)", spec)
    if not match:
      raise UserError(f"--arm_override={spec}: give ARM:KEY=VALUE, e.g. minilm:head.pooling=mean")
    if match.group(1) not in by_arm:
      raise UserError(f"--arm_override={spec}: unknown arm {match.group(1)!r}; the arms are "
                      f"{', '.join(arms)}")
    by_arm[match.group(1)].append((match.group(2), match.group(3)))
  return by_arm


# ------------------------------------------------------------------------------------------------
# Configs


def _parse_value(config: ml_collections.ConfigDict, leaf: str, value: str):
  """`value` as the type of the field `leaf` (bool, int, float, str or tuple)."""
  kind = config.get_type(leaf)
  if kind is bool:
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"{value!r} is not true or false")
    return value.lower() in ("true", "1")
  if kind in (int, float):
    return kind(value)
  if kind is tuple:
    return tuple(ast.literal_eval(value))
  return value


def apply_override(config: ml_collections.ConfigDict, key: str, value: str):
  """Sets the dotted `key` as --config.KEY=VALUE would; an unknown key names the closest ones."""
  *groups, leaf = key.split(".")
  target = config
  for group in groups:
    target = target.get(group)
    if not isinstance(target, ml_collections.ConfigDict):
      break
  if not isinstance(target, ml_collections.ConfigDict) or leaf not in target:
    raise UserError("--arm_override: " + cli.unknown_key_message(key, list(cli.flat_keys(config))))
  try:
    target[leaf] = _parse_value(target, leaf, value)
  except (TypeError, ValueError, SyntaxError) as e:
    raise UserError(f"--arm_override: {key}={value}: {e}") from None


def arm_config(config: ml_collections.ConfigDict, arm: Arm, span_task: bool
               ) -> ml_collections.ConfigDict:
  """The task config as this arm fine-tunes: its checkpoint, its mode, then its own overrides."""
  config = config.copy_and_resolve_references()
  config.init_checkpoint = arm.checkpoint
  if arm.name == "scratch":
    config.from_scratch = True
  elif arm.name == "features":
    config.head.mode = "features"
    config.optim.solver = "gradient" if span_task else "lbfgs"
  for key, value in arm.overrides:
    apply_override(config, key, value)
  return config


def fingerprint(config: ml_collections.ConfigDict, weights: str, min_steps: int) -> str:
  """A short hash of what decides an arm's results (its config but the first seed, which the cells
  name, the identity of its starting weights, --min_steps): a rerun reuses only cells it would redo.
  """
  settings = {k: v for k, v in config.to_dict().items() if k != "seed"}
  text = json.dumps({"config": settings, "weights": weights, "min_steps": min_steps},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def setting(config: ml_collections.ConfigDict, checkpoint: str, min_steps: int) -> str:
  """A short hash of what every arm of a curve shares (the task config but the first seed,
  --checkpoint, --min_steps): the table and figure show the arms of results.jsonl made with the
  same, those an earlier run added included."""
  config = config.copy_and_resolve_references()
  config.init_checkpoint = cli.absolute(checkpoint)
  return fingerprint(config, "", min_steps)


def cell_config(config: ml_collections.ConfigDict, cell: Cell, num_examples: int, min_steps: int
                ) -> ml_collections.ConfigDict:
  """The arm's config for one cell: its subsample, its seed, one evaluation after the last step,
  and at least `min_steps` optimizer steps (more epochs for the small sizes)."""
  config = config.copy_and_resolve_references()
  config.seed, config.seeds = cell.seed, 1
  config.train.max_train_examples = cell.size or 0
  config.train.subsample_seed = cell.seed
  steps_per_epoch = num_examples // config.train.batch_size
  config.train.num_epochs = max(config.train.num_epochs, min_steps / steps_per_epoch)
  config.train.eval_every_steps = _ONLY_AT_THE_END
  config.ckpt.keep_best = False          # nothing to pick: the last step is the one evaluated
  return config


def make_cells(arms: list[Arm], sizes: list[int | None], first_seed: int, seeds: int
               ) -> list[Cell]:
  """Every cell, small sizes first (the first results arrive soon and share compiled programs
  across seeds and arms), then seed, then arm."""
  return [Cell(arm.name, size, seed) for size in sizes
          for seed in range(first_seed, first_seed + seeds) for arm in arms]


def check_sizes(sizes: list[int | None], num_examples: int, batch_size: int, where: str):
  if None in sizes and num_examples in sizes:
    raise UserError(f"--sizes: {num_examples} and {ALL!r} are the same size (the training set has "
                    f"{num_examples} examples in {where}); give only one of them")
  for size in sizes:
    if size is not None and size > num_examples:
      raise UserError(f"--sizes: {size} is larger than the training set ({num_examples} examples "
                      f"in {where}); use at most {num_examples}, or {ALL!r}")
    if (size or num_examples) < batch_size:
      raise UserError(f"--sizes: {size or num_examples} examples do not fill one batch of "
                      f"train.batch_size={batch_size}; lower --config.train.batch_size")
