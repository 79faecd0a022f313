"""Pretraining configs: `--config=configs/pretrain.py:VARIANT`.

Variants: demo (minutes on a laptop CPU, on the shards `make demo` writes), the small-BERT grid (tiny, mini, small, medium) and the
original base / large. Every field can be overridden on the command line, e.g.
`--config.train.global_batch_size=512 --config.mesh.shape="(1,-1,1)"`; an unknown key is an error.
"""

import ml_collections

# name: (layers, hidden, heads). The small-BERT grid of Turc et al. (2019) plus the originals.
_SIZES = {
    "demo": (2, 128, 2),
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "medium": (8, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def model_config(layers: int, hidden: int, heads: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=30522,              # real vocabulary; the embedding table is padded (below)
      vocab_pad_multiple=128,        # pad the table so matmuls tile; padded logits are masked
      hidden_size=hidden,
      num_layers=layers,
      num_heads=heads,
      intermediate_size=4 * hidden,
      max_position_embeddings=512,
      type_vocab_size=2,
      hidden_act="gelu",             # "gelu" (exact, erf) or "gelu_tanh" (google-research/bert)
      hidden_dropout=0.1,
      attention_dropout=0.1,
      layer_norm_eps=1e-12,
      initializer_range=0.02,
      dtype="bfloat16",              # compute dtype of matmuls and activations
      param_dtype="float32",
      attention_impl="auto",         # without attention dropout: jax.nn.dot_product_attention
                                     # ("auto", "xla", "cudnn") or the fused kernel ("fused")
      # Speed switches (docs/benchmarks.md measures them); the defaults are the fastest on GPU.
      scan_layers=False,             # one lax.scan over stacked layers: params get a layer axis
      remat_policy="none",           # none | full | dots_saveable | dots_with_no_batch_dims_saveable
      dropout_rng="hash",            # hash (hashed positions) | threefry | rbg | unsafe_rbg
      attention_dropout_impl="fused",  # fused (GPU kernel, hashed masks) | reference | lean
      logits_grad_dtype="float32",   # float32 | bfloat16 gradient into the logits' backward matmuls
      mlm_gather="one_hot",          # one_hot (a matmul) | take (XLA GPU then lays activations
                                     # out batch-minor and transposes them in every layer)
      residual_norm_impl="fused",    # fused (GPU kernel: residual add, dropout, LayerNorm) | xla
  ))


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  if variant not in _SIZES:
    raise ValueError(f"unknown pretrain config variant {variant!r}; choose one of {sorted(_SIZES)}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.seed = 0
  config.model = model_config(*_SIZES[variant])

  config.data = ml_collections.ConfigDict(dict(
      source="shards",               # "shards" (python -m tools.data create) or "synthetic"
      path="",                       # the shard directory (with manifest.json)
      max_seq_length=128,
      max_predictions_per_seq=20,
      masked_lm_prob=0.15,           # dynamic masking (and the synthetic stream)
      whole_word_mask=False,         # dynamic masking
      verify_checksums=True,         # SHA-256 of every shard when the loader opens it
      eval_seed=1_000_003,           # the held-out stream draws from its own seed
  ))

  config.optim = ml_collections.ConfigDict(dict(
      name="adamw",                  # "adamw" or "lamb"
      peak_learning_rate=1e-4,
      end_learning_rate=0.0,
      warmup_steps=10_000,
      decay="linear",                # "linear" or "polynomial" (with decay_power)
      decay_power=1.0,
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      weight_decay=0.01,
      max_grad_norm=1.0,             # global-norm clipping; 0 disables
  ))

  config.train = ml_collections.ConfigDict(dict(
      num_train_steps=1_000_000,
      global_batch_size=256,         # sequences per optimizer step, over all hosts and devices
      grad_accum_steps=1,            # micro-batches per step (each global_batch_size / this)
      log_every_steps=100,
      eval_every_steps=10_000,
      eval_steps=20,
      peak_tflops_per_device=0.0,    # for MFU; 0 = look the device kind up (unknown: no MFU)
      skip_nonfinite_steps=False,    # True: a step with a NaN/inf loss or gradient norm leaves the
                                     # state unchanged (counted as skipped_steps); False: the run
                                     # stops there (docs/reliability.md)
  ))

  config.ckpt = ml_collections.ConfigDict(dict(
      save_interval_steps=10_000,
      max_to_keep=3,
      async_save=True,
      checksums=True,                # SHA-256 of every file after each save, checked on restore
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),              # (data, fsdp, tensor); one entry may be -1 = the rest
  ))

  if variant in ("demo", "tiny", "mini", "small", "medium"):
    config.optim.warmup_steps = 1_000
    config.optim.peak_learning_rate = 5e-4
  if variant == "large":
    config.optim.name = "lamb"
    config.optim.peak_learning_rate = 1e-3
  if variant == "demo":
    config.train.num_train_steps = 300
    config.train.global_batch_size = 32
    config.train.log_every_steps = 25
    config.train.eval_every_steps = 100
    config.train.eval_steps = 4
    config.optim.warmup_steps = 30
    config.model.vocab_size = 8192           # the SentencePiece model `make demo` trains
    config.model.max_position_embeddings = 128
    config.data.path = "workdir/demo/data"
    config.ckpt.save_interval_steps = 100
  return config
