r"""Time to accuracy: the project and transformers' BertForPreTraining, trained side by side.

  python -m tools.convergence --config=configs/pretrain.py:small --config.data.path=DATA \
      --config.model.vocab_size=30522 --config.train.num_train_steps=10000 \
      --config.optim.warmup_steps=1000 --max_seconds=240 --eval_every=250 \
      [--systems=reference,ours] [--name=fast] [--seed=0] [--target_mlm_accuracy=0.3 \
      --stop_at_target] [--workdir=workdir/convergence]

Both sides run on the same device, one after the other, each (by default) in a child process of
its own whose wall clock starts when it is launched (start-up and compilation included, as
MLPerf counts). They start from the same weights (the reference's seeded initialisation, saved
with `save_pretrained` to `--init_dir` and imported by the project with `hf_convert`), train on
the same batches of the project's loader in the same order, with the same recipe (AdamW with
BERT's decay mask, warmup + linear decay, global-norm clipping), and evaluate on the same
held-out batches. `WORKDIR/convergence.jsonl` gets one JSON line per training step, evaluation,
start and end of each side; `WORKDIR/convergence.png` plots held-out MLM accuracy against wall
seconds and steps. docs/convergence.md describes the records and the GPU experiments.

Modules: `cli` (flags, child processes), `weights` (the init folder and its checks), `loop` (the
loop both sides run, the JSON lines), `reference` (PyTorch), `ours` (the project's step),
`report` (time to target, the figure).
"""
