#!/usr/bin/env bash
# Does pretraining help? Pretrain a small BERT, then fine-tune it and the same architecture from
# random weights on three tasks with several seeds, and print the dev metrics side by side.
#
#   tools/finetune_quality.sh DATA_ROOT VOCAB_TXT OUT
#
# DATA_ROOT holds corpus/*.gz, glue_format/{polarity,uncertainty} and squad_format/quoref_*.json
# (the layout of ../shared/data); VOCAB_TXT is an uncased BERT WordPiece vocab.txt. Settings come
# from the environment: VARIANT (small), STEPS (pretraining steps, 4000), BATCH (256), SEEDS (3),
# LR (fine-tuning peak rate, 1e-4), and PRETRAIN_FLAGS / FINETUNE_FLAGS (extra --config.* flags).
set -euo pipefail
DATA=$1 VOCAB=$2 OUT=$3
VARIANT=${VARIANT:-small} STEPS=${STEPS:-4000} BATCH=${BATCH:-256} SEEDS=${SEEDS:-3} LR=${LR:-1e-4}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if [ ! -f "$OUT/data/manifest.json" ]; then
  $PY -m tools.data create --input="$DATA/corpus/*.gz" --tokenizer="$VOCAB" --lowercase \
      --output_dir="$OUT/data" --mode=dynamic --dupe_factor=1 --max_seq_length=128
fi
$PY -m pretrain --config=configs/pretrain.py:"$VARIANT" --workdir="$OUT/pretrain" \
    --config.data.path="$OUT/data" --config.model.vocab_size=30522 \
    --config.train.num_train_steps="$STEPS" --config.train.global_batch_size="$BATCH" \
    --config.optim.warmup_steps=$((STEPS / 10)) --config.train.log_every_steps=$((STEPS / 10)) \
    --config.train.eval_every_steps="$STEPS" --config.ckpt.save_interval_steps="$STEPS" \
    ${PRETRAIN_FLAGS:-}

finetune() {  # name config init extra-flags...
  local name=$1 config=$2 init=$3; shift 3
  local scratch=False; [ "$init" = scratch ] && scratch=True
  $PY -m finetune --config="$config" --workdir="$OUT/finetune/$init/$name" \
      --config.init_checkpoint="$OUT/pretrain" --config.from_scratch=$scratch \
      --config.seeds="$SEEDS" --config.optim.peak_learning_rate="$LR" "$@" ${FINETUNE_FLAGS:-}
}
for init in pretrained scratch; do
  finetune polarity configs/glue.py:sst2 $init --config.data.dir="$DATA/glue_format/polarity"
  finetune uncertainty configs/glue.py:cola $init --config.data.dir="$DATA/glue_format/uncertainty"
  finetune quoref configs/squad.py:v1.1 $init \
      --config.data.train_file="$DATA/squad_format/quoref_train.json" \
      --config.data.dev_file="$DATA/squad_format/quoref_dev.json"
done

$PY - "$OUT/finetune" <<'EOF'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print(f"{'task':12} {'metric':18} {'pretrained: median (min-max)':32} {'scratch: median (min-max)':32}")
for task in ("polarity", "uncertainty", "quoref"):
  rows = {}
  for init in ("pretrained", "scratch"):
    path = root / init / task / "results.json"
    if path.exists():
      results = json.loads(path.read_text())
      rows[init] = results["summary"][results["main_metric"]]
      metric = results["main_metric"]
  cells = [f"{r['median']:.4f} ({r['min']:.4f}-{r['max']:.4f})" if r else "-"
           for r in (rows.get("pretrained"), rows.get("scratch"))]
  print(f"{task:12} {metric:18} {cells[0]:32} {cells[1]:32}")
EOF
