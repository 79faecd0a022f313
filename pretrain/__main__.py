"""python -m pretrain --config=configs/pretrain.py:base --workdir=DIR [--config.group.key=value ...]

A run restarted with the same workdir resumes from its latest checkpoint.

Several processes (multi-host): on Cloud TPU pods and in SLURM job steps nothing extra is needed;
elsewhere give every process --coordinator_address=HOST:PORT (process 0's) and --num_processes=N,
and each its own --process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pretrain import distributed
from pretrain import train
from pretrain.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/pretrain.py:base.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for runs of several processes; not "
    "needed on Cloud TPU pods or under SLURM, where it is detected.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
