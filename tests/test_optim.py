"""The optimizer: BERT's weight-decay mask on the real model, the learning-rate schedule, AdamW/LAMB
and global-norm clipping."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import tiny_config
from pretrain import optim as optim_lib
from pretrain import sharding
from pretrain import step as step_lib
from pretrain.model.bert import BertForPreTraining
from pretrain.model.config import BertConfig


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flat(tree) -> dict[tuple[str, ...], object]:
  return {_path_names(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _optim(**overrides):
  """The `optim` group of the demo config with `overrides`, as a plain dict."""
  optim = dict(tiny_config().optim)
  optim.update(overrides)
  return optim


@pytest.fixture(scope="module")
def abstract_params():
  """The real model's parameter tree (ShapeDtypeStructs) as the train loop sees it."""
  config = tiny_config()       # 2 layers
  mesh = sharding.make_mesh((-1, 1, 1))
  return step_lib.make_setup(config, mesh).abstract_state.params


@pytest.fixture(scope="module")
def params():
  """Params of a 1-layer model (the real tree), every leaf random and non-zero (biases and
  LayerNorm too), so a decay that reached a bias or a LayerNorm parameter would be visible."""
  config = tiny_config(**{"model.num_layers": 1})
  model_config = BertConfig.from_config(config.model)
  abstract = nnx.eval_shape(lambda: BertForPreTraining(model_config, rngs=nnx.Rngs(0)))
  shapes = nnx.to_pure_dict(nnx.split(abstract)[1])
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: jnp.asarray(rng.uniform(1.0, 2.0, x.shape), jnp.float32), shapes)


def _update(tx, grads, params):
  """One optimizer step from a fresh state (jitted: eager optax over ~40 leaves is slow)."""
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)


# ---------------------------------------------------------------------------------------------------
# decay_mask


def _expected_no_decay(num_layers: int) -> set[tuple[str, ...]]:
  ln = ("scale", "bias")
  expected = {("bert", "embeddings", "layer_norm", p) for p in ln}
  for i in map(str, range(num_layers)):
    layer = ("bert", "layers", i)
    expected |= {layer + ("attention", "qkv_bias"), layer + ("attention", "out_bias"),
                 layer + ("intermediate", "bias"), layer + ("output", "bias")}
    expected |= {layer + ("attention_layer_norm", p) for p in ln}
    expected |= {layer + ("output_layer_norm", p) for p in ln}
  expected |= {("bert", "pooler", "bias"), ("mlm", "bias"), ("mlm", "transform", "bias"),
               ("nsp", "dense", "bias")}
  expected |= {("mlm", "layer_norm", p) for p in ln}
  return expected


def _expected_decay(num_layers: int) -> set[tuple[str, ...]]:
  expected = {("bert", "embeddings", t) for t in
              ("word_embeddings", "position_embeddings", "token_type_embeddings")}
  for i in map(str, range(num_layers)):
    layer = ("bert", "layers", i)
    expected |= {layer + ("attention", "qkv_kernel"), layer + ("attention", "out_kernel"),
                 layer + ("intermediate", "kernel"), layer + ("output", "kernel")}
  expected |= {("bert", "pooler", "kernel"), ("mlm", "transform", "kernel"),
               ("nsp", "dense", "kernel")}
  return expected


def test_decay_mask_excludes_exactly_biases_and_layer_norms(abstract_params):
  mask = _flat(optim_lib.decay_mask(abstract_params))
  assert set(mask) == set(_flat(abstract_params))
  assert all(isinstance(v, bool) for v in mask.values()), mask
  excluded = {path for path, decays in mask.items() if not decays}
  decayed = {path for path, decays in mask.items() if decays}
  assert excluded == _expected_no_decay(2)
  assert decayed == _expected_decay(2)


def test_decay_mask_same_structure_as_params(abstract_params):
  mask = optim_lib.decay_mask(abstract_params)
  assert jax.tree.structure(mask) == jax.tree.structure(abstract_params)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_zero_gradient_step_decays_only_masked_params(params, name):
  lr, wd = 1e-2, 0.1
  tx, schedule = optim_lib.make_optimizer(
      _optim(name=name, warmup_steps=0, peak_learning_rate=lr, end_learning_rate=0.0,
             weight_decay=wd, max_grad_norm=1.0), num_train_steps=100)
  assert float(schedule(0)) == pytest.approx(lr)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates = _update(tx, grads, params)
  new = optax.apply_updates(params, updates)
  flat_old, flat_update, flat_new = _flat(params), _flat(updates), _flat(new)
  no_decay = _expected_no_decay(1)
  assert no_decay | _expected_decay(1) == set(flat_old)
  for path, old in flat_old.items():
    old, update, got = np.asarray(old), np.asarray(flat_update[path]), np.asarray(flat_new[path])
    where = "/".join(path)
    if path in no_decay:
      np.testing.assert_array_equal(update, np.zeros_like(old), err_msg=where)
      np.testing.assert_array_equal(got, old, err_msg=where)
      continue
    # AdamW: Adam's moment term is 0 for zero gradients, so the step is the decoupled decay
    # -lr*wd*w. LAMB: the update wd*w has trust ratio |w| / |wd*w| = 1/wd, so the step is -lr*w.
    want = -lr * wd * old if name == "adamw" else -lr * old
    np.testing.assert_allclose(update, want, rtol=1e-5, err_msg=where)
    np.testing.assert_allclose(got, old + want, rtol=1e-6, err_msg=where)


# ---------------------------------------------------------------------------------------------------
# learning_rate_schedule

PEAK, END, WARMUP, STEPS = 1e-3, 1e-5, 10, 110


def _schedule(**overrides):
  values = dict(peak_learning_rate=PEAK, end_learning_rate=END, warmup_steps=WARMUP,
                decay="linear", decay_power=1.0)
  values.update(overrides)
  num_train_steps = values.pop("num_train_steps", STEPS)
  return optim_lib.learning_rate_schedule(_optim(**values), num_train_steps)


def _lr(schedule, step):
  return float(schedule(jnp.asarray(step, jnp.int32)))


def test_linear_schedule_values():
  s = _schedule()
  assert _lr(s, 0) == 0.0
  assert _lr(s, WARMUP // 2) == pytest.approx(PEAK / 2, rel=1e-6)
  assert _lr(s, WARMUP - 1) == pytest.approx(PEAK * (WARMUP - 1) / WARMUP, rel=1e-6)
  assert _lr(s, WARMUP) == pytest.approx(PEAK, rel=1e-6)
  middle = WARMUP + (STEPS - WARMUP) // 2
  assert _lr(s, middle) == pytest.approx((PEAK + END) / 2, rel=1e-6)
  quarter = WARMUP + (STEPS - WARMUP) // 4
  assert _lr(s, quarter) == pytest.approx(PEAK - 0.25 * (PEAK - END), rel=1e-6)
  assert _lr(s, STEPS) == pytest.approx(END, rel=1e-6)
  assert _lr(s, STEPS + 50) == pytest.approx(END, rel=1e-6)
  values = [_lr(s, i) for i in range(STEPS + 1)]
  assert max(values) == pytest.approx(PEAK, rel=1e-6)
  assert int(np.argmax(values)) == WARMUP


def test_schedule_accepts_python_ints():
  s = _schedule()
  assert float(s(WARMUP)) == pytest.approx(PEAK, rel=1e-6)


def test_polynomial_schedule_power_2():
  s = _schedule(decay="polynomial", decay_power=2.0)
  assert _lr(s, 0) == 0.0
  assert _lr(s, WARMUP) == pytest.approx(PEAK, rel=1e-6)
  for t in (25, 50, 80):
    frac = 1 - t / (STEPS - WARMUP)
    assert _lr(s, WARMUP + t) == pytest.approx((PEAK - END) * frac ** 2 + END, rel=1e-5), t
  assert _lr(s, STEPS) == pytest.approx(END, rel=1e-6)


def test_polynomial_power_1_equals_linear():
  lin, poly = _schedule(), _schedule(decay="polynomial", decay_power=1.0)
  for step in range(0, STEPS + 1, 7):
    assert _lr(poly, step) == pytest.approx(_lr(lin, step), rel=1e-6)


def test_no_warmup():
  s = _schedule(warmup_steps=0)
  assert _lr(s, 0) == pytest.approx(PEAK, rel=1e-6)
  assert _lr(s, STEPS // 2) == pytest.approx((PEAK + END) / 2, rel=1e-6)
  assert _lr(s, STEPS) == pytest.approx(END, rel=1e-6)


def test_warmup_equal_to_num_train_steps():
  s = _schedule(warmup_steps=STEPS)
  assert _lr(s, 0) == 0.0
  assert _lr(s, STEPS // 2) == pytest.approx(PEAK * (STEPS // 2) / STEPS, rel=1e-6)
  assert _lr(s, STEPS) == pytest.approx(PEAK, rel=1e-6)


def test_warmup_longer_than_training_is_an_error():
  with pytest.raises(ValueError, match=r"optim\.warmup_steps"):
    _schedule(warmup_steps=STEPS + 1)
  with pytest.raises(ValueError, match=r"optim\.warmup_steps"):
    _schedule(warmup_steps=-1)
  with pytest.raises(ValueError, match=r"optim\.warmup_steps"):
    optim_lib.make_optimizer(_optim(warmup_steps=STEPS + 1), STEPS)


def test_bad_decay_is_an_error():
  with pytest.raises(ValueError, match=r"optim\.decay.*cosine"):
    _schedule(decay="cosine")


def test_bad_optimizer_name_is_an_error():
  with pytest.raises(ValueError, match=r"optim\.name.*sgd"):
    optim_lib.make_optimizer(_optim(name="sgd"), STEPS)


def test_make_optimizer_returns_its_schedule():
  _, schedule = optim_lib.make_optimizer(
      _optim(peak_learning_rate=PEAK, end_learning_rate=END, warmup_steps=WARMUP), STEPS)
  assert _lr(schedule, WARMUP) == pytest.approx(PEAK, rel=1e-6)
  assert _lr(schedule, STEPS) == pytest.approx(END, rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# LAMB and clipping


def _random_like(tree, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32),
                      tree)


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def test_lamb_builds_and_steps(params):
  tx, _ = optim_lib.make_optimizer(_optim(name="lamb", warmup_steps=0), num_train_steps=10)
  opt_state = jax.jit(tx.init)(params)
  grads = _random_like(params, seed=2)
  update = jax.jit(tx.update)
  for _ in range(2):
    updates, opt_state = update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves(new):
      assert np.all(np.isfinite(np.asarray(leaf)))
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new))]
    assert all(changed)
    params = new


def test_lamb_differs_from_adamw(params):
  grads = _random_like(params, seed=3)
  out = {}
  for name in ("adamw", "lamb"):
    tx, _ = optim_lib.make_optimizer(_optim(name=name, warmup_steps=0), num_train_steps=10)
    out[name] = _update(tx, grads, params)
  kernel = ("bert", "layers", "0", "intermediate", "kernel")
  assert not np.allclose(_flat(out["adamw"])[kernel], _flat(out["lamb"])[kernel])


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_clipping_rescales_huge_gradients_to_max_norm(params, name):
  max_norm = 1.0
  # A large eps makes Adam's step depend on the gradient's scale, so clipping is visible in it.
  clipped_tx, _ = optim_lib.make_optimizer(
      _optim(name=name, warmup_steps=0, eps=1.0, max_grad_norm=max_norm), num_train_steps=10)
  plain_tx, _ = optim_lib.make_optimizer(
      _optim(name=name, warmup_steps=0, eps=1.0, max_grad_norm=0.0), num_train_steps=10)
  huge = _random_like(params, seed=4, scale=1e3)
  norm = _norm(huge)
  assert norm > 100 * max_norm
  rescaled = jax.tree.map(lambda g: g * (max_norm / norm), huge)
  assert _norm(rescaled) == pytest.approx(max_norm, rel=1e-5)

  got = _update(clipped_tx, huge, params)
  want = _update(plain_tx, rescaled, params)
  unclipped = _update(plain_tx, huge, params)
  for path, g in _flat(got).items():
    np.testing.assert_allclose(np.asarray(g), np.asarray(_flat(want)[path]), rtol=1e-4,
                               atol=1e-9, err_msg="/".join(path))
  # ... and the clipping mattered: without it the step is different.
  kernel = ("bert", "layers", "0", "intermediate", "kernel")
  assert not np.allclose(_flat(got)[kernel], _flat(unclipped)[kernel], rtol=1e-3)


def test_clipping_leaves_small_gradients_alone(params):
  clipped_tx, _ = optim_lib.make_optimizer(
      _optim(warmup_steps=0, eps=1.0, max_grad_norm=1.0), num_train_steps=10)
  plain_tx, _ = optim_lib.make_optimizer(
      _optim(warmup_steps=0, eps=1.0, max_grad_norm=0.0), num_train_steps=10)
  small = _random_like(params, seed=5)
  small = jax.tree.map(lambda g: g * (0.5 / _norm(small)), small)
  got = _update(clipped_tx, small, params)
  want = _update(plain_tx, small, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-10)

