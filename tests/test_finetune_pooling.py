"""Pooling for full fine-tuning (head.pooling): BERT's pooled [CLS] by default, the raw [CLS] state,
or the mean of the final token states over the input mask; a pooler the head does not read is
neither restored from the checkpoint nor trained."""

import types

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.glue import get_config as glue_config
from finetune import train as ft_train
from finetune.heads import TaskModel
from pretrain import sharding
from pretrain.model.config import BertConfig

SMALL = BertConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                   max_position_embeddings=16, dtype="float32", hidden_dropout=0.0,
                   attention_dropout=0.0)
LENGTHS = (8, 5, 2)


def _batch(pad_id=0):
  rng = np.random.default_rng(0)
  mask = (np.arange(8)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(5, 64, mask.shape), pad_id).astype(np.int32)
  return {"input_ids": jnp.asarray(ids), "input_mask": jnp.asarray(mask),
          "segment_ids": jnp.zeros_like(jnp.asarray(ids))}


def _model(**kwargs):
  return TaskModel(SMALL, kind=kwargs.pop("kind", "classification"), num_labels=3,
                   rngs=nnx.Rngs(0), **kwargs)


@nnx.jit
def _outputs(model, batch):
  """(logits, sequence output, pooled output), compiled once (eager dispatch is slow on CPU)."""
  seq, pooled = model.bert(batch["input_ids"], batch["input_mask"], batch["segment_ids"])
  return model(batch), seq, pooled


def test_mean_pooling_is_the_masked_mean_through_the_head():
  model, batch = _model(pooling="mean"), _batch()
  logits, seq, _ = _outputs(model, batch)
  by_hand = np.stack([np.asarray(seq)[i, :n].mean(axis=0) for i, n in enumerate(LENGTHS)])
  np.testing.assert_allclose(logits, model.head(jnp.asarray(by_hand)), rtol=1e-5, atol=1e-6)
  # What the padding holds does not change the mean (nor the rest: attention masks it).
  np.testing.assert_allclose(_outputs(model, _batch(pad_id=7))[0], logits, rtol=1e-5, atol=1e-6)


def test_default_pooling_reads_the_pooler_and_cls_the_raw_state():
  batch = _batch()
  default = _model()
  assert default.pooling == "pooler"
  logits, seq, pooled = _outputs(default, batch)
  np.testing.assert_allclose(logits, default.head(pooled), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(_outputs(_model(pooling="cls"), batch)[0], default.head(seq[:, 0]),
                             rtol=1e-6, atol=1e-7)
  assert _model(features=True).pooling == "mean"        # features mode keeps its own default


def test_unknown_pooling_names_its_key():
  with pytest.raises(ValueError, match=r"head.pooling='avg'; choose one of 'pooler', 'cls'"):
    _model(pooling="avg")
  with pytest.raises(ValueError, match=r"head.feature_pooling='pooler'"):
    _model(pooling="pooler", features=True)


def _config(**head):
  config = glue_config("sst2")
  config.head.update(head)
  config.data.max_seq_length = 8
  config.optim.schedule = "constant"      # a nonzero rate at step 0
  return config


def test_an_unread_pooler_is_neither_restored_nor_trained():
  sentence, span = (types.SimpleNamespace(kind=k, num_labels=2) for k in ("classification", "span"))
  assert ft_train.restores_pooler(_config(), sentence)              # the default: as before
  assert not ft_train.restores_pooler(_config(pooling="mean"), sentence)
  assert not ft_train.restores_pooler(_config(), span)
  assert not ft_train.restores_pooler(_config(mode="features"), sentence)

  setup = ft_train.make_setup(_config(pooling="mean"), sentence, SMALL,
                              sharding.make_mesh((-1, 1, 1)), num_steps=10)
  params = nnx.to_pure_dict(nnx.split(setup.make_model(0))[1])
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(setup.tx.update)(grads, jax.jit(setup.tx.init)(params), params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates["bert"]["pooler"]))
  assert np.any(np.asarray(updates["bert"]["layers"][0]["output"]["kernel"]) != 0)
  assert np.any(np.asarray(updates["head"]["kernel"]) != 0)
