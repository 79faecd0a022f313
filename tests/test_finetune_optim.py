"""Fine-tuning optimizers: schedule values at their landmarks, layer-wise rates, unfreezing, masks."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.finetune import base_config
from finetune import optim
from finetune.heads import TaskModel
from pretrain.model.config import BertConfig

PEAK = 1e-3
SMALL = BertConfig(vocab_size=64, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32,
                   max_position_embeddings=16, dtype="float32")


def _params(features=False):
  model = TaskModel(SMALL, kind="classification", num_labels=3, features=features,
                    rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.split(model)[1])


def _optim(**overrides):
  cfg = base_config("sst2").optim
  cfg.update(dict(peak_learning_rate=PEAK, schedule="constant", weight_decay=0.0, max_grad_norm=0.0,
                  eps=1e-12))
  cfg.update(overrides)
  return cfg


def _leaves(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_triangular_landmarks():
  s = optim.triangular_schedule(PEAK, 100, warmup_fraction=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10), s(55), s(100)],
                             [0.0, PEAK / 2, PEAK, PEAK / 2, 0.0], rtol=1e-6, atol=1e-12)
  no_warmup = optim.triangular_schedule(PEAK, 100, warmup_fraction=0.0)
  np.testing.assert_allclose([no_warmup(0), no_warmup(50), no_warmup(100)], [PEAK, PEAK / 2, 0.0],
                             rtol=1e-6, atol=1e-12)


def test_slanted_triangular_landmarks():
  ratio = 32.0
  s = optim.slanted_triangular_schedule(PEAK, 100, cut_fraction=0.1, ratio=ratio)
  # step 0: peak/ratio; the cut (step 10): the peak; halfway down (step 55): p = 1/2; last: peak/ratio
  np.testing.assert_allclose(
      [s(0), s(10), s(55), s(100)],
      [PEAK / ratio, PEAK, PEAK * (1 + 0.5 * (ratio - 1)) / ratio, PEAK / ratio], rtol=1e-6)
  assert float(s(5)) == pytest.approx(PEAK * (1 + 0.5 * (ratio - 1)) / ratio, rel=1e-6)


@pytest.mark.parametrize("bad", [dict(schedule="cosine"), dict(warmup_fraction=1.5),
                                 dict(schedule="slanted_triangular", cut_fraction=0.0),
                                 dict(layer_decay=0.0), dict(name="sgd"),
                                 dict(unfreeze_every_steps=-1)])
def test_bad_settings_name_the_key(bad):
  cfg = _optim(**bad)
  cfg.schedule = bad.get("schedule", "triangular")
  with pytest.raises(ValueError, match=r"optim\.|choose"):
    optim.make_optimizer(cfg, 100, SMALL.num_layers)


def test_depths():
  depths = _leaves(optim.depths(_params(), SMALL.num_layers))
  for name, depth in depths.items():
    if name.startswith("bert/embeddings"):
      assert depth == 0, name
    elif name.startswith("bert/layers/"):
      assert depth == int(name.split("/")[2]) + 1, name
    else:
      assert name.startswith(("bert/pooler", "head")) and depth == SMALL.num_layers + 1, name


def _first_update(tx, params):
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return _leaves(updates)


def test_layerwise_decay_gives_each_parameter_its_rate():
  decay = 0.5
  params = _params()
  tx, _ = optim.make_optimizer(_optim(layer_decay=decay), 100, SMALL.num_layers)
  # Adam's first step moves every coordinate by exactly the learning rate (gradient of ones).
  updates = _first_update(tx, params)
  top = SMALL.num_layers + 1
  for name, update in updates.items():
    depth = 0 if name.startswith("bert/embeddings") else (
        int(name.split("/")[2]) + 1 if name.startswith("bert/layers/") else top)
    np.testing.assert_allclose(-update, PEAK * decay ** (top - depth), rtol=1e-5, err_msg=name)
  rates = {n: float(-u.flat[0]) for n, u in updates.items()}
  assert min(rates, key=rates.get).startswith("bert/embeddings")
  assert rates["head/kernel"] == max(rates.values()) == pytest.approx(PEAK, rel=1e-5)
  assert rates["bert/layers/2/intermediate/kernel"] == pytest.approx(PEAK * decay, rel=1e-5)
  assert rates["bert/layers/0/intermediate/kernel"] == pytest.approx(PEAK * decay ** 3, rel=1e-5)


def test_gradual_unfreezing_top_layer_first_and_frozen_weights_stay():
  params = _params()
  every = 2
  tx, _ = optim.make_optimizer(_optim(unfreeze_every_steps=every, weight_decay=0.1), 100,
                               SMALL.num_layers)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  top = SMALL.num_layers + 1
  depth = _leaves(optim.depths(params, SMALL.num_layers))
  for step in range(2 * every * (top + 1)):
    updates, state = tx.update(grads, state, params)
    lowest_trainable = top - step // every
    for name, update in _leaves(updates).items():
      moved = bool(np.any(update != 0))
      assert moved == (depth[name] >= lowest_trainable), (step, name)


def test_feature_mode_freezes_the_encoder_and_mix_is_not_decayed():
  params = _params(features=True)
  trainable = jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key != "bert", params)
  tx, _ = optim.make_optimizer(_optim(weight_decay=0.1), 100, SMALL.num_layers, trainable)
  updates = _first_update(tx, params)
  for name, update in updates.items():
    assert np.any(update != 0) == (not name.startswith("bert/")), name
  mask = _leaves(optim.decay_mask(params))
  assert not mask["scalar_mix/weights"] and not mask["scalar_mix/gamma"]
  assert mask["head/kernel"] and not mask["head/bias"]
  assert not mask["bert/layers/0/attention_layer_norm/scale"]
