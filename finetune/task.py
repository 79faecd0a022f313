"""What the fine-tuning loop needs of a task, for GLUE and SQuAD: features, metrics, prediction files.

The loop (`finetune/train.py`) only sees numpy feature arrays, the model's outputs per eval set, and
these methods; readers, features and the official metrics live in `finetune/tasks/`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import os
from typing import Any

from absl import logging
import fsspec
import ml_collections
import numpy as np

from finetune.tasks import glue
from finetune.tasks import squad
from finetune.tasks import squad_eval


@dataclasses.dataclass
class EvalSet:
  name: str                              # the split, e.g. "dev", "dev_matched", "test"
  features: dict[str, np.ndarray]        # at least input_ids, input_mask, segment_ids
  labelled: bool
  context: Any = None                    # what metrics/prediction files need (examples, ids)


class Task(abc.ABC):
  kind: str                              # "classification", "regression" or "span"
  num_labels: int
  main_metric: str                       # "<eval set>/<metric>", higher is better
  label_keys: tuple[str, ...]            # feature arrays the loss reads besides the inputs

  @abc.abstractmethod
  def all_train_examples(self) -> list[Any]:
    """Every example of the training split (a question for SQuAD), before any subsampling."""

  @abc.abstractmethod
  def train_features(self) -> dict[str, np.ndarray]: ...

  @abc.abstractmethod
  def eval_sets(self) -> list[EvalSet]: ...

  def predict_sets(self) -> list[EvalSet]:
    return []

  @abc.abstractmethod
  def metrics(self, eval_set: EvalSet, outputs: np.ndarray) -> dict[str, float]: ...

  @abc.abstractmethod
  def write_predictions(self, eval_set: EvalSet, outputs: np.ndarray, directory: str
                        ) -> list[str]: ...


def subsample(num_examples: int, size: int, seed: int, labels=None) -> np.ndarray:
  """Sorted indices of `size` of `num_examples` examples, drawn by `seed`; nested across sizes.

  The seed fixes one order of all the examples and a size takes its first `size`, so for one seed
  the 100 examples of a learning curve are among its 300. With `labels` (classification) each
  class's examples are shuffled and spread evenly along that order, so every prefix holds each
  class in about its share of the whole set (within one or two examples per class): the small
  sizes are stratified too.
  """
  rng = np.random.default_rng(seed)
  if labels is None:
    order = rng.permutation(num_examples)
  else:
    labels = np.asarray(labels)
    position = np.empty(num_examples)
    for label in np.unique(labels):
      members = rng.permutation(np.flatnonzero(labels == label))
      position[members] = (np.arange(members.size) + rng.random()) / members.size
    order = np.lexsort((rng.random(num_examples), position))     # ties broken at random
  return np.sort(order[:size])


def choose_train_examples(examples: list, train: ml_collections.ConfigDict, labels=None) -> list:
  """The training examples a run uses (`train.max_train_examples` and `train.subsample_seed`): all,
  the first N, or with a seed N drawn at random (`subsample`; `labels` make the draw stratified)."""
  size = train.max_train_examples
  if not size:
    return examples
  if train.subsample_seed < 0:
    return examples[:size]
  if size > len(examples):
    raise ValueError(f"train.max_train_examples={size} with train.subsample_seed="
                     f"{train.subsample_seed}: the training set has only {len(examples)} examples")
  return [examples[i] for i in subsample(len(examples), size, train.subsample_seed, labels)]


class GlueTask(Task):
  """A GLUE task from its official TSV folder (`data.dir`) or TFDS (`data.source=tfds`)."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.spec = glue.get_task(config.task)
    self.kind = "regression" if self.spec.is_regression else "classification"
    self.num_labels = self.spec.num_labels
    self.main_metric = f"{self.spec.dev_splits[0]}/{self.spec.main_metric}"
    self.label_keys = ("label",)
    if config.data.source not in ("glue", "tfds"):
      raise ValueError(f"data.source={config.data.source!r}; choose 'glue' or 'tfds'")
    if config.data.source == "glue" and not config.data.dir:
      raise ValueError(f"--config.data.dir is required: the GLUE folder of {config.task}")

  def _read(self, split: str, spec=None) -> list[glue.Example]:
    spec, data = spec or self.spec, self.config.data
    if data.source == "tfds":
      return glue.read_tfds(spec, split, data.tfds_data_dir or None)
    if spec is self.spec:
      return glue.read_glue(spec, data.dir, split)
    # AX sits beside the task folders (GLUE_ROOT/diagnostic/): data.dir may be MNLI's or the root.
    try:
      return glue.read_glue(spec, data.dir, split)
    except FileNotFoundError:
      return glue.read_glue(spec, os.path.dirname(data.dir.rstrip("/")), split)

  def _features(self, examples) -> dict[str, np.ndarray]:
    return glue.make_features(examples, self.tokenizer, self.config.data.max_seq_length,
                              regression=self.spec.is_regression)

  @functools.cache
  def all_train_examples(self):
    return self._read("train")

  @functools.cache
  def train_features(self):
    examples = self.all_train_examples()
    labels = None if self.spec.is_regression else [e.label for e in examples]
    return self._features(choose_train_examples(examples, self.config.train, labels))

  @functools.cache
  def eval_sets(self):
    return [EvalSet(split, self._features(ex), True, [e.guid for e in ex])
            for split in self.spec.dev_splits for ex in [self._read(split)]]

  @functools.cache
  def predict_sets(self):
    """The test splits that exist (the leaderboard's files); MNLI adds AX, the diagnostic set."""
    wanted = [(self.spec, split) for split in self.spec.test_splits]
    if self.spec.name == "mnli":
      wanted.append((glue.get_task("ax"), "test"))
    sets = []
    for spec, split in wanted:
      try:
        examples = self._read(split, spec)
      except FileNotFoundError as e:
        logging.info("no %s %s split: no leaderboard file for it (%s)", spec.name, split, e)
        continue
      name = spec.submission_file(split)
      sets.append(EvalSet(name, self._features(examples), False, [e.guid for e in examples]))
    return sets

  def metrics(self, eval_set, outputs):
    return glue.compute_metrics(self.spec, outputs, eval_set.features["label"])

  def write_predictions(self, eval_set, outputs, directory):
    # Leaderboard files keep GLUE's names (SST-2.tsv, MNLI-m.tsv, AX.tsv); dev sets get their own.
    spec = glue.get_task("ax") if eval_set.name == "AX.tsv" else self.spec
    name = eval_set.name if eval_set.name.endswith(".tsv") else f"{eval_set.name}_predictions.tsv"
    path = os.path.join(directory, name)
    glue.write_predictions(path, spec, eval_set.context, outputs)
    return [path]


class SquadTask(Task):
  """SQuAD v1.1 / v2.0 from the official JSON files or TFDS: span head over windows of the context."""

  def __init__(self, config: ml_collections.ConfigDict, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    self.kind, self.num_labels = "span", 2
    self.version_2 = bool(config.data.version_2)
    self.main_metric = "dev/best_f1" if self.version_2 else "dev/f1"
    self.label_keys = ("start_positions", "end_positions")
    if config.data.source not in ("json", "tfds"):
      raise ValueError(f"data.source={config.data.source!r}; choose 'json' or 'tfds'")
    if config.data.source == "json" and not (config.data.train_file and config.data.dev_file):
      raise ValueError("--config.data.train_file and --config.data.dev_file are required (the "
                       "official SQuAD JSON files)")

  def _read(self, split: str) -> list[squad.SquadExample]:
    data = self.config.data
    if data.source == "tfds":
      name = "squad/v2.0" if self.version_2 else "squad/v1.1"
      return squad.read_tfds(name, "train" if split == "train" else "validation",
                             data.tfds_data_dir or None)
    return squad.read_squad_json(data.train_file if split == "train" else data.dev_file)

  def _features(self, examples, is_training: bool):
    data = self.config.data
    return squad.make_features(examples, self.tokenizer, max_seq_length=data.max_seq_length,
                               doc_stride=data.doc_stride, max_query_length=data.max_query_length,
                               is_training=is_training)

  @functools.cache
  def all_train_examples(self):
    return self._read("train")

  @functools.cache
  def train_features(self):
    examples = choose_train_examples(self.all_train_examples(), self.config.train)
    features = self._features(examples, is_training=True)
    return {k: np.asarray(getattr(features, k)) for k in
            ("input_ids", "input_mask", "segment_ids", "start_positions", "end_positions")}

  @functools.cache
  def eval_sets(self):
    examples = self._read("dev")
    features = self._features(examples, is_training=False)
    arrays = {k: np.asarray(getattr(features, k)) for k in
              ("input_ids", "input_mask", "segment_ids")}
    return [EvalSet("dev", arrays, True, (examples, features))]

  def _decode(self, eval_set, outputs):
    examples, features = eval_set.context
    data = self.config.data
    return squad.postprocess(examples, features, outputs[..., 0], outputs[..., 1],
                             n_best_size=data.n_best_size, max_answer_length=data.max_answer_length,
                             version_2=self.version_2)

  def _scores(self, eval_set, nbest, predictions, null_odds):
    """Official metrics; for v2.0 with the null-odds threshold searched on this set."""
    if not self.version_2:
      return squad_eval.evaluate(eval_set.context[0], predictions)
    best_spans = squad.apply_null_threshold(nbest, null_odds, math.inf)
    return squad_eval.evaluate(eval_set.context[0], best_spans, null_odds)

  def metrics(self, eval_set, outputs):
    predictions, nbest, null_odds = self._decode(eval_set, outputs)
    return self._scores(eval_set, nbest, predictions, null_odds)

  def write_predictions(self, eval_set, outputs, directory):
    predictions, nbest, null_odds = self._decode(eval_set, outputs)
    if not self.version_2:
      return squad.write_predictions(directory, predictions, nbest)
    # v2.0: answer "" where the null odds exceed the threshold that maximised F1 on this dev set.
    threshold = self._scores(eval_set, nbest, predictions, null_odds)["best_f1_thresh"]
    predictions = squad.apply_null_threshold(nbest, null_odds, threshold)
    return squad.write_predictions(directory, predictions, nbest, null_odds)


def _exists(path: str) -> bool:
  fs, local = fsspec.core.url_to_fs(path)
  return fs.exists(local)


def check_inputs(config: ml_collections.ConfigDict):
  """Refuses, before anything is read or compiled, a run whose input files are missing: the task's
  train and dev files and the tokenizer given as `--config.tokenizer` (the init checkpoint is
  checked by `pretrained.locate`). One error names every missing file."""
  problems, data = [], config.data
  if config.tokenizer and not _exists(config.tokenizer):
    problems.append(f"tokenizer={config.tokenizer}: no such file")
  if config.task.startswith("squad"):
    if data.source == "json":
      for key in ("train_file", "dev_file"):
        if data[key] and not _exists(data[key]):
          problems.append(f"data.{key}={data[key]}: no such file")
  elif data.source == "glue" and data.dir:
    spec = glue.get_task(config.task)
    if not _exists(data.dir):
      problems.append(f"data.dir={data.dir}: no such folder (the GLUE folder of {config.task})")
    else:
      for split in ("train", *spec.dev_splits):
        try:
          glue.find_file(spec, data.dir, split)
        except FileNotFoundError as e:
          problems.append(str(e))
  if problems:
    raise FileNotFoundError("; ".join(problems))


def make_task(config: ml_collections.ConfigDict, tokenizer) -> Task:
  if config.task.startswith("squad"):
    return SquadTask(config, tokenizer)
  return GlueTask(config, tokenizer)
