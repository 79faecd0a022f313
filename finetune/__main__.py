"""python -m finetune --config=configs/glue.py:sst2 --workdir=DIR --config.init_checkpoint=PRETRAIN_DIR

Fine-tunes (or, with --config.head.mode=features, trains a head on frozen features) for
`--config.seeds` seeds and writes DIR/results.json; see configs/glue.py and configs/squad.py.
Several processes: the same flags as `python -m pretrain` (--coordinator_address, --num_processes,
--process_id; detected on Cloud TPU pods and under SLURM).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from finetune import train
from pretrain import distributed
from pretrain.logs import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/glue.py:sst2.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, metrics and predictions.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for runs of several processes.")
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
