"""`captune eval`: the COCO Caption benchmark of the tutorial, batched, on one GPU or many, resumable.

    captune eval data/InternVL2-2B --data data/coco --out runs/eval-2b
    torchrun --nproc-per-node 8 -m captune eval data/InternVL2-2B --data data/coco --out runs/eval-2b

Captions are generated as InternVL's `evaluate_caption.py` does (the caption question, dynamic tiling up to 6
tiles, greedy, 8 to 30 new tokens), but many images at a time: images are ordered by tile count so a batch
needs no padding, decoded and tiled in DataLoader workers while the GPU works. Every caption is appended to
`captions.jsonl` as soon as it exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path

from captune import distributed
from captune.data.evalsets import EvalImage, EvalSet, resolve_eval_set
from captune.errors import CaptuneError, Interrupted
from captune.eval.captions import (
    CaptionLog,
    EvalSettings,
    done_captions,
    generate_captions,
    read_jsonl,
    skipped_images,
    write_skipped,
)
from captune.fileio import read_json, write_json_atomic
from captune.inputs.processor import DEFAULT_QUESTION

# CaptionLog, EvalSettings, generate_captions and read_jsonl are also in-training evaluation's and the benchmark's.
__all__ = ["CaptionLog", "EvalSettings", "evaluate", "finish", "generate_captions", "read_jsonl"]

RUN_FILE = "eval.json"


def check_out_dir(out: Path, settings: EvalSettings, gt_json: str, force: bool) -> None:
    """Refuse, before anything is written, an OUT that is a file, a non-empty folder that is not an evaluation
    (unless `force`), or an evaluation whose captions were made with other settings (unless `force`)."""
    if out.exists() and not out.is_dir():
        raise CaptuneError("exists and is not a folder", out)
    if force or not out.is_dir():
        return
    run_file = out / RUN_FILE
    if not run_file.is_file():
        if any(out.iterdir()):
            raise CaptuneError(f"folder exists, is not empty and holds no captune eval run (no {RUN_FILE}); use "
                               "another --out, or --force to write the evaluation into it", out)
        return
    before = read_json(run_file)
    before = before if isinstance(before, dict) else {}
    if "gt_json" not in before and before.get("test_json") == gt_json:
        before["test_json"] = settings.test_json  # an older captune recorded the ground truth's path as test_json
    changed = {k: (before.get(k), v) for k, v in asdict(settings).items() if before.get(k) != v}
    if changed and any(out.glob("captions*.jsonl")):
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise CaptuneError(f"holds captions made with other settings ({what}); use another --out or --force", out)


def start_run(out: Path, settings: EvalSettings, gt_json: str, force: bool) -> None:
    """Create OUT and record the settings (after every check passed); `force` discards earlier captions."""
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for f in list(out.glob("captions*.jsonl")) + list(out.glob("skipped*.jsonl")):
            f.unlink()
    write_json_atomic(out / RUN_FILE, {**asdict(settings), "gt_json": gt_json})


def check_model(model: str) -> None:
    """What loading the model will need, read cheaply: a checkpoint folder (or an adapter's base) with a tokenizer."""
    from captune.internvl.folder import has_tokenizer, open_checkpoint
    from captune.internvl.lora import model_folder

    ckpt = open_checkpoint(model_folder(model))
    if not has_tokenizer(ckpt.path):
        raise CaptuneError("has no tokenizer files; cannot caption", ckpt.path)


def check_eval_set(evalset: EvalSet, warn: bool = True) -> dict:
    """The ground truth (returned) and the images, checked before the first image is captioned."""
    from captune.eval.scoring import check_references, load_ground_truth

    try:
        gt = load_ground_truth(evalset.gt_path)
    except CaptuneError as e:
        if evalset.gt_given:
            raise
        raise CaptuneError(f"{e}; give the reference captions in COCO format with --gt-json "
                           "(e.g. coco_karpathy_test_gt.json)") from None
    check_references(gt, [im.image_id for im in evalset.images], evalset.gt_path)
    if evalset.image_root is not None and not evalset.image_root.is_dir():
        raise CaptuneError("image folder not found (--image-root, else --data or the folder of --test-json)",
                           evalset.image_root)
    missing = [im.path for im in evalset.images if not im.path.is_file()]
    if len(missing) == len(evalset.images):
        raise CaptuneError(f"none of the {len(missing)} test images is there (e.g. {missing[0]}); check "
                           "--image-root", evalset.image_root or evalset.test_path)
    if missing and warn:
        warnings.warn(f"{len(missing)} of {len(evalset.images)} test images are missing (e.g. {missing[0]}); "
                      "they will be skipped", stacklevel=2)
    return gt


def warn_without_java() -> None:
    from captune.eval.scoring import check_java

    try:
        check_java()
    except CaptuneError as e:
        warnings.warn(f"{e}; the captions will be written but not scored", stacklevel=2)


def default_out(model: str | Path) -> Path:
    """runs/eval-NAME: the model folder's name, and for a checkpoint its run's (runs/eval-coco-lora-checkpoint-001106),
    so that the checkpoints of two runs do not share a folder."""
    path = Path(model).resolve()
    name = f"{path.parent.name}-{path.name}" if path.name.startswith(("checkpoint-", "best")) else path.name
    return Path("runs") / f"eval-{name}"


def evaluate(
    model: str,
    data: str | None = None,
    test_json: str | None = None,
    gt_json: str | None = None,
    image_root: str | None = None,
    out: str | None = None,
    max_tiles: int = 6,
    batch_size: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    spice: bool = False,
    num_workers: int | None = None,
    question: str = DEFAULT_QUESTION,
    force: bool = False,
    gpus_per_model: int | str = "auto",
    compile: str = "auto",
) -> dict | None:
    """Caption the test set, write results.json, score it with the official COCO metrics, write the report.

    Everything the run needs (the GPUs for the model, the test set and its ground truth, the model and its
    tokenizer, OUT) is checked before OUT is created and the first image captioned: a failed start writes nothing.
    `gpus_per_model` K spreads each model over K GPUs ("auto": the fewest that fit and divide the process's share of
    the GPUs, `internvl.placement.assign_gpus`); under torchrun each process takes K consecutive GPUs and the
    processes share the images. `compile`: see `eval.generate.compile_choice`.
    """
    from captune.devices import resolve_dtype, short_dtype_name
    from captune.eval.generate import compile_choice
    from captune.internvl.load import load
    from captune.internvl.placement import assign_gpus

    gpus = assign_gpus(model, gpus_per_model, device, batch_size, dtype=dtype)  # before init: it picks the device
    compile_choice(compile, 0, gpus.device)  # a bad value stops here
    ctx = distributed.init(str(gpus.device))
    try:
        try:
            evalset = resolve_eval_set(data, test_json, gt_json, image_root, limit)
            check_model(model)
            check_eval_set(evalset, warn=ctx.is_main)
            out_dir = Path(out) if out else default_out(model)
            torch_dtype = resolve_dtype(dtype, ctx.device)
            settings = EvalSettings(model=str(Path(model).resolve()), test_json=str(evalset.test_path.resolve()),
                                    question=question, max_tiles=max_tiles, dtype=short_dtype_name(torch_dtype))
            gt_path = str(evalset.gt_path.resolve())
            check_out_dir(out_dir, settings, gt_path, force)
            done = {} if force else done_captions(out_dir)
            seen, error = f"{len(evalset.images)} images, {len(done)} captioned in {out_dir}", None
        except CaptuneError as e:
            seen, error = f"error: {e}", e
        distributed.same_everywhere(ctx, seen, error)  # on several nodes: one outcome, or one error for all
        if ctx.is_main:
            warn_without_java()

        todo = [im for im in evalset.images if im.image_id not in done]
        mine = todo[ctx.rank :: ctx.world_size]
        if ctx.is_main:
            print(f"captune eval: {len(evalset.images)} images, {len(done)} already captioned in {out_dir}, "
                  f"{len(todo)} to go" + (f" on {ctx.world_size} processes" if ctx.distributed else "")
                  + (f", {gpus.placement.gpus} GPUs per model" if gpus.device_map else ""))
        net = processor = None
        if mine:
            net, processor = load(model, dtype=torch_dtype, device=ctx.device, device_map=gpus.device_map)
            if processor is None:
                raise CaptuneError("has no tokenizer files; cannot caption", model)
        if ctx.is_main:
            start_run(out_dir, settings, gt_path, force)
        distributed.barrier(ctx)
        if mine:
            log = CaptionLog(out_dir, ctx.rank, ctx.distributed)
            try:
                bs = batch_size or gpus.batch or (64 if ctx.device.type == "cuda" else 4)
                workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
                generate_captions(net, processor, mine, log, settings, bs, workers, progress=ctx.is_main,
                                  compile=compile_choice(compile, len(mine), ctx.device))
            except KeyboardInterrupt:
                log.close()
                kept = len(done_captions(out_dir).keys() & {im.image_id for im in evalset.images})
                raise Interrupted(f"{kept} of {len(evalset.images)} captions kept in {log.captions_path}; "
                                  "run the same command again to resume") from None
            finally:
                log.close()
        distributed.barrier(ctx)
        if not ctx.is_main:
            return None
        return finish(out_dir, evalset, spice)
    finally:
        distributed.shutdown(ctx)


def finish(out_dir: Path, evalset: EvalSet, spice: bool) -> dict:
    """Gather every rank's captions into results.json, score them, write metrics.json and report.html."""
    from captune.eval.scoring import (
        check_java,
        format_metrics,
        load_ground_truth,
        score_captions,
    )

    done = done_captions(out_dir)
    wanted = {im.image_id: im for im in evalset.images}
    results = [{"image_id": i, "caption": done[i]["caption"]} for i in sorted(done) if i in wanted]
    write_json_atomic(out_dir / "results.json", results)
    skipped = {i: row for i, row in skipped_images(out_dir, done).items() if i in wanted}
    write_skipped(out_dir, skipped)
    print(f"captune eval: {len(results)} of {len(evalset.images)} images captioned, {len(skipped)} skipped"
          + (f" (see {out_dir / 'skipped.jsonl'})" if skipped else "") + f"; results in {out_dir / 'results.json'}")
    try:
        check_java()
    except CaptuneError as e:
        raise CaptuneError(f"{e}\nThe captions are saved; score them later with: "
                           f"captune score {out_dir / 'results.json'} {evalset.gt_path}") from None
    report = score_captions(results, evalset.gt_path, spice=spice, progress=True)
    metrics = {**report.metrics, "num_images": report.num_images, "num_skipped": len(skipped)}
    write_json_atomic(out_dir / "metrics.json", metrics)
    print(format_metrics(report.metrics))
    _write_report(out_dir, results, wanted, load_ground_truth(evalset.gt_path), report)
    return metrics


def _write_report(out_dir: Path, results: list[dict], images: dict[int, EvalImage], gt: dict, report) -> None:
    from captune.eval.report import write_report

    refs: dict[int, list[str]] = {}
    for ann in gt["annotations"]:
        refs.setdefault(int(ann["image_id"]), []).append(ann["caption"])
    rows = [
        {
            "image_id": r["image_id"],
            "image": str(images[r["image_id"]].path),
            "caption": r["caption"],
            "references": refs.get(r["image_id"], []),
            "cider": report.per_image.get(r["image_id"], {}).get("CIDEr", 0.0),
        }
        for r in results
    ]
    path = write_report(out_dir, rows, report.metrics, progress=True)
    print(f"captune eval: report in {path}")
