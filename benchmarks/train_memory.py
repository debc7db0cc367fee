"""Memory of a real `captune train` through one whole epoch: the process tree sampled with the step it is at.

    python benchmarks/train_memory.py DATA --model MODEL [--num-workers 4] [--out runs/train_memory] [-- TRAIN OPTIONS]

Runs `python -m captune train --recipe internvl2_2b_coco_lora --compile off --log-every 1` on DATA (the tutorial-sized
synthetic set: python ../shared/scale/make_coco_scale.py /tmp/scale, then DATA=/tmp/scale/coco) and samples the PSS
of the trainer and its data-loader workers every 0.5 s (/proc, Linux) with the last step in the run's log.jsonl.
Prints the first sample after step 1, the median of every 100 steps, the peak and its step, the growth of the peak
over the first sample, the epoch's time; writes them with every step's loss and gradient norm to OUT/memory.json.
With the demo model (src/captune/demo/assets/demo_base) the model costs nothing and this is the data path's memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from data_memory import run_arguments, tree_memory


def last_step(log: Path) -> int:
    step = 0
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "train":
                step = record["step"]
    return step


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/train_memory")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, train_args = parser.parse_args(argv[:cut]), argv[cut + 1 :]  # after --: more options for captune train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    command = [sys.executable, "-m", "captune", "train", "--recipe", args.recipe, "--model", args.model, "--data", args.data,
               "--num-workers", str(args.num_workers), "--compile", "off", "--log-every", "1", "--out", str(run_dir),
               *train_args]
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # no compile workers in the tree
    print(" ".join(command), flush=True)
    start = time.time()
    with open(out / "train.err", "w") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    samples = []  # (seconds, step, pss_gb)
    while proc.poll() is None:
        memory = tree_memory(proc.pid)
        samples.append((time.time() - start, last_step(run_dir / "log.jsonl"), memory["pss_gb"]))
        time.sleep(0.5)
    if proc.returncode != 0:
        sys.exit(f"captune train failed ({proc.returncode}): see {out / 'train.err'}")

    trained = [(t, s, m) for t, s, m in samples if s >= 1]
    first = trained[0]
    by_hundred = {}
    for _, step, pss in trained:
        by_hundred.setdefault((step - 1) // 100, []).append(pss)
    medians = [round(statistics.median(v), 3) for _, v in sorted(by_hundred.items())]
    peak = max(trained, key=lambda x: x[2])
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    result = {
        "first_after_step_1_gb": round(first[2], 3), "first_at_s": round(first[0], 1),
        "medians_per_100_steps_gb": medians, "peak_gb": round(peak[2], 3), "peak_step": peak[1],
        "growth": round(peak[2] / first[2] - 1, 4), "seconds_to_step_1": round(first[0], 1),
        "epoch_s": round(samples[-1][0] - first[0], 1), "steps": len(steps),
        "loss": [r.get("loss") for r in steps], "grad_norm": [r.get("grad_norm") for r in steps],
    }
    (out / "memory.json").write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("loss", "grad_norm")}), flush=True)


if __name__ == "__main__":
    main()
