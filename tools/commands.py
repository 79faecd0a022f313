"""The installed commands whose `python -m` form is more than a call of `main()` (setup.py's
console_scripts): `bert-pretrain`, `bert-finetune`, `bert-benchmark`, `bert-fit` (the ahead-of-time
TPU fit check) and `bert-convergence`.

Each runs its module's `__main__` exactly as `python -m MODULE` does (runpy), so the command and the
module cannot differ: absl's `app.run` takes the --help text from the `__main__` module's docstring,
and those modules set JAX_PLATFORMS before JAX is imported. `bert-data`, `bert-convert` and `bert-tpu`
point straight at their `main()`, which is all their `python -m` form runs.
"""

import runpy


def _run_as_main(module: str):
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def pretrain():
  _run_as_main("pretrain")


def finetune():
  _run_as_main("finetune")


def benchmark():
  _run_as_main("tools.benchmark")


def fit():
  _run_as_main("tools.aot_compile")


def convergence():
  _run_as_main("tools.convergence")
