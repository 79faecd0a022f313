"""Cloud TPU VM launcher (`python -m tools.tpu`; usage in cli.py): create a TPU VM, install this
project on its workers, run, watch, stop, delete.

  defaults.py  the defaults TOML (--defaults, $BERT_TPU_DEFAULTS, ~/.config/bert-jax/tpu.toml)
  gcloud.py    running gcloud/gsutil: dry run, retries of unreachable workers, gcloud argv, polling
  remote.py    the shell text run on the workers: install, start a run, tail, status, stop
  commands.py  the subcommands (create, setup, run, exec, logs, status, stop, delete)
  cli.py       flags -> subcommands; __main__.py runs it
"""

from __future__ import annotations


class LauncherError(Exception):
  """A failure the user can act on; `cli.main` prints it and exits with status 1."""
