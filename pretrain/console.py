"""What a user sees on the terminal, shared by every command (`python -m pretrain`, `finetune`,
`tools.data`, `tools.convert_checkpoint`, `tools.convergence`).

- A mistake the user can fix ends the command with one line, `error: ...`, on stderr and exit status
  2; `--verbose` adds the traceback. A bug keeps its traceback (exit status 1).
- Log lines are written above a live tqdm progress bar instead of through it.
- On a machine without a TPU or GPU, JAX is kept from probing the TPU library (libtpu prints a few
  error lines at start-up when it is installed but finds no TPU).

Nothing here imports JAX: `default_jax_platforms` must run before JAX is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import errno
import glob
import os
import re
import sys
import traceback
from typing import Any

EXIT_USER_ERROR = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROJECT_DIRS = tuple(os.path.join(ROOT, d) + os.sep
                      for d in ("pretrain", "finetune", "tools", "configs", "tests"))


class UserError(ValueError):
  """A mistake the user can fix (a path, a value, a file's content); printed as one line."""


# --------------------------------------------------------------------------------------------------
# Which exceptions are the user's, and their one line


# OSErrors a user causes and can act on; any other OSError (a broken device, a bug) keeps its
# traceback.
_USER_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS,
                errno.EISDIR, errno.ENOTDIR, errno.EDQUOT, errno.ENAMETOOLONG}
_OOM_HINT = ("the step does not fit in device memory: lower the batch size (train.global_batch_size"
             " or train.batch_size), raise train.grad_accum_steps or set model.remat_policy")


def _raised_in_project(exc: BaseException) -> bool:
  """Whether the innermost frame of `exc`'s traceback is this project's code (not a library's)."""
  tb = exc.__traceback__
  if tb is None:
    return True
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return filename.startswith(_PROJECT_DIRS)


def _flags_error_message(message: str) -> str:
  """absl's `flag --name=value: why`, as `--name=value: why`; a config file's own exception (e.g.
  an unknown variant) arrives with its whole traceback, of which the last line is kept."""
  missing = re.search(r"Flag (--\w+) must have a value other than None", message)
  if missing:
    return f"{missing.group(1)} is required"
  match = re.match(r"^flag (--\S+): ", message)
  head, message = (match.group(1), message[match.end():]) if match else ("", message)
  if "Traceback (most recent call last)" in message:
    last = message.strip().splitlines()[-1].strip()
    name, _, rest = last.partition(": ")
    message = rest if rest and name.replace(".", "").isidentifier() else last
  return f"{head}: {message}" if head else message


def error_line(exc: BaseException) -> str | None:
  """`error: ...` for a mistake the user can fix; None for a bug (which keeps its traceback)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  hint = ""
  if isinstance(exc, flags.Error):
    message = _flags_error_message(str(exc))
  elif isinstance(exc, KeyError):
    # The project's KeyErrors carry a sentence ("... has no split 'eval'; it has ..."); a bare key
    # (KeyError: 'input_ids') is a lookup that went wrong: a bug.
    if not (exc.args and isinstance(exc.args[0], str) and " " in exc.args[0].strip()):
      return None
    message = exc.args[0]
  elif isinstance(exc, ValueError):
    message = str(exc)
  elif isinstance(exc, OSError) and (exc.errno in _USER_ERRNOS or (
      exc.errno is None and type(exc) is not OSError)):
    if exc.filename is not None and exc.strerror:
      message = f"{exc.filename}: {exc.strerror}"
    else:
      message = str(exc)
  elif isinstance(exc, ImportError) and _raised_in_project(exc):
    message = str(exc)        # the project's own "this needs package X: pip install ..." messages
  elif (type(exc).__name__ in ("XlaRuntimeError", "JaxRuntimeError")
        and "RESOURCE_EXHAUSTED" in str(exc)):
    message, hint = str(exc).strip().splitlines()[0], _OOM_HINT
  else:
    return None
  if not _raised_in_project(exc) and not isinstance(exc, (UserError, flags.Error)):
    hint = hint or "--verbose shows where it was raised"
  message = " ".join(message.split()) or type(exc).__name__
  return f"error: {message}" + (f" ({hint})" if hint else "")


def report(exc: BaseException, verbose: bool) -> int | None:
  """Prints a user error's line (and, with `verbose`, its traceback before it) and returns the
  exit status 2; returns None for a bug, which the caller re-raises."""
  line = error_line(exc)
  if line is None:
    return None
  sys.stdout.flush()
  if verbose:
    traceback.print_exception(exc, file=sys.stderr)
  print(line, file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def run_command(fn: Callable[[], Any], verbose: bool) -> int:
  """Calls `fn` (a command's body, returning an exit status or None) and turns a user error into
  its one line and exit status 2. Ctrl-C ends with "interrupted" and status 130."""
  try:
    return int(fn() or 0)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr, flush=True)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    status = report(e, verbose)
    if status is None:
      raise
    return status


def wants_verbose(argv: Sequence[str]) -> bool:
  """--verbose on a command line that may not have been parsed (an error while parsing it)."""
  return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")


def exit_on_help(argv: Sequence[str], usage: str):
  """For an absl `app.run` command: --help prints `usage` and the flags `__main__` defines, and
  exits 0 (absl's own --help exits with status 1)."""
  if any(arg in HELP_ARGS for arg in argv[1:]):
    from absl import flags  # pylint: disable=g-import-not-at-top
    print(f"{usage.strip()}\n\n{flags.FLAGS.main_module_help().strip()}", flush=True)
    raise SystemExit(0)


# --------------------------------------------------------------------------------------------------
# Log lines and the progress bar


class _AboveProgressBars:
  """A stream for logging handlers: each write goes above the live tqdm bars (tqdm.write)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str):
    import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.tqdm.write(text, file=self._stream, end="")

  def flush(self):
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def route_logs_above_progress_bars():
  """Makes absl's log lines (INFO and up) print above tqdm bars rather than inside them."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  handler = logging.get_absl_handler().python_handler
  if not isinstance(handler.stream, _AboveProgressBars):
    handler.stream = _AboveProgressBars(handler.stream)


# --------------------------------------------------------------------------------------------------
# No TPU probing on a machine without a TPU

_GPU_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x), as jax's hardware_utils lists them.
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def _read(path: str) -> str:
  try:
    with open(path, encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return ""


def has_tpu() -> bool:
  """A TPU is attached: /dev/accel* (v2-v4), /dev/vfio/N (v5e and later) or a TPU PCI device."""
  if glob.glob("/dev/accel*"):
    return True
  if any(os.path.basename(p).isdigit() for p in glob.glob("/dev/vfio/*")):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    if _read(vendor) == _GOOGLE_PCI_VENDOR:
      if _read(os.path.join(os.path.dirname(vendor), "device")) in _TPU_PCI_DEVICES:
        return True
  return False


def has_gpu() -> bool:
  return any(os.path.exists(d) for d in _GPU_DEVICES)


def default_jax_platforms(environ: dict[str, str] | None = None) -> str | None:
  """Sets JAX_PLATFORMS=cpu when the user has not set it and the machine has neither a TPU nor a
  GPU, so JAX does not start libtpu (which then prints TPU_WORKER_HOSTNAMES errors). Call it before
  JAX is imported. Returns the value it set, or None where it left the choice to JAX."""
  environ = os.environ if environ is None else environ
  if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ or has_tpu() or has_gpu():
    return None
  environ["JAX_PLATFORMS"] = "cpu"
  return "cpu"
