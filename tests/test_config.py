"""Configs: the variants, command-line overrides through ml_collections' config flags (in-process
and through the real `python -m pretrain`), and the checks that refuse a bad config with a message
naming the key to change."""

import os
import subprocess
import sys

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags
import pytest

from configs import pretrain as pretrain_configs
from helpers import tiny_config
from pretrain import sharding
from pretrain import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(REPO, "configs", "pretrain.py")

# ---------------------------------------------------------------------------------------------------
# Variants

SIZES = {  # variant: (layers, hidden, heads)
    "demo": (2, 128, 2),
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
    "budget": (8, 512, 8),
}


@pytest.mark.parametrize("variant", sorted(SIZES))
def test_variant_sizes(variant):
  config = pretrain_configs.get_config(variant)
  layers, hidden, heads = SIZES[variant]
  assert config.variant == variant
  assert (config.model.num_layers, config.model.hidden_size, config.model.num_heads) == (
      layers, hidden, heads)
  assert config.model.intermediate_size == 4 * hidden
  assert config.model.hidden_size % config.model.num_heads == 0
  assert config.data.max_predictions_per_seq <= config.data.max_seq_length
  assert config.data.max_seq_length <= config.model.max_position_embeddings
  assert 0 <= config.optim.warmup_steps <= config.train.num_train_steps
  assert config.optim.name in ("adamw", "lamb")
  assert config.optim.decay in ("linear", "polynomial")
  assert len(config.mesh.shape) == 3


def test_variant_specifics():
  assert pretrain_configs.get_config("large").optim.name == "lamb"
  assert pretrain_configs.get_config("base").optim.name == "adamw"
  demo = pretrain_configs.get_config("demo")
  assert demo.train.num_train_steps == 300
  assert demo.model.vocab_size == 8192
  assert pretrain_configs.get_config("base").model.vocab_size == 30522
  budget = pretrain_configs.get_config("budget")
  assert (budget.model.hidden_dropout, budget.model.attention_dropout) == (0.0, 0.0)
  assert budget.data.whole_word_mask and budget.train.eval_every_steps == 0


def test_default_variant_is_demo():
  assert pretrain_configs.get_config().variant == "demo"


def test_variants_are_independent_copies():
  a, b = pretrain_configs.get_config("tiny"), pretrain_configs.get_config("tiny")
  a.model.hidden_size = 7
  assert b.model.hidden_size == 128


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="huge"):
    pretrain_configs.get_config("huge")


# ---------------------------------------------------------------------------------------------------
# Overrides, in-process: the same flag definition as pretrain/cli.py, on fresh FlagValues.


def _parse(*overrides, variant="demo"):
  argv = ["pretrain", f"--config={CONFIG_FILE}:{variant}", *overrides]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  flag_values(argv)
  return holder.value


def test_no_overrides_gives_the_variant():
  config = _parse(variant="small")
  assert config.to_dict() == pretrain_configs.get_config("small").to_dict()


def test_valid_overrides():
  config = _parse("--config.train.global_batch_size=64", "--config.mesh.shape=(1,-1,1)",
                  "--config.optim.name=lamb", "--config.optim.peak_learning_rate=2e-4",
                  "--config.model.dtype=float32", "--config.ckpt.async_save=false",
                  variant="tiny")
  assert config.variant == "tiny"
  assert config.train.global_batch_size == 64
  assert tuple(config.mesh.shape) == (1, -1, 1)
  assert config.optim.name == "lamb"
  assert config.optim.peak_learning_rate == pytest.approx(2e-4)
  assert config.model.dtype == "float32"
  assert config.ckpt.async_save is False
  # Untouched fields keep the variant's values.
  assert config.model.hidden_size == 128
  assert config.train.num_train_steps == pretrain_configs.get_config("tiny").train.num_train_steps


def test_overridden_config_is_locked():
  config = _parse()
  with pytest.raises(AttributeError):
    config.model.new_field = 1


def test_unknown_key_override_is_an_error():
  with pytest.raises(Exception, match="no_such_key"):
    _parse("--config.model.no_such_key=1")


def test_wrong_type_override_is_an_error():
  with pytest.raises(flags.IllegalFlagValueError, match="global_batch_size"):
    _parse("--config.train.global_batch_size=abc")


# ---------------------------------------------------------------------------------------------------
# Overrides through the real command line (`python -m pretrain`).


def _cli(tmp_path, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run(
      [sys.executable, "-m", "pretrain", f"--config={CONFIG_FILE}:demo",
       f"--workdir={tmp_path / 'workdir'}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_unknown_key_fails_naming_it(tmp_path):
  result = _cli(tmp_path, "--config.model.no_such_key=1")
  assert result.returncode != 0
  assert "no_such_key" in result.stderr
  assert not (tmp_path / "workdir").exists()


def test_cli_wrong_type_fails_naming_the_key(tmp_path):
  result = _cli(tmp_path, "--config.train.global_batch_size=abc")
  assert result.returncode != 0
  assert "train.global_batch_size" in result.stderr
  assert "abc" in result.stderr
  assert not (tmp_path / "workdir").exists()


def test_cli_overrides_reach_the_run(tmp_path):
  """Valid overrides arrive in train.run: the validation message quotes both overridden values
  (it fails before anything is compiled, so the test is quick)."""
  result = _cli(tmp_path, "--config.data.max_seq_length=64",
                "--config.data.max_predictions_per_seq=77")
  assert result.returncode != 0
  assert "data.max_predictions_per_seq=77 exceeds data.max_seq_length=64" in result.stderr


# ---------------------------------------------------------------------------------------------------
# Validation on a mesh (8 CPU devices, see conftest.py).


def _validate(config, shape=(-1, 1, 1), process_count=1):
  step_lib.validate(config, sharding.make_mesh(shape), process_count)


def test_tiny_config_is_valid_on_several_meshes():
  for shape in ((-1, 1, 1), (1, -1, 1), (2, 2, 2), (1, 1, 8), (4, 2, 1)):
    config = tiny_config(**{"model.num_heads": 8})
    _validate(config, shape)
    step_lib.make_setup(config, sharding.make_mesh(shape))


def test_batch_not_divisible_by_data_parallel_size():
  with pytest.raises(ValueError, match=r"train\.global_batch_size=12 .*data-parallel size \(8"):
    _validate(tiny_config(**{"train.global_batch_size": 12}))
  # data x fsdp counts, tensor does not.
  with pytest.raises(ValueError, match=r"train\.global_batch_size=6 "):
    _validate(tiny_config(**{"train.global_batch_size": 6}), (2, 2, 2))
  _validate(tiny_config(**{"train.global_batch_size": 4}), (2, 2, 2))
  _validate(tiny_config(**{"train.global_batch_size": 4}), (1, 1, 8))


def test_grad_accum_not_dividing():
  with pytest.raises(ValueError, match=r"train\.grad_accum_steps=3"):
    _validate(tiny_config(**{"train.global_batch_size": 16, "train.grad_accum_steps": 3}))
  # 16 / (8 devices x 4 micro-batches) is not whole either.
  with pytest.raises(ValueError, match=r"train\.grad_accum_steps=4"):
    _validate(tiny_config(**{"train.global_batch_size": 16, "train.grad_accum_steps": 4}))
  _validate(tiny_config(**{"train.global_batch_size": 16, "train.grad_accum_steps": 2}))


@pytest.mark.parametrize("steps", [0, -1])
def test_grad_accum_below_one(steps):
  # steps=0 currently fails: step_lib.validate raises ZeroDivisionError while formatting its message.
  with pytest.raises(ValueError, match=rf"train\.grad_accum_steps={steps}"):
    _validate(tiny_config(**{"train.grad_accum_steps": steps}))


def test_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match=r"train\.global_batch_size=16 .*processes \(3\)"):
    _validate(tiny_config(), (-1, 1, 1), process_count=3)


@pytest.mark.parametrize("shape", [(3, 1, 1), (2, 2, 1), (4, 4, 1), (16, 1, 1)])
def test_mesh_shape_not_matching_device_count(shape):
  with pytest.raises(ValueError, match=r"mesh\.shape=.*8"):
    sharding.make_mesh(shape)


def test_mesh_minus_one_not_dividing_device_count():
  with pytest.raises(ValueError, match=r"mesh\.shape=\(3, -1, 1\)"):
    sharding.make_mesh((3, -1, 1))


def test_mesh_more_than_one_minus_one():
  with pytest.raises(ValueError, match=r"mesh\.shape=\(-1, -1, 1\).*at most one -1"):
    sharding.make_mesh((-1, -1, 1))


@pytest.mark.parametrize("shape", [(8, 1), (8, 1, 1, 1), (0, -1, 1), (-2, 4, 1)])
def test_mesh_malformed(shape):
  with pytest.raises(ValueError, match=r"mesh\.shape="):
    sharding.make_mesh(shape)


def test_mesh_minus_one_fills_the_rest():
  mesh = sharding.make_mesh((2, -1, 1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert mesh.devices.size == jax.device_count()
  assert sharding.data_parallel_size(mesh) == 8
  assert sharding.data_parallel_size(sharding.make_mesh((2, 1, 4))) == 2


def test_max_predictions_above_seq_length():
  config = tiny_config(**{"data.max_predictions_per_seq": 33})
  with pytest.raises(ValueError, match=r"data\.max_predictions_per_seq=33 exceeds "
                                       r"data\.max_seq_length=32"):
    _validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("train.log_every_steps", 0, r"train\.log_every_steps=0 must be at least 1"),
    ("train.grad_accum_steps", 0, r"train\.grad_accum_steps=0 must be at least 1"),
    ("train.eval_every_steps", -1, r"train\.eval_every_steps=-1 must be 0 \(only at the end\)"),
    ("train.global_batch_size", 0, r"train\.global_batch_size=0 must be at least 1"),
    ("train.global_batch_size", -8, r"train\.global_batch_size=-8 must be at least 1"),
])
def test_step_counts_out_of_range(key, value, message):
  with pytest.raises(ValueError, match=message):
    _validate(tiny_config(**{key: value}))


def test_seq_length_above_position_embeddings():
  config = tiny_config(**{"data.max_seq_length": 64})
  with pytest.raises(ValueError, match=r"data\.max_seq_length=64 exceeds "
                                       r"model\.max_position_embeddings=32"):
    _validate(config)


def test_hidden_not_divisible_by_heads():
  config = tiny_config(**{"model.num_heads": 5})
  with pytest.raises(ValueError, match=r"model\.hidden_size=32 .*model\.num_heads=5"):
    step_lib.make_setup(config, sharding.make_mesh((-1, 1, 1)))


def test_heads_not_splittable_by_tensor_axis_names_the_parameter():
  config = tiny_config()    # 4 heads
  _validate(config, (1, 1, 8))
  with pytest.raises(ValueError, match=r"parameter bert/layers/0/attention/\w+_kernel has size 4 "
                                       r".*'heads'.*8 ways.*mesh\.shape"):
    step_lib.make_setup(config, sharding.make_mesh((1, 1, 8)))


def test_hidden_not_splittable_by_fsdp_names_the_parameter():
  config = tiny_config(**{"model.hidden_size": 36})      # 36 / 4 heads = 9, 36 % 8 != 0
  with pytest.raises(ValueError, match=r"parameter bert/\S+ has size 36 .*'embed'.*8 ways"):
    step_lib.make_setup(config, sharding.make_mesh((1, 8, 1)))


def test_mlp_not_splittable_by_tensor_names_the_parameter():
  config = tiny_config(**{"model.num_heads": 8, "model.intermediate_size": 36})
  with pytest.raises(ValueError, match=r"parameter bert/layers/0/intermediate/kernel has size 36 "
                                       r".*'mlp'"):
    step_lib.make_setup(config, sharding.make_mesh((1, 1, 8)))


def test_unknown_model_key_is_an_error():
  config = tiny_config()
  config.model.unlock()
  config.model.no_such_key = 1
  with pytest.raises(ValueError, match="no_such_key"):
    step_lib.make_setup(config, sharding.make_mesh((-1, 1, 1)))


def test_bad_optimizer_settings_fail_in_setup():
  with pytest.raises(ValueError, match=r"optim\.name"):
    step_lib.make_setup(tiny_config(**{"optim.name": "sgd"}), sharding.make_mesh((-1, 1, 1)))
  with pytest.raises(ValueError, match=r"optim\.warmup_steps"):
    step_lib.make_setup(tiny_config(**{"optim.warmup_steps": 9}), sharding.make_mesh((-1, 1, 1)))


def test_bad_activation_and_attention_impl():
  with pytest.raises(ValueError, match=r"model\.hidden_act='swish'"):
    step_lib.make_setup(tiny_config(**{"model.hidden_act": "swish"}), sharding.make_mesh((-1, 1, 1)))
  with pytest.raises(ValueError, match=r"model\.attention_impl='flash'"):
    step_lib.make_setup(tiny_config(**{"model.attention_impl": "flash"}),
                     sharding.make_mesh((-1, 1, 1)))


@pytest.mark.parametrize("shape", [(-1, 1, 1), (2, 2, 2)])
def test_state_from_given_parameters_is_the_initialised_one(shape):
  """`Setup.from_params` (the convergence tool's import: every parameter given) makes the state
  that `init` with every parameter restored makes, without drawing random parameters first:
  the same values, dtypes and shardings, optimizer state and rng; another tree is refused."""
  config = tiny_config()
  setup = step_lib.make_setup(config, sharding.make_mesh(shape))
  given = jax.tree.map(lambda a: np.random.default_rng(a.size).standard_normal(a.shape),
                       setup.abstract_state.params)         # float64 host arrays
  restored = setup.init(7, restore=lambda fresh: jax.tree.map(
      lambda f, x: jax.device_put(np.asarray(x, f.dtype), f.sharding), fresh, given))
  made = setup.from_params(given, 7)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(made)):
    assert a.dtype == b.dtype and a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="the model's parameter tree"):
    setup.from_params({"bert": given["bert"]}, 7)


def test_steps_compiled_in_the_background_are_not_compiled_again():
  """`compile_in_background` from the state's and a batch's shapes alone (as the convergence tool
  compiles while it imports the weights): the first real calls find both programs compiled.
  Counted by JAX's own compile events; the same call on a fresh jit does compile (the count can
  fail)."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  from pretrain.data import loader  # pylint: disable=g-import-not-at-top
  from pretrain.data.synthetic import SyntheticSource  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.train.global_batch_size = 16
  mesh = sharding.make_mesh((-1, 1, 1))
  built = step_lib.build(config, mesh)
  setup = built.setup
  batch_shape = loader.abstract_batch(16, 32, config.data.max_predictions_per_seq, mesh)
  threads = [
      step_lib.compile_in_background(built.train_step, mesh, setup.abstract_state, batch_shape),
      step_lib.compile_in_background(built.eval_step, mesh, setup.abstract_state.params,
                                     batch_shape)]
  batch = next(SyntheticSource(vocab_size=config.model.vocab_size, max_seq_length=32,
                               max_predictions_per_seq=config.data.max_predictions_per_seq,
                               masked_lm_prob=0.15, global_batch_size=16, seed=0))
  state = setup.init(0)
  compiles = []

  def listen(event, secs, **_):
    del secs
    if event.endswith("backend_compile_duration"):
      compiles.append(event)

  def compiled_by(call) -> int:
    before = len(compiles)
    with jax.set_mesh(mesh):
      jax.block_until_ready(call())
    return len(compiles) - before

  monitoring.register_event_duration_secs_listener(listen)
  try:
    for thread in threads:
      thread.join()
    global_batch = loader.to_global(batch, mesh)
    assert compiled_by(lambda: built.eval_step(state.params, global_batch)) == 0
    assert compiled_by(lambda: step_lib.make_eval_step(setup)(state.params, global_batch)) >= 1
    assert compiled_by(lambda: built.train_step(state, global_batch)) == 0
  finally:
    monitoring.unregister_event_duration_listener(listen)
