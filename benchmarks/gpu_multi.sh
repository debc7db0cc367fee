#!/usr/bin/env bash
# torchrun on 2 GPUs: training (DDP) and evaluation split over the GPUs, on a tiny model and synthetic data:
#   OUT=runs/gpu2 bash benchmarks/gpu_multi.sh
# Needs .bench/tiny (captune.demo.tinymodel) and .bench/synth (captune data synthetic).
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu2}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
torchrun --nproc-per-node 2 -m captune train --model .bench/tiny --data .bench/synth --out "$OUT/train" \
  --recipe tiny_cpu_lora --device cuda --dtype bf16 --max-steps 6 --save-every 3 --num-workers 2 --log-every 1 \
  2>&1 | grep -v "training:" | tail -15 | tee "$OUT/train.log"
cp "$OUT/train/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null
# FSDP2 over NCCL against one GPU, in float32 so that the two must agree to rounding
FSDP_ARGS="--model .bench/tiny --data .bench/synth --recipe tiny_cpu_lora --device cuda --dtype fp32 --max-steps 6
  --save-every 3 --lora-dropout 0 --log-every 1 --global-batch-size 16 --per-device-batch-size 4"
torchrun --nproc-per-node 2 -m captune train $FSDP_ARGS --out "$OUT/fsdp" --fsdp 2>&1 | grep -v "training:" \
  | tail -6 | tee "$OUT/fsdp.log"
CUDA_VISIBLE_DEVICES=0 python -m captune train $FSDP_ARGS --out "$OUT/one" 2>&1 | grep -v "training:" | tail -3
python - "$OUT" <<'PY' | tee -a "$OUT/fsdp.log"
import json, sys
rows = lambda p: [json.loads(l) for l in open(p) if l.strip()]
for a, b in zip(rows(f"{sys.argv[1]}/fsdp/log.jsonl"), rows(f"{sys.argv[1]}/one/log.jsonl")):
    print(f"step {a['step']}: loss fsdp2 {a['loss']:.7f} one GPU {b['loss']:.7f}  grad norm {a['grad_norm']:.6f} {b['grad_norm']:.6f}")
PY
# no Java on the GPU machine: the captions are written, scoring is left for `captune score` (exit 2 expected)
torchrun --nproc-per-node 2 -m captune eval .bench/tiny --data .bench/synth --out "$OUT/eval" --device cuda \
  --batch-size 8 2>&1 | grep -v "captioning:" | tail -8 | tee "$OUT/eval.log"
wc -l "$OUT"/eval/captions*.jsonl | tee -a "$OUT/eval.log"
cp "$OUT/eval/results.json" "$OUT/eval_results.json" 2>/dev/null
