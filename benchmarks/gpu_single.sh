#!/usr/bin/env bash
# The single-GPU benchmarks and GPU tests, in one run on the device machine, from the repository root:
#   OUT=runs/gpu bash benchmarks/gpu_single.sh                 # the parts tests, eval, train (also: compile,
#                                                              # timeline, attention, agreement)
#   OUT=runs/gpu PARTS="tests eval" bash benchmarks/gpu_single.sh --batch-sizes 64,96   # options go to bench eval
# Needs .bench/tokenizer (InternLM2's tokenizer.model + tokenizer_config.json of an InternVL2 release).
set -uo pipefail
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } | tee "$OUT/gpu.txt"
for part in ${PARTS:-tests eval train}; do
  case $part in
    tests) python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log" ;;
    eval) python -m captune bench eval --tokenizer .bench/tokenizer --out "$OUT" --profile "$@" 2>&1 | grep -v Warning | tee "$OUT/bench_eval.log" ;;
    compile) python benchmarks/eval_compile.py --tokenizer .bench/tokenizer --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/eval_compile.log" ;;
    timeline) python benchmarks/eval_timeline.py --tokenizer .bench/tokenizer --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/eval_timeline.log" ;;
    attention) python benchmarks/attention_kernels.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/attention_kernels.log" ;;
    agreement) python benchmarks/agreement.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/agreement.log" ;;
    train) python -m captune bench train --tokenizer .bench/tokenizer --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench_train.log" ;;
  esac
done
