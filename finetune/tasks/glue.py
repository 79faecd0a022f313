"""GLUE: the tasks, their readers (official TSV folders and TFDS), features, metrics, submissions.

Readers turn every task's own file layout into one `Example` type, with labels already mapped to ids
in the order of `TaskSpec.label_names` (google-research/bert's orders, e.g. MNLI's
contradiction/entailment/neutral), so the rest of fine-tuning never looks at a task's TSV quirks.

The TSV readers expect the folders exactly as the GLUE download script writes them: one folder per
task (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI) with train.tsv/dev.tsv/test.tsv (MNLI:
dev_matched, dev_mismatched, test_matched, test_mismatched), and the AX diagnostic set at
diagnostic/diagnostic.tsv. `data_dir` may be the task's own folder or the GLUE root above it.
Files are split on tabs only, without quoting (csv.QUOTE_NONE, as google-research/bert reads them):
GLUE sentences contain stray quote characters that a quoting reader would merge across lines.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence

import fsspec
import numpy as np
from absl import logging

from finetune import metrics as metrics_lib
from finetune.tasks import tfds_source

NLI_LABELS = ("contradiction", "entailment", "neutral")   # google-research/bert's MNLI order
_TFDS_NLI_LABELS = ("entailment", "neutral", "contradiction")  # TFDS glue/mnli's ClassLabel order


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a GLUE task is: labels, metrics, splits and leaderboard files.

  Attributes:
    name: our key ("sst2"), also the TFDS config (`glue/sst2`).
    folder: the folder the GLUE download script writes the task's files to ("SST-2").
    num_labels: number of classes; 1 for STS-B, whose head regresses a score.
    label_names: labels as the TSV files spell them, in id order; None for regression.
    metric_names: GLUE's official metrics for the task (keys of `finetune.metrics.METRICS`).
    main_metric: the one that picks the best checkpoint. STS-B uses Spearman, the figure the BERT
      paper reports; MRPC and QQP use F1 (the BERT paper's figure) with accuracy reported beside it.
    dev_splits: evaluation splits with labels (MNLI has a matched and a mismatched one).
    test_splits: unlabelled splits whose predictions go to the leaderboard.
    submission_files: the leaderboard's file name for each of `test_splits`.
    has_train: False for AX, which is predicted by a model trained on MNLI.
    tfds_label_names: TFDS's class names in TFDS's id order, spelt as in `label_names`, where TFDS
      orders the classes differently from the TSV convention (MNLI and AX); None when the same.
  """
  name: str
  folder: str
  num_labels: int
  label_names: tuple[str, ...] | None
  metric_names: tuple[str, ...]
  main_metric: str
  dev_splits: tuple[str, ...] = ("dev",)
  test_splits: tuple[str, ...] = ("test",)
  submission_files: tuple[str, ...] = ()
  has_train: bool = True
  tfds_label_names: tuple[str, ...] | None = None

  @property
  def is_regression(self) -> bool:
    return self.label_names is None

  @property
  def splits(self) -> tuple[str, ...]:
    return ("train",) * self.has_train + self.dev_splits + self.test_splits

  def submission_file(self, split: str) -> str:
    """The leaderboard file name for a test split, e.g. "MNLI-m.tsv" for mnli's test_matched."""
    if split not in self.test_splits:
      raise ValueError(f"{self.name} has no test split {split!r}; its test splits are "
                       f"{', '.join(self.test_splits)}")
    return self.submission_files[self.test_splits.index(split)]


_BINARY = ("0", "1")
_RTE = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("cola", "CoLA", 2, _BINARY, ("mcc",), "mcc", submission_files=("CoLA.tsv",)),
    TaskSpec("sst2", "SST-2", 2, _BINARY, ("accuracy",), "accuracy",
             submission_files=("SST-2.tsv",)),
    TaskSpec("mrpc", "MRPC", 2, _BINARY, ("f1", "accuracy"), "f1", submission_files=("MRPC.tsv",)),
    TaskSpec("stsb", "STS-B", 1, None, ("pearson", "spearman"), "spearman",
             submission_files=("STS-B.tsv",)),
    TaskSpec("qqp", "QQP", 2, _BINARY, ("f1", "accuracy"), "f1", submission_files=("QQP.tsv",)),
    TaskSpec("mnli", "MNLI", 3, NLI_LABELS, ("accuracy",), "accuracy",
             dev_splits=("dev_matched", "dev_mismatched"),
             test_splits=("test_matched", "test_mismatched"),
             submission_files=("MNLI-m.tsv", "MNLI-mm.tsv"), tfds_label_names=_TFDS_NLI_LABELS),
    TaskSpec("qnli", "QNLI", 2, _RTE, ("accuracy",), "accuracy", submission_files=("QNLI.tsv",)),
    TaskSpec("rte", "RTE", 2, _RTE, ("accuracy",), "accuracy", submission_files=("RTE.tsv",)),
    TaskSpec("wnli", "WNLI", 2, _BINARY, ("accuracy",), "accuracy", submission_files=("WNLI.tsv",)),
    # The leaderboard scores AX by R3, the K-class Matthews correlation; its labels are private.
    TaskSpec("ax", "diagnostic", 3, NLI_LABELS, ("mcc",), "mcc", dev_splits=(),
             submission_files=("AX.tsv",), has_train=False, tfds_label_names=_TFDS_NLI_LABELS),
)}


def get_task(name: str | TaskSpec) -> TaskSpec:
  """The spec of a task by name; case, '-' and '_' are ignored ("SST-2" is sst2)."""
  if isinstance(name, TaskSpec):
    return name
  key = str(name).lower().replace("-", "").replace("_", "")
  if key not in TASKS:
    raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")
  return TASKS[key]


@dataclasses.dataclass(frozen=True)
class Example:
  """One sentence or sentence pair.

  guid: the file's own index/id column where it has one (so test predictions can be matched to
    the leaderboard's rows), else the 0-based row number; TFDS's `idx`.
  label: an id into `TaskSpec.label_names`, a float score for STS-B, None on test splits.
  """
  guid: str
  text_a: str
  text_b: str | None
  label: int | float | None


# ------------------------------------------------------------------------------------------------
# Official GLUE TSV folders

# Per task: header names of (text_a, text_b, label, row id). Test files have the same names less
# the label. CoLA's train/dev files have no header; _COLA_COLUMNS names their four columns.
_TSV_COLUMNS = {
    "cola": ("sentence", None, "label", "index"),
    "sst2": ("sentence", None, "label", "index"),
    "mrpc": ("#1 String", "#2 String", "Quality", "index"),
    "stsb": ("sentence1", "sentence2", "score", "index"),
    "qqp": ("question1", "question2", "is_duplicate", "id"),
    "mnli": ("sentence1", "sentence2", "gold_label", "index"),
    "qnli": ("question", "sentence", "label", "index"),
    "rte": ("sentence1", "sentence2", "label", "index"),
    "wnli": ("sentence1", "sentence2", "label", "index"),
    "ax": ("sentence1", "sentence2", None, "index"),
}
_COLA_COLUMNS = ("source", "label", "mark", "sentence")
_AX_FILES = ("diagnostic.tsv", "AX.tsv")   # the download script's name, and GLUE's own


def _split_error(spec: TaskSpec, split: str) -> ValueError:
  return ValueError(f"GLUE task {spec.name} has no split {split!r}; its splits are "
                    f"{', '.join(spec.splits)}")


def find_file(spec: TaskSpec, data_dir: str, split: str) -> str:
  """The split's TSV under the task folder `data_dir`, or under `data_dir/<task folder>`."""
  names = _AX_FILES if spec.name == "ax" else (f"{split}.tsv",)
  fs, root = fsspec.core.url_to_fs(str(data_dir))
  candidates = [posixpath.join(d, n) for d in (root, posixpath.join(root, spec.folder))
                for n in names]
  for candidate in candidates:
    if fs.isfile(candidate):
      return fs.unstrip_protocol(candidate) if "://" in str(data_dir) else candidate
  raise FileNotFoundError(f"GLUE {spec.name} split {split!r}: none of {', '.join(candidates)} "
                          "exists; give the task's folder or the GLUE root as data_dir")


def _read_rows(path: str) -> list[tuple[int, list[str]]]:
  """(1-based line number, tab-separated fields) of each non-blank line; a BOM is dropped.

  Lines end at "\\n" only, so a stray "\\r" inside a sentence does not split a row.
  """
  with fsspec.open(path, "rt", encoding="utf-8-sig", newline="\n") as f:
    lines = f.read().split("\n")
  return [(i + 1, line.rstrip("\r").split("\t")) for i, line in enumerate(lines)
          if line.rstrip("\r")]


def _parse_label(spec: TaskSpec, value: str, where: str) -> int | float:
  if spec.is_regression:
    try:
      return float(value)
    except ValueError:
      raise ValueError(f"{where}: score {value!r} is not a number") from None
  if value not in spec.label_names:
    raise ValueError(f"{where}: label {value!r} is not one of {list(spec.label_names)}")
  return spec.label_names.index(value)


def read_glue(task: str | TaskSpec, data_dir: str, split: str) -> list[Example]:
  """The examples of one split of a GLUE task from its official TSV file.

  Args:
    task: a task name or spec (see `TASKS`).
    data_dir: the task's folder (e.g. glue_data/RTE), or the GLUE root holding it.
    split: one of `get_task(task).splits`, e.g. "train", "dev", "dev_matched", "test".

  Rows of QQP whose field count differs from the header's (questions broken over lines in the
  distributed file) are skipped and counted in a warning; in every other task a short row is an
  error, as is an unknown label. Errors name the file and line.
  """
  spec = get_task(task)
  if split not in spec.splits:
    raise _split_error(spec, split)
  path = find_file(spec, data_dir, split)
  rows = _read_rows(path)
  text_a, text_b, label, guid = _TSV_COLUMNS[spec.name]
  is_test = split in spec.test_splits
  if spec.name == "cola" and not is_test:
    header = list(_COLA_COLUMNS)
  else:
    if not rows:
      raise ValueError(f"{path} is empty; expected a header line")
    header = rows.pop(0)[1]
  wanted = {"text_a": text_a, "text_b": text_b, "label": None if is_test else label}
  missing = [name for name in wanted.values() if name is not None and name not in header]
  if missing:
    raise ValueError(f"{path}: no column {missing} in header {header} (is this GLUE {spec.name}'s "
                     f"{split} file?)")
  column = {key: header.index(name) for key, name in wanted.items() if name is not None}
  guid_column = header.index(guid) if guid in header else None
  needed = max(column.values()) + 1
  examples, skipped = [], 0
  for row_number, (line, fields) in enumerate(rows):
    if spec.name == "qqp" and len(fields) != len(header):
      skipped += 1
      continue
    if len(fields) < needed:
      raise ValueError(f"{path}:{line}: {len(fields)} tab-separated fields, expected at least "
                       f"{needed} ({header})")
    examples.append(Example(
        guid=fields[guid_column] if guid_column is not None else str(row_number),
        text_a=fields[column["text_a"]],
        text_b=fields[column["text_b"]] if "text_b" in column else None,
        label=(_parse_label(spec, fields[column["label"]], f"{path}:{line}")
               if "label" in column else None)))
  if skipped:
    logging.warning("%s: skipped %d malformed rows (field count differs from the header's %d)",
                    path, skipped, len(header))
  return examples


# ------------------------------------------------------------------------------------------------
# TFDS (glue/<task>)

_TFDS_TEXT = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
_TFDS_SPLITS = {"dev": "validation", "dev_matched": "validation_matched",
                "dev_mismatched": "validation_mismatched"}


def _tfds_records(name: str, split: str, data_dir: str | None):
  return tfds_source.records(name, split, data_dir, "tensorflow_datasets.text.glue")


def _as_text(value) -> str:
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds(task: str | TaskSpec, split: str, data_dir: str | None = None) -> list[Example]:
  """The examples of `glue/<task>` from TensorFlow Datasets, as `read_glue` gives them.

  `split` is one of our split names ("dev" reads TFDS's "validation", "dev_matched" its
  "validation_matched"), or any TFDS split string such as "train[:10%]". Labels are mapped from
  TFDS's class order to `label_names`' order; test splits (TFDS label -1) get None. Examples are
  sorted by `idx`, the row number in GLUE's file, so their order matches the TSV reader's.
  """
  spec = get_task(task)
  text_a, text_b = _TFDS_TEXT[spec.name]
  tfds_names = spec.tfds_label_names or spec.label_names
  tfds_split = _TFDS_SPLITS.get(split, split)
  is_test = split in spec.test_splits or tfds_split.startswith("test")
  examples = []
  for record in _tfds_records(f"glue/{spec.name}", tfds_split, data_dir):
    label = np.asarray(record["label"]).item()
    if is_test or label < 0:
      label = None
    elif spec.is_regression:
      label = float(label)
    else:
      label = spec.label_names.index(tfds_names[int(label)])
    examples.append(Example(guid=str(int(record["idx"])), text_a=_as_text(record[text_a]),
                            text_b=_as_text(record[text_b]) if text_b else None, label=label))
  examples.sort(key=lambda e: int(e.guid))
  return examples


# ------------------------------------------------------------------------------------------------
# Features, metrics, submissions


def truncated_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths google-research/bert's `_truncate_seq_pair` leaves, without its token-by-token loop.

  That loop drops the last token of the longer sequence (of b on a tie) until the pair fits, so
  the shorter one is kept whole if the longer can absorb the cut; otherwise both end up at half
  the budget, a taking the odd token.
  """
  if len_a + len_b <= budget:
    return len_a, len_b
  shorter = min(len_a, len_b)
  if 2 * shorter <= budget:
    longer = budget - shorter
    return (longer, shorter) if len_a > len_b else (shorter, longer)
  return (budget + 1) // 2, budget // 2


def make_features(examples: Sequence[Example], tokenizer, max_seq_length: int, *,
                  regression: bool | None = None) -> dict[str, np.ndarray]:
  """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` arrays for a list of examples.

  Returns int32 `input_ids`, `input_mask` (1 on real tokens), `segment_ids` (1 on b and its [SEP]),
  all [num_examples, max_seq_length] and padded with `tokenizer.pad_id`, and `label`: int32 ids, or
  float32 scores when `regression` (by default: when any label is a float); 0 where unlabelled.
  All texts are tokenized in two `encode_batch` calls, which the tokenizers parallelise.
  """
  if max_seq_length < 3:
    raise ValueError(f"max_seq_length={max_seq_length}: need at least 3 for [CLS] a [SEP]")
  n = len(examples)
  tokens_a = [ids for ids, _ in tokenizer.encode_batch([e.text_a for e in examples])]
  tokens_b: list[np.ndarray | None] = [None] * n
  paired = [i for i, e in enumerate(examples) if e.text_b is not None]
  for i, (ids, _) in zip(paired, tokenizer.encode_batch([examples[i].text_b for i in paired])):
    tokens_b[i] = ids
  input_ids = np.full((n, max_seq_length), tokenizer.pad_id, np.int32)
  input_mask = np.zeros((n, max_seq_length), np.int32)
  segment_ids = np.zeros((n, max_seq_length), np.int32)
  cls, sep = np.array([tokenizer.cls_id], np.int32), np.array([tokenizer.sep_id], np.int32)
  for i, (a, b) in enumerate(zip(tokens_a, tokens_b)):
    if b is None:
      first, second = np.concatenate([cls, a[:max_seq_length - 2], sep]), sep[:0]
    else:
      len_a, len_b = truncated_lengths(a.size, b.size, max_seq_length - 3)
      first, second = np.concatenate([cls, a[:len_a], sep]), np.concatenate([b[:len_b], sep])
    end = first.size + second.size
    input_ids[i, :end] = np.concatenate([first, second])
    input_mask[i, :end] = 1
    segment_ids[i, first.size:end] = 1
  if regression is None:
    regression = any(isinstance(e.label, float) for e in examples)
  label = np.array([0 if e.label is None else e.label for e in examples],
                   np.float32 if regression else np.int32).reshape(n)
  return {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids,
          "label": label}


def compute_metrics(task: str | TaskSpec, predictions, labels) -> dict[str, float]:
  """The task's official metrics, plus "combined" (their mean, GLUE's per-task score) where two.

  `predictions` are class ids, logits [n, num_labels] (argmax is taken), or STS-B scores.
  """
  spec = get_task(task)
  predictions = np.asarray(predictions)
  if spec.is_regression:
    predictions = predictions.reshape(-1)
  elif predictions.ndim == 2:
    predictions = predictions.argmax(axis=-1)
  results = {name: metrics_lib.METRICS[name](predictions, labels) for name in spec.metric_names}
  if len(results) == 2:
    results["combined"] = float(np.mean(list(results.values())))
  return results


def write_predictions(path: str, task: str | TaskSpec, indices: Sequence, predictions) -> None:
  """Writes a leaderboard file: an `index\\tprediction` header, then one row per example.

  Predictions are written as label strings (entailment, ... for the NLI tasks; 0/1 for the binary
  ones, whose labels are those digits), or as scores with 3 decimals for STS-B. Name the file with
  `TaskSpec.submission_file(split)`.
  """
  spec = get_task(task)
  predictions = np.asarray(predictions)
  if spec.is_regression:
    values = [f"{x:.3f}" for x in predictions.reshape(-1).astype(np.float64)]
  else:
    if predictions.ndim == 2:
      predictions = predictions.argmax(axis=-1)
    values = [spec.label_names[int(p)] for p in predictions]
  if len(values) != len(indices):
    raise ValueError(f"{len(values)} predictions for {len(indices)} indices")
  fs, local = fsspec.core.url_to_fs(str(path))
  parent = posixpath.dirname(local)
  if parent:
    fs.makedirs(parent, exist_ok=True)
  with fsspec.open(str(path), "w", encoding="utf-8") as f:
    f.write("index\tprediction\n")
    f.writelines(f"{index}\t{value}\n" for index, value in zip(indices, values))
