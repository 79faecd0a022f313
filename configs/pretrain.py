"""Pretraining configs: `--config=configs/pretrain.py:VARIANT`.

Variants: demo (minutes on a laptop CPU, on the shards `make demo` writes), the small-BERT grid
(tiny, mini, small, medium), the original base / large, and budget (the 10-minute pretraining
recipe of docs/finetuning.md). Every field can be overridden on the command line, e.g.
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
    "budget": (8, 512, 8),     # medium's shape, trained by the 10-minute recipe below
}


def model_config(layers: int, hidden: int, heads: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=30522,              # real vocabulary; the embedding table is padded (below)
      vocab_pad_multiple=128,        # pad the table so matmuls tile; padded logits are masked
      hidden_size=hidden,            # width of every layer (H)
      num_layers=layers,             # transformer layers (L)
      num_heads=heads,               # attention heads per layer (A); hidden_size / num_heads each
      intermediate_size=4 * hidden,  # width of each layer's feed-forward block
      max_position_embeddings=512,   # longest sequence the position table holds
      type_vocab_size=2,             # segment (token type) ids: 2 for sentence pairs A, B
      hidden_act="gelu",             # "gelu" (exact, erf) or "gelu_tanh" (google-research/bert)
      hidden_dropout=0.1,            # dropout rate on embeddings and every residual branch
      attention_dropout=0.1,         # dropout rate on the attention probabilities
      layer_norm_eps=1e-12,          # LayerNorm epsilon (google-research/bert's)
      initializer_range=0.02,        # stddev of the truncated-normal weight initialiser
      dtype="bfloat16",              # compute dtype of matmuls and activations
      param_dtype="float32",         # dtype of parameters and optimizer state
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
  config.variant = variant           # this config's size; names runs and reports, sets no field
  config.seed = 0                    # initialisation, dropout and the training data's order
  config.model = model_config(*_SIZES[variant])

  config.data = ml_collections.ConfigDict(dict(
      source="shards",               # "shards" (python -m tools.data create) or "synthetic"
      path="",                       # the shard directory (with manifest.json)
      max_seq_length=128,            # tokens per sequence; must equal the shards' (manifest.json)
      max_predictions_per_seq=20,    # masked positions per sequence that the MLM head predicts
      masked_lm_prob=0.15,           # dynamic masking (and the synthetic stream)
      whole_word_mask=False,         # dynamic masking
      verify_checksums=True,         # SHA-256 of every shard when the loader opens it
      eval_seed=1_000_003,           # the held-out stream draws from its own seed
      read_block_records=1,          # 1: records in a random order every epoch; K > 1: blocks of
                                     # K neighbours, ~1/K range requests a record; training only:
                                     # held-out batches are read one by one (docs/storage.md)
      shuffle_window_records=65_536,  # read_block_records > 1: records shuffled together (whole
                                      # batches; up to two windows in memory per host)
  ))

  config.optim = ml_collections.ConfigDict(dict(
      name="adamw",                  # "adamw" or "lamb"
      peak_learning_rate=1e-4,       # the learning rate at the end of warmup
      end_learning_rate=0.0,         # the rate reached at train.num_train_steps
      warmup_steps=10_000,           # linear warmup from 0 to peak_learning_rate
      decay="linear",                # "linear" or "polynomial" (with decay_power)
      decay_power=1.0,               # polynomial decay's exponent (1 = linear)
      b1=0.9,                        # Adam/LAMB first-moment decay
      b2=0.999,                      # Adam/LAMB second-moment decay
      eps=1e-6,                      # Adam/LAMB epsilon
      weight_decay=0.01,             # decoupled weight decay; never on biases or LayerNorm
      max_grad_norm=1.0,             # global-norm clipping; 0 disables
  ))

  config.train = ml_collections.ConfigDict(dict(
      num_train_steps=1_000_000,     # optimizer steps of the run (the schedule ends here)
      global_batch_size=256,         # sequences per optimizer step, over all hosts and devices
      grad_accum_steps=1,            # micro-batches per step (each global_batch_size / this)
      log_every_steps=100,           # metrics, progress and the host sync, every N steps
      eval_every_steps=10_000,       # held-out evaluation every N steps (0: none) and at the end
      eval_steps=20,                 # held-out batches per evaluation
      peak_tflops_per_device=0.0,    # for MFU; 0 = look the device kind up (unknown: no MFU)
      skip_nonfinite_steps=False,    # True: a step with a NaN/inf loss or gradient norm leaves the
                                     # state unchanged (counted as skipped_steps); False: the run
                                     # stops there (docs/reliability.md)
  ))

  config.ckpt = ml_collections.ConfigDict(dict(
      save_interval_steps=10_000,    # checkpoint every N steps (and at the end, or on SIGTERM)
      max_to_keep=3,                 # checkpoints kept; older ones are deleted
      async_save=True,               # write checkpoints in the background while training goes on
      checksums=True,                # SHA-256 of every file after each save, checked on restore
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),              # (data, fsdp, tensor); one entry may be -1 = the rest
  ))

  if variant in ("demo", "tiny", "mini", "small", "medium", "budget"):
    config.optim.warmup_steps = 1_000
    config.optim.peak_learning_rate = 5e-4
  if variant == "budget":
    # The shared corpus into a transferable encoder in at most 10 minutes on one H100, shard
    # creation included (docs/finetuning.md): no dropout (as the cramming recipe), whole-word
    # masking, one linear warmup-decay cycle ending at the last step.
    config.model.hidden_dropout = 0.0
    config.model.attention_dropout = 0.0
    config.data.whole_word_mask = True
    config.train.num_train_steps = 20_000
    config.train.eval_every_steps = 0
    config.ckpt.save_interval_steps = 20_000
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
