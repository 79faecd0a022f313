"""GLUE fine-tuning: `--config=configs/glue.py:TASK`, TASK one of cola, sst2, mrpc, stsb, qqp, mnli,
qnli, rte, wnli (mnli also predicts AX, the diagnostic set, when the GLUE folder has it).

    python -m finetune --config=configs/glue.py:sst2 --workdir=out/sst2 \
        --config.init_checkpoint=PRETRAINING_WORKDIR --config.data.dir=glue_data/SST-2

Defaults follow BERT's paper: batch 32, 3 epochs, optim.peak_learning_rate 2e-5 with 10% warmup,
max_seq_length 128. `data.dir` is the task's folder as the GLUE download script writes it (its TSV
layout is the task's own); `data.source=tfds` reads TFDS `glue/<task>` instead.
"""

import ml_collections

from configs.finetune import base_config

TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def get_config(task: str = "sst2"):
  if task not in TASKS:
    raise ValueError(f"unknown GLUE task {task!r}; choose one of {TASKS}")
  config = base_config(task)
  config.data = ml_collections.ConfigDict(dict(
      source="glue",                 # "glue" (official TSV folders) or "tfds"
      dir="",                        # the task's folder, e.g. glue_data/SST-2
      tfds_data_dir="",              # TFDS data_dir (source=tfds); "" = TFDS's default
      max_seq_length=128,            # tokens per example; longer pairs are truncated
  ))
  return config
