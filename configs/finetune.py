"""Fields shared by the fine-tuning configs (configs/glue.py, configs/squad.py); not a config file.

The encoder's architecture and tokenizer come from the pretraining checkpoint (`init_checkpoint`);
the `model` group holds what fine-tuning may change (dropout, precision, speed switches) plus the
architecture fields as optional checks: set one and a checkpoint that differs is refused.
"""

import ml_collections
from ml_collections import config_dict

from configs import pretrain
from pretrain.model.config import ARCHITECTURE_KEYS


def base_config(task: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = task                 # set by the variant (glue.py:TASK, squad.py:VERSION)
  config.seed = 0                    # the first seed: head initialisation, dropout, data order
  config.seeds = 1                   # runs with seeds seed, seed+1, ...; results.json summarises them

  config.init_checkpoint = ""        # a pretraining workdir (python -m pretrain --workdir=...)
  config.init_step = -1              # its checkpoint step; -1 = latest
  config.from_scratch = False        # random encoder weights (same architecture and tokenizer)
  config.model_variant = ""          # architecture without a checkpoint: a configs/pretrain.py variant
  config.tokenizer = ""              # tokenizer file; default: the one recorded with the checkpoint
  config.restore_pooler = True       # also take the pretrained [CLS] pooler (classification heads)

  # What fine-tuning may choose: dropout, precision and every speed switch, with pretraining's
  # defaults (configs/pretrain.py); pretrain/speed.py decides what runs, as in pretraining.
  runtime = {k: v for k, v in pretrain.model_config(12, 768, 12).items()
             if k not in ARCHITECTURE_KEYS}
  config.model = ml_collections.ConfigDict(dict(
      **runtime,
      # Architecture: None = from the checkpoint; a value that differs from it is an error.
      vocab_size=config_dict.placeholder(int),               # None: the checkpoint's; set: must equal it
      hidden_size=config_dict.placeholder(int),              # None: the checkpoint's; set: must equal it
      num_layers=config_dict.placeholder(int),               # None: the checkpoint's; set: must equal it
      num_heads=config_dict.placeholder(int),                # None: the checkpoint's; set: must equal it
      intermediate_size=config_dict.placeholder(int),        # None: the checkpoint's; set: must equal it
      max_position_embeddings=config_dict.placeholder(int),  # None: the checkpoint's; set: must equal it
  ))

  config.head = ml_collections.ConfigDict(dict(
      mode="finetune",               # "finetune" (all weights) or "features" (frozen encoder + mix)
      dropout=0.1,                   # dropout rate on the head's input
      pooling="pooler",              # finetune mode, sentence tasks: "pooler" ([CLS] through BERT's
                                     # pooler), "cls" (raw final [CLS]) or "mean" of final tokens
      feature_pooling="mean",        # features mode, sentence tasks: "mean" of tokens or "cls"
  ))

  config.optim = ml_collections.ConfigDict(dict(
      solver="gradient",             # "gradient" (Optax below) or "lbfgs" (features mode, full batch)
      name="adamw",                  # "adamw" or "lamb"
      peak_learning_rate=2e-5,       # the top of the schedule (the head's, with layer_decay < 1)
      schedule="triangular",         # "triangular", "slanted_triangular" or "constant"
      warmup_fraction=0.1,           # triangular: share of the steps spent warming up
      cut_fraction=0.1,              # slanted_triangular: share of the steps spent rising
      ratio=32.0,                    # slanted_triangular: peak / lowest rate
      layer_decay=1.0,               # layer-wise rate decay per layer downwards; 1 = off
      unfreeze_every_steps=0,        # gradual unfreezing: a layer more every N steps; 0 = off
      weight_decay=0.01,             # decoupled weight decay; never on biases or LayerNorm
      b1=0.9,                        # Adam/LAMB first-moment decay
      b2=0.999,                      # Adam/LAMB second-moment decay
      eps=1e-6,                      # Adam/LAMB epsilon
      max_grad_norm=1.0,             # 0 disables clipping
      lbfgs_steps=100,               # lbfgs: iterations over the full training set
      lbfgs_l2=1e-2,                 # lbfgs: L2 penalty on the head's kernel (mean loss + l2 |W|^2)
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=32,                 # global, over all hosts and devices
      num_epochs=3.0,                # passes over the training set (a fraction is allowed)
      eval_batch_size=64,            # examples per prediction batch (dev and test)
      eval_every_steps=0,            # 0 = at the end of every epoch
      log_every_steps=50,            # training loss to metrics.jsonl and TensorBoard every N steps
      max_train_examples=0,          # 0 = all; a positive number trains on the first N (quick runs)
      subsample_seed=-1,             # >= 0: max_train_examples draws N at random with this seed
                                     # (class-stratified, nested: smaller N are subsets of larger)
  ))

  config.ckpt = ml_collections.ConfigDict(dict(
      keep_best=True,                # keep the best evaluation's weights (by the task's main metric)
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),              # (data, fsdp, tensor); one entry may be -1 = the rest
  ))
  return config
