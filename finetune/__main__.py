"""python -m finetune --config=configs/glue.py:sst2 --workdir=DIR --config.init_checkpoint=PRETRAIN_DIR

Fine-tunes (or, with --config.head.mode=features, trains a head on frozen features) for
`--config.seeds` seeds and writes DIR/results.json; see configs/glue.py and configs/squad.py.
Several processes: the same flags as `python -m pretrain` (pretrain/cli.py). A mistake prints one
`error: ...` line (exit status 2); --verbose adds its traceback.
"""

from pretrain import console

if __name__ == "__main__":
  console.default_jax_platforms()        # before JAX is imported: no TPU probing without a TPU
  from finetune import train  # pylint: disable=g-import-not-at-top
  from pretrain import cli  # pylint: disable=g-import-not-at-top
  cli.run_main(train.run, "configs/glue.py:sst2", "head.pooling")
