#!/usr/bin/env bash
# torchrun on 2 GPUs: training (DDP) and evaluation split over the GPUs, on a tiny model and synthetic data:
#   OUT=runs/gpu2 bash benchmarks/gpu_multi.sh
# Needs .bench/tiny (captune.tinymodel) and .bench/synth (captune data synthetic).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu2}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
torchrun --nproc-per-node 2 -m captune train --model .bench/tiny --data .bench/synth --out "$OUT/train" \
  --recipe tiny_cpu_lora --device cuda --dtype bf16 --max-steps 6 --save-every 3 --num-workers 2 --log-every 1 \
  2>&1 | grep -v "training:" | tail -15 | tee "$OUT/train.log"
cp "$OUT/train/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null
# no Java on the GPU machine: the captions are written, scoring is left for `captune score` (exit 2 expected)
torchrun --nproc-per-node 2 -m captune eval .bench/tiny --data .bench/synth --out "$OUT/eval" --device cuda \
  --batch-size 8 2>&1 | grep -v "captioning:" | tail -8 | tee "$OUT/eval.log"
wc -l "$OUT"/eval/captions*.jsonl | tee -a "$OUT/eval.log"
cp "$OUT/eval/results.json" "$OUT/eval_results.json" 2>/dev/null
