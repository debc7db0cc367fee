"""python benchmarks/demo_sharing.py --seeds 42,1,2,3,4,5,6,7 --out runs/sharing

Quality with shared prefixes on and off: the demo's training (recipe demo_lora, CPU) once per seed and mode,
then CIDEr on the demo's test images. Sharing changes which captions meet in a step (whole images) and how LoRA
dropout is drawn on the prompt, not the loss of a batch; this shows what that does to the result, with the
seed-to-seed spread beside it. Results are appended to OUT/results.jsonl as they come (a rerun skips done pairs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from captune.data.synthetic import make_synthetic_dataset
from captune.demo.demo import evaluate_demo, train_demo


def run(seeds: list[int], out: Path, overrides: dict) -> dict[str, dict[int, float]]:
    data = out / "data"
    if not data.exists():
        make_synthetic_dataset(data, train=200, test=50, seed=0)
    results_file = out / "results.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            done[(r["share_prefix"], r["seed"])] = r["CIDEr"]
    for seed in seeds:
        for mode in ("on", "off"):
            if (mode, seed) in done:
                continue
            run_dir = out / f"{mode}-{seed}"
            adapter = train_demo(data, run_dir, share_prefix=mode, seed=seed, resume="false", **overrides)
            metrics = evaluate_demo(adapter, data, run_dir / "eval")
            done[(mode, seed)] = metrics["CIDEr"]
            with results_file.open("a") as f:
                f.write(json.dumps({"share_prefix": mode, "seed": seed, "CIDEr": metrics["CIDEr"]}) + "\n")
    return {mode: {s: done[(mode, s)] for s in seeds} for mode in ("on", "off")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,1,2,3")
    parser.add_argument("--out", type=Path, default=Path("runs/sharing"))
    parser.add_argument("--lora-dropout", type=float, default=None, help="default: the recipe's (0.05)")
    args = parser.parse_args()
    overrides = {} if args.lora_dropout is None else {"lora_dropout": args.lora_dropout}
    seeds = [int(s) for s in args.seeds.split(",")]
    cider = run(seeds, args.out, overrides)
    print(f"{'seed':>6} {'on':>7} {'off':>7}")
    for s in seeds:
        print(f"{s:>6} {cider['on'][s]:>7.3f} {cider['off'][s]:>7.3f}")
    for mode in ("on", "off"):
        values = list(cider[mode].values())
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"sharing {mode}: CIDEr {statistics.mean(values):.3f} +- {spread:.3f}")


if __name__ == "__main__":
    main()
