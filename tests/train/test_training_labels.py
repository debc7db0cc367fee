"""The training data path of `captune train` against the original trainer's samples (fixtures).

What is under test is the path `train()` takes, piece by piece: `load_training_data` (read, check, group, measure),
the model's processor (its template read from the model's config.json), the dataset (`CaptionDataset`: image groups
with shared prefixes, one caption each without), `Collate`, and `CaptionLoss`. The data are
the fixtures' conversations; the image is one that InternVL2's tiling cuts into 7 tiles at max 6 (6 + thumbnail),
as the fixtures' 1,792 image tokens (7 x 256).

- tokenization_reference.json `train[i]`: the original `preprocess_internlm` (internlm2-chat) on InternLM2's
  tokenizer: the 2B miniature's own template and tokenizer.
- template_labels_reference.json: the original `preprocess_mpt` (Hermes-2) and `preprocess_internvl2_5`: the same
  miniature with its config's template changed (a copy in tmp_path).

With shared prefixes one row holds the prompt once and one branch per caption; each caption's sequence is
rebuilt from the row (its group's prefix + its branch) and must be the original's sample up to its last
supervised token, with the original's labels moved one to the left as its targets.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import captune
from captune.inputs.templates import IGNORE_INDEX
from captune.internvl.lora import add_lora, init_lora_weights
from captune.train import config as cfg
from captune.train.collate import (
    Collate,
    PrefixSharing,
    TrainBatch,
    shift_labels,
    split_prefix,
)
from captune.train.dataset import CaptionDataset, load_training_data
from captune.train.loss import CaptionLoss
from captune.train.parallel import trainable_to_float32
from captune.train.runlog import RunLog

IMAGE = "scene_640x427.jpg"  # 640 x 427 at max 6 tiles: 3 x 2 tiles + thumbnail = 7
MINI = "internvl2_2b_mini"


@pytest.fixture(scope="module")
def ref(fixtures):
    return json.loads((fixtures / "tokenization_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def template_ref(fixtures):
    return json.loads((fixtures / "template_labels_reference.json").read_text(encoding="utf-8"))


def settings(model: Path, data: Path, out: Path, share: str) -> cfg.TrainConfig:
    """The COCO recipe (max 6 tiles, max_seq_length 4096, its token budget), on the CPU in float32."""
    return cfg.resolve("internvl2_2b_coco_lora", {"model": str(model), "data": str(data), "out": str(out),
                                                  "share_prefix": share, "device": "cpu", "dtype": "fp32"})


def write_data(folder: Path, fixtures: Path, conversations: list[list[dict]]) -> Path:
    """An InternVL jsonl (one conversation per line, all on one image), as the tutorial's training file."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixtures / "tiling" / "images" / IMAGE, folder / IMAGE)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps({"image": IMAGE, "conversations": c}, ensure_ascii=False) + "\n"
                            for c in conversations), encoding="utf-8")
    return path


def model_with_template(fixtures: Path, folder: Path, template: str) -> Path:
    """A copy of the 2B miniature whose config.json names another template (the fixtures stay untouched)."""
    src = fixtures / "models" / MINI
    folder.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "config.json").chmod(0o644)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["template"] = template
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def training_items_and_batch(config: cfg.TrainConfig, processor, out: Path):
    """What train() builds from `config`: samples, the dataset's items (in dataset order) and one collated batch.

    On the way it checks that the schedule's length of every group is the length collation gives it."""
    data = load_training_data(config, processor, RunLog(out, enabled=False))
    dataset = CaptionDataset(data.table, data.groups, processor, config.max_tiles, config.max_seq_length)
    items = [dataset[i] for i in range(len(dataset))]
    if data.shared:
        collated = [split_prefix(it["encodings"]) for it in items]
        assert data.lengths.tolist() == [g.length if g else 0 for g in collated]
    else:
        assert data.lengths.tolist() == [len(it["encodings"][0]["input_ids"]) for it in items]
    batch, errors = Collate(processor.pad_token_id, data.shared, config.token_budget, static=False)(items)
    assert errors == []
    samples = [data.table[i] for i in range(len(data.table))]
    return samples, data.shared, items, batch.to(torch.device("cpu"), torch.float32)


def captions_of(batch: TrainBatch) -> list[dict[str, list[int]]]:
    """Each caption's own sequence as the model sees it: for a separate row, the row without padding; for a
    shared row, its group's prefix followed by its branch (in the order of the group's members)."""
    out = []
    for r in range(batch.input_ids.shape[0]):
        ids, targets, positions = batch.input_ids[r], batch.targets[r], batch.position_ids[r]
        mask = batch.attention_mask
        if not isinstance(mask, PrefixSharing):
            keep = mask[r].bool()
            out.append({"input_ids": ids[keep].tolist(), "targets": targets[keep].tolist(),
                        "positions": positions[keep].tolist()})
            continue
        doc, branch = mask.doc[r], mask.branch[r]
        for d in range(int(doc.max()) + 1):
            for k in range(1, int(branch[doc == d].max()) + 1):
                keep = (doc == d) & ((branch == 0) | (branch == k))
                out.append({"input_ids": ids[keep].tolist(), "targets": targets[keep].tolist(),
                            "positions": positions[keep].tolist()})
    return out


def last_supervised(labels: list[int]) -> int:
    return max(i for i, x in enumerate(labels) if x != IGNORE_INDEX)


def assert_matches_original(shared: bool, items: list[dict], batch: TrainBatch, expected: list[dict]) -> None:
    """The dataset's items and the collated batch hold exactly the original's input_ids and labels."""
    assert batch.num_captions == len(expected)
    assert batch.num_tokens == sum(sum(x != IGNORE_INDEX for x in e["labels"]) for e in expected)
    assert batch.pixel_values.shape[0] == 7 * len(items)
    if shared:
        assert len(items) == 1  # one image, one question: one group holding every caption
    else:
        assert all(len(it["encodings"]) == 1 for it in items)
    encodings = [e for it in items for e in it["encodings"]]
    # what the dataset tokenized, before collation: the original's sample, exactly
    assert [e["input_ids"] for e in encodings] == [e["input_ids"] for e in expected]
    assert [e["labels"] for e in encodings] == [e["labels"] for e in expected]

    captions = captions_of(batch)
    assert len(captions) == len(expected)
    for got, e in zip(captions, expected):
        if shared:  # up to the last supervised token (it predicts nothing: it is not in the row)
            end = last_supervised(e["labels"])
            want_ids, want_targets = e["input_ids"][:end], e["labels"][1 : end + 1]
            assert all(x == IGNORE_INDEX for x in e["labels"][end + 1 :])
        else:
            want_ids, want_targets = e["input_ids"], shift_labels(e["labels"])
        assert got["input_ids"] == want_ids
        assert got["targets"] == want_targets
        assert got["positions"] == list(range(len(want_ids)))  # as in a sample of its own


# --- internlm2-chat: the 2B miniature as it is ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mini(fixtures):
    model, processor = captune.load(fixtures / "models" / MINI, dtype="fp32")
    return model, processor


@pytest.fixture(scope="module", params=["off", "on"], ids=["separate", "shared"])
def internlm2_batch(request, fixtures, ref, mini, tmp_path_factory):
    _, processor = mini
    root = tmp_path_factory.mktemp("internlm2")
    data = write_data(root / "data", fixtures, [s["conversations"] for s in ref["train"]])
    config = settings(fixtures / "models" / MINI, data, root / "out", request.param)
    samples, shared, items, batch = training_items_and_batch(config, processor, root / "out")
    assert shared == (request.param == "on")
    return samples, shared, items, batch


def test_the_fixture_setting(fixtures, ref, mini):
    """The miniature's config names internlm2-chat (the fixture's template), its processor reads it, and the image
    gives the fixture's 7 tiles of 256 tokens."""
    _, processor = mini
    config = json.loads((fixtures / "models" / MINI / "config.json").read_text(encoding="utf-8"))
    assert config["template"] == processor.template.name == "internlm2-chat"
    assert processor.tokens_per_tile == ref["num_image_token"] == 256
    tiles = processor.tile(fixtures / "tiling" / "images" / IMAGE, 6).shape[0]
    assert tiles == ref["n_patches"] == 7
    assert all(s["num_image_tokens"] == tiles * processor.tokens_per_tile for s in ref["train"])


def test_training_data_matches_original(internlm2_batch, ref):
    """Every fixture caption (stripped, trailing space, leading spaces, Unicode, Chinese) trains on exactly the
    original's input_ids and labels, with shared prefixes and without."""
    samples, shared, items, batch = internlm2_batch
    assert [list(s.conversations) for s in samples] == [s["conversations"] for s in ref["train"]]
    assert_matches_original(shared, items, batch, ref["train"])


@pytest.fixture(scope="module")
def plain_loss(fixtures, ref, mini):
    """The reference loss: the model's logits on the fixture's input_ids (one sample at a time) and a plain
    torch cross-entropy over the fixture's labels, mean over all supervised tokens."""
    model, processor = mini
    pixel_values = processor.tile(fixtures / "tiling" / "images" / IMAGE, 6)
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for s in ref["train"]:
            ids, labels = torch.tensor([s["input_ids"]]), torch.tensor(s["labels"])
            keep = 64  # logits of the last positions only (92,553 x 1,868 floats would be 690 MB)
            assert (labels[: -keep + 1] == IGNORE_INDEX).all()
            logits = model(input_ids=ids, pixel_values=pixel_values, logits_to_keep=keep).logits[0].float()
            loss = torch.nn.functional.cross_entropy(logits[:-1], labels[-keep + 1 :], reduction="sum")
            total += loss.double()
            count += int((labels != IGNORE_INDEX).sum())
    return total.item() / count


def test_training_loss_equals_plain_cross_entropy(internlm2_batch, plain_loss, fixtures):
    """The loss train() computes for the batch (LoRA as train() adds and initialises it, CaptionLoss, divided by
    the supervised token count) is the plain cross-entropy of the original's samples, float32, rel 1e-5."""
    _, _, _, batch = internlm2_batch
    model, _ = captune.load(fixtures / "models" / MINI, dtype="fp32")
    config = settings(fixtures / "models" / MINI, Path("d"), Path("o"), "auto")
    peft = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_vision,
                    config.train_projector)
    init_lora_weights(peft, config.seed)
    trainable_to_float32(peft)
    peft.train()
    with torch.no_grad():
        loss_sum = CaptionLoss(peft)(batch.input_ids, batch.targets, batch.attention_mask, batch.position_ids,
                                     batch.pixel_values, batch.num_tokens)
    loss = loss_sum.item() / batch.num_tokens
    assert abs(loss - plain_loss) <= 1e-5 * abs(plain_loss), (loss, plain_loss)


# --- Hermes-2 and internvl2_5: the miniature with its config's template changed ------------------------------------


@pytest.mark.parametrize("share", ["off", "on"], ids=["separate", "shared"])
@pytest.mark.parametrize("template", ["Hermes-2", "internvl2_5"])
def test_training_data_matches_original_for_other_templates(fixtures, template_ref, tmp_path, template, share):
    """The template comes from the model's config: with Hermes-2 (preprocess_mpt) or internvl2_5
    (preprocess_internvl2_5) there, the training data are the original's for that template, exactly."""
    expected = template_ref["templates"][template]
    model_dir = model_with_template(fixtures, tmp_path / "model", template)
    _, processor = captune.load(model_dir, dtype="fp32")  # as train() loads its model and processor
    assert processor.template.name == template
    data = write_data(tmp_path / "data", fixtures, [e["conversations"] for e in expected])
    config = settings(model_dir, data, tmp_path / "out", share)
    samples, shared, items, batch = training_items_and_batch(config, processor, tmp_path / "out")
    assert [list(s.conversations) for s in samples] == [e["conversations"] for e in expected]
    assert_matches_original(shared, items, batch, expected)
