"""captune.data.samples: every training data format, the image and length checks, and the tutorial's annotation files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captune.data.check import (
    check_lengths,
    check_samples,
    data_check_command,
    tile_counts,
)
from captune.data.coco import data_coco_command, write_coco_annotations
from captune.data.layout import TUTORIAL_JSONL
from captune.data.lengths import Lengths
from captune.data.problems import (
    EMPTY_CAPTION,
    MALFORMED_ENTRY,
    MALFORMED_LINE,
    MISSING_IMAGE,
    OVER_LONG,
    TRUNCATED_IMAGE,
    UNENCODABLE,
    UNREADABLE_IMAGE,
    Problems,
    format_problems,
)
from captune.data.samples import Sample, read_training_data
from captune.data.table import SampleTable
from captune.errors import CaptuneError
from captune.inputs.processor import DEFAULT_QUESTION, Processor
from captune.inputs.templates import get_template

QUESTION = "Describe the image briefly."


def write_jpeg(path: Path, size=(64, 48), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def internvl_line(i: int, image: str, caption: str, question: str = QUESTION) -> dict:
    return {"id": i, "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": caption}]}


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    """A tiny data/coco: good images (one wide, 3 tiles + thumbnail), a missing one, a truncated one, a text file."""
    root = tmp_path / "coco"
    write_jpeg(root / "train2014" / "a.jpg", size=(48, 48), seed=1)  # one tile
    write_jpeg(root / "train2014" / "b.jpg", size=(1344, 448), seed=2)
    write_jpeg(root / "val2014" / "c.jpg", seed=3)
    truncated = write_jpeg(root / "train2014" / "trunc.jpg", seed=4)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (root / "train2014" / "text.jpg").write_text("not an image")
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def test_internvl_jsonl_resolves_images_against_the_parent_folder(coco: Path):
    jsonl = write_jsonl(coco / "annotations" / "train.jsonl", [
        internvl_line(0, "train2014/a.jpg", "A cat."),
        internvl_line(1, "train2014/b.jpg", "  A wide dog.  "),
    ])
    report = read_training_data(jsonl)
    assert [s.caption for s in report.samples] == ["A cat.", "  A wide dog.  "]  # InternVL values as given
    assert [s.image for s in report.samples] == [coco / "train2014" / "a.jpg", coco / "train2014" / "b.jpg"]
    assert all(s.image.is_absolute() for s in report.samples)
    assert [s.question for s in report.samples] == [QUESTION, QUESTION]
    assert report.samples[0].conversations[0] == {"from": "human", "value": f"<image>\n{QUESTION}"}
    assert report.problems.total == 0


def test_explicit_image_root_wins(coco: Path, tmp_path: Path):
    jsonl = write_jsonl(tmp_path / "elsewhere" / "train.jsonl", [internvl_line(0, "a.jpg", "A cat.")])
    report = read_training_data(jsonl, image_root=coco / "train2014")
    assert report.samples[0].image == coco / "train2014" / "a.jpg"


def test_relative_image_root_becomes_absolute(coco: Path, monkeypatch):
    jsonl = write_jsonl(coco / "train.jsonl", [internvl_line(0, "a.jpg", "A cat.")])
    monkeypatch.chdir(coco)
    report = read_training_data("train.jsonl", image_root="train2014")
    assert report.samples[0].image == coco / "train2014" / "a.jpg"
    assert jsonl.is_file()


def test_simple_jsonl(coco: Path):
    jsonl = write_jsonl(coco / "captions.jsonl", [
        {"image": "train2014/a.jpg", "caption": "A cat. "},
        {"image": "val2014/c.jpg", "caption": "A bird."},
    ])
    report = read_training_data(jsonl)
    assert [s.caption for s in report.samples] == ["A cat.", "A bird."]
    assert [s.question for s in report.samples] == [DEFAULT_QUESTION] * 2
    assert [s.image for s in report.samples] == [coco / "train2014" / "a.jpg", coco / "val2014" / "c.jpg"]


def test_coco_captions_file_finds_train2014(coco: Path):
    path = coco / "annotations" / "captions_train2014.json"
    path.parent.mkdir()
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A cat.", "id": 10},
                        {"image_id": 2, "caption": "A dog.\n", "id": 11},
                        {"image_id": 1, "caption": "Another cat.", "id": 12},
                        {"image_id": 9, "caption": "?", "id": 13}],
    }))
    report = read_training_data(path)
    assert [s.caption for s in report.samples] == ["A cat.", "A dog.", "Another cat."]
    assert [s.image.name for s in report.samples] == ["a.jpg", "b.jpg", "a.jpg"]
    assert report.samples[0].image == coco / "train2014" / "a.jpg"
    assert report.samples[0].question == DEFAULT_QUESTION
    assert report.problems.counts == {MALFORMED_ENTRY: 1}
    assert "annotations[3]" in report.problems.examples[MALFORMED_ENTRY][0]


def karpathy_data() -> dict:
    def image(cocoid, split, folder, name, sentences):
        return {"filepath": folder, "filename": name, "split": split, "cocoid": cocoid,
                "sentences": [{"raw": s, "tokens": s.lower().split()} for s in sentences]}

    return {"dataset": "coco", "images": [
        image(1, "train", "train2014", "a.jpg", ["A cat.", "A cat sitting."]),
        image(2, "restval", "train2014", "b.jpg", ["A wide dog. "]),
        image(3, "val", "val2014", "c.jpg", ["A val bird."]),
        image(391895, "test", "val2014", "COCO_val2014_000000391895.jpg", ["A man on a bike.", "A cyclist."]),
        image(4, "test", "val2014", "c.jpg", ["A bird."]),
    ]}


def test_karpathy_takes_train_and_restval(coco: Path):
    path = coco / "dataset_coco.json"
    path.write_text(json.dumps(karpathy_data()))
    report = read_training_data(path)
    assert [s.caption for s in report.samples] == ["A cat.", "A cat sitting.", "A wide dog."]
    assert [s.image for s in report.samples] == [coco / "train2014" / "a.jpg"] * 2 + [coco / "train2014" / "b.jpg"]
    assert report.samples[0].question == DEFAULT_QUESTION


def test_lavis_style_json_list(coco: Path):
    path = coco / "coco_karpathy_train.json"
    path.write_text(json.dumps([{"image": "train2014/a.jpg", "caption": "A cat.", "image_id": "1"}, {"caption": "x"}]))
    report = read_training_data(path)
    assert [s.caption for s in report.samples] == ["A cat."]
    assert report.problems.counts == {MALFORMED_ENTRY: 1}


def write_meta(path: Path, datasets: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(datasets))
    return path


def test_meta_file_relative_to_its_folder_and_repeat_time(coco: Path, tmp_path: Path, monkeypatch):
    write_jsonl(coco / "annotations" / "one.jsonl", [internvl_line(i, "train2014/a.jpg", f"c{i}") for i in range(4)])
    write_jsonl(coco / "annotations" / "two.jsonl", [internvl_line(0, "val2014/c.jpg", "bird")])
    meta = write_meta(tmp_path / "meta" / "meta.json", {
        "one": {"root": "../coco", "annotation": "../coco/annotations/one.jsonl", "data_augment": False,
                "repeat_time": 0.5, "length": 4},
        "two": {"root": "../coco/", "annotation": "../coco/annotations/two.jsonl", "repeat_time": 2, "length": 1},
    })
    cwd = tmp_path / "run" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # ../coco is not here: relative paths fall back to the meta file's folder
    report = read_training_data(meta)
    assert [s.caption for s in report.samples] == ["c0", "c1", "bird", "bird"]
    assert report.samples[0].image == coco / "train2014" / "a.jpg"
    assert report.samples[2].image == coco / "val2014" / "c.jpg"
    assert not report.notes


def test_meta_file_prefers_the_current_folder(coco: Path, tmp_path: Path, monkeypatch):
    # As InternVL's shell/data/coco_caption.json: paths relative to the folder training runs from.
    write_jsonl(coco / "annotations" / TUTORIAL_JSONL, [internvl_line(0, "train2014/a.jpg", "A cat.")])
    meta = write_meta(tmp_path / "shell" / "data" / "coco_caption.json", {"coco_karpathy_train_567k": {
        "root": "coco/", "annotation": "coco/annotations/coco_karpathy_train_567k.jsonl", "data_augment": False,
        "repeat_time": 1, "length": 2}})
    monkeypatch.chdir(tmp_path)
    report = read_training_data(meta)
    assert [s.image for s in report.samples] == [coco / "train2014" / "a.jpg"]
    assert any("meta says 2" in note for note in report.notes)


def test_meta_file_errors(coco: Path):
    meta = write_meta(coco / "bad.json", {"x": {"root": ".", "annotation": "nowhere.jsonl"}})
    with pytest.raises(CaptuneError, match="nowhere.jsonl not found") as e:
        read_training_data(meta)
    assert e.value.path == meta
    write_jsonl(coco / "one.jsonl", [internvl_line(0, "train2014/a.jpg", "A cat.")])
    meta = write_meta(coco / "bad.json", {"x": {"root": ".", "annotation": "one.jsonl", "repeat_time": 1.5}})
    with pytest.raises(CaptuneError, match="whole number"):
        read_training_data(meta)


def test_folder_tutorial_layout(coco: Path):
    write_jsonl(coco / "annotations" / TUTORIAL_JSONL, [internvl_line(0, "train2014/a.jpg", "A cat.")])
    write_jsonl(coco / "annotations" / "other.jsonl", [internvl_line(0, "train2014/b.jpg", "Other.")])
    report = read_training_data(coco)
    assert [(s.image, s.caption) for s in report.samples] == [(coco / "train2014" / "a.jpg", "A cat.")]


def test_folder_single_jsonl_or_meta(coco: Path, tmp_path: Path):
    data = tmp_path / "mine"
    write_jsonl(data / "train.jsonl", [{"image": str(coco / "train2014" / "a.jpg"), "caption": "A cat."}])
    assert [s.caption for s in read_training_data(data).samples] == ["A cat."]
    # A meta file beside its jsonl wins: it names the image root.
    write_jsonl(data / "rel.jsonl", [{"image": "a.jpg", "caption": "Rooted."}])
    write_meta(data / "meta.json", {"d": {"root": str(coco / "train2014"), "annotation": str(data / "rel.jsonl")}})
    report = read_training_data(data)
    assert [(s.image, s.caption) for s in report.samples] == [(coco / "train2014" / "a.jpg", "Rooted.")]
    (data / "meta.json").unlink()
    with pytest.raises(CaptuneError, match="several candidate"):
        read_training_data(data)
    with pytest.raises(CaptuneError, match="no training data found"):
        read_training_data(coco)


def test_malformed_lines_and_empty_captions_are_counted_and_skipped(coco: Path):
    good = internvl_line(0, "train2014/a.jpg", "A cat.")
    jsonl = write_jsonl(coco / "bad.jsonl", [
        good,
        "{not json",
        {"id": 2, "conversations": good["conversations"]},  # no image
        {"id": 3, "image": "train2014/a.jpg", "conversations": [{"from": "gpt", "value": "x"},
                                                                {"from": "human", "value": "<image>\nq"}]},
        internvl_line(4, "train2014/a.jpg", "A cat.", question="no placeholder") | {
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]},
        internvl_line(5, "train2014/a.jpg", "   "),
        {"image": "train2014/a.jpg", "caption": ""},
        "",
        internvl_line(8, "train2014/b.jpg", "A dog."),
    ])
    report = read_training_data(jsonl)
    assert [s.caption for s in report.samples] == ["A cat.", "A dog."]
    assert report.problems.counts == {MALFORMED_LINE: 4, EMPTY_CAPTION: 2}
    examples = report.problems.examples[MALFORMED_LINE]
    assert len(examples) == 3
    assert examples[0].startswith(f"{jsonl}:2: not valid JSON")
    assert examples[1].startswith(f"{jsonl}:3: ")
    assert "roles" in examples[2] and examples[2].startswith(f"{jsonl}:4: ")
    assert report.problems.examples[EMPTY_CAPTION][0].startswith(f"{jsonl}:6: ")
    text = format_problems(report.problems)
    assert text.startswith(f"4 malformed lines (e.g. {jsonl}:2: not valid JSON")
    assert "2 empty captions (e.g." in text


def test_a_line_that_is_not_utf8_is_one_malformed_line(coco: Path):
    jsonl = coco / "latin1.jsonl"
    good = json.dumps({"image": "train2014/a.jpg", "caption": "A cat."}).encode()
    latin1 = '{"image": "a.jpg", "caption": "caf\u00e9"}'.encode("latin-1")
    jsonl.write_bytes(b"\n".join([good, latin1, good]) + b"\n")
    report = read_training_data(jsonl)
    assert len(report.samples) == 2
    assert report.problems.examples[MALFORMED_LINE][0].startswith(f"{jsonl}:2: not valid JSON")


def test_unknown_format_and_unreadable_file(tmp_path: Path):
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"hello": 1}))
    with pytest.raises(CaptuneError, match="unknown training data format") as e:
        read_training_data(odd)
    assert e.value.path == odd
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(CaptuneError, match="not valid JSON") as e:
        read_training_data(broken)
    assert e.value.path == broken
    with pytest.raises(CaptuneError, match="no such file"):
        read_training_data(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CaptuneError, match="no training samples"):
        read_training_data(empty)


# ---------------------------------------------------------------------------------------------------------------------
# Checking


def mixed_samples(coco: Path) -> list[Sample]:
    def sample(name: str, caption: str) -> Sample:
        turns = ({"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": caption})
        return Sample(coco / "train2014" / name, turns)

    return [sample("a.jpg", "a1"), sample("missing.jpg", "m1"), sample("b.jpg", "b1"), sample("trunc.jpg", "t1"),
            sample("text.jpg", "x1"), sample("a.jpg", "a2"), sample("trunc.jpg", "t2"), sample("b.jpg", "b2")]


def test_check_samples_with_decoding(coco: Path):
    report = check_samples(mixed_samples(coco), decode_images=True, progress=False)
    assert [s.caption for s in report.samples] == ["a1", "b1", "a2", "b2"]
    assert report.problems.counts == {MISSING_IMAGE: 1, TRUNCATED_IMAGE: 1, UNREADABLE_IMAGE: 1}  # once per image
    assert report.problems.examples[TRUNCATED_IMAGE] == [f"{coco / 'train2014' / 'trunc.jpg'}: truncated image"]
    assert "text.jpg" in report.problems.examples[UNREADABLE_IMAGE][0]


def test_check_samples_header_only(coco: Path):
    report = check_samples(mixed_samples(coco), decode_images=False, progress=False)
    assert [s.caption for s in report.samples] == ["a1", "b1", "t1", "a2", "t2", "b2"]  # truncation goes unseen
    assert report.problems.counts == {MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1}


def test_lengths_over_the_limit_are_dropped(coco: Path):
    """Tile counts use the processor's geometry; samples over max_seq_length or unencodable are counted, not kept."""
    report = check_samples(mixed_samples(coco), decode_images=True, progress=False)
    table = SampleTable.of(report.samples)
    tiles = tile_counts(table, report.sizes, Processor(None, get_template("internlm2-chat")), max_tiles=6)
    # b.jpg is 1344 x 448: a 3 x 1 grid plus the thumbnail; a.jpg is one tile.
    assert tiles.tolist() == [1, 4, 1, 4]
    assert tile_counts(table, report.sizes, Processor(None, get_template("internlm2-chat"), thumbnail=False),
                       max_tiles=6).tolist() == [1, 3, 1, 3]
    zeros = np.zeros(len(table), np.int64)
    lengths = Lengths(10 + 256 * tiles, zeros, zeros, {2: "too strange"}, True)
    problems = Problems()
    assert check_lengths(table, lengths, 1000, problems).tolist() == [0]
    assert problems.counts == {UNENCODABLE: 1, OVER_LONG: 2}
    assert "1034 tokens > max_seq_length 1000" in problems.examples[OVER_LONG][0]
    assert problems.examples[UNENCODABLE] == [f"{coco / 'train2014' / 'a.jpg'}: too strange"]


def test_check_samples_workers_agree(coco: Path):
    samples = mixed_samples(coco)
    serial = check_samples(samples, decode_images=True, workers=0, progress=False)
    parallel = check_samples(samples, decode_images=True, workers=2, progress=False)
    assert parallel.samples == serial.samples
    assert parallel.problems == serial.problems


def test_problems_keep_three_examples_and_merge():
    a, b = Problems(), Problems()
    for i in range(5):
        a.add(MISSING_IMAGE, f"m{i}")
    b.add(MISSING_IMAGE, "x")
    b.add(OVER_LONG, "y")
    a.update(b)
    assert a.counts == {MISSING_IMAGE: 6, OVER_LONG: 1}
    assert a.examples[MISSING_IMAGE] == ["m0", "m1", "m2"]
    assert a.total == 7
    assert format_problems(a) == "6 missing images (e.g. m0; m1; m2), 1 over-long sample (e.g. y)"
    assert format_problems(Problems()) == "no problems"


# ---------------------------------------------------------------------------------------------------------------------
# The tutorial's annotation files and the commands


def test_write_coco_annotations_round_trip(coco: Path, tmp_path: Path):
    from pycocotools.coco import COCO

    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(karpathy_data()))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="1 of 4 images"):  # COCO_val2014_000000391895.jpg isn't there
        paths = write_coco_annotations(karpathy, coco, out)
    assert set(paths) == {"train", "test", "test_gt", "meta"}

    lines = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert [line["id"] for line in lines] == [0, 1, 2]
    assert lines[0] == {"id": 0, "image": "train2014/a.jpg", "conversations": [
        {"from": "human", "value": f"<image>\n{DEFAULT_QUESTION}"}, {"from": "gpt", "value": "A cat."}]}
    report = read_training_data(paths["train"], image_root=coco)
    assert [s.caption for s in report.samples] == ["A cat.", "A cat sitting.", "A wide dog."]
    assert [s.image for s in report.samples] == [coco / "train2014" / "a.jpg"] * 2 + [coco / "train2014" / "b.jpg"]
    via_meta = read_training_data(paths["meta"])
    assert via_meta.samples == report.samples
    assert json.loads(paths["meta"].read_text())["coco_karpathy_train_567k"]["length"] == 3

    test = json.loads(paths["test"].read_text())
    assert test == [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man on a bike.", "A cyclist."]},
                    {"image": "val2014/c.jpg", "caption": ["A bird."]}]
    gt = COCO(str(paths["test_gt"]))
    assert sorted(gt.getImgIds()) == [4, 391895]
    captions = sorted(a["caption"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[391895])))
    assert captions == ["A cyclist.", "A man on a bike."]
    assert sorted(gt.getAnnIds()) == [1, 2, 3]
    result = gt.loadRes([{"image_id": 391895, "caption": "a man"}])
    assert result.getImgIds() == [391895]


def test_write_coco_annotations_rejects_other_files(tmp_path: Path):
    other = tmp_path / "other.json"
    other.write_text("[]")
    with pytest.raises(CaptuneError, match="dataset_coco.json"):
        write_coco_annotations(other, tmp_path, tmp_path / "out")


def test_data_coco_command(coco: Path, tmp_path: Path, capsys):
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(karpathy_data()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data_coco_command(karpathy, coco, coco / "annotations")
    assert "(3 training captions)" in capsys.readouterr().out
    assert (coco / "annotations" / "coco_karpathy_test_gt.json").is_file()
    # The tutorial's folder layout now reads directly.
    assert [s.caption for s in read_training_data(coco).samples] == ["A cat.", "A cat sitting.", "A wide dog."]


def test_data_coco_command_says_what_it_is_doing(coco: Path, tmp_path: Path, capsys):
    """The full dataset_coco.json takes seconds to read, convert and look up (123k images): each step is said, and
    the countable ones show a bar on stderr."""
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(karpathy_data()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data_coco_command(karpathy, coco, tmp_path / "annotations")
    captured = capsys.readouterr()
    assert f"reading {karpathy}" in captured.out and "writing 3 training captions" in captured.out
    images = len(karpathy_data()["images"])
    assert "converting captions" in captured.err and f"{images}/{images}" in captured.err
    assert f"looking for the images in {coco}" in captured.err


def test_data_check_command(coco: Path, capsys):
    jsonl = write_jsonl(coco / "annotations" / "coco_karpathy_train_567k.jsonl", [
        internvl_line(0, "train2014/a.jpg", "A cat."),
        internvl_line(1, "train2014/trunc.jpg", "Cut."),
        "{oops",
        internvl_line(3, "train2014/b.jpg", "A dog."),
    ])
    assert data_check_command(coco, num_workers=0) == 2
    out = capsys.readouterr().out
    assert "3 samples read" in out
    assert f"1 malformed line (e.g. {jsonl}:3: not valid JSON" in out
    assert "1 truncated image" in out
    assert "note: lengths not checked against --max-seq-length 4096: --model MODEL counts the tokens" in out
    assert "2 samples OK" in out


def test_an_image_root_that_is_not_there_is_one_error(coco: Path, tmp_path):
    with pytest.raises(CaptuneError, match=r"nowhere: the image folder \(--image-root\): no such folder"):
        data_check_command(coco, image_root=tmp_path / "nowhere", num_workers=0)


def test_data_check_measures_lengths_with_the_models_geometry(tmp_path, capsys):
    """The shipped demo model tiles 112 px images into 16 tokens a tile: its samples fit 512 tokens, which 448 px
    tiles of 256 tokens (an assumption that once stood in for every model) would not."""
    from captune.data.synthetic import make_synthetic_dataset
    from captune.demo.demo import base_model_path

    make_synthetic_dataset(tmp_path / "data", train=4, test=1, seed=0, image_size=(448, 224))
    problems = data_check_command(tmp_path / "data", model=base_model_path(), max_seq_length=512, num_workers=0)
    out = capsys.readouterr().out
    assert problems == 0, out
    assert "lengths not checked" not in out


def test_image_check_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    """A resume (or a second process) only stats the images: unchanged files are not opened again, a changed one is."""
    import PIL.Image

    from captune.data.check import check_samples

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        Image.new("RGB", (40 + i, 30), (i * 50, 0, 0)).save(paths[-1])
    paths.append(tmp_path / "missing.jpg")  # reported, and looked for again next time
    samples = [Sample(p, ({"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "c"})) for p in paths]
    opened = []
    real_open = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    cache = tmp_path / "run" / "image_check.json"
    first = check_samples(samples, decode_images=False, progress=False, cache=cache)
    assert len(opened) == 4 and len(first.samples) == 3 and first.problems.counts == {"missing image": 1}
    opened.clear()
    again = check_samples(samples, decode_images=False, progress=False, cache=cache)
    assert opened == [] and again.samples == first.samples and again.problems.counts == {"missing image": 1}
    paths[1].write_bytes(paths[1].read_bytes()[:100])  # truncated: its size changes
    changed = check_samples(samples, decode_images=False, progress=False, cache=cache)
    assert opened == [str(paths[1])]
    assert [s.image for s in changed.samples] == [paths[0], paths[2]]
    opened.clear()
    check_samples(samples, decode_images=True, progress=False, cache=cache)  # a header check does not stand for decoding
    assert len(opened) == 4


def test_a_process_that_does_not_own_the_image_check_cache_only_reads_it(tmp_path):
    """Under torchrun only global rank 0 writes the run folder: another process (on another node, with its own copy of
    the images: other modification times) checks the images itself but leaves rank 0's cache as it is."""
    import os

    from captune.data.check import check_samples

    image = tmp_path / "0.jpg"
    Image.new("RGB", (40, 30), (200, 0, 0)).save(image)
    samples = [Sample(image, ({"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "c"}))]
    cache = tmp_path / "run" / "image_check.json"
    check_samples(samples, decode_images=False, progress=False, cache=cache, update_cache=False)
    assert not cache.exists()
    check_samples(samples, decode_images=False, progress=False, cache=cache)
    written = cache.read_text()
    os.utime(image, ns=(1, 1))  # another node's copy of the same image
    other = check_samples(samples, decode_images=False, progress=False, cache=cache, update_cache=False)
    assert len(other.samples) == 1 and cache.read_text() == written
