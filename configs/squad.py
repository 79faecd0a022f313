"""SQuAD fine-tuning: `--config=configs/squad.py:v1.1` or `:v2.0`.

    python -m finetune --config=configs/squad.py:v1.1 --workdir=out/squad \
        --config.init_checkpoint=PRETRAINING_WORKDIR \
        --config.data.train_file=train-v1.1.json --config.data.dev_file=dev-v1.1.json

Defaults follow google-research/bert's run_squad.py: max_seq_length 384, doc_stride 128,
max_query_length 64, n_best_size 20, max_answer_length 30, batch 32, 2 epochs at a peak rate of 3e-5.
For v2.0 the null-answer threshold is chosen on the dev set and reported in results.json.
"""

import ml_collections

from configs.finetune import base_config

VERSIONS = ("v1.1", "v2.0")


def get_config(version: str = "v1.1"):
  if version not in VERSIONS:
    raise ValueError(f"unknown SQuAD version {version!r}; choose one of {VERSIONS}")
  config = base_config(f"squad_{version}")
  config.data = ml_collections.ConfigDict(dict(
      source="json",                 # "json" (official files) or "tfds" (squad/v1.1, squad/v2.0)
      train_file="",
      dev_file="",
      tfds_data_dir="",
      version_2=version == "v2.0",
      max_seq_length=384,
      doc_stride=128,
      max_query_length=64,
      n_best_size=20,
      max_answer_length=30,
  ))
  config.optim.peak_learning_rate = 3e-5
  config.train.num_epochs = 2.0
  config.train.eval_batch_size = 64
  return config
