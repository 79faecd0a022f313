"""The speed-path resolver (`pretrain/speed.py`): every documented combination of the model's speed
switches either resolves to a path that runs, or is refused with an error naming both keys.

- All 3,072 combinations are resolved for the CPU, a GPU and a TPU: each is a path or a refusal.
- A pairwise covering set of them (every pair of values of any two switches appears in one run)
  runs the forward and backward pass of a tiny model on the CPU with dropout on: finite loss and
  gradients.
- The path is recorded in the workdir's config.json, and fine-tuning resolves the same way.
"""

import dataclasses
import itertools
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from pretrain import speed
from pretrain.data import loader
from pretrain.model import heads
from pretrain.model.bert import BertForPreTraining
from pretrain.model.config import CHOICES, BertConfig

SWITCHES = {
    "attention_impl": CHOICES["attention_impl"],
    "attention_dropout_impl": CHOICES["attention_dropout_impl"],
    "dropout_rng": CHOICES["dropout_rng"],
    "residual_norm_impl": CHOICES["residual_norm_impl"],
    "remat_policy": CHOICES["remat_policy"],
    "logits_grad_dtype": CHOICES["logits_grad_dtype"],
    "mlm_gather": CHOICES["mlm_gather"],
    "scan_layers": (False, True),
}
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)


def _all_combinations():
  names = list(SWITCHES)
  for values in itertools.product(*SWITCHES.values()):
    yield dict(zip(names, values))


def _refused_by_name(error: Exception, combo: dict) -> bool:
  """The message names two keys of the combination, or the backend's one."""
  named = [k for k in combo if f"model.{k}=" in str(error)]
  return len(named) == 2 or (named == ["attention_impl"] and "backend" in str(error))


def test_every_combination_resolves_or_is_refused_by_name():
  assert len(list(_all_combinations())) == 3072
  for backend in ("cpu", "gpu", "tpu"):
    outcomes = {"path": 0, "refused": 0}
    for combo in _all_combinations():
      config = BertConfig(num_layers=2, hidden_size=64, num_heads=4, **DROPOUT, **combo)
      try:
        path = speed.resolve(config, backend=backend, seq_len=128)
      except speed.SpeedPathError as e:
        assert _refused_by_name(e, combo), (backend, combo, str(e))
        outcomes["refused"] += 1
        continue
      outcomes["path"] += 1
      assert path.dropout_rng == combo["dropout_rng"]
      assert path.scan_layers == combo["scan_layers"]
      if backend != "gpu":     # the kernels run on GPUs only; elsewhere their twins, stated
        assert "kernel" not in (path.attention, path.attention_dropout, path.residual_norm)
        assert path.notes or "fused" not in (combo["attention_impl"],
                                             combo["attention_dropout_impl"],
                                             combo["residual_norm_impl"])
    assert outcomes["path"] and outcomes["refused"], (backend, outcomes)


def test_refusals_name_both_keys():
  with pytest.raises(speed.SpeedPathError,
                     match=r"model.residual_norm_impl='fused'.*model.dropout_rng='threefry'"):
    speed.resolve(BertConfig(dropout_rng="threefry", attention_dropout_impl="reference"))
  with pytest.raises(speed.SpeedPathError,
                     match=r"model.attention_dropout_impl='fused'.*model.dropout_rng='rbg'"):
    speed.resolve(BertConfig(dropout_rng="rbg", residual_norm_impl="xla"))
  with pytest.raises(speed.SpeedPathError, match=r"model.attention_impl='cudnn'.*backend is cpu"):
    speed.resolve(BertConfig(attention_impl="cudnn"), backend="cpu")
  # without dropout the masks do not matter: nothing to refuse
  no_dropout = BertConfig(dropout_rng="threefry", hidden_dropout=0.0, attention_dropout=0.0)
  assert speed.resolve(no_dropout, backend="cpu").residual_norm == "xla"


def test_gpu_picks_kernels_only_where_they_fit():
  if speed.attention_kernel.plgpu is None:
    pytest.skip("this jaxlib has no Pallas Triton backend to resolve GPU kernels against")
  path = speed.resolve(BertConfig(), backend="gpu", seq_len=128)
  assert (path.attention_dropout, path.residual_norm, path.notes) == ("kernel", "kernel", ())
  odd = speed.resolve(BertConfig(), backend="gpu", seq_len=100)
  assert odd.attention_dropout == "twin" and "seq % 16" in odd.notes[0]


def _pairwise_cover(combos: list[dict]) -> list[dict]:
  """A small subset in which every pair of (switch, value)s that occurs in `combos` occurs."""
  def pairs(c):
    return {((a, c[a]), (b, c[b])) for a, b in itertools.combinations(sorted(c), 2)}
  uncovered = set().union(*(pairs(c) for c in combos))
  chosen = []
  while uncovered:
    best = max(combos, key=lambda c: len(pairs(c) & uncovered))
    chosen.append(best)
    uncovered -= pairs(best)
  return chosen


def test_pairwise_cover_of_runnable_combinations_trains_on_cpu():
  runnable = []
  for combo in _all_combinations():
    try:
      speed.resolve(BertConfig(**DROPOUT, **combo), backend="cpu")
    except speed.SpeedPathError:
      continue
    runnable.append(combo)
  cover = _pairwise_cover(runnable)
  assert len(cover) < 40, len(cover)
  config = tiny_config()
  batch = {k: jnp.asarray(v) for k, v in next(loader.make_source(config, split="train")).items()}
  for combo in cover:          # the model's forward and backward pass with dropout on
    model_config = BertConfig.from_config({**config.model, **DROPOUT, **combo})
    model = BertForPreTraining(model_config, rngs=nnx.Rngs(0), path=speed.resolve(model_config))
    graphdef, params = nnx.split(model)

    def loss_fn(p, graphdef=graphdef):
      out = nnx.merge(graphdef, p)(batch, jax.random.key(1))
      sums = heads.loss_sums(out.mlm_logits, out.nsp_logits, batch)
      return heads.total_loss(sums, sums.mlm_weight, sums.num_sequences)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    norm = float(optax.tree.norm(grads))
    assert np.isfinite(float(loss)) and np.isfinite(norm) and norm > 0, combo


def test_speed_path_recorded_in_config_json(tmp_path):
  from pretrain import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"train.num_train_steps": 2, "model.attention_impl": "fused"})
  train.run(config, str(tmp_path))
  recorded = json.loads((tmp_path / "config.json").read_text())["speed_path"]
  expected = speed.resolve(BertConfig.from_config(config.model), seq_len=32)
  assert recorded == expected.to_dict()
  assert recorded["attention"] == "twin" and recorded["notes"]


def test_finetuning_resolves_with_the_full_model_config():
  from configs import glue  # pylint: disable=g-import-not-at-top
  from finetune import train as ft_train  # pylint: disable=g-import-not-at-top
  config = glue.get_config("sst2")
  config.model_variant, config.from_scratch = "tiny", True
  # every speed switch of pretraining is a fine-tuning key too, with the same default
  for name in SWITCHES:
    assert config.model[name] == getattr(BertConfig(), name), name
  config.model.dropout_rng = "threefry"
  model_config = ft_train.model_config_for(config, None)
  assert model_config.dropout_rng == "threefry"          # passed through, not defaulted
  with pytest.raises(speed.SpeedPathError, match="dropout_rng"):
    speed.resolve(model_config)
  assert dataclasses.replace(model_config, residual_norm_impl="xla",
                             attention_dropout_impl="reference").validate() is None
