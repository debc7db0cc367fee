"""A self-contained HTML page for reading an evaluation: corpus metrics, then every image, worst caption first.

The page has no external resources (inline CSS and script, thumbnails beside it in `thumbs/`), so the folder
can be copied or opened from anywhere, offline.
"""

from __future__ import annotations

import html
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageOps

from captune.eval.scoring import ordered_metrics
from captune.fileio import atomic_file, write_text_atomic

THUMB_SIZE = 256

_CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a; background: #f4f5f7; }
body { margin: 0 auto; padding: 1.5rem; max-width: 1400px; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
table.metrics { border-collapse: collapse; background: #fff; margin-bottom: 1rem; }
table.metrics th, table.metrics td { padding: .4rem .9rem; border: 1px solid #d8dce1; text-align: center; }
table.metrics th { background: #e9ecf0; font-weight: 600; }
.legend { font-size: .9rem; color: #4a5560; margin: 0 0 1.25rem; max-width: 70rem; }
.badge { display: inline-block; padding: .05rem .45rem; border-radius: .6rem; font-weight: 600; color: #fff; }
.low { background: #c0392b; } .mid { background: #d68910; } .high { background: #1e8449; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); gap: 1rem; }
.card { background: #fff; border: 1px solid #d8dce1; border-radius: .5rem; padding: .75rem; overflow-wrap: anywhere; }
.card .thumb, .card .placeholder { display: block; width: 100%; height: 200px; object-fit: contain;
  background: #eceff2; border-radius: .3rem; }
.card .placeholder { display: flex; align-items: center; justify-content: center; color: #7b8691; font-size: .9rem; }
.card .head { display: flex; justify-content: space-between; align-items: center; margin: .6rem 0 .3rem;
  font-size: .85rem; color: #4a5560; }
.card .caption { font-weight: 600; margin: .2rem 0 .5rem; }
.card ol { margin: 0; padding-left: 1.2rem; font-size: .88rem; color: #3a444d; }
"""

# Waits for the first screen, then fetches the lazy thumbnails still pending and reports how many decoded.
_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("img.thumb"));
  var pending = images.map(function (img) {
    if (img.complete) { return Promise.resolve(); }
    return new Promise(function (done) {
      img.addEventListener("load", done, { once: true });
      img.addEventListener("error", done, { once: true });
      img.loading = "eager";
    });
  });
  Promise.all(pending).then(function () {
    var rendered = images.filter(function (img) { return img.naturalWidth > 0; }).length;
    document.body.dataset.rendered = String(rendered);
  });
});
"""

_LEGEND = (
    "Cards are sorted worst first by each image's own CIDEr (consensus of the generated caption with the "
    "reference captions; the corpus CIDEr above is their mean). "
    '<span class="badge low">&lt; 0.5</span> poor, <span class="badge mid">0.5 – 1.0</span> fair, '
    '<span class="badge high">≥ 1.0</span> good. Each card shows the generated caption in bold and the '
    "reference captions below it."
)


def page_head(title: str, css: str) -> str:
    """The start of a self-contained page, up to and including its <h1> title."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{css}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>"""


def _thumb_name(image_id: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(image_id)) + ".jpg"


def write_thumbnail(src: str | Path | None, dest: Path) -> tuple[int, int] | None:
    """Write a JPEG of at most THUMB_SIZE px a side; return its size, or None when `src` cannot be read."""
    if src is None:
        return None
    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            _save_jpeg_atomic(im, dest)
            return im.size
    except Exception:  # any unreadable image (missing, truncated, not an image, too large) becomes a placeholder
        return None


def _save_jpeg_atomic(im: Image.Image, dest: Path) -> None:
    with atomic_file(dest, binary=True, sync=False) as f:  # the umask's mode, as the page itself
        im.save(f, format="JPEG", quality=85)


def _band(cider: float) -> str:
    return "low" if cider < 0.5 else "mid" if cider < 1.0 else "high"


def _metrics_table(metrics: dict[str, float]) -> str:
    items = ordered_metrics(metrics)
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in items)
    values = "".join(f"<td>{value:0.3f}</td>" for _, value in items)
    return f'<table class="metrics"><tr>{head}</tr><tr>{values}</tr></table>'


def _picture(row: dict, out_dir: Path) -> str:
    name = _thumb_name(row["image_id"])
    size = write_thumbnail(row.get("image"), out_dir / "thumbs" / name)
    alt = html.escape(f"image {row['image_id']}")
    if size is None:
        return f'<div class="placeholder" role="img" aria-label="{alt}">image not available</div>'
    src = html.escape(f"thumbs/{quote(name)}")
    return f'<img class="thumb" src="{src}" width="{size[0]}" height="{size[1]}" alt="{alt}" loading="lazy">'


def _pictures(rows: list[dict], out_dir: Path, progress: bool) -> list[str]:
    """Every row's thumbnail written (in threads: decoding and resizing release the GIL) and its `<img>`, in order."""
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        pictures = pool.map(lambda row: _picture(row, out_dir), rows)
        return list(tqdm(pictures, total=len(rows), desc="writing report thumbnails", unit="img",
                         disable=not progress))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: the ones not started are dropped


def _card(row: dict, picture: str) -> str:
    cider = float(row["cider"])
    references = "".join(f"<li>{html.escape(ref)}</li>" for ref in row.get("references", []))
    return (
        f'<div class="card" id="image-{html.escape(str(row["image_id"]))}">{picture}'
        f'<div class="head"><span>image {html.escape(str(row["image_id"]))}</span>'
        f'<span class="badge {_band(cider)}">CIDEr {cider:0.3f}</span></div>'
        f'<p class="caption">{html.escape(row["caption"])}</p>'
        f"<ol>{references}</ol></div>"
    )


def write_report(out_dir: str | Path, rows: list[dict], metrics: dict[str, float],
                 title: str = "captune: COCO caption evaluation", progress: bool = False) -> Path:
    """Write `out_dir/report.html` (and `out_dir/thumbs/`): the metrics, then one card per image, worst CIDEr first.

    Each row is `{"image_id", "image" (path), "caption", "references": [str], "cider": float}`; an image that
    is missing or unreadable gets a placeholder instead of a thumbnail. `progress` shows a bar on stderr while
    the thumbnails are written (seconds for 5,000 images).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(rows, key=lambda row: float(row["cider"]))
    cards = "\n".join(_card(row, picture) for row, picture in zip(ordered, _pictures(ordered, out_dir, progress)))
    page = f"""{page_head(title, _CSS)}
{_metrics_table(metrics)}
<p class="legend">{len(rows)} images. {_LEGEND}</p>
<div class="grid">
{cards}
</div>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path
