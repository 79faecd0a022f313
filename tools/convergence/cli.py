"""The command line of `python -m tools.convergence` (see the package docstring).

Flags are parsed into a fresh `FlagValues` on every call, so `main(argv)` can be called more than
once in a process (the tests do). Bad input ends in one `error: ...` line and exit code 2
(pretrain/console.py); --verbose adds the traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import flags
import ml_collections
from ml_collections import config_flags

from pretrain import cli as pretrain_cli
from pretrain import console
from pretrain import optim as optim_lib
from tools.convergence import loop
from tools.convergence import report
from tools.convergence import weights
from tools.convergence.weights import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEMS = ("reference", "ours")


@dataclasses.dataclass(frozen=True)
class Options:
  systems: list[str]
  name: str
  workdir: str
  init_dir: str
  schedule: loop.Schedule
  torch_compile: bool
  isolate: bool
  plot: bool
  save_weights: bool
  report_only: bool
  child: bool
  run_id: str
  start_time: float


def parse(argv: list[str]) -> tuple[Options, ml_collections.ConfigDict]:
  """(options, config) from `argv` (argv[0] is the program); flags.Error on a bad flag."""
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
      "config", "configs/pretrain.py:small", "Pretraining config and variant; override fields "
      "as --config.group.field=value.", flag_values=fv, lock_config=True, sys_argv=argv)
  d = dict(flag_values=fv)
  systems = flags.DEFINE_list("systems", "reference,ours", "Sides to run, in this order.", **d)
  name = flags.DEFINE_string("name", "run", "Label of the run in the JSONL (e.g. plain, fast).",
                             **d)
  seed = flags.DEFINE_integer("seed", None, "Sets config.seed: init, data order, dropout.", **d)
  workdir = flags.DEFINE_string("workdir", "workdir/convergence", "Output folder.", **d)
  init_dir = flags.DEFINE_string(
      "init_dir", "", "transformers BERT folder both sides start from; created (seeded) when it "
      "does not exist. Default: WORKDIR/init_VARIANT_seedSEED.", **d)
  max_seconds = flags.DEFINE_float("max_seconds", 0, "Stop a side after this many seconds of its "
                                   "wall clock (start-up included); 0 = no limit.", **d)
  log_every = flags.DEFINE_integer("log_every", 10, "Read training losses back every N steps.", **d)
  eval_every = flags.DEFINE_integer("eval_every", 200, "Evaluate every N steps (and at the end).",
                                    **d)
  target = flags.DEFINE_float("target_mlm_accuracy", 0, "Report when each side first reaches "
                              "this held-out MLM accuracy; 0 = none.", **d)
  stop = flags.DEFINE_bool("stop_at_target", False, "Stop a side once it reaches the target.", **d)
  compile_ = flags.DEFINE_bool("torch_compile", True, "torch.compile the reference model.", **d)
  isolate = flags.DEFINE_bool("isolate", True, "Run each side in its own child process (its own "
                              "GPU memory; its clock starts at the child's launch).", **d)
  plot = flags.DEFINE_bool("plot", True, "Write WORKDIR/convergence.png (needs matplotlib).", **d)
  save = flags.DEFINE_bool("save_weights", False, "Save each side's final weights (transformers "
                           "names) as WORKDIR/final/NAME-SYSTEM-seedSEED.safetensors.", **d)
  report_only = flags.DEFINE_bool("report_only", False, "Train nothing: report on (and plot) "
                                  "WORKDIR/convergence.jsonl as it is.", **d)
  flags.DEFINE_bool("verbose", False, "On an error, show its traceback too.", **d)
  child = flags.DEFINE_bool("child", False, "Internal: a side run by an isolated parent.", **d)
  run_id = flags.DEFINE_string("run_id", "", "Internal: the parent's run id.", **d)
  start = flags.DEFINE_float("start_time", 0, "Internal: when the parent launched this child.", **d)
  if any(arg in (*console.HELP_ARGS, "--helpfull") for arg in argv[1:]):
    import tools.convergence  # pylint: disable=g-import-not-at-top
    print(tools.convergence.__doc__, fv.get_help(), sep="\n")
    raise SystemExit(0)
  try:
    fv(argv)
  except (AttributeError, KeyError) as e:     # ml_collections' word for an unknown --config.x key
    raise InputError(pretrain_cli.config_parse_error(argv, e)) from None
  cfg = config.value
  if seed.value is not None:
    cfg.seed = seed.value
  unknown = sorted(set(systems.value) - set(SYSTEMS))
  if unknown or not systems.value:
    raise InputError(f"--systems={','.join(systems.value)}: choose from {','.join(SYSTEMS)}")
  if len(set(systems.value)) < len(systems.value):
    raise InputError(f"--systems={','.join(systems.value)}: name each side once, e.g. "
                     f"--systems={','.join(SYSTEMS)}")
  for flag, value in (("log_every", log_every.value), ("eval_every", eval_every.value)):
    if value < 1:
      raise InputError(f"--{flag}={value} must be at least 1")
  if not max_seconds.value >= 0:
    raise InputError(f"--max_seconds={max_seconds.value:g} must be at least 0 (0 = no limit)")
  if not 0 <= target.value <= 1:
    raise InputError(f"--target_mlm_accuracy={target.value:g} must be in (0, 1], a held-out MLM "
                     "accuracy (0 = no target)")
  try:                          # the recipe's own errors, before either side trains for minutes
    optim_lib.learning_rate_schedule(cfg.optim, cfg.train.num_train_steps)
  except ValueError as e:
    raise InputError(str(e)) from None
  schedule = loop.Schedule(cfg.train.num_train_steps, log_every.value, eval_every.value,
                           max_seconds.value, target.value, stop.value)
  default_init = os.path.join(workdir.value, f"init_{cfg.variant}_seed{cfg.seed}")
  options = Options(systems.value, name.value, workdir.value, init_dir.value or default_init,
                    schedule, compile_.value, isolate.value, plot.value, save.value,
                    report_only.value, child.value,
                    run_id.value or time.strftime("%Y%m%d-%H%M%S"), start.value)
  return options, cfg


def run_side(system: str, config: ml_collections.ConfigDict, options: Options
             ) -> tuple[list[dict[str, Any]], loop.Side]:
  """Builds one side in this process and trains it; returns its records and the trained side."""
  recorder = loop.Recorder(os.path.join(options.workdir, "convergence.jsonl"), system,
                           options.name, config.seed, options.run_id,
                           options.start_time or time.time())
  if system == "reference":
    from tools.convergence.reference import Reference  # pylint: disable=g-import-not-at-top
    side = Reference(config, options.init_dir, compile_model=options.torch_compile)
  else:
    from tools.convergence.ours import Ours  # pylint: disable=g-import-not-at-top
    side = Ours(config, options.init_dir)
  recorder.write("start", 0, **side.info, config=json.loads(config.to_json_best_effort()))
  records = loop.train(side, recorder, options.schedule)
  if options.save_weights:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    path = os.path.join(options.workdir, "final",
                        f"{options.name}-{system}-seed{config.seed}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.copy() for k, v in side.hf_state_dict().items()}, path)
  return records, side


def run_child(system: str, argv: list[str], options: Options) -> None:
  """Runs one side as `python -m tools.convergence ... --systems=SYSTEM --child`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  if system == "reference":
    env["JAX_PLATFORMS"] = "cpu"      # jax only feeds the loader there: keep it off the GPU
  command = [sys.executable, "-m", "tools.convergence", *argv[1:], f"--systems={system}",
             "--noisolate", "--child", f"--init_dir={options.init_dir}",
             f"--run_id={options.run_id}", f"--start_time={time.time()!r}"]
  code = subprocess.call(command, env=env)
  if code == 2:
    raise SystemExit(2)               # the child printed its `error:` line
  if code:
    raise InputError(f"the {system} side exited with code {code} (its output is above)")


def run(options: Options, config: ml_collections.ConfigDict, argv: list[str]) -> None:
  os.makedirs(options.workdir, exist_ok=True)
  if options.plot and not options.child and importlib.util.find_spec("matplotlib") is None:
    raise InputError("the figure needs matplotlib: pip install -e '.[plot]', or pass --noplot")
  jsonl = os.path.join(options.workdir, "convergence.jsonl")
  if not options.report_only:
    if os.path.exists(jsonl) and not options.child:   # a bad line is named now, not after training
      report.read_records(jsonl, cut_partial=True)
    weights.prepare(config, options.init_dir, config.seed)
    for system in options.systems:
      if options.isolate:
        run_child(system, argv, options)
      else:
        run_side(system, config, options)
  if options.child:
    return
  if not os.path.exists(jsonl):
    raise InputError(f"{jsonl} does not exist: nothing to report on")
  records = report.read_records(jsonl)
  if not records:
    raise InputError(f"{jsonl} has no records")
  if options.schedule.target:
    print("\n".join(report.target_lines(records, options.schedule.target)), flush=True)
  if any(len(seeds) > 1 for seeds in report.eval_curves(records).values()):
    print("\n".join(report.parity_lines(records)), flush=True)
  if options.plot:
    png = os.path.join(options.workdir, "convergence.png")
    report.plot(records, png, options.schedule.target)
    print(f"wrote {png}", flush=True)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)

  def body():
    options, config = parse(argv)
    run(options, config, argv)

  try:
    return console.run_command(body, console.wants_verbose(argv))
  except SystemExit as e:
    return int(e.code or 0)
