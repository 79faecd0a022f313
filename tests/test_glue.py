"""GLUE: task specs, readers on the real ../shared/data TSVs and on fixtures in every other task's
official layout, TFDS mock data, and the fine-tuning task's view of MNLI. Metrics, features and
leaderboard files are in test_glue_features.py."""

import logging
import sys

import pytest

from finetune import metrics
from finetune.tasks import glue
from tests.helpers import SHARED_DATA, WordTokenizer

GLUE_FORMAT = SHARED_DATA / "glue_format"


# ------------------------------------------------------------------------------------------------
# Task specs


def test_tasks_cover_glue_and_its_leaderboard_files():
  assert list(glue.TASKS) == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli",
                              "ax"]
  files = [f for spec in glue.TASKS.values() for f in spec.submission_files]
  assert sorted(files) == sorted(["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv",
                                  "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv",
                                  "AX.tsv"])
  for spec in glue.TASKS.values():
    assert len(spec.submission_files) == len(spec.test_splits)
    assert spec.main_metric in spec.metric_names
    assert set(spec.metric_names) <= set(metrics.METRICS)
    assert spec.num_labels == (1 if spec.is_regression else len(spec.label_names))
  mnli = glue.get_task("MNLI")
  assert mnli.splits == ("train", "dev_matched", "dev_mismatched", "test_matched",
                         "test_mismatched")
  assert mnli.submission_file("test_mismatched") == "MNLI-mm.tsv"
  assert glue.get_task("SST-2") is glue.TASKS["sst2"] and glue.get_task("sts_b").is_regression
  ax = glue.get_task("ax")
  assert ax.splits == ("test",) and ax.label_names == mnli.label_names
  assert (glue.get_task("cola").main_metric, glue.get_task("mrpc").main_metric,
          glue.get_task("stsb").main_metric) == ("mcc", "f1", "spearman")


def test_unknown_task_and_split_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="valid tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli"):
    glue.get_task("squad")
  with pytest.raises(ValueError, match=r"no split 'dev'.*train, dev_matched, dev_mismatched"):
    glue.read_glue("mnli", tmp_path, "dev")
  with pytest.raises(ValueError, match="no test split 'dev'"):
    glue.get_task("rte").submission_file("dev")


# ------------------------------------------------------------------------------------------------
# Real data in the SST-2, CoLA and RTE layouts


@pytest.mark.parametrize("task,folder,counts,labels,first", [
    ("sst2", "polarity", (3400, 600), {"0", "1"},
     "a gentle blend of present day testimonials"),
    ("cola", "uncertainty", (2500, 500), {"0", "1"},
     "These drugs may also have adverse pharmacological effects.'"),  # the stray quote is kept
    ("rte", "presupp_nli", (600, 135), {"entailment", "not_entailment"},
     "Well, there was no war."),
], ids=["sst2-polarity", "cola-uncertainty", "rte-presupp_nli"])
def test_real_data(task, folder, counts, labels, first):
  if not (GLUE_FORMAT / folder).is_dir():
    pytest.skip(f"real GLUE-format data not found at {GLUE_FORMAT / folder}")
  spec = glue.get_task(task)
  train, dev = (glue.read_glue(task, GLUE_FORMAT / folder, split) for split in ("train", "dev"))
  assert (len(train), len(dev)) == counts
  for examples in (train, dev):
    assert {spec.label_names[e.label] for e in examples} == labels
    assert all(e.text_a for e in examples)
    assert all((e.text_b is not None) == (task == "rte") for e in examples)
    assert len({e.guid for e in examples}) == len(examples)
  assert train[0].text_a.startswith(first)


# ------------------------------------------------------------------------------------------------
# Fixtures in the other tasks' official layouts (as the GLUE download script writes them)


def _tsv(*rows):
  return "".join("\t".join(map(str, row)) + "\n" for row in rows)


def _parse(sentence):
  words = sentence.rstrip(".?").split()
  return f"( {' '.join(words)} )", f"(ROOT (S {' '.join(f'(NN {w})' for w in words)}))"


def _mnli_row(i, s1, s2, labels):
  (b1, p1), (b2, p2) = _parse(s1), _parse(s2)
  return (i, 31193 + i, f"{31193 + i}n", "government", b1, b2, p1, p2, s1, s2, *labels)


_MNLI = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
         "sentence1_parse", "sentence2_parse", "sentence1", "sentence2")
_STSB = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
         "sentence2")

FIXTURES = {
    # MRPC's train/dev keep the SentEval file's header, byte-order mark included.
    "MRPC/train.tsv": "\ufeff" + _tsv(
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        (1, 702876, 702977, 'He said " no " twice .', 'Twice , he said " no " .'),
        (0, 2108705, 2108831, "Shares rose 3 % on Monday .", "The firm hired a new chief .")),
    "MRPC/dev.tsv": "\ufeff" + _tsv(
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        (1, 1355540, 1355592, "The vote was 5-4 .", "Five justices voted for it , four against .")),
    "MRPC/test.tsv": _tsv(("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
                          (0, 1089874, 1089925, "A cat sat .", "A cat was sitting .")),
    "STS-B/train.tsv": _tsv(
        _STSB + ("score",),
        (0, "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
         "An air plane is taking off.", "5.000"),
        (1, "main-news", "headlines", "2013", "0042", "none", "none", "Stocks fall.",
         "Rain is expected.", "0.250")),
    "STS-B/test.tsv": _tsv(_STSB, (0, "main-captions", "MSRvid", "2012test", "0024", "none",
                                   "none", "A girl is styling her hair.", "A girl is brushing.")),
    "QQP/train.tsv": _tsv(
        ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
        (133273, 213221, 213222, "How do I learn Go?", "What is the best way to learn Go?", 1),
        # A question broken over two lines in the distributed file: two malformed rows.
        (201841, 303951, 303952, "Why is the sky blue"),
        ("on clear days?", "Why is grass green?", 0),
        (85531, 144110, 144111, "Is 7 prime?", "Is 9 prime?", 0)),
    "QQP/test.tsv": _tsv(("id", "question1", "question2"),
                         (0, "Should I buy a laptop?", "Which laptop should I buy?")),
    "MNLI/train.tsv": _tsv(
        _MNLI + ("label1", "gold_label"),
        _mnli_row(0, "The cat sat on the mat.", "A cat sat.", ["entailment"] * 2),
        _mnli_row(1, "He left early.", "He never left.", ["contradiction"] * 2)),
    "MNLI/dev_matched.tsv": _tsv(
        _MNLI + ("label1", "label2", "label3", "label4", "label5", "gold_label"),
        _mnli_row(0, "It rained all day.", "The ground got wet.",
                  ["neutral", "entailment", "neutral", "neutral", "neutral", "neutral"])),
    "MNLI/dev_mismatched.tsv": _tsv(
        _MNLI + ("label1", "label2", "label3", "label4", "label5", "gold_label"),
        _mnli_row(0, "Open the door.", "Close the door.", ["contradiction"] * 6)),
    "MNLI/test_matched.tsv": _tsv(_MNLI, _mnli_row(0, "Birds fly.", "Some birds fly.", [])),
    "MNLI/test_mismatched.tsv": _tsv(_MNLI, _mnli_row(0, "Fish swim.", "Fish walk.", []),
                                     _mnli_row(1, "We won.", "We lost.", [])),
    "QNLI/train.tsv": _tsv(("index", "question", "sentence", "label"),
                           (0, "When was it built?", "It was built in 1900.", "entailment"),
                           (1, "Who wrote it?", "The roof is red.", "not_entailment")),
    "QNLI/test.tsv": _tsv(("index", "question", "sentence"), (0, "Why?", "Because.")),
    "WNLI/train.tsv": _tsv(("index", "sentence1", "sentence2", "label"),
                           (0, "The trophy did not fit in the case because it was too big.",
                            "The trophy was too big.", 1),
                           (1, "Sam thanked Tom because he helped.", "Sam helped.", 0)),
    "WNLI/test.tsv": _tsv(("index", "sentence1", "sentence2"), (0, "A saw B.", "B saw A.")),
    "SST-2/test.tsv": _tsv(("index", "sentence"), (0, "a fine film ."), (1, "dull .")),
    "CoLA/test.tsv": _tsv(("index", "sentence"), (0, "Bill left."), (1, "Left Bill the.")),
    "RTE/test.tsv": _tsv(("index", "sentence1", "sentence2"), (0, "Paris is in France.",
                                                               "Paris is French.")),
    "diagnostic/diagnostic.tsv": _tsv(("index", "sentence1", "sentence2"),
                                      (0, "The cat sat on the mat.", "The cat did not sit."),
                                      (1, "Tom is taller than Ann.", "Ann is shorter than Tom.")),
}


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("glue_data")
  for name, text in FIXTURES.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text, encoding="utf-8")
  return root


def _read(root, task, split):
  """Reads from the GLUE root and from the task's own folder, which must agree."""
  examples = glue.read_glue(task, root, split)
  assert glue.read_glue(task, root / glue.get_task(task).folder, split) == examples
  return examples


def _rows(examples):
  return [(e.guid, e.text_a, e.text_b, e.label) for e in examples]


def test_mrpc_layout(glue_root):
  assert _rows(_read(glue_root, "mrpc", "train")) == [
      ("0", 'He said " no " twice .', 'Twice , he said " no " .', 1),
      ("1", "Shares rose 3 % on Monday .", "The firm hired a new chief .", 0)]
  assert _rows(_read(glue_root, "mrpc", "dev"))[0][3] == 1
  assert _rows(_read(glue_root, "mrpc", "test")) == [
      ("0", "A cat sat .", "A cat was sitting .", None)]


def test_stsb_layout(glue_root):
  assert _rows(_read(glue_root, "stsb", "train")) == [
      ("0", "A plane is taking off.", "An air plane is taking off.", 5.0),
      ("1", "Stocks fall.", "Rain is expected.", 0.25)]
  assert _rows(_read(glue_root, "stsb", "test")) == [
      ("0", "A girl is styling her hair.", "A girl is brushing.", None)]


def test_qqp_skips_and_counts_malformed_rows(glue_root, caplog):
  with caplog.at_level(logging.WARNING):
    examples = glue.read_glue("qqp", glue_root, "train")
  assert _rows(examples) == [
      ("133273", "How do I learn Go?", "What is the best way to learn Go?", 1),
      ("85531", "Is 7 prime?", "Is 9 prime?", 0)]
  assert "skipped 2 malformed rows" in caplog.text
  assert _rows(_read(glue_root, "qqp", "test")) == [
      ("0", "Should I buy a laptop?", "Which laptop should I buy?", None)]


def test_mnli_layouts(glue_root):
  labels = glue.get_task("mnli").label_names
  assert labels == ("contradiction", "entailment", "neutral")
  train = _read(glue_root, "mnli", "train")
  assert _rows(train) == [("0", "The cat sat on the mat.", "A cat sat.", 1),
                          ("1", "He left early.", "He never left.", 0)]
  assert _rows(_read(glue_root, "mnli", "dev_matched")) == [
      ("0", "It rained all day.", "The ground got wet.", 2)]   # gold_label, not label1
  assert [e.label for e in _read(glue_root, "mnli", "dev_mismatched")] == [0]
  assert _rows(_read(glue_root, "mnli", "test_matched")) == [
      ("0", "Birds fly.", "Some birds fly.", None)]
  assert [e.text_b for e in _read(glue_root, "mnli", "test_mismatched")] == ["Fish walk.",
                                                                            "We lost."]


def test_qnli_wnli_and_test_files(glue_root):
  assert _rows(_read(glue_root, "qnli", "train")) == [
      ("0", "When was it built?", "It was built in 1900.", 0),
      ("1", "Who wrote it?", "The roof is red.", 1)]
  assert _rows(_read(glue_root, "qnli", "test")) == [("0", "Why?", "Because.", None)]
  assert [e.label for e in _read(glue_root, "wnli", "train")] == [1, 0]
  assert _rows(_read(glue_root, "wnli", "test")) == [("0", "A saw B.", "B saw A.", None)]
  assert _rows(_read(glue_root, "sst2", "test")) == [("0", "a fine film .", None, None),
                                                     ("1", "dull .", None, None)]
  assert _rows(_read(glue_root, "cola", "test")) == [("0", "Bill left.", None, None),
                                                     ("1", "Left Bill the.", None, None)]
  assert _rows(_read(glue_root, "rte", "test")) == [
      ("0", "Paris is in France.", "Paris is French.", None)]


def test_ax_is_found_at_diagnostic_tsv(glue_root):
  examples = _read(glue_root, "ax", "test")
  assert _rows(examples) == [("0", "The cat sat on the mat.", "The cat did not sit.", None),
                             ("1", "Tom is taller than Ann.", "Ann is shorter than Tom.", None)]


def test_reader_errors_name_file_line_and_value(tmp_path):
  (tmp_path / "train.tsv").write_text(_tsv(("index", "sentence1", "sentence2", "label"),
                                           (0, "a", "b", "entailment"), (1, "c", "d", "maybe")))
  with pytest.raises(ValueError, match=r"train\.tsv:3: label 'maybe' is not one of"):
    glue.read_glue("rte", tmp_path, "train")
  (tmp_path / "dev.tsv").write_text(_tsv(("index", "sentence1", "sentence2", "label"), (0, "a")))
  with pytest.raises(ValueError, match=r"dev\.tsv:2: 2 tab-separated fields"):
    glue.read_glue("rte", tmp_path, "dev")
  with pytest.raises(FileNotFoundError, match=r"test\.tsv.*RTE/test\.tsv"):
    glue.read_glue("rte", tmp_path, "test")
  root = tmp_path / "glue"
  (root / "STS-B").mkdir(parents=True)
  (root / "STS-B" / "dev.tsv").write_text(_tsv(_STSB + ("score",), (0,) * 9 + ("high",)))
  with pytest.raises(ValueError, match=r"STS-B/dev\.tsv:2: score 'high' is not a number"):
    glue.read_glue("stsb", root, "dev")
  # A dev.tsv of another task in data_dir is read first, and its header says it is not STS-B's.
  with pytest.raises(ValueError, match=r"no column \['score'\] in header \['index', 'sentence1'"):
    glue.read_glue("stsb", tmp_path, "dev")


# ------------------------------------------------------------------------------------------------
# TFDS


def test_tfds_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6):
    for task, split in [("cola", "train"), ("stsb", "dev"), ("mrpc", "test"), ("qqp", "train"),
                        ("qnli", "dev"), ("rte", "train"), ("wnli", "dev"), ("sst2", "test"),
                        ("mnli", "dev_matched"), ("mnli", "test_mismatched"), ("ax", "test")]:
      spec = glue.get_task(task)
      examples = glue.read_tfds(task, split)
      assert len(examples) == 6
      assert [int(e.guid) for e in examples] == sorted(int(e.guid) for e in examples)
      assert all(isinstance(e.text_a, str) for e in examples)
      assert all(isinstance(e.text_b, str) == (task not in ("cola", "sst2")) for e in examples)
      if split.startswith("test"):
        assert all(e.label is None for e in examples)
      elif spec.is_regression:
        assert all(isinstance(e.label, float) for e in examples)
      else:
        assert all(0 <= e.label < spec.num_labels for e in examples)
    # TFDS orders MNLI's classes entailment/neutral/contradiction; ours are BERT's order.
    source = tfds.data_source("glue/mnli", split="validation_mismatched")
    raw = {int(r["idx"]): int(r["label"]) for r in (source[i] for i in range(len(source)))}
    tfds_names = ("entailment", "neutral", "contradiction")
    for e in glue.read_tfds("mnli", "dev_mismatched"):
      assert glue.NLI_LABELS[e.label] == tfds_names[raw[int(e.guid)]]


def test_tfds_missing_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    glue.read_tfds("rte", "train")


# ------------------------------------------------------------------------------------------------
# The fine-tuning task's view of MNLI: two dev sets, three leaderboard files


@pytest.mark.parametrize("folder", ["MNLI", "."])
def test_mnli_task_predicts_both_test_sets_and_ax(glue_root, folder):
  """The fine-tuning loop's view of MNLI: two dev sets, and leaderboard files for test_matched,
  test_mismatched and AX (found beside the task folder, or under the root given as data.dir)."""
  from configs.glue import get_config  # pylint: disable=g-import-not-at-top
  from finetune.task import make_task  # pylint: disable=g-import-not-at-top
  config = get_config("mnli")
  config.data.dir = str(glue_root / folder)
  task = make_task(config, WordTokenizer())
  assert task.main_metric == "dev_matched/accuracy" and task.num_labels == 3
  assert [s.name for s in task.eval_sets()] == ["dev_matched", "dev_mismatched"]
  predict = task.predict_sets()
  assert [s.name for s in predict] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
  ax = predict[-1]
  assert ax.context == [e.guid for e in glue.read_glue("ax", glue_root, "test")]
  assert ax.features["input_ids"].shape[0] == len(ax.context)
