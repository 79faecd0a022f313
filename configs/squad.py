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
      train_file="",                 # the official train-v1.1.json / train-v2.0.json (source=json)
      dev_file="",                   # the official dev-v1.1.json / dev-v2.0.json (source=json)
      tfds_data_dir="",              # TFDS data_dir (source=tfds); "" = TFDS's default
      version_2=version == "v2.0",   # questions may have no answer (SQuAD v2.0)
      max_seq_length=384,            # tokens per window (question + context)
      doc_stride=128,                # tokens between the starts of a context's windows
      max_query_length=64,           # longer questions are cut to this many tokens
      n_best_size=20,                # start and end candidates kept per window when decoding
      max_answer_length=30,          # longest answer predicted, in tokens
  ))
  config.optim.peak_learning_rate = 3e-5
  config.train.num_epochs = 2.0
  config.train.eval_batch_size = 64
  return config
