"""Weights between Hugging Face transformers' BERT (PyTorch state_dict) and `pretrain.model`.

Our parameters are the pure nested dict `nnx.to_pure_dict(nnx.split(model)[1])` of
`pretrain.model.BertForPreTraining` (encoder layers keyed by int). Differences from the HF layout:
torch Linear weights are (out, in), our kernels (in, out); query/key/value are one fused
`qkv_kernel` (hidden, 3, heads, head_dim); the attention output is `out_kernel` (heads, head_dim,
hidden); the word-embedding table and the MLM bias are padded from `vocab_size` to
`padded_vocab_size` with zeros. The MLM decoder is tied to the word embeddings on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from pretrain.model.config import BertConfig

Path = tuple[str | int, ...]

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh", "relu": "relu"}
# Ours -> transformers: gelu_pytorch_tanh is the same tanh approximation as gelu_new, in one fused
# torch kernel.
_OUR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")  # HF buffers
_QKV = ("query", "key", "value")
_WORD = "bert.embeddings.word_embeddings.weight"
_MLM_BIAS, _DECODER_BIAS, _DECODER = ("cls.predictions.bias", "cls.predictions.decoder.bias",
                                      "cls.predictions.decoder.weight")


class _Entry(NamedTuple):
  """One HF tensor that maps one-to-one onto one of our parameters."""
  hf: str                    # HF name, in BertForPreTraining spelling
  path: Path                 # where it lives in our params
  shape: tuple[int, ...]     # its HF shape
  transpose: bool            # a torch Linear weight (out, in) <-> our kernel (in, out)


def _entries(config: BertConfig, with_heads: bool) -> list[_Entry]:
  """The one-to-one tensors (word embeddings, QKV, attention output, MLM bias are special)."""
  h, m = config.hidden_size, config.intermediate_size

  def linear(hf: str, path: Path, n_in: int, n_out: int) -> list[_Entry]:
    return [_Entry(f"{hf}.weight", (*path, "kernel"), (n_out, n_in), True),
            _Entry(f"{hf}.bias", (*path, "bias"), (n_out,), False)]

  def norm(hf: str, path: Path) -> list[_Entry]:
    return [_Entry(f"{hf}.weight", (*path, "scale"), (h,), False),
            _Entry(f"{hf}.bias", (*path, "bias"), (h,), False)]

  emb = ("bert", "embeddings")
  entries = [
      _Entry("bert.embeddings.position_embeddings.weight", (*emb, "position_embeddings"),
             (config.max_position_embeddings, h), False),
      _Entry("bert.embeddings.token_type_embeddings.weight", (*emb, "token_type_embeddings"),
             (config.type_vocab_size, h), False),
      *norm("bert.embeddings.LayerNorm", (*emb, "layer_norm"))]
  for i in range(config.num_layers):
    hf, ours = f"bert.encoder.layer.{i}", ("bert", "layers", i)
    entries += [
        _Entry(f"{hf}.attention.output.dense.bias", (*ours, "attention", "out_bias"), (h,), False),
        *norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_layer_norm")),
        *linear(f"{hf}.intermediate.dense", (*ours, "intermediate"), h, m),
        *linear(f"{hf}.output.dense", (*ours, "output"), m, h),
        *norm(f"{hf}.output.LayerNorm", (*ours, "output_layer_norm"))]
  entries += linear("bert.pooler.dense", ("bert", "pooler"), h, h)
  if with_heads:
    entries += [*linear("cls.predictions.transform.dense", ("mlm", "transform"), h, h),
                *norm("cls.predictions.transform.LayerNorm", ("mlm", "layer_norm")),
                *linear("cls.seq_relationship", ("nsp", "dense"), h, 2)]
  return entries


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch.Tensor, without importing torch
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def _set(tree: dict, path: Path, value: np.ndarray) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: Path) -> np.ndarray:
  for k in path:
    tree = tree[k]
  return np.asarray(tree, np.float32)


def params_from_hf(state_dict: Mapping[str, Any], config: BertConfig, *,
                   with_heads: bool = True) -> dict:
  """Our params (numpy float32 leaves) from a BertForPreTraining or BertModel state_dict.

  Keys may carry the "bert." prefix or not (a bare BertModel checkpoint). With `with_heads=False`
  the cls.* heads are neither needed nor read, and only the `bert` subtree is returned.
  Raises KeyError naming a missing HF key, ValueError naming a tensor whose shape does not fit
  `config`, a key that `config` has no place for (e.g. a layer past `num_layers`), or an untied
  MLM decoder.
  """
  prefix = "bert." if _WORD in state_dict else ""
  used: set[str] = set()

  def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = prefix + name[len("bert."):] if name.startswith("bert.") else name
    if key not in state_dict:
      raise KeyError(f"HF state_dict has no {key!r}")
    x = _to_numpy(state_dict[key])
    if x.shape != shape:
      raise ValueError(f"HF tensor {key!r} has shape {x.shape}, but the config needs {shape}")
    used.add(key)
    return x

  h, n, d, v = config.hidden_size, config.num_heads, config.head_dim, config.vocab_size
  pad = config.padded_vocab_size - v
  params: dict = {}
  for e in _entries(config, with_heads):
    x = read(e.hf, e.shape)
    _set(params, e.path, x.T if e.transpose else x)
  word = read(_WORD, (v, h))
  _set(params, ("bert", "embeddings", "word_embeddings"), np.pad(word, ((0, pad), (0, 0))))
  for i in range(config.num_layers):
    hf, ours = f"bert.encoder.layer.{i}.attention", ("bert", "layers", i, "attention")
    w = np.stack([read(f"{hf}.self.{p}.weight", (h, h)) for p in _QKV])  # (3, out, in)
    b = np.stack([read(f"{hf}.self.{p}.bias", (h,)) for p in _QKV])
    _set(params, (*ours, "qkv_kernel"), w.reshape(3, n, d, h).transpose(3, 0, 1, 2))
    _set(params, (*ours, "qkv_bias"), b.reshape(3, n, d))
    out = read(f"{hf}.output.dense.weight", (h, h))  # (out, in = heads * head_dim)
    _set(params, (*ours, "out_kernel"), out.T.reshape(n, d, h))
  if with_heads:
    names = [k for k in (_MLM_BIAS, _DECODER_BIAS) if k in state_dict] or [_MLM_BIAS]
    biases = [read(k, (v,)) for k in names]
    if not all(np.array_equal(biases[0], b) for b in biases[1:]):
      raise ValueError(f"{_MLM_BIAS!r} and {_DECODER_BIAS!r} differ; our MLM head has one bias")
    if _DECODER in state_dict and not np.array_equal(read(_DECODER, (v, h)), word):
      raise ValueError(f"{_DECODER!r} is not tied to {prefix}embeddings.word_embeddings.weight; "
                       "our MLM decoder is the word-embedding table")
    _set(params, ("mlm", "bias"), np.pad(biases[0], (0, pad)))
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                      and (with_heads or not k.startswith("cls.")))
  if unexpected:
    raise ValueError(f"HF state_dict has {len(unexpected)} key(s) that the config (num_layers="
                     f"{config.num_layers}) has no place for, e.g. {unexpected[:5]}")
  return params


def hf_from_params(params: Mapping, config: BertConfig) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf` (vocabulary unpadded), as numpy float32 arrays.

  Full params give BertForPreTraining names (with the tied cls.predictions.decoder.* entries, as
  its state_dict() has them); params with only the `bert` subtree give bare BertModel names.
  """
  with_heads = "mlm" in params
  h, v = config.hidden_size, config.vocab_size
  out: dict[str, np.ndarray] = {}
  out[_WORD] = _get(params, ("bert", "embeddings", "word_embeddings"))[:v]
  for e in _entries(config, with_heads):
    x = _get(params, e.path)
    out[e.hf] = np.ascontiguousarray(x.T) if e.transpose else x
  for i in range(config.num_layers):
    hf, ours = f"bert.encoder.layer.{i}.attention", ("bert", "layers", i, "attention")
    w = _get(params, (*ours, "qkv_kernel")).transpose(1, 2, 3, 0).reshape(3, h, h)
    b = _get(params, (*ours, "qkv_bias")).reshape(3, h)
    for j, p in enumerate(_QKV):
      out[f"{hf}.self.{p}.weight"] = np.ascontiguousarray(w[j])
      out[f"{hf}.self.{p}.bias"] = b[j]
    out[f"{hf}.output.dense.weight"] = np.ascontiguousarray(
        _get(params, (*ours, "out_kernel")).reshape(h, h).T)
  if with_heads:
    out[_MLM_BIAS] = out[_DECODER_BIAS] = _get(params, ("mlm", "bias"))[:v]
    out[_DECODER] = out[_WORD]
    return out
  return {k[len("bert."):]: x for k, x in out.items()}


def bert_config_from_hf(hf_config_dict: Mapping[str, Any], **overrides: Any) -> BertConfig:
  """Our BertConfig from a transformers BertConfig's `to_dict()` (or its config.json).

  `overrides` set our own fields, e.g. `dtype="float32"`.
  """
  c = hf_config_dict
  act = c.get("hidden_act", "gelu")
  if act not in _HF_ACTIVATIONS:
    raise ValueError(f"HF hidden_act={act!r} is not supported; known: {sorted(_HF_ACTIVATIONS)}")
  if c.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"HF position_embedding_type={c['position_embedding_type']!r}; "
                     "only 'absolute' is supported")
  defaults = BertConfig()
  config = BertConfig(**{
      "vocab_size": c["vocab_size"],
      "hidden_size": c["hidden_size"],
      "num_layers": c["num_hidden_layers"],
      "num_heads": c["num_attention_heads"],
      "intermediate_size": c["intermediate_size"],
      "max_position_embeddings": c.get("max_position_embeddings",
                                       defaults.max_position_embeddings),
      "type_vocab_size": c.get("type_vocab_size", defaults.type_vocab_size),
      "hidden_act": _HF_ACTIVATIONS[act],
      "hidden_dropout": c.get("hidden_dropout_prob", defaults.hidden_dropout),
      "attention_dropout": c.get("attention_probs_dropout_prob", defaults.attention_dropout),
      "layer_norm_eps": c.get("layer_norm_eps", defaults.layer_norm_eps),
      "initializer_range": c.get("initializer_range", defaults.initializer_range),
      **overrides})
  config.validate()
  return config


def hf_config_from_bert(config: BertConfig, **fields: Any) -> dict[str, Any]:
  """A transformers BertConfig's fields (its config.json) for our config: `bert_config_from_hf`'s
  inverse on every field transformers has.

  `vocab_size` is the real vocabulary, not `padded_vocab_size`: `hf_from_params` cuts the tables
  to it, and transformers needs the two to agree. `fields` adds transformers' own, e.g.
  `architectures`, `pad_token_id` or `id2label`.
  """
  return {
      "model_type": "bert",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.intermediate_size,
      "max_position_embeddings": config.max_position_embeddings,
      "type_vocab_size": config.type_vocab_size,
      "hidden_act": _OUR_ACTIVATIONS[config.hidden_act],
      "hidden_dropout_prob": config.hidden_dropout,
      "attention_probs_dropout_prob": config.attention_dropout,
      "layer_norm_eps": config.layer_norm_eps,
      "initializer_range": config.initializer_range,
      "position_embedding_type": "absolute",
      "tie_word_embeddings": True,
      **fields}
