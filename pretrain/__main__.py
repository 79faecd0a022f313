"""python -m pretrain --config=configs/pretrain.py:base --workdir=DIR [--config.group.key=value ...]

A run restarted with the same workdir resumes from its latest checkpoint; a finished one says so.
Several processes (multi-host): see pretrain/cli.py. A mistake prints one `error: ...` line
(exit status 2); --verbose adds its traceback.
"""

from pretrain import console

if __name__ == "__main__":
  console.default_jax_platforms()        # before JAX is imported: no TPU probing without a TPU
  from pretrain import cli  # pylint: disable=g-import-not-at-top
  from pretrain import summary  # pylint: disable=g-import-not-at-top
  cli.run_main(summary.run, "configs/pretrain.py:base", "data.max_predictions_per_seq")
