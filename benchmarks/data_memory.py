"""Memory of the training data path through one whole epoch, workers included (CPU; no model is loaded).

    python benchmarks/data_memory.py DATA --model MODEL [--num-workers 4] [--out memory.json]

Builds what `captune train` builds before its first step (`load_training_data`: read, image check, compact table,
lengths, groups; the `Schedule`; `CaptionDataset` and its forked DataLoader workers, `iter_batches`) with the
recipe's settings, then draws every micro-batch of one epoch, sampling the memory of the process and its workers
(at the first micro-batch, at the end of the first optimizer step's micro-batches, then every `--every`):
PSS (shared pages counted once, split between the processes sharing them: what the tree really costs) and USS
(pages private to one process: what copy-on-write has duplicated). Also times the start-up: a first start (every
image header read) and a resume (the image check's cache in the run folder).

Make the tutorial-sized synthetic data set first: python ../shared/scale/make_coco_scale.py /tmp/scale
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path


def tree_memory(pid: int) -> dict[str, float]:
    """PSS and USS (GB) of a process and its children, from /proc/PID/smaps_rollup (Linux)."""
    pids, todo = [], [pid]
    while todo:  # the whole tree: a forkserver's workers are its children, not ours
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    pss = uss = main = 0
    for p in pids:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:])
        except (OSError, ValueError):
            continue
        kb = {k: int(v.split()[0]) for k, v in fields.items()}
        pss += kb["Pss"]
        uss += kb["Private_Clean"] + kb["Private_Dirty"]
        if p == pid:
            main = kb["Pss"]
    return {"pss_gb": pss / 2**20, "uss_gb": uss / 2**20, "main_pss_gb": main / 2**20, "processes": len(pids)}


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of a training data path at the tutorial's scale (also `train_memory.py`'s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data")
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipe", default="internvl2_2b_coco_lora")
    parser.add_argument("--num-workers", type=int, default=4)
    return parser


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0])
    parser.add_argument("--tile-size", type=int, default=None,
                        help="tiles of this many pixels instead of the model's (32: the same data path with little "
                             "pixel traffic, for a whole epoch on a small CPU machine)")
    parser.add_argument("--every", type=int, default=200, help="sample memory every N micro-batches")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    from tqdm import tqdm

    from captune.internvl.folder import open_checkpoint
    from captune.internvl.load import processor_for
    from captune.internvl.tokenizer import load_tokenizer
    from captune.train import config as cfg
    from captune.train.collate import Collate
    from captune.train.dataset import CaptionDataset, iter_batches, load_training_data
    from captune.train.runlog import RunLog
    from captune.train.schedule import Schedule

    processor = processor_for(open_checkpoint(args.model), load_tokenizer(args.model))
    if args.tile_size:
        processor = dataclasses.replace(processor, tile_size=args.tile_size)
    with tempfile.TemporaryDirectory() as run:
        config = cfg.resolve(args.recipe, {"model": args.model, "data": args.data, "out": run,
                                           "num_workers": str(args.num_workers)})
        log = RunLog(Path(run), enabled=True, tensorboard=False)
        t0 = time.perf_counter()
        data = load_training_data(config, processor, log)
        first_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = load_training_data(config, processor, RunLog(Path(run), enabled=False, tensorboard=False))
        resume_start = time.perf_counter() - t0
        log.close()
    print(f"start-up: {first_start:.1f} s, resumed: {resume_start:.1f} s (the image check's cache)", flush=True)
    schedule = Schedule(data.lengths, data.groups.sizes, config, 1, data.shared)
    micro = [b for step in range(schedule.steps_per_epoch) for b in schedule.plan(step)[0]]
    first_step = len(schedule.plan(0)[0])  # micro-batches of the first optimizer step
    dataset = CaptionDataset(data.table, data.groups, processor, config.max_tiles, config.max_seq_length)
    collate = Collate(processor.pad_token_id, data.shared, config.token_budget, static=False)
    batches = iter_batches(dataset, micro, collate, args.num_workers)
    samples, rows, over = [], 0, 0
    t0 = time.perf_counter()
    for i in tqdm(range(len(micro)), desc="one epoch", unit="micro-batch"):
        batch, _ = next(batches)
        rows += batch.input_ids.shape[0]
        over += batch.input_ids.shape[0] > 1 and data.shared
        if i in (0, first_step - 1) or (i + 1) % args.every == 0 or i == len(micro) - 1:
            samples.append({"micro_batch": i + 1, **tree_memory(os.getpid())})
    epoch = time.perf_counter() - t0
    first = next(s["pss_gb"] for s in samples if s["micro_batch"] == first_step)
    peak = max(s["pss_gb"] for s in samples)
    result = {
        "captions": len(data.table), "images": len(data.table.images), "groups": len(data.groups),
        "table_mb": data.table.nbytes / 2**20, "micro_batches": len(micro), "rows": rows,
        "micro_batches_over_one_row": over, "first_start_s": first_start, "resume_start_s": resume_start,
        "epoch_s": epoch, "num_workers": args.num_workers, "tile_size": processor.tile_size,
        "first_micro_batch_pss_gb": samples[0]["pss_gb"], "first_step_micro_batches": first_step,
        "first_step_pss_gb": first, "max_pss_gb": peak, "last_pss_gb": samples[-1]["pss_gb"],
        "max_growth": peak / first - 1, "max_growth_from_first_micro_batch": peak / samples[0]["pss_gb"] - 1,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
