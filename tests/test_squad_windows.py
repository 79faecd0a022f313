"""SQuAD on a hand WordPiece vocabulary of number words, worked out by hand: windowed features
(layout, doc stride, max context, answer labels, a long question, training examples without their
answer), n-best decoding of those windows back to the original text (limits, max context, v2.0's
null answer) and the prediction files. Readers, quoref and the official metrics are in
test_squad.py."""

import json
import math

import numpy as np
import pytest

from finetune.tasks import squad
from finetune.tasks.squad import SquadExample
from pretrain.data.tokenizer import SPECIAL_TOKENS, load_tokenizer


# ------------------------------------------------------------------------------------------------
# Features

_NUMBERS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
            "fifteen sixteen seventeen eighteen nineteen twenty").split()
_CONTEXT = "One two three four five six seven eight nine ten eleven  Twelve " + " ".join(
    _NUMBERS[12:])


@pytest.fixture(scope="module")
def number_tokenizer(tmp_path_factory):
  """An uncased hand WordPiece vocab where every number word is one token."""
  path = tmp_path_factory.mktemp("numbers") / "vocab.txt"
  path.write_text("\n".join([*SPECIAL_TOKENS, "what", "number", "?", *_NUMBERS]) + "\n")
  return load_tokenizer(str(path), lowercase=True)


def _number_features(tokenizer, **kwargs):
  answer = ("eleven  Twelve", _CONTEXT.index("eleven"))
  example = SquadExample("n", "What number?", _CONTEXT, [answer])
  return example, squad.make_features([example], tokenizer, **{"max_query_length": 8, **kwargs})


def test_features_layout_windows_and_max_context(number_tokenizer):
  tok = number_tokenizer
  # 16 tokens - 3 question tokens - 3 specials = 10 context tokens a window, every 4 tokens:
  # windows [0, 10), [4, 14), [8, 18), [12, 20).
  example, f = _number_features(tok, max_seq_length=16, doc_stride=4, max_query_length=8,
                                is_training=True)
  assert len(f) == 4 and f.example_index.tolist() == [0, 0, 0, 0]
  assert f.input_ids.dtype == np.int32 and f.input_ids.shape == (4, 16)
  question = [tok.cls_id, *tok.encode("what number ?")[0], tok.sep_id]
  number_ids = tok.encode(" ".join(_NUMBERS))[0]
  for w, start in enumerate((0, 4, 8, 12)):
    length = min(10, 20 - start)
    assert f.input_ids[w].tolist() == (question + number_ids[start:start + length].tolist()
                                       + [tok.sep_id] + [tok.pad_id] * (10 - length))
    assert f.input_mask[w].tolist() == [1] * (6 + length) + [0] * (10 - length)
    assert f.segment_ids[w].tolist() == [0] * 5 + [1] * (length + 1) + [0] * (10 - length)
    assert (f.token_offsets[w, :5] == -1).all() and (f.token_offsets[w, 5 + length:] == -1).all()
    words = [_CONTEXT[s:e] for s, e in f.token_offsets[w, 5:5 + length]]
    assert [x.lower() for x in words] == _NUMBERS[start:start + length]
  # Max context, by hand: token 9 ("ten") scores min(9, 0) + 0.1 in window 0, min(5, 4) + 0.1 in
  # window 1 and min(1, 8) + 0.1 in window 2, so window 1 owns it. Owners: 0-6 window 0, 7-10
  # window 1, 11-14 window 2, 15-19 window 3; every token has exactly one.
  owner = np.repeat([0, 1, 2, 3], [7, 4, 4, 5])
  for w in range(4):
    start, length = 4 * w, min(10, 20 - 4 * w)
    assert f.token_is_max_context[w, 5:5 + length].tolist() == (
        owner[start:start + length] == w).tolist()
    assert not f.token_is_max_context[w, :5].any()
  # The answer (tokens 10-11) lies in windows 1 and 2 only.
  assert f.start_positions.tolist() == [0, 5 + 10 - 4, 5 + 10 - 8, 0]
  assert f.end_positions.tolist() == [0, 5 + 11 - 4, 5 + 11 - 8, 0]
  s, e = f.token_offsets[1, 11, 0], f.token_offsets[1, 12, 1]
  assert example.context[s:e] == "eleven  Twelve"
  # Not training: no labels. A long question is cut; a short context makes one window.
  _, f = _number_features(tok, max_seq_length=16, doc_stride=4, is_training=False)
  assert not f.start_positions.any() and not f.end_positions.any()
  long_question = SquadExample("q", "one " * 30, "two three", [("three", 4)])
  f = squad.make_features([long_question], tok, max_seq_length=16, max_query_length=5,
                          is_training=True)
  assert len(f) == 1 and f.input_ids[0, :7].tolist() == [tok.cls_id] + [number_ids[0]] * 5 + [
      tok.sep_id]
  assert f.start_positions.tolist() == f.end_positions.tolist() == [8]
  with pytest.raises(ValueError, match="max_seq_length=10"):
    squad.make_features([long_question], tok, max_seq_length=10, max_query_length=8,
                        is_training=False)


def test_features_skip_training_examples_whose_answer_is_not_there(number_tokenizer):
  good = SquadExample("g", "what?", "one two three", [("two", 4)])
  bad = SquadExample("b", "what?", "one two three", [("two", 0)])   # answer_start points elsewhere
  impossible = SquadExample("i", "what?", "one two three", [], is_impossible=True)
  f = squad.make_features([good, bad, impossible], number_tokenizer, is_training=True)
  assert f.example_index.tolist() == [0, 2]
  assert f.start_positions.tolist() == [5, 0] and f.end_positions.tolist() == [5, 0]
  f = squad.make_features([good, bad, impossible], number_tokenizer, is_training=False)
  assert f.example_index.tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Decoding


def _logits(features):
  """Start and end logits 0 on context tokens and -10 elsewhere ([CLS] included)."""
  base = np.where(features.token_offsets[..., 0] >= 0, 0.0, -10.0).astype(np.float32)
  return base, base.copy()


def test_postprocess_finds_a_known_span(number_tokenizer):
  example, f = _number_features(number_tokenizer, max_seq_length=16, doc_stride=4,
                                is_training=False)
  start, end = _logits(f)
  start[1, 5 + 10 - 4], end[1, 5 + 11 - 4] = 8.0, 7.0   # "eleven  Twelve" in window 1
  predictions, nbest, null_odds = squad.postprocess([example], f, start, end, version_2=False)
  assert predictions == {"n": "eleven  Twelve"} and null_odds == {}   # the original text
  best = nbest["n"][0]
  assert best == {"text": "eleven  Twelve", "probability": best["probability"],
                  "start_logit": 8.0, "end_logit": 7.0}
  probabilities = [e["probability"] for e in nbest["n"]]
  assert len(nbest["n"]) == 20 and math.isclose(sum(probabilities), 1.0, rel_tol=1e-6)
  assert probabilities == sorted(probabilities, reverse=True)
  assert len({e["text"] for e in nbest["n"]}) == 20   # spans of equal text count once
  with pytest.raises(ValueError, match=r"expected one logit per token.*\(4, 16\)"):
    squad.postprocess([example], f, start[:, :8], end, version_2=False)


def test_postprocess_limits_and_max_context(number_tokenizer):
  example, f = _number_features(number_tokenizer, max_seq_length=16, doc_stride=4,
                                is_training=False)
  start, end = _logits(f)
  # Window 0 owns context tokens 0-6. Its best start, token 9 ("ten"), is owned by window 1, so
  # (9, 9) is not a candidate; (6, 9) "seven ... ten" (4 tokens) is.
  start[0, 5 + 9], end[0, 5 + 9], start[0, 5 + 6], start[0, 5 + 2] = 10.0, 10.0, 5.0, 4.0
  predictions, nbest, _ = squad.postprocess([example], f, start, end, n_best_size=3,
                                            version_2=False)
  assert predictions["n"] == "seven eight nine ten"
  assert [e["text"] for e in nbest["n"]][:2] == ["seven eight nine ten",
                                                 "three four five six seven eight nine ten"]
  # Only 2: the other windows' top 3 starts are their first 3 context tokens, all of them owned
  # by the window before.
  assert len(nbest["n"]) == 2
  # At most 4 tokens: (6, 9) still fits; (2, 9) does not.
  _, nbest, _ = squad.postprocess([example], f, start, end, n_best_size=5, max_answer_length=4,
                                  version_2=False)
  assert nbest["n"][0]["text"] == "seven eight nine ten"
  assert all(len(e["text"].split()) <= 4 for e in nbest["n"]) and len(nbest["n"]) == 5
  predictions, _, _ = squad.postprocess([example], f, start, end, max_answer_length=3,
                                        version_2=False)
  assert predictions["n"] == "seven"   # start logit 5 + end logit 0 beats 4 + 0 and 0 + 0
  # No candidate at all: the top start is [CLS] in every window, with n_best_size 1.
  start, end = _logits(f)
  start[:, 0] = end[:, 0] = 9.0
  predictions, nbest, _ = squad.postprocess([example], f, start, end, n_best_size=1,
                                            version_2=False)
  assert predictions == {"n": ""} and nbest == {"n": []}


def test_postprocess_version_2_null_answer(number_tokenizer):
  example, f = _number_features(number_tokenizer, max_seq_length=16, doc_stride=4,
                                is_training=False)
  start, end = _logits(f)
  start[1, 5 + 10 - 4], end[1, 5 + 11 - 4] = 8.0, 7.0    # best span: score 15
  start[:, 0], end[:, 0] = [1.0, 3.0, 2.0, 4.0], [1.0, 3.0, 2.0, 4.0]  # null: min 2 (window 0)
  predictions, nbest, null_odds = squad.postprocess([example], f, start, end, version_2=True)
  assert null_odds == {"n": 2.0 - 15.0} and predictions == {"n": "eleven  Twelve"}
  null = next(e for e in nbest["n"] if e["text"] == "")
  assert (null["start_logit"], null["end_logit"]) == (1.0, 1.0) and len(nbest["n"]) == 20
  # A null score above the best span: "" at threshold 0, the span at a threshold above the odds.
  start[:, 0] = end[:, 0] = 10.0
  predictions, nbest, null_odds = squad.postprocess([example], f, start, end, version_2=True,
                                                    n_best_size=2)
  assert null_odds == {"n": 5.0} and predictions == {"n": ""}
  assert [e["text"] for e in nbest["n"]] == ["", "eleven  Twelve"]
  assert squad.apply_null_threshold(nbest, null_odds, 5.0) == {"n": "eleven  Twelve"}
  assert squad.apply_null_threshold(nbest, null_odds, 4.9) == {"n": ""}
  predictions, _, _ = squad.postprocess([example], f, start, end, version_2=True,
                                        null_threshold=6.0)
  assert predictions == {"n": "eleven  Twelve"}
  # n_best_size 2 keeps the null and the best span even when spans outscore the null.
  start[:, 0] = end[:, 0] = -9.0
  _, nbest, _ = squad.postprocess([example], f, start, end, version_2=True, n_best_size=2)
  assert [e["text"] for e in nbest["n"]] == ["eleven  Twelve", ""]
  with pytest.raises(ValueError, match="n_best_size=1"):
    squad.postprocess([example], f, start, end, version_2=True, n_best_size=1)


def test_write_predictions(tmp_path):
  predictions, nbest = {"a": "Kraków", "b": ""}, {"a": [{"text": "Kraków", "probability": 1.0,
                                                         "start_logit": 1.0, "end_logit": 2.0}],
                                                   "b": []}
  paths = squad.write_predictions(str(tmp_path / "out"), predictions, nbest, {"a": -1.5, "b": 2.0})
  assert [p.rsplit("/", 1)[1] for p in paths] == ["predictions.json", "nbest_predictions.json",
                                                  "null_odds.json"]
  raw = (tmp_path / "out" / "predictions.json").read_text(encoding="utf-8")
  assert "Kraków" in raw and json.loads(raw) == predictions   # not \u-escaped
  assert json.loads((tmp_path / "out" / "nbest_predictions.json").read_text()) == nbest
  assert json.loads((tmp_path / "out" / "null_odds.json").read_text()) == {"a": -1.5, "b": 2.0}
  paths = squad.write_predictions(str(tmp_path / "v1"), predictions, nbest)
  assert len(paths) == 2 and not (tmp_path / "v1" / "null_odds.json").exists()
