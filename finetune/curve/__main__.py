r"""python -m finetune.curve --config=configs/glue.py:sst2 --config.data.dir=DATA --workdir=OUT \
    --checkpoint=PRETRAINING_WORKDIR --sizes=100,300,1000,3000,all --seeds=3 \
    --arms=pretrained,scratch,features --extra=minilm=CONVERTED_WORKDIR \
    --arm_override=minilm:head.pooling=mean [--min_steps=N] [--workers=N] [--noplot]

Learning curves: fine-tunes every arm (a way to start: the pretrained checkpoint, the same model
from scratch, a head on frozen features, more checkpoints with --extra) on growing labelled subsets
of the task (--sizes, required), --seeds seeds each, evaluates each cell once on the whole dev set,
and writes OUT/results.jsonl, OUT/table.md and OUT/curve.png. A rerun skips the finished cells.
See docs/finetuning.md and finetune/curve/__init__.py. A mistake prints one `error: ...` line (exit
status 2); --verbose adds its traceback.
"""

from absl import flags

from pretrain import console
from pretrain.console import UserError

SIZES = flags.DEFINE_list("sizes", None, "Training-set sizes (examples; questions for SQuAD), "
                          "e.g. 100,300,1000,3000,all.")
SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per size and arm: config.seed, config.seed + 1...")
ARMS = flags.DEFINE_list("arms", ["pretrained", "scratch"], "Arms: pretrained, scratch, features "
                         "and names given by --extra (which are added anyway).")
CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Pretraining (or converted) workdir of the "
                                 "pretrained, scratch and features arms; default: "
                                 "--config.init_checkpoint.")
EXTRA = flags.DEFINE_multi_string("extra", [], "NAME=WORKDIR: one more arm, fine-tuning that "
                                  "checkpoint (repeat the flag for several).")
ARM_OVERRIDE = flags.DEFINE_multi_string("arm_override", [], "ARM:KEY=VALUE: a config override "
                                         "for one arm only, e.g. minilm:head.pooling=mean.")
MIN_STEPS = flags.DEFINE_integer("min_steps", 0, "Train every cell for at least this many steps "
                                 "(more epochs for the small sizes); 0 = train.num_epochs as is.")
WORKERS = flags.DEFINE_integer("workers", 1, "Cells run at once, each in its own process "
                               "(several share a GPU; with several GPUs, one GPU each).")
PLOT = flags.DEFINE_bool("plot", True, "Write WORKDIR/curve.png (needs matplotlib).")
# --sizes is required, but checked in _run: --help_config lists the config keys without it.


def _run(config, workdir):
  from finetune.curve import runner  # pylint: disable=g-import-not-at-top
  if SIZES.value is None:
    raise UserError("--sizes is required, e.g. --sizes=100,300,1000,all")
  spec = runner.CurveSpec(sizes=SIZES.value, seeds=SEEDS.value, arms=ARMS.value,
                          checkpoint=CHECKPOINT.value, extras=EXTRA.value,
                          overrides=ARM_OVERRIDE.value, min_steps=MIN_STEPS.value,
                          workers=WORKERS.value, plot=PLOT.value)
  return runner.run(config, workdir, spec)


if __name__ == "__main__":
  console.default_jax_platforms()        # before JAX is imported: no TPU probing without a TPU
  from pretrain import cli  # pylint: disable=g-import-not-at-top
  cli.run_main(_run, "configs/glue.py:sst2", "head.pooling")
