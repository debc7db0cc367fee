"""Caption training data: read it in any of the usual COCO forms.

InternVL's COCO Caption tutorial trains from `coco_karpathy_train_567k.jsonl` (one conversation per caption), listed
in a meta file like shell/data/coco_caption.json. People arrive with that, with COCO's own `captions_train2014.json`,
with Karpathy's `dataset_coco.json` or with a plain `{"image", "caption"}` jsonl. `read_training_data` turns each of
them into one list of `Sample`s (absolute image paths, InternVL conversations); a bad line is counted and skipped
rather than stopping a run hours in (`problems.py`); `check.py` then looks at every image and length.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captune.data.layout import TUTORIAL_JSONL
from captune.data.problems import (
    EMPTY_CAPTION,
    MALFORMED_ENTRY,
    MALFORMED_LINE,
    Problems,
    SkipRecord,
)
from captune.errors import CaptuneError
from captune.fileio import read_json
from captune.inputs.processor import DEFAULT_QUESTION

IMAGE_PLACEHOLDER = "<image>"
TRAIN_SPLITS = ("train", "restval")

_META_MAX_BYTES = 1_000_000  # meta files are tiny; don't parse a 140 MB dataset_coco.json to find out it isn't one


@dataclass(frozen=True, slots=True)  # slots: 566k of them
class Sample:
    """One training sample: an absolute image path and an InternVL conversation (human with `<image>`, then gpt)."""

    image: Path
    conversations: tuple[dict, ...]

    @property
    def question(self) -> str:
        human = next(turn["value"] for turn in self.conversations if turn["from"] == "human")
        return human.replace(IMAGE_PLACEHOLDER, "", 1).strip()

    @property
    def caption(self) -> str:
        return next(turn["value"] for turn in self.conversations if turn["from"] == "gpt")


@dataclass
class DataReport:
    samples: list[Sample]
    problems: Problems
    notes: list[str] = field(default_factory=list)  # guesses worth telling the user (image root not found...)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_training_data(data: str | Path, image_root: str | Path | None = None) -> DataReport:
    """Read training samples from a meta .json, a jsonl (InternVL or {"image", "caption"}), a COCO captions file,
    Karpathy's dataset_coco.json (splits train + restval), a LAVIS-style JSON list, or a folder holding one of them.

    `image_root` overrides where image paths are relative to (for a meta file: every dataset's root). Captions that
    captune builds a conversation for are stripped; InternVL conversations are kept as given.
    """
    path = Path(data)
    root = Path(image_root) if image_root is not None else None
    if not path.exists():
        raise CaptuneError("no such file or folder", path)
    if root is not None and not root.is_dir():
        raise CaptuneError("the image folder (--image-root): no such folder", root)
    if path.is_dir():
        path, root = _find_in_folder(path, root)
    report = DataReport([], Problems())
    with _gc_paused():
        _read_file(path, root, report)
    if not report.samples and not report.problems.total:
        raise CaptuneError("no training samples in this file", path)
    return report


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Half a million new containers would set off the cyclic garbage collector over and over (a third of the
    reading time); reading makes no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _find_in_folder(folder: Path, root: Path | None) -> tuple[Path, Path | None]:
    """The tutorial's DIR/annotations/coco_karpathy_train_567k.jsonl, else the one meta json or jsonl in
    DIR/annotations or DIR."""
    tutorial = folder / "annotations" / TUTORIAL_JSONL
    if tutorial.is_file():
        return tutorial, root or folder
    for where in (folder / "annotations", folder):
        if not where.is_dir():
            continue
        metas = [p for p in sorted(where.glob("*.json")) if _is_meta_file(p)]
        jsonls = sorted(where.glob("*.jsonl"))
        for found in (metas, jsonls):  # a meta file also names the image root, so it wins over its jsonl
            if len(found) == 1:
                return found[0], root
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise CaptuneError(f"several candidate training files ({names}); name the one to use", where)
    raise CaptuneError(
        f"no training data found: expected annotations/{TUTORIAL_JSONL}, one .jsonl, or one meta .json", folder
    )


def _is_meta_file(path: Path) -> bool:
    try:
        if path.stat().st_size > _META_MAX_BYTES:
            return False
        return _is_meta(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _read_file(path: Path, root: Path | None, report: DataReport) -> None:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, root, report)
    try:
        data = read_json(path)
    except CaptuneError as e:
        if "Extra data" in str(e):  # several JSON values, one per line: a jsonl with another extension
            return _read_jsonl(path, root, report)
        raise
    if _is_meta(data):
        _read_meta(path, data, root, report)
    elif _is_coco_captions(data):
        _read_coco_captions(path, data, root, report)
    elif is_karpathy(data):
        _read_karpathy(path, data, root, report)
    elif isinstance(data, list):
        _read_records(path, ((f" item {i}", item) for i, item in enumerate(data)), MALFORMED_ENTRY, root, report)
    else:
        raise CaptuneError(
            "unknown training data format: expected an InternVL meta file, an InternVL or {\"image\", \"caption\"} "
            "jsonl, a COCO captions file (images + annotations) or Karpathy's dataset_coco.json",
            path,
        )


def _is_meta(data: Any) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "annotation" in v for v in data.values()))


def _is_coco_captions(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)


def is_karpathy(data: Any) -> bool:
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def caption_conversation(question: str, caption: str) -> tuple[dict, ...]:
    human = sys.intern(f"{IMAGE_PLACEHOLDER}\n{question}")
    return {"from": "human", "value": human}, {"from": "gpt", "value": caption}


def _caption(value: Any, name: str = "caption") -> str:
    if not isinstance(value, str):
        raise SkipRecord(MALFORMED_ENTRY, f'"{name}" must be a string')
    if not value.strip():
        raise SkipRecord(EMPTY_CAPTION, "empty caption")
    return value.strip()


def _check_conversations(turns: Any) -> tuple[dict, ...]:
    """An InternVL conversation: optional system turn, then human/gpt pairs, one `<image>` in the first human turn.

    The dicts are fresh from json.loads, so ours to keep; every line asks the same question, so it shares one string.
    """
    if type(turns) is list and len(turns) == 2:  # the common case, checked quickly (566k lines)
        human, gpt = turns
        if type(human) is dict and type(gpt) is dict and human.get("from") == "human" and gpt.get("from") == "gpt":
            question, answer = human.get("value"), gpt.get("value")
            if (type(question) is str and type(answer) is str and question.count(IMAGE_PLACEHOLDER) == 1
                    and IMAGE_PLACEHOLDER not in answer and answer.strip()):
                human["value"] = sys.intern(question)
                return human, gpt
    return _check_any_conversation(turns)


def _check_any_conversation(turns: Any) -> tuple[dict, ...]:
    if not isinstance(turns, list) or not turns:
        raise SkipRecord(MALFORMED_LINE, '"conversations" must be a non-empty list')
    roles, images, first_human = [], 0, None
    for turn in turns:
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise SkipRecord(MALFORMED_LINE, 'every turn needs string "from" and "value"')
        roles.append(turn["from"])
        images += turn["value"].count(IMAGE_PLACEHOLDER)
        if turn["from"] == "human" and first_human is None:
            first_human = turn
    body = roles[1:] if roles[0] == "system" else roles
    if not body or len(body) % 2 or body != ["human", "gpt"] * (len(body) // 2):
        raise SkipRecord(MALFORMED_LINE, f"roles {roles}: expected human, gpt alternating")
    if IMAGE_PLACEHOLDER not in first_human["value"]:
        raise SkipRecord(MALFORMED_LINE, f"no {IMAGE_PLACEHOLDER} in the first human turn")
    if images != 1:
        raise SkipRecord(MALFORMED_LINE, f"more than one {IMAGE_PLACEHOLDER}")
    if any(turn["from"] == "gpt" and not turn["value"].strip() for turn in turns):
        raise SkipRecord(EMPTY_CAPTION, "empty caption")
    first_human["value"] = sys.intern(first_human["value"])
    return tuple(turns)


def _parse_record(record: Any, malformed: str) -> tuple[str, tuple[dict, ...]]:
    """(relative image path, conversation) of one jsonl line or JSON list item."""
    try:
        if not isinstance(record, dict):
            raise SkipRecord(MALFORMED_LINE, "not a JSON object")
        image = record.get("image")
        if not isinstance(image, str) or not image.strip():
            raise SkipRecord(MALFORMED_LINE, 'no "image" (a path string)')
        if "conversations" in record:
            return image, _check_conversations(record["conversations"])
        if "caption" in record:
            return image, caption_conversation(DEFAULT_QUESTION, _caption(record["caption"]))
        raise SkipRecord(MALFORMED_LINE, 'neither "conversations" nor "caption"')
    except SkipRecord as e:
        # The helpers speak of lines; in a JSON list the same problems are malformed entries.
        raise SkipRecord(malformed if e.kind in (MALFORMED_LINE, MALFORMED_ENTRY) else e.kind, e.reason) from None


def _read_jsonl(path: Path, root: Path | None, report: DataReport) -> None:
    try:
        with open(path, "rb") as f:  # bytes: a line that isn't UTF-8 is one malformed line, not an unreadable file
            _read_records(path, _jsonl_records(path, f, report), MALFORMED_LINE, root, report)
    except OSError as e:
        raise CaptuneError(f"cannot read: {e}", path) from None


def _jsonl_records(path: Path, lines: Iterable[bytes], report: DataReport) -> Iterator[tuple[str, Any]]:
    """(location, parsed line) of each non-blank line; the location is "file:line"."""
    for lineno, line in enumerate(lines, 1):
        if line.isspace() or not line:
            continue
        try:
            yield lineno, json.loads(line.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            report.problems.add(MALFORMED_LINE, f"{path}:{lineno}: not valid JSON ({e})")


def _read_records(path: Path, records: Iterable[tuple[int | str, Any]], malformed: str, root: Path | None,
                  report: DataReport) -> None:
    """InternVL or {"image", "caption"} records; images relative to `root`, else the file's folder or its parent.

    `records` are (line number, or location such as " item 3", parsed record), named in problems after the file.
    """
    samples = _SampleMaker(path, report, root, [path.parent, path.parent.parent])
    for where, record in records:
        try:
            samples.add(*_parse_record(record, malformed))
        except SkipRecord as e:
            report.problems.add(e.kind, f"{path}:{where}: {e.reason}")


def _guess_root(path: Path, candidates: Sequence[Path], first_image: str, report: DataReport) -> Path:
    """The first candidate folder in which the first image exists; else the first candidate, with a note."""
    for candidate in candidates:
        if (candidate / first_image).exists():
            return candidate
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    report.notes.append(f"{path}: image {first_image} not found under {tried}; assuming {candidates[0]} "
                        "(--image-root names another folder)")
    return candidates[0]


class _SampleMaker:
    """Appends samples to a report, image paths made absolute against `root`, else against the first candidate
    folder in which the first image exists."""

    def __init__(self, source: Path, report: DataReport, root: Path | None, candidates: Sequence[Path]):
        self.source, self.report, self.candidates = source, report, candidates
        self.root = None if root is None else str(root)
        self.paths: dict[str, Path] = {}  # the captions of one image share one Path

    def add(self, image: str, conversations: tuple[dict, ...]) -> None:
        if self.root is None:
            self.root = str(_guess_root(self.source, self.candidates, image, self.report))
        absolute = self.paths.get(image)
        if absolute is None:
            absolute = self.paths[image] = Path(os.path.abspath(os.path.join(self.root, image)))
        self.report.samples.append(Sample(absolute, conversations))


def _read_coco_captions(path: Path, data: dict, root: Path | None, report: DataReport) -> None:
    """COCO's captions_*.json: one sample per annotation, asked DEFAULT_QUESTION."""
    files: dict[Any, str] = {}
    for i, image in enumerate(data["images"]):
        if isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str):
            files[image["id"]] = image["file_name"]
        else:
            report.problems.add(MALFORMED_ENTRY, f'{path}: images[{i}]: needs "id" and "file_name"')
    folder = path.parent
    samples = _SampleMaker(path, report, root, [folder, folder.parent / "train2014", folder.parent / "images"])
    for i, ann in enumerate(data["annotations"]):
        try:
            if not isinstance(ann, dict) or ann.get("image_id") not in files:
                raise SkipRecord(MALFORMED_ENTRY, '"image_id" missing or not in "images"')
            samples.add(files[ann["image_id"]], caption_conversation(DEFAULT_QUESTION, _caption(ann.get("caption"))))
        except SkipRecord as e:
            report.problems.add(e.kind, f"{path}: annotations[{i}]: {e.reason}")


def karpathy_image_path(image: Any) -> str:
    if not isinstance(image, dict) or not isinstance(image.get("filename"), str):
        raise SkipRecord(MALFORMED_ENTRY, 'needs "filename"')
    folder = image.get("filepath") or ""
    return f"{folder}/{image['filename']}" if folder else image["filename"]


def _read_karpathy(path: Path, data: dict, root: Path | None, report: DataReport) -> None:
    """Karpathy's dataset_coco.json: splits train + restval, one sample per sentence (566,747 for COCO)."""
    samples = _SampleMaker(path, report, root, [path.parent, path.parent.parent])
    for i, image in enumerate(data["images"]):
        try:
            if not isinstance(image, dict) or image.get("split") not in TRAIN_SPLITS:
                continue
            rel = karpathy_image_path(image)
            sentences = image.get("sentences")
            if not isinstance(sentences, list):
                raise SkipRecord(MALFORMED_ENTRY, '"sentences" must be a list')
        except SkipRecord as e:
            report.problems.add(e.kind, f"{path}: images[{i}]: {e.reason}")
            continue
        for j, sentence in enumerate(sentences):
            try:
                raw = sentence.get("raw") if isinstance(sentence, dict) else None
                samples.add(rel, caption_conversation(DEFAULT_QUESTION, _caption(raw, "raw")))
            except SkipRecord as e:
                report.problems.add(e.kind, f"{path}: images[{i}].sentences[{j}]: {e.reason}")


def _resolve(value: str, meta_dir: Path) -> Path:
    """A meta file's path: absolute as is; relative: the current folder first, then the meta file's folder."""
    p = Path(value)
    if p.is_absolute():
        return p
    for candidate in (Path.cwd() / p, meta_dir / p):
        if candidate.exists():
            return candidate
    return Path.cwd() / p


def _read_meta(path: Path, meta: dict, root: Path | None, report: DataReport) -> None:
    """InternVL's meta file: {name: {root, annotation, repeat_time, length, ...}}; datasets are concatenated."""
    for name, entry in meta.items():
        annotation = entry.get("annotation")
        if not isinstance(annotation, str) or not annotation:
            raise CaptuneError(f'dataset {name!r}: "annotation" must be a path', path)
        annotation_path = _resolve(annotation, path.parent)
        if not annotation_path.is_file():
            raise CaptuneError(f"dataset {name!r}: annotation {annotation} not found (looked in the current folder "
                               f"and in {path.parent})", path)
        dataset_root = root
        if dataset_root is None and entry.get("root"):
            dataset_root = _resolve(str(entry["root"]), path.parent)
            if not dataset_root.is_dir():
                report.notes.append(f"{path}: dataset {name!r}: image root {entry['root']} not found")
        part = DataReport([], report.problems, report.notes)
        _read_file(annotation_path, dataset_root, part)
        length = entry.get("length")
        if isinstance(length, int) and length != len(part.samples):
            report.notes.append(f"{path}: dataset {name!r}: {len(part.samples)} samples read, meta says {length}")
        report.samples.extend(_repeat(part.samples, entry.get("repeat_time", 1), name, path))


def _repeat(samples: list[Sample], repeat_time: Any, name: str, path: Path) -> list[Sample]:
    """InternVL's repeat_time: below 1 keeps the first fraction, a whole number above 1 repeats the list."""
    if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or repeat_time <= 0:
        raise CaptuneError(f"dataset {name!r}: repeat_time must be a positive number, not {repeat_time!r}", path)
    if repeat_time < 1:
        return samples[: int(len(samples) * repeat_time)]
    if repeat_time != int(repeat_time):
        raise CaptuneError(f"dataset {name!r}: repeat_time above 1 must be a whole number, not {repeat_time}", path)
    return samples * int(repeat_time)
