"""`captune compare RUN_A RUN_B`: two evaluations of one test set side by side, in one self-contained HTML page.

The page shows both runs' corpus metrics and their differences, then the images whose captions changed, the worst
regressions first, then the best improvements (each with its thumbnail, both captions, the references and each run's
own CIDEr). Thumbnails are inlined as data: URIs, so the single file opens anywhere, offline.

An eval folder (`captune eval --out FOLDER`) holds eval.json (the settings, with the references file as `gt_json`;
older captune wrote it as `test_json`), captions*.jsonl (each caption with its image's path), results.json (one
caption per image), metrics.json and report.html. Per-image scores are not saved there, so each image's CIDEr is
computed again from results.json and the references with the official PTB tokenizer and CIDEr scorer: the numbers
report.html shows (about 25 s for 5,000 images on 2 CPU cores).
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from captune.errors import CaptuneError
from captune.eval.report import page_head, write_thumbnail
from captune.eval.scoring import (
    check_java,
    load_ground_truth,
    load_results,
    ordered_metrics,
)
from captune.fileio import read_json, write_text_atomic

SHOWN = 50  # cards per section: the worst regressions, the best improvements
COUNTS = ("num_images", "num_skipped")  # metrics.json's counts, beside the metrics

_CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; background: #f4f5f7; }
body { margin: 0 auto; padding: 1.5rem; max-width: 1400px; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; } h2 { font-size: 1.15rem; margin: 1.5rem 0 .75rem; }
.runs { font-size: .9rem; color: #3a444d; margin: 0 0 1rem; } .runs code { overflow-wrap: anywhere; }
table.metrics { border-collapse: collapse; background: #fff; margin-bottom: 1rem; }
table.metrics th, table.metrics td { padding: .35rem .9rem; border: 1px solid #d8dce1; text-align: right; }
table.metrics th { background: #e9ecf0; font-weight: 600; } table.metrics td:first-child { text-align: left; }
.up { color: #1e8449; font-weight: 600; } .down { color: #c0392b; font-weight: 600; }
.summary { font-size: .9rem; color: #4a5560; max-width: 70rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1rem; }
.card { background: #fff; border: 1px solid #d8dce1; border-radius: .5rem; padding: .75rem; overflow-wrap: anywhere; }
.card .thumb, .card .placeholder { display: block; width: 100%; height: 200px; object-fit: contain;
  background: #eceff2; border-radius: .3rem; }
.card .placeholder { display: flex; align-items: center; justify-content: center; color: #7b8691; font-size: .9rem; }
.card .head { display: flex; justify-content: space-between; margin: .6rem 0 .3rem; font-size: .85rem; color: #4a5560; }
.card .caption { margin: .2rem 0 .4rem; font-weight: 600; }
.card .tag { display: inline-block; min-width: 1.1rem; margin-right: .35rem; padding: 0 .3rem; border-radius: .3rem;
  background: #e9ecf0; color: #4a5560; font-size: .8rem; text-align: center; }
.card ol { margin: .3rem 0 0; padding-left: 1.2rem; font-size: .85rem; color: #3a444d; }
"""

# Counts the thumbnails that decoded once the page has loaded (a headless browser reads it from the DOM).
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("img.thumb"));
  var decoded = images.filter(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute("data-rendered", String(decoded.length));
});
"""


@dataclass
class EvalRun:
    """One `captune eval` output folder, as compare reads it."""

    folder: Path
    model: str
    gt_path: Path
    metrics: dict[str, float]
    captions: dict[int, str]
    images: dict[int, str]


def read_run(folder: Path) -> EvalRun:
    """Read an eval output folder; a folder that is not a finished evaluation is one clear CaptuneError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptuneError("not a folder (give two `captune eval --out` folders)", folder)
    if not (folder / "eval.json").is_file():
        raise CaptuneError("not a captune eval output folder (no eval.json; `captune eval --out FOLDER` writes "
                           "eval.json, results.json, metrics.json and report.html)", folder)
    missing = [name for name in ("results.json", "metrics.json") if not (folder / name).is_file()]
    if missing:
        raise CaptuneError(f"an unfinished evaluation (no {' or '.join(missing)}: its captions were not all made "
                           "and scored); run the same `captune eval` again to finish it", folder)
    settings, metrics = read_json(folder / "eval.json"), read_json(folder / "metrics.json")
    gt_path = settings.get("gt_json") or settings.get("test_json") if isinstance(settings, dict) else None
    if not isinstance(gt_path, str):
        raise CaptuneError("names no references file (gt_json) in its settings", folder / "eval.json")
    if not isinstance(metrics, dict):
        raise CaptuneError("not a metrics object", folder / "metrics.json")
    images: dict[int, str] = {}
    for path in sorted(folder.glob("captions*.jsonl")):  # each caption's image path (a cut-off last line is skipped)
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                images[int(row["image_id"])] = str(row["image"])
            except (ValueError, KeyError, TypeError):
                continue
    return EvalRun(folder=folder, model=str(settings.get("model", "")), gt_path=Path(gt_path),
                   metrics={k: float(v) for k, v in metrics.items() if k not in COUNTS},
                   captions={r["image_id"]: r["caption"] for r in load_results(folder / "results.json")},
                   images=images)


def _references(gt_path: Path, run: EvalRun) -> dict[int, list[str]]:
    if not gt_path.is_file():
        raise CaptuneError(f"the references file of {run.folder} (named in its eval.json) is not found", gt_path)
    refs: dict[int, list[str]] = {}
    for ann in load_ground_truth(gt_path)["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return refs


def same_test_set(a: EvalRun, b: EvalRun) -> dict[int, list[str]]:
    """The references of the images both runs scored; a CaptuneError when they evaluated different test sets."""
    refs_a = _references(a.gt_path, a)
    refs_b = refs_a if b.gt_path.resolve() == a.gt_path.resolve() else _references(b.gt_path, b)
    common = set(a.captions) & set(b.captions)
    if set(a.captions) != set(b.captions):
        raise CaptuneError(
            f"{a.folder} and {b.folder} evaluated different test sets ({len(a.captions)} images of {a.gt_path}, "
            f"{len(b.captions)} of {b.gt_path}, {len(common)} in common): compare two evaluations of one test set")
    differ = sorted(i for i in common if refs_a.get(i) != refs_b.get(i))
    if differ:
        raise CaptuneError(
            f"{a.folder} and {b.folder} evaluated different test sets (the same {len(common)} images, but "
            f"{len(differ)} with other references in {a.gt_path} and {b.gt_path}, e.g. image {differ[0]}): "
            "compare two evaluations of one test set")
    return {i: refs_a.get(i, []) for i in sorted(common)}


def per_image_cider(runs: list[dict[int, str]], references: dict[int, list[str]]) -> list[dict[int, float]]:
    """Each run's per-image CIDEr as `captune eval` scored it: the official PTB tokenizer and CIDEr, these images."""
    check_java()
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise CaptuneError("the COCO caption scorer is not installed: pip install 'captune[eval]'") from None
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({(k, i): [{"caption": run[i]}] for k, run in enumerate(runs) for i in references})
    scores = []
    for k in range(len(runs)):
        _, per_image = Cider().compute_score(gts, {i: res[(k, i)] for i in gts})
        scores.append({i: float(s) for i, s in zip(gts, per_image)})
    return scores


# --------------------------------------------------------------------------------------------- the page


def _signed(delta: float) -> str:
    return f'<span class="{"up" if delta > 0 else "down" if delta < 0 else ""}">{delta:+0.3f}</span>'


def _metrics_table(a: dict[str, float], b: dict[str, float]) -> str:
    names = [m for m, _ in ordered_metrics({**a, **b})]
    rows = []
    for m in names:
        va, vb = a.get(m), b.get(m)
        cells = [f"{v:0.3f}" if v is not None else "–" for v in (va, vb)]
        delta = _signed(vb - va) if va is not None and vb is not None else "–"
        rows.append(f"<tr><td>{html.escape(m)}</td><td>{cells[0]}</td><td>{cells[1]}</td><td>{delta}</td></tr>")
    head = "<tr><th>metric</th><th>A</th><th>B</th><th>B − A</th></tr>"
    return f'<table class="metrics">{head}{"".join(rows)}</table>'


def _picture(image_id: int, src: str | None, scratch: Path) -> str:
    alt = html.escape(f"image {image_id}")
    size = write_thumbnail(src, scratch / f"{image_id}.jpg")
    if size is None:
        return f'<div class="placeholder" role="img" aria-label="{alt}">image not available</div>'
    data = base64.b64encode((scratch / f"{image_id}.jpg").read_bytes()).decode("ascii")
    return f'<img class="thumb" src="data:image/jpeg;base64,{data}" width="{size[0]}" height="{size[1]}" alt="{alt}">'


def _card(change: dict, scratch: Path) -> str:
    i, delta = change["image_id"], change["cider_b"] - change["cider_a"]
    refs = "".join(f"<li>{html.escape(ref)}</li>" for ref in change["references"])
    return (f'<div class="card" id="image-{i}">{_picture(i, change["image"], scratch)}'
            f'<div class="head"><span>image {i}</span><span>CIDEr {change["cider_a"]:0.3f} → '
            f'{change["cider_b"]:0.3f} ({_signed(delta)})</span></div>'
            f'<p class="caption"><span class="tag">A</span>{html.escape(change["caption_a"])}</p>'
            f'<p class="caption"><span class="tag">B</span>{html.escape(change["caption_b"])}</p>'
            f"<ol>{refs}</ol></div>")


def changed_captions(a: EvalRun, b: EvalRun, references: dict[int, list[str]], cider_a: dict[int, float],
                     cider_b: dict[int, float]) -> tuple[list[dict], list[dict], int]:
    """(regressions, worst first; improvements, best first; changed captions with equal CIDEr), by per-image CIDEr."""
    changes = [{"image_id": i, "image": a.images.get(i) or b.images.get(i), "caption_a": a.captions[i],
                "caption_b": b.captions[i], "references": references[i], "cider_a": cider_a[i], "cider_b": cider_b[i]}
               for i in references if a.captions[i] != b.captions[i]]
    worse = sorted((c for c in changes if c["cider_b"] < c["cider_a"]), key=lambda c: (c["cider_b"] - c["cider_a"],
                                                                                        c["image_id"]))
    better = sorted((c for c in changes if c["cider_b"] > c["cider_a"]), key=lambda c: (c["cider_a"] - c["cider_b"],
                                                                                         c["image_id"]))
    return worse, better, len(changes) - len(worse) - len(better)


def _page(a: EvalRun, b: EvalRun, n: int, worse: list[dict], better: list[dict], equal: int, scratch: Path) -> str:
    title = f"captune: {a.folder.name} (A) vs {b.folder.name} (B)"
    runs = "".join(f"<li>{tag}: <code>{html.escape(str(r.folder))}</code> (model <code>{html.escape(r.model)}</code>)"
                   "</li>" for tag, r in (("A", a), ("B", b)))
    changed = len(worse) + len(better) + equal
    summary = (f"{n} images of <code>{html.escape(str(a.gt_path))}</code>: {changed} captions changed, "
               f"{len(worse)} with a lower CIDEr in B, {len(better)} with a higher one, {equal} with the same; "
               f"{n - changed} unchanged. Each card shows A's caption, B's caption, the references, and each "
               f"caption's own CIDEr (consensus with the references) in A and in B.")
    sections = []
    for heading, items in ((f"Regressions, worst first ({min(len(worse), SHOWN)} of {len(worse)})", worse),
                           (f"Improvements, best first ({min(len(better), SHOWN)} of {len(better)})", better)):
        cards = "\n".join(_card(c, scratch) for c in items[:SHOWN])
        sections.append(f'<h2>{heading}</h2>\n<div class="grid">\n{cards}\n</div>')
    return f"""{page_head(title, _CSS)}
<ul class="runs">{runs}</ul>
{_metrics_table(a.metrics, b.metrics)}
<p class="summary">{summary}</p>
{chr(10).join(sections)}
<script>{_SCRIPT}</script>
</body>
</html>
"""


def compare(run_a: Path, run_b: Path, out: Path | None = None) -> Path:
    """Compare two evaluations of one test set in a self-contained HTML page: metrics, then the changed captions.

    The page shows both runs' corpus metrics and their differences, then the images whose captions changed most
    by their own CIDEr: the worst regressions first, then the best improvements.

    Args:
        run_a: an output folder of `captune eval` (the baseline, A)
        run_b: another output folder of `captune eval` on the same test set (B)
        out: the page to write (default: compare.html in the current folder)
    """
    a, b = read_run(Path(run_a)), read_run(Path(run_b))
    references = same_test_set(a, b)
    print(f"captune compare: A = {a.folder}, B = {b.folder}, {len(references)} images; scoring each caption's CIDEr",
          flush=True)
    cider_a, cider_b = per_image_cider([a.captions, b.captions], references)
    worse, better, equal = changed_captions(a, b, references, cider_a, cider_b)
    out = Path(out) if out is not None else Path("compare.html")
    with tempfile.TemporaryDirectory(prefix="captune-compare-") as scratch:
        write_text_atomic(out, _page(a, b, len(references), worse, better, equal, Path(scratch)))

    for name, va in ordered_metrics(a.metrics):
        if name in b.metrics:
            print(f"{name + ':':9} {va:0.3f} -> {b.metrics[name]:0.3f} ({b.metrics[name] - va:+0.3f})")
    print(f"{len(worse) + len(better) + equal} captions changed: {len(worse)} worse by CIDEr, {len(better)} better, "
          f"{equal} equal")
    print(f"wrote {out}")
    return out
