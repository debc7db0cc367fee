"""`captune eval`: the COCO Caption benchmark of the tutorial, batched, on one GPU or many, resumable.

    captune eval data/InternVL2-2B --data data/coco --out runs/eval-2b
    torchrun --nproc-per-node 8 -m captune eval data/InternVL2-2B --data data/coco --out runs/eval-2b

Captions are generated as InternVL's `evaluate_caption.py` does (the caption question, dynamic tiling up to 6
tiles, greedy, 8 to 30 new tokens), but many images at a time: images are ordered by tile count so a batch
needs no padding, decoded and tiled in DataLoader workers while the GPU works. Every caption is appended to
`captions.jsonl` as soon as it exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from captune import distributed
from captune.data.evalsets import EvalImage, EvalSet, resolve_eval_set
from captune.errors import CaptuneError
from captune.eval.generate import GenerationSettings, generate_ids
from captune.fileio import read_json, write_json_atomic
from captune.inputs.processor import DEFAULT_QUESTION, Processor
from captune.inputs.tiling import load_image

RUN_FILE = "eval.json"


@dataclass(frozen=True)
class EvalSettings:
    """What makes two runs' captions comparable; a resumed run must have the same."""

    model: str
    test_json: str
    question: str = DEFAULT_QUESTION
    max_tiles: int = 6
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    dtype: str = "bf16"


class CaptionDataset(Dataset):
    """Decodes and tiles one image per item (in DataLoader workers); an unreadable image becomes an error item."""

    def __init__(self, images: list[EvalImage], processor: Processor, question: str, max_tiles: int):
        self.images, self.processor, self.question, self.max_tiles = images, processor, question, max_tiles

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = self.images[i]
        try:
            sample = self.processor.prepare(load_image(item.path), self.question, self.max_tiles)
        except CaptuneError as e:
            return {"image_id": item.image_id, "image": str(item.path), "error": str(e)}
        return {**sample, "image_id": item.image_id, "image": str(item.path)}


class Collate:
    def __init__(self, processor: Processor):
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict:
        good = [s for s in samples if "error" not in s]
        return {
            "batch": self.processor.collate(good) if good else None,
            "items": [{"image_id": s["image_id"], "image": s["image"]} for s in good],
            "errors": [s for s in samples if "error" in s],
        }


def order_by_tiles(images: list[EvalImage], processor: Processor, max_tiles: int) -> list[EvalImage]:
    """Largest tile counts first (an out-of-memory shows at once), equal counts together (no padding).

    Only the image headers are read; an image whose header cannot be read goes last and is reported later.
    """

    def tiles(item: EvalImage) -> int:
        try:
            return processor.num_tiles(item.path, max_tiles)
        except Exception:
            return -1

    return sorted(images, key=lambda item: -tiles(item))


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file; a line cut off by a killed process is dropped."""
    rows = []
    if not path.exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class CaptionLog:
    """captions.jsonl (one per rank under torchrun): appended and flushed after every batch."""

    def __init__(self, out: Path, rank: int, distributed_run: bool):
        suffix = f".rank{rank}" if distributed_run else ""
        self.captions_path = out / f"captions{suffix}.jsonl"
        self.skipped_path = out / f"skipped{suffix}.jsonl"
        # Rewrite what survived an interruption so that appending continues after a complete line.
        for path in (self.captions_path, self.skipped_path):
            rows = read_jsonl(path)
            if path.exists():
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        self._captions = open(self.captions_path, "a", encoding="utf-8")
        self._skipped = open(self.skipped_path, "a", encoding="utf-8")

    def add(self, captions: list[dict], skipped: list[dict]) -> None:
        for f, rows in ((self._captions, captions), (self._skipped, skipped)):
            if rows:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())

    def close(self) -> None:
        self._captions.close()
        self._skipped.close()


def done_captions(out: Path) -> dict[int, dict]:
    """Every caption already written to OUT, by any rank of any earlier run."""
    done: dict[int, dict] = {}
    for path in sorted(out.glob("captions*.jsonl")):
        for row in read_jsonl(path):
            done[int(row["image_id"])] = row
    return done


def skipped_images(out: Path, done: dict[int, dict]) -> dict[int, dict]:
    skipped: dict[int, dict] = {}
    for path in sorted(out.glob("skipped*.jsonl")):
        for row in read_jsonl(path):
            if int(row["image_id"]) not in done:
                skipped[int(row["image_id"])] = row
    return skipped


def check_resume(out: Path, settings: EvalSettings, force: bool) -> None:
    run_file = out / RUN_FILE
    if force:
        for f in list(out.glob("captions*.jsonl")) + list(out.glob("skipped*.jsonl")):
            f.unlink()
    elif run_file.exists():
        before = read_json(run_file)
        changed = {k: (before.get(k), v) for k, v in asdict(settings).items() if before.get(k) != v}
        if changed and any(out.glob("captions*.jsonl")):
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise CaptuneError(f"holds captions made with other settings ({what}); use another --out or --force", out)
    write_json_atomic(run_file, asdict(settings))


def generate_captions(
    model,
    processor: Processor,
    images: list[EvalImage],
    log: CaptionLog,
    settings: EvalSettings,
    batch_size: int,
    num_workers: int,
    progress: bool = True,
) -> tuple[int, int]:
    """Caption `images` in batches, logging each batch as soon as it is done; return (captioned, skipped)."""
    from tqdm import tqdm

    ordered = order_by_tiles(images, processor, settings.max_tiles)
    loader = DataLoader(
        CaptionDataset(ordered, processor, settings.question, settings.max_tiles),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Collate(processor),
        pin_memory=model.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    gen = GenerationSettings(max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens)
    captioned = skipped = 0
    bar = tqdm(total=len(ordered), desc="captioning", unit="img", disable=not progress, dynamic_ncols=True)
    for chunk in loader:
        rows = []
        if chunk["batch"] is not None:
            new_ids = generate_ids(model, processor, chunk["batch"], gen).cpu()
            rows = [{**item, "caption": processor.decode(ids)} for item, ids in zip(chunk["items"], new_ids)]
        for err in chunk["errors"]:
            tqdm.write(f"captune: skipped {err['error']}")
        log.add(rows, [{"image_id": e["image_id"], "image": e["image"], "reason": e["error"]} for e in chunk["errors"]])
        captioned += len(rows)
        skipped += len(chunk["errors"])
        bar.update(len(rows) + len(chunk["errors"]))
    bar.close()
    return captioned, skipped


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
) -> dict | None:
    """Caption the test set, write results.json, score it with the official COCO metrics, write the report."""
    from captune.devices import resolve_dtype, short_dtype_name
    from captune.internvl.load import load

    ctx = distributed.init(device)
    try:
        evalset = resolve_eval_set(data, test_json, gt_json, image_root, limit)
        out_dir = Path(out) if out else Path("runs") / f"eval-{Path(model).resolve().name}"
        torch_dtype = resolve_dtype(dtype, ctx.device)
        settings = EvalSettings(model=str(Path(model).resolve()), test_json=str(Path(evalset.gt_path).resolve()),
                                question=question, max_tiles=max_tiles,
                                dtype=short_dtype_name(torch_dtype))
        if ctx.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            check_resume(out_dir, settings, force)
        distributed.barrier(ctx)

        done = done_captions(out_dir)
        todo = [im for im in evalset.images if im.image_id not in done]
        mine = todo[ctx.rank :: ctx.world_size]
        if ctx.is_main:
            print(f"captune eval: {len(evalset.images)} images, {len(done)} already captioned in {out_dir}, "
                  f"{len(todo)} to go" + (f" on {ctx.world_size} processes" if ctx.distributed else ""))
        if mine:
            net, processor = load(model, dtype=torch_dtype, device=ctx.device)
            if processor is None:
                raise CaptuneError("has no tokenizer files; cannot caption", model)
            log = CaptionLog(out_dir, ctx.rank, ctx.distributed)
            try:
                bs = batch_size or (64 if ctx.device.type == "cuda" else 4)
                workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
                generate_captions(net, processor, mine, log, settings, bs, workers, progress=ctx.is_main)
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
    skipped = skipped_images(out_dir, done)
    print(f"captune eval: {len(results)} of {len(evalset.images)} images captioned, {len(skipped)} skipped"
          + (f" (see {out_dir / 'skipped.jsonl'})" if skipped else "") + f"; results in {out_dir / 'results.json'}")
    try:
        check_java()
    except CaptuneError as e:
        raise CaptuneError(f"{e}\nThe captions are saved; score them later with: "
                           f"captune score {out_dir / 'results.json'} {evalset.gt_path}") from None
    report = score_captions(results, evalset.gt_path, spice=spice)
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
    path = write_report(out_dir, rows, report.metrics)
    print(f"captune eval: report in {path}")
