"""The learning-curve command (finetune/curve): nested stratified subsamples, a tiny curve of 2 arms
x 2 sizes x 2 seeds on CPU and its rerun, and each bad input stopping with one line before training.

The checkpoint is a converted-style workdir (config.json, WordPiece vocab.txt + tokenizer.json,
checkpoints/0 with random encoder weights), written in a second, and the task is a generated
SST-2-layout folder: the test needs neither ../shared nor a pretraining run.
"""

import dataclasses
import json
import os
from pathlib import Path
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from configs.glue import get_config as glue_config
from configs.squad import get_config as squad_config
from finetune.curve import plan
from finetune.curve import runner
from finetune.curve import worker
from finetune.task import choose_train_examples, subsample
from pretrain import console
from pretrain.checkpoint import Checkpointer
from pretrain.data.tokenizer import load_tokenizer
from pretrain.model.bert import BertModel
from pretrain.model.config import BertConfig

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE, NEGATIVE = ["good", "fine", "happy", "calm"], ["bad", "dull", "sad", "grim"]
NEUTRAL = ["the", "a", "whale", "sea", "ship", "captain", "film", "plot"]


def _write_checkpoint(workdir: Path, words: list[str]):
  """What tools/convert_checkpoint.py writes, for a tiny BERT with random weights."""
  workdir.mkdir(parents=True)
  (workdir / "vocab.txt").write_text("\n".join(SPECIALS + words) + "\n")
  tokenizer = load_tokenizer(str(workdir / "vocab.txt"), lowercase=True)
  (workdir / "tokenizer.json").write_text(json.dumps({**tokenizer.describe(), "file": "vocab.txt"}))
  config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                      intermediate_size=32, max_position_embeddings=16, dtype="float32")
  (workdir / "config.json").write_text(json.dumps({"model": dataclasses.asdict(config)}))
  # Random weights drawn by numpy on the model's shapes: no JAX op compiled (seconds on 2 cores).
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.ones(leaf.shape, np.float32) if path[-1].key == "scale"
      else (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32), shapes)
  ckpt = Checkpointer(str(workdir / "checkpoints"), save_interval_steps=1, max_to_keep=1,
                      async_save=False)
  ckpt.save(0, {"params": {"bert": params}}, {"converted_from": "tests/test_curve.py"}, force=True)
  ckpt.close()


def _write_task(folder: Path, train: int, dev: int):
  """An SST-2-layout folder: neutral words and one word that gives the label away."""
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True)
  for name, n in (("train", train), ("dev", dev)):
    rows = ["sentence\tlabel"]
    for i in range(n):
      words = [*rng.choice(NEUTRAL, 5), rng.choice(POSITIVE if i % 2 else NEGATIVE)]
      rows.append(" ".join(rng.permutation(words)) + f"\t{i % 2}")
    (folder / f"{name}.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("curve_inputs")
  _write_checkpoint(root / "checkpoint", NEUTRAL + POSITIVE + NEGATIVE)
  _write_task(root / "polarity", train=64, dev=32)
  return root


FLAGS = ["--config.data.max_seq_length=16", "--config.model.dtype=float32",
         "--config.train.batch_size=8", "--config.train.eval_batch_size=16",
         "--config.train.num_epochs=1", "--config.optim.peak_learning_rate=1e-3"]


def _config(tiny, **overrides):
  config = glue_config("sst2")
  config.data.dir = str(tiny / "polarity")
  for flag in FLAGS:
    key, value = flag[len("--config."):].split("=")
    plan.apply_override(config, key, value)
  for key, value in overrides.items():
    plan.apply_override(config, key, value)
  return config


def _spec(tiny, **fields):
  # min_steps=4: both sizes train 4 steps, so every cell runs the same compiled programs.
  return runner.CurveSpec(**{"sizes": ["16", "32"], "seeds": 2, "arms": ["pretrained", "scratch"],
                             "checkpoint": str(tiny / "checkpoint"), "min_steps": 4,
                             "plot": False, **fields})


# ------------------------------------------------------------------------------------------------
# Subsamples


def test_subsample_is_fixed_by_seed_nested_and_stratified():
  labels = np.array([1] * 300 + [0] * 700)
  for seed in range(3):
    draws = {n: subsample(1000, n, seed, labels) for n in (10, 100, 300, 1000)}
    assert np.array_equal(draws[100], subsample(1000, 100, seed, labels))
    assert set(draws[10]) <= set(draws[100]) <= set(draws[300]) and len(draws[1000]) == 1000
    for n, rows in draws.items():
      assert len(set(rows)) == n and abs(labels[rows].sum() - 0.3 * n) <= 1, (seed, n)
  assert not np.array_equal(subsample(1000, 100, 0, labels), subsample(1000, 100, 1, labels))
  plain = [subsample(50, n, 4) for n in (5, 20)]
  assert set(plain[0]) <= set(plain[1])


def test_the_config_draws_the_subsample_or_keeps_the_first_rows():
  examples, train = list(range(20)), glue_config("sst2").train
  train.max_train_examples = 5
  assert choose_train_examples(examples, train) == [0, 1, 2, 3, 4]
  train.subsample_seed = 3
  assert choose_train_examples(examples, train) == list(subsample(20, 5, 3))
  train.max_train_examples = 21
  with pytest.raises(ValueError, match=r"max_train_examples=21 .* only 20 examples"):
    choose_train_examples(examples, train)


# ------------------------------------------------------------------------------------------------
# Arms


def test_arms_take_their_checkpoint_mode_and_overrides(tiny):
  arms = plan.parse_arms(["pretrained", "features"], "ckpt", ["minilm=other"],
                         ["minilm:head.pooling=mean", "features:optim.lbfgs_steps=7"])
  assert [(a.name, os.path.basename(a.checkpoint)) for a in arms] == [
      ("pretrained", "ckpt"), ("features", "ckpt"), ("minilm", "other")]
  base = _config(tiny)
  minilm = plan.arm_config(base, arms[2], span_task=False)
  assert minilm.head.pooling == "mean" and minilm.init_checkpoint.endswith("other")
  features = plan.arm_config(base, arms[1], span_task=False)
  assert (features.head.mode, features.optim.solver, features.optim.lbfgs_steps) == (
      "features", "lbfgs", 7)
  squad = plan.arm_config(squad_config("v1.1"), arms[1], span_task=True)
  assert squad.optim.solver == "gradient"               # L-BFGS fits sentence heads only
  assert base.head.pooling == "pooler"                  # the task config itself is left alone
  with pytest.raises(console.UserError, match="did you mean head.pooling"):
    plan.apply_override(base, "head.poling", "mean")


# ------------------------------------------------------------------------------------------------
# The command


def _lines(text):
  return [line for line in text.splitlines() if line.startswith("cell ")]


def test_curve_runs_every_cell_then_a_rerun_skips_them(tiny, tmp_path, capsys):
  workdir = tmp_path / "curve"
  result = runner.run(_config(tiny), str(workdir), _spec(tiny))
  out = capsys.readouterr().out
  assert (result["cells"], result["trained"], result["skipped"]) == (8, 8, 0)
  assert len(_lines(out)) == 8 and _lines(out)[-1].startswith("cell 8/8 ")
  assert "ETA" in _lines(out)[0] and "ETA" not in _lines(out)[-1]
  rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
  assert sorted((r["arm"], str(r["size"]), r["seed"]) for r in rows) == sorted(
      (arm, size, seed) for arm in ("pretrained", "scratch") for size in ("16", "32")
      for seed in (0, 1))
  assert all(r["steps"] == 4 and 0.0 <= r["value"] <= 1.0 for r in rows)
  table = (workdir / "table.md").read_text().splitlines()
  assert table[2] == "| arm | n=16 | n=32 |"
  body = [line for line in table[4:] if line.startswith("|")]
  assert [line.split(" | ")[0] for line in body] == ["| pretrained", "| scratch"]
  assert all(line.count(" | ") == 2 for line in body)
  assert (workdir / "cells" / "scratch" / "n32_seed1" / "log.txt").exists()

  # The same command again, from the command line: every cell is finished, none trains.
  command = [sys.executable, "-m", "finetune.curve", "--config=configs/glue.py:sst2",
             f"--config.data.dir={tiny / 'polarity'}", *FLAGS, f"--workdir={workdir}",
             f"--checkpoint={tiny / 'checkpoint'}", "--sizes=16,32", "--seeds=2",
             "--arms=pretrained,scratch", "--min_steps=4", "--noplot"]
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert again.returncode == 0, again.stderr
  assert "8 finished earlier, 0 to run" in again.stdout and not _lines(again.stdout)
  assert len((workdir / "results.jsonl").read_text().splitlines()) == 8
  assert (workdir / "table.md").read_text().splitlines() == table
  # Cells of another setup are not mixed into the same results.
  assert "holds pretrained cells of another setup" in _one_line_error(
      capsys, lambda: runner.run(_config(tiny), str(workdir), _spec(tiny, min_steps=5)))


def test_workers_share_a_gpu_or_take_one_each(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
  assert worker.worker_environments(3) == [{"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                                             "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.30"}] * 3
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")      # the user's own stays
  assert [e["CUDA_VISIBLE_DEVICES"] for e in worker.worker_environments(4)] == ["0", "1", "0", "1"]
  assert all("XLA_PYTHON_CLIENT_MEM_FRACTION" not in e for e in worker.worker_environments(4))


def _one_line_error(capsys, fn) -> str:
  status = console.run_command(fn, verbose=False)
  err = capsys.readouterr().err.strip().splitlines()
  assert status == console.EXIT_USER_ERROR and len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_bad_input_stops_with_one_line_before_training(tiny, tmp_path, capsys):
  def curve(config=None, **spec):
    return lambda: runner.run(config or _config(tiny), str(tmp_path / "bad"), _spec(tiny, **spec))

  assert "--sizes: 1000 is larger than the training set (64 examples" in _one_line_error(
      capsys, curve(sizes=["16", "1000"]))
  assert "unknown arm 'bogus' in --arms" in _one_line_error(
      capsys, curve(arms=["pretrained", "bogus"]))
  smaller = tmp_path / "smaller" / "vocab.txt"          # another vocabulary, of another size
  smaller.parent.mkdir()
  smaller.write_text("\n".join(SPECIALS + NEUTRAL) + "\n")
  assert "arm pretrained: vocabulary mismatch" in _one_line_error(
      capsys, curve(_config(tiny, tokenizer=str(smaller))))
  same_size = tmp_path / "same_size" / "vocab.txt"      # as many entries, other words
  same_size.parent.mkdir()
  same_size.write_text("\n".join(SPECIALS + [f"w{i}" for i in range(16)]) + "\n")
  assert "same size, other entries" in _one_line_error(
      capsys, curve(_config(tiny, tokenizer=str(same_size))))
  assert not (tmp_path / "bad" / "results.jsonl").exists()


def test_a_size_equal_to_the_training_set_and_all_are_refused():
  """--sizes=64,all on 64 examples would train the same cells twice, as n=64 and as all (64)."""
  with pytest.raises(console.UserError) as error:
    plan.check_sizes([16, 64, None], 64, 8, "DATA")
  assert str(error.value) == ("--sizes: 64 and 'all' are the same size (the training set has 64 "
                              "examples in DATA); give only one of them")
  plan.check_sizes([16, 63, None], 64, 8, "DATA")      # a size just below is another size


def test_bad_seeds_workers_or_min_steps_name_only_the_bad_flags(capsys):
  def curve(**spec):
    fields = {"sizes": ["16"], "seeds": 1, "arms": ["scratch"], "plot": False, **spec}
    return lambda: runner.run(glue_config("sst2"), "unused", runner.CurveSpec(**fields))

  assert _one_line_error(capsys, curve(min_steps=-4)) == "error: --min_steps=-4 must be at least 0"
  assert _one_line_error(capsys, curve(seeds=0, workers=0)) == (
      "error: --seeds=0 must be at least 1, --workers=0 must be at least 1")
  assert _one_line_error(capsys, curve(workers=-1)) == "error: --workers=-1 must be at least 1"


def test_a_rerun_with_a_new_arm_keeps_the_earlier_arms_in_the_table(tiny, tmp_path, monkeypatch):
  """Cells are not trained here (run_cell gives a score from the arm's name): the table and the
  figure show the arms of every run of the same setting, and not those of another setting."""
  score = {"pretrained": 0.75, "scratch": 0.5, "features": 0.625, "other": 0.25}
  monkeypatch.setattr(worker, "run_cell", lambda config, cell_dir: {
      "metrics": {"dev/accuracy": score[Path(cell_dir).parent.name]}, "steps": 4, "seconds": 0.1})
  figures = []
  monkeypatch.setattr(runner.report, "plot", lambda rows, arms, *_: figures.append(arms))
  workdir = str(tmp_path / "curve")

  def table(**spec):
    runner.run(_config(tiny), workdir, _spec(tiny, sizes=["16"], seeds=1, plot=True, **spec))
    lines = (tmp_path / "curve" / "table.md").read_text().splitlines()
    return [line.split(" | ") for line in lines[4:] if line.startswith("| ")]

  assert table(arms=["pretrained", "scratch"]) == [["| pretrained", "0.750 |"],
                                                   ["| scratch", "0.500 |"]]
  assert table(arms=["features"]) == [["| features", "0.625 |"], ["| pretrained", "0.750 |"],
                                      ["| scratch", "0.500 |"]]
  assert figures[-1] == ["features", "pretrained", "scratch"]
  # Another setting (--min_steps here): its arm alone, the earlier cells are not its curve's.
  assert table(arms=[], extras=[f"other={tiny / 'checkpoint'}"], min_steps=5) == [
      ["| other", "0.250 |"]]
  assert figures[-1] == ["other"]
  assert len((tmp_path / "curve" / "results.jsonl").read_text().splitlines()) == 4


def test_help_gives_the_usage_and_lists_the_curve_flags():
  result = subprocess.run([sys.executable, "-m", "finetune.curve", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith(
      "python -m finetune.curve --config=configs/glue.py:sst2 --config.data.dir=DATA --workdir=OUT")
  assert "Learning curves: fine-tunes every arm" in result.stdout
  for flag in ("--sizes", "--arms", "--extra", "--workers", "--workdir", "--help_config"):
    assert flag in result.stdout, flag


def test_help_config_needs_no_sizes(tmp_path):
  def command(*args):
    return subprocess.run([sys.executable, "-m", "finetune.curve", "--config=configs/glue.py:sst2",
                           *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})

  listing = command("--help_config")
  assert listing.returncode == 0, listing.stderr[-2000:]
  assert "head.pooling" in listing.stdout and "train.batch_size" in listing.stdout
  missing = command(f"--workdir={tmp_path / 'curve'}")       # anything else still needs --sizes
  assert missing.returncode == console.EXIT_USER_ERROR
  assert missing.stderr.strip().splitlines() == [
      "error: --sizes is required, e.g. --sizes=100,300,1000,all"]
  assert not (tmp_path / "curve").exists()
