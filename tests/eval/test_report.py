"""`captune.eval.report.write_report`: a self-contained page, worst caption first, that a real browser renders.

The browser test needs a headless Chromium (`make test` installs Debian's chromium when run as root); without one it
is skipped, saying why, unless CAPTUNE_REQUIRE_BROWSER=1 (as in CI), which makes a missing browser a failure
(tests/helpers/browser.py).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from helpers.browser import find_chromium, render
from PIL import Image

from captune.eval.report import THUMB_SIZE, write_report

METRICS = {"Bleu_1": 0.64, "Bleu_2": 0.47, "Bleu_3": 0.346, "Bleu_4": 0.25, "METEOR": 0.245, "ROUGE_L": 0.53,
           "CIDEr": 0.79311}
TRICKY = 'A <b>bold</b> & "quoted" caption'


def make_rows(folder: Path, readable: int = 4) -> list[dict]:
    """`readable` real images of assorted sizes and modes, then one missing and one corrupt image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(readable):
        path = folder / f"photo{i}.{'png' if i % 2 else 'jpg'}"
        size = (900, 600) if i % 3 == 0 else (120, 340) if i % 3 == 1 else (256, 256)
        mode = "RGB" if i % 2 else "L"
        Image.linear_gradient("L").resize(size).convert(mode).save(path)
        rows.append({"image_id": 100 + i, "image": str(path), "caption": f"caption number {i}",
                     "references": [f"reference {i}.{k}" for k in range(5)], "cider": 0.4 * i + 0.3})
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    rows.append({"image_id": 7, "image": str(folder / "missing.jpg"), "caption": TRICKY,
                 "references": ["x < y & z", "a", "b", "c", "d"], "cider": 0.05})
    rows.append({"image_id": 8, "image": str(corrupt), "caption": "corrupt image caption",
                 "references": ["one", "two", "three", "four", "five"], "cider": 2.5})
    return rows


def test_page_has_metrics_escaped_captions_and_worst_first(tmp_path):
    rows = make_rows(tmp_path / "images")
    page = write_report(tmp_path / "out", rows, METRICS).read_text()

    assert '<table class="metrics">' in page and "<th>CIDEr</th>" in page and "<td>0.793</td>" in page
    assert page.index("<th>Bleu_1</th>") < page.index("<th>METEOR</th>") < page.index("<th>CIDEr</th>")
    assert html.escape(TRICKY) in page and TRICKY not in page and "x &lt; y &amp; z" in page
    positions = [page.index(f"<p class=\"caption\">{html.escape(r['caption'])}</p>") for r in rows]
    by_cider = [p for _, p in sorted(zip([r["cider"] for r in rows], positions))]
    assert by_cider == sorted(positions), "cards must be sorted worst CIDEr first"
    for row in rows:
        for ref in row["references"]:
            assert f"<li>{html.escape(ref)}</li>" in page
    assert "legend" in page


def test_page_is_self_contained(tmp_path):
    page = write_report(tmp_path / "out", make_rows(tmp_path / "images"), METRICS).read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "no external resources"
    assert "<link" not in page and "@import" not in page and "url(" not in page
    for src in re.findall(r'<img [^>]*src="([^"]+)"', page):
        assert not src.startswith("/") and (tmp_path / "out" / src).is_file()


def test_thumbnails_are_small_jpegs_and_unreadable_images_get_placeholders(tmp_path):
    rows = make_rows(tmp_path / "images")
    page = write_report(tmp_path / "out", rows, METRICS).read_text()

    thumbs = sorted((tmp_path / "out" / "thumbs").glob("*.jpg"))
    assert [t.name for t in thumbs] == ["100.jpg", "101.jpg", "102.jpg", "103.jpg"]
    for thumb in thumbs:
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and max(im.size) <= THUMB_SIZE
    with Image.open(tmp_path / "out" / "thumbs" / "100.jpg") as im:
        assert im.size == (256, 171)  # 900x600 scaled to 256 on its long side
    assert page.count('class="placeholder"') == 2
    assert page.count('<img class="thumb"') == 4 and page.count('loading="lazy"') == 4


def test_writing_the_thumbnails_shows_a_progress_bar(tmp_path, capsys):
    """Thousands of thumbnails take half a minute: with `progress` a bar counts them on stderr."""
    rows = make_rows(tmp_path / "images")
    write_report(tmp_path / "out", rows, METRICS, progress=True)
    err = capsys.readouterr().err
    assert "writing report thumbnails" in err and f"{len(rows)}/{len(rows)}" in err
    write_report(tmp_path / "quiet", rows, METRICS)
    assert capsys.readouterr().err == ""


def test_rewriting_a_report_replaces_it(tmp_path):
    rows = make_rows(tmp_path / "images")
    write_report(tmp_path / "out", rows, METRICS)
    rows[0]["caption"] = "a second version"
    page = write_report(tmp_path / "out", rows, METRICS, title="second").read_text()
    assert "a second version" in page and "<title>second</title>" in page
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "thumbs"]


# --------------------------------------------------------------------------------------------- real browser

def test_without_a_browser_the_browser_test_skips_saying_why(tmp_path, monkeypatch):
    for name in ("CAPTUNE_SKIP_BROWSER", "CAPTUNE_BROWSER", "CAPTUNE_REQUIRE_BROWSER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium, chrome, ... on it
    with pytest.raises(pytest.skip.Exception, match="no headless browser to render the page") as skipped:
        find_chromium()
    assert "apt-get install chromium" in str(skipped.value) and "CAPTUNE_BROWSER" in str(skipped.value)

    monkeypatch.setenv("CAPTUNE_REQUIRE_BROWSER", "1")  # CI: a missing browser fails
    with pytest.raises(pytest.fail.Exception, match="no headless browser"):
        find_chromium()
    monkeypatch.setenv("CAPTUNE_BROWSER", str(tmp_path / "my-chrome"))
    with pytest.raises(pytest.fail.Exception, match="CAPTUNE_BROWSER=.*my-chrome not found"):
        find_chromium()


@pytest.mark.slow
def test_chromium_renders_every_readable_thumbnail(tmp_path):
    chromium = find_chromium()
    # enough cards to reach far below the first screen, where lazy images start unloaded
    rows = make_rows(tmp_path / "images", readable=24)
    page = write_report(tmp_path / "out", rows, METRICS)
    assert render(chromium, tmp_path / "profile", page, tmp_path / "shot.png") == 24
