"""python -m pretrain --config=configs/pretrain.py:base --workdir=DIR [--config.group.key=value ...]

A run restarted with the same workdir resumes from its latest checkpoint. Several processes
(multi-host): see pretrain/cli.py.
"""

from pretrain import cli
from pretrain import train

if __name__ == "__main__":
  cli.run_main(train.run, "configs/pretrain.py:base")
