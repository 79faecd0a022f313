"""Every mistake a user can make through the commands ends in one `error: ...` line on stderr and
exit status 2, without a traceback (`--verbose` shows it); a bug keeps its traceback. Also: the
closest config keys for an unknown one, the renamed learning-rate key, fine-tuning's input checks
before training, SQuAD JSON errors with file and position, log lines above the progress bar, and no
TPU probing on a machine without a TPU.

Each case is quick: the in-process ones fail before anything is compiled, and the few subprocesses
stop at flag parsing or at the first check of their inputs.
"""

import errno
import io
import json
import logging as std_logging
import os
import subprocess
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags
import pytest
import tqdm

from configs.glue import get_config as glue_config
from configs.squad import get_config as squad_config
from finetune import optim as ft_optim
from finetune import train as ft_train
from finetune.tasks import squad
from pretrain import cli
from pretrain import console
from pretrain import optim as pt_optim
from pretrain import speed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "pretrain.py")
GLUE = os.path.join(REPO, "configs", "glue.py")


def _command(*args, env=None, cwd=REPO):
  """Runs `python -m ...` with the test's environment (8 CPU devices, JAX_PLATFORMS=cpu)."""
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env or dict(os.environ),
                        capture_output=True, text=True, timeout=120)


def assert_one_error_line(result, *needles):
  """Exit status 2, no traceback, and the last line of stderr is the only `error:` line."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
  assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[-1], (needle, lines[-1])
  return lines[-1]


# --------------------------------------------------------------------------------------------------
# Which exceptions are the user's


class NonFiniteLoss(ValueError):
  """Stands for the run-state errors (non-finite loss, corrupt checkpoint, lock held)."""


def _raised(exc):
  try:
    raise exc
  except BaseException as e:  # pylint: disable=broad-except
    return e


def test_user_errors_are_one_line():
  assert console.error_line(_raised(ValueError("data.path is empty"))) == \
      "error: data.path is empty"
  assert console.error_line(_raised(console.UserError("line one\n  line two"))) == \
      "error: line one line two"
  assert console.error_line(_raised(NonFiniteLoss("loss is nan at step 7; kept checkpoint 5"))) \
      == "error: loss is nan at step 7; kept checkpoint 5"
  assert console.error_line(_raised(KeyError("no split 'eval'"))) == "error: no split 'eval'"
  assert console.error_line(_raised(FileNotFoundError(errno.ENOENT, "No such file or directory",
                                                      "x.tsv"))) == \
      "error: x.tsv: No such file or directory"
  assert console.error_line(_raised(OSError(errno.ENOSPC, "No space left on device", "/ckpt"))) \
      == "error: /ckpt: No space left on device"
  assert console.error_line(_raised(speed.SpeedPathError("needs a GPU"))) == "error: needs a GPU"


def test_bugs_keep_their_traceback():
  for exc in (TypeError("x"), AttributeError("x"), AssertionError("x"), RuntimeError("x"),
              IndexError("x"), OSError(errno.EIO, "Input/output error"), KeyError("input_ids")):
    assert console.error_line(_raised(exc)) is None, exc

  def bug():
    raise TypeError("a bug")

  with pytest.raises(TypeError, match="a bug"):
    console.run_command(bug, verbose=False)


def test_library_errors_point_at_verbose():
  try:
    json.loads("{")
  except ValueError as e:
    line = console.error_line(e)
  assert line.startswith("error: Expecting property name") and "--verbose" in line


def test_out_of_memory_gets_a_hint():
  class XlaRuntimeError(RuntimeError):
    pass

  line = console.error_line(_raised(XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory\nmore")))
  assert line.startswith("error: RESOURCE_EXHAUSTED: Out of memory (")
  assert "train.global_batch_size" in line


def test_run_command_prints_the_line_and_returns_2(capsys):
  def mistake():
    raise ValueError("train.global_batch_size=7 must divide by 8")

  assert console.run_command(mistake, verbose=False) == 2
  err = capsys.readouterr().err
  assert err == "error: train.global_batch_size=7 must divide by 8\n"
  assert console.run_command(mistake, verbose=True) == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback") and err.endswith("must divide by 8\n")


# --------------------------------------------------------------------------------------------------
# Config keys


def _parse_error(config_file, *overrides):
  argv = ["prog", f"--config={config_file}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  with pytest.raises((AttributeError, KeyError)) as info:
    flag_values(argv)
  return cli.config_parse_error(argv, info.value)


def test_unknown_key_names_the_closest():
  assert _parse_error(f"{PRETRAIN}:demo", "--config.train.num_train_step=3") == \
      "unknown config key train.num_train_step; did you mean train.num_train_steps?"
  assert _parse_error(f"{PRETRAIN}:demo", "--config.train.peak_learning_rate=1e-4") == \
      "unknown config key train.peak_learning_rate; did you mean optim.peak_learning_rate?"
  assert _parse_error(f"{PRETRAIN}:demo", "--config.modl.hidden_size=64") == \
      "unknown config key modl.hidden_size; did you mean model.hidden_size?"
  assert _parse_error(f"{PRETRAIN}:demo", "--config.modl.x=1") == \
      "unknown config key modl.x: there is no group modl; did you mean model?"
  assert _parse_error(f"{GLUE}:sst2", "--config.data.dri=x") == \
      "unknown config key data.dri; did you mean data.dir?"
  line = _parse_error(f"{PRETRAIN}:demo", "--config.optim.lr=1")
  assert line.startswith("unknown config key optim.lr; optim has b1, b2,")
  assert "peak_learning_rate" in line


def test_old_learning_rate_name_names_the_new_one():
  expected = "optim.learning_rate was renamed optim.peak_learning_rate"
  assert _parse_error(f"{GLUE}:sst2", "--config.optim.learning_rate=1e-4") == expected
  assert _parse_error(f"{PRETRAIN}:demo", "--config.optim.learning_rate=1e-4") == expected
  # A config built in Python with the old name is refused rather than silently ignored.
  optim = dict(glue_config("sst2").optim)
  optim["learning_rate"] = optim.pop("peak_learning_rate")
  with pytest.raises(ValueError, match=expected):
    ft_optim.make_schedule(optim, 10)
  with pytest.raises(ValueError, match=expected):
    pt_optim.learning_rate_schedule({"learning_rate": 1e-4}, 10)


def test_one_name_for_the_learning_rate():
  assert "peak_learning_rate" in glue_config("sst2").optim
  assert "peak_learning_rate" in squad_config("v1.1").optim
  assert "learning_rate" not in glue_config("sst2").optim


def test_pretrain_command_unknown_key():
  result = _command("pretrain", f"--config={PRETRAIN}:demo", "--workdir=unused",
                    "--config.train.num_train_step=3")
  assert_one_error_line(result)
  assert result.stderr == ("error: unknown config key train.num_train_step; did you mean "
                           "train.num_train_steps?\n")


def test_finetune_command_old_learning_rate_name():
  result = _command("finetune", f"--config={GLUE}:sst2", "--workdir=unused",
                    "--config.optim.learning_rate=1e-4")
  assert result.stderr == "error: optim.learning_rate was renamed optim.peak_learning_rate\n"
  assert result.returncode == 2


@pytest.mark.parametrize("args,needles", [
    (["--config=configs/nope.py:demo"], ["--config=configs/nope.py:demo: no file configs/nope.py"]),
    ([f"--config={PRETRAIN}:huge"], ["unknown pretrain config variant 'huge'", "demo"]),
    ([f"--config={PRETRAIN}:demo", "--config.train.global_batch_size=abc"],
     ["--config.train.global_batch_size=abc", "'abc'"]),
    ([f"--config={PRETRAIN}:demo", "stray"], ["unexpected arguments ['stray']"]),
], ids=["missing-config-file", "unknown-variant", "wrong-type", "stray-argument"])
def test_pretrain_command_flag_mistakes(args, needles, tmp_path):
  result = _command("pretrain", f"--workdir={tmp_path / 'run'}", *args)
  assert_one_error_line(result, *needles)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,config,example", [
    ("pretrain", f"{GLUE}:sst2", "configs/pretrain.py:base"),
    ("finetune", f"{PRETRAIN}:budget", "configs/glue.py:sst2"),
    ("finetune.curve", f"{PRETRAIN}:tiny", "configs/glue.py:sst2"),
])
def test_another_commands_config_is_named(command, config, example, tmp_path):
  """A fine-tuning config given to pretraining (or the other way round) would fail deep inside
  the run on a missing key; it is named at once."""
  args = ["--sizes=16"] if command == "finetune.curve" else []
  result = _command(command, f"--config={config}", f"--workdir={tmp_path / 'run'}", *args)
  assert_one_error_line(result, f"--config={config} is a config of another command",
                        f"this one takes e.g. --config={example}")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 0, "train.batch_size=0 must be at least 1"),
    ("train.eval_batch_size", -2, "train.eval_batch_size=-2 must be at least 1"),
    ("seeds", 0, "seeds=0 must be at least 1"),
    ("train.max_train_examples", -5, "train.max_train_examples=-5 must be 0 (all) or more"),
    ("optim.peak_learning_rate", -1.0, "optim.peak_learning_rate=-1.0 must be at least 0"),
    ("head.pooling", "avg", "head.pooling='avg'; choose one of 'pooler', 'cls', 'mean'"),
])
def test_finetune_settings_out_of_range(key, value, message):
  """Checked before any file is read: a batch of 0 would divide by zero, a negative number of
  examples silently drop the last ones, a negative rate climb the loss."""
  config = glue_config("sst2")
  group, _, leaf = key.rpartition(".")
  (config[group] if group else config)[leaf] = value
  with pytest.raises(ValueError) as error:
    ft_train.check_settings(config)
  assert str(error.value) == message


def test_pretrain_command_data_mistake_leaves_nothing(tmp_path):
  """A shard folder that does not exist, at `base` (whose step takes long to compile): one line,
  exit status 2, and no checkpoints folder. The data is checked before the train step starts
  compiling in the background (a compilation still running when the interpreter shut down once
  turned this line into an abort, exit status 134)."""
  result = _command("pretrain", f"--config={PRETRAIN}:base", f"--workdir={tmp_path / 'run'}",
                    f"--config.data.path={tmp_path / 'nowhere'}")
  assert_one_error_line(result, "nowhere/manifest.json not found", "python -m tools.data create")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_pretrain_command_mesh_mistake_and_verbose(tmp_path):
  """A mistake found inside the run (after JAX started): one line; --verbose adds the traceback.
  Without JAX_PLATFORMS on a machine with no TPU or GPU, libtpu says nothing either."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  args = ("pretrain", f"--config={PRETRAIN}:demo", f"--workdir={tmp_path / 'run'}",
          "--config.mesh.shape=(3,1,1)", "--config.data.source=synthetic")
  result = _command(*args, env=env)
  line = assert_one_error_line(result, "mesh.shape=(3, 1, 1) needs 3 devices but 8 are available")
  if not (console.has_tpu() or console.has_gpu()):
    assert result.stderr.strip() == line, result.stderr[-3000:]
  verbose = _command(*args, "--verbose", env=env)
  assert verbose.returncode == 2
  assert "Traceback (most recent call last)" in verbose.stderr
  assert verbose.stderr.strip().splitlines()[-1] == line


# --------------------------------------------------------------------------------------------------
# Fine-tuning's inputs


def _glue(tmp_path, **data):
  config = glue_config("sst2")
  config.init_checkpoint = str(tmp_path / "no_such_run")
  config.data.update(data)
  return config


def test_missing_dev_file_fails_before_training(tmp_path):
  folder = tmp_path / "SST-2"
  folder.mkdir()
  (folder / "train.tsv").write_text("sentence\tlabel\ngood\t1\n", encoding="utf-8")
  with pytest.raises(FileNotFoundError, match=r"split 'dev': none of .*SST-2/dev.tsv"):
    ft_train.run(_glue(tmp_path, dir=str(folder)), str(tmp_path / "ft"))
  with pytest.raises(FileNotFoundError, match=r"data.dir=.*nowhere: no such folder"):
    ft_train.run(_glue(tmp_path, dir=str(tmp_path / "nowhere")), str(tmp_path / "ft"))


def test_missing_squad_files_and_tokenizer_are_named_together(tmp_path):
  config = squad_config("v1.1")
  config.init_checkpoint = str(tmp_path / "no_such_run")
  config.tokenizer = str(tmp_path / "spm.model")
  (tmp_path / "train.json").write_text('{"data": []}', encoding="utf-8")
  config.data.update(train_file=str(tmp_path / "train.json"), dev_file=str(tmp_path / "dev.json"))
  with pytest.raises(FileNotFoundError) as info:
    ft_train.run(config, str(tmp_path / "ft"))
  message = str(info.value)
  assert "tokenizer=" in message and "spm.model: no such file" in message
  assert "data.dev_file=" in message and "dev.json: no such file" in message
  assert "train.json" not in message


def test_missing_init_checkpoint_is_named(tmp_path):
  folder = tmp_path / "SST-2"
  folder.mkdir()
  for name in ("train.tsv", "dev.tsv"):
    (folder / name).write_text("sentence\tlabel\ngood\t1\n", encoding="utf-8")
  with pytest.raises(FileNotFoundError, match=r"init_checkpoint=.*no_such_run.*config.json"):
    ft_train.run(_glue(tmp_path, dir=str(folder)), str(tmp_path / "ft"))


def test_squad_json_error_names_file_line_and_column(tmp_path):
  path = tmp_path / "train-v1.1.json"
  path.write_text('{"data": [\n  {"title": "x",\n   "paragraphs": [}\n]}', encoding="utf-8")
  with pytest.raises(ValueError, match=r"train-v1.1.json is not valid JSON: Expecting value at "
                                       r"line 3, column 19"):
    squad.read_squad_json(str(path))
  path.write_bytes(b'{"data": "\xff"}')
  with pytest.raises(ValueError, match=r"train-v1.1.json is not UTF-8 text"):
    squad.read_squad_json(str(path))


def test_finetune_command_missing_dev_file(tmp_path):
  folder = tmp_path / "SST-2"
  folder.mkdir()
  (folder / "train.tsv").write_text("sentence\tlabel\ngood\t1\n", encoding="utf-8")
  result = _command("finetune", f"--config={GLUE}:sst2", "--workdir=ft",
                    "--config.init_checkpoint=runs/x", "--config.data.dir=SST-2", cwd=tmp_path)
  assert_one_error_line(result, "GLUE sst2 split 'dev'", str(folder / "dev.tsv"))


# --------------------------------------------------------------------------------------------------
# The other commands


def test_data_benchmark_errors(tmp_path):
  result = _command("tools.bench.data", f"--shards={tmp_path / 'nowhere'}", "--storage")
  assert_one_error_line(result, "nowhere/manifest.json not found")
  result = _command("tools.bench.data", f"--shards={tmp_path / 'nowhere'}", "--storage",
                    "--read_block_records", "16", "0")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1].endswith(
      "error: --read_block_records 16 0: each must be at least 1")


def test_data_command_errors(tmp_path):
  result = _command("tools.data", "inspect", f"--data_dir={tmp_path / 'nowhere'}")
  assert_one_error_line(result, "nowhere/manifest.json not found", "python -m tools.data create")
  result = _command("tools.data", "create", f"--input={tmp_path / 'none.jsonl'}",
                    f"--tokenizer={tmp_path / 'spm.model'}", f"--output_dir={tmp_path / 'out'}")
  assert_one_error_line(result, "none.jsonl")
  verbose = _command("tools.data", "inspect", f"--data_dir={tmp_path / 'nowhere'}", "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_convert_checkpoint_command_error(tmp_path):
  result = _command("tools.convert_checkpoint", f"--hf_dir={tmp_path}",
                    f"--workdir={tmp_path / 'out'}")
  assert_one_error_line(result, "config.json not found", "--hf_dir must be a transformers BERT")


# --------------------------------------------------------------------------------------------------
# The terminal


def test_log_lines_go_above_the_progress_bar():
  out = io.StringIO()
  handler = logging.get_absl_handler().python_handler
  saved_stream, saved_filters = handler.stream, list(handler.filters)
  record = std_logging.LogRecord("absl", std_logging.INFO, __file__, 1, "saving checkpoint", (),
                                 None)
  try:
    handler.stream = out
    console.route_logs_above_progress_bars()
    console.route_logs_above_progress_bars()          # idempotent
    bar = tqdm.tqdm(total=10, file=out, mininterval=0, ncols=60)
    bar.update(3)
    handler.stream.write(handler.format(record) + "\n")
    bar.close()
  finally:
    handler.stream = saved_stream
    handler.filters[:] = saved_filters
  text = out.getvalue()
  before, _, after = text.partition("saving checkpoint")
  # The line was written where the bar was (cleared with \r), then the bar drawn again below it.
  line_start = max(before.rfind("\r"), before.rfind("\n"))
  assert "%|" not in before[line_start + 1:], repr(text)
  assert after.startswith("\n") and "30%" in after, repr(text)


def test_no_tpu_probing_without_an_accelerator(monkeypatch):
  monkeypatch.setattr(console, "has_tpu", lambda: False)
  monkeypatch.setattr(console, "has_gpu", lambda: False)
  env = {}
  assert console.default_jax_platforms(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
  env = {"JAX_PLATFORMS": ""}                        # the user's choice, even an empty one
  assert console.default_jax_platforms(env) is None and env == {"JAX_PLATFORMS": ""}
  monkeypatch.setattr(console, "has_tpu", lambda: True)
  env = {}
  assert console.default_jax_platforms(env) is None and env == {}
  monkeypatch.setattr(console, "has_tpu", lambda: False)
  monkeypatch.setattr(console, "has_gpu", lambda: True)
  assert console.default_jax_platforms(env) is None and env == {}
