"""The train loop over shards: N steps, a restart and N more equal 2N straight (parameters, and the
data position each checkpoint holds); held-out batches are read once and scored the same each
time; the eval stream is opened once.

The restart test makes its shards with `create_data.create` from a few chapters of the demo corpus
and the small SentencePiece model (trained once per session); the others use the synthetic source.
"""

import json
import os
from pathlib import Path
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pretrain import sharding
from pretrain import step as step_lib
from pretrain.data import create as create_data
from pretrain.data import loader
from pretrain.data import shards
from pretrain.data.create import CreateSpec

from helpers import demo_tokenizer, write_slice

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "moby_dick.jsonl.gz"


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return demo_tokenizer(tmp_path_factory)


# ================================================================================================
# The train loop: N steps, restart, N more == 2N straight

_TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from helpers import tiny_config
    from pretrain import sharding, step as step_lib, train
    from pretrain.checkpoint import Checkpointer

    data, out, n, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def config(steps):
      return tiny_config(**{{
          "data.source": "shards", "data.path": data, "model.vocab_size": vocab,
          "model.max_position_embeddings": 32, "data.max_seq_length": 32,
          "data.max_predictions_per_seq": 5, "train.num_train_steps": steps,
          "train.log_every_steps": 1000, "train.eval_every_steps": 1000,
          "ckpt.save_interval_steps": 1000, "ckpt.async_save": False}})

    def params(state):
      return {{jax.tree_util.keystr(p): np.asarray(v)
              for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))}}

    def data_state(workdir, step, abstract):
      ckpt = Checkpointer(workdir + "/checkpoints", save_interval_steps=1, max_to_keep=5,
                          async_save=False)
      state, data_state = ckpt.restore(abstract, step)
      ckpt.close()
      return data_state

    train.run(config(n), out + "/resumed")
    resumed = train.run(config(2 * n), out + "/resumed")
    straight = train.run(config(2 * n), out + "/straight")
    setup = step_lib.make_setup(config(2 * n), sharding.make_mesh((-1, 1, 1)))
    np.savez(out + "/resumed.npz", **params(resumed))
    np.savez(out + "/straight.npz", **params(straight))
    with open(out + "/result.json", "w") as f:
      json.dump({{"steps": [int(resumed.step), int(straight.step)],
                 "data": {{"resumed_n": data_state(out + "/resumed", n, setup.abstract_state),
                          "resumed_2n": data_state(out + "/resumed", 2 * n, setup.abstract_state),
                          "straight_2n": data_state(out + "/straight", 2 * n,
                                                    setup.abstract_state)}}}}, f)
    """)


def test_train_loop_restart_equals_straight_run(spm, tmp_path):
  inputs = write_slice(DEMO, tmp_path / "three.jsonl.gz", 3, skip=4)   # >= 3 batches an epoch
  data = tmp_path / "shards"
  create_data.create([inputs], spm.path, str(data),
                     CreateSpec(max_seq_length=32, max_predictions_per_seq=5, dupe_factor=1,
                                eval_fraction=0, mode="dynamic"), num_workers=1)
  num = shards.read_manifest(str(data))["splits"]["train"]["num_instances"]
  bpe = num // 16
  n = bpe // 2 + 1                          # steps n..2n cross the epoch boundary
  assert 2 <= n < bpe < 2 * n <= 40, (num, bpe)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS=("--xla_force_host_platform_device_count=2 "
                        "--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true"),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  script = _TRAIN_SCRIPT.format(tests=str(REPO / "tests"))
  result = subprocess.run([sys.executable, "-c", script, str(data), str(tmp_path), str(n),
                           str(spm.vocab_size)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-5000:]
  with open(tmp_path / "result.json") as f:
    out = json.load(f)
  assert out["steps"] == [2 * n, 2 * n]
  assert out["data"]["resumed_n"] == {"epoch": n // bpe, "batch": n % bpe}
  assert out["data"]["resumed_2n"] == out["data"]["straight_2n"] == {"epoch": 2 * n // bpe,
                                                                     "batch": 2 * n % bpe}
  resumed, straight = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "straight.npz")
  assert sorted(resumed.files) == sorted(straight.files) and len(resumed.files) > 10
  for key in resumed.files:
    np.testing.assert_allclose(resumed[key], straight[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ================================================================================================
# Evaluation in the train loop

def test_held_out_batches_are_read_once_and_scored_the_same():
  """The training loop reads the eval stream's first `train.eval_steps` batches once and scores
  those each time; evaluate() of the same parameters on them gives the same metrics."""
  import jax  # pylint: disable=g-import-not-at-top
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"train.eval_steps": 3})
  batches = train.held_out_batches(config)
  assert len(batches) == 3
  again = train.held_out_batches(config)
  for a, b in zip(batches, again):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  mesh = sharding.make_mesh((-1, 1, 1))
  setup = step_lib.make_setup(config, mesh)
  eval_step = step_lib.make_eval_step(setup)
  with jax.set_mesh(mesh):
    state = setup.init(0)
    first = train.evaluate(eval_step, state.params, batches, mesh)
    second = train.evaluate(eval_step, state.params, batches, mesh)
  assert first == second and first["loss"] > 0
  assert first != train.evaluate(eval_step, state.params, batches[:1], mesh)   # scores them all
  assert train.evaluate(eval_step, state.params, [], mesh) == {}


@pytest.mark.parametrize("every, evals_at", [(2, [2, 4]), (0, [4])])   # 0: only at the end
def test_training_loop_opens_the_eval_stream_once(every, evals_at, tmp_path, monkeypatch):
  from helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from pretrain import train  # pylint: disable=g-import-not-at-top
  opened = []
  make_source = loader.make_source

  def counting(config, *, split):
    opened.append(split)
    return make_source(config, split=split)

  monkeypatch.setattr(loader, "make_source", counting)
  config = tiny_config(**{"train.num_train_steps": 4, "train.eval_every_steps": every,
                          "ckpt.save_interval_steps": 100})
  train.run(config, str(tmp_path))
  assert opened.count("eval") == 1
  evals = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
           if any(k.startswith("eval/") for k in json.loads(line))]
  assert evals == evals_at
