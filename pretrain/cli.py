"""The command line shared by `python -m pretrain` and `python -m finetune`.

--config (a config file and variant, every field overridable as --config.group.field=value, an
unknown key an error naming the closest keys), --workdir, --help_config (every key of the config with
its value and description, then exit), --verbose (the traceback of an error), and
the multi-process flags: on Cloud TPU pods and in SLURM job steps nothing extra is needed; elsewhere
give every process --coordinator_address=HOST:PORT (process 0's) and --num_processes=N, and each
its own --process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

A mistake in the flags, the config or the inputs ends the command with one `error: ...` line and
exit status 2 (pretrain/console.py decides what counts as one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import difflib
import importlib.util
import os
import re
import sys
import traceback
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from pretrain import config_docs
from pretrain import console

# Config keys that were renamed: a user of the old name gets the new one.
RENAMED_KEYS = {"optim.learning_rate": "optim.peak_learning_rate"}


# --------------------------------------------------------------------------------------------------
# Config keys


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Every leaf key of `config`, dotted: model.hidden_size, train.num_train_steps, ..."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flat_keys(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def _closest(word: str, candidates: Sequence[str], cutoff: float) -> list[str]:
  """The candidates most like `word` (within 0.05 of the best ratio, at least `cutoff`)."""
  scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates),
                  reverse=True)
  if not scored or scored[0][0] < cutoff:
    return []
  return [c for ratio, c in scored[:3] if ratio >= scored[0][0] - 0.05]


def unknown_key_message(key: str, keys: Sequence[str], config_file: str = "") -> str:
  """The one line for an unknown `--config.KEY` override: its new name, or the closest keys."""
  if key in RENAMED_KEYS and RENAMED_KEYS[key] in keys:
    return f"{key} was renamed {RENAMED_KEYS[key]}"
  group, _, leaf = key.rpartition(".")
  by_leaf: dict[str, list[str]] = {}
  for k in keys:
    by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
  siblings = [k for k in keys if k.rpartition(".")[0] == group]
  close = (by_leaf.get(leaf)                                             # in another group
           or [f"{group}.{c}" if group else c
               for c in _closest(leaf, [k.rpartition(".")[2] for k in siblings], 0.6)]
           or [k for c in _closest(leaf, list(by_leaf), 0.8) for k in by_leaf[c]])
  if close:
    return f"unknown config key {key}; did you mean {' or '.join(close[:3])}?"
  groups = sorted({k.rpartition(".")[0] for k in keys if "." in k})
  if group and group not in groups:
    near = _closest(group, groups, 0.6)
    hint = f"did you mean {' or '.join(near)}?" if near else f"the groups are {', '.join(groups)}"
    return f"unknown config key {key}: there is no group {group}; {hint}"
  names = sorted(k.rpartition(".")[2] for k in siblings) + ([f"{g}.*" for g in groups]
                                                            if not group else [])
  where = f" (see {config_file})" if config_file else ""
  return f"unknown config key {key}; {group or 'the top level'} has {', '.join(names)}{where}"


def _config_argument(argv: Sequence[str]) -> str | None:
  """The value of --config in `argv` (`--config=X` or `--config X`)."""
  found = None                             # the last one counts, as for absl
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      found = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(argv):
      found = argv[i + 1]
  return found


def _overridden_keys(argv: Sequence[str]) -> list[str]:
  keys = []
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if match:
      keys.append(match.group(1))
  return keys


def _load_config(config_arg: str) -> Any:
  """What --config=FILE[:VARIANT] names: FILE's get_config(VARIANT)."""
  path, *variant = config_arg.split(":", 1)
  spec = importlib.util.spec_from_file_location("_config_for_keys", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*variant)


def config_file_error(config_arg: str | None, error: BaseException) -> str:
  """The message for a --config whose file is missing or failed to load."""
  if not config_arg:
    return "--config is required, e.g. --config=configs/pretrain.py:base"
  path = config_arg.split(":", 1)[0]
  if not os.path.isfile(path):
    return (f"--config={config_arg}: no file {path} (give a config file and its variant, e.g. "
            "configs/pretrain.py:base, configs/glue.py:sst2)")
  last = str(error).strip().splitlines()[-1].strip()
  return f"--config={config_arg}: {last}"


def config_parse_error(argv: Sequence[str], error: BaseException) -> str:
  """The message for an exception raised while --config and its overrides were parsed."""
  config_arg = _config_argument(argv)
  if isinstance(error, (AttributeError, KeyError)) and config_arg:   # an unknown --config.x key
    try:
      config = _load_config(config_arg)
      keys = list(flat_keys(config))
    except Exception:  # pylint: disable=broad-except
      keys = []
    for key in _overridden_keys(argv):
      if keys and key not in keys:
        return unknown_key_message(key, keys, config_arg.split(":", 1)[0])
    return f"a --config.* override: {error}"
  if isinstance(error, OSError):              # the config file is missing or did not load
    return config_file_error(config_arg, error)
  return str(error)


# --------------------------------------------------------------------------------------------------
# The command


def _wants_help(argv: Sequence[str]) -> bool:
  flag_args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(arg in console.HELP_ARGS for arg in flag_args)


def _help_text() -> str:
  """--help: the command's usage (its `__main__` docstring) and this module's flags. absl's own
  --help shows only flags defined in `__main__`, none of these, and exits with status 1."""
  usage = (sys.modules["__main__"].__doc__ or "").strip()
  sections = [usage, flags.FLAGS.main_module_help().strip(),   # the command's own (finetune.curve)
              flags.FLAGS.module_help(__name__).strip()]
  return ("\n\n".join(filter(None, sections)) + "\n\n"
          "--config.GROUP.KEY=VALUE sets one key of the config; --help_config lists them all.\n"
          "--helpfull shows every flag, absl's included.")


def _print_to_pipe(text: str):
  """Prints `text`, quietly when the reader stops early (`| head`, quitting `less`)."""
  try:
    print(text, flush=True)
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no error at exit either


def _exit_with_error(message: str):
  """Ends the command with the one line of a user's mistake."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(console.EXIT_USER_ERROR)


def absolute(path: str) -> str:
  """A local path made absolute (~ expanded); a URL (gs://...) and "" (none given) as they are."""
  return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))


def run_main(run: Callable[[ml_collections.ConfigDict, str], Any], config_example: str,
             kind_key: str):
  """Parses the flags and calls `run(config, workdir)` after starting jax.distributed if needed.
  `kind_key`, a key only this command's configs have, tells another command's config apart."""
  config = config_flags.DEFINE_config_file(
      "config", None, f"Config file and variant, e.g. {config_example}.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
  coordinator = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, for runs of several processes; not "
      "needed on Cloud TPU pods or under SLURM, where it is detected.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Number of processes of the run.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's id, in [0, num_processes).")
  verbose = flags.DEFINE_bool("verbose", False, "On an error, show its traceback too.")
  help_config = flags.DEFINE_bool(
      "help_config", False, "List every key of --config with its value (after the --config.* "
      "overrides) and description, then exit.")
  flags.mark_flags_as_required(["config"])

  def parse(argv: list[str]) -> list[str]:
    if _wants_help(argv):
      _print_to_pipe(_help_text())
      sys.exit(0)
    try:
      rest = flags.FLAGS(argv)
      value = config.value
      if not isinstance(value, ml_collections.ConfigDict):
        value.lock()                          # an _ErrorConfig: raises the loading error
    except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
      if console.wants_verbose(argv):
        traceback.print_exc()
      message = (console.error_line(e).removeprefix("error: ") if isinstance(e, flags.Error)
                 else " ".join(config_parse_error(argv, e).split()))
      if message == "--config is required":
        message += f", e.g. --config={config_example}"
      _exit_with_error(message)
    if len(rest) > 1:
      _exit_with_error(f"unexpected arguments {rest[1:]} (flags are --name=value)")
    if kind_key not in flat_keys(config.value):
      _exit_with_error(f"--config={_config_argument(argv)} is a config of another command (it has "
                       f"no {kind_key}); this one takes e.g. --config={config_example}")
    if help_config.value:
      _print_to_pipe(config_docs.listing(config.value, _config_argument(argv)))
      sys.exit(0)
    if workdir.value is None:                 # required unless --help_config
      _exit_with_error("--workdir is required")
    return rest

  def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    from pretrain import distributed  # pylint: disable=g-import-not-at-top
    from pretrain.logs import quiet_library_logs  # pylint: disable=g-import-not-at-top
    quiet_library_logs()
    console.route_logs_above_progress_bars()

    def body():
      distributed.initialize(coordinator.value, num_processes.value, process_id.value)
      return run(config.value, absolute(workdir.value)) and None

    return console.run_command(body, verbose.value)

  app.run(main, flags_parser=parse)
