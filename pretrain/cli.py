"""The command line shared by `python -m pretrain` and `python -m finetune`.

--config (a config file and variant, every field overridable as --config.group.field=value, an
unknown key an error), --workdir, and the multi-process flags: on Cloud TPU pods and in SLURM job
steps nothing extra is needed; elsewhere give every process --coordinator_address=HOST:PORT
(process 0's) and --num_processes=N, and each its own --process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from pretrain import distributed
from pretrain.logs import quiet_library_logs


def run_main(run: Callable[[ml_collections.ConfigDict, str], Any], config_example: str):
  """Parses the flags and calls `run(config, workdir)` after starting jax.distributed if needed."""
  config = config_flags.DEFINE_config_file(
      "config", None, f"Config file and variant, e.g. {config_example}.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for runs of several processes; not "
      "needed on Cloud TPU pods or under SLURM, where it is detected.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's id, in [0, num_processes).")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    run(config.value, workdir.value)

  app.run(main)
