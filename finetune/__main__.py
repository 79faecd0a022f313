"""python -m finetune --config=configs/glue.py:sst2 --workdir=DIR --config.init_checkpoint=PRETRAIN_DIR

Fine-tunes (or, with --config.head.mode=features, trains a head on frozen features) for
`--config.seeds` seeds and writes DIR/results.json; see configs/glue.py and configs/squad.py.
Several processes: the same flags as `python -m pretrain` (pretrain/cli.py).
"""

from finetune import train
from pretrain import cli

if __name__ == "__main__":
  cli.run_main(train.run, "configs/glue.py:sst2")
