"""Learning curves: how each way of starting fine-tuning scores as labelled examples grow.

    python -m finetune.curve --config=configs/glue.py:sst2 --config.data.dir=DATA \
        --workdir=out/curve --checkpoint=PRETRAINING_WORKDIR --sizes=100,300,1000,all --seeds=3 \
        --arms=pretrained,scratch,features --extra=minilm=CONVERTED_WORKDIR \
        --arm_override=minilm:head.pooling=mean

For one task config (every --config.* override applies to every arm), each cell (arm, size, seed)
fine-tunes with finetune/train.py on `size` training examples drawn by `seed` (class-stratified
for classification, plain random otherwise; the draws of one seed are nested: its 100 are among its
300) and is evaluated once, after its last step, on the whole dev set. WORKDIR gets results.jsonl
(a line per finished cell), table.md (median and min-max per arm and size of the task's main
metric), curve.png, and cells/ARM/nSIZE_seedSEED/ (each cell's fine-tuning workdir and log.txt).
Running the command again skips the finished cells. See docs/finetuning.md.
"""
